"""Entropy coding of network parameters with a range coder (``constriction``).

Integers are coded with a two-sided geometric (discrete Laplace) model over a bounded alphabet
``[−K, K]``. Its shape ``q`` (0..31) is chosen by the encoder per tensor and sent first; the model's
frequencies are defined with integer arithmetic (:func:`geometric_frequencies`), so the decoder derives
exactly the same model on every machine. docs/sidecar.md gives the syntax of a coded network.

* absolute coding (random access, first record): weights and biases against a zero-centred model,
  scale exponents as a first value plus successive differences, significands uniformly;
* difference coding (low delay, :func:`encode_network` with ``prev``): every integer as its difference
  to the previous network of the same layout.
"""

from __future__ import annotations

import functools
from typing import Callable

import constriction
import numpy as np

from .arch import Architecture, Group, Packing
from .errors import SideStreamError
from .quant import ACT_EXP_MAX, EXP_MAX, EXP_MIN, QLayer, QuantConfig, QuantizedNetwork, scale_axis

#: T[q] = round(65536 · exp(−1 / 2^((q − 8)/3))): the per-step decay of the geometric model, 16-bit.
GEOMETRIC_DECAY = (115, 424, 1200, 2740, 5274, 8869, 13399, 18591, 24109, 29633, 34905, 39750, 44069,
                   47828, 51039, 53741, 55986, 57835, 59346, 60573, 61565, 62364, 63006, 63520, 63930,
                   64258, 64520, 64728, 64894, 65026, 65131, 65214)
SHAPES = len(GEOMETRIC_DECAY)
#: fixed shape for scalars that rarely change (exponent and activation-position differences)
Q_SMALL = 4
EXP_SPAN = EXP_MAX - EXP_MIN  # differences of exponents lie in ±EXP_SPAN

_model = constriction.stream.model


@functools.lru_cache(maxsize=4096)
def geometric_frequencies(q: int, k: int) -> np.ndarray:
    """Integer frequencies of the values −K..K (index ``v + K``): ``f(0) = 2^16``,
    ``f(n) = max(1, (f(n−1)·T[q] + 2^15) >> 16)``, ``f(−n) = f(n)``."""
    decay = GEOMETRIC_DECAY[q]
    half = np.empty(k + 1, np.int64)
    f = 1 << 16
    for n in range(k + 1):
        half[n] = f
        f = max(1, (f * decay + (1 << 15)) >> 16)
    return np.concatenate([half[:0:-1], half])


@functools.lru_cache(maxsize=4096)
def _categorical(q: int, k: int) -> "constriction.stream.model.Categorical":
    f = geometric_frequencies(q, k)
    return _model.Categorical((f / f.sum()).astype(np.float64), perfect=False)


@functools.lru_cache(maxsize=4096)
def _code_lengths(q: int, k: int) -> np.ndarray:
    f = geometric_frequencies(q, k).astype(np.float64)
    return -np.log2(f / f.sum())


def best_shape(values: np.ndarray, k: int) -> tuple[int, float]:
    """The shape with the fewest bits for ``values`` (and that many bits, approximately)."""
    idx = np.asarray(values, np.int64).ravel() + k
    costs = [float(_code_lengths(q, k)[idx].sum()) for q in range(SHAPES)]
    q = int(np.argmin(costs))
    return q, costs[q]


class ParamEncoder:
    """Writes symbols into one range-coded payload."""

    def __init__(self) -> None:
        self._enc = constriction.stream.queue.RangeEncoder()

    def uniform(self, value: int, size: int) -> None:
        if size < 2:
            return
        if not 0 <= value < size:
            raise ValueError(f"value {value} outside uniform alphabet of {size}")
        self._enc.encode(int(value), _model.Uniform(size))

    def geometric(self, values: np.ndarray, k: int, q: int) -> None:
        v = np.asarray(values, np.int64).ravel()
        if v.size == 0:
            return
        if np.abs(v).max() > k:
            raise ValueError(f"value {int(np.abs(v).max())} outside ±{k}")
        self._enc.encode((v + k).astype(np.int32), _categorical(q, k))

    def tensor(self, values: np.ndarray, k: int) -> None:
        """Shape chosen for these values and sent, then the values."""
        q, _ = best_shape(values, k)
        self.uniform(q, SHAPES)
        self.geometric(values, k, q)

    def getvalue(self) -> bytes:
        return self._enc.get_compressed().astype("<u4").tobytes()


class ParamDecoder:
    """Reads the symbols of one range-coded payload. :meth:`finish` accepts the payload only if it is
    exactly what :class:`ParamEncoder` writes for the symbols read (no trailing or altered words)."""

    def __init__(self, data: bytes, what: str) -> None:
        if len(data) % 4:
            raise SideStreamError(f"{what}: coded parameters are not a whole number of 32-bit words")
        self.what = what
        self._data = data
        self._replay = ParamEncoder()  # the symbols read so far, coded again
        try:
            self._dec = constriction.stream.queue.RangeDecoder(np.frombuffer(data, "<u4").astype(np.uint32))
        except Exception as exc:  # constriction raises plain exceptions on invalid input
            raise SideStreamError(f"{what}: invalid coded parameters ({exc})") from None

    def _guard(self, fn: Callable[[], np.ndarray]) -> np.ndarray:
        try:
            return fn()
        except SideStreamError:
            raise
        except Exception as exc:
            raise SideStreamError(f"{self.what}: coded parameters are damaged ({exc})") from None

    def uniform(self, size: int) -> int:
        if size < 2:
            return 0
        value = int(self._guard(lambda: np.asarray(self._dec.decode(_model.Uniform(size)))))
        self._replay.uniform(value, size)
        return value

    def geometric(self, n: int, k: int, q: int) -> np.ndarray:
        if n == 0:
            return np.zeros(0, np.int64)
        out = self._guard(lambda: np.asarray(self._dec.decode(_categorical(q, k), n))).astype(np.int64) - k
        self._replay.geometric(out, k, q)
        return out

    def tensor(self, n: int, k: int) -> np.ndarray:
        q = self.uniform(SHAPES)
        return self.geometric(n, k, q)

    def finish(self) -> None:
        expected = self._replay.getvalue()
        if self._data != expected:
            extra = len(self._data) - len(expected)
            detail = (f"{extra} bytes of unused data after the coded parameters" if extra > 0 and
                      self._data.startswith(expected) else
                      f"{len(self._data)} bytes, the coded symbols take {len(expected)}" if extra else
                      "the words differ from the range coder's output for the symbols they decode to")
            raise SideStreamError(f"{self.what}: coded parameters are not canonical ({detail})")


def encode_network(net: QuantizedNetwork, prev: QuantizedNetwork | None = None) -> bytes:
    """Range-code the integers of ``net``; with ``prev`` (same layout), as differences to it."""
    if prev is not None and not net.same_layout(prev):
        raise ValueError("difference coding needs a previous network of the same layout")
    cfg = net.config
    half = 1 << (cfg.scale_bits - 1)
    enc = ParamEncoder()
    last = len(net.layers) - 1
    for i, layer in enumerate(net.layers):
        if prev is None:
            if i < last:
                enc.uniform(layer.act_exp, ACT_EXP_MAX + 1)
            enc.uniform(int(layer.w_exp[0]) - EXP_MIN, EXP_SPAN + 1)
            enc.geometric(np.diff(layer.w_exp), EXP_SPAN, Q_SMALL)
            for m in layer.w_sig:
                enc.uniform(int(m) - half, half)
            enc.tensor(layer.weight, cfg.wmax)
            enc.uniform(layer.b_exp - EXP_MIN, EXP_SPAN + 1)
            enc.uniform(layer.b_sig - half, half)
            enc.tensor(layer.bias, cfg.bmax)
        else:
            p = prev.layers[i]
            if i < last:
                enc.geometric(np.array([layer.act_exp - p.act_exp]), ACT_EXP_MAX, Q_SMALL)
            enc.tensor(layer.w_exp - p.w_exp, EXP_SPAN)
            if half > 1:
                enc.tensor(layer.w_sig - p.w_sig, half - 1)
            enc.tensor(layer.weight.astype(np.int64) - p.weight, 2 * cfg.wmax)
            enc.geometric(np.array([layer.b_exp - p.b_exp]), EXP_SPAN, Q_SMALL)
            if half > 1:
                enc.geometric(np.array([layer.b_sig - p.b_sig]), half - 1, Q_SMALL)
            enc.tensor(layer.bias - p.bias, 2 * cfg.bmax)
    return enc.getvalue()


def _check_range(what: str, name: str, values: np.ndarray, lo: int, hi: int) -> None:
    if values.size and (values.min() < lo or values.max() > hi):
        raise SideStreamError(f"{what}: {name} out of range {lo}..{hi}")


def decode_network(data: bytes, group: Group, packing: Packing, arch: Architecture, config: QuantConfig,
                   prev: QuantizedNetwork | None = None, what: str = "network") -> QuantizedNetwork:
    """Inverse of :func:`encode_network`; rejects anything out of range with SideStreamError."""
    dec = ParamDecoder(data, what)
    half = 1 << (config.scale_bits - 1)
    shapes = arch.shapes(group, packing)
    last = len(shapes) - 1
    if prev is not None and not (prev.group, prev.packing, prev.arch, prev.config) == (group, packing, arch, config):
        raise SideStreamError(f"{what}: difference-coded against a network of another layout")
    layers = []
    for i, s in enumerate(shapes):
        nw = int(np.prod(s.weight_shape))
        ns = s.cout if scale_axis(i) == "out" else s.cin
        if prev is None:
            act = dec.uniform(ACT_EXP_MAX + 1) if i < last else 0
            first = dec.uniform(EXP_SPAN + 1) + EXP_MIN
            w_exp = first + np.concatenate([[0], np.cumsum(dec.geometric(ns - 1, EXP_SPAN, Q_SMALL))])
            w_sig = np.array([dec.uniform(half) + half for _ in range(ns)], np.int64)
            weight = dec.tensor(nw, config.wmax)
            b_exp = dec.uniform(EXP_SPAN + 1) + EXP_MIN
            b_sig = dec.uniform(half) + half
            bias = dec.tensor(s.cout, config.bmax)
        else:
            p = prev.layers[i]
            act = p.act_exp + int(dec.geometric(1, ACT_EXP_MAX, Q_SMALL)[0]) if i < last else 0
            w_exp = p.w_exp + dec.tensor(ns, EXP_SPAN)
            w_sig = p.w_sig + (dec.tensor(ns, half - 1) if half > 1 else 0)
            weight = p.weight.reshape(-1).astype(np.int64) + dec.tensor(nw, 2 * config.wmax)
            b_exp = p.b_exp + int(dec.geometric(1, EXP_SPAN, Q_SMALL)[0])
            b_sig = p.b_sig + (int(dec.geometric(1, half - 1, Q_SMALL)[0]) if half > 1 else 0)
            bias = p.bias + dec.tensor(s.cout, 2 * config.bmax)
        where = f"{what}, layer {i + 1}"
        _check_range(where, "activation position", np.array([act]), 0, ACT_EXP_MAX)
        _check_range(where, "weight exponents", np.asarray(w_exp), EXP_MIN, EXP_MAX)
        _check_range(where, "weight significands", np.asarray(w_sig), half, 2 * half - 1)
        _check_range(where, "weights", weight, -config.wmax, config.wmax)
        _check_range(where, "bias exponent", np.array([b_exp]), EXP_MIN, EXP_MAX)
        _check_range(where, "bias significand", np.array([b_sig]), half, 2 * half - 1)
        _check_range(where, "biases", bias, -config.bmax, config.bmax)
        layers.append(QLayer(weight.reshape(s.weight_shape).astype(np.int32), np.asarray(w_sig, np.int64),
                             np.asarray(w_exp, np.int64), np.asarray(bias, np.int64), int(b_sig), int(b_exp),
                             int(act)))
    dec.finish()
    return QuantizedNetwork(group, packing, arch, config, tuple(layers))
