"""Distortion and rate the way HM reports them, so our BD-rates compare with published ones.

* PSNR per picture and plane: ``10·log10(maxval² · N / SSE)`` with ``maxval = 255 << (bitdepth − 8)``
  (HM's convention, also for 10-bit) and 999.99 dB for a lossless plane; a sequence's PSNR is the
  **mean of the per-picture PSNRs** (HM's SUMMARY), not the PSNR of the mean error.
* Rate: all coded bits of all channels plus the side information, ``kbps = bits · fps / frames / 1000``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Sequence

import numpy as np

PLANES = ("y", "u", "v")
LOSSLESS_PSNR = 999.99


def sse(a: np.ndarray, b: np.ndarray) -> int:
    d = a.astype(np.int32) - b.astype(np.int32)
    return int(np.einsum("ij,ij->", d, d, dtype=np.int64))


def psnr_from_sse(err: int, samples: int, bitdepth: int) -> float:
    if err == 0:
        return LOSSLESS_PSNR
    maxval = 255 << (bitdepth - 8)
    return 10.0 * math.log10(maxval * maxval * samples / err)


@dataclass
class PsnrAccumulator:
    """Per-picture SSE of the three planes; PSNR averaged over pictures like HM."""

    bitdepth: int
    sizes: tuple[int, int, int]
    frames: list[tuple[int, int, int]] = field(default_factory=list)

    def add(self, errors: Sequence[int]) -> None:
        self.frames.append(tuple(int(e) for e in errors))  # type: ignore[arg-type]

    def add_planes(self, ref: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> None:
        self.add([sse(r, t) for r, t in zip(ref, test)])

    def per_frame(self) -> list[dict[str, float]]:
        return [{p: psnr_from_sse(e, n, self.bitdepth) for p, e, n in zip(PLANES, errs, self.sizes)}
                for errs in self.frames]

    def mean(self, frames: range | None = None) -> dict[str, float]:
        rows = self.per_frame()
        if frames is not None:
            rows = [rows[i] for i in frames]
        if not rows:
            return {p: float("nan") for p in PLANES}
        return {p: float(np.mean([r[p] for r in rows])) for p in PLANES}

    def yuv_psnr(self) -> float:
        """HM's SUMMARY YUV-PSNR: the PSNR of the mean squared error averaged over the pictures per plane
        and weighted by the planes' sample counts (4:1:1 for 4:2:0; ``TEncAnalyze::calculateCombinedValues``)
        — not a mean of per-picture values such as ``(6·Y + U + V) / 8``."""
        if not self.frames:
            return float("nan")
        mse = [float(np.mean([f[c] / n for f in self.frames])) for c, n in enumerate(self.sizes)]
        weights = [n / self.sizes[0] * 4 for n in self.sizes]  # 4, 1, 1 for 4:2:0
        combined = sum(w * m for w, m in zip(weights, mse)) / sum(weights)
        maxval = 255 << (self.bitdepth - 8)
        return LOSSLESS_PSNR if combined == 0 else 10 * math.log10(maxval * maxval / combined)


def kbps(bits: int, frames: int, fps: Fraction | float) -> float:
    return bits * float(fps) / frames / 1000.0 if frames else float("nan")
