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
