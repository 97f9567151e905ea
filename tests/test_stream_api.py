"""The streaming API (hevc_ext.Encoder / hevc_ext.Decoder) and the pipes of `transcode` / `decode -o -`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_sei import H, W, av_pictures, make_side_stream, synthetic_frames, x265_packets  # noqa: E402

from hevc_ext import sei  # noqa: E402
from hevc_ext.backends import CodingConfig  # noqa: E402
from hevc_ext.errors import MismatchError, SideStreamError  # noqa: E402
from hevc_ext.sidecar import RecordType  # noqa: E402
from hevc_ext.yuv import VideoFormat, VideoWriter  # noqa: E402

from .conftest import SEQUENCES  # noqa: E402

FMT = VideoFormat(W, H, Fraction(25), 8)
REPO = Path(__file__).resolve().parents[1]


def fast_config(**kw):
    from hevc_ext.pipeline import EncoderConfig
    from hevc_ext.train import TrainConfig

    base = dict(coding=CodingConfig("ra", 32, 4), train=TrainConfig(iterations=2, batch=4, patch=16),
                kernel="reference", lambda_scale=0.0)
    base.update(kw)
    return EncoderConfig(**base)


def frames_of(packets) -> list:
    return av_pictures(b"".join(p.data for p in packets))


@pytest.fixture(scope="module")
def embedded_clip():
    plain = b"".join(d for _, d in x265_packets(synthetic_frames(10), "ra", 4))
    from hevc_ext.hevcdec import decode_frames

    side = make_side_stream(list(decode_frames(plain)), 4)
    return plain, side, sei.embed(plain, side)


# -------------------------------------------------------------------------------------------- encoder
def test_encoder_decoder_end_to_end(tmp_path):
    from hevc_ext import Decoder, Encoder
    from hevc_ext.container import mux

    from hevc_ext.train import TrainConfig

    # enough training for networks worth signalling (the UV networks here; Y stays off)
    enc = Encoder(FMT, fast_config(train=TrainConfig(iterations=40, batch=4, patch=16), lambda_scale=1e-3),
                  keep_records=True)
    packets = []
    for f in synthetic_frames(6):
        packets += enc.push(f)
    packets += enc.flush()
    assert [p.dts for p in packets] == list(range(6))
    assert sorted(p.pts for p in packets) == list(range(6))
    assert packets[0].is_key
    assert [(r.segment, r.group.label) for r in enc.records] == [(0, "y"), (0, "uv"), (1, "y"), (1, "uv")]
    stream = b"".join(p.data for p in packets)
    # the stream carries exactly the encoder's side stream, placed by the same rule as the file path
    plain, side = sei.extract(stream)
    assert side.to_bytes() == enc.side_stream.to_bytes()
    assert sei.embed(plain, enc.side_stream, [p.pts for p in packets]) == stream
    assert sei.embed(plain, enc.side_stream) == stream  # display order from the slice headers agrees
    # plays anywhere: av gives the plain pictures
    plain_pictures = av_pictures(stream)
    assert len(plain_pictures) == 6
    # the streaming decoder gives the filtered, verified pictures
    dec = Decoder(kernel="reference")
    out = []
    for p in packets:
        out += dec.push(p)
    out += dec.flush()
    assert len(out) == 6 and dec.header is not None
    assert dec.verified_records == sum(r.type is not RecordType.OFF for r in enc.records) > 0
    changed = [not np.array_equal(np.concatenate([p.reshape(-1) for p in f.planes]), q)
               for f, q in zip(out, plain_pictures)]
    assert any(changed)  # the filter did change pictures (verified against the encoder's hashes above)
    # and so does the file decoder, via a container
    mux(stream, str(tmp_path / "s.mp4"), "mp4", FMT.fps)
    from hevc_ext.pipeline import decode

    decode(str(tmp_path / "s.mp4"), str(tmp_path / "s.yuv"), kernel="reference")
    assert (tmp_path / "s.yuv").read_bytes() == b"".join(
        np.concatenate([p.reshape(-1) for p in f.planes]).tobytes() for f in out)


def test_streaming_low_delay_credit_of_later_reuse():
    """The streaming encoder credits later reuse too (reuse_decay > 0): while the stream goes on it
    takes as many GoPs as the credit looks ahead; the GoP decided at the end has nothing after it."""
    from hevc_ext import Encoder
    from hevc_ext.train import TrainConfig

    cfg = fast_config(coding=CodingConfig("ldp", 32, extra=("rc-lookahead=0", "frame-threads=1")), ld_gop=2,
                      lambda_scale=1e-3, reuse_decay=0.8, train=TrainConfig(iterations=20, batch=4, patch=16))
    enc = Encoder(FMT, cfg, keep_records=True)
    still = synthetic_frames(1)[0]
    for _ in range(7):
        enc.push(still)
    enc.flush()
    by_seg = {}
    for rec, dec in zip(enc.records, enc.decisions):
        by_seg.setdefault(rec.segment, []).append(dec)
    assert sorted(by_seg) == [0, 1, 2, 3]
    first = [c for d in by_seg[0] for c in d.candidates if c["label"].startswith("new")]
    assert any(c["gain"] > 0 for c in first)
    assert all((c["credit"] > 0) == (c["gain"] > 0) for c in first)
    assert all(c["credit"] == 0 for d in by_seg[3] for c in d.candidates)


def test_low_delay_packets_leave_one_gop_after_their_pictures():
    """x265 without lookahead gives one packet per frame; a packet waits only for its GoP's records."""
    from hevc_ext import Decoder, Encoder

    cfg = fast_config(coding=CodingConfig("ldp", 32, extra=("rc-lookahead=0", "frame-threads=1")), ld_gop=2,
                      filter_enabled=False)
    enc = Encoder(FMT, cfg, keep_records=True)
    dec = Decoder(kernel="reference")
    released, decoded = [], []
    for f in synthetic_frames(7):
        got = enc.push(f)
        released.append([p.dts for p in got])
        for p in got:
            decoded += dec.push(p)
    tail = enc.flush()
    assert released == [[], [0, 1], [], [2, 3], [], [4, 5], []]
    assert [p.dts for p in tail] == [6]
    for p in tail:
        decoded += dec.push(p)
    decoded += dec.flush()
    assert len(decoded) == 7 and len(enc.records) == 8
    assert all(r.type is RecordType.OFF for r in enc.records)


def test_encoder_refuses_hm():
    from hevc_ext import Encoder
    from hevc_ext.errors import UsageError

    with pytest.raises(UsageError, match="x265"):
        Encoder(FMT, fast_config(codec="hm"))


def test_encoder_refuses_a_bad_frame_and_goes_on():
    """A frame of the wrong shape, type or range is refused with a message that names the problem and is
    not counted: the stream still holds every good frame (it used to be lost at flush)."""
    from hevc_ext import Encoder
    from hevc_ext.errors import UsageError
    from hevc_ext.yuv import Frame

    good = list(synthetic_frames(4))
    enc = Encoder(FMT, fast_config())
    packets = enc.push(good[0])
    ch, cw = FMT.chroma_shape
    bad = [(Frame(good[1].y, np.zeros((ch, cw + 1), np.uint8), good[1].v), rf"plane U has shape \({ch}, {cw + 1}\), expected \({ch}, {cw}\) \(the encoder was set up for {W}x{H} "),
           (Frame(good[1].y.astype(np.float32) / 255, good[1].u, good[1].v), "plane Y holds float32 samples, expected integers 0..255"),
           (Frame(good[1].y.astype(np.uint16) * 4, good[1].u, good[1].v), "plane Y has samples .* outside 0..255"),
           (Frame(good[1].y.astype(np.int16) - 300, good[1].u, good[1].v), "plane Y has samples -300..* outside"),
           (good[1].planes, "expected a hevc_ext.yuv.Frame .* got tuple")]
    for frame, message in bad:
        with pytest.raises(UsageError, match="frame 1: " + message):
            enc.push(frame)
    for f in good[1:]:
        packets += enc.push(f)
    packets += enc.flush()
    assert enc.flush() == []
    pictures = frames_of(packets)
    assert len(pictures) == 4
    with pytest.raises(UsageError, match="after flush"):
        enc.push(good[0])


def test_decoder_lifecycle_and_input_types(embedded_clip):
    from hevc_ext import Decoder
    from hevc_ext.errors import UsageError

    plain, side, embedded = embedded_clip
    dec = Decoder(kernel="reference")
    for bad in (5, [1, 2], "text"):
        with pytest.raises(TypeError, match="bytes or a Packet"):
            dec.push(bad)
    out = dec.push(bytearray(embedded)) + dec.flush()
    assert len(out) == 10 and dec.flush() == []  # a second flush: nothing more, no error
    with pytest.raises(UsageError, match="push after flush"):
        dec.push(embedded)


def test_encoder_memory_does_not_grow_with_the_stream():
    """Open-GOP random access, 6 segments: each segment's records still go in the access unit the
    file path puts them in (sei.embed's rule), while the encoder forgets the segments whose packets are
    out; without keep_records it keeps no records (side_stream says how to get them)."""
    from hevc_ext import Encoder
    from hevc_ext.errors import UsageError

    frames = synthetic_frames(22)
    cfg = fast_config(filter_enabled=False)
    kept, lean = Encoder(FMT, cfg, keep_records=True), Encoder(FMT, cfg)
    packets = [p for f in frames for p in kept.push(f)] + kept.flush()
    lean_packets, held = [], []
    for f in frames:
        lean_packets += lean.push(f)
        held.append(len(lean._first_au))
    lean_packets += lean.flush()
    assert len({r.segment for r in kept.records}) == 6
    for pk in (packets, lean_packets):
        stream = b"".join(p.data for p in pk)
        plain, side = sei.extract(stream)
        assert [(r.segment, r.group.label) for r in side.records] == [(s, g) for s in range(6) for g in ("y", "uv")]
        assert sei.embed(plain, side, [p.pts for p in pk]) == stream
    assert kept.side_stream.to_bytes() == sei.extract(b"".join(p.data for p in packets))[1].to_bytes()
    assert max(held) <= 3 and lean._first_au == {} and lean._carried[0] == 6
    assert lean.records == [] and lean.decisions == []
    with pytest.raises(UsageError, match="keep_records=True"):
        lean.side_stream


# -------------------------------------------------------------------------------------------- decoder
def test_decoder_memory_does_not_grow_with_the_stream():
    """140 one-picture segments with a network each (NEW, NEW_DIFF, REUSE, OFF in turn): the decoder
    holds a bounded number of records (65 behind the pictures, and those ahead of them) and only the
    networks in use, and gives the same verified
    pictures as one that keeps every record."""
    from hevc_ext import Decoder
    from hevc_ext.hevcdec import decode_frames
    from hevc_ext.errors import UsageError

    plain = b"".join(d for _, d in x265_packets(synthetic_frames(140, 32, 32), "ra", 4))
    side = make_side_stream(list(decode_frames(plain)), 1, size=(32, 32))
    embedded = sei.embed(plain, side)
    lean, kept = Decoder(kernel="reference"), Decoder(kernel="reference", keep_records=True)
    out, ref, held = [], [], []
    for i in range(0, len(embedded), 4096):
        out += lean.push(embedded[i:i + 4096])
        ref += kept.push(embedded[i:i + 4096])
        held.append((max(len(r) for r in lean._filter.records.values()), len(lean._filter._nets)))
    out += lean.flush()
    ref += kept.flush()
    assert len(out) == 140 and lean.verified_records == kept.verified_records == 210
    assert all(np.array_equal(a.y, b.y) and np.array_equal(a.v, b.v) for a, b in zip(out, ref))
    assert max(n for n, _ in held) <= 80 and max(k for _, k in held) <= 2  # 140 records a group if kept
    assert len(kept.side_stream.records) == 280 and lean._records == []
    with pytest.raises(UsageError, match="keep_records=True"):
        lean.side_stream


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 20])
def test_decoder_any_chunking(embedded_clip, chunk):
    from hevc_ext import Decoder

    plain, side, embedded = embedded_clip
    dec = Decoder(kernel="reference", keep_records=True)
    out = []
    for i in range(0, len(embedded), chunk):
        out += dec.push(embedded[i:i + chunk])
    out += dec.flush()
    assert len(out) == 10 and dec.verified_records == 5
    assert dec.side_stream.to_bytes() == side.to_bytes()
    ref = Decoder(kernel="reference")
    ref_out = ref.push(embedded) + ref.flush()
    assert all(np.array_equal(a.y, b.y) and np.array_equal(a.u, b.u) for a, b in zip(out, ref_out))


def test_decoder_plain_stream_and_ignore_option(embedded_clip):
    from hevc_ext import Decoder

    plain, side, embedded = embedded_clip
    dec = Decoder(kernel="reference")
    got = dec.push(plain) + dec.flush()
    assert dec.header is None and len(got) == 10
    assert [np.concatenate([p.reshape(-1) for p in f.planes]).tobytes() for f in got] == \
        [a.tobytes() for a in av_pictures(plain)]
    nals, tail = sei.split_nal_units(embedded)
    idx = [i for i, n in enumerate(nals) if sei.our_contents(n, "t")]
    bad = bytearray(nals[idx[1]].data)
    bad[-5] ^= 0x40
    nals[idx[1]] = sei.NalUnit(nals[idx[1]].prefix, bytes(bad))
    damaged = sei.join_nal_units(nals, tail)
    with pytest.raises(SideStreamError, match="strip"):
        d = Decoder(kernel="reference")
        d.push(damaged)
        d.flush()
    d = Decoder(kernel="reference", ignore_side_stream=True)
    assert len(d.push(damaged) + d.flush()) == 10


def test_decoder_rejects_a_cut_stream(embedded_clip):
    from hevc_ext import Decoder

    plain, side, embedded = embedded_clip
    nals, tail = sei.split_nal_units(embedded)
    aus = sei.access_units(nals)
    cut = sei.join_nal_units([nals[i] for au in aus[:-1] for i in au])
    dec = Decoder(kernel="reference")
    with pytest.raises((MismatchError, SideStreamError)):
        dec.push(cut)
        dec.flush()


def test_decode_only_import_stays_light():
    code = ("import sys, hevc_ext; hevc_ext.Decoder; import hevc_ext.api, hevc_ext.sei, hevc_ext.container; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- pipes
class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BufferedReader(io.BytesIO(data))


def test_transcode_from_stdin_to_mp4_and_decode_to_stdout(tmp_path, monkeypatch, capsysbinary):
    from hevc_ext.cli import main
    from hevc_ext.container import read_annexb

    y4m = io.BytesIO()
    w = VideoWriter(y4m, FMT, y4m=True)
    for f in synthetic_frames(6):
        w.write(f)
    monkeypatch.setattr(sys, "stdin", _Stdin(y4m.getvalue()))
    out = tmp_path / "out.mp4"
    assert main(["transcode", "-", str(out), "--intra-period", "4", "--no-filter", "--kernel", "reference",
                 "--json", "-q"]) == 0
    rep = json.loads(capsysbinary.readouterr().out)
    assert rep["frames"] == 6 and rep["container"] == "mp4" and rep["output_bytes"] == out.stat().st_size
    with av.open(str(out)) as c:  # the MP4 plays in av
        assert sum(1 for _ in c.decode(video=0)) == 6
    plain, side = sei.extract(read_annexb(str(out)))
    assert side is None  # no picture filtered: no side stream at all (the plain stream is the result)
    assert main(["decode", str(out), "-o", "-", "--kernel", "reference"]) == 0
    y4m_out = capsysbinary.readouterr().out
    assert y4m_out.startswith(b"YUV4MPEG2 W64 H64 F25:1") and y4m_out.count(b"FRAME\n") >= 6
    assert len(y4m_out.partition(b"\n")[2]) == 6 * (6 + W * H * 3 // 2)
    # a Y4M from any av-readable input: MKV in, MKV out
    assert main(["transcode", str(out), str(tmp_path / "again.mkv"), "--intra-period", "4", "--no-filter",
                 "--kernel", "reference", "-q"]) == 0
    with av.open(str(tmp_path / "again.mkv")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 6


def test_transcode_bad_requests_fail_cleanly(tmp_path, monkeypatch, capsys):
    """Refused before any work (exit 2, the reason named): the output is the input, MP4 to a pipe, a
    suffix that names no container. Failing part-way (a Y4M on stdin cut inside a frame) exits 1 and
    leaves no output, whichever the container."""
    from hevc_ext.cli import main

    y4m = io.BytesIO()
    w = VideoWriter(y4m, FMT, y4m=True)
    for f in synthetic_frames(3):
        w.write(f)
    clip = tmp_path / "in.y4m"
    clip.write_bytes(y4m.getvalue())
    common = ["--intra-period", "4", "--no-filter", "--kernel", "reference", "-q"]
    for argv, said in (([str(clip), str(clip)], "in.y4m"), ([str(clip), "-", "--container", "mp4"], "pipe"),
                       ([str(clip), str(tmp_path / "o.avi")], "suffix '.avi'")):
        assert main(["transcode", *argv, *common]) == 2
        assert said in capsys.readouterr().err
    assert clip.read_bytes() == y4m.getvalue() and not (tmp_path / "o.avi").exists()
    cut = y4m.getvalue()[:-100]
    for name in ("o.mp4", "o.mkv", "o.hevc"):
        monkeypatch.setattr(sys, "stdin", _Stdin(cut))
        assert main(["transcode", "-", str(tmp_path / name), *common]) == 1
        assert "truncated" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.y4m"]


@pytest.mark.slow
@pytest.mark.skipif(not (SEQUENCES / "Zhling_1280x720_25.yuv").is_file(), reason="shared sequences absent")
def test_transcode_real_clip_through_pipes(tmp_path):
    """cat clip.yuv | (raw → Y4M) | hevc-nlf transcode - out.mp4; hevc-nlf decode out.mp4 -o - | count."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    src = SEQUENCES / "Zhling_1280x720_25.yuv"
    to_y4m = ("import sys; f=1280*720*3//2; o=sys.stdout.buffer; o.write(b'YUV4MPEG2 W1280 H720 F25:1 Ip C420jpeg\\n');"
              "[o.write(b'FRAME\\n'+d) for d in iter(lambda: sys.stdin.buffer.read(f), b'')]")
    cmd = (f"cat {src} | {sys.executable} -c \"{to_y4m}\" | {sys.executable} -m hevc_ext transcode - "
           f"{tmp_path}/out.mp4 --frames 4 --intra-period 4 --iterations 5 -q")
    subprocess.run(cmd, shell=True, check=True, env=env, timeout=1200)
    count = subprocess.run(f"{sys.executable} -m hevc_ext decode {tmp_path}/out.mp4 -o - | {sys.executable} -c "
                           "\"import sys; print(sys.stdin.buffer.read().count(b'FRAME'))\"",
                           shell=True, check=True, env=env, capture_output=True, text=True, timeout=600)
    assert int(count.stdout) == 4


def test_decoder_refuses_a_second_header(embedded_clip):
    """Two streams run together (two side-stream headers) are refused at the second header."""
    from hevc_ext import Decoder

    plain, side, embedded = embedded_clip
    dec = Decoder(kernel="reference")
    assert len(dec.push(embedded)) >= 1
    with pytest.raises(SideStreamError, match="a second side-stream header"):
        dec.push(embedded)


def test_decoder_errors_name_the_stream(embedded_clip):
    """FFmpeg's failure on a stream cut inside its parameter sets: the stream's name and FFmpeg's reason,
    without FFmpeg's errno and function names."""
    from hevc_ext import Decoder
    from hevc_ext.errors import InputFormatError

    plain, side, embedded = embedded_clip
    dec = Decoder(kernel="reference", origin="cut.hevc")
    with pytest.raises(InputFormatError) as err:
        dec.push(plain[:43])
        dec.flush()
    message = str(err.value)
    assert message.startswith("cut.hevc: HEVC decoding failed (FFmpeg: ") and "Errno" not in message
    assert message.endswith("the stream is damaged, or not HEVC")
