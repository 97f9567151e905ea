"""Filter kernels: the one loader that picks CUDA → C++ → reference.

Every kernel computes :func:`hevc_ext.reference.filter_planes` bit-exactly; they differ only in speed.

* ``cuda`` — ``kernels/filter_cuda.cu``, built by ``pip install`` where nvcc exists
  (``hevc_ext/_nlf_cuda.so``), else compiled with nvcc at first use and cached under
  ``$HEVC_NLF_CACHE`` or ``~/.cache/hevc-nlf/``, keyed by a hash of the sources, the flags and
  ``nvcc --version``. Whether to *build* is decided by the presence of nvcc alone; whether to *use*
  the built library needs a CUDA device at run time (asked through the library itself).
* ``cpu`` — ``kernels/filter_cpu.cpp``, built by ``pip install`` into ``hevc_ext/_nlf_cpu*.so``
  (AVX-512 / AVX2 / scalar chosen at run time). If the install could not build it, it is compiled
  at first use into the same cache when a C++ compiler is present.
* ``reference`` — the numpy definition; always available.

Both native libraries are located by :func:`hevc_ext.nativebuild.load_native` (the same policy as the
training engine's): ``$HEVC_NLF_CPU_LIB`` / ``$HEVC_NLF_CUDA_LIB`` name a library to use instead and
are never substituted; an installed library that does not load (one missing an entry point of newer
sources) is rebuilt from the sources.

``get_kernel("auto")`` takes the first available one and logs why the others were passed over;
``get_kernel("cuda" | "cpu" | "reference")`` raises :class:`~hevc_ext.errors.KernelError` with the
reason when that kernel is unavailable. Native libraries are plain C ABI (``kernels/nlf_filter.h``)
loaded with ctypes; every native failure becomes a :class:`KernelError` here, the one boundary.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from . import reference
from .errors import KernelError, NamedLibraryError, UsageError
from . import nativebuild
from .buildflags import CPU_FLAGS, CUDA_FLAGS  # shared with setup.py
# names the loader looks up at call time (so tests can replace them here)
from .nativebuild import cache_dir, find_nvcc  # noqa: F401 - re-exported
from .reference import IntNetwork

log = logging.getLogger(__name__)

KERNEL_NAMES = ("cuda", "cpu", "reference")
ABI_VERSION = 1

# constants of nlf_filter.h the loader uses
_ERR_UNSUPPORTED = -8
_MEMORY_DEVICE = 1

_ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512"}
_RQ_NAMES = {0: "general", 1: "high", 2: "fold"}  # NLF_RQ_* of nlf_filter.h
ISA_AUTO = -1
CPU_ISAS = ("scalar", "avx2", "avx512")



class Kernel(Protocol):
    """A filter implementation: ``filter_planes`` returns what the reference returns."""

    name: str

    def filter_planes(self, planes: Sequence[np.ndarray], net: IntNetwork, bitdepth: int) -> list[np.ndarray]:
        ...


# --------------------------------------------------------------------------------- C structures
class _Layer(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("cin", ctypes.c_int32),
        ("cout", ctypes.c_int32),
        ("relu", ctypes.c_int32),
        ("weight", ctypes.c_void_p),
        ("mult", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("shift", ctypes.c_void_p),
    ]


class _Network(ctypes.Structure):
    _fields_ = [
        ("planes", ctypes.c_int32),
        ("ph", ctypes.c_int32),
        ("pw", ctypes.c_int32),
        ("nlayers", ctypes.c_int32),
        ("layers", ctypes.POINTER(_Layer)),
    ]


class _Planes(ctypes.Structure):
    _fields_ = [
        ("height", ctypes.c_int32),
        ("width", ctypes.c_int32),
        ("bitdepth", ctypes.c_int32),
        ("sample_bytes", ctypes.c_int32),
        ("memory", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("src", ctypes.c_void_p * 2),
        ("dst", ctypes.c_void_p * 2),
        ("src_stride", ctypes.c_ssize_t * 2),
        ("dst_stride", ctypes.c_ssize_t * 2),
    ]


@dataclass(frozen=True, eq=False)
class _NativeNet:
    """An IntNetwork as C structures, with the numpy arrays they point into kept alive. Cached per
    network object (IntNetwork is frozen; its arrays are treated as immutable)."""

    struct: _Network
    keep: tuple[object, ...]


_native_nets: "weakref.WeakKeyDictionary[IntNetwork, _NativeNet]" = weakref.WeakKeyDictionary()
_native_lock = threading.Lock()


def _native_net(net: IntNetwork) -> _NativeNet:
    with _native_lock:
        cached = _native_nets.get(net)
        if cached is not None:
            return cached
    keep: list[object] = []
    layers = (_Layer * len(net.layers))()
    for i, layer in enumerate(net.layers):
        if layer.kind not in ("pw", "dw"):
            raise KernelError(f"layer {i + 1}: unknown kind {layer.kind!r}")
        arrays = []
        for arr, dtype in ((layer.weight, np.int32), (layer.mult, np.int64), (layer.bias, np.int64),
                           (layer.shift, np.int64)):
            a = np.asarray(arr)
            if a.dtype.kind not in "iu":
                raise KernelError(f"layer {i + 1}: integer arrays expected, got {a.dtype}")
            c = np.ascontiguousarray(a, dtype=dtype)
            if not np.array_equal(c, a):
                raise KernelError(f"layer {i + 1}: values do not fit {np.dtype(dtype).name}")
            keep.append(c)
            arrays.append(c)
        w, m, b, s = arrays
        expected = (layer.cout, layer.cin) if layer.kind == "pw" else (layer.cout, 3, 3)
        if w.shape != expected or m.shape != b.shape or m.shape != s.shape or m.shape != (layer.cout,):
            raise KernelError(f"layer {i + 1}: inconsistent array shapes")
        layers[i] = _Layer(0 if layer.kind == "pw" else 1, layer.cin, layer.cout, int(bool(layer.relu)),
                           w.ctypes.data, m.ctypes.data, b.ctypes.data, s.ctypes.data)
    keep.append(layers)
    struct = _Network(net.group.planes, net.packing.ph, net.packing.pw, len(net.layers),
                      ctypes.cast(layers, ctypes.POINTER(_Layer)))
    native = _NativeNet(struct, tuple(keep))
    with _native_lock:
        _native_nets[net] = native
    return native


def _check_planes(planes: Sequence[np.ndarray], net: IntNetwork, bitdepth: int) -> list[np.ndarray]:
    """The argument checks every kernel shares (raises UsageError, a ValueError)."""
    if len(planes) != net.group.planes:
        raise UsageError(f"{net.group.name} network takes {net.group.planes} planes, got {len(planes)}")
    if not 8 <= int(bitdepth) <= 16:
        raise UsageError(f"bit depth must be in 8..16, got {bitdepth}")
    arrs = [np.asarray(p) for p in planes]
    shape = arrs[0].shape
    dtype = arrs[0].dtype
    for a in arrs:
        if a.ndim != 2 or a.shape != shape or a.shape[0] < 1 or a.shape[1] < 1:
            raise UsageError(f"planes must be non-empty 2-D arrays of one shape, got {[x.shape for x in arrs]}")
        if a.dtype != dtype or a.dtype not in (np.uint8, np.uint16):
            raise UsageError(f"planes must all be uint8 or all uint16, got {[x.dtype.name for x in arrs]}")
    if dtype == np.uint8 and bitdepth != 8:
        raise UsageError(f"uint8 planes need bit depth 8, got {bitdepth}")
    return arrs


def _row_view(a: np.ndarray) -> np.ndarray:
    """``a`` itself if its rows are unit-stride with an element-aligned row stride, else a copy."""
    item = a.itemsize
    if a.strides[1] == item and a.strides[0] % item == 0 and a.strides[0] >= a.shape[1] * item:
        return a
    return np.ascontiguousarray(a)


def _fill_planes(arrs: Sequence[np.ndarray], outs: Sequence[np.ndarray], bitdepth: int, memory: int = 0) -> _Planes:
    pl = _Planes()
    pl.height, pl.width = arrs[0].shape
    pl.bitdepth = int(bitdepth)
    pl.sample_bytes = arrs[0].itemsize
    pl.memory = memory
    for g, (a, o) in enumerate(zip(arrs, outs)):
        pl.src[g] = a.ctypes.data
        pl.dst[g] = o.ctypes.data
        pl.src_stride[g] = a.strides[0] // a.itemsize
        pl.dst_stride[g] = o.strides[0] // o.itemsize
    return pl


# ---------------------------------------------------------------------------------- the kernels
class ReferenceKernel:
    """The numpy definition (reference.filter_planes)."""

    name = "reference"

    def filter_planes(self, planes: Sequence[np.ndarray], net: IntNetwork, bitdepth: int) -> list[np.ndarray]:
        arrs = _check_planes(planes, net, bitdepth)
        return reference.filter_planes(arrs, net, bitdepth)

    def __repr__(self) -> str:
        return "ReferenceKernel()"


def _bind_common(lib: ctypes.CDLL) -> None:
    lib.nlf_abi_version.restype = ctypes.c_int32
    lib.nlf_abi_version.argtypes = []
    lib.nlf_strerror.restype = ctypes.c_char_p
    lib.nlf_strerror.argtypes = [ctypes.c_int32]
    lib.nlf_last_error.restype = ctypes.c_char_p
    lib.nlf_last_error.argtypes = []
    version = lib.nlf_abi_version()
    if version != ABI_VERSION:
        raise KernelError(f"kernel library has ABI version {version}, expected {ABI_VERSION}")


def _native_error(lib: ctypes.CDLL, name: str, rc: int) -> KernelError:
    what = lib.nlf_strerror(rc).decode(errors="replace")
    detail = lib.nlf_last_error().decode(errors="replace")
    return KernelError(f"{name} kernel failed ({rc}: {what})" + (f": {detail}" if detail else ""))


class CpuKernel:
    """The C++ kernel (filter_cpu.cpp) through its C ABI."""

    name = "cpu"

    def __init__(self, lib: ctypes.CDLL, path: Path, threads: int | None = None, isa: int = ISA_AUTO) -> None:
        self._lib = lib
        self.path = path
        self.threads = 0 if threads is None else int(threads)
        if self.threads < 0:
            raise UsageError(f"threads must be >= 1, got {threads}")
        if isa != ISA_AUTO and not lib.nlf_cpu_isa_supported(isa):
            raise KernelError(f"instruction set {_ISA_NAMES.get(isa, isa)} is not available on this CPU")
        self.isa = lib.nlf_cpu_best_isa() if isa == ISA_AUTO else isa

    @property
    def isa_name(self) -> str:
        return _ISA_NAMES.get(self.isa, str(self.isa))

    def filter_planes(self, planes: Sequence[np.ndarray], net: IntNetwork, bitdepth: int) -> list[np.ndarray]:
        arrs = [_row_view(a) for a in _check_planes(planes, net, bitdepth)]
        outs = [np.empty(a.shape, dtype=a.dtype) for a in arrs]
        native = _native_net(net)
        pl = _fill_planes(arrs, outs, bitdepth)
        rc = self._lib.nlf_cpu_filter(ctypes.byref(native.struct), ctypes.byref(pl), self.threads, self.isa)
        if rc != 0:
            raise _native_error(self._lib, self.name, rc)
        return outs

    def requant_forms(self, net: IntNetwork, bitdepth: int) -> list[str]:
        """Per layer, the requantisation form the SIMD code paths use (``fold``, ``high`` or ``general``,
        cheapest first; see filter_cpu.cpp). A diagnostic: the output is the same whichever applies."""
        native = _native_net(net)
        forms = (ctypes.c_int32 * len(net.layers))()
        rc = self._lib.nlf_cpu_requant_forms(ctypes.byref(native.struct), bitdepth, forms, len(net.layers))
        if rc != 0:
            raise _native_error(self._lib, self.name, rc)
        return [_RQ_NAMES.get(f, str(f)) for f in forms]

    def __repr__(self) -> str:
        return f"CpuKernel(isa={self.isa_name}, threads={self.threads or 'all'}, path={str(self.path)!r})"


_TORCH_DTYPES = {"torch.uint8": np.dtype(np.uint8), "torch.uint16": np.dtype(np.uint16)}
_torch_dtype_cache: dict[object, np.dtype | None] = {}  # torch dtype object -> numpy dtype (None: refused)
_SAMPLE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))

# one GPU plane as CudaKernel.filter_device reads it:
# (pointer, height, width, dtype, row stride in samples, PyTorch device index or None, CAI stream or None)
_GpuPlane = tuple[int, int, int, np.dtype, int, "int | None", "int | None"]


def _plane_name(output: bool, g: int) -> str:
    return f"{'output' if output else 'input'} plane {g}"


def _gpu_plane(a: object, output: bool, g: int) -> _GpuPlane:
    """Check one plane of :meth:`CudaKernel.filter_device` and read what the C call needs. PyTorch
    tensors are read directly: building their ``__cuda_array_interface__`` costs more than the kernel
    launch for small pictures."""
    t: Any = a
    if getattr(t, "is_cuda", False) and type(t).__module__.startswith("torch"):
        dtype = _torch_dtype_cache.get(t.dtype, False)
        if dtype is False:
            dtype = _torch_dtype_cache.setdefault(t.dtype, _TORCH_DTYPES.get(str(t.dtype)))
        if t.dim() != 2 or dtype is None:
            raise UsageError(f"{_plane_name(output, g)}: a 2-D uint8/uint16 array expected, "
                             f"got shape {tuple(t.shape)} {t.dtype}")
        (h, w), (s0, s1) = t.shape, t.stride()
        if s1 != 1:
            raise UsageError(f"{_plane_name(output, g)}: rows must be contiguous "
                             f"(strides {tuple(t.stride())} in samples)")
        if output and t.requires_grad:
            raise UsageError(f"{_plane_name(output, g)}: a tensor that requires grad cannot be written")
        return int(t.data_ptr()), int(h), int(w), dtype, int(s0), int(t.get_device()), None
    try:
        cai = t.__cuda_array_interface__
    except AttributeError:
        raise UsageError(f"{_plane_name(output, g)}: a GPU array (__cuda_array_interface__) expected, "
                         f"got {type(a).__name__}") from None
    shape, dtype = tuple(cai["shape"]), np.dtype(cai["typestr"])
    if len(shape) != 2 or dtype not in _SAMPLE_DTYPES:
        raise UsageError(f"{_plane_name(output, g)}: a 2-D uint8/uint16 array expected, got shape {shape} {dtype}")
    strides = cai.get("strides") or (shape[1] * dtype.itemsize, dtype.itemsize)
    if strides[1] != dtype.itemsize or strides[0] % dtype.itemsize:
        raise UsageError(f"{_plane_name(output, g)}: rows must be contiguous (strides {strides})")
    ptr, readonly = int(cai["data"][0]), bool(cai["data"][1])
    if output and readonly:
        raise UsageError(f"{_plane_name(output, g)}: read-only")
    return ptr, int(shape[0]), int(shape[1]), dtype, int(strides[0]) // dtype.itemsize, None, cai.get("stream")


def _stream_handle(stream: object, torch_device: int | None, cai_stream: int | None) -> int:
    """The cudaStream_t (as an int; 0 the legacy default stream) for :meth:`CudaKernel.filter_device`."""
    if torch_device is not None:
        import torch  # a CUDA tensor was passed: torch is loaded

        if torch_device != torch.cuda.current_device():
            raise UsageError(f"the planes are on CUDA device {torch_device}, the current device is "
                             f"{torch.cuda.current_device()} (use torch.cuda.device({torch_device}))")
        if stream is None:
            raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
            return int(raw(torch_device)) if raw else int(torch.cuda.current_stream(torch_device).cuda_stream)
    if stream is None:
        return int(cai_stream or 0)
    for attr in ("cuda_stream", "ptr"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    if isinstance(stream, int) and stream >= 0:
        return stream
    raise UsageError(f"stream: a cudaStream_t handle (int), torch.cuda.Stream or cupy.cuda.Stream expected, "
                     f"got {type(stream).__name__}")


class CudaKernel:
    """The CUDA kernel (filter_cuda.cu): host arrays in and out, one launch per plane group.

    A valid network the CUDA kernel cannot run (more than 32 channels per layer, or more shared memory
    than the device has) is filtered by the C++ kernel instead (or the reference), with a warning."""

    name = "cuda"

    def __init__(self, lib: ctypes.CDLL, path: Path, threads: int | None = None) -> None:
        self._lib = lib
        self.path = path
        self._threads = threads
        self._fallback: Kernel | None = None

    def filter_planes(self, planes: Sequence[np.ndarray], net: IntNetwork, bitdepth: int) -> list[np.ndarray]:
        arrs = [_row_view(a) for a in _check_planes(planes, net, bitdepth)]
        outs = [np.empty(a.shape, dtype=a.dtype) for a in arrs]
        native = _native_net(net)
        pl = _fill_planes(arrs, outs, bitdepth)
        rc = self._lib.nlf_cuda_filter(ctypes.byref(native.struct), ctypes.byref(pl))
        if rc == _ERR_UNSUPPORTED:
            if self._fallback is None:
                try:
                    self._fallback = _cpu_kernel(self._threads)
                except KernelError:
                    self._fallback = ReferenceKernel()
            log.warning("CUDA kernel cannot run this network (%s); using the %s kernel for it",
                        self._lib.nlf_last_error().decode(errors="replace"), self._fallback.name)
            return self._fallback.filter_planes(arrs, net, bitdepth)
        if rc != 0:
            raise _native_error(self._lib, self.name, rc)
        return outs

    def filter_device(self, planes: Sequence[object], outs: Sequence[object], net: IntNetwork, bitdepth: int,
                      *, stream: object = None) -> None:
        """Filter planes that are already on the GPU into ``outs`` (no host copies): any objects with
        ``__cuda_array_interface__`` (CuPy arrays, PyTorch CUDA tensors), 2-D, uint8 (8-bit) or uint16,
        row-contiguous, all of one shape, on the current CUDA device. Raises KernelError where the C++
        path would fall back.

        The work is ordered on ``stream``: a ``cudaStream_t`` handle (int), or an object with
        ``cuda_stream`` (``torch.cuda.Stream``) or ``ptr`` (``cupy.cuda.Stream``). By default it is
        PyTorch's current stream for tensors, else the stream the input's ``__cuda_array_interface__``
        names, else the legacy default stream. Like a kernel launch, the call is asynchronous where
        nothing has to be checked after the kernel: with the fast kernel (the networks the encoder
        signals) on 8-bit samples it returns once the work is queued, and ``outs`` are ready for the
        next work on that stream or after a synchronisation. Calls on samples of more than 8 bits (the
        kernel reports samples outside the bit depth, raised here as KernelError) and calls that take
        the generic kernel wait for the kernel. As with any queued work, the arrays must outlive it: on a
        stream other than the one a PyTorch tensor was allocated on, ``tensor.record_stream(s)``."""
        n = net.group.planes
        if len(planes) != n or len(outs) != n:
            raise UsageError(f"the network filters {n} plane(s); got {len(planes)} in, {len(outs)} out")
        views = [_gpu_plane(a, False, g) for g, a in enumerate(planes)]
        views += [_gpu_plane(a, True, g) for g, a in enumerate(outs)]
        _, h, w, dtype, _, torch_device, cai_stream = views[0]
        if any(v[1:4] != (h, w, dtype) for v in views):
            raise UsageError("all planes (in and out) must have one shape and sample type")
        if (dtype == np.uint8) != (bitdepth == 8):
            raise UsageError(f"bit depth {bitdepth} needs {'uint8' if bitdepth == 8 else 'uint16'} samples")
        handle = _stream_handle(stream, torch_device, cai_stream)
        pl = _Planes()
        pl.height, pl.width = h, w
        pl.bitdepth, pl.sample_bytes, pl.memory = int(bitdepth), dtype.itemsize, _MEMORY_DEVICE
        for g in range(n):
            pl.src[g], pl.src_stride[g] = views[g][0], views[g][4]
            pl.dst[g], pl.dst_stride[g] = views[n + g][0], views[n + g][4]
        rc = self._lib.nlf_cuda_filter_stream(ctypes.byref(_native_net(net).struct), ctypes.byref(pl), handle)
        if rc != 0:
            raise _native_error(self._lib, self.name, rc)

    def __repr__(self) -> str:
        return f"CudaKernel(path={str(self.path)!r})"


# ------------------------------------------------------------------------------ locating / building
def kernel_sources() -> Path | None:
    """The directory holding ``filter_cpu.cpp``, ``filter_cuda.cu`` and their headers (see
    :func:`hevc_ext.nativebuild.sources_dir`)."""
    return nativebuild.sources_dir(tuple(dict.fromkeys(_CPU.sources + _CUDA.sources)))


def _bind_cpu(lib: ctypes.CDLL) -> None:
    _bind_common(lib)
    lib.nlf_cpu_best_isa.restype = ctypes.c_int32
    lib.nlf_cpu_best_isa.argtypes = []
    lib.nlf_cpu_isa_supported.restype = ctypes.c_int32
    lib.nlf_cpu_isa_supported.argtypes = [ctypes.c_int32]
    lib.nlf_cpu_filter.restype = ctypes.c_int32
    lib.nlf_cpu_filter.argtypes = [ctypes.POINTER(_Network), ctypes.POINTER(_Planes), ctypes.c_int32, ctypes.c_int32]
    lib.nlf_cpu_requant_forms.restype = ctypes.c_int32
    lib.nlf_cpu_requant_forms.argtypes = [ctypes.POINTER(_Network), ctypes.c_int32,
                                          ctypes.POINTER(ctypes.c_int32), ctypes.c_int32]


def _bind_cuda(lib: ctypes.CDLL) -> None:
    _bind_common(lib)
    lib.nlf_cuda_device_count.restype = ctypes.c_int32
    lib.nlf_cuda_device_count.argtypes = []
    for fn in (lib.nlf_cuda_filter, lib.nlf_cuda_check_host, lib.nlf_cuda_kernel_path):
        fn.restype = ctypes.c_int32
        fn.argtypes = [ctypes.POINTER(_Network), ctypes.POINTER(_Planes)]
    lib.nlf_cuda_filter_stream.restype = ctypes.c_int32
    lib.nlf_cuda_filter_stream.argtypes = [ctypes.POINTER(_Network), ctypes.POINTER(_Planes), ctypes.c_void_p]


_CPU = nativebuild.NativeLibrary(
    what="C++ kernel", stem="_nlf_cpu", env_var="HEVC_NLF_CPU_LIB",
    sources=("filter_cpu.cpp", "nlf_filter.h", "nlf_network_check.h", "nlf_cpu_features.h"), bind=_bind_cpu,
    compiler_name="C++ compiler", compiler_hint="set $CXX or install g++ / clang++")
_CUDA = nativebuild.NativeLibrary(
    what="CUDA kernel", stem="_nlf_cuda", env_var="HEVC_NLF_CUDA_LIB",
    sources=("filter_cuda.cu", "nlf_filter.h", "nlf_network_check.h"), bind=_bind_cuda,
    compiler_name="nvcc", compiler_hint="looked on PATH, in $CUDA_HOME, $CUDA_PATH and /usr/local/cuda",
    build_note="a minute or more, once per kernel source and nvcc version", build_level=logging.WARNING)

_cpu_lib = nativebuild.LazyLibrary(lambda: nativebuild.load_native(_CPU, nativebuild.find_cxx(), CPU_FLAGS), "C++ kernel")
_cuda_lib = nativebuild.LazyLibrary(lambda: nativebuild.load_native(_CUDA, find_nvcc(), CUDA_FLAGS), "CUDA kernel")


def _cpu_library() -> tuple[ctypes.CDLL, Path]:
    """The loaded CPU library (prebuilt by pip install, else built at first use); KernelError if none."""
    return _cpu_lib.get()


def _cuda_library() -> tuple[ctypes.CDLL, Path]:
    """The loaded CUDA library (prebuilt, cached or built now with nvcc); KernelError if none.
    Does not look for a device: see :func:`_cuda_kernel`."""
    return _cuda_lib.get()


def _cuda_driver() -> ctypes.CDLL | None:
    """The NVIDIA driver's library (libcuda), or None where no driver is installed."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def cuda_driver_device_count() -> int:
    """CUDA devices the NVIDIA driver reports, asked through libcuda directly (nothing is built);
    0 without a driver. For cheap checks such as skipping GPU tests."""
    drv = _cuda_driver()
    if drv is None:
        return 0
    try:
        if drv.cuInit(0) != 0:
            return 0
        n = ctypes.c_int(0)
        if drv.cuDeviceGetCount(ctypes.byref(n)) != 0:
            return 0
        return int(n.value)
    except AttributeError:
        return 0


def cuda_check_host(planes: Sequence[np.ndarray], net: IntNetwork, bitdepth: int) -> list[np.ndarray]:
    """Run the CUDA kernel's segment code on the host, block by block and thread by thread (slow; no GPU
    needed, but nvcc is). A test hook that checks the CUDA kernel's tiling and indexing on any machine."""
    lib, _ = _cuda_library()
    arrs = [_row_view(a) for a in _check_planes(planes, net, bitdepth)]
    outs = [np.empty(a.shape, dtype=a.dtype) for a in arrs]
    pl = _fill_planes(arrs, outs, bitdepth)
    rc = lib.nlf_cuda_check_host(ctypes.byref(_native_net(net).struct), ctypes.byref(pl))
    if rc != 0:
        raise _native_error(lib, "cuda (host check)", rc)
    return outs


def cuda_kernel_path(net: IntNetwork, bitdepth: int) -> str:
    """Which CUDA kernel filters ``net`` at ``bitdepth``: ``"fast"`` (the paper's pw·dw·pw·dw·pw shape with
    at most 16 hidden channels, int8 weights and every requantisation exact in 32 bits — what the encoder
    signals) or ``"generic"`` (any valid network). Needs the CUDA library (nvcc), not a device.
    ``HEVC_NLF_CUDA_GENERIC=1`` in the environment forces the generic kernel."""
    lib, _ = _cuda_library()
    pl = _Planes()
    pl.height = pl.width = 1
    pl.bitdepth, pl.sample_bytes = int(bitdepth), 1 if bitdepth == 8 else 2
    rc = lib.nlf_cuda_kernel_path(ctypes.byref(_native_net(net).struct), ctypes.byref(pl))
    if rc < 0:
        raise _native_error(lib, "cuda", rc)
    return "fast" if rc == 1 else "generic"


def cuda_device_count() -> int:
    """CUDA devices the CUDA kernel could use (0 when it is not built or there is none)."""
    try:
        lib, _ = _cuda_library()
    except KernelError:
        return 0
    n = int(lib.nlf_cuda_device_count())
    return max(n, 0)


def _cuda_kernel(threads: int | None = None) -> CudaKernel:
    lib, path = _cuda_library()
    n = int(lib.nlf_cuda_device_count())
    if n <= 0:
        detail = lib.nlf_last_error().decode(errors="replace")
        if _cuda_driver() is None:  # the runtime calls that "driver version is insufficient"
            detail = "no NVIDIA driver (libcuda) is installed on this machine"
        raise KernelError("CUDA kernel built but not usable: no CUDA device" + (f" ({detail})" if detail else ""))
    return CudaKernel(lib, path, threads)


def _cpu_kernel(threads: int | None, isa: int = ISA_AUTO) -> CpuKernel:
    lib, path = _cpu_library()
    return CpuKernel(lib, path, threads, isa)


def cpu_kernel(threads: int | None = None, isa: str = "auto") -> CpuKernel:
    """The C++ kernel with a chosen code path ("auto", "scalar", "avx2", "avx512"); KernelError if the
    library or that instruction set is unavailable (for tests and benchmarks)."""
    if isa == "auto":
        return _cpu_kernel(threads)
    if isa not in CPU_ISAS:
        raise UsageError(f"unknown instruction set {isa!r}: expected auto, {', '.join(CPU_ISAS)}")
    return _cpu_kernel(threads, CPU_ISAS.index(isa))


def cpu_isas() -> list[str]:
    """The CPU code paths this machine can run (empty if the C++ kernel is unavailable)."""
    try:
        lib, _ = _cpu_library()
    except KernelError:
        return []
    return [name for i, name in enumerate(CPU_ISAS) if lib.nlf_cpu_isa_supported(i)]


def get_kernel(name: str = "auto", threads: int | None = None) -> Kernel:
    """The kernel called ``name`` ("cuda", "cpu", "reference"), or for "auto" the first available of
    CUDA → C++ → reference. ``threads``: CPU threads (None: all). Raises KernelError when an explicitly
    named kernel is unavailable, UsageError for an unknown name."""
    if threads is not None and int(threads) < 1:
        raise UsageError(f"threads must be >= 1, got {threads}")
    if name == "reference":
        return ReferenceKernel()
    if name == "cpu":
        return _cpu_kernel(threads)
    if name == "cuda":
        return _cuda_kernel(threads)
    if name != "auto":
        raise UsageError(f"unknown kernel {name!r}: expected auto, {', '.join(KERNEL_NAMES)}")
    devices = cuda_driver_device_count()
    if devices:
        try:
            return _cuda_kernel(threads)
        except NamedLibraryError:
            raise
        except KernelError as exc:
            log.info("kernel auto: not cuda: %s", exc)
    else:
        # Using CUDA needs a device; without one, nothing is built at run time (the library itself is
        # built by pip install wherever nvcc exists, GPU or not).
        log.info("kernel auto: not cuda: the CUDA driver reports no device")
    try:
        return _cpu_kernel(threads)
    except NamedLibraryError:
        raise  # the user's choice of library: never replaced by another
    except KernelError as exc:
        log.warning("kernel auto: not cpu: %s; using the numpy reference (slow)", exc)
    return ReferenceKernel()


def kernel_report() -> dict[str, object]:
    """For ``hevc-nlf info``: each kernel's availability and why, and which one ``auto`` picks."""
    kernels: dict[str, dict[str, object]] = {}
    prebuilt = nativebuild.prebuilt_library(_CUDA.stem, _CUDA.env_var)
    if cuda_driver_device_count() == 0:
        named = "named by $" + _CUDA.env_var if os.environ.get(_CUDA.env_var) else "built at install"
        built = f"{named}: {prebuilt}" if prebuilt else (
            f"nvcc {find_nvcc()} present: built at install or on first use with a GPU" if find_nvcc()
            else "nvcc not found: not built")
        kernels["cuda"] = {"available": False, "reason": f"no CUDA device (driver reports none); {built}"}
        if prebuilt:
            kernels["cuda"]["path"] = str(prebuilt)
    else:
        try:
            k = _cuda_kernel()
            kernels["cuda"] = {"available": True, "reason": f"{cuda_device_count()} CUDA device(s)",
                               "path": str(k.path)}
        except KernelError as exc:
            entry: dict[str, object] = {"available": False, "reason": str(exc)}
            if _cuda_lib.loaded_path is not None:
                entry["path"] = str(_cuda_lib.loaded_path)
            kernels["cuda"] = entry
    try:
        c = _cpu_kernel(None)
        kernels["cpu"] = {"available": True, "reason": f"{c.isa_name} code path", "isa": c.isa_name,
                          "path": str(c.path)}
    except KernelError as exc:
        kernels["cpu"] = {"available": False, "reason": str(exc)}
    kernels["reference"] = {"available": True, "reason": "numpy definition (always available)"}
    active = next(n for n in KERNEL_NAMES if kernels[n]["available"])
    return {"active": active, "kernels": kernels, "cache": str(cache_dir()), "nvcc": find_nvcc()}


def _reset_for_tests() -> None:
    """Forget loaded libraries so that the next call locates them again (tests only)."""
    _cpu_lib.reset()
    _cuda_lib.reset()


__all__ = ["Kernel", "ReferenceKernel", "CpuKernel", "CudaKernel", "get_kernel", "kernel_report", "cache_dir",
           "find_nvcc", "kernel_sources", "cuda_device_count", "cuda_driver_device_count", "cuda_check_host",
           "cpu_kernel", "cpu_isas", "KERNEL_NAMES", "CPU_ISAS"]
