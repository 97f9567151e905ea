"""Input and output files: checked before any work; outputs written under a temporary name and
published by a rename.

* :func:`check_input` names what is wrong with an input path: missing, a directory, unreadable.
* :func:`check_output` refuses, before a long encode or decode starts, an output that cannot be
  written: a directory, a path below a regular file, a folder without write permission, or a file
  that is one of the command's inputs.
* :func:`atomic_output` and :func:`atomic_outputs` give handles to temporary files beside the targets
  (``.NAME.XXXX.part``) and rename them to their names only when the block succeeds, so a failed run
  leaves no half-written file. Several outputs (an encode's ``.hevc`` and ``.nlf``) are published
  together: if one of the renames fails, those already renamed are removed again.

Failures of the file system become :class:`~hevc_ext.errors.OutputError` naming the path.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from .errors import InputFormatError, OutputError, UsageError

PathLike = str | os.PathLike[str]


def check_input(path: PathLike, expected: str = "a file") -> None:
    """Raise :class:`InputFormatError` unless ``path`` is a readable file (``-``, standard input, is)."""
    if str(path) == "-":
        return
    p = Path(path)
    if not p.exists():
        raise InputFormatError(f"{path}: no such file")
    if p.is_dir():
        raise InputFormatError(f"{path}: is a directory, expected {expected}")
    if not p.is_file():  # a pipe (<(...)) or a device: opening it here would consume or block it
        if not os.access(p, os.R_OK):
            raise InputFormatError(f"{path}: cannot read: permission denied")
        return
    try:
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise InputFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None


def written_in_place(path: PathLike) -> bool:
    """Whether ``path`` is an output that cannot be replaced by a rename: standard output (``-``), or an
    existing device or named pipe (/dev/null). Such outputs are written directly."""
    target = Path(path)
    return str(path) == "-" or (target.exists() and not target.is_dir() and not target.is_file())


def check_output(path: PathLike, inputs: Iterable[PathLike | None] = ()) -> None:
    """Raise :class:`OutputError` (or :class:`UsageError` for an output that is an input) unless ``path``
    can be created or replaced; ``-`` (standard output), a device and a named pipe always can."""
    if written_in_place(path):
        return
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{path}: is a directory")
    source = _same_as_any(target, inputs)
    if source is not None:
        raise UsageError(f"{path}: the output would overwrite the input {source}")
    folder = _nearest_existing(target.parent)  # below it, the folders atomic_output would create
    if not folder.is_dir():
        raise OutputError(f"{path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: folder {folder} is not writable")
    if folder == target.parent:  # the real test (root passes os.access on read-only mounts, /proc...)
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=folder)
        except OSError as exc:
            raise _error(path, exc) from None
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def check_output_folder(path: PathLike, what: str, inputs: Iterable[PathLike | None] = ()) -> None:
    """Raise unless ``path`` can be (or already is) a folder for ``what``; it must not be one of the
    ``inputs`` folders (results written among the input clips)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{path}: exists and is not a folder ({what} go into a folder)")
    source = _same_as_any(target, inputs)
    if source is not None:
        raise UsageError(f"{path}: is the input folder {source}; give {what} a folder of their own")
    folder = _nearest_existing(target)  # below it, the folders mkdir would create
    if not folder.is_dir():
        raise OutputError(f"{path}: {folder} is not a folder")


def _same_as_any(target: Path, inputs: Iterable[PathLike | None]) -> PathLike | None:
    """The first of ``inputs`` (``-`` and None skipped) that is the existing ``target`` itself."""
    for source in inputs:
        if source is None or str(source) == "-":
            continue
        with contextlib.suppress(OSError):
            if target.exists() and os.path.samefile(source, target):
                return source
    return None


def _nearest_existing(folder: Path) -> Path:
    """``folder``, or its nearest ancestor that exists."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _error(path: PathLike, exc: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write: {exc.strerror or exc}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_outputs(*paths: PathLike, stdout: BinaryIO | None = None) -> Iterator[list[BinaryIO]]:
    """Binary handles for ``paths`` whose files appear under their names together, and only if the block
    succeeds. ``-`` yields standard output (``stdout`` if given) and an existing device or named pipe
    is written in place (:func:`written_in_place`): neither can be taken back."""
    temps: list[tuple[str, Path]] = []
    try:
        with contextlib.ExitStack() as stack:
            handles: list[BinaryIO] = []
            for path in paths:
                target = Path(path)
                if str(path) == "-":
                    out = stdout if stdout is not None else sys.stdout.buffer
                    stack.callback(out.flush)
                    handles.append(out)
                    continue
                if written_in_place(path):
                    try:
                        handles.append(stack.enter_context(open(target, "wb")))
                    except OSError as exc:
                        raise _error(path, exc) from None
                    continue
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
                except OSError as exc:
                    raise _error(path, exc) from None
                temps.append((tmp, target))
                os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
                handles.append(stack.enter_context(os.fdopen(fd, "wb")))
            yield handles
        done: list[Path] = []
        for tmp, target in temps:
            try:
                os.replace(tmp, target)
            except OSError as exc:
                for published in done:  # all or nothing
                    with contextlib.suppress(OSError):
                        published.unlink()
                raise _error(target, exc) from None
            done.append(target)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_output(path: PathLike, stdout: BinaryIO | None = None) -> Iterator[BinaryIO]:
    """A binary file handle for ``path`` that only appears under that name if the block succeeds
    (:func:`atomic_outputs` with one path)."""
    with atomic_outputs(path, stdout=stdout) as (handle,):
        yield handle
