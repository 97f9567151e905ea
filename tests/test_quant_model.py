"""BN folding, quantization and derivation: the float model, its folded export and the integer filter agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hevc_ext.arch import ALL_PACKINGS, Architecture, Group, Packing
from hevc_ext.model import NlfNet, code_length_regulariser, export, normalised_weights, pack, unpack
from hevc_ext.quant import (QuantConfig, activation_maxima, correct_biases, dequantize, derive, encode_step,
                            float_forward, fold_batchnorm, quantize)
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
