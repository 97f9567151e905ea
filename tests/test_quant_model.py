"""BN folding, quantization and derivation: the float model, its folded export and the integer filter agree."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from hevc_ext.arch import ALL_PACKINGS, Architecture, Group, Packing
from hevc_ext.model import NlfNet, code_length_regulariser, export, normalised_weights, pack, unpack
from hevc_ext.quant import (FloatLayer, FloatNetwork, QLayer, QuantConfig, QuantizedNetwork, activation_maxima,
                            choose_act_exp, correct_biases, dequantize, derive, encode_step, float_forward,
                            fold_batchnorm, quantize, quantize_anchored)
from hevc_ext.reference import filter_planes


def _trained_like_net(group: Group, packing: Packing, seed: int = 0, arch: Architecture = Architecture()) -> NlfNet:
    """A network with non-trivial batch-norm statistics (a few forward passes in training mode)."""
    torch.manual_seed(seed)
    net = NlfNet(arch, group, packing)
    with torch.no_grad():
        for layer in net.layers:
            if layer.bn is not None:
                layer.bn.weight.uniform_(0.5, 1.5)
                layer.bn.bias.uniform_(-0.3, 0.3)
            if layer.conv.bias is not None:
                layer.conv.bias.uniform_(-0.1, 0.1)
        net.layers[-1].conv.weight.mul_(4.0)
        net.train()
        for _ in range(3):
            net(torch.rand(4, group.planes * packing.size, 20, 24) * 1.6 - 0.8)
    net.eval()
    return net


def _torch_apply(net: NlfNet, planes, bd: int, l1: float) -> np.ndarray:
    h, w = planes[0].shape
    x = torch.from_numpy(np.stack([p.astype(np.float32) for p in planes])[None])
    mid = float(1 << (bd - 1))
    with torch.no_grad():
        y = unpack(net(pack((x - mid) / mid, net.packing)), len(planes), net.packing)[0].numpy()
    return np.clip(np.stack(planes).astype(np.float64) + y.astype(np.float64) * l1, 0, (1 << bd) - 1)


def test_layer_folded_bn_equals_batchnorm_module():
    torch.manual_seed(3)
    net = _trained_like_net(Group.UV, Packing(1, 2))
    ref = NlfNet(net.arch, net.group, net.packing)
    ref.load_state_dict(net.state_dict())

    def plain(model, x):
        for L in model.layers:
            x = L.pad(x)
            if L.bn is not None:
                x = L.bn(x)
            x = L.conv(x)
            x = torch.relu(x) if L.relu else x
        return x

    x = torch.randn(5, 4, 11, 13)
    for mode in ("train", "eval"):
        net.train(mode == "train")
        ref.train(mode == "train")
        a, b = net(x), plain(ref, x)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for la, lb in zip(net.layers, ref.layers):
        if la.bn is not None:
            torch.testing.assert_close(la.bn.running_var, lb.bn.running_var)


@pytest.mark.parametrize("packing", ALL_PACKINGS, ids=str)
def test_export_folds_exactly(packing):
    net = _trained_like_net(Group.Y, packing, seed=1)
    rng = np.random.default_rng(2)
    plane = rng.integers(0, 256, (18, 22)).astype(np.uint8)
    l1 = 2.5
    want = _torch_apply(net, [plane], 8, l1)[0]
    got = float_forward(export(net, l1), [plane], 8)[0]
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_fold_batchnorm_pointwise_formula():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 4)), rng.normal(size=3)
    g, beta, mean, var = rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.normal(size=4), rng.uniform(0.1, 2, 4)
    wf, bf = fold_batchnorm(w, b, "pw", g, beta, mean, var, 1e-5)
    x = rng.normal(size=4)
    np.testing.assert_allclose(wf @ x + bf, w @ ((x - mean) / np.sqrt(var + 1e-5) * g + beta) + b)


@pytest.mark.parametrize("step", [1e-6, 0.003, 0.7, 1.0, 5.5, 1000.0])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_encode_step_is_smallest_upper_bound(step, bits):
    m, e = encode_step(step, bits)
    assert (1 << (bits - 1)) <= m < (1 << bits)
    assert m * 2.0 ** -e >= step * (1 - 1e-9)
    if m > (1 << (bits - 1)):
        assert (m - 1) * 2.0 ** -e < step


@pytest.mark.parametrize("group, packing", [(Group.Y, Packing(1, 1)), (Group.UV, Packing(1, 1)),
                                            (Group.Y, Packing(2, 2)), (Group.UV, Packing(2, 1))])
@pytest.mark.parametrize("bw", [8, 5])
def test_integer_filter_matches_dequantized_model(group, packing, bw):
    net = _trained_like_net(group, packing, seed=bw)
    fnet = export(net, 3.0)
    rng = np.random.default_rng(4)
    planes = [np.clip(rng.normal(128, 40, (24, 30)), 0, 255).astype(np.uint8) for _ in range(group.planes)]
    crops = [planes]
    q = quantize(fnet, net.arch, QuantConfig(bw, 10, 4), activation_maxima(fnet, crops, 8))
    ints = filter_planes(planes, derive(q, 8), 8)
    floats = float_forward(dequantize(q), planes, 8)
    for a, b in zip(ints, floats):
        diff = np.abs(a.astype(np.float64) - np.round(b))
        assert diff.max() <= 1
        assert (diff > 0).mean() < 0.01


def test_quantization_error_shrinks_with_bits_and_bias_correction_helps():
    net = _trained_like_net(Group.UV, Packing(1, 1), seed=7)
    fnet = export(net, 3.0)
    rng = np.random.default_rng(8)
    planes = [np.clip(rng.normal(128, 30, (32, 32)), 0, 255).astype(np.uint8) for _ in range(2)]
    ref = float_forward(fnet, planes, 8)
    am = activation_maxima(fnet, [planes], 8)

    def err(q):
        out = filter_planes(planes, derive(q, 8), 8)
        return float(np.mean([np.mean((o.astype(float) - r) ** 2) for o, r in zip(out, ref)]))

    errs = {bw: err(quantize(fnet, net.arch, QuantConfig(bw, 12, 4), am)) for bw in (8, 6, 4)}
    assert errs[8] < errs[6] < errs[4]
    q4 = quantize(fnet, net.arch, QuantConfig(4, 12, 4), am)
    assert err(correct_biases(fnet, q4, [planes], 8)) < errs[4]


def test_per_input_channel_scales_absorb_bn_scale():
    """§3.2: a change of σ_c is captured by the per-input-channel scale, not by the quantized weights.
    (Exactly so for a power-of-two change; otherwise up to the rounding of the S-bit significand.)"""
    net = _trained_like_net(Group.Y, Packing(1, 1), seed=9)
    for layer in net.layers:
        if layer.bn is not None:
            layer.bn.eps = 0.0
    a = quantize(export(net, 1.0), net.arch, QuantConfig(6, 10, 4), [np.ones(12)] * 4)
    with torch.no_grad():
        net.layers[2].bn.running_var.mul_(4.0)  # σ of the input of layer 3 (point-wise) doubles
    b = quantize(export(net, 1.0), net.arch, QuantConfig(6, 10, 4), [np.ones(12)] * 4)
    np.testing.assert_array_equal(a.layers[2].weight, b.layers[2].weight)
    np.testing.assert_array_equal(a.layers[2].w_sig, b.layers[2].w_sig)
    np.testing.assert_array_equal(b.layers[2].w_exp, a.layers[2].w_exp + 1)


def test_code_length_regulariser():
    net = _trained_like_net(Group.Y, Packing(1, 1), seed=11)
    prev = [w.detach().clone() for w in normalised_weights(net.folded_weights())]
    assert float(code_length_regulariser(net.folded_weights(), prev).detach()) == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        net.layers[1].conv.weight.add_(0.1)
    r = code_length_regulariser(net.folded_weights(), prev)
    assert float(r.detach()) > 0 and r.requires_grad


def test_numpy_adam_matches_torch_adam():
    from hevc_ext.train import Adam

    torch.manual_seed(0)
    a = [torch.randn(5, 3), torch.randn(7)]
    b = [t.clone().requires_grad_(True) for t in a]
    mine = Adam(a, weight_decay=1e-3)
    ref = torch.optim.Adam(b, lr=0.02, weight_decay=1e-3)
    for step in range(30):
        grads = [torch.randn_like(t) for t in a]
        for t, g in zip(a, grads):
            t.grad = g.clone()
        for t, g in zip(b, grads):
            t.grad = g.clone()
        lr = 0.02 if step < 20 else 0.005
        for pg in ref.param_groups:
            pg["lr"] = lr
        mine.step(lr)
        ref.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y.detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- derivation, activation positions, anchoring


def _qnet(layers, arch=Architecture(3, 1), config=QuantConfig(6, 10, 4)) -> QuantizedNetwork:
    return QuantizedNetwork(Group.Y, Packing(1, 1), arch, config, tuple(layers))


def _ql(weight, w_sig, w_exp, bias, b_sig, b_exp, act_exp) -> QLayer:
    return QLayer(np.array(weight, np.int32), np.array(w_sig, np.int64), np.array(w_exp, np.int64),
                  np.array(bias, np.int64), b_sig, b_exp, act_exp)


def test_derive_rounds_biases_half_up():
    """docs/integer-filter.md §3 on a 3-layer, 1-filter network whose bias exponents k are all negative,
    so every bias needs rounding: bias = (bq·n·m' + 2^(−k−1)) >> −k."""
    q = _qnet([
        # layer 1: A_in = 7, (m, e) = (9, 0), (m', e') = (11, 0), A_out = 7: R = 0, k = 7 − 20 = −13;
        # bq·n·m' = −100·9·11 = −9900, −9900 / 8192 = −1.21 → −1 (a floor would give −2)
        _ql([[5]], [9], [0], [-100], 9, 20, 7),
        # layer 2: A_in = 7, (m', e') = (10, 1), A_out = 10: R = −2 → mult = 10·2^2 = 40, shift 0,
        # k = 7 + 2 − 17 = −8; 37·13·10 = 4810, 4810 / 256 = 18.79 → 19 (floor: 18)
        _ql(np.full((1, 3, 3), 2), [11], [0], [37], 13, 17, 10),
        # layer 3: A_in = 10, R = 10, k = 10 − 14 = −4; −7·8 = −56, −56 / 16 = −3.5 → −3 (half up)
        _ql([[3]], [10], [1], [-7], 8, 14, 0),
    ])
    net = derive(q, 8)
    assert [int(L.bias[0]) for L in net.layers] == [-1, 19, -3]
    assert [int(L.mult[0]) for L in net.layers] == [99, 40, 1]
    assert [int(L.shift[0]) for L in net.layers] == [0, 0, 10]


def _doc_constants(q: QuantizedNetwork, bitdepth: int):
    """mult, shift and bias per layer and channel, transcribed from docs/integer-filter.md §3 with exact
    rational arithmetic (round half up = floor(x + 1/2))."""
    out = []
    a_in = bitdepth - 1
    for i, ql in enumerate(q.layers):
        nxt = q.layers[i + 1] if i + 1 < len(q.layers) else None
        rows = []
        for f in range(len(ql.bias)):
            m, e = (int(ql.w_sig[f]), int(ql.w_exp[f])) if i == 0 else (1, 0)
            m2, e2 = (int(nxt.w_sig[f]), int(nxt.w_exp[f])) if nxt is not None else (1, 0)
            r = a_in + e + e2 - ql.act_exp
            up = max(0, -r)
            exact = Fraction(int(ql.bias[f]) * ql.b_sig * m2) * Fraction(2) ** (a_in + e + up - ql.b_exp)
            rows.append((m * m2 * 2 ** up, max(0, r), math.floor(exact + Fraction(1, 2)), math.floor(exact)))
        out.append(rows)
        a_in = ql.act_exp
    return out


def test_derive_matches_the_documented_formula():
    rng = np.random.default_rng(12)
    arch, config = Architecture(5, 3), QuantConfig(6, 10, 4)
    layers = []
    for i, s in enumerate(arch.shapes(Group.Y, Packing(1, 1))):
        ns = s.cout if i == 0 else s.cin
        layers.append(_ql(rng.integers(-31, 32, s.weight_shape), rng.integers(8, 16, ns), rng.integers(-2, 4, ns),
                          rng.integers(-511, 512, s.cout), int(rng.integers(8, 16)), int(rng.integers(12, 24)),
                          int(rng.integers(6, 11)) if i < arch.layers - 1 else 0))
    q = _qnet(layers, arch, config)
    net = derive(q, 8)
    want = _doc_constants(q, 8)
    for L, rows in zip(net.layers, want):
        assert [(int(a), int(b), int(c)) for a, b, c in zip(L.mult, L.shift, L.bias)] == [r[:3] for r in rows]
    # the drawn exponents make biases inexact: several round to another integer than a floor would
    assert sum(1 for rows in want for r in rows if r[2] != r[3]) >= 3


@pytest.mark.parametrize("a", range(0, 32))
def test_choose_act_exp_boundary(a):
    """The largest A with act_max·2^A <= 2^14 (factor 2 below the 16-bit clamp), clamped to 0..31."""
    exact = 2.0 ** (14 - a)  # act_max·2^a = 2^14 exactly: A = a
    assert choose_act_exp(exact) == a
    if a > 0:
        assert choose_act_exp(exact * 1.0001) == a - 1  # just above: one position less
    assert choose_act_exp(exact * 0.9999) == a  # just below: still a (a + 1 would exceed 2^14)


def test_choose_act_exp_examples():
    def largest(act_max):  # independent reading of the docstring, by search
        return max([A for A in range(32) if act_max * 2.0 ** A <= 2.0 ** 14], default=0)

    for act_max in (0.3, 0.75, 1.0, 1.5, 3.0, 100.0, 511.9, 512.0, 512.5, 1000.0, 16383.0, 16384.0, 16385.0,
                    1e6, 1e-9, 2.0 ** -17, 2.0 ** -18):
        assert choose_act_exp(act_max) == largest(act_max), act_max
    assert choose_act_exp(512.0) == 5 and choose_act_exp(512.5) == 4 and choose_act_exp(1.0) == 14
    assert choose_act_exp(1e6) == 0 and choose_act_exp(1e-9) == 31


def _float_net(rng, arch: Architecture, scale: float = 1.0) -> FloatNetwork:
    layers = []
    for s in arch.shapes(Group.Y, Packing(1, 1)):
        layers.append(FloatLayer(s.kind, rng.normal(0, 0.5, s.weight_shape) * scale,
                                 rng.normal(0, 0.1, s.cout) * scale, s.relu))
    return FloatNetwork(Group.Y, Packing(1, 1), tuple(layers))


def test_quantize_anchored_keeps_the_steps_and_rounds_to_them():
    """A low-delay update quantized with the reference's steps: the steps (and positions) are the
    reference's, and every weight and bias of the new float network that lies within the reference's
    range is reproduced to within half of its step."""
    rng = np.random.default_rng(21)
    arch, config = Architecture(3, 3), QuantConfig(6, 10, 4)
    base = _float_net(rng, arch)
    ref = quantize(base, arch, config, [np.ones(3), np.ones(3)])
    # the update: shrink a little and move every value by at most 5% of its layer's peak (stays in range)
    update = FloatNetwork(base.group, base.packing, tuple(
        FloatLayer(L.kind, 0.9 * L.weight + rng.uniform(-0.05, 0.05, L.weight.shape) * np.abs(L.weight).max(),
                   0.9 * L.bias + rng.uniform(-0.05, 0.05, L.bias.shape) * np.abs(L.bias).max(), L.relu)
        for L in base.layers))
    q = quantize_anchored(update, ref)
    deq = dequantize(q)
    for i, (ql, rl, fl, dl) in enumerate(zip(q.layers, ref.layers, update.layers, deq.layers)):
        np.testing.assert_array_equal(ql.w_sig, rl.w_sig)
        np.testing.assert_array_equal(ql.w_exp, rl.w_exp)
        assert (ql.b_sig, ql.b_exp, ql.act_exp) == (rl.b_sig, rl.b_exp, rl.act_exp)
        assert rl.b_exp != 0  # otherwise 2^(−g) and 2^g would coincide
        bstep = rl.b_sig * 2.0 ** -rl.b_exp
        assert np.all(np.abs(dl.bias - fl.bias) <= bstep / 2 * (1 + 1e-9)), i
        wstep = rl.w_sig * 2.0 ** -rl.w_exp.astype(np.float64)
        if i == 0:  # steps per output channel
            wstep = wstep.reshape(-1, *(1,) * (fl.weight.ndim - 1))
        elif fl.kind == "pw":  # per input channel
            wstep = wstep[None, :]
        else:
            wstep = wstep[:, None, None]
        assert np.all(np.abs(dl.weight - fl.weight) <= wstep / 2 * (1 + 1e-9)), i
        assert np.abs(ql.bias).max() > 0 and np.abs(ql.weight).max() > 0
