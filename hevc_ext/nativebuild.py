"""Finding, building and loading the project's native libraries (the filter kernels of
:mod:`hevc_ext.kernels` and the training engine of :mod:`hevc_ext.trainkernel`).

One policy for all three (:func:`load_native`, described by a :class:`NativeLibrary`):

1. A library the user names in its environment variable (``HEVC_NLF_CPU_LIB``, ``HEVC_NLF_CUDA_LIB``,
   ``HEVC_NLF_TRAIN_LIB``) is the only one tried: if it cannot be loaded (not a library, or not one of
   this version) that is the error — never a silent substitute.
2. Else the library ``pip install`` built next to the package (``hevc_ext/<stem>*.so``). If it does not
   load (an install older than the sources: a missing entry point), that is logged as a warning and
   the sources are built instead.
3. Else (or then) the sources are compiled at first use into the cache (``$HEVC_NLF_CACHE`` or
   ``~/.cache/hevc-nlf/``) under a name keyed by a hash of the sources, the flags and the compiler's
   version. Builds write to a temporary name and rename (a file lock keeps parallel processes from
   building the same library twice).

Every failure is a :class:`~hevc_ext.errors.KernelError` that names each reason on the way.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .commands import format_command, run_process_group
from .errors import KernelError, NamedLibraryError

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_TIMEOUT = 900.0  # seconds one compiler run may take


def cache_dir() -> Path:
    """Where libraries built at first use are cached: ``$HEVC_NLF_CACHE`` or ``~/.cache/hevc-nlf``."""
    env = os.environ.get("HEVC_NLF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hevc-nlf"


def sources_dir(required: Sequence[str]) -> Path | None:
    """The directory holding the native sources ``required``: the copy an installed package ships
    (``hevc_ext/_kernels_src``) or the source tree's ``kernels/``; None if neither has them all."""
    for d in (PACKAGE_DIR / "_kernels_src", PACKAGE_DIR.parent / "kernels"):
        if all((d / f).is_file() for f in required):
            return d
    return None


def find_cxx() -> str | None:
    """The C++ compiler: ``$CXX``, else c++, g++ or clang++ on PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def find_nvcc() -> str | None:
    """nvcc on PATH, else under ``$CUDA_HOME`` / ``$CUDA_PATH`` / ``/usr/local/cuda``."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def prebuilt_library(stem: str, env_var: str) -> Path | None:
    """A native library built by ``pip install`` next to the package (``hevc_ext/<stem>*.so``), or the
    path in ``$<env_var>``; None if neither exists."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    for suffix in (*importlib.machinery.EXTENSION_SUFFIXES, ".so"):
        p = PACKAGE_DIR / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def tool_version(exe: str) -> bytes:
    """``exe --version`` (part of the cache key: another compiler version builds anew)."""
    try:
        proc = subprocess.run([exe, "--version"], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelError(f"cannot run {exe}: {exc}") from exc
    return proc.stdout + proc.stderr


def content_key(parts: Sequence[bytes]) -> str:
    """A short hash of ``parts`` (length-prefixed, so that no two sequences collide by concatenation)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:16]


def compile_library(cmd: list[str], out: Path) -> None:
    """Run a compiler writing to a temporary name, then rename into ``out`` (safe under concurrency) with
    its digest beside it (:func:`intact`); readable by all, like an installed library."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".part", dir=out.parent)
        os.close(fd)
    except OSError as exc:
        raise KernelError(f"cannot write into the build cache {out.parent} ({exc.strerror}); set $HEVC_NLF_CACHE "
                          f"to a writable folder") from exc
    try:
        full = cmd + ["-o", tmp]
        log.info("building: %s", format_command(full))
        proc = run_process_group(full, timeout=BUILD_TIMEOUT)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-2000:]
            raise KernelError(f"compiler failed ({proc.returncode}): {format_command(full)}\n{tail}")
        os.chmod(tmp, 0o755)
        _digest_path(out).write_text(_digest(Path(tmp)))
        os.replace(tmp, out)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelError(f"cannot run {cmd[0]}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _digest_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def intact(lib: Path) -> bool:
    """``lib`` is as the cache built it (its digest matches): a truncated or altered file is not loaded,
    where loading it could crash the process (SIGBUS) instead of failing."""
    try:
        return _digest_path(lib).read_text().strip() == _digest(lib)
    except OSError:
        return False


def prune(pattern: str, keep: Path, newest: int = 4) -> None:
    """Remove builds of other source versions from the cache, keeping the ``newest`` few, and what builds
    that were killed left (``*.part`` files older than an hour)."""
    try:
        old = sorted((p for p in keep.parent.glob(pattern) if p != keep), key=lambda p: p.stat().st_mtime)
        for p in old[: max(0, len(old) - (newest - 1))]:
            p.unlink()
            _digest_path(p).unlink(missing_ok=True)
        for p in keep.parent.glob(pattern + ".*.part"):
            if time.time() - p.stat().st_mtime > 3600:
                p.unlink()
    except OSError:
        pass


class FileLock:
    """An advisory lock on a file (POSIX; a no-op elsewhere) so that parallel processes build once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> "FileLock":
        try:
            import fcntl

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            self._fd = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            try:
                import fcntl

                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


def build_cached(stem: str, compiler: str, flags: Sequence[str], files: Sequence[Path], what: str,
                 level: int = logging.INFO) -> Path:
    """The cached library ``lib<stem>-<key>.so`` built from ``files`` (the first is compiled, the others
    are headers) with ``compiler flags``; built now (under a lock) if it is not in the cache yet."""
    key = content_key([f.read_bytes() for f in files] + [" ".join(flags).encode(), tool_version(compiler),
                                                         compiler.encode()])
    out = cache_dir() / f"lib{stem}-{key}.so"
    if not intact(out):
        with FileLock(out.parent / f"lib{stem}.lock"):
            if not intact(out):
                if out.exists():
                    log.warning("%s: damaged (its digest does not match); building it again", out)
                log.log(level, "building %s with %s into %s", what, compiler, out)
                compile_library([compiler, *flags, str(files[0])], out)
                prune(f"lib{stem}-*.so", out)
    return out


def load_library(path: Path, bind: Callable[[ctypes.CDLL], None], what: str) -> ctypes.CDLL:
    """Load a library and declare its functions with ``bind``; a missing file or symbol is a KernelError."""
    try:
        lib = ctypes.CDLL(str(path))
        bind(lib)
    except OSError as exc:
        raise KernelError(f"cannot load {path}: {exc}") from exc
    except AttributeError as exc:
        raise KernelError(f"{path} is not a {what} of this version: {exc}") from exc
    return lib


@dataclass(frozen=True)
class NativeLibrary:
    """What :func:`load_native` needs to know of one native library."""

    what: str                          # in messages: "C++ kernel", "CUDA kernel", "C++ training engine"
    stem: str                          # installed as hevc_ext/<stem>*.so, cached as lib<stem without _>-<key>.so
    env_var: str                       # names a library to use instead (never substituted)
    sources: tuple[str, ...]           # under kernels/: the first is compiled, the others are its headers
    bind: Callable[[ctypes.CDLL], None]  # declares the functions (a missing symbol: not this version)
    compiler_name: str                 # "C++ compiler", "nvcc": for "no <compiler_name> ..." messages
    compiler_hint: str                 # where it was looked for / how to provide one
    build_note: str = ""               # appended to the "building ..." log line (e.g. how long it takes)
    build_level: int = logging.INFO    # the level of that line


def load_native(lib: NativeLibrary, compiler: str | None, flags: Sequence[str]) -> tuple[ctypes.CDLL, Path]:
    """Locate, if need be build, and load ``lib`` by the module's policy (see the module docstring);
    ``compiler`` is the compiler to build with (None: none found). Returns the library and its path."""
    reasons: list[str] = []
    named = os.environ.get(lib.env_var)
    installed = prebuilt_library(lib.stem, lib.env_var)
    if installed is not None:
        try:
            return load_library(installed, lib.bind, lib.what + " library"), installed
        except KernelError as exc:
            if named and Path(named) == installed:
                raise NamedLibraryError(f"{lib.what} unavailable: the library named by ${lib.env_var} does not load "
                                  f"({exc}); unset {lib.env_var} to use the installed or a freshly built one") from exc
            reasons.append(f"the installed library does not load ({exc})")
            log.warning("%s: the installed library does not load (%s); building it from the sources", lib.what, exc)
    else:
        reasons.append(f"not built at install time (no hevc_ext/{lib.stem}*.so, ${lib.env_var} unset)")
    src = sources_dir(lib.sources)
    if src is None:
        reasons.append(f"its sources ({', '.join(lib.sources)}) not found")
    elif compiler is None:
        reasons.append(f"no {lib.compiler_name} to build it at first use ({lib.compiler_hint})")
    if src is None or compiler is None:
        raise KernelError(f"{lib.what} unavailable: " + "; ".join(reasons))
    what = f"the {lib.what}" + (f" ({lib.build_note})" if lib.build_note else "")
    try:
        out = build_cached(lib.stem.lstrip("_"), compiler, flags, [src / f for f in lib.sources], what,
                           level=lib.build_level)
    except KernelError as exc:
        raise KernelError(f"{lib.what} unavailable: " + "; ".join(reasons + [str(exc)])) from exc
    return load_library(out, lib.bind, lib.what + " library"), out


class LazyLibrary:
    """A native library located, built if need be, and loaded on first use (thread-safe). A failure is
    remembered as well: every later :meth:`get` raises the same :class:`KernelError` with its reason."""

    def __init__(self, load: Callable[[], tuple[ctypes.CDLL, Path]], what: str) -> None:
        self._load = load
        self._what = what
        self._lock = threading.Lock()
        self._state: tuple[ctypes.CDLL, Path] | KernelError | None = None

    def get(self) -> tuple[ctypes.CDLL, Path]:
        with self._lock:
            if self._state is None:
                try:
                    self._state = self._load()
                except KernelError as exc:
                    self._state = exc
                except Exception as exc:  # never let an unexpected failure escape as anything else
                    self._state = KernelError(f"{self._what} unavailable: {exc}")
            if isinstance(self._state, KernelError):
                raise self._state
            return self._state

    @property
    def loaded_path(self) -> Path | None:
        """The library's path if it has been loaded, else None (nothing is attempted)."""
        state = self._state
        return state[1] if isinstance(state, tuple) else None

    def reset(self) -> None:
        """Forget the library (or the failure) so that the next :meth:`get` locates it again."""
        with self._lock:
            self._state = None
