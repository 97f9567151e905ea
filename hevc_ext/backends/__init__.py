"""Encoder backends. ``get_backend(name)`` returns one; ``BACKENDS`` lists the names."""

from __future__ import annotations

from ..errors import UsageError
from .base import MODES, Backend, CodingConfig, EncodeResult, format_command

BACKENDS = ("x265", "hm")


def get_backend(name: str, **options: object) -> Backend:
    if name == "x265":
        from .x265 import X265Backend

        return X265Backend(**options)  # type: ignore[arg-type]
    if name == "hm":
        from .hm import HMBackend

        return HMBackend(**options)  # type: ignore[arg-type]
    raise UsageError(f"unknown codec {name!r}: expected one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "MODES", "Backend", "CodingConfig", "EncodeResult", "format_command", "get_backend"]
