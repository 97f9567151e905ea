"""Parameter quantization (paper §3.2): BN folding, channel-wise weight and per-layer bias quantization.

Three representations of one network, in the order the encoder produces them:

* :class:`FloatNetwork` — trained float weights with batch normalisation folded in (eq. 1). Input
  convention: ``x = (sample − 2^(bd−1)) / 2^(bd−1)``; output: the residual in sample units.
* :class:`QuantizedNetwork` — what the side stream carries: integer weights ``wq`` with a step
  ``Δ_c = m_c · 2^(−e_c)`` per channel (significand ``m_c`` with ``S`` bits, exponent ``e_c``),
  integer biases ``bq`` with one step ``Δ_b = n · 2^(−g)`` per layer, and the fixed-point position
  ``A_l`` of each layer's output activations. As in eq. 1, the channel ``c`` of a weight step is the
  layer's *input* channel for every layer with batch normalisation (layers 2..L), so each step absorbs
  its batch normalisation's ``1/σ_c`` and difference-coded updates leave ``wq`` unchanged when only
  ``σ_c`` moves (§3.2); the first layer (no batch normalisation) has one step per output channel. (The
  paper writes the scale as ``α_c = Q / max|w|``; we signal its inverse, the quantization step.)
* :class:`~hevc_ext.reference.IntNetwork` — the kernel constants (multiplier, 64-bit bias, shift per
  output channel) that :func:`derive` computes from the signalled integers with integer arithmetic only.

This module uses numpy alone: the decoder imports it without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .arch import Architecture, Group, Packing
from .errors import SideStreamError, UsageError
from .reference import ACT_MAX, IntLayer, IntNetwork

EXP_MIN, EXP_MAX = -16, 47  # range of signalled scale exponents (64 values)
ACT_EXP_MAX = 31


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths of the signalled parameters."""

    weight_bits: int = 6  # b_w: weights in ±(2^(b_w−1) − 1)
    bias_bits: int = 10  # b_b: biases in ±(2^(b_b−1) − 1)
    scale_bits: int = 4  # significand bits S of the scale factors (1 = powers of two)

    def __post_init__(self) -> None:
        if not 2 <= self.weight_bits <= 8:
            raise UsageError(f"weight bits must be in 2..8, got {self.weight_bits}")
        if not 2 <= self.bias_bits <= 16:
            raise UsageError(f"bias bits must be in 2..16, got {self.bias_bits}")
        if not 1 <= self.scale_bits <= 8:
            raise UsageError(f"scale bits must be in 1..8, got {self.scale_bits}")

    @property
    def wmax(self) -> int:
        return (1 << (self.weight_bits - 1)) - 1

    @property
    def bmax(self) -> int:
        return (1 << (self.bias_bits - 1)) - 1


@dataclass(frozen=True, eq=False)
class FloatLayer:
    kind: str
    weight: np.ndarray  # (cout, cin) or (cout, 3, 3), float64
    bias: np.ndarray  # (cout,), float64
    relu: bool


@dataclass(frozen=True, eq=False)
class FloatNetwork:
    group: Group
    packing: Packing
    layers: tuple[FloatLayer, ...]


@dataclass(frozen=True, eq=False)
class QLayer:
    """Signalled integers of one layer."""

    weight: np.ndarray  # int32, shape of the layer's weights
    w_sig: np.ndarray  # int64 (scale channels,), in [2^(S−1), 2^S)
    w_exp: np.ndarray  # int64 (scale channels,), in [EXP_MIN, EXP_MAX]
    bias: np.ndarray  # int64 (cout,)
    b_sig: int
    b_exp: int
    act_exp: int  # fixed-point position A of this layer's output (0 for the last layer)

    def fields(self) -> dict[str, np.ndarray]:
        """All integers of the layer, by name (used by difference coding and tests)."""
        return {"weight": self.weight, "w_sig": self.w_sig, "w_exp": self.w_exp, "bias": self.bias,
                "b_sig": np.array([self.b_sig]), "b_exp": np.array([self.b_exp]),
                "act_exp": np.array([self.act_exp])}


@dataclass(frozen=True, eq=False)
class QuantizedNetwork:
    """A network as signalled: architecture, packing, bit widths and integers."""

    group: Group
    packing: Packing
    arch: Architecture
    config: QuantConfig
    layers: tuple[QLayer, ...]

    def same_layout(self, other: "QuantizedNetwork") -> bool:
        """Whether ``other`` can serve as the reference of a difference-coded update of ``self``."""
        return (self.group, self.packing, self.arch, self.config) == \
            (other.group, other.packing, other.arch, other.config)

    def equals(self, other: "QuantizedNetwork") -> bool:
        if not self.same_layout(other):
            return False
        for a, b in zip(self.layers, other.layers):
            fa, fb = a.fields(), b.fields()
            if any(not np.array_equal(fa[k], fb[k]) for k in fa):
                return False
        return True


# ----------------------------------------------------------------------------------------- folding
def fold_batchnorm(weight: np.ndarray, bias: np.ndarray | None, kind: str, gamma: np.ndarray,
                   beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Fold a batch normalisation that precedes a convolution into the convolution (eq. 1).

    ``BN(x)_c = s_c·x_c + d_c`` with ``s = γ/√(σ²+ε)`` and ``d = β − μ·s``; the convolution of it equals a
    convolution with ``W'[f,c,k] = W[f,c,k]·s_c`` plus the bias ``b'_f = b_f + Σ_{c,k} W[f,c,k]·d_c``.
    For the depth-wise layers this is exact at picture borders too, because training pads with zeros
    *before* batch normalisation (see model.py) and the integer filter pads its input with zeros.
    """
    s = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    d = np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * s
    w = np.asarray(weight, np.float64)
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64)
    if kind == "pw":
        return w * s[None, :], b + w @ d
    return w * s[:, None, None], b + w.reshape(w.shape[0], -1).sum(axis=1) * d


# ------------------------------------------------------------------------------------ quantization
def encode_step(step: float, scale_bits: int) -> tuple[int, int]:
    """The smallest ``m·2^(−e) >= step`` with ``m`` in ``[2^(S−1), 2^S)`` (``e`` clamped to its range)."""
    lo = 1 << (scale_bits - 1)
    if not step > 0 or not math.isfinite(step):
        return lo, EXP_MAX
    # m·2^-e >= step  with m < 2^S  ->  e = floor(log2(2^S / step)) gives m in range after ceil
    e = math.floor(math.log2((1 << scale_bits) / step))
    for _ in range(3):
        m = math.ceil(step * 2.0 ** e - 1e-12)
        if m >= (1 << scale_bits):
            e -= 1
        elif m < lo:
            e += 1
        else:
            break
    e = min(max(e, EXP_MIN), EXP_MAX)
    m = min(max(math.ceil(step * 2.0 ** e - 1e-12), lo), (1 << scale_bits) - 1)
    return int(m), int(e)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def choose_act_exp(act_max: float) -> int:
    """Fixed-point position of a hidden activation whose observed maximum is ``act_max``: the largest
    ``A`` with ``act_max · 2^A <= 2^14`` (a factor 2 of headroom below the 16-bit clamp)."""
    if not act_max > 0:
        return 16
    return int(min(max(math.floor(math.log2((ACT_MAX + 1) / 2 / act_max)), 0), ACT_EXP_MAX))


def scale_axis(layer_index: int) -> str:
    """Which channel a layer's weight steps belong to: ``"out"`` for the first layer, ``"in"`` after."""
    return "out" if layer_index == 0 else "in"


def _weight_view(w: np.ndarray, kind: str, axis: str) -> np.ndarray:
    """The weights as (scale channel, everything else)."""
    if kind == "dw" or axis == "out":
        return w.reshape(w.shape[0], -1)
    return w.T  # pw (cout, cin) -> (cin, cout)


def quantize(net: FloatNetwork, arch: Architecture, config: QuantConfig,
             act_max: Sequence[np.ndarray]) -> QuantizedNetwork:
    """Quantize a folded float network. ``act_max[l]``: per-channel maxima of hidden layer l's output."""
    n = len(net.layers)
    if len(act_max) != n - 1:
        raise ValueError(f"need {n - 1} activation maxima, got {len(act_max)}")
    half = 1 << (config.scale_bits - 1)
    steps: list[np.ndarray] = []
    parts = []
    for i, fl in enumerate(net.layers):
        w = np.asarray(fl.weight, np.float64)
        view = _weight_view(w, fl.kind, scale_axis(i))
        peak = np.abs(view).max(axis=1)
        sig = np.empty(len(peak), np.int64)
        exp = np.empty(len(peak), np.int64)
        q = np.zeros(view.shape, np.int32)
        prev = (half, EXP_MAX)
        for c, top in enumerate(peak):
            if top == 0:
                sig[c], exp[c] = prev  # any step will do for an all-zero channel; repeat the last (cheap)
                continue
            sig[c], exp[c] = prev = encode_step(top / config.wmax, config.scale_bits)
            step = sig[c] * 2.0 ** (-exp[c])
            q[c] = np.clip(_round_half_away(view[c] / step), -config.wmax, config.wmax)
        wq = (q.T if (fl.kind == "pw" and scale_axis(i) == "in") else q).reshape(w.shape).astype(np.int32)
        steps.append(sig * np.power(2.0, -exp.astype(np.float64)))
        b = np.asarray(fl.bias, np.float64)
        bmax = float(np.abs(b).max(initial=0.0))
        if bmax > 0:
            bsig, bexp = encode_step(bmax / config.bmax, config.scale_bits)
            bq = np.clip(_round_half_away(b / (bsig * 2.0 ** (-bexp))), -config.bmax, config.bmax).astype(np.int64)
        else:
            bsig, bexp = half, EXP_MAX
            bq = np.zeros(w.shape[0], np.int64)
        parts.append((wq, sig, exp, bq, int(bsig), int(bexp)))
    layers = []
    for i, (wq, sig, exp, bq, bsig, bexp) in enumerate(parts):
        if i < n - 1:
            # stored activations are x·Δ(next layer's input step)·2^A: size A on the largest of them
            act = choose_act_exp(float(np.max(np.asarray(act_max[i]) * steps[i + 1], initial=0.0)))
        else:
            act = 0
        layers.append(QLayer(wq, sig, exp, bq, bsig, bexp, act))
    return QuantizedNetwork(net.group, net.packing, arch, config, tuple(layers))


def quantize_anchored(net: FloatNetwork, ref: QuantizedNetwork) -> QuantizedNetwork:
    """Quantize with the steps of ``ref`` (weight and bias steps, activation positions, bit widths):
    a low-delay update then changes only the integers of the weights that moved, which difference
    coding turns into few bits (§3.2). Values beyond the reference's range are clipped — the encoder
    measures the result like any other candidate."""
    config = ref.config
    layers = []
    for i, (fl, rl) in enumerate(zip(net.layers, ref.layers)):
        w = np.asarray(fl.weight, np.float64)
        axis = scale_axis(i)
        view = _weight_view(w, fl.kind, axis)
        step = rl.w_sig * np.power(2.0, -rl.w_exp.astype(np.float64))
        q = np.clip(_round_half_away(view / step[:, None]), -config.wmax, config.wmax)
        wq = (q.T if (fl.kind == "pw" and axis == "in") else q).reshape(w.shape).astype(np.int32)
        bstep = rl.b_sig * 2.0 ** (-rl.b_exp)
        bq = np.clip(_round_half_away(np.asarray(fl.bias) / bstep), -config.bmax, config.bmax).astype(np.int64)
        layers.append(QLayer(wq, rl.w_sig.copy(), rl.w_exp.copy(), bq, rl.b_sig, rl.b_exp, rl.act_exp))
    return QuantizedNetwork(ref.group, ref.packing, ref.arch, config, tuple(layers))


def dequantize(q: QuantizedNetwork) -> FloatNetwork:
    """The float network the signalled integers stand for (for analysis and tests)."""
    layers = []
    for i, (ql, s) in enumerate(zip(q.layers, q.arch.shapes(q.group, q.packing))):
        step = ql.w_sig * np.power(2.0, -ql.w_exp.astype(np.float64))
        if s.kind == "pw" and scale_axis(i) == "in":
            w = ql.weight * step[None, :]
        else:
            w = ql.weight * step.reshape((-1,) + (1,) * (ql.weight.ndim - 1))
        b = ql.bias * (ql.b_sig * 2.0 ** (-ql.b_exp))
        layers.append(FloatLayer(s.kind, w, b, s.relu))
    return FloatNetwork(q.group, q.packing, tuple(layers))


# ------------------------------------------------------------------------------------- derivation
def _shift_round(value: int, exponent: int) -> int:
    """``value · 2^exponent`` for ``exponent >= 0``; otherwise rounded (half up) to an integer."""
    if exponent >= 0:
        return value << exponent
    return (value + (1 << (-exponent - 1))) >> (-exponent)


def derive(q: QuantizedNetwork, bitdepth: int) -> IntNetwork:
    """The kernel constants of a signalled network (normative; integer arithmetic only).

    Activations are stored pre-multiplied by the weight step of the layer that reads them: the output
    channel ``f`` of layer ``l`` holds ``x_f · Δ^(l+1)_f · 2^(A_l)`` (for the last layer, ``Δ = 1`` and
    ``A = 0``: the residual in sample units), so the accumulation of every layer after the first needs
    no per-input scale. With ``A_in`` the input position (``bitdepth − 1`` for the first layer), the
    next layer's step significand/exponent ``(m', e')`` (``(1, 0)`` after the last layer), and for the
    first layer additionally its own output-channel step ``(m, e)`` (``(1, 0)`` otherwise):
    ``R = A_in + e + e' − A_out``; ``mult = m · m' · 2^max(0, −R)``; ``shift = max(0, R)``;
    ``bias = bq_f · n · m' · 2^(A_in + e + max(0, −R) − g)`` (rounded half up when the exponent is
    negative).
    """
    shapes = q.arch.shapes(q.group, q.packing)
    if len(shapes) != len(q.layers):
        raise SideStreamError(f"network has {len(q.layers)} layers, architecture says {len(shapes)}")
    for i, (ql, s) in enumerate(zip(q.layers, shapes)):
        if ql.weight.shape != s.weight_shape:
            raise SideStreamError(f"layer {i + 1}: weights {ql.weight.shape}, expected {s.weight_shape}")
        want = s.cout if scale_axis(i) == "out" else s.cin
        if ql.w_sig.shape != (want,) or ql.w_exp.shape != (want,):
            raise SideStreamError(f"layer {i + 1}: {ql.w_sig.shape[0]} weight steps, expected {want}")
        if ql.bias.shape != (s.cout,):
            raise SideStreamError(f"layer {i + 1}: {ql.bias.shape[0]} biases, expected {s.cout}")
    a_in = bitdepth - 1
    layers = []
    for i, (ql, s) in enumerate(zip(q.layers, shapes)):
        a_out = ql.act_exp
        nxt = q.layers[i + 1] if i + 1 < len(q.layers) else None
        mult = np.empty(s.cout, np.int64)
        shift = np.empty(s.cout, np.int64)
        bias = np.empty(s.cout, np.int64)
        for f in range(s.cout):
            m_own, e_own = (int(ql.w_sig[f]), int(ql.w_exp[f])) if i == 0 else (1, 0)
            m_next, e_next = (int(nxt.w_sig[f]), int(nxt.w_exp[f])) if nxt is not None else (1, 0)
            r = a_in + e_own + e_next - a_out
            if r < -24 or r > 62:
                raise SideStreamError(f"layer {i + 1}: scale exponents out of range for activation "
                                      f"positions {a_in}→{a_out}")
            up = max(0, -r)
            mult[f] = (m_own * m_next) << up
            shift[f] = max(0, r)
            bias[f] = _shift_round(int(ql.bias[f]) * ql.b_sig * m_next, a_in + e_own + up - ql.b_exp)
        layers.append(IntLayer(s.kind, ql.weight.astype(np.int32), mult, bias, shift, s.relu))
        a_in = a_out
    net = IntNetwork(q.group, q.packing, tuple(layers))
    net.validate()
    return net


def _apply_float_layer(layer: FloatLayer, x: np.ndarray) -> np.ndarray:
    """Pre-activation of one float layer (zero padding for the depth-wise layers), in x's precision."""
    c, h, w = x.shape
    wt = layer.weight.astype(x.dtype)
    if layer.kind == "pw":
        y = (wt @ x.reshape(c, -1)).reshape(-1, h, w)
    else:
        pad = np.pad(x, ((0, 0), (1, 1), (1, 1)))
        y = np.zeros_like(x)
        for ky in range(3):
            for kx in range(3):
                y += wt[:, ky, kx][:, None, None] * pad[:, ky:ky + h, kx:kx + w]
    return y + layer.bias.astype(x.dtype)[:, None, None]


def _packed_input(planes: Sequence[np.ndarray], packing: Packing, bitdepth: int,
                  dtype: type = np.float64) -> np.ndarray:
    from .reference import pad_and_pack

    packed = pad_and_pack(planes, packing).astype(dtype)
    return (packed - (1 << (bitdepth - 1))) / dtype(1 << (bitdepth - 1))


def _float_layers(net: FloatNetwork, planes: Sequence[np.ndarray], bitdepth: int) -> Iterator[np.ndarray]:
    """The activations after each layer of the float network applied like the integer filter."""
    x = _packed_input(planes, net.packing, bitdepth)
    for layer in net.layers:
        y = _apply_float_layer(layer, x)
        x = np.maximum(y, 0) if layer.relu else y
        yield x


class Calibration:
    """The float network's activations on decoded crops (float32), computed once per trained network:
    the activation ranges that size the fixed-point positions, and the reference pre-activations that
    bias correction matches."""

    def __init__(self, net: FloatNetwork, crops: Sequence[Sequence[np.ndarray]], bitdepth: int) -> None:
        self.net, self.bitdepth = net, bitdepth
        self.inputs = [_packed_input(c, net.packing, bitdepth, np.float32) for c in crops]
        self.pre: list[list[np.ndarray]] = []
        x = self.inputs
        for layer in net.layers:
            z = [_apply_float_layer(layer, xi) for xi in x]
            self.pre.append(z)
            x = [np.maximum(zi, 0) if layer.relu else zi for zi in z]
        #: per hidden layer, the largest output activation of each channel
        self.act_max = [np.max([zi.reshape(zi.shape[0], -1).max(axis=1) for zi in z], axis=0).clip(min=0)
                        for z in self.pre[:-1]] if crops else [np.zeros(layer.weight.shape[0])
                                                                 for layer in net.layers[:-1]]


def correct_biases(net: FloatNetwork, q: QuantizedNetwork, calib: "Calibration | Sequence[Sequence[np.ndarray]]",
                   bitdepth: int, keep_steps: bool = False, upto: int | None = None) -> QuantizedNetwork:
    """Empirical bias correction: layer by layer, add to the quantized bias the mean difference between
    the float network's pre-activations and the quantized network's (fed with its own quantized
    activations), then quantize that bias again. Removes the offsets that weight quantization causes
    when it meets activations with a large mean (which batch-norm folding produces). ``calib``: a
    :class:`Calibration` of ``net`` (or decoded crops to make one). With ``keep_steps`` the bias steps
    stay as they are (anchored low-delay updates)."""
    if not isinstance(calib, Calibration):
        calib = Calibration(net, calib, bitdepth)
    if not calib.inputs:
        return q
    config = q.config
    deq = dequantize(q)
    xs_q = calib.inputs
    layers = list(q.layers)
    for i, (lf, lq) in enumerate(zip(net.layers, deq.layers)):
        if upto is not None and i >= upto:
            break
        zf = calib.pre[i]
        zq = [_apply_float_layer(lq, x) for x in xs_q]
        count = sum(z[0].size for z in zf)
        delta = sum((a - b).reshape(a.shape[0], -1).sum(axis=1, dtype=np.float64) for a, b in zip(zf, zq)) / count
        bias = lq.bias + delta
        bmax = float(np.abs(bias).max(initial=0.0))
        if keep_steps:
            bsig, bexp = layers[i].b_sig, layers[i].b_exp
            bq = np.clip(_round_half_away(bias / (bsig * 2.0 ** (-bexp))), -config.bmax, config.bmax).astype(np.int64)
        elif bmax > 0:
            bsig, bexp = encode_step(bmax / config.bmax, config.scale_bits)
            bq = np.clip(_round_half_away(bias / (bsig * 2.0 ** (-bexp))), -config.bmax, config.bmax).astype(np.int64)
        else:
            bsig, bexp, bq = layers[i].b_sig, layers[i].b_exp, np.zeros_like(layers[i].bias)
        old = layers[i]
        layers[i] = QLayer(old.weight, old.w_sig, old.w_exp, bq, int(bsig), int(bexp), old.act_exp)
        new_b = (bq * (bsig * 2.0 ** (-bexp))).astype(np.float32)
        zq = [z + (new_b - lq.bias.astype(np.float32))[:, None, None] for z in zq]
        xs_q = [np.maximum(z, 0) if lf.relu else z for z in zq]
    return QuantizedNetwork(q.group, q.packing, q.arch, q.config, tuple(layers))


def _hessian_chol(x: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of the inverse of the (centred, damped) input second moment of ``x``
    (features × samples): GPTQ's error-propagation matrix."""
    xc = x - x.mean(axis=1, keepdims=True)
    h = (xc @ xc.T).astype(np.float64) / max(1, x.shape[1])
    damp = 0.01 * float(np.mean(np.diag(h))) + 1e-12
    h[np.diag_indices_from(h)] += damp
    try:
        hinv = np.linalg.inv(h)
        return np.linalg.cholesky(hinv).T
    except np.linalg.LinAlgError:
        return np.eye(h.shape[0])


def _gptq_columns(w: np.ndarray, steps: np.ndarray, x: np.ndarray, wmax: int, per_row: bool) -> np.ndarray:
    """Quantize the columns of ``w`` (rows × features) one after another, spreading each column's
    rounding error over the columns not yet quantized so that ``w·x`` changes least (GPTQ, Frantar et
    al. 2023). ``steps``: one per column, or one per row when ``per_row``."""
    w = w.astype(np.float64).copy()
    u = _hessian_chol(x)
    out = np.zeros(w.shape, np.int64)
    for c in range(w.shape[1]):
        step = steps if per_row else steps[c]
        q = np.clip(_round_half_away(w[:, c] / step), -wmax, wmax)
        out[:, c] = q
        err = (w[:, c] - q * step) / u[c, c]
        w[:, c + 1:] -= np.outer(err, u[c, c + 1:])
    return out


def _dw_taps(x: np.ndarray, c: int) -> np.ndarray:
    """The 9 zero-padded neighbours of channel ``c`` of ``x`` (C, h, w) as (9, h·w)."""
    pad = np.pad(x[c], 1)
    h, w = x.shape[1:]
    return np.stack([pad[ky:ky + h, kx:kx + w].reshape(-1) for ky in range(3) for kx in range(3)])


def _gptq_layer(fl: FloatLayer, ql: QLayer, xs: Sequence[np.ndarray], index: int, wmax: int) -> np.ndarray:
    """GPTQ rounding of one layer's weights on the inputs ``xs``, keeping its steps."""
    steps = ql.w_sig * np.power(2.0, -ql.w_exp.astype(np.float64))
    w = np.asarray(fl.weight, np.float64)
    if fl.kind == "pw":
        x = np.concatenate([a.reshape(a.shape[0], -1) for a in xs], axis=1)
        q = _gptq_columns(w, steps, x, wmax, per_row=scale_axis(index) == "out")
        return q.astype(np.int32)
    out = np.zeros(w.shape, np.int32)
    for c in range(w.shape[0]):
        x = np.concatenate([_dw_taps(a, c) for a in xs], axis=1)
        out[c] = _gptq_columns(w[c].reshape(1, 9), np.full(9, steps[c]), x, wmax, per_row=False).reshape(3, 3)
    return out


def refine(net: FloatNetwork, q: QuantizedNetwork, calib: Calibration, keep_steps: bool = False,
           rounding: bool = True) -> QuantizedNetwork:
    """Make a quantized network reproduce the float one as well as its steps allow, layer by layer on
    the calibration crops, each layer fed with the *quantized* network's activations:

    1. GPTQ rounding (``rounding``): the weights are rounded column by column with the error of each
       column compensated by the columns not yet rounded, through the inverse of the inputs' centred
       second moment — the integers change, the steps do not;
    2. bias correction: the mean difference between the float and the quantized pre-activations is
       added to the bias, which is quantized again (with its step kept when ``keep_steps``).
    """
    if not calib.inputs:
        return q
    if rounding:
        layers = list(q.layers)
        xs_q = calib.inputs
        for i, (lf, ql) in enumerate(zip(net.layers, q.layers)):
            wq = _gptq_layer(lf, ql, xs_q, i, q.config.wmax)
            layers[i] = QLayer(wq, ql.w_sig, ql.w_exp, ql.bias, ql.b_sig, ql.b_exp, ql.act_exp)
            q = QuantizedNetwork(q.group, q.packing, q.arch, q.config, tuple(layers))
            q = correct_biases(net, q, calib, calib.bitdepth, keep_steps, upto=i + 1)
            layers = list(q.layers)
            lq = dequantize(q).layers[i]
            xs_q = [np.maximum(z, 0) if lq.relu else z for z in (_apply_float_layer(lq, x) for x in xs_q)]
        return q
    return correct_biases(net, q, calib, calib.bitdepth, keep_steps)


def float_forward(net: FloatNetwork, planes: Sequence[np.ndarray], bitdepth: int) -> list[np.ndarray]:
    """The float network applied like the integer filter (numpy, float64): for tests and analysis."""
    from .reference import unpack

    *_, res = _float_layers(net, planes, bitdepth)
    residual = unpack(res, net.group.planes, net.packing, planes[0].shape)
    maxv = (1 << bitdepth) - 1
    return [np.clip(p + r, 0, maxv) for p, r in zip(planes, residual)]


def activation_maxima(net: FloatNetwork, crops: Sequence[Sequence[np.ndarray]],
                      bitdepth: int) -> list[np.ndarray]:
    """Per hidden layer, the largest output activation of each channel over ``crops`` (lists of the
    group's planes)."""
    return Calibration(net, crops, bitdepth).act_max
