"""Segmentation of a sequence into the groups of pictures one network is trained for.

* Random access: random-access segments of ``intra_period`` pictures, aligned with the intra (CRA)
  pictures of the HEVC stream, each trained from scratch.
* Low delay: GoPs of ``ld_gop`` (1–64; the paper uses 1–5) pictures, each starting from the previous
  GoP's network; this grouping is the filter's, independent of the encoder's own GOP structure.

A record of the side stream covers at most :data:`MAX_SEGMENT` pictures (its ``frame_count_minus1``
is at most 2^16, docs/sidecar.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError
from .sidecar import MAX_COUNT_MINUS1

#: the longest segment a side-stream record can describe
MAX_SEGMENT = MAX_COUNT_MINUS1 + 1


@dataclass(frozen=True)
class Segment:
    index: int
    start: int
    count: int

    @property
    def frames(self) -> range:
        return range(self.start, self.start + self.count)


def split(frames: int, mode: str, intra_period: int = 32, ld_gop: int = 5) -> list[Segment]:
    if frames < 1:
        raise UsageError("no frames to encode")
    if mode == "ra":
        if not 1 <= intra_period <= MAX_SEGMENT:
            raise UsageError(f"intra period must be in 1..{MAX_SEGMENT}, got {intra_period}")
        size = intra_period
    elif mode in ("ldb", "ldp"):
        if not 1 <= ld_gop <= 64:
            raise UsageError(f"low-delay GoP size must be in 1..64 (paper: 1..5), got {ld_gop}")
        size = ld_gop
    else:
        raise UsageError(f"unknown mode {mode!r}")
    return [Segment(i, s, min(size, frames - s)) for i, s in enumerate(range(0, frames, size))]
