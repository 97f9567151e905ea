"""The trainable network (paper §3.1) in PyTorch, and its export to a folded float network.

The module mirrors the integer filter exactly up to quantization: packed input
``x = (sample − 2^(bd−1)) / 2^(bd−1)``; every layer but the first starts with batch normalisation; the
depth-wise layers pad with zeros *before* their batch normalisation (so that folding is exact at
picture borders, where the integer filter reads zeros); ReLU after every layer but the last; no bias in
the last convolution. The output is the residual divided by the segment's mean absolute residual
``L1`` (eq. 4); :func:`export` folds ``L1`` back in.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .arch import Architecture, Group, Packing
from .quant import FloatLayer, FloatNetwork, fold_batchnorm


def pack(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """(N, G, H, W) → (N, G·PH·PW, H/PH, W/PW), channel ``g·PH·PW + dy·PW + dx``."""
    n, g, h, w = x.shape
    ph, pw = packing.ph, packing.pw
    x = x.reshape(n, g, h // ph, ph, w // pw, pw).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, g * ph * pw, h // ph, w // pw)


def unpack(x: torch.Tensor, groups: int, packing: Packing) -> torch.Tensor:
    n, _, hq, wq = x.shape
    ph, pw = packing.ph, packing.pw
    x = x.reshape(n, groups, ph, pw, hq, wq).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, groups, hq * ph, wq * pw)


class Layer(nn.Module):
    def __init__(self, kind: str, cin: int, cout: int, bias: bool, bn: bool, relu: bool, momentum: float) -> None:
        super().__init__()
        self.kind = kind
        self.pad = nn.ZeroPad2d(1) if kind == "dw" else nn.Identity()
        self.bn = nn.BatchNorm2d(cin, momentum=momentum) if bn else None
        if kind == "pw":
            self.conv = nn.Conv2d(cin, cout, 1, bias=bias)
        else:
            self.conv = nn.Conv2d(cin, cout, 3, groups=cin, padding=0, bias=bias)
        if bias:
            nn.init.zeros_(self.conv.bias)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is None:
            y = self.conv(x)
            return torch.relu(y) if self.relu else y
        # Batch normalisation folded into the convolution: BN(x) = s·x + d per input channel, so
        # conv(BN(pad(x))) = conv_{W·s}(pad(x)) + (b + Σ W·d). Identical to nn.BatchNorm2d in training
        # and inference mode (batch statistics of the zero-padded input, as the integer filter pads
        # with zeros before the folded layer), but without materialising the normalised tensor —
        # several times faster on the CPU.
        bn = self.bn
        if self.training:
            pad = 1 if self.kind == "dw" else 0
            n, c, h, w = x.shape
            count = n * (h + 2 * pad) * (w + 2 * pad)
            mean = x.sum(dim=(0, 2, 3)) / count
            var = ((x * x).sum(dim=(0, 2, 3)) / count - mean * mean).clamp_min(0.0)
            with torch.no_grad():
                m = bn.momentum
                bn.running_mean.mul_(1 - m).add_(m * mean.detach())
                bn.running_var.mul_(1 - m).add_(m * var.detach() * count / max(1, count - 1))
                bn.num_batches_tracked += 1
        else:
            mean, var = bn.running_mean, bn.running_var
        scale = bn.weight * torch.rsqrt(var + bn.eps)
        shift = bn.bias - mean * scale
        wt = self.conv.weight
        if self.kind == "dw":
            weight = wt * scale.view(-1, 1, 1, 1)
            bias = wt.sum(dim=(1, 2, 3)) * shift
        else:
            weight = wt * scale.view(1, -1, 1, 1)
            bias = wt[:, :, 0, 0] @ shift
        if self.conv.bias is not None:
            bias = bias + self.conv.bias
        y = F.conv2d(self.pad(x), weight, bias, groups=self.conv.groups)
        return torch.relu(y) if self.relu else y


class NlfNet(nn.Module):
    """The network for one channel group, operating on packed, centred input."""

    def __init__(self, arch: Architecture, group: Group, packing: Packing, bn_gamma: float = 0.3) -> None:
        super().__init__()
        self.arch, self.group, self.packing = arch, group, packing
        # Paper eq. 5: estimate = γ·estimate + (1 − γ)·batch; PyTorch's momentum is 1 − γ.
        momentum = 1.0 - bn_gamma
        self.layers = nn.ModuleList(Layer(s.kind, s.cin, s.cout, s.bias, s.bn, s.relu, momentum)
                                    for s in arch.shapes(group, packing))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def folded_weights(self) -> list[torch.Tensor]:
        """Per layer, the convolution weights with the batch-norm scale folded in (differentiable in
        the weights and γ; running variance detached) — what quantization will see."""
        out = []
        for layer in self.layers:
            w = layer.conv.weight
            if layer.bn is not None:
                s = layer.bn.weight / torch.sqrt(layer.bn.running_var.detach() + layer.bn.eps)
                w = w * (s.view(-1, 1, 1, 1) if layer.kind == "dw" else s.view(1, -1, 1, 1))
            out.append(w)
        return out


def normalised_weights(weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Eq. 2: weights divided by their maximum magnitude per quantization channel — the channel whose
    step quantizes them (quant.scale_axis: the output channel of layer 1, the input channel of every
    later layer), so that the regulariser penalises exactly the changes of the quantized integers."""
    out = []
    for i, w in enumerate(weights):
        if i == 0 or w.shape[1] == 1:  # first layer, or depth-wise (input channel = output channel)
            flat = w.reshape(w.shape[0], -1)
        else:  # point-wise (cout, cin, 1, 1): one row per input channel
            flat = w.reshape(w.shape[0], w.shape[1]).t()
        out.append(flat / flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-8))
    return out


def code_length_regulariser(current: Sequence[torch.Tensor], previous: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. 2–3: Σ_l 1/(C_l K_l) Σ_{c,k} (w̄_l(t) − w̄_l(t−1))²."""
    total = current[0].new_zeros(())
    for a, b in zip(normalised_weights(current), previous):
        total = total + ((a - b) ** 2).sum() / a.numel()
    return total


def export(net: NlfNet, l1: float) -> FloatNetwork:
    """Fold batch normalisation and the residual scale ``l1`` into a float network (numpy)."""
    layers = []
    n = len(net.layers)
    for i, layer in enumerate(net.layers):
        w = layer.conv.weight.detach().double().cpu().numpy()
        w = w[:, :, 0, 0] if layer.kind == "pw" else w[:, 0]
        b = layer.conv.bias.detach().double().cpu().numpy() if layer.conv.bias is not None else None
        if layer.bn is not None:
            bn = layer.bn
            w, b = fold_batchnorm(w, b, layer.kind, bn.weight.detach().double().cpu().numpy(),
                                  bn.bias.detach().double().cpu().numpy(),
                                  bn.running_mean.detach().double().cpu().numpy(),
                                  bn.running_var.detach().double().cpu().numpy(), bn.eps)
        elif b is None:
            b = np.zeros(w.shape[0])
        if i == n - 1:
            w, b = w * l1, b * l1
        layers.append(FloatLayer(layer.kind, w, b, layer.relu))
    return FloatNetwork(net.group, net.packing, tuple(layers))
