"""Online training of one network on one segment (paper §3.3).

The training pairs are (decoded picture → coding residual) of one channel group over one segment.
Patches are cut from the integer pictures batch by batch, so no float copy of the segment is ever
held. The target is the residual divided by the segment's mean absolute residual (eq. 4), the input
is centred, batch normalisation uses the paper's momentum γ = 0.3, and every training batch is padded
with two zero lines at the right and bottom that are cropped before the loss (§3.3).

Random access trains every segment from scratch with L2 weight regularisation; low delay starts from
the previous segment's network and adds the code-length regulariser of eq. 2–3.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .arch import Architecture, Group, Packing
from .errors import UsageError
from .model import NlfNet, code_length_regulariser, export, normalised_weights, pack, unpack
from .quant import Calibration, FloatNetwork

log = logging.getLogger("hevc_ext.train")


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 600
    batch: int = 64
    patch: int = 48
    lr: float = 0.02
    lr_final: float = 0.002  # cosine decay to this rate over the last ``decay_fraction`` of the steps
    decay_fraction: float = 0.3
    weight_decay: float = 1e-4  # L2 regularisation (random access)
    code_reg: float = 0.1  # code-length regulariser weight (low delay, eq. 3)
    bn_gamma: float = 0.3
    zero_lines: int = 2
    seed: int = 1234
    threads: int = 0  # 0: leave torch's setting
    engine: str = "auto"  # forward/backward: "auto" (C++ engine if available, else torch), "torch", "cpu"
    # Low delay: each GoP starts from the previous network. Measured on BasketballPass LDP QP 32 (17
    # frames, 4-frame GoPs): 200 steps at lr 0.005 gave 20 % fewer side bytes than 600 at 0.02 for
    # 0.03 dB less luma gain (net BD-rate gain) in 57 % of the training time.
    finetune_iterations: int | None = 200  # None: as ``iterations``
    finetune_lr: float | None = 0.005  # None: as ``lr``

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise UsageError(f"iterations must be >= 0, got {self.iterations}")
        if self.batch < 1 or self.patch < 4:
            raise UsageError("batch must be >= 1 and patch >= 4")
        if not self.lr > 0:
            raise UsageError(f"learning rate must be positive, got {self.lr}")


@dataclass
class SegmentData:
    """The integer pictures of one channel group over one segment (views, never float copies)."""

    group: Group
    orig: list[list[np.ndarray]]  # per picture: the group's planes
    recon: list[list[np.ndarray]]
    bitdepth: int
    _l1: float | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.recon[0][0].shape

    def l1(self) -> float:
        """Mean absolute residual over all samples of the segment (eq. 4's L1(R))."""
        if self._l1 is None:
            total, count = 0, 0
            for o, r in zip(self.orig, self.recon):
                for po, pr in zip(o, r):
                    total += int(np.abs(po.astype(np.int32) - pr.astype(np.int32)).sum(dtype=np.int64))
                    count += po.size
            self._l1 = total / count if count else 0.0
        return self._l1

    def sample(self, rng: np.random.Generator, n: int, patch: tuple[int, int],
               packing: Packing) -> tuple[np.ndarray, np.ndarray]:
        """``n`` aligned patches: (input samples, residual) as int32 arrays (n, G, ph, pw)."""
        h, w = self.shape
        ph, pw = patch
        g = self.group.planes
        inp = np.empty((n, g, ph, pw), np.int32)
        res = np.empty((n, g, ph, pw), np.int32)
        frames = rng.integers(0, len(self.recon), n)
        ys = rng.integers(0, (h - ph) // packing.ph + 1, n) * packing.ph
        xs = rng.integers(0, (w - pw) // packing.pw + 1, n) * packing.pw
        for i in range(n):
            f, y, x = int(frames[i]), int(ys[i]), int(xs[i])
            for c in range(g):
                r = self.recon[f][c][y:y + ph, x:x + pw]
                inp[i, c] = r
                res[i, c] = self.orig[f][c][y:y + ph, x:x + pw].astype(np.int32) - r
        return inp, res


@dataclass
class TrainResult:
    net: NlfNet
    float_net: FloatNetwork
    act_max: list[float]
    l1: float
    losses: list[float]
    calibration: Calibration | None = None  # float activations on decoded crops, for quantization
    seconds: float = 0.0

    def normalised(self) -> list[torch.Tensor]:
        return [w.detach().clone() for w in normalised_weights(self.net.folded_weights())]


def patch_shape(data: SegmentData, size: int, packing: Packing) -> tuple[int, int]:
    h, w = data.shape
    ph = min(size, h - h % packing.ph) // packing.ph * packing.ph
    pw = min(size, w - w % packing.pw) // packing.pw * packing.pw
    return max(ph, packing.ph), max(pw, packing.pw)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    start = int(cfg.iterations * (1.0 - cfg.decay_fraction))
    if step < start or cfg.iterations <= start:
        return cfg.lr
    t = (step - start) / max(1, cfg.iterations - start)
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * t))


def train(data: SegmentData, arch: Architecture, packing: Packing, cfg: TrainConfig,
          init: NlfNet | None = None, previous: Sequence[torch.Tensor] | None = None,
          progress: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train a network for ``data``. ``init``: start from this network (low delay); ``previous``:
    normalised weights of the previous network for the code-length regulariser (low delay)."""
    import time

    start = time.perf_counter()
    if init is not None and (cfg.finetune_iterations is not None or cfg.finetune_lr is not None):
        cfg = replace(cfg, iterations=cfg.finetune_iterations if cfg.finetune_iterations is not None else cfg.iterations,
                      lr=cfg.finetune_lr if cfg.finetune_lr is not None else cfg.lr,
                      lr_final=min(cfg.lr_final, cfg.finetune_lr or cfg.lr))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if init is not None:
        net = copy.deepcopy(init)
    else:
        net = NlfNet(arch, data.group, packing, cfg.bn_gamma)
    net.train()
    l1 = data.l1()
    scale = np.float32(1.0 / l1 if l1 > 0 else 1.0)
    mid = np.float32(1 << (data.bitdepth - 1))
    low_delay = previous is not None
    params = list(net.parameters())
    opt = Adam(params, weight_decay=0.0 if low_delay else cfg.weight_decay)
    patch = patch_shape(data, cfg.patch, packing)
    zl = cfg.zero_lines
    zl_h = zl + (-zl) % packing.ph
    zl_w = zl + (-zl) % packing.pw
    losses: list[float] = []
    g = data.group.planes
    from .trainkernel import select_engine

    # the C++ engine (hevc_ext.trainkernel) computes the data term's forward/backward; None: torch
    engine = select_engine(cfg.engine, net, cfg.threads or torch.get_num_threads()) if cfg.iterations else None
    # Batches are prepared in numpy, into a buffer whose zero lines stay zero (torch's threaded element-
    # wise ops on such small tensors cost more than the whole engine step on a busy machine).
    xb = np.zeros((cfg.batch, g, patch[0] + zl_h, patch[1] + zl_w), np.float32)
    inner = xb[..., : patch[0], : patch[1]]
    for step in range(cfg.iterations):
        inp, res = data.sample(rng, cfg.batch, patch, packing)
        np.subtract(inp, mid, out=inner, casting="unsafe")
        inner /= mid
        target = res.astype(np.float32)
        target *= scale
        if engine is not None:
            data_loss = engine.forward_backward(xb, target)  # overwrites every .grad
            if low_delay and cfg.code_reg:
                reg = cfg.code_reg * code_length_regulariser(net.folded_weights(), previous)
                grads = torch.autograd.grad(reg, params, allow_unused=True)
                with torch.no_grad():
                    for p, gr in zip(params, grads):
                        if gr is not None:
                            p.grad.add_(gr)
        else:
            x = torch.from_numpy(xb)
            y = unpack(net(pack(x, packing)), g, packing)[..., : patch[0], : patch[1]]
            loss = F.mse_loss(y, torch.from_numpy(target))
            total = loss
            if low_delay and cfg.code_reg:
                total = loss + cfg.code_reg * code_length_regulariser(net.folded_weights(), previous)
            for p in params:
                p.grad = None
            total.backward()
            data_loss = float(loss.detach())
        opt.step(_lr_at(step, cfg))
        losses.append(data_loss)
        if progress is not None and (step + 1) % 25 == 0:
            progress(step + 1, cfg.iterations)
    net.eval()
    float_net = export(net, l1 if l1 > 0 else 1.0)
    calib = Calibration(float_net, calibration_crops(data, rng), data.bitdepth)
    return TrainResult(net, float_net, calib.act_max, l1, losses, calib, time.perf_counter() - start)


class Adam:
    """Adam (Kingma & Ba) with L2 weight decay, exactly as torch.optim.Adam computes it, in numpy on the
    parameters' memory: the networks are tiny, and torch's optimizer costs more than it computes here
    (its first use alone imports torch._dynamo)."""

    def __init__(self, params: Sequence[torch.Tensor], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.params = list(params)
        self.values = [p.detach().numpy() for p in self.params]  # views: updates land in the tensors
        self.m = [np.zeros_like(v) for v in self.values]
        self.v = [np.zeros_like(v) for v in self.values]
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.t = 0

    def step(self, lr: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        bc1 = 1.0 - b1 ** self.t
        bc2_sqrt = math.sqrt(1.0 - b2 ** self.t)
        for p, value, m, v in zip(self.params, self.values, self.m, self.v):
            if p.grad is None:
                continue
            grad = p.grad.numpy()
            if self.weight_decay:
                grad = grad + np.float32(self.weight_decay) * value
            m *= np.float32(b1)
            m += np.float32(1.0 - b1) * grad
            v *= np.float32(b2)
            v += np.float32(1.0 - b2) * grad * grad
            denom = np.sqrt(v) / np.float32(bc2_sqrt) + np.float32(self.eps)
            value -= np.float32(lr / bc1) * m / denom


def calibration_crops(data: SegmentData, rng: np.random.Generator, frames: int = 8,
                      size: int = 128) -> list[list[np.ndarray]]:
    """Decoded crops to measure activation ranges on (up to ``frames`` pictures, ``size``² samples)."""
    h, w = data.shape
    idx = np.linspace(0, len(data.recon) - 1, min(frames, len(data.recon))).round().astype(int)
    out = []
    for f in idx:
        y = int(rng.integers(0, max(1, h - size + 1)))
        x = int(rng.integers(0, max(1, w - size + 1)))
        out.append([p[y:y + size, x:x + size] for p in data.recon[f]])
    return out
