"""The C++ training engine (hevc_ext.trainkernel) against PyTorch autograd.

Every case builds a random NlfNet (random weights, biases, batch-norm affine parameters and running
statistics), runs one training step with PyTorch — in float64 (the reference; float32 PyTorch is
itself only good to ~1e-4 on some gradients) and in float32 — and with the engine, and compares the
loss, every parameter gradient and the batch-norm buffers. Skipped when the engine cannot be built
(no C++ compiler).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hevc_ext import nativebuild, trainkernel
from hevc_ext.arch import Architecture, Group, Packing
from hevc_ext.errors import KernelError, UsageError
from hevc_ext.model import NlfNet, pack, unpack

OK, WHY = trainkernel.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"C++ training engine unavailable: {WHY}")

PERT = 0.1  # random perturbation of every parameter (the biases, beta... of a fresh net are zero)
GRAD_TOL = 1e-4  # of the gradient's largest magnitude, against float64 autograd...
TORCH_FACTOR = 3.0  # ...or within this factor of float32 autograd's own error, where that is larger


@pytest.fixture(autouse=True)
def _torch_one_thread():
    """The references run single-threaded: quicker on a small shared machine, and deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_net(arch: Architecture, group: Group, packing: Packing, seed: int) -> NlfNet:
    torch.manual_seed(seed)
    net = NlfNet(arch, group, packing, bn_gamma=0.3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * PERT)
        for layer in net.layers:
            if layer.bn is not None:
                layer.bn.running_mean.uniform_(-1, 1)
                layer.bn.running_var.uniform_(0.5, 2)
    net.train()
    return net


def _batch(group: Group, n: int, hw: tuple[int, int], crop: tuple[int, int], seed: int):
    g = group.planes
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, g, *hw, generator=gen) * 2 - 1
    x[..., crop[0]:, :] = 0  # the zero lines train.py pads with
    x[..., :, crop[1]:] = 0
    target = torch.randn(n, g, *crop, generator=gen)
    return x, target


def _torch_step(net: NlfNet, x: torch.Tensor, target: torch.Tensor) -> float:
    g, pk = net.group.planes, net.packing
    h, w = target.shape[2:]
    y = unpack(net(pack(x, pk)), g, pk)[..., :h, :w]
    loss = F.mse_loss(y, target)
    net.zero_grad(set_to_none=True)
    loss.backward()
    return float(loss.detach())


def _compare(group: Group, packing: Packing, layers: int, filters: int, n: int, hw: tuple[int, int],
             crop: tuple[int, int], seed: int = 0, threads: int = 2, tol: float = GRAD_TOL) -> None:
    """One step of the engine against float64 autograd: the error of every gradient (max abs,
    relative to the gradient's max magnitude) must be below ``tol`` or within TORCH_FACTOR of float32
    autograd's own error (deep random nets amplify float32 rounding; PyTorch has the same error)."""
    net = _random_net(Architecture(layers, filters), group, packing, seed)
    ref64 = copy.deepcopy(net).double()
    ref32 = copy.deepcopy(net)
    x, target = _batch(group, n, hw, crop, seed + 1)
    loss64 = _torch_step(ref64, x.double(), target.double())
    loss32 = _torch_step(ref32, x, target)
    engine = trainkernel.TrainEngine(net, threads=threads)
    loss = engine.forward_backward(x.numpy(), target.numpy())
    assert loss == pytest.approx(loss64, rel=1e-5)
    assert loss == pytest.approx(loss32, rel=1e-5)
    for (name, p), p64, p32 in zip(net.named_parameters(), ref64.parameters(), ref32.parameters()):
        assert p.grad is not None and p.grad.shape == p.shape, name
        scale = float(p64.grad.abs().max()) + 1e-12
        err = float((p.grad.double() - p64.grad).abs().max()) / scale
        err_torch = float((p32.grad.double() - p64.grad).abs().max()) / scale
        assert err < max(tol, TORCH_FACTOR * err_torch), \
            f"{name}: {err:.2e} of max |grad| from float64 autograd (float32 autograd: {err_torch:.2e})"
    for (name, b), b64 in zip(net.named_buffers(), ref64.buffers()):
        if b.dtype == torch.int64:
            assert int(b) == int(b64), name
        else:
            err = float((b.double() - b64).abs().max()) / max(1.0, float(b64.abs().max()))
            assert err < 1e-5, f"{name}: {err:.2e}"


CASES = [
    # group, packing, layers, filters, batch, (H, W) input, (h, w) target
    (Group.Y, Packing(1, 1), 5, 12, 7, (22, 19), (20, 17)),
    (Group.Y, Packing(1, 2), 3, 6, 5, (18, 26), (16, 23)),
    (Group.Y, Packing(2, 1), 7, 16, 3, (26, 21), (24, 19)),
    (Group.Y, Packing(2, 2), 5, 12, 9, (34, 30), (32, 27)),
    (Group.UV, Packing(1, 1), 3, 16, 5, (17, 23), (15, 21)),
    (Group.UV, Packing(1, 2), 7, 12, 3, (14, 34), (12, 31)),
    (Group.UV, Packing(2, 1), 5, 6, 7, (30, 13), (27, 11)),
    (Group.UV, Packing(2, 2), 3, 12, 5, (20, 36), (18, 33)),
]


@pytest.mark.parametrize("group,packing,layers,filters,n,hw,crop", CASES,
                         ids=[f"{c[0].name}-{c[1]}-{c[2]}x{c[3]}-n{c[4]}" for c in CASES])
def test_step_matches_autograd(group, packing, layers, filters, n, hw, crop):
    _compare(group, packing, layers, filters, n, hw, crop)


@pytest.mark.parametrize("layers,filters", [(3, 1), (5, 7), (9, 5), (3, 32), (15, 3)])
def test_unusual_sizes(layers, filters):
    # (Deep and narrow: a channel whose ReLU never clips has an exactly zero conv-bias gradient, the
    # sum of ~1e3 terms of size ~1 that cancel; float32 leaves ~1e-8 of their size, which can be
    # ~1e-4 of that small gradient's maximum.)
    _compare(Group.Y, Packing(1, 2), layers, filters, 3, (11, 40), (9, 38), seed=layers, tol=3e-4)


def test_default_size_batch():
    """The training default: 64 patches of 48x48 plus two zero lines, 5 x 12, one thread. With ~2M
    pre-activations per layer, some lie within float32 rounding of zero, and float32 and float64 can
    take the other side of a ReLU there (PyTorch float32 as well): a looser tolerance."""
    _compare(Group.Y, Packing(1, 1), 5, 12, 64, (50, 50), (48, 48), threads=1, tol=1e-3)


def test_deterministic_across_threads_and_calls():
    net = _random_net(Architecture(5, 12), Group.UV, Packing(1, 1), 3)
    x, target = _batch(Group.UV, 11, (20, 22), (18, 20), 4)
    results = []
    for threads in (1, 2, 3, 1):
        trial = copy.deepcopy(net)
        trainkernel.TrainEngine(trial, threads=threads).forward_backward(x.numpy(), target.numpy())
        results.append([p.grad.clone() for p in trial.parameters()]
                       + [b.clone() for b in trial.buffers()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("isa", [0, 1])
def test_portable_code_paths(isa):
    """The generic and AVX2 builds of the kernels agree with the best one (rounding aside)."""
    lib, _ = trainkernel._library()
    if not lib.nlft_isa_supported(isa):
        pytest.skip(f"instruction set {trainkernel.ISA_NAMES[isa]} not available")
    net = _random_net(Architecture(5, 12), Group.Y, Packing(2, 1), 5)
    other = copy.deepcopy(net)
    x, target = _batch(Group.Y, 5, (22, 27), (20, 25), 6)
    la = trainkernel.TrainEngine(net, threads=2).forward_backward(x.numpy(), target.numpy())
    eng = trainkernel.TrainEngine(other, threads=2, isa=isa)
    assert eng.isa == isa
    lb = eng.forward_backward(x.numpy(), target.numpy())
    assert lb == pytest.approx(la, rel=1e-6)
    for p, q in zip(net.parameters(), other.parameters()):
        scale = float(p.grad.abs().max()) + 1e-12
        assert float((p.grad - q.grad).abs().max()) / scale < 1e-4


def test_changing_batch_geometry():
    """One engine, batches of different sizes in turn (buffers are re-laid out when they change)."""
    net = _random_net(Architecture(5, 6), Group.UV, Packing(1, 2), 12)
    engine = trainkernel.TrainEngine(net, threads=3)
    for i, (n, hw, crop) in enumerate([(5, (12, 18), (10, 16)), (2, (20, 8), (19, 7)), (5, (12, 18), (11, 18))]):
        ref = copy.deepcopy(net).double()
        x, target = _batch(Group.UV, n, hw, crop, 20 + i)
        want = _torch_step(ref, x.double(), target.double())
        assert engine.forward_backward(x.numpy(), target.numpy()) == pytest.approx(want, rel=1e-5)
        for p, q in zip(net.parameters(), ref.parameters()):
            scale = float(q.grad.abs().max()) + 1e-12
            assert float((p.grad.double() - q.grad).abs().max()) / scale < GRAD_TOL


def test_gradients_are_overwritten_and_buffers_updated():
    net = _random_net(Architecture(3, 6), Group.Y, Packing(1, 1), 7)
    ref = copy.deepcopy(net)
    for p in net.parameters():
        p.grad = torch.full_like(p, 123.0)
    x, target = _batch(Group.Y, 3, (12, 14), (10, 12), 8)
    engine = trainkernel.TrainEngine(net, threads=1)
    for _ in range(2):  # two steps: running statistics and counters follow torch's
        engine.forward_backward(x.numpy(), target.numpy())
        _torch_step(ref, x, target)
    for p, q in zip(net.parameters(), ref.parameters()):
        scale = float(q.grad.abs().max()) + 1e-12
        assert float((p.grad - q.grad).abs().max()) / scale < 5e-4
    for b, c in zip(net.buffers(), ref.buffers()):
        if b.dtype == torch.int64:
            assert int(b) == int(c) == 2
        else:
            assert torch.allclose(b, c, rtol=1e-5, atol=1e-6)


def test_adam_trajectory_matches_torch():
    """20 Adam steps from the same start on the same batches: the loss curves agree."""
    net_t = _random_net(Architecture(5, 12), Group.Y, Packing(1, 1), 11)
    net_e = copy.deepcopy(net_t)
    opt_t = torch.optim.Adam(net_t.parameters(), lr=0.01, weight_decay=1e-4)
    opt_e = torch.optim.Adam(net_e.parameters(), lr=0.01, weight_decay=1e-4)
    engine = trainkernel.TrainEngine(net_e, threads=2)
    lt, le = [], []
    for step in range(20):
        x, target = _batch(Group.Y, 8, (26, 26), (24, 24), 100 + step)
        target = target * 0.3 + x[..., :24, :24]  # something learnable
        lt.append(_torch_step(net_t, x, target))
        opt_t.step()
        le.append(engine.forward_backward(x.numpy(), target.numpy()))
        opt_e.step()
    np.testing.assert_allclose(le, lt, rtol=1e-3)
    assert lt[-1] < lt[0]


def test_train_uses_engine_and_matches_torch(monkeypatch):
    """hevc_ext.train.train with engine="cpu" (and the low-delay regulariser) follows engine="torch",
    and every step of it runs on the engine (engine="torch" never calls it)."""
    from hevc_ext.model import normalised_weights
    from hevc_ext.train import SegmentData, TrainConfig, train

    rng = np.random.default_rng(0)
    recon = [[rng.integers(0, 256, (40, 56)).astype(np.uint8)] for _ in range(2)]
    orig = [[np.clip(r[0].astype(np.int32) + rng.integers(-3, 4, r[0].shape), 0, 255).astype(np.uint8)]
            for r in recon]
    data = SegmentData(Group.Y, orig, recon, 8)
    arch = Architecture(5, 8)
    cfg = TrainConfig(iterations=6, batch=4, patch=16, threads=1, finetune_iterations=None, finetune_lr=None)
    base = train(data, arch, Packing(1, 1), TrainConfig(iterations=3, batch=4, patch=16, threads=1,
                                                         engine="torch"))
    previous = [w.detach().clone() for w in normalised_weights(base.net.folded_weights())]
    calls = []
    step = trainkernel.TrainEngine.forward_backward
    monkeypatch.setattr(trainkernel.TrainEngine, "forward_backward",
                        lambda self, x, t: calls.append(x.shape) or step(self, x, t))
    for prev in (None, previous):
        init = base.net if prev is not None else None
        rt = train(data, arch, Packing(1, 1), TrainConfig(**{**cfg.__dict__, "engine": "torch"}), init, prev)
        assert calls == []
        rc = train(data, arch, Packing(1, 1), TrainConfig(**{**cfg.__dict__, "engine": "cpu"}), init, prev)
        assert len(calls) == cfg.iterations
        calls.clear()
        # (Adam moves every weight by ~lr per step whatever its gradient's size, so weights whose
        # gradient is ~0 drift apart on rounding; the losses are what must agree)
        np.testing.assert_allclose(rc.losses, rt.losses, rtol=1e-3)
        assert rc.losses[-1] < rc.losses[0]


def test_usage_errors():
    net = _random_net(Architecture(3, 4), Group.UV, Packing(2, 2), 1)
    engine = trainkernel.TrainEngine(net, threads=1)
    x, target = _batch(Group.UV, 2, (8, 8), (6, 6), 2)
    with pytest.raises(UsageError):
        engine.forward_backward(x[:, :1].numpy(), target.numpy())  # wrong plane count
    with pytest.raises(UsageError):
        engine.forward_backward(x[..., :7, :].numpy(), target.numpy())  # not a multiple of the packing
    with pytest.raises(UsageError):
        engine.forward_backward(x.numpy(), torch.zeros(2, 2, 9, 6).numpy())  # target larger than input
    net.eval()
    with pytest.raises(UsageError):
        engine.forward_backward(x.numpy(), target.numpy())
    with pytest.raises(UsageError):
        trainkernel.select_engine("gpu", net)
    assert trainkernel.select_engine("torch", net) is None


def test_unavailable_without_compiler(monkeypatch, tmp_path):
    """No prebuilt library, no cached build, no compiler: available() says why; auto falls back."""
    monkeypatch.setenv("HEVC_NLF_CACHE", str(tmp_path))
    monkeypatch.delenv("HEVC_NLF_TRAIN_LIB", raising=False)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(nativebuild, "prebuilt_library", lambda stem, env: None)
    trainkernel._reset_for_tests()
    try:
        ok, why = trainkernel.available()
        assert not ok and "compiler" in why
        net = _random_net(Architecture(3, 4), Group.Y, Packing(1, 1), 0)
        assert trainkernel.select_engine("auto", net) is None
        with pytest.raises(KernelError):
            trainkernel.select_engine("cpu", net)
    finally:
        trainkernel._reset_for_tests()
