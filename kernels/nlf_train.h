/*
 * nlf_train.h — plain C ABI of the hevc-nlf training engine (train_cpu.cpp).
 *
 * One call, nlft_step(), computes exactly what one training step of hevc_ext.model.NlfNet does in
 * PyTorch (training mode) for a batch of patches:
 *
 *     y    = unpack(net(pack(x)))[..., :crop_h, :crop_w]
 *     loss = mean((y - target)^2)
 *     loss.backward()
 *
 * including batch normalisation folded into the convolutions with batch statistics of the
 * (zero-padded, for depth-wise layers) layer input, the gradients through the batch mean and
 * variance, and the running-statistics update (running = (1-m)*running + m*batch, the variance with
 * the count/(count-1) correction). num_batches_tracked is left to the caller.
 *
 * Gradients are OVERWRITTEN (not accumulated). Float32 storage and arithmetic, float64 for the
 * per-channel reductions and the batch-norm algebra. Results do not depend on the thread count
 * (per-image partial sums combined in image order); they depend on the instruction set only by
 * rounding.
 *
 * No C++ types cross this boundary: the Python side (hevc_ext/trainkernel.py) loads the library
 * with ctypes. An engine handle may be used by one thread at a time; distinct handles are
 * independent.
 */
#ifndef NLF_TRAIN_H
#define NLF_TRAIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define NLFT_API __declspec(dllexport)
#else
#define NLFT_API __attribute__((visibility("default")))
#endif

#define NLFT_ABI_VERSION 1

#define NLFT_LAYER_PW 0 /* 1x1 point-wise: weight[cout][cin] */
#define NLFT_LAYER_DW 1 /* 3x3 depth-wise (groups = cin = cout), zero padding 1: weight[c][3][3] */

#define NLFT_OK 0
#define NLFT_ERR_ARG (-1)         /* NULL pointer, bad size or shape */
#define NLFT_ERR_NETWORK (-2)     /* inconsistent layers */
#define NLFT_ERR_NOMEM (-4)       /* allocation failed */
#define NLFT_ERR_ISA (-5)         /* requested instruction set not available */
#define NLFT_ERR_UNSUPPORTED (-8) /* a valid network this engine does not implement */
#define NLFT_ERR_INTERNAL (-9)

#define NLFT_ISA_AUTO (-1)
#define NLFT_ISA_GENERIC 0 /* portable C++ (GCC vector extensions, baseline instruction set) */
#define NLFT_ISA_AVX2 1
#define NLFT_ISA_AVX512 2

/* One layer of NlfNet (hevc_ext.model.Layer). All arrays float32, C-contiguous. */
typedef struct nlft_layer {
    int32_t kind;             /* NLFT_LAYER_PW or NLFT_LAYER_DW */
    int32_t cin, cout;        /* dw: cin == cout */
    int32_t relu;             /* 1 for every layer but the last, 0 for the last */
    const float *weight;      /* pw: cout*cin, dw: cout*9 (read) */
    const float *bias;        /* cout, or NULL (no convolution bias) */
    const float *gamma;       /* cin, or NULL: no batch normalisation on this layer's input */
    const float *beta;        /* cin (with gamma) */
    float *running_mean;      /* cin (with gamma): updated in place */
    float *running_var;       /* cin (with gamma): updated in place */
    double eps, momentum;     /* batch normalisation (with gamma) */
    float *grad_weight;       /* same shape as weight: written */
    float *grad_bias;         /* cout (with bias): written; may be NULL */
    float *grad_gamma;        /* cin (with gamma): written; may be NULL */
    float *grad_beta;         /* cin (with gamma): written; may be NULL */
} nlft_layer;

/* The network of one channel group: layer 0 and the last layer point-wise, no batch norm on layer 0,
 * ReLU on every layer but the last; channel counts 1..64. */
typedef struct nlft_network {
    int32_t planes;  /* G: 1 (luma) or 2 (chroma) */
    int32_t ph, pw;  /* pixel packing, 1 or 2 each; layer 0 cin = last cout = planes*ph*pw */
    int32_t nlayers;
    const nlft_layer *layers;
} nlft_network;

/* A batch: x is n*planes*height*width (height % ph == 0, width % pw == 0), target is
 * n*planes*crop_h*crop_w (crop_h <= height, crop_w <= width), both float32 C-contiguous. */
typedef struct nlft_batch {
    int32_t n, height, width, crop_h, crop_w;
    int32_t reserved;
    const float *x;
    const float *target;
} nlft_batch;

NLFT_API int32_t nlft_abi_version(void);
/* Detail of the last error on the calling thread ("" if none). */
NLFT_API const char *nlft_last_error(void);
/* Best instruction set on this CPU (NLFT_ISA_*), and whether one is compiled in and supported. */
NLFT_API int32_t nlft_best_isa(void);
NLFT_API int32_t nlft_isa_supported(int32_t isa);

/* A new engine (thread pool + buffers, reused across steps). threads <= 0: all hardware threads.
 * isa: NLFT_ISA_AUTO or a forced one. Returns NULL on failure (see nlft_last_error). */
NLFT_API void *nlft_create(int32_t threads, int32_t isa);
NLFT_API void nlft_destroy(void *engine);
NLFT_API int32_t nlft_engine_threads(const void *engine);
NLFT_API int32_t nlft_engine_isa(const void *engine);

/* One training step (forward + backward, training-mode batch norm). loss: the MSE (may be NULL).
 * update_running_stats: 0 leaves running_mean/running_var untouched. Returns NLFT_OK or an error. */
NLFT_API int32_t nlft_step(void *engine, const nlft_network *net, const nlft_batch *batch,
                           int32_t update_running_stats, double *loss);

#ifdef __cplusplus
}
#endif

#endif /* NLF_TRAIN_H */
