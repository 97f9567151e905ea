/*
 * nlf_filter.h — plain C ABI of the hevc-nlf filter kernels (CPU: filter_cpu.cpp, CUDA: filter_cuda.cu).
 *
 * The kernels compute exactly what hevc_ext/reference.py defines (the integer filter of one channel
 * group of one picture): pad right/bottom by edge replication to a multiple of the packing, pack,
 * centre, run the layers in integer arithmetic (int32 accumulators, 64-bit requantisation, zero
 * padding at every depth-wise layer), unpack, add, clip. Results are bit-identical to the reference.
 *
 * No C++ types cross this boundary (no torch, no pybind): the Python side loads the shared libraries
 * with ctypes. All functions are thread-safe; the filter functions may be called concurrently.
 *
 * Memory: the CPU function takes host pointers. The CUDA function takes host pointers when
 * nlf_planes.memory == NLF_MEMORY_HOST (it copies to the device and back) or device pointers when
 * nlf_planes.memory == NLF_MEMORY_DEVICE (no copies; the caller owns the buffers).
 * Sources and destinations must not overlap (no in-place filtering).
 */
#ifndef NLF_FILTER_H
#define NLF_FILTER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define NLF_API __declspec(dllexport)
#else
#define NLF_API __attribute__((visibility("default")))
#endif

#define NLF_ABI_VERSION 1

/* Layer kinds (IntLayer.kind). */
#define NLF_LAYER_PW 0 /* 1x1 point-wise: weight[cout][cin] */
#define NLF_LAYER_DW 1 /* 3x3 depth-wise: weight[cout][3][3], cin == cout */

/* Error codes (0 = success). nlf_strerror() names them; nlf_last_error() gives the detail of the
 * last failure on the calling thread. */
#define NLF_OK 0
#define NLF_ERR_ARG (-1)       /* null pointer, bad size, stride, bit depth or sample width */
#define NLF_ERR_NETWORK (-2)   /* the network is inconsistent or outside the validated ranges */
#define NLF_ERR_RANGE (-3)     /* a sample is >= 2^bitdepth (the output is then unspecified) */
#define NLF_ERR_NOMEM (-4)     /* allocation failed */
#define NLF_ERR_ISA (-5)       /* the requested instruction set is not available on this CPU */
#define NLF_ERR_NODEVICE (-6)  /* no CUDA device */
#define NLF_ERR_CUDA (-7)      /* a CUDA runtime call failed (detail in nlf_last_error) */
#define NLF_ERR_UNSUPPORTED (-8) /* valid network this kernel cannot run (e.g. too large for shared memory) */
#define NLF_ERR_INTERNAL (-9)

/* CPU instruction sets (nlf_cpu_filter's isa argument). */
#define NLF_ISA_AUTO (-1)
#define NLF_ISA_SCALAR 0
#define NLF_ISA_AVX2 1
#define NLF_ISA_AVX512 2 /* AVX-512 F/BW/DQ/VL + VNNI */

#define NLF_MEMORY_HOST 0
#define NLF_MEMORY_DEVICE 1

/* One layer: the integers of reference.IntLayer. Arrays are C-contiguous and only read. */
typedef struct nlf_layer {
    int32_t kind;          /* NLF_LAYER_PW or NLF_LAYER_DW */
    int32_t cin, cout;     /* input / output channels */
    int32_t relu;          /* 1: clamp to [0, 32767] (hidden layers); 0: clamp to [-32768, 32767] */
    const int32_t *weight; /* pw: cout*cin, dw: cout*9 */
    const int64_t *mult;   /* cout, each in [0, 2^31 - 1] */
    const int64_t *bias;   /* cout, each |bias| <= 2^52 */
    const int64_t *shift;  /* cout, each in [0, 62] */
} nlf_layer;

/* A network of one channel group (reference.IntNetwork). */
typedef struct nlf_network {
    int32_t planes;  /* 1 (Y) or 2 (U and V) */
    int32_t ph, pw;  /* pixel packing, each 1 or 2 */
    int32_t nlayers; /* >= 1 */
    const nlf_layer *layers;
} nlf_network;

/* The planes of one channel group of one picture. All planes have the same size. */
typedef struct nlf_planes {
    int32_t height, width; /* samples, >= 1 */
    int32_t bitdepth;      /* 8..16 */
    int32_t sample_bytes;  /* 1 (uint8_t samples, bitdepth 8) or 2 (uint16_t samples) */
    int32_t memory;        /* NLF_MEMORY_HOST or NLF_MEMORY_DEVICE (CUDA only) */
    int32_t reserved;
    const void *src[2];       /* planes[0..planes-1] */
    void *dst[2];
    ptrdiff_t src_stride[2];  /* in samples (not bytes), >= width */
    ptrdiff_t dst_stride[2];
} nlf_planes;

/* ABI version of the library (NLF_ABI_VERSION it was built with). */
NLF_API int32_t nlf_abi_version(void);
/* Static name of an error code. */
NLF_API const char *nlf_strerror(int32_t code);

/* The text nlf_strerror() returns (one table for every implementation). */
static inline const char *nlf_error_text(int32_t code) {
    switch (code) {
        case NLF_OK: return "ok";
        case NLF_ERR_ARG: return "invalid argument";
        case NLF_ERR_NETWORK: return "invalid network";
        case NLF_ERR_RANGE: return "sample out of range for the bit depth";
        case NLF_ERR_NOMEM: return "out of memory";
        case NLF_ERR_ISA: return "instruction set not available";
        case NLF_ERR_NODEVICE: return "no CUDA device";
        case NLF_ERR_CUDA: return "CUDA error";
        case NLF_ERR_UNSUPPORTED: return "network not supported by this kernel";
        case NLF_ERR_INTERNAL: return "internal error";
        default: return "unknown error";
    }
}
/* Detail of the last error on the calling thread ("" if none). */
NLF_API const char *nlf_last_error(void);

/* --- CPU (filter_cpu.cpp) ------------------------------------------------------------------ */
/* Best instruction set available on this CPU (NLF_ISA_*). */
NLF_API int32_t nlf_cpu_best_isa(void);
/* Whether an instruction set is compiled in and supported by this CPU. */
NLF_API int32_t nlf_cpu_isa_supported(int32_t isa);
/* Filter one channel group. threads <= 0: all hardware threads. isa: NLF_ISA_AUTO or a forced one. */
NLF_API int32_t nlf_cpu_filter(const nlf_network *net, const nlf_planes *planes, int32_t threads,
                               int32_t isa);
/* Requantisation forms (NLF_RQ_*) the SIMD code paths use for each layer of net at this bit depth:
 * forms[i] for i < min(n, nlayers). A diagnostic for tests and benchmarks; the output never depends on it. */
#define NLF_RQ_GENERAL 0 /* 64-bit product, arithmetic shift, clamp */
#define NLF_RQ_HIGH 1    /* high dword of acc*M + B (shift <= 32 and the bounds allow) */
#define NLF_RQ_FOLD 2    /* multiplier folded into int16 weights, 32-bit accumulation from bias + round, shift */
NLF_API int32_t nlf_cpu_requant_forms(const nlf_network *net, int32_t bitdepth, int32_t *forms, int32_t n);

/* --- CUDA (filter_cuda.cu) ----------------------------------------------------------------- */
/* Number of usable CUDA devices (0 if none or no driver); negative NLF_ERR_* on runtime failure. */
NLF_API int32_t nlf_cuda_device_count(void);
/* Filter one channel group on the current CUDA device (one kernel launch; synchronous). */
NLF_API int32_t nlf_cuda_filter(const nlf_network *net, const nlf_planes *planes);
/* The same on device memory only (planes->memory == NLF_MEMORY_DEVICE), ordered on `stream` (a
 * cudaStream_t; NULL: the legacy default stream), and asynchronous like a kernel launch where nothing
 * has to be checked after the kernel: with the fast kernel on 8-bit samples it returns once the launch
 * is queued (errors of the kernel's execution then surface at the caller's next synchronisation).
 * Calls on samples of more than 8 bits (the range check reads a flag the kernel writes) and calls that
 * take the generic kernel (its constants share one device buffer) wait for the kernel. */
NLF_API int32_t nlf_cuda_filter_stream(const nlf_network *net, const nlf_planes *planes, void *stream);
/* The kernel nlf_cuda_filter runs for this network and these planes: 1 the fast kernel (the paper's
 * pw-dw-pw-dw-pw shape with at most 16 hidden channels, int8 weights, every requantisation exact in 32
 * bits: the networks the encoder signals), 0 the generic one; an NLF_ERR_* code for an invalid network.
 * HEVC_NLF_CUDA_GENERIC=1 in the environment forces the generic kernel. */
NLF_API int32_t nlf_cuda_kernel_path(const nlf_network *net, const nlf_planes *planes);

#ifdef __cplusplus
}
#endif

#endif /* NLF_FILTER_H */
