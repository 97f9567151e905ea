"""Shared fixtures: synthetic content generated in code, and the real clips when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

try:  # property tests: CI runs a fixed set of examples (HYPOTHESIS_PROFILE=ci, .ci/run) so that a
    # submission's result does not depend on the draw; local runs keep exploring new ones
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:
    pass

REPO = Path(__file__).resolve().parents[1]
SEQUENCES = Path(os.environ.get("HEVC_NLF_SEQUENCES", REPO.parent / "shared" / "sequences"))


def synthetic_frames(n: int, width: int, height: int, bitdepth: int = 8, seed: int = 0) -> np.ndarray:
    """``n`` frames of moving textured content (structured dtype y/u/v, like a raw 4:2:0 file)."""
    rng = np.random.default_rng(seed)
    maxv = (1 << bitdepth) - 1
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cy, cx = np.mgrid[0:height // 2, 0:width // 2].astype(np.float64)
    dt = np.dtype([("y", "<u2" if bitdepth > 8 else "u1", (height, width)),
                   ("u", "<u2" if bitdepth > 8 else "u1", (height // 2, width // 2)),
                   ("v", "<u2" if bitdepth > 8 else "u1", (height // 2, width // 2))])
    out = np.zeros(n, dt)
    tex = rng.normal(0, 1, (height + 64, width + 64))
    for t in range(n):
        s = 2 * t
        y = (0.5 + 0.25 * np.sin((xx + s) / 7.0) * np.cos((yy - t) / 9.0)
             + 0.08 * tex[t % 8: t % 8 + height, s % 32: s % 32 + width]
             + 0.15 * ((xx + 3 * t) // 16 % 2))
        u = 0.5 + 0.2 * np.sin((cx + t) / 5.0)
        v = 0.5 + 0.2 * np.cos((cy - t) / 6.0) + 0.05 * ((cx + cy + t) // 8 % 2)
        out[t]["y"] = np.clip(y * maxv, 0, maxv).round()
        out[t]["u"] = np.clip(u * maxv, 0, maxv).round()
        out[t]["v"] = np.clip(v * maxv, 0, maxv).round()
    return out


@pytest.fixture
def make_clip(tmp_path: Path):
    """Write a synthetic raw clip named like the JCT-VC convention; returns its path."""

    def _make(n: int = 6, width: int = 64, height: int = 48, fps: int = 30, bitdepth: int = 8,
              seed: int = 0, name: str = "Synth") -> Path:
        suffix = f"_{bitdepth}bit" if bitdepth > 8 else ""
        path = tmp_path / f"{name}_{width}x{height}_{fps}{suffix}.yuv"
        synthetic_frames(n, width, height, bitdepth, seed).tofile(path)
        return path

    return _make


@pytest.fixture
def sequences_dir() -> Path:
    if not SEQUENCES.is_dir():
        pytest.skip(f"real test clips not present at {SEQUENCES}")
    return SEQUENCES
