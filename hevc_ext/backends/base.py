"""The backend interface: one HEVC encoder/decoder behind a small, swappable API.

A backend encodes a video source at a constant QP in one of the coding structures (``ra``, ``ldb``,
``ldp``) and returns the HEVC bitstream, the reconstructed pictures in display order (as a memory-
mapped raw YUV file, never a float copy) and the coded bits of every picture. The decoder side only
needs :func:`hevc_ext.hevcdec.decode_frames`, which uses av and works for every backend's streams.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UsageError
from ..yuv import MemmapSource, VideoSource

MODES = ("ra", "ldb", "ldp")
log = logging.getLogger("hevc_ext.backends")

Progress = Callable[[int, int], None]  # (frames done, frames total)


@dataclass(frozen=True)
class CodingConfig:
    """Coding structure and quantizer, as in the HEVC common test conditions."""

    mode: str = "ra"
    qp: int = 32
    intra_period: int = 32  # random access: distance between intra (CRA) pictures
    frames: int | None = None  # None: all frames of the source
    extra: tuple[str, ...] = ()  # backend-specific extra options, passed through verbatim

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"unknown mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if not 0 <= self.qp <= 51:
            raise UsageError(f"QP must be in 0..51, got {self.qp}")
        if self.intra_period < 1:
            raise UsageError(f"intra period must be positive, got {self.intra_period}")
        if self.frames is not None and self.frames < 1:
            raise UsageError(f"frame count must be positive, got {self.frames}")


@dataclass
class EncodeResult:
    """What a backend produced: bitstream file, reconstruction, per-picture bits (display order)."""

    bitstream: Path
    recon: MemmapSource
    frame_bits: list[int]
    backend: str
    version: str
    commands: list[list[str]] = field(default_factory=list)
    summary: dict | None = None  # the backend's own figures (HM's SUMMARY), if it reports them
    seconds: float = 0.0

    @property
    def frames(self) -> int:
        return len(self.recon)


class Backend(abc.ABC):
    """An HEVC encoder."""

    name: str = ""

    @abc.abstractmethod
    def availability(self) -> tuple[bool, str]:
        """Whether the backend can run here, and why (or why not)."""

    @abc.abstractmethod
    def version(self) -> str:
        """Version string of the underlying encoder."""

    @abc.abstractmethod
    def encode(self, source: VideoSource, config: CodingConfig, workdir: Path,
               progress: Progress | None = None) -> EncodeResult:
        """Encode ``source`` into ``workdir``; the result's files live there."""


def frame_count(source: VideoSource, config: CodingConfig) -> int:
    total = len(source)
    if config.frames is None:
        return total
    if config.frames > total:
        raise UsageError(f"{source.origin}: {config.frames} frames requested, the file has {total}")
    return config.frames
