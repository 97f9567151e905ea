"""The C++ training engine: forward + backward of one :class:`~hevc_ext.model.NlfNet` step on the CPU.

``kernels/train_cpu.cpp`` (C ABI ``kernels/nlf_train.h``) computes what one PyTorch training step
computes — ``loss = mse(unpack(net(pack(x)))[..., :h, :w], target)``, ``loss.backward()`` with the
network in training mode, batch norm folded into the convolutions with batch statistics, and the
running-statistics update — about an order of magnitude faster than PyTorch on the CPU for these
small channel counts. Gradients are written into each parameter's ``.grad`` (overwritten).

The library is the one ``pip install`` built (``hevc_ext/_nlf_train*.so``), or the one named by
``$HEVC_NLF_TRAIN_LIB``, else it is compiled at first use with the system C++ compiler into the
kernel cache (``$HEVC_NLF_CACHE`` or ``~/.cache/hevc-nlf/``): the policy of
:func:`hevc_ext.nativebuild.load_native`, shared with the filter kernels. Every failure is a
:class:`~hevc_ext.errors.KernelError`; :func:`available` says whether the engine can be used and why not.
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref
from pathlib import Path

import numpy as np
import torch

from . import nativebuild
from .errors import KernelError, NamedLibraryError, UsageError
from .buildflags import TRAIN_FLAGS  # shared with setup.py

log = logging.getLogger(__name__)

ABI_VERSION = 1
ENGINE_NAMES = ("auto", "torch", "cpu")
ISA_AUTO = -1
ISA_NAMES = {0: "generic", 1: "avx2", 2: "avx512"}
_SOURCES = ("train_cpu.cpp", "nlf_train.h", "nlf_cpu_features.h")

# --------------------------------------------------------------------------------- C structures
class _Layer(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("cin", ctypes.c_int32),
        ("cout", ctypes.c_int32),
        ("relu", ctypes.c_int32),
        ("weight", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("gamma", ctypes.c_void_p),
        ("beta", ctypes.c_void_p),
        ("running_mean", ctypes.c_void_p),
        ("running_var", ctypes.c_void_p),
        ("eps", ctypes.c_double),
        ("momentum", ctypes.c_double),
        ("grad_weight", ctypes.c_void_p),
        ("grad_bias", ctypes.c_void_p),
        ("grad_gamma", ctypes.c_void_p),
        ("grad_beta", ctypes.c_void_p),
    ]


class _Network(ctypes.Structure):
    _fields_ = [
        ("planes", ctypes.c_int32),
        ("ph", ctypes.c_int32),
        ("pw", ctypes.c_int32),
        ("nlayers", ctypes.c_int32),
        ("layers", ctypes.POINTER(_Layer)),
    ]


class _Batch(ctypes.Structure):
    _fields_ = [
        ("n", ctypes.c_int32),
        ("height", ctypes.c_int32),
        ("width", ctypes.c_int32),
        ("crop_h", ctypes.c_int32),
        ("crop_w", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("x", ctypes.c_void_p),
        ("target", ctypes.c_void_p),
    ]


def _bind(lib: ctypes.CDLL) -> None:
    lib.nlft_abi_version.restype = ctypes.c_int32
    lib.nlft_abi_version.argtypes = []
    version = lib.nlft_abi_version()
    if version != ABI_VERSION:
        raise KernelError(f"training library has ABI version {version}, expected {ABI_VERSION}")
    lib.nlft_last_error.restype = ctypes.c_char_p
    lib.nlft_last_error.argtypes = []
    lib.nlft_best_isa.restype = ctypes.c_int32
    lib.nlft_best_isa.argtypes = []
    lib.nlft_isa_supported.restype = ctypes.c_int32
    lib.nlft_isa_supported.argtypes = [ctypes.c_int32]
    lib.nlft_create.restype = ctypes.c_void_p
    lib.nlft_create.argtypes = [ctypes.c_int32, ctypes.c_int32]
    lib.nlft_destroy.restype = None
    lib.nlft_destroy.argtypes = [ctypes.c_void_p]
    lib.nlft_engine_threads.restype = ctypes.c_int32
    lib.nlft_engine_threads.argtypes = [ctypes.c_void_p]
    lib.nlft_engine_isa.restype = ctypes.c_int32
    lib.nlft_engine_isa.argtypes = [ctypes.c_void_p]
    lib.nlft_step.restype = ctypes.c_int32
    lib.nlft_step.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Network), ctypes.POINTER(_Batch), ctypes.c_int32,
                              ctypes.POINTER(ctypes.c_double)]


_ENGINE = nativebuild.NativeLibrary(
    what="C++ training engine", stem="_nlf_train", env_var="HEVC_NLF_TRAIN_LIB", sources=_SOURCES, bind=_bind,
    compiler_name="C++ compiler", compiler_hint="set $CXX or install g++ / clang++")
_engine_lib = nativebuild.LazyLibrary(lambda: nativebuild.load_native(_ENGINE, nativebuild.find_cxx(), TRAIN_FLAGS),
                                      "C++ training engine")


def _library() -> tuple[ctypes.CDLL, Path]:
    return _engine_lib.get()


def available() -> tuple[bool, str]:
    """Whether the C++ engine can be used here (building it now if needed), and why (not)."""
    try:
        lib, path = _library()
    except KernelError as exc:
        return False, str(exc)
    return True, f"{ISA_NAMES.get(lib.nlft_best_isa(), '?')} code path, {path}"


def _reset_for_tests() -> None:
    _engine_lib.reset()


# ---------------------------------------------------------------------------------------- engine
def _ptr(t: torch.Tensor | None, what: str) -> int | None:
    if t is None:
        return None
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise KernelError(f"{what}: the training engine needs contiguous float32 CPU tensors "
                          f"(got {t.dtype} on {t.device}, contiguous={t.is_contiguous()})")
    return t.data_ptr()


def _grad(p: torch.Tensor) -> torch.Tensor:
    """``p.grad``, allocated (zeros) when missing or unusable; the engine overwrites it."""
    g = p.grad
    if g is None or g.shape != p.shape or g.dtype != torch.float32 or not g.is_contiguous() or g.device.type != "cpu":
        p.grad = g = torch.zeros_like(p, memory_format=torch.contiguous_format)
    return g


class TrainEngine:
    """Forward + backward of ``net`` (an :class:`~hevc_ext.model.NlfNet`) in C++.

    ``forward_backward(x, target)`` reads the current parameters, returns the MSE loss, writes every
    parameter's gradient into ``.grad`` and updates the batch-norm running statistics, exactly as
    ``loss = F.mse_loss(unpack(net(pack(x)))[..., :h, :w], target); loss.backward()`` does in
    training mode. ``threads``: CPU threads (None: all available to this process)."""

    def __init__(self, net: "torch.nn.Module", threads: int | None = None, isa: int = ISA_AUTO) -> None:
        from .model import NlfNet

        if not isinstance(net, NlfNet):
            raise UsageError(f"TrainEngine needs an NlfNet, got {type(net).__name__}")
        if threads is None:
            try:
                threads = len(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                threads = os.cpu_count() or 1
        threads = int(threads)
        if threads < 1:
            raise UsageError(f"threads must be >= 1, got {threads}")
        self._lib, self.path = _library()
        if isa != ISA_AUTO and not self._lib.nlft_isa_supported(isa):
            raise KernelError(f"instruction set {ISA_NAMES.get(isa, isa)} is not available on this CPU")
        handle = self._lib.nlft_create(threads, isa)
        if not handle:
            raise KernelError("cannot create the training engine: " + self._error())
        self._handle = ctypes.c_void_p(handle)
        self._finalizer = weakref.finalize(self, self._lib.nlft_destroy, self._handle)
        self.net = net
        self.threads = int(self._lib.nlft_engine_threads(self._handle))
        self.isa = int(self._lib.nlft_engine_isa(self._handle))
        self._check_structure()
        n = len(net.layers)
        self._layers = (_Layer * n)()
        self._cnet = _Network(net.group.planes, net.packing.ph, net.packing.pw, n, self._layers)
        self._batch = _Batch()
        self._loss = ctypes.c_double(0.0)

    @property
    def isa_name(self) -> str:
        return ISA_NAMES.get(self.isa, str(self.isa))

    def _error(self) -> str:
        return self._lib.nlft_last_error().decode(errors="replace")

    def _check_structure(self) -> None:
        layers = list(self.net.layers)
        c0 = self.net.group.planes * self.net.packing.size
        cin = c0
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            conv = layer.conv
            k = 1 if layer.kind == "pw" else 3
            ok = (layer.kind in ("pw", "dw") and conv.in_channels == cin and conv.kernel_size == (k, k)
                  and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.dilation == (1, 1)
                  and conv.groups == (1 if layer.kind == "pw" else cin)
                  and (layer.kind == "pw" or conv.out_channels == cin)
                  and bool(layer.relu) == (not last) and (layer.bn is None) == (i == 0)
                  and (i > 0 and i < len(layers) - 1 or layer.kind == "pw"))
            if not ok:
                raise KernelError(f"layer {i}: structure not supported by the training engine")
            if layer.bn is not None:
                bn = layer.bn
                if bn.momentum is None or not bn.affine or not bn.track_running_stats or bn.num_features != cin:
                    raise KernelError(f"layer {i}: batch norm configuration not supported by the training engine")
            cin = conv.out_channels
        if cin != c0:
            raise KernelError(f"the last layer has {cin} outputs, expected {c0}")
        for name, t in list(self.net.named_parameters()) + list(self.net.named_buffers()):
            if t.device.type != "cpu" or (t.is_floating_point() and t.dtype != torch.float32):
                raise KernelError(f"{name}: the training engine needs float32 CPU tensors, got {t.dtype} on {t.device}")

    def forward_backward(self, x: np.ndarray, target: np.ndarray) -> float:
        """One training step's forward and backward pass; returns the loss (see the class doc)."""
        net = self.net
        if not net.training:
            raise UsageError("TrainEngine computes training-mode steps: call net.train() first")
        g = net.group.planes
        x = np.ascontiguousarray(x, dtype=np.float32)
        target = np.ascontiguousarray(target, dtype=np.float32)
        if x.ndim != 4 or target.ndim != 4 or x.shape[1] != g or target.shape[1] != g or x.shape[0] != target.shape[0]:
            raise UsageError(f"x and target must be (N, {g}, H, W) and (N, {g}, h, w), got {x.shape} and {target.shape}")
        n, _, hh, ww = x.shape
        th, tw = target.shape[2:]
        if hh % net.packing.ph or ww % net.packing.pw:
            raise UsageError(f"input {hh}x{ww} is not a multiple of the packing {net.packing}")
        if not (1 <= th <= hh and 1 <= tw <= ww) or n < 1:
            raise UsageError(f"target {th}x{tw} does not fit the input {hh}x{ww}")
        for i, layer in enumerate(net.layers):
            conv = layer.conv
            cl = self._layers[i]
            cl.kind = 0 if layer.kind == "pw" else 1
            cl.cin = conv.in_channels
            cl.cout = conv.out_channels
            cl.relu = 1 if layer.relu else 0
            w = conv.weight.detach()
            cl.weight = _ptr(w, f"layer {i} weight")
            cl.grad_weight = _ptr(_grad(conv.weight), f"layer {i} weight gradient")
            if conv.bias is not None:
                cl.bias = _ptr(conv.bias.detach(), f"layer {i} bias")
                cl.grad_bias = _ptr(_grad(conv.bias), f"layer {i} bias gradient")
            else:
                cl.bias = cl.grad_bias = None
            bn = layer.bn
            if bn is not None:
                cl.gamma = _ptr(bn.weight.detach(), f"layer {i} bn.weight")
                cl.beta = _ptr(bn.bias.detach(), f"layer {i} bn.bias")
                cl.running_mean = _ptr(bn.running_mean, f"layer {i} running_mean")
                cl.running_var = _ptr(bn.running_var, f"layer {i} running_var")
                cl.eps = float(bn.eps)
                cl.momentum = float(bn.momentum)
                cl.grad_gamma = _ptr(_grad(bn.weight), f"layer {i} bn.weight gradient")
                cl.grad_beta = _ptr(_grad(bn.bias), f"layer {i} bn.bias gradient")
            else:
                cl.gamma = cl.beta = cl.running_mean = cl.running_var = None
                cl.grad_gamma = cl.grad_beta = None
                cl.eps = cl.momentum = 0.0
        b = self._batch
        b.n, b.height, b.width, b.crop_h, b.crop_w = n, hh, ww, th, tw
        b.x = x.ctypes.data
        b.target = target.ctypes.data
        rc = self._lib.nlft_step(self._handle, ctypes.byref(self._cnet), ctypes.byref(b), 1, ctypes.byref(self._loss))
        if rc != 0:
            raise KernelError(f"training engine failed ({rc}): {self._error()}")
        with torch.no_grad():
            for layer in net.layers:
                if layer.bn is not None and layer.bn.num_batches_tracked is not None:
                    layer.bn.num_batches_tracked += 1
        return float(self._loss.value)

    def close(self) -> None:
        self._finalizer()

    def __repr__(self) -> str:
        return f"TrainEngine(isa={self.isa_name}, threads={self.threads}, path={str(self.path)!r})"


_warned_fallback: list[bool] = []  # the fallback is said once per process, not for every network


def select_engine(name: str, net: "torch.nn.Module", threads: int | None = None) -> TrainEngine | None:
    """The engine a training run uses: ``"torch"`` → None (PyTorch autograd); ``"cpu"`` → the C++
    engine or KernelError; ``"auto"`` → the C++ engine when available, else None (logged)."""
    if name == "torch":
        return None
    if name not in ENGINE_NAMES:
        raise UsageError(f"unknown training engine {name!r}: expected one of {', '.join(ENGINE_NAMES)}")
    try:
        return TrainEngine(net, threads)
    except KernelError as exc:
        if name == "cpu" or isinstance(exc, NamedLibraryError):  # a library the user named is never replaced
            raise
        if not _warned_fallback:
            _warned_fallback.append(True)
            log.warning("training with PyTorch autograd, 10-20x slower than the C++ engine, which is "
                        "unavailable: %s", exc)
        return None


__all__ = ["TrainEngine", "available", "select_engine", "ENGINE_NAMES"]
