// filter_cuda.cu — the CUDA kernel of the hevc-nlf integer filter (C ABI: nlf_filter.h).
//
// Bit-identical to hevc_ext/reference.py (same integer arithmetic as filter_cpu.cpp).
//
// Memory: nlf_cuda_filter takes host pointers (NLF_MEMORY_HOST: planes are copied to the device and
// back, so the call includes PCIe transfers) or device pointers (NLF_MEMORY_DEVICE: no copies; use
// this to measure the kernel). The call is synchronous and serialised per process (one mutex).
//
// Design (one launch per plane group)
// -----------------------------------
// * A thread block owns a TH x TW tile of the packed output; all layers are fused inside the block.
// * The layers are cut into segments at the depth-wise layers: segment 0 = load/pack/centre the samples
//   + the leading point-wise layers; segment k = depth-wise layer k + the point-wise layers after it.
//   Within a segment each thread owns whole pixels: the depth-wise taps come from shared memory, the
//   point-wise layers run in registers (activations int32[MAXC] per thread). A segment writes its
//   output stage to shared memory (int16, [channel][pixel], zero outside the picture = the zero
//   padding of the next depth-wise layer) over the tile plus the halo that the remaining depth-wise
//   layers need; the last segment adds the residual to the samples and writes them to global memory.
//   __syncthreads() separates segments; nothing but samples ever touches DRAM.
// * Kernels are instantiated for the padded channel counts <CIO, MAXC> (CIO = input/output channels
//   1/2/4/8, MAXC = hidden channels 8/12/16/32), so every channel loop is unrolled and the per-pixel
//   activations live in registers. Weights and per-channel constants sit in one device buffer read
//   with warp-uniform addresses (broadcast through the read-only cache, 16-byte vector loads).
// * Requantisation, per channel in the cheapest form the host proves exact (as in filter_cpu.cpp):
//   folded — when the accumulator bounds keep acc*mult + bias + round inside int32, the multiplier is
//   folded into the (int32) weights and z = (acc' + bias + round) >> min(shift, 31) in 32 bits (the
//   form of the networks the encoder signals); otherwise z = (acc*mul + add) >> shift in 64 bits with
//   (mul, add, shift) = (mult, bias + round, shift) or the high-dword form (mult << (32 - shift),
//   (bias + round) << (32 - shift), 32). Then the clamp. The form is warp-uniform (one channel per
//   instruction stream).
// * Each segment body is a __host__ __device__ function of (block, thread): the kernel runs it for
//   its threads between barriers. Threads of one segment never depend on each other.

#include "nlf_filter.h"
#include "nlf_network_check.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace nlfcu {

constexpr int MAX_LAYERS = 64;
constexpr int MAX_CH = 32;  // hidden channels this kernel handles (Architecture allows 1..32)
constexpr int NT = 256;     // threads per block

static thread_local char g_err[512] = "";

static int fail(int code, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(g_err, sizeof g_err, fmt, ap);
    va_end(ap);
    return code;
}

// Per-channel requantisation constants (32 bytes). mul < 2^31 always (mult <= 2^31 - 1, and the
// high-dword form is only chosen when mult << (32 - shift) < 2^31), so acc*mul is one 32x32->64 IMAD.
struct alignas(16) Chan {
    long long add;  // folded: bias + round (fits int32)
    int mul;
    int shift;  // 32: high-dword form, z = high 32 bits of acc*mul + add; folded: min(shift, 31)
    int lo;
    int hi;
    int fold;   // 1: multiplier folded into the weights, z = (acc + add) >> shift in 32 bits
    int pad;
};

struct LayerDev {
    int kind;   // NLF_LAYER_PW / NLF_LAYER_DW
    int ci, co; // padded input / output channels (CIO or MAXC)
    int woff;   // offset of the weights (int32) in the buffer; pw: [co][ci], dw: [co][12] (9 taps + pad)
    int coff;   // offset of the Chan array (in Chan units)
};

// Everything a launch needs, passed by value.
struct Params {
    const void* src[2];
    void* dst[2];
    long long ss[2], ds[2];  // strides in samples
    int H, W, Hq, Wq, bd, sample_bytes, planes, ph, pw, c0;
    int nlayers, th, tw;
    int buf_elems;            // int16 elements per shared-memory stage buffer
    const int* wts;           // weights (int32)
    const Chan* chans;
    unsigned* range_flag;     // set to nonzero if a sample is >= 2^bd
    LayerDev L[MAX_LAYERS];
    int D[MAX_LAYERS + 1];    // depth-wise layers at index >= s (the halo of stage s; stage s = input of layer s)
    int nseg;                 // segments: layers [seg0[k], seg1[k]), seg0 = -1 for the input segment
    int seg0[MAX_LAYERS + 1], seg1[MAX_LAYERS + 1];
};

__host__ __device__ inline int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ inline int imax(int a, int b) { return a > b ? a : b; }

#ifdef __CUDA_ARCH__
#define NLF_LDG(p) __ldg(p)
#else
#define NLF_LDG(p) (*(p))
#endif

__host__ __device__ inline int requant(int acc, const Chan* cp) {
    const long long add = NLF_LDG(&cp->add);
    const int mul = NLF_LDG(&cp->mul), shift = NLF_LDG(&cp->shift);
    const int lo = NLF_LDG(&cp->lo), hi = NLF_LDG(&cp->hi);
    if (NLF_LDG(&cp->fold)) {  // acc*mult + bias + round fits in int32 (host check): 32-bit add and shift
        const int z = (int)((unsigned)acc + (unsigned)(int)add) >> shift;
        return z < lo ? lo : (z > hi ? hi : z);
    }
    // 32x32 -> 64 product plus a 64-bit add, wrapping (exact for valid inputs, see the host checks)
    const long long t = (long long)((unsigned long long)((long long)acc * (long long)mul) + (unsigned long long)add);
    int z;
    if (shift == 32) {  // warp-uniform (one channel per instruction stream): no divergence
        z = (int)(t >> 32);
    } else {
        const long long z64 = t >> shift;
        z = (int)(z64 < lo ? (long long)lo : (z64 > hi ? (long long)hi : z64));
    }
    return z < lo ? lo : (z > hi ? hi : z);
}

// point-wise layer in registers: out[f] = requant(sum_c w[f][c] * in[c]), f < CO
template <int CI, int CO, int N>
__host__ __device__ inline void pw_layer(const Params& p, const LayerDev& L, const int (&in)[N], int (&out)[N]) {
    const int* w = p.wts + L.woff;
    const Chan* ch = p.chans + L.coff;
#pragma unroll
    for (int f = 0; f < CO; ++f) {
        unsigned acc = 0;  // wrapping accumulation; the true sum fits in int32
        if (CI % 4 == 0) {
            const int4* w4 = reinterpret_cast<const int4*>(w + f * CI);
#pragma unroll
            for (int c = 0; c < CI; c += 4) {
                const int4 q = NLF_LDG(w4 + c / 4);
                acc += (unsigned)q.x * (unsigned)in[c] + (unsigned)q.y * (unsigned)in[c + 1] +
                       (unsigned)q.z * (unsigned)in[c + 2] + (unsigned)q.w * (unsigned)in[c + 3];
            }
        } else {
#pragma unroll
            for (int c = 0; c < CI; ++c) acc += (unsigned)NLF_LDG(w + f * CI + c) * (unsigned)in[c];
        }
        out[f] = requant((int)acc, ch + f);
    }
#pragma unroll
    for (int f = CO; f < N; ++f) out[f] = 0;
}

// depth-wise layer for one pixel: taps from shared memory (input region with origin one row/column
// up-left of the output region, row length rw_in, plane size plane_in), channels c < CO
template <int CI, int CO, int N>
__host__ __device__ inline void dw_layer(const Params& p, const LayerDev& L, const int16_t* in, int plane_in, int rw_in,
                                         int py, int px, int (&out)[N]) {
    const int* w = p.wts + L.woff;
    const Chan* ch = p.chans + L.coff;
    constexpr int C = CI < CO ? CI : CO;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int4* w4 = reinterpret_cast<const int4*>(w + c * 12);
        const int4 a = NLF_LDG(w4), b = NLF_LDG(w4 + 1), d = NLF_LDG(w4 + 2);
        const int wt[9] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w, d.x};
        const int16_t* s = in + c * plane_in + py * rw_in + px;
        unsigned acc = 0;
#pragma unroll
        for (int ky = 0; ky < 3; ++ky)
#pragma unroll
            for (int kx = 0; kx < 3; ++kx) acc += (unsigned)wt[ky * 3 + kx] * (unsigned)(int)s[ky * rw_in + kx];
        out[c] = requant((int)acc, ch + c);
    }
#pragma unroll
    for (int c = C; c < N; ++c) out[c] = 0;
}

// Apply layer l (kind and padded sizes decided at run time, dispatched to unrolled code).
template <int CIO, int MAXC>
__host__ __device__ inline void pw_any(const Params& p, int l, const int (&in)[MAXC], int (&out)[MAXC]) {
    const LayerDev& L = p.L[l];
    if (L.ci == MAXC && L.co == MAXC) pw_layer<MAXC, MAXC, MAXC>(p, L, in, out);
    else if (L.ci == CIO && L.co == MAXC) pw_layer<CIO, MAXC, MAXC>(p, L, in, out);
    else if (L.ci == MAXC && L.co == CIO) pw_layer<MAXC, CIO, MAXC>(p, L, in, out);
    else pw_layer<CIO, CIO, MAXC>(p, L, in, out);
}

template <int CIO, int MAXC>
__host__ __device__ inline void dw_any(const Params& p, int l, const int16_t* in, int plane_in, int rw_in, int py, int px,
                                       int (&out)[MAXC]) {
    const LayerDev& L = p.L[l];
    if (L.ci == MAXC && L.co == MAXC) dw_layer<MAXC, MAXC, MAXC>(p, L, in, plane_in, rw_in, py, px, out);
    else if (L.ci == CIO && L.co == MAXC) dw_layer<CIO, MAXC, MAXC>(p, L, in, plane_in, rw_in, py, px, out);
    else if (L.ci == MAXC && L.co == CIO) dw_layer<MAXC, CIO, MAXC>(p, L, in, plane_in, rw_in, py, px, out);
    else dw_layer<CIO, CIO, MAXC>(p, L, in, plane_in, rw_in, py, px, out);
}

// Sample (Y, X) of plane g, for either kernel's parameters (P: Params or fast::FParams). The plane
// is picked by selects: indexing the parameter arrays with a run-time g would load them from memory.
template <class P>
__host__ __device__ inline unsigned load_sample(const P& p, int g, int Y, int X) {
    const long long off = (long long)Y * (g ? p.ss[1] : p.ss[0]) + X;
    const void* base = g ? p.src[1] : p.src[0];
    if (p.sample_bytes == 1) return NLF_LDG(static_cast<const unsigned char*>(base) + off);
    return NLF_LDG(static_cast<const unsigned short*>(base) + off);
}

// Output sample (Y, X) of plane g: the input sample plus the residual, clipped to [0, 2^bd - 1].
template <class P>
__host__ __device__ inline void store_filtered(const P& p, int g, int Y, int X, int res) {
    const int maxv = (1 << p.bd) - 1;
    int v = (int)load_sample(p, g, Y, X) + res;
    v = v < 0 ? 0 : (v > maxv ? maxv : v);
    const long long o = (long long)Y * (g ? p.ds[1] : p.ds[0]) + X;
    void* base = g ? p.dst[1] : p.dst[0];
    if (p.sample_bytes == 1) static_cast<unsigned char*>(base)[o] = (unsigned char)v;
    else static_cast<unsigned short*>(base)[o] = (unsigned short)v;
}

// One segment for thread `tid` of the block whose tile starts at packed (ty0, tx0).
// Segment = layers [l0, l1); l0 == -1 means "starts with the input stage" (then all layers in it are
// point-wise); otherwise layer l0 is depth-wise and reads stage l0 from `in` (shared memory).
// Writes stage l1 to `out` (shared memory), or the filtered samples when l1 == nlayers.
template <int CIO, int MAXC>
__host__ __device__ void run_segment(const Params& p, int l0, int l1, int ty0, int tx0, int tid, int nthreads,
                                     const int16_t* in, int16_t* out) {
    const int D = p.D[l1];  // halo of the output stage
    const int rh = p.th + 2 * D, rw = p.tw + 2 * D;
    const int n = rh * rw;
    const bool final_seg = l1 == p.nlayers;
    // input region (for a depth-wise first layer): halo D + 1
    const int rw_in = p.tw + 2 * (D + 1);
    const int plane_in = (p.th + 2 * (D + 1)) * rw_in;
    const int off = 1 << (p.bd - 1);
    unsigned bad = 0;
    for (int idx = tid; idx < n; idx += nthreads) {
        const int py = idx / rw, px = idx - (idx / rw) * rw;
        const int gy = ty0 - D + py, gx = tx0 - D + px;  // packed coordinates
        const bool inside = gy >= 0 && gy < p.Hq && gx >= 0 && gx < p.Wq;
        if (final_seg && !inside) continue;
        int a[MAXC], b[MAXC];
        int l = l0;
        if (l0 < 0) {
            // pack + centre (edge replication at the right/bottom; out-of-picture pixels use any
            // in-picture sample: they are zeroed when written, or never written)
            const int cy = imin(imax(gy, 0), p.Hq - 1), cx = imin(imax(gx, 0), p.Wq - 1);
            const int pp = p.ph * p.pw;
#pragma unroll
            for (int c = 0; c < MAXC; ++c) {
                a[c] = 0;
                if (c < CIO && c < p.c0) {
                    const int g = c / pp, dy = (c % pp) / p.pw, dx = c % p.pw;
                    const int Y = imin(cy * p.ph + dy, p.H - 1), X = imin(cx * p.pw + dx, p.W - 1);
                    const unsigned v = load_sample(p, g, Y, X);
                    bad |= v >> p.bd;
                    a[c] = (int)v - off;
                }
            }
            l = 0;
        } else {
            dw_any<CIO, MAXC>(p, l0, in, plane_in, rw_in, py, px, a);
            l = l0 + 1;
        }
        for (; l < l1; ++l) {  // point-wise layers of the segment
            pw_any<CIO, MAXC>(p, l, a, b);
#pragma unroll
            for (int c = 0; c < MAXC; ++c) a[c] = b[c];
        }
        if (!final_seg) {
            const int co = l1 > 0 ? p.L[l1 - 1].co : CIO;
#pragma unroll
            for (int c = 0; c < MAXC; ++c)
                if (c < co) out[c * n + idx] = (int16_t)(inside ? a[c] : 0);
        } else {
            const int pp = p.ph * p.pw;
#pragma unroll
            for (int c = 0; c < CIO; ++c) {
                if (c >= p.c0) break;
                const int g = c / pp, dy = (c % pp) / p.pw, dx = c % p.pw;
                const int Y = gy * p.ph + dy, X = gx * p.pw + dx;
                if (Y >= p.H || X >= p.W) continue;
                store_filtered(p, g, Y, X, a[c]);
            }
        }
    }
    if (bad && p.range_flag) {
#ifdef __CUDA_ARCH__
        atomicOr(p.range_flag, 1u);
#else
        *p.range_flag |= 1u;
#endif
    }
}

// Segments: cut the layers at the depth-wise layers (host side, stored in Params).
static void segments(Params& p) {
    int k = 0, l = 0;
    p.seg0[0] = -1;
    while (l < p.nlayers && p.L[l].kind == NLF_LAYER_PW) ++l;
    p.seg1[0] = l;
    ++k;
    while (l < p.nlayers) {  // p.L[l] is depth-wise
        p.seg0[k] = l;
        ++l;
        while (l < p.nlayers && p.L[l].kind == NLF_LAYER_PW) ++l;
        p.seg1[k] = l;
        ++k;
    }
    p.nseg = k;
}

template <int CIO, int MAXC>
__global__ void __launch_bounds__(NT) nlf_fused(const __grid_constant__ Params p) {
    extern __shared__ __align__(16) int16_t smem[];
    int16_t* buf[2] = {smem, smem + p.buf_elems};
    const int ty0 = blockIdx.y * p.th, tx0 = blockIdx.x * p.tw;
    for (int k = 0; k < p.nseg; ++k) {
        if (k > 0) __syncthreads();
        run_segment<CIO, MAXC>(p, p.seg0[k], p.seg1[k], ty0, tx0, threadIdx.x, blockDim.x, buf[(k + 1) & 1], buf[k & 1]);
    }
}

typedef void (*KernelFn)(const Params);

// The instance of a kernel template for a run-time input/output channel count (1, 2, 4 or 8):
// Pick<CIO>::get(arg) picks among the instances for the other template argument.
template <template <int> class Pick, typename Fn>
static Fn by_cio(int cio, int arg) {
    switch (cio) {
        case 1: return Pick<1>::get(arg);
        case 2: return Pick<2>::get(arg);
        case 4: return Pick<4>::get(arg);
        default: return Pick<8>::get(arg);
    }
}

template <int CIO>
struct PickMaxc {
    static KernelFn get(int maxc) {
        return maxc == 8 ? nlf_fused<CIO, 8> : maxc == 12 ? nlf_fused<CIO, 12> : maxc == 16 ? nlf_fused<CIO, 16> : nlf_fused<CIO, 32>;
    }
};

static KernelFn pick_kernel(int cio, int maxc) { return by_cio<PickMaxc, KernelFn>(cio, maxc); }

// ------------------------------------------------------------------------ fast path (device code)
// The paper's network shape, pw · dw3x3 · pw · dw3x3 · pw with at most 16 hidden channels and a ReLU on
// every layer but the last, when every weight fits int8 and every channel's requantisation fits 32 bits
// (the host proves both; the encoder's networks qualify: weights of at most 8 bits, and the folded form
// holds for each channel).
// Differences from the generic kernel above:
// * all weights and per-channel constants are kernel parameters at compile-time offsets (the
//   instructions read them from the constant bank as operands: no loads);
// * products with IDP2A (two int16 activations times two int8 weights plus an int32, the rate of one
//   IMAD): activations travel as int16 pairs; a thread owns two horizontally adjacent packed pixels, so
//   one 32-bit shared-memory word holds the two samples of a channel its depth-wise taps need;
// * z = clamp((acc*mult + bias + round) >> shift) in 32 bits (exact when the host's bounds allow);
// * stage buffers are int16 pairs in shared memory indexed directly (no generic addressing).
namespace fast {

#ifndef NLF_FAST_TH
#define NLF_FAST_TH 16
#endif
constexpr int TW = 32, TH = NLF_FAST_TH;  // packed tile
constexpr int MAXF = 16, MAXIO = 8;
constexpr int RW0 = (TW + 4) / 2, RH0 = TH + 4, PL0 = RW0 * RH0;  // stage 1 (halo 2): words per row / rows / plane
constexpr int RW2 = (TW + 2) / 2, RH2 = TH + 2, PL2 = RW2 * RH2;  // stage 3 (halo 1)

struct FParams {
    const void* src[2];
    void* dst[2];
    long long ss[2], ds[2];  // strides in samples
    unsigned* range_flag;    // NULL: 8-bit samples (cannot exceed the range)
    int H, W, Hq, Wq, bd, sample_bytes, ph, pw;
    int cg[MAXIO], cy[MAXIO], cx[MAXIO];  // input channel c = plane cg, offset (cy, cx) in the packing
    // weights, int8 in int32 words: pw words hold two weights in bytes 0-1 (the int16 pair of inputs
    // j = channels 2j, 2j+1); dw words per channel and kernel row: A = (w0, w1 | w2, 0), B = (0, w0 | w1, w2)
    int w0[MAXF * (MAXIO / 2)], w2[MAXF * (MAXF / 2)], w4[MAXIO * (MAXF / 2)];
    int d1[MAXF * 6], d3[MAXF * 6];
    int mul[5][MAXF], add[5][MAXF], shf[5][MAXF];  // z = (acc*mul + add) >> shf, 32-bit
};

__host__ __device__ inline int dp2lo(int a, int b, int c) {
#ifdef __CUDA_ARCH__
    return __dp2a_lo(a, b, c);
#else
    return (int)((unsigned)c + (unsigned)((int)(int16_t)(a & 0xffff) * (int)(int8_t)(b & 0xff) +
                                          (int)(int16_t)((unsigned)a >> 16) * (int)(int8_t)((b >> 8) & 0xff)));
#endif
}
__host__ __device__ inline int dp2hi(int a, int b, int c) {
#ifdef __CUDA_ARCH__
    return __dp2a_hi(a, b, c);
#else
    return (int)((unsigned)c + (unsigned)((int)(int16_t)(a & 0xffff) * (int)(int8_t)((b >> 16) & 0xff) +
                                          (int)(int16_t)((unsigned)a >> 16) * (int)(int8_t)((unsigned)b >> 24)));
#endif
}
// (lo, hi) int16 pair in one word
__host__ __device__ inline int pack2(int lo, int hi) {
#ifdef __CUDA_ARCH__
    return (int)__byte_perm((unsigned)lo, (unsigned)hi, 0x5410);
#else
    return (int)(((unsigned)lo & 0xffffu) | ((unsigned)hi << 16));
#endif
}
// requantise: layers 0-3 have a ReLU (clamp to [0, 32767]), layer 4 none (clamp to [-32768, 32767])
template <bool RELU>
__host__ __device__ inline int rq(int acc, int mul, int add, int shf) {
    const int z = (int)((unsigned)acc * (unsigned)mul + (unsigned)add) >> shf;
    return imax(imin(z, 32767), RELU ? 0 : -32768);
}
// keeps the int16 halves of a pair word whose pixels lie inside the picture (the zero padding)
__host__ __device__ inline int pair_mask(bool in0, bool in1) { return (in0 ? 0xffff : 0) | (in1 ? (int)0xffff0000u : 0); }

// Stage 1 (output of layer 0) over the tile plus a halo of 2: samples -> pack, centre -> pw -> s0.
template <int CIO, int F>
__host__ __device__ void seg_a(const FParams& p, int ty0, int tx0, int tid, int nthr, int* s0) {
    constexpr int P = (CIO + 1) / 2;  // input pairs
    const int off = 1 << (p.bd - 1);
    unsigned bad = 0;
    for (int it = tid; it < PL0; it += nthr) {
        const int r = it / RW0, k = it - r * RW0;
        const int gy = ty0 - 2 + r, gx = tx0 - 2 + 2 * k;
        const int cyq = imin(imax(gy, 0), p.Hq - 1);
        int in[2][P];
        bool inside[2];
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            inside[q] = gy >= 0 && gy < p.Hq && gx + q >= 0 && gx + q < p.Wq;
            const int cxq = imin(imax(gx + q, 0), p.Wq - 1);
            int v[2 * P];
#pragma unroll
            for (int c = 0; c < 2 * P; ++c) {
                v[c] = 0;
                if (c < CIO) {
                    const int Y = imin(cyq * p.ph + p.cy[c], p.H - 1), X = imin(cxq * p.pw + p.cx[c], p.W - 1);
                    const unsigned s = load_sample(p, p.cg[c], Y, X);
                    bad |= s >> p.bd;
                    v[c] = (int)s - off;
                }
            }
#pragma unroll
            for (int j = 0; j < P; ++j) in[q][j] = pack2(v[2 * j], v[2 * j + 1]);
        }
        const int mask = pair_mask(inside[0], inside[1]);
#pragma unroll
        for (int f = 0; f < F; ++f) {
            int z[2];
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                int acc = 0;
#pragma unroll
                for (int j = 0; j < P; ++j) acc = dp2lo(in[q][j], p.w0[f * P + j], acc);
                z[q] = rq<true>(acc, p.mul[0][f], p.add[0][f], p.shf[0][f]);
            }
            s0[f * PL0 + it] = pack2(z[0], z[1]) & mask;
        }
    }
    if (bad && p.range_flag) {
#ifdef __CUDA_ARCH__
        atomicOr(p.range_flag, 1u);
#else
        *p.range_flag |= 1u;
#endif
    }
}

// Depth-wise 3x3 of the two pixels whose taps start at word k of row r in a stage buffer with RW words
// per row and PL per plane; outputs requantised, as int16 pairs of channels (2j, 2j+1) per pixel.
template <int F, int RW, int PL, int l>
__host__ __device__ inline void dw_pair(const FParams& p, const int* s, const int (&d)[MAXF * 6], int r, int k,
                                        int (&a)[2][F / 2]) {
    int even0 = 0, even1 = 0;
#pragma unroll
    for (int c = 0; c < F; ++c) {
        const int* b = s + c * PL + r * RW + k;
        int acc0 = 0, acc1 = 0;
#pragma unroll
        for (int ky = 0; ky < 3; ++ky) {
            const int lo = b[ky * RW], hi = b[ky * RW + 1];
            const int A = d[c * 6 + ky * 2], B = d[c * 6 + ky * 2 + 1];
            acc0 = dp2lo(lo, A, dp2hi(hi, A, acc0));
            acc1 = dp2lo(lo, B, dp2hi(hi, B, acc1));
        }
        const int z0 = rq<true>(acc0, p.mul[l][c], p.add[l][c], p.shf[l][c]);
        const int z1 = rq<true>(acc1, p.mul[l][c], p.add[l][c], p.shf[l][c]);
        if (c % 2 == 0) {
            even0 = z0;
            even1 = z1;
        } else {
            a[0][c / 2] = pack2(even0, z0);
            a[1][c / 2] = pack2(even1, z1);
        }
    }
}

// Stage 3 (output of layers 1-2) over the tile plus a halo of 1: dw from s0, pw -> s2.
template <int CIO, int F>
__host__ __device__ void seg_b(const FParams& p, int ty0, int tx0, int tid, int nthr, const int* s0, int* s2) {
    for (int it = tid; it < PL2; it += nthr) {
        const int r = it / RW2, k = it - r * RW2;
        const int gy = ty0 - 1 + r, gx = tx0 - 1 + 2 * k;
        const bool rowin = gy >= 0 && gy < p.Hq;
        const int mask = pair_mask(rowin && gx >= 0 && gx < p.Wq, rowin && gx + 1 >= 0 && gx + 1 < p.Wq);
        int a[2][F / 2];
        dw_pair<F, RW0, PL0, 1>(p, s0, p.d1, r, k, a);
#pragma unroll
        for (int f = 0; f < F; ++f) {
            int acc0 = 0, acc1 = 0;
#pragma unroll
            for (int j = 0; j < F / 2; ++j) {
                acc0 = dp2lo(a[0][j], p.w2[f * (F / 2) + j], acc0);
                acc1 = dp2lo(a[1][j], p.w2[f * (F / 2) + j], acc1);
            }
            const int z0 = rq<true>(acc0, p.mul[2][f], p.add[2][f], p.shf[2][f]);
            const int z1 = rq<true>(acc1, p.mul[2][f], p.add[2][f], p.shf[2][f]);
            s2[f * PL2 + it] = pack2(z0, z1) & mask;
        }
    }
}

// The tile: dw from s2, pw to the residual, added to the samples and written out.
template <int CIO, int F>
__host__ __device__ void seg_c(const FParams& p, int ty0, int tx0, int tid, int nthr, const int* s2) {
    constexpr int RW = TW / 2;
    for (int it = tid; it < RW * TH; it += nthr) {
        const int r = it / RW, k = it - r * RW;
        const int gy = ty0 + r, gx = tx0 + 2 * k;
        if (gy >= p.Hq || gx >= p.Wq) continue;
        int a[2][F / 2];
        dw_pair<F, RW2, PL2, 3>(p, s2, p.d3, r, k, a);
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            if (gx + q >= p.Wq) break;
#pragma unroll
            for (int c = 0; c < CIO; ++c) {
                int acc = 0;
#pragma unroll
                for (int j = 0; j < F / 2; ++j) acc = dp2lo(a[q][j], p.w4[c * (F / 2) + j], acc);
                const int res = rq<false>(acc, p.mul[4][c], p.add[4][c], p.shf[4][c]);
                const int g = p.cg[c], Y = gy * p.ph + p.cy[c], X = (gx + q) * p.pw + p.cx[c];
                if (Y >= p.H || X >= p.W) continue;
                store_filtered(p, g, Y, X, res);
            }
        }
    }
}

constexpr int NTF = 256;  // threads per block
constexpr size_t SMEM_BYTES(int F) { return (size_t)F * (PL0 + PL2) * sizeof(int); }

template <int CIO, int F>
__global__ void __launch_bounds__(NTF) nlf_fast(const __grid_constant__ FParams p) {
    extern __shared__ int fsm[];
    int* s0 = fsm;
    int* s2 = fsm + F * PL0;
    const int ty0 = blockIdx.y * TH, tx0 = blockIdx.x * TW;
    seg_a<CIO, F>(p, ty0, tx0, threadIdx.x, blockDim.x, s0);
    __syncthreads();
    seg_b<CIO, F>(p, ty0, tx0, threadIdx.x, blockDim.x, s0, s2);
    __syncthreads();
    seg_c<CIO, F>(p, ty0, tx0, threadIdx.x, blockDim.x, s2);
}

typedef void (*FastFn)(const FParams);

template <int CIO>
struct PickFast {
    static FastFn get(int f) { return f == 8 ? nlf_fast<CIO, 8> : f == 12 ? nlf_fast<CIO, 12> : nlf_fast<CIO, 16>; }
};
static FastFn pick_fast(int cio, int f) { return by_cio<PickFast, FastFn>(cio, f); }

// Host execution of the same segment code (test hook): block by block, segment by segment.
template <int CIO, int F>
static void run_fast_host(const FParams& p) {
    std::vector<int> sm((size_t)F * (PL0 + PL2));
    for (int by = 0; by < (p.Hq + TH - 1) / TH; ++by)
        for (int bx = 0; bx < (p.Wq + TW - 1) / TW; ++bx) {
            std::fill(sm.begin(), sm.end(), 0x5a5a5a5a);  // garbage between blocks
            for (int t = 0; t < NTF; ++t) seg_a<CIO, F>(p, by * TH, bx * TW, t, NTF, sm.data());
            for (int t = 0; t < NTF; ++t) seg_b<CIO, F>(p, by * TH, bx * TW, t, NTF, sm.data(), sm.data() + F * PL0);
            for (int t = 0; t < NTF; ++t) seg_c<CIO, F>(p, by * TH, bx * TW, t, NTF, sm.data() + F * PL0);
        }
}
typedef void (*FastHostFn)(const FParams&);
template <int CIO>
struct PickFastHost {
    static FastHostFn get(int f) {
        return f == 8 ? run_fast_host<CIO, 8> : f == 12 ? run_fast_host<CIO, 12> : run_fast_host<CIO, 16>;
    }
};
static FastHostFn pick_fast_host(int cio, int f) { return by_cio<PickFastHost, FastHostFn>(cio, f); }

}  // namespace fast

// ----------------------------------------------------------------------------------- host side
struct HostPlan {
    Params p;
    std::vector<int> wts;    // weights, padded
    std::vector<Chan> chans;
    int cio = 1, maxc = 8;
    size_t smem_bytes = 0;
};

static int round_channels(int c) { return c <= 8 ? 8 : (c <= 12 ? 12 : (c <= 16 ? 16 : 32)); }

// Validate the network (same rules as the CPU kernel) and lay out the constants.
static int build_plan(const nlf_network* net, const nlf_planes* pl, HostPlan& hp) {
    if (!pl) return fail(NLF_ERR_ARG, "NULL argument");
    int rc = nlf_check::check_network(net, fail);
    if (rc != NLF_OK) return rc;
    if (net->nlayers > MAX_LAYERS)
        return fail(NLF_ERR_UNSUPPORTED, "the CUDA kernel handles at most %d layers", MAX_LAYERS);
    const int c0 = net->planes * net->ph * net->pw;
    Params& p = hp.p;
    std::memset(&p, 0, sizeof p);
    p.planes = net->planes;
    p.ph = net->ph;
    p.pw = net->pw;
    p.c0 = c0;
    p.nlayers = net->nlayers;
    hp.cio = c0 <= 1 ? 1 : (c0 <= 2 ? 2 : (c0 <= 4 ? 4 : 8));
    int cin = c0;
    for (int i = 0; i < net->nlayers; ++i) {  // shapes first: the channel limit below reads every cout
        if ((rc = nlf_check::check_layer(net, i, cin, c0, fail)) != NLF_OK) return rc;
        cin = net->layers[i].cout;
    }
    int hidden = 1;
    for (int i = 0; i + 1 < net->nlayers; ++i) hidden = std::max(hidden, net->layers[i].cout);
    if (hidden > MAX_CH)
        return fail(NLF_ERR_UNSUPPORTED, "the CUDA kernel handles at most %d channels per layer", MAX_CH);
    hp.maxc = round_channels(hidden);
    int64_t in_lo, in_hi;  // input range of the current layer
    nlf_check::first_input_range(pl->bitdepth, in_lo, in_hi);
    hp.wts.clear();
    hp.chans.clear();
    for (int i = 0; i < net->nlayers; ++i) {
        const nlf_layer& s = net->layers[i];
        const bool last = i == net->nlayers - 1;
        LayerDev& L = p.L[i];
        L.kind = s.kind;
        L.ci = i == 0 ? hp.cio : hp.maxc;
        L.co = last ? hp.cio : hp.maxc;
        const int taps = nlf_check::taps(s);
        // weights, padded: pw [co][ci], dw [co][12]
        L.woff = (int)hp.wts.size();
        const int wrow = s.kind == NLF_LAYER_PW ? L.ci : 12;
        hp.wts.resize(hp.wts.size() + (size_t)L.co * wrow + 4, 0);  // +4: keep 16-byte alignment
        hp.wts.resize((hp.wts.size() + 3) / 4 * 4, 0);
        L.coff = (int)hp.chans.size();
        hp.chans.resize(hp.chans.size() + L.co);
        const int32_t lo = nlf_check::output_min(s), hi = nlf_check::ACT_MAX;
        for (int f = L.coff; f < L.coff + L.co; ++f) hp.chans[f] = Chan{0, 0, 0, lo, hi, 0, 0};
        for (int f = 0; f < s.cout; ++f) {
            nlf_check::Channel a;
            if ((rc = nlf_check::analyse_channel(s, i, f, in_lo, in_hi, a, fail)) != NLF_OK) return rc;
            for (int k = 0; k < taps; ++k) hp.wts[L.woff + (size_t)f * wrow + k] = s.weight[(size_t)f * taps + k];
            Chan& c = hp.chans[L.coff + f];
            c.mul = (int)a.mult;  // mult <= 2^31 - 1
            c.add = a.br;
            c.shift = a.shift;
            if (a.fits32) {
                // folded: products and partial sums wrap consistently mod 2^32 and the final
                // acc*m + br lies inside int32, so the 32-bit result is exact; a shift by >= 31 of a
                // value with |v| < 2^31 is its sign, the floor of v / 2^shift
                for (int k = 0; k < taps; ++k) {
                    int& w = hp.wts[L.woff + (size_t)f * wrow + k];
                    w = (int)(unsigned)((long long)w * a.mult);
                }
                c.fold = 1;
                c.shift = std::min(a.shift, 31);
            } else if (a.high) {  // high-dword form when exact: one 64-bit shift by 32 (cheaper on the GPU)
                c.mul = (int)a.M;  // M <= INT32_MAX
                c.add = a.B;
                c.shift = 32;
            }
        }
        in_lo = lo;
        in_hi = hi;
    }
    int d = 0;
    p.D[net->nlayers] = 0;
    for (int i = net->nlayers - 1; i >= 0; --i) {
        if (net->layers[i].kind == NLF_LAYER_DW) ++d;
        p.D[i] = d;  // stage i (input of layer i)
    }
    segments(p);
    return NLF_OK;
}

// Shared memory per stage buffer for a tile th x tw.
static size_t stage_elems(const HostPlan& hp, int th, int tw) {
    size_t best = 0;
    const Params& p = hp.p;
    for (int l = 0; l < p.nlayers; ++l) {
        if (p.L[l].kind != NLF_LAYER_DW) continue;
        const int D = p.D[l];  // halo of stage l (input of the depth-wise layer)
        const size_t ch = l == 0 ? hp.cio : hp.maxc;
        best = std::max(best, ch * (size_t)(th + 2 * D) * (size_t)(tw + 2 * D));
    }
    return best;
}

// HEVC_NLF_CUDA_GENERIC=1 turns the fast path off (to compare the two kernels).
static bool fast_enabled() {
    const char* v = std::getenv("HEVC_NLF_CUDA_GENERIC");
    return !(v && *v && std::strcmp(v, "0") != 0);
}

// Fast-path plan: true when the network has the shape and ranges the fast kernel handles (see the
// fast namespace) and HEVC_NLF_CUDA_GENERIC does not turn it off; fills the kernel parameters. hp must
// come from a successful build_plan.
static bool fast_plan(const nlf_network* net, const HostPlan& hp, fast::FParams& fp, int& F) {
    using namespace fast;
    if (!fast_enabled() || net->nlayers != 5) return false;
    static const int kinds[5] = {NLF_LAYER_PW, NLF_LAYER_DW, NLF_LAYER_PW, NLF_LAYER_DW, NLF_LAYER_PW};
    const int c0 = hp.p.c0;
    if (c0 > MAXIO || (c0 & (c0 - 1))) return false;  // 1, 2, 4 or 8 input channels
    const int hidden = net->layers[0].cout;
    if (hidden > MAXF) return false;
    for (int i = 0; i < 5; ++i) {
        const nlf_layer& s = net->layers[i];
        if (s.kind != kinds[i] || (i < 4 && s.cout != hidden) || (s.relu != 0) != (i < 4)) return false;
        const int taps = nlf_check::taps(s);
        for (int k = 0; k < s.cout * taps; ++k)
            if (s.weight[k] < -128 || s.weight[k] > 127) return false;
        for (int f = 0; f < s.cout; ++f)
            if (!hp.chans[hp.p.L[i].coff + f].fold) return false;  // acc*mult + bias + round fits int32
    }
    F = hp.maxc;  // 8, 12 or 16: every hidden layer has `hidden` channels
    std::memset(&fp, 0, sizeof fp);
    fp.ph = net->ph;
    fp.pw = net->pw;
    const int pp = net->ph * net->pw;
    for (int c = 0; c < c0; ++c) {
        fp.cg[c] = c / pp;
        fp.cy[c] = (c % pp) / net->pw;
        fp.cx[c] = c % net->pw;
    }
    auto byte = [](int w, int pos) { return (int)((unsigned)(w & 0xff) << (8 * pos)); };
    const int P = (c0 + 1) / 2, H2 = F / 2;
    for (int i = 0; i < 5; ++i) {
        const nlf_layer& s = net->layers[i];
        for (int f = 0; f < s.cout; ++f) {
            const Chan& c = hp.chans[hp.p.L[i].coff + f];
            fp.mul[i][f] = (int)s.mult[f];
            fp.add[i][f] = (int)c.add;  // bias + round, inside int32 (fold)
            fp.shf[i][f] = c.shift;     // min(shift, 31)
            const int32_t* w = s.weight + (size_t)f * nlf_check::taps(s);
            if (s.kind == NLF_LAYER_DW) {
                int* d = i == 1 ? fp.d1 : fp.d3;
                for (int ky = 0; ky < 3; ++ky) {
                    const int* t = w + 3 * ky;
                    d[f * 6 + 2 * ky] = byte(t[0], 0) | byte(t[1], 1) | byte(t[2], 2);
                    d[f * 6 + 2 * ky + 1] = byte(t[0], 1) | byte(t[1], 2) | byte(t[2], 3);
                }
            } else {
                int* dst = i == 0 ? fp.w0 + f * P : (i == 2 ? fp.w2 + f * H2 : fp.w4 + f * H2);
                for (int k = 0; k < s.cin; ++k) dst[k / 2] |= byte(w[k], k % 2);
            }
        }
    }
    return true;
}

static void fast_geometry(fast::FParams& fp, const nlf_planes* pl, const Params& p) {
    fp.H = p.H;
    fp.W = p.W;
    fp.Hq = p.Hq;
    fp.Wq = p.Wq;
    fp.bd = p.bd;
    fp.sample_bytes = pl->sample_bytes;
    for (int g = 0; g < 2; ++g) {
        fp.src[g] = p.src[g];
        fp.dst[g] = p.dst[g];
        fp.ss[g] = p.ss[g];
        fp.ds[g] = p.ds[g];
    }
}

struct DeviceCache {
    void* src[2] = {nullptr, nullptr};
    void* dst[2] = {nullptr, nullptr};
    size_t plane_bytes = 0;
    void* consts = nullptr;
    size_t consts_bytes = 0;
};

static std::mutex g_mutex;
static DeviceCache g_cache;

static int cuda_fail(cudaError_t e, const char* what) {
    return fail(NLF_ERR_CUDA, "%s: %s", what, cudaGetErrorString(e));
}

static int ensure(void** ptr, size_t* have, size_t need) {
    if (*have >= need && *ptr) return NLF_OK;
    if (*ptr) cudaFree(*ptr);
    *ptr = nullptr;
    *have = 0;
    cudaError_t e = cudaMalloc(ptr, need);
    if (e != cudaSuccess) return cuda_fail(e, "cudaMalloc");
    *have = need;
    return NLF_OK;
}

// picture geometry of a call (packing already in p from the plan)
static void set_geometry(Params& p, const nlf_planes* pl) {
    p.H = pl->height;
    p.W = pl->width;
    p.Hq = (p.H + p.ph - 1) / p.ph;
    p.Wq = (p.W + p.pw - 1) / p.pw;
    p.bd = pl->bitdepth;
    p.sample_bytes = pl->sample_bytes;
}

// stream: where the work is ordered (host memory: always the legacy default stream); may_return_early:
// return once the kernel is queued when nothing has to be read back after it (nlf_cuda_filter_stream).
static int run(const nlf_network* net, const nlf_planes* pl, cudaStream_t stream = nullptr, bool may_return_early = false) {
    g_err[0] = 0;
    if (!net || !pl) return fail(NLF_ERR_ARG, "NULL argument");
    if (pl->height < 1 || pl->width < 1) return fail(NLF_ERR_ARG, "empty picture");
    if (pl->bitdepth < 8 || pl->bitdepth > 16) return fail(NLF_ERR_ARG, "bit depth %d not in 8..16", pl->bitdepth);
    if (pl->sample_bytes != 1 && pl->sample_bytes != 2) return fail(NLF_ERR_ARG, "sample_bytes must be 1 or 2");
    if (pl->sample_bytes == 1 && pl->bitdepth != 8) return fail(NLF_ERR_ARG, "8-bit samples need bit depth 8");
    if (pl->memory != NLF_MEMORY_HOST && pl->memory != NLF_MEMORY_DEVICE) return fail(NLF_ERR_ARG, "unknown memory kind");
    if (may_return_early && pl->memory != NLF_MEMORY_DEVICE)  // host copies are always synchronous
        return fail(NLF_ERR_ARG, "nlf_cuda_filter_stream takes device memory only");
    HostPlan hp;
    int rc = build_plan(net, pl, hp);
    if (rc != NLF_OK) return rc;
    for (int g = 0; g < net->planes; ++g) {
        if (!pl->src[g] || !pl->dst[g]) return fail(NLF_ERR_ARG, "plane %d: NULL pointer", g);
        if (pl->src_stride[g] < pl->width || pl->dst_stride[g] < pl->width)
            return fail(NLF_ERR_ARG, "plane %d: stride smaller than the width", g);
    }
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) return fail(NLF_ERR_NODEVICE, "no CUDA device (%s)", cudaGetErrorString(e));
    int dev = 0;
    cudaGetDevice(&dev);
    int smem_optin = 0;
    cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (smem_optin <= 0) smem_optin = 48 * 1024;

    Params& p = hp.p;
    set_geometry(p, pl);
    fast::FParams fp;
    int fastF = 0;
    const bool use_fast = fast_plan(net, hp, fp, fastF);
    // tile: 32 columns x 16 rows, fewer rows if shared memory is short
    p.tw = 32;
    p.th = 16;
    size_t elems = stage_elems(hp, p.th, p.tw);
    while (p.th > 2 && 2 * elems * sizeof(int16_t) > (size_t)smem_optin) {
        p.th /= 2;
        elems = stage_elems(hp, p.th, p.tw);
    }
    if (!use_fast && 2 * elems * sizeof(int16_t) > (size_t)smem_optin)
        return fail(NLF_ERR_UNSUPPORTED, "network needs more shared memory than the device has");
    p.buf_elems = (int)((elems + 7) / 8 * 8);
    hp.smem_bytes = 2 * (size_t)p.buf_elems * sizeof(int16_t);

    std::lock_guard<std::mutex> lock(g_mutex);
    DeviceCache& dc = g_cache;
    // constants: weights, channels, range flag
    const size_t wbytes = hp.wts.size() * sizeof(int), cbytes = hp.chans.size() * sizeof(Chan);
    const size_t coff = (wbytes + 255) / 256 * 256, foff = coff + (cbytes + 255) / 256 * 256;
    if ((rc = ensure(&dc.consts, &dc.consts_bytes, foff + 256)) != NLF_OK) return rc;
    char* cbase = static_cast<char*>(dc.consts);
    if (!use_fast) {  // the fast kernel takes its constants as launch parameters
        // on the kernel's stream (a pageable source is staged before the call returns); every earlier
        // user of this buffer has finished: generic-kernel calls wait for their kernel
        if ((e = cudaMemcpyAsync(cbase, hp.wts.data(), wbytes, cudaMemcpyHostToDevice, stream)) != cudaSuccess) return cuda_fail(e, "cudaMemcpy");
        if ((e = cudaMemcpyAsync(cbase + coff, hp.chans.data(), cbytes, cudaMemcpyHostToDevice, stream)) != cudaSuccess) return cuda_fail(e, "cudaMemcpy");
    }
    const bool need_flag = !use_fast || pl->sample_bytes == 2;  // 8-bit samples cannot exceed the range
    if (need_flag && (e = cudaMemsetAsync(cbase + foff, 0, sizeof(unsigned), stream)) != cudaSuccess) return cuda_fail(e, "cudaMemset");
    p.wts = reinterpret_cast<const int*>(cbase);
    p.chans = reinterpret_cast<const Chan*>(cbase + coff);
    p.range_flag = reinterpret_cast<unsigned*>(cbase + foff);

    const size_t sb = (size_t)pl->sample_bytes;
    const size_t row = (size_t)pl->width * sb, plane = row * (size_t)pl->height;
    if (pl->memory == NLF_MEMORY_HOST) {
        if (dc.plane_bytes < plane) {  // grow: drop the old buffers
            for (int g = 0; g < 2; ++g) {
                if (dc.src[g]) cudaFree(dc.src[g]);
                if (dc.dst[g]) cudaFree(dc.dst[g]);
                dc.src[g] = dc.dst[g] = nullptr;
            }
            dc.plane_bytes = plane;
        }
        for (int g = 0; g < net->planes; ++g) {
            if (!dc.src[g] && (e = cudaMalloc(&dc.src[g], dc.plane_bytes)) != cudaSuccess) return cuda_fail(e, "cudaMalloc");
            if (!dc.dst[g] && (e = cudaMalloc(&dc.dst[g], dc.plane_bytes)) != cudaSuccess) return cuda_fail(e, "cudaMalloc");
            e = cudaMemcpy2D(dc.src[g], row, pl->src[g], (size_t)pl->src_stride[g] * sb, row, pl->height,
                             cudaMemcpyHostToDevice);
            if (e != cudaSuccess) return cuda_fail(e, "cudaMemcpy2D to the device");
            p.src[g] = dc.src[g];
            p.dst[g] = dc.dst[g];
            p.ss[g] = p.ds[g] = pl->width;
        }
    } else {
        for (int g = 0; g < net->planes; ++g) {
            p.src[g] = pl->src[g];
            p.dst[g] = pl->dst[g];
            p.ss[g] = pl->src_stride[g];
            p.ds[g] = pl->dst_stride[g];
        }
    }

    if (use_fast) {
        fast_geometry(fp, pl, p);
        fp.range_flag = need_flag ? p.range_flag : nullptr;
        fast::FastFn fn = fast::pick_fast(hp.cio, fastF);
        const size_t smem = fast::SMEM_BYTES(fastF);
        e = cudaFuncSetAttribute(reinterpret_cast<const void*>(fn), cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return cuda_fail(e, "cudaFuncSetAttribute");
        dim3 grid((p.Wq + fast::TW - 1) / fast::TW, (p.Hq + fast::TH - 1) / fast::TH);
        fn<<<grid, fast::NTF, smem, stream>>>(fp);
    } else {
        KernelFn fn = pick_kernel(hp.cio, hp.maxc);
        e = cudaFuncSetAttribute(reinterpret_cast<const void*>(fn), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 (int)hp.smem_bytes);
        if (e != cudaSuccess) return cuda_fail(e, "cudaFuncSetAttribute");
        dim3 grid((p.Wq + p.tw - 1) / p.tw, (p.Hq + p.th - 1) / p.th);
        fn<<<grid, NT, hp.smem_bytes, stream>>>(p);
    }
    if ((e = cudaGetLastError()) != cudaSuccess) return cuda_fail(e, "kernel launch");
    // waiting: on the legacy default stream as the synchronous calls always did (a device-wide wait is
    // ≈4 µs cheaper per call than cudaStreamSynchronize(0) on an H100), else on the caller's stream
    unsigned flag = 0;
    if (need_flag) {  // the copy follows the kernel on its stream
        e = stream ? cudaMemcpyAsync(&flag, p.range_flag, sizeof flag, cudaMemcpyDeviceToHost, stream)
                   : cudaMemcpy(&flag, p.range_flag, sizeof flag, cudaMemcpyDeviceToHost);
        if (e == cudaSuccess && stream) e = cudaStreamSynchronize(stream);
        if (e != cudaSuccess) return cuda_fail(e, "kernel execution / cudaMemcpy");
    } else if (!(may_return_early && use_fast) &&
               (e = stream ? cudaStreamSynchronize(stream) : cudaDeviceSynchronize()) != cudaSuccess) {
        return cuda_fail(e, "kernel execution");
    }
    if (pl->memory == NLF_MEMORY_HOST) {
        for (int g = 0; g < net->planes; ++g) {
            e = cudaMemcpy2D(pl->dst[g], (size_t)pl->dst_stride[g] * sb, dc.dst[g], row, row, pl->height,
                             cudaMemcpyDeviceToHost);
            if (e != cudaSuccess) return cuda_fail(e, "cudaMemcpy2D from the device");
        }
    }
    if (flag) return fail(NLF_ERR_RANGE, "a sample is >= 2^%d", pl->bitdepth);
    return NLF_OK;
}

// Host execution of the same segment code, block by block and thread by thread (threads of a segment
// are independent). Used only by nlf_cuda_check_host() to test the kernel's indexing without a GPU.
static int run_host(const nlf_network* net, const nlf_planes* pl) {
    g_err[0] = 0;
    if (!net || !pl || pl->memory != NLF_MEMORY_HOST) return fail(NLF_ERR_ARG, "bad arguments");
    if (pl->bitdepth < 8 || pl->bitdepth > 16 || (pl->sample_bytes == 1 && pl->bitdepth != 8))
        return fail(NLF_ERR_ARG, "bad bit depth");
    HostPlan hp;
    int rc = build_plan(net, pl, hp);
    if (rc != NLF_OK) return rc;
    Params& p = hp.p;
    set_geometry(p, pl);
    for (int g = 0; g < net->planes; ++g) {
        p.src[g] = pl->src[g];
        p.dst[g] = pl->dst[g];
        p.ss[g] = pl->src_stride[g];
        p.ds[g] = pl->dst_stride[g];
    }
    fast::FParams fp;
    int fastF = 0;
    if (fast_plan(net, hp, fp, fastF)) {
        fast_geometry(fp, pl, p);
        unsigned flag = 0;
        fp.range_flag = &flag;
        fast::pick_fast_host(hp.cio, fastF)(fp);
        if (flag) return fail(NLF_ERR_RANGE, "a sample is >= 2^%d", pl->bitdepth);
        return NLF_OK;
    }
    p.tw = 32;
    p.th = 16;
    const size_t elems = stage_elems(hp, p.th, p.tw);
    p.buf_elems = (int)((elems + 7) / 8 * 8);
    unsigned flag = 0;
    p.wts = hp.wts.data();
    p.chans = hp.chans.data();
    p.range_flag = &flag;
    std::vector<int16_t> smem(2 * (size_t)p.buf_elems + 8);
    int16_t* buf[2] = {smem.data(), smem.data() + p.buf_elems};
    typedef void (*SegFn)(const Params&, int, int, int, int, int, int, const int16_t*, int16_t*);
    SegFn seg = nullptr;
#define NLF_PICK(CIO, MAXC) if (hp.cio == CIO && hp.maxc == MAXC) seg = run_segment<CIO, MAXC>;
#define NLF_PICK4(CIO) NLF_PICK(CIO, 8) NLF_PICK(CIO, 12) NLF_PICK(CIO, 16) NLF_PICK(CIO, 32)
    NLF_PICK4(1) NLF_PICK4(2) NLF_PICK4(4) NLF_PICK4(8)
#undef NLF_PICK4
#undef NLF_PICK
    if (!seg) return fail(NLF_ERR_INTERNAL, "no kernel for %d/%d channels", hp.cio, hp.maxc);
    for (int by = 0; by < (p.Hq + p.th - 1) / p.th; ++by)
        for (int bx = 0; bx < (p.Wq + p.tw - 1) / p.tw; ++bx) {
            std::fill(smem.begin(), smem.end(), (int16_t)0x5a5a);  // garbage between blocks
            for (int k = 0; k < p.nseg; ++k)
                for (int tid = 0; tid < NT; ++tid)
                    seg(p, p.seg0[k], p.seg1[k], by * p.th, bx * p.tw, tid, NT, buf[(k + 1) & 1], buf[k & 1]);
        }
    if (flag) return fail(NLF_ERR_RANGE, "a sample is >= 2^%d", pl->bitdepth);
    return NLF_OK;
}

}  // namespace nlfcu

extern "C" {

NLF_API int32_t nlf_abi_version(void) { return NLF_ABI_VERSION; }

NLF_API const char* nlf_strerror(int32_t code) { return nlf_error_text(code); }

NLF_API const char* nlf_last_error(void) { return nlfcu::g_err; }

NLF_API int32_t nlf_cuda_device_count(void) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        nlfcu::fail(NLF_ERR_NODEVICE, "cudaGetDeviceCount: %s", cudaGetErrorString(e));
        cudaGetLastError();  // clear the sticky-free error state
        return 0;
    }
    return n;
}

NLF_API int32_t nlf_cuda_filter(const nlf_network* net, const nlf_planes* planes) {
    try {
        return nlfcu::run(net, planes);
    } catch (...) {
        return nlfcu::fail(NLF_ERR_INTERNAL, "unexpected C++ exception");
    }
}

NLF_API int32_t nlf_cuda_filter_stream(const nlf_network* net, const nlf_planes* planes, void* stream) {
    try {
        return nlfcu::run(net, planes, static_cast<cudaStream_t>(stream), true);
    } catch (...) {
        return nlfcu::fail(NLF_ERR_INTERNAL, "unexpected C++ exception");
    }
}

// Which kernel nlf_cuda_filter would run for this network and these planes: 1 the fast kernel (the
// paper's 5-layer shape, int8 weights, 32-bit requantisation), 0 the generic one; < 0 an error code.
NLF_API int32_t nlf_cuda_kernel_path(const nlf_network* net, const nlf_planes* planes) {
    try {
        nlfcu::g_err[0] = 0;
        if (!net || !planes) return nlfcu::fail(NLF_ERR_ARG, "NULL argument");
        nlfcu::HostPlan hp;
        const int rc = nlfcu::build_plan(net, planes, hp);
        if (rc != NLF_OK) return rc;
        nlfcu::fast::FParams fp;
        int f = 0;
        return nlfcu::fast_plan(net, hp, fp, f) ? 1 : 0;
    } catch (...) {
        return nlfcu::fail(NLF_ERR_INTERNAL, "unexpected C++ exception");
    }
}

// Test hook: runs the kernel's segment code on the host (no GPU involved, slow). Lets the test suite
// check the CUDA kernel's tiling and indexing against the reference on machines without a GPU.
NLF_API int32_t nlf_cuda_check_host(const nlf_network* net, const nlf_planes* planes) {
    try {
        return nlfcu::run_host(net, planes);
    } catch (...) {
        return nlfcu::fail(NLF_ERR_INTERNAL, "unexpected C++ exception");
    }
}

}  // extern "C"
