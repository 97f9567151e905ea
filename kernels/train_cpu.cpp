// train_cpu.cpp — forward + backward of one NlfNet training step on the CPU (C ABI: nlf_train.h).
//
// Computes what hevc_ext.model.NlfNet + F.mse_loss + loss.backward() compute in PyTorch (training
// mode), for the whole batch, ~an order of magnitude faster than PyTorch/oneDNN on these
// 1..32-channel convolutions.
//
// Design
// ------
// * Layout: every activation tensor is a set of per-(image, channel) planes with a one-pixel zero
//   border, (Hq+2) x (Wq+2) floats at a common plane stride PS (multiple of 16 floats). A plane is
//   processed as a FLAT sequence of 16-float vectors covering the interior rows (border columns
//   included): a point-wise layer is a tiny matrix product over those vectors, a depth-wise 3x3 layer
//   is 9 FMAs with shifted (unaligned) loads at the offsets (dy-1)*RS + (dx-1). Results at border
//   positions are masked to zero (a per-position mask plane), so every position outside the interior
//   of every plane is zero at all times: that is the zero padding of the depth-wise layers, for
//   activations and gradients alike, and it keeps border positions out of every sum.
// * Batch norm couples the batch, so the step is a sequence of passes over the batch, one per layer
//   and direction, each fusing all per-pixel work of a layer:
//     forward l < L-1 : A[l+1] = relu(conv_l(A[l]; W'_l, b'_l)), + the batch statistics of A[l+1]
//                       (sum, sum of squares); W'_l = W*scale, b'_l = b + W*shift folded from the
//                       statistics of A[l] completed by the previous pass.
//     forward L-1     : output, loss, gz = dL/dz, dL/dW'_{L-1}, dL/db'_{L-1}, and
//                       P[L-1] = conv^T(gz; W'_{L-1}) (the input gradient without the BN terms).
//     backward l      : gz_l = (P[l+1] + alpha_{l+1} + beta_{l+1} * A[l+1]) * [A[l+1] > 0]
//                       (alpha, beta: the gradient through the batch mean / variance of layer l+1's
//                       input, per channel), dL/dW'_l, dL/db'_l, and P[l] = conv^T(gz_l; W'_l).
//   Between passes the main thread does the per-channel algebra in float64 (fold, running stats,
//   dW = dW'*scale + db'*shift, dgamma, dbeta, alpha, beta).
// * Memory: per step the passes stream ~19 tensors of 64 x 12 x 52 x 52 floats (~8.7 MB each) for
//   the default luma network; the kernels run at the FMA throughput of the core when the data is in
//   cache, so traffic matters. A[1] = relu(W0 x + b0) is never stored but recomputed from the packed
//   input (C0 <= 4 FMAs per value) in the three passes that read it; each thread prefetches the
//   planes of its next image while it works on the current one; big buffers ask for huge pages.
// * Precision: float32 storage and arithmetic like PyTorch; the batch statistics are summed in
//   float64 (float partial sums over at most 32 vectors), so are all per-image reductions, and the
//   per-channel algebra is float64. Results are at least as close to float64 autograd as float32
//   autograd is in our tests.
// * Threads: a persistent pool (workers spin ~40 us between passes, then sleep); images are handed
//   out dynamically. Every reduction (statistics, weight gradients, loss) is kept per image and
//   summed in image order afterwards, so results do not depend on the thread count or scheduling.
// * Instruction sets: the kernels are written once with GCC vector extensions (16-float vectors)
//   and compiled three times into namespaces by including this file into itself under
//   "#pragma GCC target": AVX-512, AVX2+FMA, and the baseline (portable). Dispatch at run time.
// * Debugging knobs (environment, read when the engine sizes its buffers): NLFT_STORE_A1=1 stores
//   A[1] instead of recomputing it, NLFT_NO_PREFETCH=1 turns the software prefetch off.

#ifndef NLFT_ISA_PASS  // ====================================================== common part

#include "nlf_train.h"
#include "nlf_cpu_features.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#define NLFT_X86 1
#include <immintrin.h>
#else
#define NLFT_X86 0
#endif

#if NLFT_X86 && defined(__GNUC__) && !defined(__clang__)
#define NLFT_MULTI_ISA 1
#else
#define NLFT_MULTI_ISA 0
#endif

#pragma GCC diagnostic ignored "-Wpsabi"
#if defined(__clang__)
#pragma clang fp contract(fast)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=fast")  // a*b+c -> FMA in the kernels, whatever -std= the build uses
#endif

namespace nlft {

static thread_local char g_last_error[512] = "";

static int fail(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(int code, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(g_last_error, sizeof g_last_error, fmt, ap);
    va_end(ap);
    return code;
}

constexpr int MAXC = 64;     // channels per layer
constexpr int MAXL = 63;     // layers
constexpr int VEC = 16;      // floats per vector

static size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

template <typename T>
struct AlignedBuf {
    T* p = nullptr;
    size_t n = 0;
    AlignedBuf() = default;
    AlignedBuf(const AlignedBuf&) = delete;
    AlignedBuf& operator=(const AlignedBuf&) = delete;
    ~AlignedBuf() { std::free(p); }
    bool alloc(size_t count) {
        std::free(p);
        p = nullptr;
        n = 0;
        size_t bytes = round_up(std::max<size_t>(count, 1) * sizeof(T), 64);
        const size_t huge = size_t(2) << 20;
        const bool big = bytes >= 2 * huge;
        if (big) bytes = round_up(bytes, huge);
        p = static_cast<T*>(std::aligned_alloc(big ? huge : 64, bytes));
        if (!p) return false;
#ifdef MADV_HUGEPAGE
        // Transparent huge pages where the system leaves them to madvise: the tensors are walked
        // plane by plane across many 4 KiB pages, which otherwise costs TLB misses.
        if (big) madvise(static_cast<void*>(p), bytes, MADV_HUGEPAGE);
#endif
        std::memset(static_cast<void*>(p), 0, bytes);
        n = count;
        return true;
    }
    void zero() {
        if (p) std::memset(static_cast<void*>(p), 0, n * sizeof(T));
    }
};

// Geometry of one batch. Planes: rows 0..Hq+1, columns 0..Wq+1 (row stride RS = Wq + 2), the interior
// at rows/columns 1..Hq / 1..Wq. Vectors [v0, v1) of a plane cover the interior.
struct Geo {
    int N = 0, G = 0, PH = 1, PW = 1, H = 0, W = 0, h = 0, w = 0;
    int C0 = 0, Hq = 0, Wq = 0, RS = 0, v0 = 0, v1 = 0;
    size_t PS = 0, guard = 0;
    bool same(const Geo& o) const {
        return N == o.N && G == o.G && PH == o.PH && PW == o.PW && H == o.H && W == o.W && h == o.h && w == o.w;
    }
    size_t tensor_floats(int C) const { return 2 * guard + (size_t)N * C * PS; }
};

// One layer during a step.
struct LayerRT {
    int kind = 0, cin = 0, cout = 0, relu = 0, bn = 0, bias = 0;
    const nlft_layer* src = nullptr;
    double cnt = 0;                                        // BN element count per channel
    std::vector<double> mean, var, varraw, r, scale, shift;  // per input channel
    std::vector<float> wf, wft, bf;                        // folded weights, transposed (pw), folded bias
    std::vector<float> alpha, beta;                        // input-gradient BN terms per input channel
    std::vector<double> red_stats;                         // [N][2][cout]: sums of this layer's output
    std::vector<double> red_dw;                            // [N][nw]
    std::vector<double> red_db;                            // [N][cout]
    int nw() const { return kind == NLFT_LAYER_PW ? cout * cin : cout * 9; }
};

// Software prefetch of the next image's planes, spread over the current image's work: tick() is
// called from the inner loops; the number of lines per tick adapts to the ticks the previous image
// took, so the prefetch finishes about when the current image does.
struct Prefetcher {
    struct Range {
        const char* p;
        size_t lines;
    };
    Range r[8];
    int nr = 0, cur = 0;
    size_t pos = 0;
    long ticks = 0, last_ticks = 0;
    int per_tick = 1;
    void begin() {
        if (ticks > 0) last_ticks = ticks;
        ticks = 0;
        nr = cur = 0;
        pos = 0;
    }
    void add(const void* p, size_t bytes) {
        if (nr < 8 && p && bytes) r[nr++] = {static_cast<const char*>(p), (bytes + 63) / 64};
    }
    void plan() {
        size_t total = 0;
        for (int i = 0; i < nr; ++i) total += r[i].lines;
        const long t = last_ticks > 0 ? last_ticks : 256;
        per_tick = (int)std::max<size_t>(1, (total + t - 1) / t);
    }
    inline void tick() {
        ++ticks;
        for (int i = 0; i < per_tick && cur < nr; ++i) {
            __builtin_prefetch(r[cur].p + 64 * pos, 0, 2);
            if (++pos == r[cur].lines) {
                ++cur;
                pos = 0;
            }
        }
    }
};

struct Scratch {
    float* gzc = nullptr;  // [Cm][CV*16]
    float* gs = nullptr;   // one guarded plane (depth-wise backward), zero outside the interior range
    float* tg = nullptr;   // [C0][PS] packed target
    float* acc = nullptr;  // vector accumulators
    float* a1 = nullptr;   // guarded planes of A[1] of the current image (when recomputed from X)
    Prefetcher pf;
};

// Everything the per-image kernels read.
struct Ctx {
    const Geo* g = nullptr;
    LayerRT* L = nullptr;
    int nl = 0;
    int CV = 16;              // vectors per chunk (point-wise backward)
    bool a1v = false;         // A[1] is not stored but recomputed from X per image
    float* A[MAXL + 1] = {};  // tensor bases: A[0] = X, A[l] l = 1..nl-1 (plane (n, c) at
                              // base + guard + (n*C + c)*PS)
    int ch[MAXL + 1] = {};    // channels of A[l]
    float* P[2] = {};         // P[l & 1]: channels L[l].cin
    const int32_t* imask = nullptr;  // [PS] interior mask (-1 / 0)
    const uint16_t* ibits = nullptr; // [PS / 16] the same, 16 bits per vector
    const int32_t* cmask = nullptr;  // [C0][PS] crop mask of the loss
    const float* x = nullptr;
    const float* target = nullptr;
    Scratch* th = nullptr;
    double* red_loss = nullptr;  // [N]
    float gscale = 0.f;          // 2 / numel
    // planes of A[k] of image n (plane c at + c*PS)
    float* act(int k, int tid, int n) const {
        if (k == 1 && a1v) return th[tid].a1 + g->guard;
        return A[k] + g->guard + (size_t)n * ch[k] * g->PS;
    }
    float* pgrad(int l, int n) const { return P[l & 1] + g->guard + (size_t)n * L[l].cin * g->PS; }
};

struct Kernels {
    void (*fwd)(const Ctx&, int l, int tid, int n);
    void (*fwd_last)(const Ctx&, int tid, int n);
    void (*bwd)(const Ctx&, int l, int tid, int n);
};


// Row copy from a sample row into plane rows: d0[i] = s[i] (pw == 1), or the even / odd samples
// into d0 / d1 (pw == 2; n0, n1 of them).
static void copy_row(float* d0, float* d1, const float* s, int n0, int n1, int pw) {
    if (pw == 1) {
        std::memcpy(d0, s, sizeof(float) * n0);
        return;
    }
    int i = 0;
#if NLFT_X86 && defined(__SSE__)
    const int nv = std::min(n0, n1);
    for (; i + 4 <= nv; i += 4) {  // SSE: the baseline of x86-64
        const __m128 a = _mm_loadu_ps(s + 2 * i), b = _mm_loadu_ps(s + 2 * i + 4);
        _mm_storeu_ps(d0 + i, _mm_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
        _mm_storeu_ps(d1 + i, _mm_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
    }
#endif
    for (int j = i; j < n0; ++j) d0[j] = s[2 * j];
    for (int j = i; j < n1; ++j) d1[j] = s[2 * j + 1];
}

static void pack_input(const Ctx& C, int n) {
    const Geo& g = *C.g;
    const size_t HW = (size_t)g.H * g.W;
    float* base = C.act(0, 0, n);
    for (int gi = 0; gi < g.G; ++gi)
        for (int dy = 0; dy < g.PH; ++dy) {
            const int c = (gi * g.PH + dy) * g.PW;
            float* d0 = base + (size_t)c * g.PS + g.RS + 1;
            float* d1 = d0 + (g.PW == 2 ? g.PS : 0);
            const float* src = C.x + ((size_t)n * g.G + gi) * HW + (size_t)dy * g.W;
            for (int qy = 0; qy < g.Hq; ++qy)
                copy_row(d0 + (size_t)qy * g.RS, d1 + (size_t)qy * g.RS, src + (size_t)qy * g.PH * g.W, g.Wq,
                         g.Wq, g.PW);
        }
}

// The target of image n, packed into the thread's planes (positions outside the crop stay zero).
static void pack_target(const Ctx& C, int tid, int n) {
    const Geo& g = *C.g;
    float* tg = C.th[tid].tg;
    const size_t hw = (size_t)g.h * g.w;
    const int n0 = (g.w + g.PW - 1) / g.PW, n1 = g.w / g.PW;
    for (int gi = 0; gi < g.G; ++gi)
        for (int dy = 0; dy < g.PH; ++dy) {
            const int c = (gi * g.PH + dy) * g.PW;
            const int ny = (g.h - dy + g.PH - 1) / g.PH;
            float* d0 = tg + (size_t)c * g.PS + g.RS + 1;
            float* d1 = d0 + (g.PW == 2 ? g.PS : 0);
            const float* src = C.target + ((size_t)n * g.G + gi) * hw + (size_t)dy * g.w;
            for (int qy = 0; qy < ny; ++qy)
                copy_row(d0 + (size_t)qy * g.RS, d1 + (size_t)qy * g.RS, src + (size_t)qy * g.PH * g.w, n0, n1, g.PW);
        }
}

}  // namespace nlft

// ============================================================ per-instruction-set implementations
#define NLFT_ISA_PASS 1

#if defined(__GNUC__) && !defined(__clang__) && NLFT_MULTI_ISA
// the portable pass is a fallback on x86: -O2 halves its (long) compile time
#pragma GCC push_options
#pragma GCC optimize("O2")
#endif
#define NLFT_NS isa_generic
#define NLFT_ISA_ID 0
#include "train_cpu.cpp"
#undef NLFT_ISA_ID
#undef NLFT_NS
#if defined(__GNUC__) && !defined(__clang__) && NLFT_MULTI_ISA
#pragma GCC pop_options
#endif

#if NLFT_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define NLFT_NS isa_avx2
#define NLFT_ISA_ID 1
#include "train_cpu.cpp"
#undef NLFT_ISA_ID
#undef NLFT_NS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#define NLFT_NS isa_avx512
#define NLFT_ISA_ID 2
#include "train_cpu.cpp"
#undef NLFT_ISA_ID
#undef NLFT_NS
#pragma GCC pop_options
#endif
#undef NLFT_ISA_PASS

// ================================================================================= driver / ABI
namespace nlft {

static_assert(NLFT_ISA_GENERIC == nlf_cpu::LEVEL_PORTABLE && NLFT_ISA_AVX2 == nlf_cpu::LEVEL_AVX2 &&
              NLFT_ISA_AVX512 == nlf_cpu::LEVEL_AVX512, "nlf_train.h's ISA numbers are nlf_cpu_features.h's levels");
constexpr int COMPILED_ISA = NLFT_MULTI_ISA ? NLFT_ISA_AVX512 : NLFT_ISA_GENERIC;

static bool cpu_has(int isa) { return isa <= COMPILED_ISA && nlf_cpu::has(isa, nlf_cpu::EXTRA_FMA); }
static int best_isa() { return nlf_cpu::best(nlf_cpu::EXTRA_FMA, COMPILED_ISA); }

static Kernels kernels_for(int isa) {
    switch (isa) {
#if NLFT_MULTI_ISA
        case NLFT_ISA_AVX512: return {isa_avx512::image_fwd, isa_avx512::image_fwd_last, isa_avx512::image_bwd};
        case NLFT_ISA_AVX2: return {isa_avx2::image_fwd, isa_avx2::image_fwd_last, isa_avx2::image_bwd};
#endif
        default: return {isa_generic::image_fwd, isa_generic::image_fwd_last, isa_generic::image_bwd};
    }
}

// ------------------------------------------------------------------------------ thread pool
// Persistent workers; run(f) calls f(tid) on every thread (the caller is tid 0) and returns when all
// are done. Workers spin briefly before sleeping, as passes follow each other within microseconds.
class Pool {
public:
    explicit Pool(int n) : n_(n) {}
    ~Pool() {
        {
            std::lock_guard<std::mutex> lk(mu_);
            stop_ = true;
        }
        cv_.notify_all();
        for (auto& t : th_) t.join();
    }
    bool start() {
        try {
            for (int i = 1; i < n_; ++i) th_.emplace_back(&Pool::worker, this, i);
        } catch (const std::exception&) {
            return false;
        }
        return true;
    }
    int size() const { return n_; }
    template <class F>
    void run(F& f) {
        if (n_ == 1) {
            f(0);
            return;
        }
        fn_ = &call<F>;
        arg_ = &f;
        remaining_.store(n_ - 1, std::memory_order_relaxed);
        {
            std::lock_guard<std::mutex> lk(mu_);
            gen_.fetch_add(1, std::memory_order_release);
        }
        cv_.notify_all();
        f(0);
        if (!spin_until([&] { return remaining_.load(std::memory_order_acquire) == 0; })) {
            std::unique_lock<std::mutex> lk(mu_);
            done_cv_.wait(lk, [&] { return remaining_.load(std::memory_order_acquire) == 0; });
        }
    }

private:
    // Spin (with pause) up to ~kSpinUs for cond(); passes follow each other within microseconds, but
    // on a shared machine a long spin only takes the core from the thread that has the work.
    static constexpr int kSpinUs = 40;
    template <class Cond>
    static bool spin_until(Cond&& cond) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 1;; ++i) {
            if (cond()) return true;
            pause();
            if ((i & 31) == 0 &&
                std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(kSpinUs))
                return cond();
        }
    }
    template <class F>
    static void call(void* a, int tid) { (*static_cast<F*>(a))(tid); }
    static void pause() {
#if NLFT_X86
        _mm_pause();
#endif
    }
    void worker(int tid) {
        uint64_t seen = 0;
        for (;;) {
            spin_until([&] { return gen_.load(std::memory_order_acquire) != seen; });
            {
                std::unique_lock<std::mutex> lk(mu_);
                cv_.wait(lk, [&] { return stop_ || gen_.load(std::memory_order_acquire) != seen; });
                if (stop_) return;
                seen = gen_.load(std::memory_order_acquire);
            }
            fn_(arg_, tid);
            if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
                std::lock_guard<std::mutex> lk(mu_);
                done_cv_.notify_one();
            }
        }
    }
    int n_;
    std::vector<std::thread> th_;
    std::mutex mu_;
    std::condition_variable cv_, done_cv_;
    std::atomic<uint64_t> gen_{0};
    std::atomic<int> remaining_{0};
    void (*fn_)(void*, int) = nullptr;
    void* arg_ = nullptr;
    bool stop_ = false;
};

// ------------------------------------------------------------------------------------ engine
struct Engine {
    int threads = 1, isa = NLFT_ISA_GENERIC;
    Kernels K{};
    Pool* pool = nullptr;
    Geo geo;
    bool have_geo = false;
    int cfg_nl = -1, cfg_cm = 0;
    std::vector<int> cfg_ch;  // channels of A[1..nl-1]
    AlignedBuf<float> X, Pb[2], scratch;
    std::vector<AlignedBuf<float>*> A;
    AlignedBuf<int32_t> imask, cmask;
    AlignedBuf<uint16_t> ibits;
    std::vector<Scratch> th;
    std::vector<LayerRT> L;
    std::vector<double> red_loss;
    int CV = 16;
    bool a1v = false;
    bool prefetch = true;

    ~Engine() {
        delete pool;
        for (auto* a : A) delete a;
    }
};

static int validate(const nlft_network* net, const nlft_batch* b) {
    if (!net || !b) return fail(NLFT_ERR_ARG, "NULL argument");
    if (net->planes != 1 && net->planes != 2) return fail(NLFT_ERR_NETWORK, "planes must be 1 or 2, got %d", net->planes);
    if ((net->ph != 1 && net->ph != 2) || (net->pw != 1 && net->pw != 2))
        return fail(NLFT_ERR_NETWORK, "packing must be 1 or 2 in each direction, got %dx%d", net->ph, net->pw);
    if (net->nlayers < 1 || net->nlayers > MAXL || !net->layers)
        return fail(NLFT_ERR_NETWORK, "number of layers %d not in 1..%d", net->nlayers, MAXL);
    const int c0 = net->planes * net->ph * net->pw;
    int cin = c0;
    for (int i = 0; i < net->nlayers; ++i) {
        const nlft_layer& l = net->layers[i];
        const bool last = i == net->nlayers - 1;
        if (l.kind != NLFT_LAYER_PW && l.kind != NLFT_LAYER_DW)
            return fail(NLFT_ERR_NETWORK, "layer %d: unknown kind %d", i, l.kind);
        if (l.cin != cin) return fail(NLFT_ERR_NETWORK, "layer %d: %d inputs, previous layer gives %d", i, l.cin, cin);
        if (l.cout < 1 || l.cout > MAXC) return fail(NLFT_ERR_UNSUPPORTED, "layer %d: %d outputs (1..%d)", i, l.cout, MAXC);
        if (l.kind == NLFT_LAYER_DW && l.cout != l.cin)
            return fail(NLFT_ERR_NETWORK, "layer %d: depth-wise with %d inputs and %d outputs", i, l.cin, l.cout);
        if ((i == 0 || last) && l.kind != NLFT_LAYER_PW)
            return fail(NLFT_ERR_UNSUPPORTED, "layer %d: the first and the last layer must be point-wise", i);
        if (last && l.cout != c0) return fail(NLFT_ERR_NETWORK, "last layer has %d outputs, expected %d", l.cout, c0);
        if ((l.relu != 0) != !last)
            return fail(NLFT_ERR_UNSUPPORTED, "layer %d: ReLU is supported exactly on every layer but the last", i);
        if (i == 0 && l.gamma) return fail(NLFT_ERR_UNSUPPORTED, "batch norm on the first layer is not supported");
        if (!l.weight || !l.grad_weight) return fail(NLFT_ERR_ARG, "layer %d: NULL weight or weight gradient", i);
        if (l.gamma && (!l.beta || !l.running_mean || !l.running_var))
            return fail(NLFT_ERR_ARG, "layer %d: batch norm without beta or running statistics", i);
        if (l.gamma && !(l.eps > 0)) return fail(NLFT_ERR_ARG, "layer %d: eps must be positive", i);
        cin = l.cout;
    }
    if (b->n < 1 || b->height < 1 || b->width < 1) return fail(NLFT_ERR_ARG, "empty batch");
    if (b->height % net->ph || b->width % net->pw)
        return fail(NLFT_ERR_ARG, "input %dx%d is not a multiple of the packing %dx%d", b->height, b->width, net->ph, net->pw);
    if (b->crop_h < 1 || b->crop_w < 1 || b->crop_h > b->height || b->crop_w > b->width)
        return fail(NLFT_ERR_ARG, "target %dx%d does not fit in the input %dx%d", b->crop_h, b->crop_w, b->height, b->width);
    if (!b->x || !b->target) return fail(NLFT_ERR_ARG, "NULL input or target");
    if ((double)b->n * (b->height / net->ph + 2) * (b->width / net->pw + 2) > 2e8)
        return fail(NLFT_ERR_UNSUPPORTED, "batch too large");
    return NLFT_OK;
}

static int configure(Engine& E, const nlft_network* net, const nlft_batch* b) {
    Geo g;
    g.N = b->n;
    g.G = net->planes;
    g.PH = net->ph;
    g.PW = net->pw;
    g.H = b->height;
    g.W = b->width;
    g.h = b->crop_h;
    g.w = b->crop_w;
    g.C0 = g.G * g.PH * g.PW;
    g.Hq = g.H / g.PH;
    g.Wq = g.W / g.PW;
    g.RS = g.Wq + 2;
    const int first = g.RS + 1, lastq = g.Hq * g.RS + g.Wq;
    g.v0 = first / VEC;
    g.v1 = g.v0 + (int)round_up(lastq / VEC + 1 - g.v0, 4);
    g.PS = round_up(std::max<size_t>((size_t)(g.Hq + 2) * g.RS, (size_t)g.v1 * VEC + 32), VEC);
    g.guard = round_up(g.RS + 48, VEC);

    std::vector<int> ch;
    int cm = g.C0;
    for (int i = 0; i < net->nlayers; ++i) cm = std::max(cm, net->layers[i].cout);
    for (int i = 0; i + 1 < net->nlayers; ++i) ch.push_back(net->layers[i].cout);
    const bool same_net = E.cfg_nl == net->nlayers && E.cfg_ch == ch && E.cfg_cm == cm;
    if (E.have_geo && g.same(E.geo) && same_net) return NLFT_OK;

    E.have_geo = false;
    E.geo = g;
    E.CV = std::max(4, std::min(16, 192 / cm / 4 * 4));
    // A[1] = relu(W0 x + b0) costs C0 FMAs per value to recompute, less than reading it back.
    E.a1v = net->nlayers >= 3 && g.C0 <= 4 && !std::getenv("NLFT_STORE_A1");
    E.prefetch = !std::getenv("NLFT_NO_PREFETCH");

    if (!E.X.alloc(g.tensor_floats(g.C0))) return fail(NLFT_ERR_NOMEM, "out of memory");
    for (auto* a : E.A) delete a;
    E.A.clear();
    for (size_t i = 0; i < ch.size(); ++i) {
        E.A.push_back(new (std::nothrow) AlignedBuf<float>());
        const size_t sz = (i == 0 && E.a1v) ? 0 : g.tensor_floats(ch[i]);
        if (!E.A.back() || !E.A.back()->alloc(sz)) return fail(NLFT_ERR_NOMEM, "out of memory");
    }
    for (auto& p : E.Pb)
        if (!p.alloc(g.tensor_floats(cm))) return fail(NLFT_ERR_NOMEM, "out of memory");
    // masks
    if (!E.imask.alloc(g.PS) || !E.cmask.alloc(g.PS * g.C0) || !E.ibits.alloc(g.PS / VEC))
        return fail(NLFT_ERR_NOMEM, "out of memory");
    for (size_t q = 0; q < g.PS; ++q) {
        const int row = (int)(q / g.RS), col = (int)(q % g.RS);
        const bool in = row >= 1 && row <= g.Hq && col >= 1 && col <= g.Wq;
        E.imask.p[q] = in ? -1 : 0;
        if (in) E.ibits.p[q / VEC] |= (uint16_t)(1u << (q % VEC));
        for (int gi = 0; gi < g.G; ++gi)
            for (int dy = 0; dy < g.PH; ++dy)
                for (int dx = 0; dx < g.PW; ++dx) {
                    const int c = (gi * g.PH + dy) * g.PW + dx;
                    const bool crop = in && (row - 1) * g.PH + dy < g.h && (col - 1) * g.PW + dx < g.w;
                    E.cmask.p[(size_t)c * g.PS + q] = crop ? -1 : 0;
                }
    }
    // per-thread scratch
    const size_t gzc = round_up((size_t)cm * E.CV * VEC, VEC);
    const size_t gs = round_up(g.PS + 2 * g.guard, VEC);
    const size_t tg = (size_t)g.C0 * g.PS;
    const size_t acc = (size_t)VEC * ((size_t)cm * std::max(cm, 9) + 4 * cm + 16);
    const size_t a1 = E.a1v ? round_up((size_t)cm * g.PS + 2 * g.guard, VEC) : 0;
    const size_t per = gzc + gs + tg + acc + a1;
    if (!E.scratch.alloc(per * E.threads)) return fail(NLFT_ERR_NOMEM, "out of memory");
    E.th.assign(E.threads, Scratch());
    for (int t = 0; t < E.threads; ++t) {
        float* base = E.scratch.p + per * t;
        E.th[t].gzc = base;
        E.th[t].gs = base + gzc;
        E.th[t].tg = base + gzc + gs;
        E.th[t].acc = base + gzc + gs + tg;
        E.th[t].a1 = E.a1v ? base + gzc + gs + tg + acc : nullptr;
    }
    E.cfg_nl = net->nlayers;
    E.cfg_ch = ch;
    E.cfg_cm = cm;
    E.have_geo = true;
    return NLFT_OK;
}

// body(tid, n) for every image n, handed out dynamically; before image n a thread claims its next
// image m and plan(pf, m) lists what to prefetch for it while n is processed.
template <class F, class Plan>
static void run_images(Engine& E, int N, F&& body, Plan&& plan) {
    std::atomic<int> next{0};
    auto job = [&](int tid) {
        Prefetcher& pf = E.th[tid].pf;
        int n = next.fetch_add(1, std::memory_order_relaxed);
        while (n < N) {
            const int m = next.fetch_add(1, std::memory_order_relaxed);
            pf.begin();
            if (m < N && E.prefetch) plan(pf, m);
            pf.plan();
            body(tid, n);
            n = m;
        }
#if NLFT_X86
        _mm_sfence();
#endif
        pf.begin();
    };
    E.pool->run(job);
}

// Fold batch normalisation of layer l (statistics of its input from the previous layer's pass).
static void fold(Engine& E, int l, bool update) {
    LayerRT& Ly = E.L[l];
    const nlft_layer& s = *Ly.src;
    const int cin = Ly.cin, cout = Ly.cout, N = E.geo.N;
    Ly.scale.assign(cin, 1.0);
    Ly.shift.assign(cin, 0.0);
    if (Ly.bn) {
        const LayerRT& prev = E.L[l - 1];
        Ly.mean.assign(cin, 0.0);
        Ly.var.assign(cin, 0.0);
        Ly.varraw.assign(cin, 0.0);
        Ly.r.assign(cin, 0.0);
        const double cnt = Ly.cnt;
        for (int c = 0; c < cin; ++c) {
            double s1 = 0, s2 = 0;
            for (int n = 0; n < N; ++n) {
                s1 += prev.red_stats[((size_t)n * 2 + 0) * cin + c];
                s2 += prev.red_stats[((size_t)n * 2 + 1) * cin + c];
            }
            const double mean = s1 / cnt, vr = s2 / cnt - mean * mean, var = std::max(vr, 0.0);
            const double r = 1.0 / std::sqrt(var + s.eps);
            Ly.mean[c] = mean;
            Ly.varraw[c] = vr;
            Ly.var[c] = var;
            Ly.r[c] = r;
            Ly.scale[c] = (double)s.gamma[c] * r;
            Ly.shift[c] = (double)s.beta[c] - mean * Ly.scale[c];
            if (update) {
                const double m = s.momentum;
                s.running_mean[c] = (float)((1.0 - m) * s.running_mean[c] + m * mean);
                s.running_var[c] = (float)((1.0 - m) * s.running_var[c] + m * var * cnt / std::max(1.0, cnt - 1.0));
            }
        }
    }
    Ly.wf.assign(Ly.nw(), 0.f);
    Ly.bf.assign(cout, 0.f);
    if (Ly.kind == NLFT_LAYER_PW) {
        Ly.wft.assign((size_t)cin * cout, 0.f);
        for (int o = 0; o < cout; ++o) {
            double b = Ly.bias ? (double)s.bias[o] : 0.0;
            for (int c = 0; c < cin; ++c) {
                const double w = s.weight[(size_t)o * cin + c];
                const float wf = (float)(w * Ly.scale[c]);
                Ly.wf[(size_t)o * cin + c] = wf;
                Ly.wft[(size_t)c * cout + o] = wf;
                b += w * Ly.shift[c];
            }
            Ly.bf[o] = (float)b;
        }
    } else {
        for (int c = 0; c < cout; ++c) {
            double b = Ly.bias ? (double)s.bias[c] : 0.0, ws = 0;
            for (int t = 0; t < 9; ++t) {
                const double w = s.weight[(size_t)c * 9 + t];
                Ly.wf[(size_t)c * 9 + t] = (float)(w * Ly.scale[c]);
                ws += w;
            }
            Ly.bf[c] = (float)(b + ws * Ly.shift[c]);
        }
    }
}

// Gradients of layer l from dL/dW' and dL/db' (summed over images); alpha/beta of its input.
static void finalize_grads(Engine& E, int l) {
    LayerRT& Ly = E.L[l];
    const nlft_layer& s = *Ly.src;
    const int cin = Ly.cin, cout = Ly.cout, N = E.geo.N, nw = Ly.nw();
    std::vector<double> dwp(nw, 0.0), dbp(cout, 0.0);
    for (int n = 0; n < N; ++n) {
        const double* rw = &Ly.red_dw[(size_t)n * nw];
        for (int i = 0; i < nw; ++i) dwp[i] += rw[i];
        const double* rb = &Ly.red_db[(size_t)n * cout];
        for (int o = 0; o < cout; ++o) dbp[o] += rb[o];
    }
    if (Ly.bias && s.grad_bias)
        for (int o = 0; o < cout; ++o) s.grad_bias[o] = (float)dbp[o];
    const bool pw = Ly.kind == NLFT_LAYER_PW;
    if (!Ly.bn) {
        for (int i = 0; i < nw; ++i) s.grad_weight[i] = (float)dwp[i];
        return;
    }
    Ly.alpha.assign(cin, 0.f);
    Ly.beta.assign(cin, 0.f);
    for (int c = 0; c < cin; ++c) {
        double dscale = 0, dshift = 0;
        if (pw) {
            for (int o = 0; o < cout; ++o) {
                const size_t i = (size_t)o * cin + c;
                dscale += dwp[i] * s.weight[i];
                dshift += dbp[o] * s.weight[i];
                s.grad_weight[i] = (float)(dwp[i] * Ly.scale[c] + dbp[o] * Ly.shift[c]);
            }
        } else {
            double ws = 0;
            for (int t = 0; t < 9; ++t) {
                const size_t i = (size_t)c * 9 + t;
                dscale += dwp[i] * s.weight[i];
                ws += s.weight[i];
                s.grad_weight[i] = (float)(dwp[i] * Ly.scale[c] + dbp[c] * Ly.shift[c]);
            }
            dshift = dbp[c] * ws;
        }
        const double dst = dscale - dshift * Ly.mean[c];  // total derivative w.r.t. scale
        const double r = Ly.r[c];
        if (s.grad_beta) s.grad_beta[c] = (float)dshift;
        if (s.grad_gamma) s.grad_gamma[c] = (float)(dst * r);
        const double dvar = -0.5 * dst * (double)s.gamma[c] * r * r * r;
        const double dvr = Ly.varraw[c] >= 0.0 ? dvar : 0.0;  // clamp_min(0) passes where >= 0
        const double dmean = -dshift * Ly.scale[c] - 2.0 * Ly.mean[c] * dvr;
        Ly.alpha[c] = (float)(dmean / Ly.cnt);
        Ly.beta[c] = (float)(2.0 * dvr / Ly.cnt);
    }
}

static int step(Engine& E, const nlft_network* net, const nlft_batch* b, bool update, double* loss_out) {
    int rc = validate(net, b);
    if (rc != NLFT_OK) return rc;
    rc = configure(E, net, b);
    if (rc != NLFT_OK) return rc;
    const Geo& g = E.geo;
    const int nl = net->nlayers, N = g.N;
    E.L.resize(nl);
    for (int i = 0; i < nl; ++i) {
        LayerRT& Ly = E.L[i];
        const nlft_layer& s = net->layers[i];
        Ly.src = &s;
        Ly.kind = s.kind;
        Ly.cin = s.cin;
        Ly.cout = s.cout;
        Ly.relu = s.relu;
        Ly.bn = s.gamma != nullptr;
        Ly.bias = s.bias != nullptr;
        const int pad = s.kind == NLFT_LAYER_DW ? 1 : 0;
        Ly.cnt = (double)N * (g.Hq + 2 * pad) * (g.Wq + 2 * pad);
        Ly.red_stats.resize((size_t)N * 2 * s.cout);
        Ly.red_dw.resize((size_t)N * Ly.nw());
        Ly.red_db.resize((size_t)N * s.cout);
        Ly.alpha.assign(s.cin, 0.f);
        Ly.beta.assign(s.cin, 0.f);
    }
    E.red_loss.assign(N, 0.0);

    Ctx C;
    C.g = &g;
    C.L = E.L.data();
    C.nl = nl;
    C.CV = E.CV;
    C.a1v = E.a1v;
    C.A[0] = E.X.p;
    C.ch[0] = g.C0;
    for (int i = 1; i < nl; ++i) {
        C.A[i] = E.A[i - 1]->p;
        C.ch[i] = E.L[i - 1].cout;
    }
    C.P[0] = E.Pb[0].p;
    C.P[1] = E.Pb[1].p;
    C.imask = E.imask.p;
    C.ibits = E.ibits.p;
    C.cmask = E.cmask.p;
    C.x = b->x;
    C.target = b->target;
    C.th = E.th.data();
    C.red_loss = E.red_loss.data();
    const double numel = (double)N * g.G * g.h * g.w;
    C.gscale = (float)(2.0 / numel);

    const Kernels& K = E.K;
    const size_t PS = g.PS;
    // what each pass reads of image m (for the prefetcher)
    auto pf_act = [&](Prefetcher& pf, int k, int m) {
        if (k == 0 || (k == 1 && C.a1v))
            pf.add(C.A[0] + g.guard + (size_t)m * g.C0 * PS, sizeof(float) * g.C0 * PS);
        else
            pf.add(C.A[k] + g.guard + (size_t)m * C.ch[k] * PS, sizeof(float) * C.ch[k] * PS);
    };
    // forward
    for (int l = 0; l + 1 < nl; ++l) {
        fold(E, l, update);
        run_images(
            E, N,
            [&](int tid, int n) {
                if (l == 0) pack_input(C, n);
                K.fwd(C, l, tid, n);
            },
            [&](Prefetcher& pf, int m) {
                if (l == 0)
                    pf.add(C.x + (size_t)m * g.G * g.H * g.W, sizeof(float) * g.G * g.H * g.W);
                else
                    pf_act(pf, l, m);
            });
    }
    fold(E, nl - 1, update);
    run_images(
        E, N,
        [&](int tid, int n) {
            if (nl == 1) pack_input(C, n);
            K.fwd_last(C, tid, n);
        },
        [&](Prefetcher& pf, int m) {
            if (nl == 1)
                pf.add(C.x + (size_t)m * g.G * g.H * g.W, sizeof(float) * g.G * g.H * g.W);
            else
                pf_act(pf, nl - 1, m);
            pf.add(C.target + (size_t)m * g.G * g.h * g.w, sizeof(float) * g.G * g.h * g.w);
        });
    double loss = 0;
    for (int n = 0; n < N; ++n) loss += E.red_loss[n];
    if (loss_out) *loss_out = loss / numel;
    finalize_grads(E, nl - 1);
    // backward
    for (int l = nl - 2; l >= 0; --l) {
        run_images(
            E, N, [&](int tid, int n) { K.bwd(C, l, tid, n); },
            [&](Prefetcher& pf, int m) {
                pf_act(pf, l, m);
                if (!(l == 0 && C.a1v)) pf_act(pf, l + 1, m);
                pf.add(C.pgrad(l + 1, m), sizeof(float) * E.L[l + 1].cin * PS);
            });
        finalize_grads(E, l);
    }
    return NLFT_OK;
}

}  // namespace nlft

// ------------------------------------------------------------------------------------- C ABI
using namespace nlft;

extern "C" {

NLFT_API int32_t nlft_abi_version(void) { return NLFT_ABI_VERSION; }

NLFT_API const char* nlft_last_error(void) { return g_last_error; }

NLFT_API int32_t nlft_best_isa(void) { return best_isa(); }

NLFT_API int32_t nlft_isa_supported(int32_t isa) { return cpu_has(isa) ? 1 : 0; }

NLFT_API void* nlft_create(int32_t threads, int32_t isa) {
    g_last_error[0] = 0;
    if (isa == NLFT_ISA_AUTO) isa = best_isa();
    if (isa != NLFT_ISA_GENERIC && isa != NLFT_ISA_AVX2 && isa != NLFT_ISA_AVX512) {
        fail(NLFT_ERR_ARG, "unknown instruction set %d", isa);
        return nullptr;
    }
    if (!cpu_has(isa)) {
        fail(NLFT_ERR_ISA, "instruction set %d is not available on this CPU", isa);
        return nullptr;
    }
    if (threads <= 0) threads = (int32_t)std::max(1u, std::thread::hardware_concurrency());
    threads = std::min<int32_t>(threads, 256);
    Engine* E = new (std::nothrow) Engine();
    if (!E) {
        fail(NLFT_ERR_NOMEM, "out of memory");
        return nullptr;
    }
    E->threads = threads;
    E->isa = isa;
    E->K = kernels_for(isa);
    E->pool = new (std::nothrow) Pool(threads);
    if (!E->pool || !E->pool->start()) {
        delete E;
        fail(NLFT_ERR_INTERNAL, "cannot start %d threads", threads);
        return nullptr;
    }
    return E;
}

NLFT_API void nlft_destroy(void* engine) { delete static_cast<Engine*>(engine); }

NLFT_API int32_t nlft_engine_threads(const void* engine) {
    return engine ? static_cast<const Engine*>(engine)->threads : 0;
}

NLFT_API int32_t nlft_engine_isa(const void* engine) {
    return engine ? static_cast<const Engine*>(engine)->isa : -1;
}

NLFT_API int32_t nlft_step(void* engine, const nlft_network* net, const nlft_batch* batch,
                           int32_t update_running_stats, double* loss) {
    g_last_error[0] = 0;
    if (!engine) return fail(NLFT_ERR_ARG, "NULL engine");
    try {
        return step(*static_cast<Engine*>(engine), net, batch, update_running_stats != 0, loss);
    } catch (const std::bad_alloc&) {
        return fail(NLFT_ERR_NOMEM, "out of memory");
    } catch (const std::exception& e) {
        return fail(NLFT_ERR_INTERNAL, "%s", e.what());
    }
}

}  // extern "C"

#else  // ================================================= NLFT_ISA_PASS: one instruction set

namespace NLFT_NS {
using namespace nlft;

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

#define NLFT_AI static inline __attribute__((always_inline))

NLFT_AI vf ld(const float* p) {
    vf v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}
NLFT_AI vi ldm(const int32_t* p) {
    vi v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}
NLFT_AI void st(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
NLFT_AI vf bc(float x) {
    vf v = {};
    return v + x;
}
NLFT_AI vf vand(vf x, vi m) { return (vf)((vi)x & m); }
// relu(x) where the mask (-1 / 0 per lane) is set, else 0; bits: the same mask as 16 bits
NLFT_AI vf relu_masked(vf x, const int32_t* m, uint16_t bits) {
#if NLFT_ISA_ID == 2
    (void)m;
    return _mm512_maskz_max_ps((__mmask16)bits, x, _mm512_setzero_ps());
#else
    (void)bits;
    const vf z = {};
    return vand(x > z ? x : z, ldm(m));
#endif
}
NLFT_AI vf relu(vf x) {
    const vf z = {};
    return x > z ? x : z;
}
// x where a > 0, else 0
NLFT_AI vf where_pos(vf a, vf x) {
    const vf z = {};
    return a > z ? x : z;
}
NLFT_AI void addto(float* p, vf v) { st(p, ld(p) + v); }

// float64 accumulation of a float vector (the batch-norm statistics: sum of squares minus the squared
// mean cancels, so their sums are kept in double precision)
typedef double vd __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
NLFT_AI void addd(vd& lo, vd& hi, vf v) {
    const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
    const vf8 b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    lo += __builtin_convertvector(a, vd);
    hi += __builtin_convertvector(b, vd);
}
NLFT_AI void addd_mem(double* p, vf v) {
    vd lo, hi;
    __builtin_memcpy(&lo, p, sizeof lo);
    __builtin_memcpy(&hi, p + 8, sizeof hi);
    addd(lo, hi, v);
    __builtin_memcpy(p, &lo, sizeof lo);
    __builtin_memcpy(p + 8, &hi, sizeof hi);
}
NLFT_AI double hsumd(const double* p) {
    double s = 0;
    for (int i = 0; i < VEC; ++i) s += p[i];
    return s;
}
// store of a big-tensor output
NLFT_AI void sto(float* p, vf v) { st(p, v); }
NLFT_AI double hsum(const float* p) {
    double s = 0;
    for (int i = 0; i < VEC; ++i) s += p[i];
    return s;
}

// ------------------------------------------------------------------- point-wise building blocks
// Y[r] = b[r] + sum_s M[r*S + s] * X[s] for the 4 vectors at float offset k0 (X[s] read at k0 - xoff);
// epi(r, k0, acc[4]) consumes each row.
template <int RB, class Epi>
NLFT_AI void pw_block(const float* M, int S, const float* const* X, int xoff, int r0, int k0, const float* b,
                      Epi& epi) {
    vf acc[RB][4];
#pragma GCC unroll 4
    for (int j = 0; j < RB; ++j) {
        const vf bj = bc(b ? b[r0 + j] : 0.f);
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) acc[j][k] = bj;
    }
    const float* m = M + (size_t)r0 * S;
    for (int s = 0; s < S; ++s) {
        const float* xs = X[s] + (k0 - xoff);
        const vf x0 = ld(xs), x1 = ld(xs + 16), x2 = ld(xs + 32), x3 = ld(xs + 48);
#pragma GCC unroll 4
        for (int j = 0; j < RB; ++j) {
            const vf w = bc(m[(size_t)j * S + s]);
            acc[j][0] += w * x0;
            acc[j][1] += w * x1;
            acc[j][2] += w * x2;
            acc[j][3] += w * x3;
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < RB; ++j) epi(r0 + j, k0, acc[j]);
}

template <class Epi>
static inline void pw_apply(const float* M, int R, int S, const float* const* X, int xoff, int kb, int ke,
                            const float* b, Epi& epi) {
    for (int k0 = kb; k0 < ke; k0 += 4 * VEC) {
        int r = 0;
        for (; r + 4 <= R; r += 4) pw_block<4>(M, S, X, xoff, r, k0, b, epi);
        switch (R - r) {
            case 3: pw_block<3>(M, S, X, xoff, r, k0, b, epi); break;
            case 2: pw_block<2>(M, S, X, xoff, r, k0, b, epi); break;
            case 1: pw_block<1>(M, S, X, xoff, r, k0, b, epi); break;
            default: break;
        }
    }
}

// acc[(o*cin + c)*16 ..] += sum over the chunk of G[o] * X[c]; G rows local (index 0..nf), X rows at kb.
template <int BO, int BC>
static void outer_block(float* acc, int cin, const float* const* G, const float* const* X, int o0, int c0,
                        int kb, int nf) {
    vf a[BO][BC];
#pragma GCC unroll 4
    for (int j = 0; j < BO; ++j)
#pragma GCC unroll 4
        for (int i = 0; i < BC; ++i) a[j][i] = ld(acc + ((size_t)(o0 + j) * cin + c0 + i) * VEC);
    for (int k = 0; k < nf; k += VEC) {
        vf gv[BO], xv[BC];
#pragma GCC unroll 4
        for (int j = 0; j < BO; ++j) gv[j] = ld(G[o0 + j] + k);
#pragma GCC unroll 4
        for (int i = 0; i < BC; ++i) xv[i] = ld(X[c0 + i] + kb + k);
#pragma GCC unroll 4
        for (int j = 0; j < BO; ++j)
#pragma GCC unroll 4
            for (int i = 0; i < BC; ++i) a[j][i] += gv[j] * xv[i];
    }
#pragma GCC unroll 4
    for (int j = 0; j < BO; ++j)
#pragma GCC unroll 4
        for (int i = 0; i < BC; ++i) st(acc + ((size_t)(o0 + j) * cin + c0 + i) * VEC, a[j][i]);
}

typedef void (*OuterFn)(float*, int, const float* const*, const float* const*, int, int, int, int);
static const OuterFn kOuter[4][4] = {
    {outer_block<1, 1>, outer_block<1, 2>, outer_block<1, 3>, outer_block<1, 4>},
    {outer_block<2, 1>, outer_block<2, 2>, outer_block<2, 3>, outer_block<2, 4>},
    {outer_block<3, 1>, outer_block<3, 2>, outer_block<3, 3>, outer_block<3, 4>},
    {outer_block<4, 1>, outer_block<4, 2>, outer_block<4, 3>, outer_block<4, 4>},
};

static void outer_accum(float* acc, int cout, int cin, const float* const* G, const float* const* X, int kb, int nf) {
    for (int o0 = 0; o0 < cout; o0 += 4) {
        const int bo = std::min(4, cout - o0);
        for (int c0 = 0; c0 < cin; c0 += 4) {
            const int bcn = std::min(4, cin - c0);
            kOuter[bo - 1][bcn - 1](acc, cin, G, X, o0, c0, kb, nf);
        }
    }
}

// ------------------------------------------------------------------------------- forward passes
// Point-wise layer forward of one image: out = relu(W' in + b') masked to the interior; optional
// statistics (sum, sum of squares per output channel) into s1/s2.
static void pw_forward(const Ctx& C, const LayerRT& Ly, const float* in, float* out, double* s1, double* s2,
                       Prefetcher* pf) {
    const Geo& g = *C.g;
    const int cin = Ly.cin, cout = Ly.cout;
    const float* Xp[MAXC];
    float* Op[MAXC];
    for (int c = 0; c < cin; ++c) Xp[c] = in + (size_t)c * g.PS;
    for (int o = 0; o < cout; ++o) Op[o] = out + (size_t)o * g.PS;
    const int32_t* im = C.imask;
    const uint16_t* ib = C.ibits;
    // float partial sums over a chunk of vectors, added to the float64 sums after each chunk
    float* fs = s1 ? reinterpret_cast<float*>(s2 + (size_t)cout * VEC) : nullptr;
    float* fq = fs ? fs + (size_t)cout * VEC : nullptr;
    if (fs) std::memset(fs, 0, sizeof(float) * 2 * cout * VEC);
    auto epi = [&](int r, int k0, vf* a) {
        vf s = {}, q = {};
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) {
            const vf v = relu_masked(a[k], im + k0 + k * VEC, ib[(k0 >> 4) + k]);
            sto(Op[r] + k0 + k * VEC, v);
            s += v;
            q += v * v;
        }
        if (fs) {
            addto(fs + r * VEC, s);
            addto(fq + r * VEC, q);
        }
        if (pf) pf->tick();
    };
    constexpr int kChunk = 16 * VEC;
    for (int kb = g.v0 * VEC; kb < g.v1 * VEC; kb += kChunk) {
        const int ke = std::min(kb + kChunk, g.v1 * VEC);
        pw_apply(Ly.wf.data(), cout, cin, Xp, 0, kb, ke, Ly.bf.data(), epi);
        if (fs)
            for (int o = 0; o < cout; ++o) {
                addd_mem(s1 + o * VEC, ld(fs + o * VEC));
                addd_mem(s2 + o * VEC, ld(fq + o * VEC));
                st(fs + o * VEC, vf{});
                st(fq + o * VEC, vf{});
            }
    }
}

// A[1] of image n recomputed from X into the thread's scratch (no statistics).
void compute_a1(const Ctx& C, int tid, int n) {
    pw_forward(C, C.L[0], C.act(0, tid, n), C.th[tid].a1 + C.g->guard, nullptr, nullptr, nullptr);
}

void image_fwd(const Ctx& C, int l, int tid, int n) {
    const Geo& g = *C.g;
    const LayerRT& Ly = C.L[l];
    const int cout = Ly.cout;
    Prefetcher& pf = C.th[tid].pf;
    if (l == 1 && C.a1v) compute_a1(C, tid, n);
    const float* in = C.act(l, tid, n);
    float* out = C.act(l + 1, tid, n);
    double* s1 = reinterpret_cast<double*>(C.th[tid].acc);
    double* s2 = s1 + (size_t)cout * VEC;
    std::memset(s1, 0, sizeof(double) * 2 * cout * VEC);
    if (Ly.kind == NLFT_LAYER_PW) {
        pw_forward(C, Ly, in, out, s1, s2, &pf);
    } else {
        const int kb = g.v0 * VEC, ke = g.v1 * VEC;
        const int32_t* im = C.imask;
        const uint16_t* ib = C.ibits;
        for (int c = 0; c < cout; ++c) {
            const float* ip = in + (size_t)c * g.PS;
            float* op = out + (size_t)c * g.PS;
            // input rows dy = 0, 1, 2 of the 3x3 window; the column offsets dx - 1 are constants
            const float* row[3] = {ip - g.RS, ip, ip + g.RS};
            vf w[9];
            for (int t = 0; t < 9; ++t) w[t] = bc(Ly.wf[(size_t)c * 9 + t]);
            const vf b = bc(Ly.bf[c]);
            vd slo = {}, shi = {}, qlo = {}, qhi = {};
            vf s = {}, q = {};
            int blocks = 0;
            for (int k0 = kb; k0 < ke; k0 += 4 * VEC) {
                vf a[4] = {b, b, b, b};
#pragma GCC unroll 3
                for (int dy = 0; dy < 3; ++dy)
#pragma GCC unroll 3
                    for (int dx = 0; dx < 3; ++dx) {
                        const float* p = row[dy] + k0 + (dx - 1);
#pragma GCC unroll 4
                        for (int k = 0; k < 4; ++k) a[k] += w[dy * 3 + dx] * ld(p + k * VEC);
                    }
#pragma GCC unroll 4
                for (int k = 0; k < 4; ++k) {
                    const vf v = relu_masked(a[k], im + k0 + k * VEC, ib[(k0 >> 4) + k]);
                    sto(op + k0 + k * VEC, v);
                    s += v;
                    q += v * v;
                }
                if (++blocks == 8 || k0 + 4 * VEC >= ke) {
                    addd(slo, shi, s);
                    addd(qlo, qhi, q);
                    s = vf{};
                    q = vf{};
                    blocks = 0;
                }
                pf.tick();
            }
            __builtin_memcpy(s1 + c * VEC, &slo, sizeof slo);
            __builtin_memcpy(s1 + c * VEC + 8, &shi, sizeof shi);
            __builtin_memcpy(s2 + c * VEC, &qlo, sizeof qlo);
            __builtin_memcpy(s2 + c * VEC + 8, &qhi, sizeof qhi);
        }
    }
    double* rs = const_cast<double*>(&Ly.red_stats[(size_t)n * 2 * cout]);
    for (int o = 0; o < cout; ++o) {
        rs[o] = hsumd(s1 + o * VEC);
        rs[cout + o] = hsumd(s2 + o * VEC);
    }
}

// Point-wise backward of one chunk, given gz (rows G, local): dW' and P = W'^T gz.
static void pw_bwd_chunk(const LayerRT& Ly, float* dwacc, const float* const* G, const float* const* Xp,
                         float* const* Pp, int kb, int nf) {
    outer_accum(dwacc, Ly.cout, Ly.cin, G, Xp, kb, nf);
    if (Pp) {
        // gz is zero outside the interior (masked by the ReLU of a zero or by the crop), so is P
        auto epi = [&](int r, int k0, vf* a) {
#pragma GCC unroll 4
            for (int k = 0; k < 4; ++k) sto(Pp[r] + k0 + k * VEC, a[k]);
        };
        pw_apply(Ly.wft.data(), Ly.cin, Ly.cout, G, kb, kb, kb + nf, nullptr, epi);
    }
}

static void store_pw_reductions(const LayerRT& Ly, int n, const float* dwacc, const float* dbacc) {
    double* rw = const_cast<double*>(&Ly.red_dw[(size_t)n * Ly.nw()]);
    for (int i = 0; i < Ly.nw(); ++i) rw[i] = hsum(dwacc + (size_t)i * VEC);
    double* rb = const_cast<double*>(&Ly.red_db[(size_t)n * Ly.cout]);
    for (int o = 0; o < Ly.cout; ++o) rb[o] = hsum(dbacc + o * VEC);
}

void image_fwd_last(const Ctx& C, int tid, int n) {
    const Geo& g = *C.g;
    const int l = C.nl - 1;
    const LayerRT& Ly = C.L[l];
    const int cin = Ly.cin, cout = Ly.cout;
    pack_target(C, tid, n);
    Scratch& S = C.th[tid];
    Prefetcher& pf = S.pf;
    float* dwacc = S.acc;
    float* dbacc = dwacc + (size_t)Ly.nw() * VEC;
    float* lacc = dbacc + (size_t)cout * VEC;
    std::memset(dwacc, 0, sizeof(float) * VEC * ((size_t)Ly.nw() + cout + 1));
    const float* Xp[MAXC];
    float* Pp[MAXC];
    const float* Gp[MAXC];
    const float* Tp[MAXC];
    const int32_t* Mp[MAXC];
    const int cvf = C.CV * VEC;
    const float* in = C.act(l, tid, n);
    float* pout = l > 0 ? C.pgrad(l, n) : nullptr;
    for (int c = 0; c < cin; ++c) Xp[c] = in + (size_t)c * g.PS;
    for (int c = 0; c < cin && pout; ++c) Pp[c] = pout + (size_t)c * g.PS;
    for (int o = 0; o < cout; ++o) {
        Gp[o] = S.gzc + (size_t)o * cvf;
        Tp[o] = S.tg + (size_t)o * g.PS;
        Mp[o] = C.cmask + (size_t)o * g.PS;
    }
    const vf gsc = bc(C.gscale);
    vf lossv = {};
    int kb = 0;
    auto epi = [&](int r, int k0, vf* a) {
        vf db = {};
        float* gz = const_cast<float*>(Gp[r]) + (k0 - kb);
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) {
            const vf d = vand(a[k] - ld(Tp[r] + k0 + k * VEC), ldm(Mp[r] + k0 + k * VEC));
            lossv += d * d;
            const vf gv = d * gsc;
            st(gz + k * VEC, gv);
            db += gv;
        }
        addto(dbacc + r * VEC, db);
        pf.tick();
    };
    for (int vb = g.v0; vb < g.v1; vb += C.CV) {
        const int nv = std::min(C.CV, g.v1 - vb);
        kb = vb * VEC;
        pw_apply(Ly.wf.data(), cout, cin, Xp, 0, kb, kb + nv * VEC, Ly.bf.data(), epi);
        pw_bwd_chunk(Ly, dwacc, Gp, Xp, pout ? Pp : nullptr, kb, nv * VEC);
    }
    st(lacc, lossv);
    C.red_loss[n] = hsum(lacc);
    store_pw_reductions(Ly, n, dwacc, dbacc);
}

// ------------------------------------------------------------------------------ backward passes
void image_bwd(const Ctx& C, int l, int tid, int n) {
    const Geo& g = *C.g;
    const LayerRT& Ly = C.L[l];
    const LayerRT& Nx = C.L[l + 1];
    const int cin = Ly.cin, cout = Ly.cout;
    Scratch& S = C.th[tid];
    Prefetcher& pf = S.pf;
    if (C.a1v && l <= 1) compute_a1(C, tid, n);
    float* dwacc = S.acc;
    float* dbacc = dwacc + (size_t)Ly.nw() * VEC;
    std::memset(dwacc, 0, sizeof(float) * VEC * ((size_t)Ly.nw() + cout));
    const float* alpha = Nx.alpha.data();
    const float* beta = Nx.beta.data();
    const int kb0 = g.v0 * VEC, ke0 = g.v1 * VEC;
    const float* xin = C.act(l, tid, n);       // layer input
    const float* anx = C.act(l + 1, tid, n);   // layer output (ReLU), input of layer l+1
    const float* pin = C.pgrad(l + 1, n);      // P[l+1]
    float* pout = l > 0 ? C.pgrad(l, n) : nullptr;
    if (Ly.kind == NLFT_LAYER_PW) {
        const float* Xp[MAXC];
        float* Pp[MAXC];
        const float* Gp[MAXC];
        const int cvf = C.CV * VEC;
        for (int c = 0; c < cin; ++c) Xp[c] = xin + (size_t)c * g.PS;
        for (int c = 0; c < cin && pout; ++c) Pp[c] = pout + (size_t)c * g.PS;
        for (int o = 0; o < cout; ++o) Gp[o] = S.gzc + (size_t)o * cvf;
        for (int vb = g.v0; vb < g.v1; vb += C.CV) {
            const int nv = std::min(C.CV, g.v1 - vb);
            const int kb = vb * VEC, nf = nv * VEC;
            for (int o = 0; o < cout; ++o) {
                const vf al = bc(alpha[o]), be = bc(beta[o]);
                const float* ap = anx + (size_t)o * g.PS + kb;
                const float* qp = pin + (size_t)o * g.PS + kb;
                float* gz = const_cast<float*>(Gp[o]);
                vf db = {};
                for (int k = 0; k < nf; k += VEC) {
                    const vf a = ld(ap + k);
                    const vf gv = where_pos(a, ld(qp + k) + (al + be * a));
                    st(gz + k, gv);
                    db += gv;
                }
                addto(dbacc + o * VEC, db);
                pf.tick();
            }
            pw_bwd_chunk(Ly, dwacc, Gp, Xp, pout ? Pp : nullptr, kb, nf);
        }
        store_pw_reductions(Ly, n, dwacc, dbacc);
        return;
    }
    // depth-wise
    float* gs = S.gs + g.guard;
    const int32_t* im = C.imask;
    double* rw = const_cast<double*>(&Ly.red_dw[(size_t)n * Ly.nw()]);
    double* rb = const_cast<double*>(&Ly.red_db[(size_t)n * cout]);
    for (int c = 0; c < cout; ++c) {
        const float* ap = anx + (size_t)c * g.PS;
        const float* qp = pin + (size_t)c * g.PS;
        const float* xp = xin + (size_t)c * g.PS;
        float* pp = pout ? pout + (size_t)c * g.PS : nullptr;
        {
            const vf al = bc(alpha[c]), be = bc(beta[c]);
            for (int k = kb0; k < ke0; k += VEC) {
                const vf a = ld(ap + k);
                st(gs + k, where_pos(a, ld(qp + k) + (al + be * a)));
            }
        }
        vf w[9], dw[9];
        for (int t = 0; t < 9; ++t) {
            w[t] = bc(Ly.wf[(size_t)c * 9 + t]);
            dw[t] = vf{};
        }
        vf db = {};
        // rows of the transposed window (gz at q - off) and of the input window (x at q + off)
        const float* grow[3] = {gs + g.RS, gs, gs - g.RS};
        const float* xrow[3] = {xp - g.RS, xp, xp + g.RS};
        for (int k0 = kb0; k0 < ke0; k0 += 2 * VEC) {
#pragma GCC unroll 2
            for (int k = 0; k < 2; ++k) {
                const int q = k0 + k * VEC;
                const vf gv = ld(gs + q);
                db += gv;
                vf p[3] = {};  // one partial sum per row: three short FMA chains instead of one long
#pragma GCC unroll 3
                for (int dy = 0; dy < 3; ++dy)
#pragma GCC unroll 3
                    for (int dx = 0; dx < 3; ++dx) {
                        p[dy] += w[dy * 3 + dx] * ld(grow[dy] + q + (1 - dx));
                        dw[dy * 3 + dx] += gv * ld(xrow[dy] + q + (dx - 1));
                    }
                if (pp) sto(pp + q, vand(p[0] + p[1] + p[2], ldm(im + q)));
            }
            pf.tick();
        }
        float tmp[VEC];
        for (int t = 0; t < 9; ++t) {
            st(tmp, dw[t]);
            rw[(size_t)c * 9 + t] = hsum(tmp);
        }
        st(tmp, db);
        rb[c] = hsum(tmp);
    }
}

}  // namespace NLFT_NS

#endif  // NLFT_ISA_PASS
