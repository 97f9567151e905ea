"""The integer filter: its definition, in plain numpy.

This module *is* the specification of what the decoder computes (docs/integer-filter.md explains it in
prose). The encoder measures every gain with it, the fast kernels in ``kernels/`` must be bit-identical
to it, and the tests use it as the oracle.

For one channel group (luma, or U and V together) of one picture, with ``bd`` the sample bit depth:

1. **Pad and pack.** Each plane is padded at the right/bottom by repeating its last column/row up to a
   multiple of the packing (PH, PW); the ``G`` planes are packed into ``C0 = G·PH·PW`` channels of size
   ``(Hp/PH, Wp/PW)``, channel ``g·PH·PW + dy·PW + dx`` holding sample ``(PH·i + dy, PW·j + dx)`` of
   plane ``g``.
2. **Centre.** ``a0 = sample − 2^(bd−1)``.
3. **Layers.** For each layer, with integer weights ``W`` and per-output-channel integers
   ``mult[f]``, ``bias[f]`` (64-bit) and ``shift[f]``:

   * point-wise: ``acc[f] = Σ_c W[f, c] · a[c]``;
   * depth-wise 3×3: ``acc[f] = Σ_{dy,dx ∈ {−1,0,1}} W[f, dy+1, dx+1] · a[f](y+dy, x+dx)`` where
     positions outside the (packed) picture read as 0;
   * ``t = acc · mult[f] + bias[f]``;  ``z = (t + ((1 << shift[f]) >> 1)) >> shift[f]`` (arithmetic
     shift, i.e. floor division by a power of two);
   * hidden layers: ``a' = min(max(z, 0), 32767)`` (ReLU, 16-bit activations);
     last layer: ``r = min(max(z, −32768), 32767)``, the residual in sample units.
4. **Unpack and add.** ``out = clip(sample + r, 0, 2^bd − 1)``; the padding is cropped.

Every accumulator fits in 32 bits and every ``t`` in 64 bits (:meth:`IntNetwork.validate` checks the
bounds that guarantee it), so any implementation with 64-bit integers reproduces this exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .arch import Architecture, Group, Packing
from .errors import SideStreamError

ACT_MAX = 32767
RES_MIN, RES_MAX = -32768, 32767
MAX_SHIFT = 62
MAX_MULT = (1 << 31) - 1
MAX_ABS_BIAS = 1 << 52
MAX_ABS_WEIGHT = 32767


@dataclass(frozen=True, eq=False)
class IntLayer:
    """One layer of the integer filter. ``weight`` is ``(cout, cin)`` (pw) or ``(cout, 3, 3)`` (dw)."""

    kind: str
    weight: np.ndarray
    mult: np.ndarray
    bias: np.ndarray
    shift: np.ndarray
    relu: bool

    @property
    def cout(self) -> int:
        return int(self.weight.shape[0])

    @property
    def cin(self) -> int:
        return int(self.weight.shape[1]) if self.kind == "pw" else int(self.weight.shape[0])

    @property
    def taps(self) -> int:
        return self.cin if self.kind == "pw" else 9


@dataclass(frozen=True, eq=False)
class IntNetwork:
    """A complete integer filter for one channel group: what the kernels receive."""

    group: Group
    packing: Packing
    layers: tuple[IntLayer, ...]

    @property
    def channels(self) -> int:
        return self.group.planes * self.packing.size

    @property
    def halo(self) -> int:
        """Rows/columns of context each side that one output needs (one per depth-wise layer)."""
        return sum(1 for layer in self.layers if layer.kind == "dw")

    def validate(self) -> None:
        """Reject anything outside the ranges the definition guarantees (raises SideStreamError)."""
        if not self.layers:
            raise SideStreamError("network without layers")
        cin = self.channels
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            w = layer.weight
            if layer.kind == "pw":
                if w.ndim != 2 or w.shape[1] != cin:
                    raise SideStreamError(f"layer {i + 1}: weight shape {w.shape} does not take {cin} inputs")
            elif layer.kind == "dw":
                if w.shape != (cin, 3, 3):
                    raise SideStreamError(f"layer {i + 1}: depth-wise weight shape {w.shape}, expected ({cin}, 3, 3)")
            else:
                raise SideStreamError(f"layer {i + 1}: unknown kind {layer.kind!r}")
            for name in ("mult", "bias", "shift"):
                if getattr(layer, name).shape != (layer.cout,):
                    raise SideStreamError(f"layer {i + 1}: {name} must have {layer.cout} entries")
            if last and layer.cout != self.channels:
                raise SideStreamError(f"last layer has {layer.cout} outputs, expected {self.channels}")
            if layer.relu == last:
                raise SideStreamError(f"layer {i + 1}: ReLU on all layers but the last")
            if np.abs(w).max(initial=0) > MAX_ABS_WEIGHT:
                raise SideStreamError(f"layer {i + 1}: weight out of range")
            if (layer.mult < 0).any() or (layer.mult > MAX_MULT).any():
                raise SideStreamError(f"layer {i + 1}: multiplier out of range 0..{MAX_MULT}")
            if (layer.shift < 0).any() or (layer.shift > MAX_SHIFT).any():
                raise SideStreamError(f"layer {i + 1}: shift out of range 0..{MAX_SHIFT}")
            if (np.abs(layer.bias) > MAX_ABS_BIAS).any():
                raise SideStreamError(f"layer {i + 1}: bias out of range")
            amax = (1 << (16 - 1)) if i == 0 else ACT_MAX
            acc_max = int(np.abs(w.astype(np.int64)).reshape(layer.cout, -1).sum(axis=1).max()) * amax
            if acc_max >= 1 << 31:
                raise SideStreamError(f"layer {i + 1}: accumulator may exceed 32 bits")
            t_max = acc_max * int(layer.mult.max(initial=0)) + int(np.abs(layer.bias).max(initial=0))
            if t_max >= 1 << 62:
                raise SideStreamError(f"layer {i + 1}: product may exceed 63 bits")
            cin = layer.cout


def pad_and_pack(planes: Sequence[np.ndarray], packing: Packing) -> np.ndarray:
    """Planes ``(H, W)`` → packed ``(G·PH·PW, ceil(H/PH), ceil(W/PW))`` int32 (edge-replicated)."""
    ph, pw = packing.ph, packing.pw
    h, w = planes[0].shape
    hp, wp = -(-h // ph) * ph, -(-w // pw) * pw
    chans = []
    for plane in planes:
        p = np.asarray(plane, dtype=np.int32)
        if (hp, wp) != (h, w):
            p = np.pad(p, ((0, hp - h), (0, wp - w)), mode="edge")
        for dy in range(ph):
            for dx in range(pw):
                chans.append(p[dy::ph, dx::pw])
    return np.stack(chans)


def unpack(packed: np.ndarray, groups: int, packing: Packing, shape: tuple[int, int]) -> list[np.ndarray]:
    """Inverse of :func:`pad_and_pack` (without the padding)."""
    ph, pw = packing.ph, packing.pw
    _, hq, wq = packed.shape
    out = []
    for g in range(groups):
        full = np.empty((hq * ph, wq * pw), dtype=packed.dtype)
        for dy in range(ph):
            for dx in range(pw):
                full[dy::ph, dx::pw] = packed[g * ph * pw + dy * pw + dx]
        out.append(full[: shape[0], : shape[1]])
    return out


def _requant(acc: np.ndarray, layer: IntLayer) -> np.ndarray:
    mult = layer.mult.astype(np.int64)[:, None, None]
    bias = layer.bias.astype(np.int64)[:, None, None]
    shift = layer.shift.astype(np.int64)[:, None, None]
    t = acc * mult + bias
    z = (t + ((np.int64(1) << shift) >> 1)) >> shift
    if layer.relu:
        return np.clip(z, 0, ACT_MAX)
    return np.clip(z, RES_MIN, RES_MAX)


def _apply_layer(a: np.ndarray, layer: IntLayer) -> np.ndarray:
    c, h, w = a.shape
    if layer.kind == "pw":
        # float64 products and sums of these integers are exact (all partial sums < 2^53).
        acc = (layer.weight.astype(np.float64) @ a.reshape(c, -1).astype(np.float64)).astype(np.int64)
        acc = acc.reshape(layer.cout, h, w)
    else:
        pad = np.zeros((c, h + 2, w + 2), dtype=np.int64)
        pad[:, 1:-1, 1:-1] = a
        acc = np.zeros((c, h, w), dtype=np.int64)
        wt = layer.weight.astype(np.int64)
        for ky in range(3):
            for kx in range(3):
                acc += wt[:, ky, kx][:, None, None] * pad[:, ky:ky + h, kx:kx + w]
    return _requant(acc, layer)


def residual_packed(packed: np.ndarray, net: IntNetwork, bitdepth: int, stripe_rows: int = 64) -> np.ndarray:
    """Run the layers on packed samples; returns the packed residual (int32)."""
    a0 = packed.astype(np.int64) - (1 << (bitdepth - 1))
    _, hq, wq = a0.shape
    halo = net.halo
    out = np.empty((net.layers[-1].cout, hq, wq), dtype=np.int32)
    for r0 in range(0, hq, stripe_rows):
        r1 = min(hq, r0 + stripe_rows)
        s0, s1 = max(0, r0 - halo), min(hq, r1 + halo)
        a = a0[:, s0:s1]
        for layer in net.layers:
            a = _apply_layer(a, layer)
        out[:, r0:r1] = a[:, r0 - s0: r0 - s0 + (r1 - r0)]
    return out


def filter_planes(planes: Sequence[np.ndarray], net: IntNetwork, bitdepth: int) -> list[np.ndarray]:
    """Filter the planes of one channel group (1 plane for Y, 2 for U and V) of one picture."""
    if len(planes) != net.group.planes:
        raise ValueError(f"{net.group.name} network takes {net.group.planes} planes, got {len(planes)}")
    shape = planes[0].shape
    packed = pad_and_pack(planes, net.packing)
    res = residual_packed(packed, net, bitdepth)
    residuals = unpack(res, net.group.planes, net.packing, shape)
    maxv = (1 << bitdepth) - 1
    dtype = planes[0].dtype
    return [np.clip(p.astype(np.int32) + r, 0, maxv).astype(dtype) for p, r in zip(planes, residuals)]


def random_network(rng: np.random.Generator, group: Group, packing: Packing,
                   arch: Architecture = Architecture(), weight_max: int = 127, mult_bits: int = 8) -> IntNetwork:
    """A valid random network (for tests and benchmarks), not a trained filter.

    The defaults (weights up to ±127, multipliers of 7–8 bits) are wider than what the encoder
    signals; ``weight_max=31, mult_bits=4`` gives the ranges of networks coded with the default
    QuantConfig (6-bit weights, 4-bit scale significands: multipliers below 16 after layer 1).
    """
    layers = []
    for i, s in enumerate(arch.shapes(group, packing)):
        w = rng.integers(-weight_max, weight_max + 1, size=s.weight_shape).astype(np.int32)
        mult = rng.integers(1 << (mult_bits - 2), 1 << mult_bits, size=s.cout).astype(np.int64)
        taps = s.cin if s.kind == "pw" else 9
        # keep activations at a steady magnitude: |acc·mult| ≈ sqrt(taps)·(wmax/2)·(mult/1.6)·|a|
        gain = int(np.round(np.log2(np.sqrt(taps) * weight_max / 2 * (1 << mult_bits) / 1.6 / 2)))
        shift = np.full(s.cout, gain + (0 if s.relu else 7), dtype=np.int64)
        bias = rng.integers(-(1 << 10), 1 << 10, size=s.cout).astype(np.int64) << (shift - 4)
        layers.append(IntLayer(s.kind, w, mult, bias, shift, s.relu))
    net = IntNetwork(group, packing, tuple(layers))
    net.validate()
    return net
