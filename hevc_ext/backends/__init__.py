"""Encoder backends. ``get_backend(name)`` returns one; ``BACKENDS`` lists the names."""

from __future__ import annotations

from ..errors import UsageError
from ..commands import format_command
from .base import MODES, Backend, CodingConfig, EncodeResult

BACKENDS = ("x265", "hm")


def check_codec(name: str) -> None:
    """Raise :class:`UsageError` unless ``name`` is a backend of :data:`BACKENDS` (installed or not)."""
    if name not in BACKENDS:
        raise UsageError(f"unknown codec {name!r}: expected one of {', '.join(BACKENDS)}")


def get_backend(name: str, **options: object) -> Backend:
    check_codec(name)
    if name == "x265":
        from .x265 import X265Backend

        return X265Backend(**options)  # type: ignore[arg-type]
    if name == "hm":
        from .hm import HMBackend

        return HMBackend(**options)  # type: ignore[arg-type]
    raise AssertionError(f"backend {name!r} is listed in BACKENDS but not constructed here")


__all__ = ["BACKENDS", "MODES", "Backend", "CodingConfig", "EncodeResult", "check_codec", "format_command",
           "get_backend"]
