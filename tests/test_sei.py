"""In-band side stream (docs/sei.md): emulation prevention, SEI syntax, placement, embed/extract/strip on
real x265 streams, decoding with av / HM / ``hevc-nlf decode``, containers, damaged payloads."""

from __future__ import annotations

import hashlib
import io
import subprocess
from fractions import Fraction

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hevc_ext import sei
from hevc_ext.arch import Architecture, Group, Packing
from hevc_ext.backends import CodingConfig
from hevc_ext.backends.hm import locate_hm
from hevc_ext.backends.x265 import x265_params
from hevc_ext.container import mux, read_annexb
from hevc_ext.errors import InputFormatError, SideStreamError
from hevc_ext.hevcdec import decode_frames, frame_to_planes, planes_to_frame
from hevc_ext.kernels import get_kernel
from hevc_ext.quant import FloatLayer, FloatNetwork, QuantConfig, derive, quantize
from hevc_ext.sidecar import HashType, PictureHash, Record, RecordType, SideStream, StreamHeader, picture_crc
from hevc_ext.yuv import Frame, VideoFormat

W, H = 64, 64
HM_INSTALL, HM_WHY = locate_hm()  # HEVC_NLF_HM_DIR or third_party/HM, like the HM backend


# ------------------------------------------------------------------------------------------ helpers
def synthetic_frames(n: int, w: int = W, h: int = H, seed: int = 1) -> list[Frame]:
    """A moving gradient with noise and a moving block: cheap to encode, not trivial."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for t in range(n):
        y = (xx * 3 + yy * 2 + 5 * t) % 256 + rng.integers(-12, 13, (h, w))
        y[(yy // 16 + t) % 4 == 0] += 40
        cy, cx = np.mgrid[0:h // 2, 0:w // 2]
        u = 128 + ((cx + 2 * t) % 32) + rng.integers(-4, 5, (h // 2, w // 2))
        v = 100 + ((cy * 2 + t) % 48)
        out.append(Frame(*(np.clip(p, 0, 255).astype(np.uint8) for p in (y, u, v))))
    return out


def x265_packets(frames: list[Frame], mode: str = "ra", intra_period: int = 4,
                 extra: tuple[str, ...] = ()) -> list[tuple[int, bytes]]:
    """(pts, access unit) in decoding order, as the x265 backend produces them."""
    cc = av.CodecContext.create("libx265", "w")
    cc.width, cc.height, cc.pix_fmt = frames[0].y.shape[1], frames[0].y.shape[0], "yuv420p"
    cc.time_base = Fraction(1, 25)
    cc.options = {"x265-params": x265_params(CodingConfig(mode, 32, intra_period, extra=extra)), "preset": "medium"}
    out = []
    for i, f in enumerate(frames):
        vf = planes_to_frame(f, 8)
        vf.pts = i
        out += [(p.pts, bytes(p)) for p in cc.encode(vf)]
    out += [(p.pts, bytes(p)) for p in cc.encode(None)]
    return out


def random_network(group: Group, arch: Architecture, seed: int, scale: float = 1.0,
                   config: QuantConfig = QuantConfig(6, 10, 4)):
    rng = np.random.default_rng(seed)
    shapes = arch.shapes(group, Packing(1, 1))
    layers = tuple(FloatLayer(s.kind, rng.normal(0, 1.5 * scale, s.weight_shape), rng.normal(0, 0.05, s.cout), s.relu)
                   for s in shapes)
    return quantize(FloatNetwork(group, Packing(1, 1), layers), arch, config, [np.full(s.cout, 1.0) for s in shapes[:-1]])


def plane_group(frame: Frame, group: Group) -> list[np.ndarray]:
    return [frame.planes[i] for i in group.plane_indices]


def make_side_stream(recon: list[Frame], seg_len: int, mode: str = "ra", size: tuple[int, int] = (W, H)) -> SideStream:
    """Records exercising every record type with real networks and correct MD5s of the filtered output:
    Y: NEW, NEW_DIFF, OFF, REUSE...; UV: NEW, REUSE, NEW_DIFF, OFF..."""
    arch = Architecture(3, 4)
    kernel = get_kernel("reference")
    n = len(recon)
    header = StreamHeader(*size, 8, n, Fraction(25), mode, arch, arch, HashType.MD5, picture_crc(recon[0].planes, 8))
    plans = {Group.Y: ["new", "diff", "off", "reuse"], Group.UV: ["new", "reuse", "diff", "off"]}
    records = []
    current = {g: None for g in Group}
    for s, start in enumerate(range(0, n, seg_len)):
        count = min(seg_len, n - start)
        for g in (Group.Y, Group.UV):
            plan = plans[g][s % 4]
            net = None
            if plan == "new":
                net = current[g] = random_network(g, arch, seed=10 + s + 5 * g.value)
                rtype = RecordType.NEW
            elif plan == "diff":
                net = current[g] = random_network(g, arch, seed=10 + 5 * g.value, scale=1.05)
                rtype = RecordType.NEW_DIFF
            elif plan == "reuse":
                rtype = RecordType.REUSE
            else:
                rtype = RecordType.OFF
            digest = b""
            if rtype is not RecordType.OFF:
                intnet = derive(current[g], 8)
                h = PictureHash(HashType.MD5, 8)
                for i in range(start, start + count):
                    for p in kernel.filter_planes(plane_group(recon[i], g), intnet, 8):
                        h.update(p)
                digest = h.digest()
            records.append(Record(rtype, g, s, start, count, digest, net))
    return SideStream(header, tuple(records))


def flat(frame) -> np.ndarray:
    """A picture's planes, one after another (the layout of a .yuv file)."""
    return np.concatenate([p.reshape(-1) for p in frame.planes])


def av_pictures(data: bytes) -> list[np.ndarray]:
    return [flat(f) for f in decode_frames(data)]


@pytest.fixture(scope="module")
def ra_clip():
    frames = synthetic_frames(10)
    packets = x265_packets(frames, "ra", 4)
    plain = b"".join(d for _, d in packets)
    recon = list(decode_frames(plain))
    side = make_side_stream(recon, 4)
    return {"frames": frames, "packets": packets, "plain": plain, "recon": recon, "side": side,
            "embedded": sei.embed(plain, side)}


# ------------------------------------------------------------------------------ emulation prevention
_bytes_with_zeros = st.lists(st.one_of(st.sampled_from([0, 0, 0, 1, 2, 3, 0x80]), st.integers(0, 255)),
                             max_size=300).map(bytes)


@given(_bytes_with_zeros)
@settings(max_examples=300, deadline=None)
def test_emulation_prevention_round_trip(rbsp):
    ebsp = sei.escape(rbsp)
    assert sei.unescape(ebsp) == rbsp
    for bad in (b"\x00\x00\x00", b"\x00\x00\x01", b"\x00\x00\x02"):
        assert bad not in ebsp  # no start code emulation, ever
    assert not sei.escape(rbsp + b"\x80").endswith(b"\x00")  # an RBSP ends with its trailing bits


def test_emulation_prevention_vectors():
    assert sei.escape(b"\x00\x00\x00") == b"\x00\x00\x03\x00"
    assert sei.escape(b"\x00\x00\x01\x00\x00\x02\x00\x00\x03") == b"\x00\x00\x03\x01\x00\x00\x03\x02\x00\x00\x03\x03"
    assert sei.escape(b"\x00\x00\x04") == b"\x00\x00\x04"  # > 3: nothing to prevent
    assert sei.escape(b"\x00\x00") == b"\x00\x00\x03"  # a trailing zero gets the 0x03 too
    assert sei.escape(b"\x00" * 6) == b"\x00\x00\x03\x00\x00\x03\x00\x00\x03"
    assert sei.unescape(b"\x00\x00\x03\x00\x00\x03\x01") == b"\x00\x00\x00\x00\x01"


# ---------------------------------------------------------------------------------------- SEI syntax
def test_sei_nal_syntax_vector():
    nal = sei.sei_nal(b"")
    assert nal[:2] == b"\x4e\x01"  # forbidden 0, type 39, layer 0, temporal id + 1 = 1
    assert nal[2:] == b"\x05\x10" + sei.PROJECT_UUID + b"\x80"
    assert sei.PROJECT_UUID.hex() == "5b435a1ae89b46a4b37b8004c5bf8e9a"


@pytest.mark.parametrize("size", [0, 1, 238, 239, 240, 254, 255, 256, 600, 70000])
def test_sei_payload_size_ff_coding(size):
    content = bytes(range(256)) * (size // 256) + bytes(size % 256)  # with runs of zeros
    nal = sei.sei_nal(content)
    rbsp = sei.unescape(nal[2:])
    body = 16 + size
    assert rbsp[0] == 5
    assert rbsp[1:1 + body // 255] == b"\xff" * (body // 255) and rbsp[1 + body // 255] == body % 255
    assert rbsp[-1] == 0x80
    assert sei.our_contents(sei.NalUnit(b"\x00\x00\x01", nal), "t") == [content]
    for bad in (b"\x00\x00\x00", b"\x00\x00\x01", b"\x00\x00\x02"):
        assert bad not in nal


def test_foreign_sei_is_left_alone():
    other_uuid = bytes(range(16))
    rbsp = b"\x05\x14" + other_uuid + b"abcd" + b"\x80"
    nal = sei.NalUnit(b"\x00\x00\x01", b"\x4e\x01" + sei.escape(rbsp))
    assert sei.our_contents(nal, "t") is None
    # x265's own user data SEI (version string) in the first access unit is kept
    frames = synthetic_frames(2)
    plain = b"".join(d for _, d in x265_packets(frames, "ldp"))
    assert sei.strip(plain) == plain
    assert sei.extract(plain) == (plain, None)
    assert not sei.has_embedded(plain)


def test_our_messages_are_read_among_other_sei_messages():
    """A prefix SEI NAL unit may hold several messages (a tool that merged SEI NAL units): readers skip
    the foreign ones and take ours in order (docs/sei.md, "Reading")."""
    foreign = b"\x05\x14" + bytes(range(16)) + b"abcd"
    ours = [sei.unescape(sei.sei_nal(c)[2:])[:-1] for c in (b"first", b"second")]  # messages without trailing bits
    rbsp = foreign + ours[0] + b"\x04\x02xy" + ours[1] + b"\x80"  # also a registered-user-data message
    nal = sei.NalUnit(b"\x00\x00\x01", b"\x4e\x01" + sei.escape(rbsp))
    assert sei.our_contents(nal, "t") == [b"first", b"second"]
    with pytest.raises(SideStreamError, match="hevc-nlf SEI NAL unit is damaged"):
        sei.our_contents(sei.NalUnit(b"\x00\x00\x01", b"\x4e\x01" + sei.escape(rbsp[:-1] + b"\x81")), "t")


# ------------------------------------------------------------------------------ NAL units, AUs, order
def test_split_join_is_byte_exact(ra_clip):
    for data in (ra_clip["plain"], ra_clip["embedded"], b"\x00\x00\x00\x01\x40\x01\x0c\x00\x00\x00",
                 b"\x00\x00\x01\x26\x01\xaf\x00\x00\x01\x02\x01\xd0"):
        nals, tail = sei.split_nal_units(data)
        assert sei.join_nal_units(nals, tail) == data
    with pytest.raises(InputFormatError):
        sei.split_nal_units(b"ftypisom" + b"\x00" * 20)


@pytest.mark.parametrize("mode,period", [("ra", 4), ("ra", 8), ("ldp", 32)])
def test_access_units_and_display_order_match_x265(mode, period):
    packets = x265_packets(synthetic_frames(11), mode, period)
    stream = b"".join(d for _, d in packets)
    nals, _ = sei.split_nal_units(stream)
    aus = sei.access_units(nals)
    assert [sei.join_nal_units([nals[i] for i in au]) for au in aus] == [d for _, d in packets]
    assert sei.display_order(stream) == [pts for pts, _ in packets]


# ----------------------------------------------------------------------------- embed / extract / strip
def test_embed_extract_strip_round_trip(ra_clip):
    plain, side, embedded = ra_clip["plain"], ra_clip["side"], ra_clip["embedded"]
    assert sei.has_embedded(embedded)
    assert sei.strip(embedded) == plain  # byte for byte
    got_plain, got = sei.extract(embedded)
    assert got_plain == plain
    assert got.to_bytes() == side.to_bytes()
    assert sei.scan(embedded).sidecar_bytes() == side.to_bytes()  # extract writes the encoder's sidecar
    # overhead: per SEI NAL unit 4 (start code) + 2 (NAL header) + 1 (type) + 1 (size < 255) + 16 (UUID) + 1 (trailing)
    n_sei = len({a for a in sei.carriers(sei.display_order(plain), side.records)[1]} | {0})
    assert len(embedded) - len(plain) == len(side.to_bytes()) - 4 + 25 * n_sei
    with pytest.raises(ValueError, match="already carries"):
        sei.embed(embedded, side)


def test_records_go_to_the_first_access_unit_of_their_segment(ra_clip):
    display = [pts for pts, _ in ra_clip["packets"]]  # decoding order → display index
    header_au, aus = sei.carriers(display, ra_clip["side"].records)
    assert header_au == 0
    for rec, a in zip(ra_clip["side"].records, aus):
        first = min(i for i, d in enumerate(display) if d in rec.frames)
        assert a == first
        assert display[a] == rec.first_frame  # x265 RA: the segment's intra picture
    # and in the stream: the SEI sits directly before the first slice of that access unit
    nals, _ = sei.split_nal_units(ra_clip["embedded"])
    for au_index, au in enumerate(sei.access_units(nals)):
        types = [nals[i].type for i in au]
        ours = [k for k, i in enumerate(au) if sei.our_contents(nals[i], "t")]
        if au_index in set(aus):
            assert len(ours) == 1 and nals[au[ours[0] + 1]].is_vcl and not any(nals[i].is_vcl for i in au[:ours[0]])
            assert types[:3] == [32, 33, 34]  # after the parameter sets
        else:
            assert not ours


def test_record_order_is_kept_when_segments_are_out_of_order():
    recs = [Record(RecordType.OFF, Group.Y, 0, 0, 2), Record(RecordType.OFF, Group.Y, 1, 2, 2)]
    # segment 1's first picture decoded before segment 0's: it waits for segment 0's carrier
    assert sei.carriers([2, 0, 1, 3], recs) == (0, [1, 1])


def test_embedded_stream_decodes_with_av_to_the_plain_pictures(ra_clip):
    plain = av_pictures(ra_clip["plain"])
    embedded = av_pictures(ra_clip["embedded"])
    assert len(embedded) == len(plain) == 10
    assert all(np.array_equal(a, b) for a, b in zip(plain, embedded))
    # and through av's demuxer/parser path (what players use)
    with av.open(io.BytesIO(ra_clip["embedded"]), format="hevc") as c:
        frames = [np.concatenate([p.reshape(-1) for p in frame_to_planes(f).planes]) for f in c.decode(video=0)]
    assert all(np.array_equal(a, b) for a, b in zip(plain, frames)) and len(frames) == 10


@pytest.mark.skipif(HM_INSTALL is None, reason=f"HM not found: {HM_WHY}")
def test_embedded_stream_decodes_with_hm(ra_clip, tmp_path):
    (tmp_path / "x.hevc").write_bytes(ra_clip["embedded"])
    run = subprocess.run([str(HM_INSTALL.decoder), "-b", "x.hevc", "-o", "x.yuv", "-d", "8"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    expected = b"".join(np.concatenate([p.reshape(-1) for p in f.planes]).tobytes() for f in ra_clip["recon"])
    assert (tmp_path / "x.yuv").read_bytes() == expected


def test_decode_in_band_equals_sidecar(ra_clip, tmp_path):
    from hevc_ext.pipeline import decode

    (tmp_path / "emb.hevc").write_bytes(ra_clip["embedded"])
    (tmp_path / "plain.hevc").write_bytes(ra_clip["plain"])
    (tmp_path / "x.nlf").write_bytes(ra_clip["side"].to_bytes())
    a = decode(str(tmp_path / "emb.hevc"), str(tmp_path / "a.yuv"), kernel="reference")
    b = decode(str(tmp_path / "plain.hevc"), str(tmp_path / "b.yuv"), str(tmp_path / "x.nlf"), kernel="reference")
    c = decode(str(tmp_path / "plain.hevc"), str(tmp_path / "c.yuv"), kernel="reference")
    assert a.frames == b.frames == 10
    assert a.verified_records == b.verified_records == 5  # every non-OFF record's MD5 checked
    ya, yb, yc = ((tmp_path / f"{k}.yuv").read_bytes() for k in "abc")
    assert hashlib.md5(ya).digest() == hashlib.md5(yb).digest()
    assert ya != yc and c.verified_records == 0  # the filter did something; plain decode is plain


# ---------------------------------------------------------------------------------------- damage
def _sei_positions(stream: bytes) -> list[int]:
    nals, _ = sei.split_nal_units(stream)
    return [i for i, n in enumerate(nals) if sei.our_contents(n, "t")]


def _damage(stream: bytes, which: int, mode: str, pos: int, value: int) -> bytes:
    nals, tail = sei.split_nal_units(stream)
    idx = _sei_positions(stream)[which % len(_sei_positions(stream))]
    nal = nals[idx]
    rbsp = bytearray(sei.unescape(nal.data[2:]))
    if mode == "flip":  # one damaged byte of the SEI payload (message header, UUID, units, trailing bits)
        p = pos % len(rbsp)
        rbsp[p] ^= value or 1
        data = nal.data[:2] + sei.escape(bytes(rbsp))
    elif mode == "burst":  # two adjacent bytes (CRC-16 catches every burst of up to 16 bits)
        p = pos % (len(rbsp) - 1)
        rbsp[p] ^= value or 1
        rbsp[p + 1] ^= (value * 7 + 3) & 0xFF or 1
        data = nal.data[:2] + sei.escape(bytes(rbsp))
    elif mode == "truncate":  # the NAL unit cut short
        data = nal.data[:3 + pos % (len(nal.data) - 3)]
    else:  # "drop": the SEI NAL unit lost
        nals.pop(idx)
        return sei.join_nal_units(nals, tail)
    nals[idx] = sei.NalUnit(nal.prefix, data)
    return sei.join_nal_units(nals, tail)


@given(which=st.integers(0, 10), mode=st.sampled_from(["flip", "flip", "burst", "truncate", "drop"]),
       pos=st.integers(0, 1 << 16), value=st.integers(0, 255))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_damaged_sei_is_rejected_and_plain_pictures_survive(ra_clip, which, mode, pos, value):
    from hevc_ext.api import Decoder

    damaged = _damage(ra_clip["embedded"], which, mode, pos, value)
    if damaged == ra_clip["embedded"]:
        return
    with pytest.raises(SideStreamError):
        sei.extract(damaged)
    with pytest.raises(SideStreamError):
        dec = Decoder(kernel="reference")
        dec.push(damaged)
        dec.flush()
    # the pictures themselves: strip, or ignore the records, or any decoder that ignores our SEI
    plain = av_pictures(ra_clip["plain"])
    for data in (sei.strip(damaged), damaged):
        got = av_pictures(data)
        assert len(got) == len(plain) and all(np.array_equal(a, b) for a, b in zip(plain, got))
    dec = Decoder(kernel="reference", ignore_side_stream=True)
    got = dec.push(damaged) + dec.flush()
    assert len(got) == len(plain)


def test_damage_messages_are_clear(ra_clip):
    damaged = _damage(ra_clip["embedded"], 1, "flip", 30, 0x55)
    with pytest.raises(SideStreamError, match=r"SEI in access unit \d+.*CRC mismatch.*hevc-nlf strip"):
        sei.extract(damaged, "x.hevc")
    dropped = _damage(ra_clip["embedded"], 2, "drop", 0, 0)
    with pytest.raises(SideStreamError, match="missing or damaged"):
        sei.extract(dropped, "x.hevc")


# ---------------------------------------------------------------------------------------- containers
@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_container_round_trip_keeps_the_sei(ra_clip, tmp_path, container):
    from hevc_ext.pipeline import decode

    path = tmp_path / f"x.{container}"
    assert mux(ra_clip["embedded"], str(path), container, Fraction(25)) == 10
    with av.open(str(path)) as c:  # plays in av: demux + decode every picture
        assert c.streams.video[0].codec_context.name == "hevc"
        frames = [frame_to_planes(f) for f in c.decode(video=0)]
    assert len(frames) == 10
    assert all(np.array_equal(a.y, b.y) and np.array_equal(a.v, b.v) for a, b in zip(frames, ra_clip["recon"]))
    annexb = read_annexb(str(path))
    plain, side = sei.extract(annexb)
    assert side.to_bytes() == ra_clip["side"].to_bytes()
    assert av_pictures(plain) and len(av_pictures(plain)) == 10
    decode(str(path), str(tmp_path / "m.yuv"), kernel="reference")
    (tmp_path / "e.hevc").write_bytes(ra_clip["embedded"])
    decode(str(tmp_path / "e.hevc"), str(tmp_path / "e.yuv"), kernel="reference")
    assert (tmp_path / "m.yuv").read_bytes() == (tmp_path / "e.yuv").read_bytes()


# ----------------------------------------------------------------------------------------- CLI
def test_cli_extract_strip_and_decode_to_stdout(ra_clip, tmp_path, capsysbinary):
    from hevc_ext.cli import main

    emb = tmp_path / "emb.hevc"
    emb.write_bytes(ra_clip["embedded"])
    assert main(["extract", str(emb), "-o", str(tmp_path / "x.nlf"), "--stripped", str(tmp_path / "p.hevc"), "-q"]) == 0
    assert (tmp_path / "x.nlf").read_bytes() == ra_clip["side"].to_bytes()
    assert (tmp_path / "p.hevc").read_bytes() == ra_clip["plain"]
    assert main(["strip", str(emb), "-o", str(tmp_path / "s.hevc"), "-q"]) == 0
    assert (tmp_path / "s.hevc").read_bytes() == ra_clip["plain"]
    capsysbinary.readouterr()
    # nothing to extract from a plain stream: a usage error naming it, no file written
    assert main(["extract", str(tmp_path / "s.hevc"), "-o", str(tmp_path / "none.nlf"), "-q"]) == 2
    assert b"s.hevc: carries no hevc-nlf records" in capsysbinary.readouterr().err
    assert not (tmp_path / "none.nlf").exists()
    # --fps sets the Y4M frame rate of the output
    assert main(["decode", str(emb), "-o", str(tmp_path / "r.y4m"), "--fps", "50", "--kernel", "reference", "-q"]) == 0
    assert (tmp_path / "r.y4m").read_bytes().startswith(b"YUV4MPEG2 W64 H64 F50:1")
    assert main(["decode", str(emb), "-o", "-", "--kernel", "reference", "-q"]) == 0
    out = capsysbinary.readouterr().out
    header, _, rest = out.partition(b"\n")
    assert header.startswith(b"YUV4MPEG2 W64 H64 F25:1")
    frame_size = W * H * 3 // 2
    assert len(rest) == 10 * (6 + frame_size) and rest.count(b"FRAME\n") >= 10
    # the same pictures as the file decode with the sidecar
    assert main(["decode", str(tmp_path / "p.hevc"), "--sidecar", str(tmp_path / "x.nlf"), "-o",
                 str(tmp_path / "d.yuv"), "--kernel", "reference", "-q"]) == 0
    yuv = (tmp_path / "d.yuv").read_bytes()
    assert b"".join(rest[k * (6 + frame_size) + 6:(k + 1) * (6 + frame_size)] for k in range(10)) == yuv
    # damaged: a clear error, exit code 1
    (tmp_path / "bad.hevc").write_bytes(_damage(ra_clip["embedded"], 0, "flip", 40, 3))
    assert main(["decode", str(tmp_path / "bad.hevc"), "-o", str(tmp_path / "bad.yuv"), "-q"]) == 1
    assert b"CRC mismatch" in capsysbinary.readouterr().err
    assert main(["strip", str(tmp_path / "bad.hevc"), "-o", str(tmp_path / "ok.hevc"), "-q"]) == 0
    assert (tmp_path / "ok.hevc").read_bytes() == ra_clip["plain"]


def test_decode_gives_the_same_pictures_with_every_kernel(ra_clip, tmp_path, capsys):
    """`hevc-nlf decode --kernel K` for every kernel this machine has (the reference always, the C++
    kernel where it was built, CUDA where a device is present; auto picks one of them): byte-identical
    output, each verified against the stream's hashes, and not the unfiltered pictures."""
    import json

    from hevc_ext import kernels
    from hevc_ext.cli import main

    emb = tmp_path / "e.hevc"
    emb.write_bytes(ra_clip["embedded"])
    names = ["reference", "auto"]
    for name in ("cpu", "cuda"):
        try:
            kernels.get_kernel(name)
            names.append(name)
        except kernels.KernelError:
            pass
    outputs = {}
    for name in names:
        out = tmp_path / f"{name}.yuv"
        capsys.readouterr()
        assert main(["decode", str(emb), "-o", str(out), "--kernel", name, "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["records_verified"] > 0 and rep["frames"] == len(ra_clip["frames"])
        # auto takes the first of cuda, cpu, reference that this machine has
        assert rep["kernel"] == (name if name != "auto" else next(k for k in ("cuda", "cpu", "reference") if k in names))
        outputs[name] = out.read_bytes()
    assert all(o == outputs["reference"] for o in outputs.values())
    unfiltered = b"".join(flat(f).tobytes() for f in ra_clip["recon"])
    assert len(unfiltered) == len(outputs["reference"]) and unfiltered != outputs["reference"]


def _cheap_encode_args(tmp_path) -> list[str]:
    """Writes a 6-picture Y4M clip into ``tmp_path``; `hevc-nlf encode` arguments for it that train cheap
    networks still worth signalling (a side stream with records of every kind the test needs)."""
    from hevc_ext.yuv import VideoWriter

    with open(tmp_path / "clip.y4m", "wb") as f:
        w = VideoWriter(f, VideoFormat(W, H, Fraction(25), 8), y4m=True)
        for fr in synthetic_frames(6):
            w.write(fr)
    return [str(tmp_path / "clip.y4m"), "--intra-period", "4", "--iterations", "40", "--batch", "4", "--patch", "16",
            "--lambda-scale", "0.001", "--kernel", "reference"]


def test_encode_embed_reports_the_real_file_size(tmp_path, capsys):
    """`encode --embed` writes one stream; hevc + side bytes = its size."""
    import json

    from hevc_ext.cli import main

    args = _cheap_encode_args(tmp_path) + ["--json", "-q"]
    capsys.readouterr()
    assert main(["encode", *args, "-o", str(tmp_path / "e"), "--embed"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "e.nlf").exists()
    size = (tmp_path / "e.hevc").stat().st_size
    assert rep["embedded"] and rep["hevc_bytes"] + rep["side_bytes"] == rep["file_bytes"] == size
    assert main(["encode", *args, "-o", str(tmp_path / "s")]) == 0
    rep_s = json.loads(capsys.readouterr().out)
    assert rep_s["side_bytes"] == (tmp_path / "s.nlf").stat().st_size
    # one SEI NAL unit in each access unit that carries records: together they are the side bytes, and
    # their contents the sidecar's units (without its 4-byte magic)
    plain = sei.strip((tmp_path / "e.hevc").read_bytes())
    side = sei.extract((tmp_path / "e.hevc").read_bytes())[1]
    n_sei = len(set(sei.carriers(sei.display_order(plain), side.records)[1]) | {0})
    ours = [n for n in sei.split_nal_units((tmp_path / "e.hevc").read_bytes())[0]
            if sei.our_contents(n, "e.hevc") is not None]
    assert len(ours) == n_sei and rep["side_bytes"] == sum(len(n.prefix) + len(n.data) for n in ours)
    assert sum(len(c) for n in ours for c in sei.our_contents(n, "e.hevc")) == rep["sidecar_bytes"] - 4
    main(["extract", str(tmp_path / "e.hevc"), "-o", str(tmp_path / "x.nlf"), "-q"])
    assert (tmp_path / "x.nlf").read_bytes() == side.to_bytes() and len(side.to_bytes()) == rep["sidecar_bytes"]
    assert len(sei.strip((tmp_path / "e.hevc").read_bytes())) == rep["hevc_bytes"]
    # (x265 through av is not bit-exact between runs here, so the two plain streams are not compared)


def test_embedding_encode_replaces_an_earlier_sidecar(tmp_path, capsys, caplog):
    """`encode --embed -o BASE` over an earlier `encode -o BASE` removes the stale BASE.nlf; and a
    decode that finds a .nlf beside a stream with records of its own keeps the stream's records, while a
    named --sidecar still wins."""
    import json
    import logging

    from hevc_ext.cli import main

    common = _cheap_encode_args(tmp_path)
    assert main(["encode", *common, "-o", str(tmp_path / "other"), "--qp", "38", "-q"]) == 0  # another encode
    assert main(["encode", *common, "-o", str(tmp_path / "b"), "-q"]) == 0
    assert (tmp_path / "b.nlf").is_file()
    with caplog.at_level(logging.WARNING, logger="hevc_ext"):
        assert main(["encode", *common, "-o", str(tmp_path / "b"), "--embed", "--qp", "30"]) == 0
    assert not (tmp_path / "b.nlf").exists()
    assert any("removed" in r.getMessage() and "b.nlf" in r.getMessage() for r in caplog.records)
    # a left-over file beside the stream (here: another encode's) is ignored in favour of the embedded records
    (tmp_path / "b.nlf").write_bytes((tmp_path / "other.nlf").read_bytes())
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hevc_ext"):
        assert main(["decode", str(tmp_path / "b.hevc"), "-o", str(tmp_path / "d.yuv"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["side_stream"] == "embedded SEI" and rep["sidecar"] is None and rep["frames"] == 6
    assert any("ignoring" in r.getMessage() for r in caplog.records)
    # named, the file is applied (and here rejected: it belongs to another encode)
    assert main(["decode", str(tmp_path / "b.hevc"), "--sidecar", str(tmp_path / "b.nlf"), "-o",
                 str(tmp_path / "e.yuv"), "-q"]) == 1
    assert "another encode" in capsys.readouterr().err


def test_nal_splitter_agrees_with_the_whole_stream_split_at_any_chunking():
    """The incremental splitter (which searches only each push's new bytes) gives the NAL units of
    split_nal_units for 3- and 4-byte start codes, trailing zeros and runs of zeros inside units."""
    rng = np.random.default_rng(11)
    parts = []
    for i in range(60):
        body = rng.integers(0, 4, int(rng.integers(1, 400)), dtype=np.uint8).tobytes()
        body = body.replace(b"\x00\x00\x00", b"\x00\x00\x03").replace(b"\x00\x00\x01", b"\x00\x00\x03")
        body = body.replace(b"\x00\x00\x02", b"\x00\x00\x03")
        parts.append((b"\x00" if i % 3 == 0 else b"") + b"\x00\x00\x01" + bytes([0x40 + 2 * (i % 20), 1]) + body.rstrip(b"\x00")
                     + b"\x01" + b"\x00" * int(i % 4 == 1))
    stream = b"".join(parts)
    expected = [(n.prefix, n.data) for n in sei.split_nal_units(stream)[0]]
    for chunk in (1, 2, 3, 5, 64, len(stream)):
        s = sei.NalSplitter()
        got = []
        for i in range(0, len(stream), chunk):
            got += s.push(stream[i:i + chunk])
        got += s.flush()
        assert [(n.prefix, n.data) for n in got] == expected, chunk
    cuts = np.sort(rng.choice(np.arange(1, len(stream)), 40, replace=False))
    s = sei.NalSplitter()
    got = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)]):
        got += s.push(stream[a:b])
    assert [(n.prefix, n.data) for n in got + s.flush()] == expected
