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

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <vector>

namespace nlfcu {

constexpr int MAX_LAYERS = 64;
constexpr int MAX_CH = 32;  // hidden channels this kernel handles (Architecture allows 1..32)
constexpr int NT = 256;     // threads per block
constexpr int64_t MAX_MULT = (int64_t(1) << 31) - 1;
constexpr int64_t MAX_ABS_BIAS = int64_t(1) << 52;

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

__host__ __device__ inline unsigned load_sample(const Params& p, int g, int Y, int X) {
    const long long off = (long long)Y * p.ss[g] + X;
    if (p.sample_bytes == 1) return NLF_LDG(static_cast<const unsigned char*>(p.src[g]) + off);
    return NLF_LDG(static_cast<const unsigned short*>(p.src[g]) + off);
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
            const int pp = p.ph * p.pw, maxv = (1 << p.bd) - 1;
#pragma unroll
            for (int c = 0; c < CIO; ++c) {
                if (c >= p.c0) break;
                const int g = c / pp, dy = (c % pp) / p.pw, dx = c % p.pw;
                const int Y = gy * p.ph + dy, X = gx * p.pw + dx;
                if (Y >= p.H || X >= p.W) continue;
                int v = (int)load_sample(p, g, Y, X) + a[c];
                v = v < 0 ? 0 : (v > maxv ? maxv : v);
                const long long o = (long long)Y * p.ds[g] + X;
                if (p.sample_bytes == 1) static_cast<unsigned char*>(p.dst[g])[o] = (unsigned char)v;
                else static_cast<unsigned short*>(p.dst[g])[o] = (unsigned short)v;
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

template <int CIO>
static KernelFn pick_maxc(int maxc) {
    switch (maxc) {
        case 8: return nlf_fused<CIO, 8>;
        case 12: return nlf_fused<CIO, 12>;
        case 16: return nlf_fused<CIO, 16>;
        default: return nlf_fused<CIO, 32>;
    }
}

static KernelFn pick_kernel(int cio, int maxc) {
    switch (cio) {
        case 1: return pick_maxc<1>(maxc);
        case 2: return pick_maxc<2>(maxc);
        case 4: return pick_maxc<4>(maxc);
        default: return pick_maxc<8>(maxc);
    }
}

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
    if (!net || !pl) return fail(NLF_ERR_ARG, "NULL argument");
    if (net->planes != 1 && net->planes != 2) return fail(NLF_ERR_NETWORK, "planes must be 1 or 2");
    if ((net->ph != 1 && net->ph != 2) || (net->pw != 1 && net->pw != 2))
        return fail(NLF_ERR_NETWORK, "packing must be 1x1, 1x2, 2x1 or 2x2");
    if (net->nlayers < 1 || !net->layers) return fail(NLF_ERR_NETWORK, "network without layers");
    if (net->nlayers > MAX_LAYERS)
        return fail(NLF_ERR_UNSUPPORTED, "the CUDA kernel handles at most %d layers", MAX_LAYERS);
    const int c0 = net->planes * net->ph * net->pw;
    const int bd = pl->bitdepth;
    Params& p = hp.p;
    std::memset(&p, 0, sizeof p);
    p.planes = net->planes;
    p.ph = net->ph;
    p.pw = net->pw;
    p.c0 = c0;
    p.nlayers = net->nlayers;
    hp.cio = c0 <= 1 ? 1 : (c0 <= 2 ? 2 : (c0 <= 4 ? 4 : 8));
    int hidden = 1;
    for (int i = 0; i + 1 < net->nlayers; ++i) hidden = std::max(hidden, net->layers[i].cout);
    if (hidden > MAX_CH)
        return fail(NLF_ERR_UNSUPPORTED, "the CUDA kernel handles at most %d channels per layer", MAX_CH);
    hp.maxc = round_channels(hidden);
    int cin = c0;
    long long in_lo = -(1LL << (bd - 1)), in_hi = (1LL << (bd - 1)) - 1;
    hp.wts.clear();
    hp.chans.clear();
    for (int i = 0; i < net->nlayers; ++i) {
        const nlf_layer& s = net->layers[i];
        const bool last = i == net->nlayers - 1;
        if (s.kind != NLF_LAYER_PW && s.kind != NLF_LAYER_DW) return fail(NLF_ERR_NETWORK, "layer %d: unknown kind", i + 1);
        if (!s.weight || !s.mult || !s.bias || !s.shift) return fail(NLF_ERR_NETWORK, "layer %d: NULL array", i + 1);
        if (s.cin != cin) return fail(NLF_ERR_NETWORK, "layer %d: takes %d inputs, previous layer gives %d", i + 1, s.cin, cin);
        if (s.cout < 1) return fail(NLF_ERR_NETWORK, "layer %d: no outputs", i + 1);
        if (s.kind == NLF_LAYER_DW && s.cout != s.cin) return fail(NLF_ERR_NETWORK, "layer %d: depth-wise cin != cout", i + 1);
        if (last && s.cout != c0) return fail(NLF_ERR_NETWORK, "last layer has %d outputs, expected %d", s.cout, c0);
        LayerDev& L = p.L[i];
        L.kind = s.kind;
        L.ci = i == 0 ? hp.cio : hp.maxc;
        L.co = last ? hp.cio : hp.maxc;
        const int taps = s.kind == NLF_LAYER_PW ? s.cin : 9;
        // weights, padded: pw [co][ci], dw [co][12]
        L.woff = (int)hp.wts.size();
        const int wrow = s.kind == NLF_LAYER_PW ? L.ci : 12;
        hp.wts.resize(hp.wts.size() + (size_t)L.co * wrow + 4, 0);  // +4: keep 16-byte alignment
        hp.wts.resize((hp.wts.size() + 3) / 4 * 4, 0);
        L.coff = (int)hp.chans.size();
        hp.chans.resize(hp.chans.size() + L.co);
        const int32_t lo = s.relu ? 0 : -32768, hi = 32767;
        for (int f = L.coff; f < L.coff + L.co; ++f) hp.chans[f] = Chan{0, 0, 0, lo, hi, 0, 0};
        for (int f = 0; f < s.cout; ++f) {
            long long amin = 0, amax = 0;
            for (int k = 0; k < taps; ++k) {
                const int w = s.weight[(size_t)f * taps + k];
                if (w < -32767 || w > 32767) return fail(NLF_ERR_NETWORK, "layer %d: weight out of range", i + 1);
                hp.wts[L.woff + (size_t)f * wrow + k] = w;
                if (w >= 0) { amin += w * in_lo; amax += w * in_hi; }
                else { amin += w * in_hi; amax += w * in_lo; }
            }
            if (amin < INT32_MIN || amax > INT32_MAX)
                return fail(NLF_ERR_NETWORK, "layer %d: accumulator may exceed 32 bits", i + 1);
            const long long m = s.mult[f], b = s.bias[f], sh = s.shift[f];
            if (m < 0 || m > MAX_MULT) return fail(NLF_ERR_NETWORK, "layer %d: multiplier out of range", i + 1);
            if (sh < 0 || sh > 62) return fail(NLF_ERR_NETWORK, "layer %d: shift out of range", i + 1);
            if (b < -MAX_ABS_BIAS || b > MAX_ABS_BIAS) return fail(NLF_ERR_NETWORK, "layer %d: bias out of range", i + 1);
            const long long br = b + ((1LL << sh) >> 1);
            const __int128 t1 = (__int128)amin * m + br, t2 = (__int128)amax * m + br;
            const __int128 lim = (__int128)1 << 63;
            if (t1 >= lim || t1 < -lim || t2 >= lim || t2 < -lim)
                return fail(NLF_ERR_NETWORK, "layer %d: product may exceed 64 bits", i + 1);
            Chan& c = hp.chans[L.coff + f];
            c.mul = (int)m;  // m <= 2^31 - 1
            c.add = br;
            c.shift = (int)sh;
            if ((__int128)amin * m + br >= INT32_MIN && (__int128)amax * m + br <= INT32_MAX) {
                // folded: products and partial sums wrap consistently mod 2^32 and the final
                // acc*m + br lies inside int32, so the 32-bit result is exact; a shift by >= 31 of a
                // value with |v| < 2^31 is its sign, the floor of v / 2^shift
                for (int k = 0; k < taps; ++k) {
                    int& w = hp.wts[L.woff + (size_t)f * wrow + k];
                    w = (int)(unsigned)((long long)w * m);
                }
                c.fold = 1;
                c.shift = (int)std::min<long long>(sh, 31);
            } else if (sh <= 32) {  // high-dword form when exact: one 64-bit shift by 32 (cheaper on the GPU)
                const __int128 scale = (__int128)1 << (32 - sh);  // multiply: br may be negative
                const __int128 M = (__int128)m * scale, B = (__int128)br * scale;
                const __int128 u1 = (__int128)amin * M + B, u2 = (__int128)amax * M + B;
                if (M <= INT32_MAX && B < lim && B >= -lim && u1 < lim && u1 >= -lim && u2 < lim && u2 >= -lim) {
                    c.mul = (int)M;  // M <= INT32_MAX
                    c.add = (long long)B;
                    c.shift = 32;
                }
            }
        }
        cin = s.cout;
        in_lo = s.relu ? 0 : -32768;
        in_hi = 32767;
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

static int run(const nlf_network* net, const nlf_planes* pl) {
    g_err[0] = 0;
    if (!net || !pl) return fail(NLF_ERR_ARG, "NULL argument");
    if (pl->height < 1 || pl->width < 1) return fail(NLF_ERR_ARG, "empty picture");
    if (pl->bitdepth < 8 || pl->bitdepth > 16) return fail(NLF_ERR_ARG, "bit depth %d not in 8..16", pl->bitdepth);
    if (pl->sample_bytes != 1 && pl->sample_bytes != 2) return fail(NLF_ERR_ARG, "sample_bytes must be 1 or 2");
    if (pl->sample_bytes == 1 && pl->bitdepth != 8) return fail(NLF_ERR_ARG, "8-bit samples need bit depth 8");
    if (pl->memory != NLF_MEMORY_HOST && pl->memory != NLF_MEMORY_DEVICE) return fail(NLF_ERR_ARG, "unknown memory kind");
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
    // tile: 32 columns x 16 rows, fewer rows if shared memory is short
    p.tw = 32;
    p.th = 16;
    size_t elems = stage_elems(hp, p.th, p.tw);
    while (p.th > 2 && 2 * elems * sizeof(int16_t) > (size_t)smem_optin) {
        p.th /= 2;
        elems = stage_elems(hp, p.th, p.tw);
    }
    if (2 * elems * sizeof(int16_t) > (size_t)smem_optin)
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
    if ((e = cudaMemcpy(cbase, hp.wts.data(), wbytes, cudaMemcpyHostToDevice)) != cudaSuccess) return cuda_fail(e, "cudaMemcpy");
    if ((e = cudaMemcpy(cbase + coff, hp.chans.data(), cbytes, cudaMemcpyHostToDevice)) != cudaSuccess) return cuda_fail(e, "cudaMemcpy");
    if ((e = cudaMemset(cbase + foff, 0, sizeof(unsigned))) != cudaSuccess) return cuda_fail(e, "cudaMemset");
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

    KernelFn fn = pick_kernel(hp.cio, hp.maxc);
    e = cudaFuncSetAttribute(reinterpret_cast<const void*>(fn), cudaFuncAttributeMaxDynamicSharedMemorySize,
                             (int)hp.smem_bytes);
    if (e != cudaSuccess) return cuda_fail(e, "cudaFuncSetAttribute");
    dim3 grid((p.Wq + p.tw - 1) / p.tw, (p.Hq + p.th - 1) / p.th);
    fn<<<grid, NT, hp.smem_bytes>>>(p);
    if ((e = cudaGetLastError()) != cudaSuccess) return cuda_fail(e, "kernel launch");
    if ((e = cudaDeviceSynchronize()) != cudaSuccess) return cuda_fail(e, "kernel execution");
    unsigned flag = 0;
    if ((e = cudaMemcpy(&flag, p.range_flag, sizeof flag, cudaMemcpyDeviceToHost)) != cudaSuccess)
        return cuda_fail(e, "cudaMemcpy");
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
    p.tw = 32;
    p.th = 16;
    const size_t elems = stage_elems(hp, p.th, p.tw);
    p.buf_elems = (int)((elems + 7) / 8 * 8);
    unsigned flag = 0;
    p.wts = hp.wts.data();
    p.chans = hp.chans.data();
    p.range_flag = &flag;
    for (int g = 0; g < net->planes; ++g) {
        p.src[g] = pl->src[g];
        p.dst[g] = pl->dst[g];
        p.ss[g] = pl->src_stride[g];
        p.ds[g] = pl->dst_stride[g];
    }
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
