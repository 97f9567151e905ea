"""The integer filter: checked against a literal, loop-by-loop reading of its specification."""

from __future__ import annotations

import numpy as np
import pytest

from hevc_ext.arch import ALL_PACKINGS, Architecture, Group, Packing
from hevc_ext.errors import SideStreamError
from hevc_ext.reference import (IntLayer, IntNetwork, filter_planes, pad_and_pack, random_network,
                                residual_packed, unpack)


def spec_filter(planes, net: IntNetwork, bd: int):
    """Direct transcription of the module docstring, with Python integers and loops (slow, tiny inputs)."""
    ph, pw = net.packing.ph, net.packing.pw
    h, w = planes[0].shape
    hp, wp = -(-h // ph) * ph, -(-w // pw) * pw
    hq, wq = hp // ph, wp // pw

    def sample(g, y, x):
        return int(planes[g][min(y, h - 1), min(x, w - 1)])

    a = [[[sample(g, i * ph + dy, j * pw + dx) - (1 << (bd - 1)) for j in range(wq)] for i in range(hq)]
         for g in range(len(planes)) for dy in range(ph) for dx in range(pw)]
    for L in net.layers:
        out = []
        for f in range(L.cout):
            rows = []
            for i in range(hq):
                row = []
                for j in range(wq):
                    if L.kind == "pw":
                        acc = sum(int(L.weight[f, c]) * a[c][i][j] for c in range(L.cin))
                    else:
                        acc = 0
                        for dy in (-1, 0, 1):
                            for dx in (-1, 0, 1):
                                y, x = i + dy, j + dx
                                v = a[f][y][x] if 0 <= y < hq and 0 <= x < wq else 0
                                acc += int(L.weight[f, dy + 1, dx + 1]) * v
                    t = acc * int(L.mult[f]) + int(L.bias[f])
                    s = int(L.shift[f])
                    z = (t + ((1 << s) >> 1)) >> s
                    row.append(min(max(z, 0), 32767) if L.relu else min(max(z, -32768), 32767))
                rows.append(row)
            out.append(rows)
        a = out
    maxv = (1 << bd) - 1
    result = []
    for g in range(len(planes)):
        o = np.zeros((h, w), np.int64)
        for y in range(h):
            for x in range(w):
                r = a[g * ph * pw + (y % ph) * pw + (x % pw)][y // ph][x // pw]
                o[y, x] = min(max(int(planes[g][y, x]) + r, 0), maxv)
        result.append(o)
    return result


@pytest.mark.parametrize("packing", ALL_PACKINGS, ids=str)
@pytest.mark.parametrize("group", [Group.Y, Group.UV], ids=lambda g: g.name)
@pytest.mark.parametrize("bd", [8, 10])
def test_reference_matches_spec(packing, group, bd):
    rng = np.random.default_rng(hash((packing.index, group.value, bd)) % 2**32)
    net = random_network(rng, group, packing, Architecture(3, 3), weight_max=60)
    h, w = 5, 7  # odd sizes: exercises padding to the packing and the borders
    planes = [rng.integers(0, 1 << bd, (h, w)).astype(np.uint8 if bd == 8 else np.uint16) for _ in range(group.planes)]
    got = filter_planes(planes, net, bd)
    want = spec_filter(planes, net, bd)
    for g, s in zip(got, want):
        assert g.dtype == planes[0].dtype
        np.testing.assert_array_equal(g.astype(np.int64), s)


def test_stripes_do_not_change_the_result():
    rng = np.random.default_rng(5)
    net = random_network(rng, Group.Y, Packing(1, 1))
    plane = rng.integers(0, 256, (37, 29)).astype(np.uint8)
    packed = pad_and_pack([plane], net.packing)
    whole = residual_packed(packed, net, 8, stripe_rows=1000)
    for rows in (1, 2, 3, 7):
        np.testing.assert_array_equal(residual_packed(packed, net, 8, stripe_rows=rows), whole)
    assert np.abs(whole).max() > 0


def test_pack_unpack_inverse():
    rng = np.random.default_rng(1)
    planes = [rng.integers(0, 1024, (9, 11)) for _ in range(2)]
    for p in ALL_PACKINGS:
        packed = pad_and_pack(planes, p)
        assert packed.shape[0] == 2 * p.size
        back = unpack(packed, 2, p, (9, 11))
        for a, b in zip(planes, back):
            np.testing.assert_array_equal(a, b)


def test_validate_rejects_out_of_range():
    rng = np.random.default_rng(0)
    net = random_network(rng, Group.Y, Packing(1, 1))
    bad = list(net.layers)
    L = bad[1]
    bad[1] = IntLayer(L.kind, L.weight, L.mult, L.bias, L.shift + 100, L.relu)
    with pytest.raises(SideStreamError, match="shift"):
        IntNetwork(net.group, net.packing, tuple(bad)).validate()
    bad[1] = IntLayer(L.kind, np.full_like(L.weight, 30000), L.mult, L.bias, L.shift, L.relu)
    with pytest.raises(SideStreamError, match="accumulator"):
        IntNetwork(net.group, net.packing, tuple(bad)).validate()
    bad[1] = IntLayer("pw", L.weight, L.mult, L.bias, L.shift, L.relu)
    with pytest.raises(SideStreamError):
        IntNetwork(net.group, net.packing, tuple(bad)).validate()
