"""Compiler flags of the native libraries, shared by setup.py (install-time builds) and the loaders
(first-use builds in hevc_ext.kernels / hevc_ext.trainkernel). Plain constants: setup.py reads this
file without importing the package."""

CPU_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-pthread")
TRAIN_FLAGS = CPU_FLAGS + ("-ffp-contract=fast",)
CUDA_GENCODE = (
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90,code=sm_90",
    "-gencode", "arch=compute_90,code=compute_90",
)
CUDA_FLAGS = ("-O3", "-shared", "-std=c++17", "--threads", "0", "-Xcompiler", "-fPIC",
              "-Xcompiler", "-fvisibility=hidden") + CUDA_GENCODE
