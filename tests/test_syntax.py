from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hevc_ext.errors import SideStreamError
from hevc_ext.syntax import BitReader, BitWriter


@given(st.lists(st.tuples(st.sampled_from(["u", "ue", "se"]), st.integers(0, 2**20)), max_size=40))
def test_roundtrip(items):
    w = BitWriter()
    expected = []
    for kind, v in items:
        if kind == "u":
            w.u(21, v)
        elif kind == "ue":
            w.ue(v)
        else:
            w.se(v - 2**19)
            v -= 2**19
        expected.append(v)
    w.byte_align()
    r = BitReader(w.getvalue())
    got = [r.u(21) if k == "u" else r.ue() if k == "ue" else r.se() for k, _ in items]
    assert got == expected
    r.byte_align()
    r.expect_end()


def test_exp_golomb_codes_match_hevc():
    w = BitWriter()
    for v in (0, 1, 2, 3):
        w.ue(v)
    w.se(1)
    w.se(-1)
    w.byte_align()
    # 1 | 010 | 011 | 00100 | 010 | 011 -> 1010 0110 0100 0100 11(00 0000)
    assert w.getvalue() == bytes([0b10100110, 0b01000100, 0b11000000])


def test_reader_errors():
    with pytest.raises(SideStreamError, match="truncated"):
        BitReader(b"\x01").u(9)
    with pytest.raises(SideStreamError, match="Exp-Golomb"):
        BitReader(bytes(8)).ue()
    r = BitReader(b"\x0f")
    with pytest.raises(SideStreamError, match="out of range"):
        r.ranged_u(8, "thing", 0, 10)
    r = BitReader(b"\x81")
    r.u(1)
    with pytest.raises(SideStreamError, match="alignment"):
        r.byte_align()
    with pytest.raises(ValueError):
        BitWriter().u(3, 8)
