"""Build script for the native libraries (metadata lives in pyproject.toml).

``pip install .`` / ``pip install -e .`` compile

* ``kernels/filter_cpu.cpp`` into ``hevc_ext/_nlf_cpu*.so`` — the fused filter kernel (C ABI,
  ``kernels/nlf_filter.h``), loaded by ``hevc_ext.kernels`` with ctypes;
* ``kernels/train_cpu.cpp`` into ``hevc_ext/_nlf_train*.so`` — the training engine (``nlf_train.h``),
  loaded by ``hevc_ext.trainkernel``;
* ``kernels/filter_cuda.cu`` into ``hevc_ext/_nlf_cuda.so`` with nvcc, **whenever nvcc exists** (whether
  or not this machine has a GPU; set ``HEVC_NLF_CUDA=0`` to skip it).

They are plain shared libraries, named like extension modules only so that setuptools puts them inside
the package; they are never imported and have no Python API. If a compiler is missing or a build fails,
the install goes on with a warning and the package falls back (filter: numpy reference; training:
PyTorch autograd; CUDA: built at first use on a machine with a GPU) — ``hevc-nlf info`` says which.

The kernel sources are also copied into the package (``hevc_ext/_kernels_src``) so that an installed
wheel can build the CUDA kernel with nvcc at first use. Listing them as ``depends`` puts them in sdists.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
KERNEL_DIR = "kernels"
KERNEL_FILES = ("filter_cpu.cpp", "filter_cuda.cu", "nlf_filter.h", "nlf_network_check.h", "nlf_cpu_features.h",
                "train_cpu.cpp", "nlf_train.h")
FLAGS = runpy.run_path(str(ROOT / "hevc_ext" / "buildflags.py"))  # shared with the first-use builders


FALLBACKS = {
    "hevc_ext._nlf_cpu": "without the C++ filter kernel: filtering falls back to the numpy reference (slow)",
    "hevc_ext._nlf_train": "without the C++ training engine: encoding trains with PyTorch autograd (10-20x slower)",
}


def _warn(message: str, *names: str) -> None:
    """A visible warning (pip shows it with -v; `hevc-nlf info` says the same afterwards)."""
    bar = "=" * 78
    what = "\n".join(f"The package is installed {FALLBACKS[n]}." for n in (names or FALLBACKS))
    sys.stderr.write(f"\n{bar}\nWARNING (hevc-nlf): {message}\n{what}\n"
                     "Install a C++17 compiler (g++ or clang++) and reinstall; until then the library is\n"
                     "built at first use where a compiler exists (`hevc-nlf info` says which is in use).\n"
                     f"{bar}\n\n")


class BuildNativeKernel(build_ext):
    """build_ext for a plain shared library: no PyInit symbol, and failure is a warning, not an error."""

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []

    def build_extensions(self) -> None:
        ctype = getattr(self.compiler, "compiler_type", "")
        for ext in self.extensions:
            if ctype == "msvc":
                ext.extra_compile_args = ["/O2", "/std:c++17"]
        # Python's own compile flags (sysconfig CFLAGS) carry -fwrapv, which the first-use builds
        # (buildflags.py) do not: with it the filter kernel's 1080p call took 10 % longer (defined
        # signed overflow in its index arithmetic; AMD Zen 3, tools/kernel_ab.cpp). The kernels never
        # rely on it: where they wrap, they compute in unsigned types.
        for attr in ("compiler_so", "compiler_so_cxx"):  # C and (newer setuptools) C++ commands
            cmd = getattr(self.compiler, attr, None)
            if isinstance(cmd, list):
                setattr(self.compiler, attr, [f for f in cmd if f not in ("-fwrapv", "-fno-strict-overflow")])
        super().build_extensions()

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # CompileError, LinkError, DistutilsExecError, OSError...
            _warn(f"building {ext.name} failed: {exc}", ext.name)

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all (DistutilsPlatformError...)
            _warn(f"cannot build native code: {exc}")
        self.build_cuda()

    def build_cuda(self) -> None:
        """nvcc present → build the CUDA kernel next to the others (never decided by a GPU's presence)."""
        out = Path(self.get_ext_fullpath("hevc_ext._nlf_cpu")).parent / "_nlf_cuda.so"
        roots = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")
        nvcc = shutil.which("nvcc") or next((str(Path(r) / "bin" / "nvcc") for r in roots
                                             if r and (Path(r) / "bin" / "nvcc").is_file()), None)
        if os.environ.get("HEVC_NLF_CUDA", "1").lower() in ("0", "no", "off", "false") or nvcc is None:
            if out.exists():  # left by an earlier build in this tree: not this install's
                sys.stderr.write(f"hevc-nlf: removing {out} of an earlier build (CUDA kernel not built now)\n")
                out.unlink()
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [nvcc, *FLAGS["CUDA_FLAGS"], "-I", KERNEL_DIR, f"{KERNEL_DIR}/filter_cuda.cu", "-o", str(out)]
        sys.stderr.write(f"hevc-nlf: building the CUDA kernel (a few minutes; HEVC_NLF_CUDA=0 skips it): "
                         f"{' '.join(cmd)}\n")
        try:
            subprocess.run(cmd, check=True, cwd=ROOT)
        except (OSError, subprocess.CalledProcessError) as exc:
            bar = "=" * 78
            sys.stderr.write(f"\n{bar}\nWARNING (hevc-nlf): building the CUDA kernel failed: {exc}\n"
                             f"It will be built at first use on a machine with a GPU.\n{bar}\n\n")


class BuildPyWithKernelSources(build_py):
    """Also ship the kernel sources inside the package (for the first-use CUDA build)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install finds them in the source tree
            return
        dest = Path(self.build_lib) / "hevc_ext" / "_kernels_src"
        dest.mkdir(parents=True, exist_ok=True)
        for name in KERNEL_FILES:
            src = ROOT / KERNEL_DIR / name
            if src.is_file():
                shutil.copy2(src, dest / name)


cpu_kernel = Extension(
    "hevc_ext._nlf_cpu",
    sources=[f"{KERNEL_DIR}/filter_cpu.cpp"],
    depends=[f"{KERNEL_DIR}/nlf_filter.h", f"{KERNEL_DIR}/nlf_network_check.h", f"{KERNEL_DIR}/nlf_cpu_features.h",
             f"{KERNEL_DIR}/filter_cuda.cu"],
    include_dirs=[KERNEL_DIR],
    language="c++",
    extra_compile_args=["-O3", "-g0", "-std=c++17", "-fvisibility=hidden", "-Wno-maybe-uninitialized"],
    extra_link_args=["-pthread"],
)
train_engine = Extension(
    "hevc_ext._nlf_train",
    sources=[f"{KERNEL_DIR}/train_cpu.cpp"],
    depends=[f"{KERNEL_DIR}/nlf_train.h", f"{KERNEL_DIR}/nlf_cpu_features.h"],
    include_dirs=[KERNEL_DIR],
    language="c++",
    extra_compile_args=["-g0", *[f for f in FLAGS["TRAIN_FLAGS"] if f not in ("-shared", "-fPIC")]],
    extra_link_args=["-pthread"],
)

setup(
    ext_modules=[cpu_kernel, train_engine],
    cmdclass={"build_ext": BuildNativeKernel, "build_py": BuildPyWithKernelSources},
)
