"""Entropy coding of networks and the side-stream container: round trips and malformed input."""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hevc_ext.arch import ALL_PACKINGS, Architecture, Group, Packing
from hevc_ext.entropy import GEOMETRIC_DECAY, decode_network, encode_network, geometric_frequencies
from hevc_ext.errors import MismatchError, SideStreamError, UsageError
from hevc_ext.quant import EXP_MAX, EXP_MIN, QLayer, QuantConfig, QuantizedNetwork, scale_axis
from hevc_ext.gop import MAX_SEGMENT, split
from hevc_ext.sidecar import (MAGIC, MAX_COUNT_MINUS1, MAX_FPS_TERM, MAX_FRAME_COUNT, HashType, Record, RecordType,
                              SideStream, StreamHeader, check_stream_matches)


def random_qnet(rng: np.random.Generator, group: Group, packing: Packing, arch: Architecture,
                config: QuantConfig, base: QuantizedNetwork | None = None, spread: int | None = None) -> QuantizedNetwork:
    half = 1 << (config.scale_bits - 1)
    layers = []
    for i, s in enumerate(arch.shapes(group, packing)):
        ns = s.cout if scale_axis(i) == "out" else s.cin
        if base is None:
            w = rng.integers(-config.wmax, config.wmax + 1, s.weight_shape)
            sig = rng.integers(half, 2 * half, ns)
            exp = rng.integers(EXP_MIN, EXP_MAX + 1, ns)
            b = rng.integers(-config.bmax, config.bmax + 1, s.cout)
            bs, be, act = int(rng.integers(half, 2 * half)), int(rng.integers(EXP_MIN, EXP_MAX + 1)), int(rng.integers(0, 32))
        else:  # a small update of ``base`` (low-delay style)
            p = base.layers[i]
            k = spread or 2
            w = np.clip(p.weight + rng.integers(-k, k + 1, s.weight_shape) * (rng.random(s.weight_shape) < 0.3),
                        -config.wmax, config.wmax)
            sig, exp, b = p.w_sig.copy(), np.clip(p.w_exp + rng.integers(-1, 2, ns), EXP_MIN, EXP_MAX), p.bias
            bs, be, act = p.b_sig, p.b_exp, p.act_exp
        layers.append(QLayer(w.astype(np.int32), np.asarray(sig, np.int64), np.asarray(exp, np.int64),
                             np.asarray(b, np.int64), bs, be, act if i < arch.layers - 1 else 0))
    return QuantizedNetwork(group, packing, arch, config, tuple(layers))


CONFIGS = [QuantConfig(8, 10, 4), QuantConfig(5, 8, 2), QuantConfig(2, 2, 1), QuantConfig(4, 16, 8)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"w{c.weight_bits}b{c.bias_bits}s{c.scale_bits}")
@pytest.mark.parametrize("packing", ALL_PACKINGS, ids=str)
def test_network_roundtrip_absolute_and_difference(config, packing):
    rng = np.random.default_rng(config.weight_bits * 10 + packing.index)
    for group, arch in ((Group.Y, Architecture()), (Group.UV, Architecture(3, 6)), (Group.Y, Architecture(7, 16))):
        a = random_qnet(rng, group, packing, arch, config)
        data = encode_network(a)
        assert len(data) % 4 == 0
        assert decode_network(data, group, packing, arch, config).equals(a)
        b = random_qnet(rng, group, packing, arch, config, base=a)
        diff = encode_network(b, a)
        assert decode_network(diff, group, packing, arch, config, prev=a).equals(b)
        assert len(diff) < len(data)  # small updates cost less than a new network


def test_geometric_frequencies_follow_their_definition():
    for q in (0, 7, 31):
        f = geometric_frequencies(q, 50)
        assert f[50] == 1 << 16 and np.array_equal(f, f[::-1])
        expect = 1 << 16
        for n in range(1, 51):
            expect = max(1, (expect * GEOMETRIC_DECAY[q] + (1 << 15)) >> 16)
            assert f[50 + n] == expect
    assert list(GEOMETRIC_DECAY) == sorted(GEOMETRIC_DECAY)


def _header(**kw) -> StreamHeader:
    base = dict(width=64, height=48, bitdepth=8, frame_count=6, fps=Fraction(30), mode="ldp",
                arch_y=Architecture(), arch_uv=Architecture(3, 6), hash_type=HashType.MD5, first_picture_crc=0x1234ABCD)
    base.update(kw)
    return StreamHeader(**base)


def _stream(rng) -> SideStream:
    h = _header()
    cfg = QuantConfig(5, 8, 2)
    y0 = random_qnet(rng, Group.Y, Packing(1, 2), h.arch_y, cfg)
    uv0 = random_qnet(rng, Group.UV, Packing(1, 1), h.arch_uv, cfg)
    y1 = random_qnet(rng, Group.Y, Packing(1, 2), h.arch_y, cfg, base=y0)
    md5 = lambda: bytes(rng.integers(0, 256, 16, dtype=np.uint8))  # noqa: E731
    recs = [Record(RecordType.NEW, Group.Y, 0, 0, 2, md5(), y0), Record(RecordType.NEW, Group.UV, 0, 0, 2, md5(), uv0),
            Record(RecordType.NEW_DIFF, Group.Y, 1, 2, 2, md5(), y1), Record(RecordType.REUSE, Group.UV, 1, 2, 2, md5()),
            Record(RecordType.OFF, Group.Y, 2, 4, 2), Record(RecordType.REUSE, Group.UV, 2, 4, 2, md5())]
    return SideStream(h, tuple(recs))


def test_side_stream_roundtrip():
    s = _stream(np.random.default_rng(0))
    data = s.to_bytes()
    assert data[:4] == MAGIC
    back = SideStream.from_bytes(data)
    back.check_consistency()
    assert back.header == s.header
    assert [r.type for r in back.records] == [r.type for r in s.records]
    assert back.records[2].network.equals(s.records[2].network)
    assert back.records[3].network.equals(s.records[1].network)  # REUSE resolves to the UV reference
    assert back.records[5].network.equals(s.records[1].network)
    assert all(a.output_hash == b.output_hash for a, b in zip(back.records, s.records))


def test_malformed_streams_give_clear_errors():
    data = _stream(np.random.default_rng(1)).to_bytes()
    with pytest.raises(SideStreamError, match="magic"):
        SideStream.from_bytes(b"RIFF" + data[4:])
    with pytest.raises(SideStreamError, match="truncated"):
        SideStream.from_bytes(data[:-7])
    with pytest.raises(SideStreamError, match="CRC"):
        SideStream.from_bytes(data[:30] + bytes([data[30] ^ 0x10]) + data[31:])
    with pytest.raises(SideStreamError, match="no header"):
        SideStream.from_bytes(MAGIC)
    with pytest.raises(MismatchError, match="another encode"):
        check_stream_matches(_header(), 64, 40, 8, "x.nlf")


def test_coded_networks_must_be_canonical():
    """A coded network is exactly the range coder's words for its symbols: a trailing word, or a changed
    bit the range decoder would not notice, is rejected (docs/sidecar.md, "Coded network")."""
    rng = np.random.default_rng(7)
    cfg = QuantConfig(5, 8, 2)
    net = random_qnet(rng, Group.Y, Packing(1, 2), Architecture(), cfg)
    data = encode_network(net)
    assert decode_network(data, Group.Y, Packing(1, 2), Architecture(), cfg).equals(net)
    for tail in (b"\0" * 4, b"\x12\x34\x56\x78", b"\0" * 8):
        with pytest.raises(SideStreamError, match=f"not canonical \\({len(tail)} bytes of unused data"):
            decode_network(data + tail, Group.Y, Packing(1, 2), Architecture(), cfg)
    undetected = 0  # low bits of the last word: the symbols still decode, the payload is not canonical
    for bit in range(8):
        changed = data[:-4] + bytes([data[-4] ^ (1 << bit)]) + data[-3:]
        try:
            decoded = decode_network(changed, Group.Y, Packing(1, 2), Architecture(), cfg)
        except SideStreamError:
            continue
        undetected += decoded.equals(net)
    assert undetected == 0
    # ... in a record of a sidecar, too (record 2 is a NEW_DIFF one)
    from hevc_ext.sidecar import frame_unit, iter_units

    units = list(iter_units(_stream(rng).to_bytes()[len(MAGIC):], "x.nlf"))
    units[3] = (units[3][0], units[3][1] + b"\0" * 4)
    with pytest.raises(SideStreamError, match="record 2 .*not canonical"):
        SideStream.from_bytes(MAGIC + b"".join(frame_unit(k, p) for k, p in units))


def test_each_group_must_cover_every_picture():
    """A group without records is an error, not "unfiltered" (that is what OFF records say): in a side
    stream that gives its picture count, and, at the end, in one written while streaming (count 0)."""
    from hevc_ext.kernels import get_kernel
    from hevc_ext.pipeline import FrameFilter
    from hevc_ext.yuv import Frame

    stream = _stream(np.random.default_rng(3))
    uv_only = SideStream(stream.header, tuple(r for r in stream.records if r.group is Group.UV))
    with pytest.raises(SideStreamError, match="y records cover 0 frames, header says 6"):
        uv_only.check_consistency()
    with pytest.raises(SideStreamError, match="y records cover 0 frames"):
        SideStream.from_bytes(uv_only.to_bytes()).check_consistency()
    # written while streaming: the count is unknown, the decoder checks what each group covered
    off = (Record(RecordType.OFF, Group.UV, 0, 0, 2),)
    streamed = SideStream(replace(stream.header, frame_count=0, first_picture_crc=None), off)
    streamed.check_consistency()
    f = FrameFilter(streamed, get_kernel("reference"), "x.nlf")
    picture = Frame(np.zeros((48, 64), np.uint8), np.zeros((24, 32), np.uint8), np.zeros((24, 32), np.uint8))
    for _ in range(2):
        f.process(picture, 8)
    with pytest.raises(MismatchError, match="the side stream describes 0"):
        f.finish()


def test_picture_hashes_depend_on_the_bit_depth_not_the_dtype():
    """output_hash and first_picture_crc hash one byte per sample at 8 bits and two (little-endian) at
    9..16, whatever array type holds the samples."""
    from hevc_ext.sidecar import PictureHash, picture_crc

    rng = np.random.default_rng(4)
    planes8 = [rng.integers(0, 256, (6, 8), dtype=np.uint8) for _ in range(3)]
    as16 = [p.astype(np.uint16) for p in planes8]
    assert picture_crc(planes8, 8) == picture_crc(as16, 8)
    import zlib
    assert picture_crc(planes8, 8) == zlib.crc32(b"".join(p.tobytes() for p in planes8))
    assert picture_crc(as16, 10) == zlib.crc32(b"".join(p.astype("<u2").tobytes() for p in as16))
    a, b = PictureHash(HashType.MD5, 8), PictureHash(HashType.MD5, 8)
    for p, q in zip(planes8, as16):
        a.update(p)
        b.update(q)
    assert a.digest() == b.digest()


def test_writer_refuses_what_the_reader_would_reject():
    """Each ue(v) field with a range: the largest value round-trips, one more is refused when writing."""
    s = _stream(np.random.default_rng(2))
    h = s.header
    top = replace(h, frame_count=MAX_FRAME_COUNT, fps=Fraction(MAX_FPS_TERM, MAX_FPS_TERM - 1))
    off = Record(RecordType.OFF, Group.Y, MAX_FRAME_COUNT, MAX_FRAME_COUNT, MAX_COUNT_MINUS1 + 1)
    back = SideStream.from_bytes(SideStream(top, (off,)).to_bytes())
    assert back.header == top and back.records[0].frame_count == MAX_COUNT_MINUS1 + 1
    for bad, field in [(replace(h, frame_count=MAX_FRAME_COUNT + 1), "frame count"),
                       (replace(h, fps=Fraction(MAX_FPS_TERM + 1, 1)), "frame rate numerator"),
                       (replace(h, fps=Fraction(1, MAX_FPS_TERM + 1)), "frame rate denominator")]:
        with pytest.raises(UsageError, match=field):
            SideStream(bad, ()).to_bytes()
    for rec, field in [(replace(off, segment=MAX_FRAME_COUNT + 1), "segment index"),
                       (replace(off, first_frame=MAX_FRAME_COUNT + 1), "first frame"),
                       (replace(off, frame_count=MAX_COUNT_MINUS1 + 2), "record frame count")]:
        with pytest.raises(UsageError, match=field):
            SideStream(h, (rec,)).to_bytes()


def test_segments_fit_the_record_syntax():
    assert [(g.start, g.count) for g in split(70, "ra", intra_period=32)] == [(0, 32), (32, 32), (64, 6)]
    assert split(3, "ra", intra_period=MAX_SEGMENT)[0].count == 3
    with pytest.raises(UsageError, match="intra period"):
        split(3, "ra", intra_period=MAX_SEGMENT + 1)
    with pytest.raises(UsageError, match="GoP size"):
        split(3, "ldp", ld_gop=65)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_parser_only_raises_side_stream_errors(data):
    """Any damage — flipped bytes, truncation, insertion — is rejected with SideStreamError (or, when a
    mutation happens to keep every CRC valid, parses); never another exception, never a hang."""
    original = _stream(np.random.default_rng(2)).to_bytes()
    buf = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "zero"]))
        pos = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            buf[pos:pos + 4] = bytes(min(4, len(buf) - pos))
    try:
        s = SideStream.from_bytes(bytes(buf))
        s.check_consistency()
    except SideStreamError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_after_magic(tail):
    try:
        SideStream.from_bytes(MAGIC + tail)
    except SideStreamError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=64))
def test_fuzz_network_payloads(payload):
    """Arbitrary bytes as a coded network: decoded into a valid network, or SideStreamError."""
    cfg = QuantConfig(5, 8, 2)
    try:
        decode_network(payload, Group.Y, Packing(1, 1), Architecture(3, 4), cfg)
    except SideStreamError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_record_and_header_parsers_behind_the_crc(data):
    """Mutated unit payloads fed to the parsers directly (as if the CRC had matched)."""
    from hevc_ext.sidecar import RecordParser, header_payload, parse_header_payload

    s = _stream(np.random.default_rng(3))
    payloads = s.record_payloads()
    idx = data.draw(st.integers(0, len(payloads)))
    raw = bytearray(header_payload(s.header) if idx == len(payloads) else payloads[idx])
    for _ in range(data.draw(st.integers(1, 3))):
        if raw and data.draw(st.booleans()):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        else:
            del raw[data.draw(st.integers(0, len(raw))):]
    try:
        if idx == len(payloads):
            parse_header_payload(bytes(raw))
        else:
            parser = RecordParser(s.header)
            for i in range(idx):
                parser.parse(payloads[i], i)
            parser.parse(bytes(raw), idx)
    except SideStreamError:
        pass


# ------------------------------------------------------------------- conformance with docs/sidecar.md
#: docs/sidecar.md, "Coded network": T[q] and the fixed shape q_s of the small scalars
DOC_T = [115, 424, 1200, 2740, 5274, 8869, 13399, 18591, 24109, 29633, 34905, 39750, 44069, 47828, 51039, 53741,
         55986, 57835, 59346, 60573, 61565, 62364, 63006, 63520, 63930, 64258, 64520, 64728, 64894, 65026, 65131, 65214]
DOC_Q_SMALL = 4


class _SpecEncoder:
    """The symbols of docs/sidecar.md written with constriction directly (not through hevc_ext.entropy)."""

    def __init__(self) -> None:
        import constriction

        self.cs = constriction
        self.enc = constriction.stream.queue.RangeEncoder()

    @staticmethod
    def freqs(q: int, k: int) -> list[int]:
        half = [1 << 16]
        for _ in range(k):
            half.append(max(1, (half[-1] * DOC_T[q] + (1 << 15)) >> 16))
        return half[:0:-1] + half

    def U(self, value: int, n: int) -> None:
        if n >= 2:
            self.enc.encode(int(value), self.cs.stream.model.Uniform(n))

    def G(self, values, q: int, k: int) -> None:
        values = [int(v) for v in np.ravel(values)]
        if values:
            f = np.array(self.freqs(q, k), np.float64)
            model = self.cs.stream.model.Categorical(f / f.sum(), perfect=False)
            self.enc.encode(np.array([v + k for v in values], np.int32), model)

    def T(self, values, k: int) -> None:
        values = [int(v) for v in np.ravel(values)]
        costs = []
        for q in range(32):
            f = np.array(self.freqs(q, k), np.float64)
            costs.append(float(-np.log2(f[np.array(values) + k] / f.sum()).sum()))
        q = int(np.argmin(costs))
        self.U(q, 32)
        self.G(values, q, k)

    def bytes(self) -> bytes:
        return self.enc.get_compressed().astype("<u4").tobytes()


def _spec_encode(net: QuantizedNetwork, ref: QuantizedNetwork | None = None) -> bytes:
    cfg = net.config
    Q, Qb, h, E = cfg.wmax, cfg.bmax, 1 << (cfg.scale_bits - 1), 63
    assert (Q, Qb) == ((1 << (cfg.weight_bits - 1)) - 1, (1 << (cfg.bias_bits - 1)) - 1)
    enc = _SpecEncoder()
    L = len(net.layers)
    for l, layer in enumerate(net.layers):
        if ref is None:
            if l < L - 1:
                enc.U(layer.act_exp, 32)
            enc.U(int(layer.w_exp[0]) + 16, 64)
            enc.G([int(b) - int(a) for a, b in zip(layer.w_exp[:-1], layer.w_exp[1:])], DOC_Q_SMALL, E)
            for m in layer.w_sig:
                enc.U(int(m) - h, h)
            enc.T(layer.weight, Q)
            enc.U(layer.b_exp + 16, 64)
            enc.U(layer.b_sig - h, h)
            enc.T(layer.bias, Qb)
        else:
            r = ref.layers[l]
            if l < L - 1:
                enc.G([layer.act_exp - r.act_exp], DOC_Q_SMALL, 31)
            enc.T(layer.w_exp - r.w_exp, E)
            if h > 1:
                enc.T(layer.w_sig - r.w_sig, h - 1)
            enc.T(layer.weight.astype(np.int64) - r.weight, 2 * Q)
            enc.G([layer.b_exp - r.b_exp], DOC_Q_SMALL, E)
            if h > 1:
                enc.G([layer.b_sig - r.b_sig], DOC_Q_SMALL, h - 1)
            enc.T(layer.bias - r.bias, 2 * Qb)
    return enc.bytes()


def _conformance_pair():
    """A tiny hand-built network (Y, 1x1, 3 layers of 2 filters, 4-bit weights) and an update of it."""
    cfg = QuantConfig(4, 6, 2)  # Q = 7, Qb = 31, h = 2

    def layer(w, sig, exp, bias, bs, be, act):
        return QLayer(np.array(w, np.int32), np.array(sig, np.int64), np.array(exp, np.int64),
                      np.array(bias, np.int64), bs, be, act)

    a = QuantizedNetwork(Group.Y, Packing(1, 1), Architecture(3, 2), cfg, (
        layer([[3], [-7]], [2, 3], [5, 8], [1, -2], 3, 12, 9),
        layer([[[0, 1, 0], [1, -4, 1], [0, 1, 0]], [[7, 0, 0], [0, 0, 0], [0, 0, -7]]], [3, 2], [2, 1], [0, 31],
              2, 10, 11),
        layer([[1, -1]], [2, 2], [0, 0], [-31], 3, 16, 0)))
    b = QuantizedNetwork(Group.Y, Packing(1, 1), Architecture(3, 2), cfg, (
        layer([[4], [-7]], [2, 3], [6, 8], [1, -3], 3, 13, 8),
        layer([[[0, 1, 0], [1, -4, 1], [0, 1, 0]], [[6, 0, 0], [0, 0, 0], [0, 0, -7]]], [2, 2], [2, 1], [0, 30],
              3, 10, 12),
        layer([[1, -1]], [2, 3], [0, -1], [-31], 3, 14, 0)))
    return a, b


def test_doc_tables_match_the_implementation_constants():
    from hevc_ext import entropy

    assert list(entropy.GEOMETRIC_DECAY) == DOC_T
    assert entropy.Q_SMALL == DOC_Q_SMALL
    for q in range(32):  # T[q] = round(65536 · exp(−1 / 2^((q − 8)/3)))
        assert DOC_T[q] == round(65536 * np.exp(-1 / 2 ** ((q - 8) / 3)))
    for q, k in ((0, 3), (DOC_Q_SMALL, 63), (DOC_Q_SMALL, 31), (31, 7)):
        assert geometric_frequencies(q, k).tolist() == _SpecEncoder.freqs(q, k)


def test_coded_network_conforms_to_the_documented_syntax():
    """encode_network produces exactly the bytes of an encoder transcribed from docs/sidecar.md (absolute
    and difference coding), and decode_network reads them back."""
    a, b = _conformance_pair()
    want_a, want_b = _spec_encode(a), _spec_encode(b, a)
    assert encode_network(a) == want_a
    assert encode_network(b, a) == want_b
    assert decode_network(want_a, a.group, a.packing, a.arch, a.config).equals(a)
    assert decode_network(want_b, b.group, b.packing, b.arch, b.config, prev=a).equals(b)


def test_decoder_rejects_difference_coded_weights_outside_the_config():
    """NEW_DIFF codes weight differences in ±2Q, so a decoded weight (reference + difference) can leave
    ±Q; the decoder must reject it (docs/sidecar.md: |wq| <= Q)."""
    a, _ = _conformance_pair()
    cfg = a.config
    bad_layers = list(a.layers)
    w = a.layers[0].weight.copy()
    w[1, 0] = -cfg.wmax - 3  # reference −7, difference −3 (codable in ±14), decoded −10 outside ±7
    bad_layers[0] = replace(a.layers[0], weight=w)
    bad = QuantizedNetwork(a.group, a.packing, a.arch, cfg, tuple(bad_layers))
    data = encode_network(bad, a)
    with pytest.raises(SideStreamError, match=r"layer 1: weights out of range -7\.\.7"):
        decode_network(data, a.group, a.packing, a.arch, cfg, prev=a)
    # a wider config accepts the same integers (the check uses the config's range, nothing else)
    wide = QuantConfig(5, cfg.bias_bits, cfg.scale_bits)
    a_wide = QuantizedNetwork(a.group, a.packing, a.arch, wide, a.layers)
    bad_wide = QuantizedNetwork(a.group, a.packing, a.arch, wide, tuple(bad_layers))
    back = decode_network(encode_network(bad_wide, a_wide), a.group, a.packing, a.arch, wide, prev=a_wide)
    assert back.equals(bad_wide)


def test_merge_off_runs():
    """Runs of OFF records of a group become one record (where the run began); other records, and the
    other group's, keep their places; a run stops at the frame_count limit."""
    from hevc_ext.sidecar import MAX_COUNT_MINUS1, merge_off_runs

    def rec(t, g, s, first, n):
        return Record(t, g, s, first, n)

    Y, UV = Group.Y, Group.UV
    recs = []
    plan = {Y: [RecordType.OFF, RecordType.OFF, RecordType.REUSE, RecordType.OFF, RecordType.OFF],
            UV: [RecordType.OFF] * 5}
    for s in range(5):
        for g in (Y, UV):
            recs.append(rec(plan[g][s], g, s, 4 * s, 4))
    merged, heads = merge_off_runs(recs)
    assert [(r.type, r.group, r.segment, r.first_frame, r.frame_count) for r in merged] == [
        (RecordType.OFF, Y, 0, 0, 8), (RecordType.OFF, UV, 0, 0, 20), (RecordType.REUSE, Y, 2, 8, 4),
        (RecordType.OFF, Y, 3, 12, 8)]
    assert heads == [0, 1, None, None, 2, None, 3, None, None, None]
    big = MAX_COUNT_MINUS1 // 2  # two fit in one record (frame_count_minus1 ≤ MAX_COUNT_MINUS1), three do not
    merged, heads = merge_off_runs([rec(RecordType.OFF, Y, s, s * big, big) for s in range(3)])
    assert [r.frame_count for r in merged] == [2 * big, big] and heads == [0, None, 1]
