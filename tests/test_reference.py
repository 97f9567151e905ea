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


def _tiny_network(layers=None) -> IntNetwork:
    """A valid hand-built network for Y 1x1: pw(1→2) · dw3×3(2) · pw(2→1)."""
    def ints(*v):
        return np.array(v, np.int64)

    base = [IntLayer("pw", np.array([[3], [-2]], np.int32), ints(5, 7), ints(100, -100), ints(4, 4), True),
            IntLayer("dw", np.ones((2, 3, 3), np.int32), ints(1, 2), ints(0, 8), ints(3, 3), True),
            IntLayer("pw", np.array([[1, -1]], np.int32), ints(9), ints(-4), ints(6), False)]
    return IntNetwork(Group.Y, Packing(1, 1), tuple(base if layers is None else layers))


def _with(index: int, **changes) -> IntNetwork:
    layers = list(_tiny_network().layers)
    old = layers[index]
    fields = dict(kind=old.kind, weight=old.weight, mult=old.mult, bias=old.bias, shift=old.shift, relu=old.relu)
    fields.update(changes)
    layers[index] = IntLayer(**fields)
    return IntNetwork(Group.Y, Packing(1, 1), tuple(layers))


def test_validate_accepts_the_tiny_network_and_the_range_limits():
    _tiny_network().validate()
    # the limits themselves are allowed (docs/integer-filter.md §2)
    _with(0, weight=np.array([[32767], [-32767]], np.int32)).validate()
    _with(1, mult=np.array([0, (1 << 31) - 1], np.int64)).validate()
    _with(1, shift=np.array([0, 62], np.int64)).validate()
    _with(2, bias=np.array([-(1 << 52)], np.int64)).validate()
    _with(1, bias=np.array([1 << 52, -(1 << 52)], np.int64)).validate()


I64 = np.int64


@pytest.mark.parametrize("index, changes, message", [
    (0, dict(weight=np.array([[32768], [0]], np.int32)), "layer 1: weight out of range"),
    (2, dict(weight=np.array([[0, -32768]], np.int32)), "layer 3: weight out of range"),
    (1, dict(mult=np.array([-1, 1], I64)), "layer 2: multiplier out of range 0..2147483647"),
    (1, dict(mult=np.array([1, 1 << 31], I64)), "layer 2: multiplier out of range 0..2147483647"),
    (1, dict(shift=np.array([-1, 3], I64)), "layer 2: shift out of range 0..62"),
    (2, dict(shift=np.array([63], I64)), "layer 3: shift out of range 0..62"),
    (1, dict(bias=np.array([0, (1 << 52) + 1], I64)), "layer 2: bias out of range"),
    (2, dict(bias=np.array([-(1 << 52) - 1], I64)), "layer 3: bias out of range"),
    (2, dict(relu=True), "layer 3: ReLU on all layers but the last"),
    (1, dict(relu=False), "layer 2: ReLU on all layers but the last"),
    (0, dict(relu=False), "layer 1: ReLU on all layers but the last"),
])
def test_validate_rejects_each_range(index, changes, message):
    net = _with(index, **changes)
    with pytest.raises(SideStreamError) as err:
        net.validate()
    assert str(err.value) == message


def test_validate_accumulator_bound():
    """|acc| < 2^31 for every input: layer 1 reads |a0| <= 2^15, later layers a <= 32767."""
    # depth-wise: Σ|W| · 32767 with Σ|W| = 65538 gives 2^31 − 2 (allowed), 65539 gives >= 2^31
    ok = np.full((2, 3, 3), 7282, np.int32)  # 9 · 7282 = 65538
    _with(1, weight=ok).validate()
    bad = ok.copy()
    bad[1, 2, 2] += 1
    with pytest.raises(SideStreamError, match=r"^layer 2: accumulator may exceed 32 bits$"):
        _with(1, weight=bad).validate()
    # layer 1 reads centred samples, |a0| <= 2^15 (16-bit): with 4 inputs (Y, 2x2 packing) Σ|W| = 2^16
    # reaches 2^31 exactly (rejected), Σ|W| = 2^16 − 1 stays below
    def packed22(first_row):
        mid = _tiny_network().layers[1]
        first = IntLayer("pw", np.array([first_row, [1, 0, 0, 0]], np.int32), np.ones(2, I64), np.zeros(2, I64),
                         np.zeros(2, I64), True)
        last = IntLayer("pw", np.ones((4, 2), np.int32), np.ones(4, I64), np.zeros(4, I64), np.zeros(4, I64), False)
        return IntNetwork(Group.Y, Packing(2, 2), (first, mid, last))

    packed22([32767, 32767, 1, 0]).validate()
    with pytest.raises(SideStreamError, match=r"^layer 1: accumulator may exceed 32 bits$"):
        packed22([32767, -32767, 0, 2]).validate()


def test_validate_product_bound():
    """|acc·mult + bias| < 2^62: with acc_max = 65538·32767 = 2^31 − 2 and mult = 2^31 − 1 the product is
    2^62 − 3·2^31 + 2, so a bias of 3·2^31 − 3 reaches 2^62 − 1 (allowed) and 3·2^31 − 2 reaches 2^62."""
    w = np.full((2, 3, 3), 7282, np.int32)
    mult = np.array([1, (1 << 31) - 1], I64)
    _with(1, weight=w, mult=mult, bias=np.array([0, 3 * (1 << 31) - 3], I64)).validate()
    with pytest.raises(SideStreamError, match=r"^layer 2: product may exceed 63 bits$"):
        _with(1, weight=w, mult=mult, bias=np.array([0, 3 * (1 << 31) - 2], I64)).validate()
    with pytest.raises(SideStreamError, match=r"^layer 2: product may exceed 63 bits$"):
        _with(1, weight=w, mult=mult, bias=np.array([-(1 << 52), 0], I64)).validate()
