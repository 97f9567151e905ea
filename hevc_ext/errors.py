"""The one error hierarchy of hevc-nlf.

Every error the library raises on purpose derives from :class:`NlfError`, and each also subclasses the
builtin that fits it (``ValueError``, ``EOFError``, ``RuntimeError``...), so callers can catch either.
The CLI maps :class:`NlfError` to a one-line message and a non-zero exit code.
"""

from __future__ import annotations


class NlfError(Exception):
    """Base class of every error hevc-nlf raises on purpose."""

    exit_code = 1


class UsageError(NlfError, ValueError):
    """An option or argument the user gave is invalid (unknown mode, bad size string...)."""

    exit_code = 2


class InputFormatError(NlfError, ValueError):
    """An input file does not have the format or size it should have."""


class TruncatedInputError(InputFormatError, EOFError):
    """An input file ends before the data it announces (a partial frame, a cut record)."""


class SideStreamError(NlfError, ValueError):
    """A side stream (sidecar file or SEI payload) is malformed, damaged or unsupported."""


class MismatchError(NlfError, ValueError):
    """Two things that must agree do not: a side stream from another encode, an MD5 that fails."""


class OutputError(NlfError, OSError):
    """An output cannot be written: a directory, a path below a file, a folder without permission..."""


class BackendUnavailableError(NlfError, RuntimeError):
    """An encoder/decoder backend cannot be used here (HM not found, codec missing in av...)."""


class BackendError(NlfError, RuntimeError):
    """An encoder/decoder backend ran but failed; the message carries the command and its log tail."""


class KernelError(NlfError, RuntimeError):
    """A filter kernel was requested that cannot be loaded or failed to run."""


class NamedLibraryError(KernelError):
    """A native library the user named ($HEVC_NLF_CPU_LIB, ...) does not load: never replaced by another."""


class MissingDependencyError(NlfError, ImportError):
    """An optional dependency needed for this operation is not installed (e.g. torch for encoding)."""
