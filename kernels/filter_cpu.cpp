// filter_cpu.cpp — the CPU kernel of the hevc-nlf integer filter (C ABI: nlf_filter.h).
//
// Bit-identical to hevc_ext/reference.py for every network that IntNetwork.validate() accepts.
//
// Design
// ------
// * All layers are fused. The packed picture is cut into work items (a band of packed rows x a strip
//   of ~510 packed columns). An item streams its rows top to bottom through a pipeline of per-stage
//   row rings (stage 0 = the packed, centred samples; stage l+1 = the output of layer l). Stage s
//   computes the rows t + D_s at step t (D_s = depth-wise layers after it), so every row is computed
//   once per item; only D_s halo columns at the sides of a strip (and D_s halo rows at band edges)
//   are recomputed. The rings (tens of KB) live in L1/L2; only samples touch DRAM.
// * Activations are int16 in 32-bit lanes, the operand layout of VPDPWSSD / VPMADDWD:
//   - channel pairs ("CP"): a lane holds (a[2j], a[2j+1]) of one packed pixel; a point-wise layer
//     needs one instruction per input-channel pair and output channel (32 MACs per zmm instruction);
//   - vertical pairs ("VP", SIMD code paths): a stage that a depth-wise layer reads holds (row r,
//     row r+1) of one channel per lane, and the pipeline advances two rows per step, so one
//     instruction applies two taps of the 3x3 kernel (12 instead of 18 per channel pair and row pair).
//   The general row-by-row pipeline (channel pairs only; a depth-wise layer multiplies by (w, 0) and
//   (0, w)) serves the scalar code path and networks with a depth-wise layer first or two in a row.
//   Wrapping 32-bit accumulation is exact because validate() bounds every accumulator to int32.
// * Requantisation z = (acc*mult + bias + round) >> shift, in the cheapest of three forms the plan
//   proves exact per layer (every channel of it; nlf_cpu_requant_forms reports the choice):
//   - RQ_FOLD: every w*mult fits in int16 and the per-channel accumulator bounds (from the weights and
//     the input range) keep acc*mult + bias + round inside int32. The multiplier is folded into the
//     SIMD weights, the accumulators start at bias + round (br), and z = acc' >> shift is one 32-bit
//     arithmetic shift per 16 outputs (a count of 32..62 gives the sign, the floor of |v| < 2^31).
//     The networks the encoder signals with its default QuantConfig (4-bit scale significands, 6-bit
//     weights) take this form (test_quantized_networks_take_the_folded_form).
//   - RQ_HIGH: with M = mult << (32-shift) < 2^31 and B = br << (32-shift), z = (acc*M + B) >> 32
//     exactly when the bounds prove acc*M + B cannot overflow int64: the high dword of VPMULDQ + VPADDQ,
//     6 instructions per 16 outputs.
//   - RQ_GENERAL: VPSRAQ and a 64-bit clamp (exact as well).
//   In every form the clamp to int16 comes free with the signed-saturating pack (plus a max with 0 for
//   ReLU). The scalar code path always uses the 64-bit definition.
// * Instruction sets: AVX-512 (F/BW/DQ/VL/VNNI), AVX2 and portable scalar C++, chosen at run time
//   (__builtin_cpu_supports). The row kernels and the pipeline are compiled once per instruction
//   set by including this file into itself under "#pragma GCC target" (no per-file compiler flags
//   needed, so setuptools can build it as a single source).
// * Threads: workers of a pool that outlives the call (see Pool) pull items from an atomic counter;
//   each keeps its ring buffers between calls.

#ifndef NLF_ISA_PASS  // ======================================================== common part

#include "nlf_filter.h"
#include "nlf_cpu_features.h"
#include "nlf_network_check.h"

#include <algorithm>
#include <cstdarg>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define NLF_X86 1
#include <immintrin.h>
#else
#define NLF_X86 0
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>  // getpid: a child process after fork() needs a thread pool of its own
#define NLF_HAVE_FORK 1
#else
#define NLF_HAVE_FORK 0
#endif

#if NLF_X86 && (defined(__GNUC__) || defined(__clang__))
#define NLF_HAVE_SIMD 1
#else
#define NLF_HAVE_SIMD 0
#endif

namespace nlf {

static thread_local char g_last_error[512] = "";
// testing switch: run the SIMD code paths through the row-by-row pipeline even when the row-pair one
// applies (NLF_ROWWISE=1 in the environment at load time)
static const bool g_force_rowwise = [] {
    const char* e = std::getenv("NLF_ROWWISE");
    return e && e[0] == '1';
}();

static int fail(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(int code, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(g_last_error, sizeof g_last_error, fmt, ap);
    va_end(ap);
    return code;
}

constexpr int ACT_MAX = nlf_check::ACT_MAX;
constexpr int LM = 16;                  // left margin of every ring row (columns)
constexpr int MAX_CHANNELS = 4096;      // sanity bound on channel counts
// requantisation forms, cheapest last (LayerPlan::rq; NLF_RQ_* in nlf_filter.h)
constexpr int RQ_GENERAL = NLF_RQ_GENERAL;  // 64-bit product, shift and clamp
constexpr int RQ_HIGH = NLF_RQ_HIGH;        // high dword of acc*M + B
constexpr int RQ_FOLD = NLF_RQ_FOLD;        // multiplier folded into the int16 weights: (acc' + bround) >> shift

// One layer, prepared for the kernels.
struct LayerPlan {
    int kind = 0;  // NLF_LAYER_PW / NLF_LAYER_DW
    int cin = 0, cout = 0, pin = 0, pout = 0;
    bool relu = false;
    int rq = RQ_GENERAL;    // requantisation form shared by every channel (see the header comment)
    int D = 0;              // depth-wise layers after this one
    int32_t lo = 0, hi = 0; // output clamp
    // original integers (scalar path), channel-padded to 2*pout with zeros
    std::vector<int32_t> w;       // pw: [2*pout][cin]; dw: [2*pout][9]
    std::vector<int64_t> mult, bround, shift;  // bround = bias + ((1 << shift) >> 1)
    // SIMD operands
    std::vector<int32_t> wp;      // pw: [2*pout][pin] word pairs; dw: [pout][9][2] ((w,0), (0,w))
    std::vector<int32_t> wvp;     // dw, row-pair pipeline: [2*pout][3 dx][4] word pairs, see dw2_rows
    std::vector<int32_t> wv;      // dw: wp broadcast to 16 lanes ([pout][18][16]), 64-byte aligned at wvo
    size_t wvo = 0;
    const int32_t* wvec() const { return wv.data() + wvo; }
    std::vector<int64_t> fm, fb;  // RQ_HIGH: M, B per channel (2*pout)
    std::vector<int32_t> b32, s32;  // RQ_FOLD: initial accumulator (bias + round) and shift per channel
};

struct Plan {
    int planes = 1, ph = 1, pw = 1, c0 = 1, p0 = 1, bitdepth = 8, halo = 0, maxp = 1;
    std::vector<LayerPlan> L;
    int nstages() const { return (int)L.size() + 1; }
    int pairs(int s) const { return s == 0 ? p0 : L[s - 1].pout; }
    int D(int s) const { return s == 0 ? halo : L[s - 1].D; }
    bool vp = false;  // row-pair pipeline possible: every depth-wise layer follows a point-wise one
    bool dw_input(int s) const { return s < (int)L.size() && L[s].kind == NLF_LAYER_DW; }
    // rows a stage's ring holds: the row-by-row pipeline needs 3 (read by a depth-wise layer) or 1;
    // the row-pair pipeline 2 slots of 2 rows or 1 slot of 2 rows
    int ring(int s) const { return dw_input(s) ? 4 : 2; }
};

struct Item {
    int y0, y1, x0, x1;  // packed rows / columns of the output
};

template <typename T>
struct Pic {
    const T* src[2];
    T* dst[2];
    ptrdiff_t ss[2], ds[2];
    int H, W, Hq, Wq, bd;
};

// Per-thread ring buffers. Element type int16: a pair (2 channels) of one column is 2 consecutive
// int16; pair j of a row is the contiguous range [j*WB*2, (j+1)*WB*2).
struct Scratch {
    int WB = 0;
    int16_t* mem = nullptr;
    size_t capacity = 0;          // bytes at mem
    std::vector<int16_t*> stage;  // base of each stage's ring
    int16_t* zero = nullptr;      // maxp pairs of zeros
    Scratch() = default;
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    ~Scratch() { std::free(mem); }
    // Lay out the rings of plan P in mem, which is kept from an earlier call when it is large enough:
    // every ring row a call reads as valid is one it wrote before, whatever an earlier call left there
    // (as between the items of one call). Only the zero rows are cleared each time.
    bool init(const Plan& P, int WB_) {
        WB = WB_;
        const size_t nzero = (size_t)2 * P.maxp * WB * 2;  // zero rows (a zero row pair)
        size_t total = nzero;
        std::vector<size_t> off;
        for (int s = 0; s < P.nstages(); ++s) {
            off.push_back(total);
            total += (size_t)P.ring(s) * P.pairs(s) * WB * 2;
        }
        const size_t bytes = (total * sizeof(int16_t) + 63) / 64 * 64;
        if (bytes > capacity) {
            std::free(mem);
            capacity = 0;
            mem = static_cast<int16_t*>(std::aligned_alloc(64, bytes));
            if (!mem) return false;
            std::memset(mem, 0, bytes);  // defined contents in the columns no call reads as valid
            capacity = bytes;
        }
        std::memset(mem, 0, nzero * sizeof(int16_t));
        zero = mem;
        stage.clear();
        for (size_t o : off) stage.push_back(mem + o);
        return true;
    }
    int16_t* row(const Plan& P, int s, int r, int Hq) const {
        if (r < 0 || r >= Hq) return zero;
        return stage[s] + (size_t)(r % P.ring(s)) * P.pairs(s) * WB * 2;
    }
};

// ------------------------------------------------------------------------------------ planning
static int build_plan(const nlf_network* net, int bitdepth, Plan& P) {
    int rc = nlf_check::check_network(net, fail);
    if (rc != NLF_OK) return rc;
    if (net->nlayers > 4096) return fail(NLF_ERR_NETWORK, "too many layers (%d)", net->nlayers);
    P.planes = net->planes;
    P.ph = net->ph;
    P.pw = net->pw;
    P.c0 = net->planes * net->ph * net->pw;
    P.p0 = (P.c0 + 1) / 2;
    P.bitdepth = bitdepth;
    P.L.assign(net->nlayers, LayerPlan());
    int cin = P.c0;
    int64_t in_lo, in_hi;  // input range of the current layer
    nlf_check::first_input_range(bitdepth, in_lo, in_hi);
    for (int i = 0; i < net->nlayers; ++i) {
        const nlf_layer& src = net->layers[i];
        LayerPlan& L = P.L[i];
        if ((rc = nlf_check::check_layer(net, i, cin, P.c0, fail)) != NLF_OK) return rc;
        if (src.cout > MAX_CHANNELS)
            return fail(NLF_ERR_NETWORK, "layer %d: %d output channels", i + 1, src.cout);
        L.kind = src.kind;
        L.cin = src.cin;
        L.cout = src.cout;
        L.pin = (src.cin + 1) / 2;
        L.pout = (src.cout + 1) / 2;
        L.relu = src.relu != 0;
        L.lo = nlf_check::output_min(src);
        L.hi = ACT_MAX;
        const int taps = nlf_check::taps(src);
        const int cpad = 2 * L.pout;
        L.w.assign((size_t)cpad * taps, 0);
        L.mult.assign(cpad, 0);
        L.bround.assign(cpad, 0);
        L.shift.assign(cpad, 0);
        L.fm.assign(cpad, 0);
        L.fb.assign(cpad, 0);
        L.b32.assign(cpad, 0);
        L.s32.assign(cpad, 0);
        bool fast = true, fold = true;
        for (int f = 0; f < src.cout; ++f) {
            nlf_check::Channel c;
            if ((rc = nlf_check::analyse_channel(src, i, f, in_lo, in_hi, c, fail)) != NLF_OK) return rc;
            for (int k = 0; k < taps; ++k) L.w[(size_t)f * taps + k] = src.weight[(size_t)f * taps + k];
            L.mult[f] = c.mult;
            L.bround[f] = c.br;
            L.shift[f] = c.shift;
            if (c.high) {  // high-dword form: z = (acc*M + B) >> 32
                L.fm[f] = c.M;
                L.fb[f] = c.B;
            }
            fast = fast && c.high;
            // folded form (the SIMD weights are int16): every w*m is an int16 as well
            bool fok = c.fits32;
            for (int k = 0; k < taps && fok; ++k) {
                const int64_t wm = (int64_t)L.w[(size_t)f * taps + k] * c.mult;
                fok = wm >= -32768 && wm <= 32767;
            }
            if (fok) {
                L.b32[f] = (int32_t)c.br;
                L.s32[f] = c.shift;
            }
            fold = fold && fok;
        }
        L.rq = fold ? RQ_FOLD : (fast ? RQ_HIGH : RQ_GENERAL);
        // SIMD weight operands (the multiplier folded in for RQ_FOLD; the scalar path uses L.w)
        std::vector<int32_t> ws(L.w);
        if (L.rq == RQ_FOLD)
            for (int f = 0; f < src.cout; ++f)
                for (int k = 0; k < taps; ++k) ws[(size_t)f * taps + k] *= (int32_t)L.mult[f];
        if (L.kind == NLF_LAYER_PW) {
            L.wp.assign((size_t)cpad * L.pin, 0);
            for (int f = 0; f < src.cout; ++f)
                for (int j = 0; j < L.pin; ++j) {
                    const int32_t a = ws[(size_t)f * taps + 2 * j];
                    const int32_t b2 = (2 * j + 1 < src.cin) ? ws[(size_t)f * taps + 2 * j + 1] : 0;
                    L.wp[(size_t)f * L.pin + j] = (int32_t)((uint32_t)(uint16_t)(int16_t)a | ((uint32_t)(uint16_t)(int16_t)b2 << 16));
                }
        } else {
            L.wp.assign((size_t)L.pout * 18, 0);
            for (int q = 0; q < L.pout; ++q)
                for (int t = 0; t < 9; ++t) {
                    const int32_t a = ws[(size_t)(2 * q) * 9 + t];
                    const int32_t b2 = ws[(size_t)(2 * q + 1) * 9 + t];  // 0 for a padding channel
                    L.wp[(size_t)q * 18 + 2 * t] = (int32_t)(uint32_t)(uint16_t)(int16_t)a;
                    L.wp[(size_t)q * 18 + 2 * t + 1] = (int32_t)((uint32_t)(uint16_t)(int16_t)b2 << 16);
                }
            // vertical pairs: lane = (row y, row y+1) of one channel; for output rows (r, r+1) from the
            // pairs A = (r-1, r) and B = (r+1, r+2): r += A.(w0,w1) + B.(w2,0); r+1 += A.(0,w0) + B.(w1,w2)
            L.wvp.assign((size_t)2 * L.pout * 12, 0);
            auto wpair = [](int32_t lo, int32_t hi) {
                return (int32_t)((uint32_t)(uint16_t)(int16_t)lo | ((uint32_t)(uint16_t)(int16_t)hi << 16));
            };
            for (int c = 0; c < src.cout; ++c)
                for (int dx = 0; dx < 3; ++dx) {
                    const int32_t w0 = ws[(size_t)c * 9 + dx], w1 = ws[(size_t)c * 9 + 3 + dx],
                                  w2 = ws[(size_t)c * 9 + 6 + dx];
                    int32_t* d = &L.wvp[(size_t)c * 12 + dx * 4];
                    d[0] = wpair(w0, w1);
                    d[1] = wpair(w2, 0);
                    d[2] = wpair(0, w0);
                    d[3] = wpair(w1, w2);
                }
            L.wv.assign((size_t)L.pout * 18 * 16 + 16, 0);
            L.wvo = (size_t)((64 - (reinterpret_cast<uintptr_t>(L.wv.data()) & 63)) & 63) / sizeof(int32_t);
            for (size_t k = 0; k < (size_t)L.pout * 18; ++k)
                for (int lane = 0; lane < 16; ++lane) L.wv[L.wvo + k * 16 + lane] = L.wp[k];
        }
        cin = src.cout;
        in_lo = L.lo;
        in_hi = L.hi;
    }
    // halo bookkeeping
    int d = 0;
    for (int i = net->nlayers - 1; i >= 0; --i) {
        P.L[i].D = d;
        if (P.L[i].kind == NLF_LAYER_DW) ++d;
    }
    P.halo = d;
    P.vp = true;
    for (int i = 0; i < net->nlayers; ++i)
        if (P.L[i].kind == NLF_LAYER_DW && (i == 0 || P.L[i - 1].kind != NLF_LAYER_PW)) P.vp = false;
    P.maxp = P.p0;
    for (const LayerPlan& L : P.L) P.maxp = std::max(P.maxp, L.pout);
    return NLF_OK;
}

typedef void (*ItemFn)(const Plan&, const void* pic, Scratch&, const Item&, unsigned* bad);

}  // namespace nlf

// ============================================================ per-instruction-set implementations
#define NLF_ISA_PASS 1
#define NLF_VW 1
namespace nlf_scalar {
#include "filter_cpu.cpp"
}
#undef NLF_VW

#if NLF_HAVE_SIMD
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,bmi,bmi2,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")
#endif
#define NLF_VW 8
namespace nlf_avx2 {
#include "filter_cpu.cpp"
}
#undef NLF_VW
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,bmi,bmi2,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,bmi,bmi2,popcnt")
#endif
#define NLF_VW 16
namespace nlf_avx512 {
#include "filter_cpu.cpp"
}
#undef NLF_VW
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // NLF_HAVE_SIMD
#undef NLF_ISA_PASS

// ================================================================================= driver / ABI
namespace nlf {

static_assert(NLF_ISA_SCALAR == nlf_cpu::LEVEL_PORTABLE && NLF_ISA_AVX2 == nlf_cpu::LEVEL_AVX2 &&
              NLF_ISA_AVX512 == nlf_cpu::LEVEL_AVX512, "nlf_filter.h's ISA numbers are nlf_cpu_features.h's levels");
constexpr int COMPILED_ISA = NLF_HAVE_SIMD ? NLF_ISA_AVX512 : NLF_ISA_SCALAR;

static bool cpu_has(int isa) { return isa <= COMPILED_ISA && nlf_cpu::has(isa, nlf_cpu::EXTRA_VNNI); }
static int best_isa() { return nlf_cpu::best(nlf_cpu::EXTRA_VNNI, COMPILED_ISA); }

static ItemFn item_fn(int isa, bool u16) {
    switch (isa) {
#if NLF_HAVE_SIMD
        case NLF_ISA_AVX512: return u16 ? nlf_avx512::process_item_u16 : nlf_avx512::process_item_u8;
        case NLF_ISA_AVX2: return u16 ? nlf_avx2::process_item_u16 : nlf_avx2::process_item_u8;
#endif
        default: return u16 ? nlf_scalar::process_item_u16 : nlf_scalar::process_item_u8;
    }
}

static int vector_width(int isa) { return isa == NLF_ISA_AVX512 ? 16 : (isa == NLF_ISA_AVX2 ? 8 : 1); }

template <typename T>
static int check_planes(const nlf_planes* pl, int planes, Pic<T>& pic) {
    for (int g = 0; g < planes; ++g) {
        if (!pl->src[g] || !pl->dst[g]) return fail(NLF_ERR_ARG, "plane %d: NULL pointer", g);
        if (pl->src_stride[g] < pl->width || pl->dst_stride[g] < pl->width)
            return fail(NLF_ERR_ARG, "plane %d: stride smaller than the width", g);
        pic.src[g] = static_cast<const T*>(pl->src[g]);
        pic.dst[g] = static_cast<T*>(pl->dst[g]);
        pic.ss[g] = pl->src_stride[g];
        pic.ds[g] = pl->dst_stride[g];
    }
    for (int g = planes; g < 2; ++g) {
        pic.src[g] = nullptr;
        pic.dst[g] = nullptr;
        pic.ss[g] = pic.ds[g] = 0;
    }
    return NLF_OK;
}

// Worker threads that outlive a call. Starting threads and setting up their ring buffers for every
// call cost 3-5 % of a 1080p frame and 9-11 % of a 416x240 one (tools/kernel_ab.cpp, 2 threads). One
// call at a time uses the pool; a concurrent call (from another caller thread) starts threads of its
// own. A child process after fork() starts a pool of its own (the parent's threads do not exist
// there). Idle workers sleep on a condition variable; the pool is never destroyed and its threads end
// with the process.
namespace {
class Pool {
   public:
    static Pool* get() {
        Pool* p = current_.load();
        if (p && p->owner_ == self_pid()) return p;
        Pool* fresh = new (std::nothrow) Pool();
        if (!fresh) return nullptr;
        if (current_.compare_exchange_strong(p, fresh)) return fresh;  // p: the parent's pool, left as is
        delete fresh;
        return current_.load();
    }
    // Run fn() here and on n - 1 pool threads and return when all have returned; false (nothing run) if
    // another call is using the pool. Throws std::system_error if a thread cannot be started.
    bool run(int n, const std::function<void()>& fn) {
        std::unique_lock<std::mutex> busy(call_, std::try_to_lock);
        if (!busy.owns_lock()) return false;
        while ((int)threads_.size() < n - 1) {
            const int idx = (int)threads_.size() + 1;
            threads_.push_back(new std::thread([this, idx] { loop(idx); }));
        }
        {
            std::lock_guard<std::mutex> lk(m_);
            fn_ = &fn;
            want_ = n - 1;
            pending_ = n - 1;
            ++gen_;
        }
        start_.notify_all();
        fn();
        std::unique_lock<std::mutex> lk(m_);
        done_.wait(lk, [this] { return pending_ == 0; });
        fn_ = nullptr;
        return true;
    }

   private:
    // internal linkage: a function-local static of this inline code would be one object shared by
    // every build of this file loaded into a process (a GNU unique symbol)
    static std::atomic<Pool*> current_;
    static long self_pid() {
#if NLF_HAVE_FORK
        return (long)getpid();
#else
        return 0;
#endif
    }
    void loop(int idx) {  // worker idx = 1, 2, ... takes part in calls with n > idx
        uint64_t seen = 0;
        std::unique_lock<std::mutex> lk(m_);
        for (;;) {
            start_.wait(lk, [&] { return gen_ != seen; });
            seen = gen_;
            if (idx > want_) continue;
            const std::function<void()>* fn = fn_;
            lk.unlock();
            (*fn)();
            lk.lock();
            if (--pending_ == 0) done_.notify_one();
        }
    }
    const long owner_ = self_pid();
    std::mutex call_;  // held by the call that uses the pool
    std::mutex m_;     // guards what follows
    std::condition_variable start_, done_;
    std::vector<std::thread*> threads_;  // never joined (see above)
    const std::function<void()>* fn_ = nullptr;
    uint64_t gen_ = 0;  // one more per call
    int want_ = 0, pending_ = 0;
};
std::atomic<Pool*> Pool::current_{nullptr};
}  // namespace

static int filter(const nlf_network* net, const nlf_planes* pl, int threads, int isa) {
    g_last_error[0] = 0;
    if (!net || !pl) return fail(NLF_ERR_ARG, "NULL argument");
    if (pl->height < 1 || pl->width < 1) return fail(NLF_ERR_ARG, "empty picture %dx%d", pl->width, pl->height);
    if (pl->bitdepth < 8 || pl->bitdepth > 16) return fail(NLF_ERR_ARG, "bit depth %d not in 8..16", pl->bitdepth);
    if (pl->sample_bytes != 1 && pl->sample_bytes != 2)
        return fail(NLF_ERR_ARG, "sample_bytes must be 1 or 2, got %d", pl->sample_bytes);
    if (pl->sample_bytes == 1 && pl->bitdepth != 8)
        return fail(NLF_ERR_ARG, "8-bit samples need bit depth 8, got %d", pl->bitdepth);
    if (pl->memory != NLF_MEMORY_HOST) return fail(NLF_ERR_ARG, "the CPU kernel needs host memory");
    if (isa == NLF_ISA_AUTO) isa = best_isa();
    if (isa != NLF_ISA_SCALAR && isa != NLF_ISA_AVX2 && isa != NLF_ISA_AVX512)
        return fail(NLF_ERR_ARG, "unknown instruction set %d", isa);
    if (!cpu_has(isa)) return fail(NLF_ERR_ISA, "instruction set %d is not available on this CPU", isa);

    Plan P;
    int rc = build_plan(net, pl->bitdepth, P);
    if (rc != NLF_OK) return rc;

    const bool u16 = pl->sample_bytes == 2;
    Pic<uint8_t> p8{};
    Pic<uint16_t> p16{};
    rc = u16 ? check_planes(pl, P.planes, p16) : check_planes(pl, P.planes, p8);
    if (rc != NLF_OK) return rc;
    const int H = pl->height, W = pl->width;
    const int Hq = (H + P.ph - 1) / P.ph, Wq = (W + P.pw - 1) / P.pw;
    p8.H = p16.H = H;
    p8.W = p16.W = W;
    p8.Hq = p16.Hq = Hq;
    p8.Wq = p16.Wq = Wq;
    p8.bd = p16.bd = pl->bitdepth;

    // work items: strips of ~512 packed columns (long rows amortise the per-row set-up: 512 ran 2-7 %
    // faster than 256 at 1080p and no slower at any size from 416x240 to 2560x1600, 128 and 192 ran
    // slower; the rings of a 5x12 network stay in L2), bands of rows for load balance between threads
    if (threads <= 0) threads = (int)std::max(1u, std::thread::hardware_concurrency());
    threads = std::min(threads, 256);
    const int VW = vector_width(isa);
    // strip width: the widest stage (tw + 2*halo columns) fills whole vectors, ~512 columns
    const int tw_target = std::max(VW, (512 + VW - 1) / VW * VW - 2 * P.halo);
    const int nstrips = std::max(1, (Wq + tw_target - 1) / tw_target);
    const int tw = nstrips == 1 ? Wq : tw_target;
    int nbands = 1;
    if (threads > 1) {  // ~8 items per thread: a descheduled thread delays the call by one small item
        nbands = (8 * threads + nstrips - 1) / nstrips;
        const int min_rows = std::max(32, 8 * P.halo);  // a band recomputes 2*halo rows of its neighbours
        nbands = std::max(1, std::min(nbands, Hq / min_rows));
    }
    std::vector<Item> items;
    for (int b = 0; b < nbands; ++b) {
        const int y0 = (int)((int64_t)Hq * b / nbands), y1 = (int)((int64_t)Hq * (b + 1) / nbands);
        if (y1 <= y0) continue;
        for (int s = 0; s < nstrips; ++s) {
            const int x0 = s * tw, x1 = std::min(Wq, x0 + tw);
            if (x1 > x0) items.push_back(Item{y0, y1, x0, x1});
        }
    }
    int WB = LM + tw + 2 * P.halo + VW + 2;
    WB = (WB + 15) / 16 * 16 + 16;
    threads = std::max(1, std::min(threads, (int)items.size()));

    const ItemFn fn = item_fn(isa, u16);
    const void* picp = u16 ? static_cast<const void*>(&p16) : static_cast<const void*>(&p8);
    std::atomic<int> next(0);
    std::atomic<unsigned> bad(0);
    std::atomic<int> status(NLF_OK);
    const std::function<void()> worker = [&]() {
        try {
            thread_local Scratch S;  // kept between calls (Scratch::init reuses its memory)
            if (!S.init(P, WB)) {
                status.store(NLF_ERR_NOMEM);
                return;
            }
            unsigned b = 0;
            for (;;) {
                const int k = next.fetch_add(1);
                if (k >= (int)items.size() || status.load() != NLF_OK) break;
                fn(P, picp, S, items[k], &b);
            }
            bad.fetch_or(b);
        } catch (const std::bad_alloc&) {
            status.store(NLF_ERR_NOMEM);
        } catch (...) {
            status.store(NLF_ERR_INTERNAL);
        }
    };
    try {
        if (threads == 1) {
            worker();
        } else {
            Pool* pool = Pool::get();
            if (!pool || !pool->run(threads, worker)) {  // the pool is busy: threads of this call's own
                std::vector<std::thread> own;
                own.reserve(threads - 1);
                for (int t = 1; t < threads; ++t) own.emplace_back(worker);
                worker();
                for (std::thread& th : own) th.join();
            }
        }
    } catch (const std::system_error&) {
        return fail(NLF_ERR_INTERNAL, "cannot start threads");
    } catch (const std::bad_alloc&) {
        return fail(NLF_ERR_NOMEM, "out of memory");
    }
    const int st = status.load();
    if (st == NLF_ERR_NOMEM) return fail(st, "out of memory for ring buffers");
    if (st != NLF_OK) return fail(st, "internal error in a worker thread");
    if (bad.load()) return fail(NLF_ERR_RANGE, "a sample is >= 2^%d", pl->bitdepth);
    return NLF_OK;
}

}  // namespace nlf

extern "C" {

NLF_API int32_t nlf_abi_version(void) { return NLF_ABI_VERSION; }

NLF_API const char* nlf_strerror(int32_t code) { return nlf_error_text(code); }

NLF_API const char* nlf_last_error(void) { return nlf::g_last_error; }

NLF_API int32_t nlf_cpu_best_isa(void) { return nlf::best_isa(); }

NLF_API int32_t nlf_cpu_isa_supported(int32_t isa) {
    if (isa != NLF_ISA_SCALAR && isa != NLF_ISA_AVX2 && isa != NLF_ISA_AVX512) return 0;
    return nlf::cpu_has(isa) ? 1 : 0;
}

NLF_API int32_t nlf_cpu_filter(const nlf_network* net, const nlf_planes* planes, int32_t threads, int32_t isa) {
    try {
        return nlf::filter(net, planes, threads, isa);
    } catch (const std::bad_alloc&) {
        return nlf::fail(NLF_ERR_NOMEM, "out of memory");
    } catch (...) {
        return nlf::fail(NLF_ERR_INTERNAL, "unexpected C++ exception");
    }
}

NLF_API int32_t nlf_cpu_requant_forms(const nlf_network* net, int32_t bitdepth, int32_t* forms, int32_t n) {
    try {
        nlf::g_last_error[0] = 0;
        if (!forms || n < 0) return nlf::fail(NLF_ERR_ARG, "forms: NULL pointer or negative count");
        if (bitdepth < 8 || bitdepth > 16) return nlf::fail(NLF_ERR_ARG, "bit depth %d not in 8..16", bitdepth);
        nlf::Plan P;
        const int rc = nlf::build_plan(net, bitdepth, P);
        if (rc != NLF_OK) return rc;
        for (int i = 0; i < n && i < (int)P.L.size(); ++i) forms[i] = P.L[i].rq;
        return NLF_OK;
    } catch (const std::bad_alloc&) {
        return nlf::fail(NLF_ERR_NOMEM, "out of memory");
    } catch (...) {
        return nlf::fail(NLF_ERR_INTERNAL, "unexpected C++ exception");
    }
}

}  // extern "C"

#else  // ================================================= NLF_ISA_PASS: one instruction set
// Included three times (namespaces nlf_scalar, nlf_avx2, nlf_avx512) with NLF_VW = 1, 8, 16.

using nlf::Item;
using nlf::LayerPlan;
using nlf::Pic;
using nlf::Plan;
using nlf::Scratch;

// ------------------------------------------------------------------------ input / output stages
// Sample loops, vectorised explicitly for AVX-512 (masked tails) and left to the compiler elsewhere.
// io_centre:  o[i] = s[i] - off                                   (i < n)
// io_centre2: o[2i] = s0[i] - off, o[2i+1] = s1 ? s1[i] - off : 0   (i < n)
// io_add:     d[i] = clip(s[i] + r[i])                            (i < n)
// io_add2:    d[i] = clip(s[i] + r[2i])                           (i < n)
// io_centre* return the OR of the samples read (the caller checks it against the bit depth).
#if NLF_VW == 16
static inline __mmask32 tailmask32(int m) { return m >= 32 ? 0xFFFFFFFFu : ((1u << m) - 1u); }
static inline __mmask16 tailmask16(int m) { return (__mmask16)(m >= 16 ? 0xFFFFu : ((1u << m) - 1u)); }
static inline unsigned or16(__m512i acc) {  // OR of the 16-bit lanes
    const unsigned r = (unsigned)_mm512_reduce_or_epi32(acc);
    return (r | (r >> 16)) & 0xFFFFu;
}
template <typename T>
static inline __m512i load16x32(const T* s, __mmask16 k) {  // 16 samples -> 16 int32
    if constexpr (sizeof(T) == 1) return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, s));
    else return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, s));
}
template <typename T>
static inline void store16x32(T* d, __mmask16 k, __m512i v) {  // 16 int32 (in range) -> 16 samples
    if constexpr (sizeof(T) == 1) _mm512_mask_cvtepi32_storeu_epi8(d, k, v);
    else _mm512_mask_cvtepi32_storeu_epi16(d, k, v);
}
template <typename T>
static inline unsigned io_centre(const T* s, int n, int off, int16_t* o) {
    const __m512i voff = _mm512_set1_epi16((short)off);
    __m512i acc = _mm512_setzero_si512();
    for (int i = 0; i < n; i += 32) {
        const __mmask32 k = tailmask32(n - i);
        __m512i x;
        if constexpr (sizeof(T) == 1) {
            x = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(k, s + i));
        } else {
            x = _mm512_maskz_loadu_epi16(k, s + i);
            acc = _mm512_or_si512(acc, x);
        }
        _mm512_mask_storeu_epi16(o + i, k, _mm512_sub_epi16(x, voff));
    }
    return sizeof(T) == 1 ? 0u : or16(acc);
}
template <typename T>
static inline unsigned io_centre2(const T* s0, const T* s1, int n, int off, int16_t* o) {
    const __m512i voff = s1 ? _mm512_set1_epi16((short)off) : _mm512_set1_epi32(off & 0xFFFF);
    __m512i acc = _mm512_setzero_si512();
    for (int i = 0; i < n; i += 16) {
        const __mmask16 k = tailmask16(n - i);
        __m512i v = load16x32(s0 + i, k);
        if (s1) v = _mm512_or_si512(v, _mm512_slli_epi32(load16x32(s1 + i, k), 16));
        if (sizeof(T) > 1) acc = _mm512_or_si512(acc, v);
        _mm512_mask_storeu_epi32(o + 2 * i, k, _mm512_sub_epi16(v, voff));
    }
    return sizeof(T) == 1 ? 0u : or16(acc);
}
template <typename T>
static inline void io_add(const T* s, const int16_t* r, int n, int maxv, T* d) {
    const __m512i vmax = _mm512_set1_epi32(maxv), zero = _mm512_setzero_si512();
    if constexpr (sizeof(T) == 1) {  // 32 at a time in saturating int16: clip(sat(s + r)) == clip(s + r)
        const __m512i vmax16 = _mm512_set1_epi16((short)maxv);
        for (int i = 0; i < n; i += 32) {
            const __mmask32 k = tailmask32(n - i);
            const __m512i x = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(k, s + i));
            const __m512i v = _mm512_adds_epi16(x, _mm512_maskz_loadu_epi16(k, r + i));
            _mm512_mask_cvtepi16_storeu_epi8(d + i, k, _mm512_min_epi16(_mm512_max_epi16(v, zero), vmax16));
        }
    } else {
        for (int i = 0; i < n; i += 16) {
            const __mmask16 k = tailmask16(n - i);
            const __m512i rv = _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(k, r + i));
            const __m512i v = _mm512_add_epi32(load16x32(s + i, k), rv);
            store16x32(d + i, k, _mm512_min_epi32(_mm512_max_epi32(v, zero), vmax));
        }
    }
}
template <typename T>
static inline void io_add2(const T* s, const int16_t* r, int n, int maxv, T* d) {
    const __m512i vmax = _mm512_set1_epi32(maxv), zero = _mm512_setzero_si512();
    for (int i = 0; i < n; i += 16) {
        const __mmask16 k = tailmask16(n - i);
        // r[2i] is the low half of the 32-bit word at r + 2i (r may start at either half of a pair)
        const __m512i w = _mm512_maskz_loadu_epi32(k, r + 2 * i);
        const __m512i rv = _mm512_srai_epi32(_mm512_slli_epi32(w, 16), 16);
        const __m512i v = _mm512_add_epi32(load16x32(s + i, k), rv);
        store16x32(d + i, k, _mm512_min_epi32(_mm512_max_epi32(v, zero), vmax));
    }
}
#else
template <typename T>
static inline unsigned io_centre(const T* __restrict s, int n, int off, int16_t* __restrict o) {
    unsigned acc = 0;
    for (int i = 0; i < n; ++i) {
        acc |= s[i];
        o[i] = (int16_t)((int)s[i] - off);
    }
    return acc;
}
template <typename T>
static inline unsigned io_centre2(const T* __restrict s0, const T* __restrict s1, int n, int off,
                                  int16_t* __restrict o) {
    unsigned acc = 0;
    uint32_t* __restrict o32 = reinterpret_cast<uint32_t*>(o);  // rings are 4-byte aligned per pair
    if (s1) {
        for (int i = 0; i < n; ++i) {
            acc |= (unsigned)s0[i] | (unsigned)s1[i];
            o32[i] = (uint32_t)(uint16_t)((int)s0[i] - off) | ((uint32_t)(uint16_t)((int)s1[i] - off) << 16);
        }
    } else {
        for (int i = 0; i < n; ++i) {
            acc |= s0[i];
            o32[i] = (uint32_t)(uint16_t)((int)s0[i] - off);
        }
    }
    return acc;
}
template <typename T>
static inline void io_add(const T* __restrict s, const int16_t* __restrict r, int n, int maxv, T* __restrict d) {
    for (int i = 0; i < n; ++i) {
        const int v = (int)s[i] + (int)r[i];
        d[i] = (T)std::min(std::max(v, 0), maxv);
    }
}
template <typename T>
static inline void io_add2(const T* __restrict s, const int16_t* __restrict r, int n, int maxv, T* __restrict d) {
    for (int i = 0; i < n; ++i) {
        const int v = (int)s[i] + (int)r[2 * i];
        d[i] = (T)std::min(std::max(v, 0), maxv);
    }
}
#endif

// Stage 0 row r: packed columns [xa, xb) (inside the picture) as centred int16 channel pairs.
// Returns OR of (sample >> bitdepth) for the range check of 16-bit containers.
template <typename T>
static inline unsigned input_row(const Plan& P, const Pic<T>& pic, int r, int xa, int xb, int16_t* out,
                                 int WB, int ia) {
    const int off = 1 << (pic.bd - 1);
    const int ph = P.ph, pw = P.pw, pp = ph * pw;
    const int H = pic.H, W = pic.W;
    unsigned acc = 0;
    for (int p = 0; p < P.p0; ++p) {
        int16_t* o = out + ((size_t)p * WB + ia) * 2;
        const int ch0 = 2 * p, ch1 = 2 * p + 1;
        if (pw == 2) {  // ch0, ch1 = dx 0, 1 of the same plane row: contiguous samples
            const int g = ch0 / pp, dy = (ch0 % pp) / pw;
            const int Y = std::min(r * ph + dy, H - 1);
            const T* s = pic.src[g] + (ptrdiff_t)Y * pic.ss[g];
            const int X0 = 2 * xa, X1 = 2 * xb, Xl = std::min(X1, W);
            acc |= io_centre(s + X0, Xl - X0, off, o);
            for (int X = Xl; X < X1; ++X) o[X - X0] = (int16_t)((int)s[W - 1] - off);  // right padding
            if (Xl < X1) acc |= s[W - 1];
        } else {  // pw == 1: two rows / planes interleaved, or (sample, 0)
            const int g0 = ch0 / pp, dy0 = ch0 % pp;
            const T* s0 = pic.src[g0] + (ptrdiff_t)std::min(r * ph + dy0, H - 1) * pic.ss[g0];
            const T* s1 = nullptr;
            if (ch1 < P.c0) {
                const int g1 = ch1 / pp, dy1 = ch1 % pp;
                s1 = pic.src[g1] + (ptrdiff_t)std::min(r * ph + dy1, H - 1) * pic.ss[g1];
            }
            acc |= io_centre2(s0 + xa, s1 ? s1 + xa : nullptr, xb - xa, off, o);
        }
    }
    return sizeof(T) > 1 ? acc >> pic.bd : 0u;
}

// Last stage row r (residual pairs, column x0 at index i0): dst = clip(src + r) for the samples of
// packed columns [x0, x1) that lie inside the picture.
template <typename T>
static inline void output_row(const Plan& P, const Pic<T>& pic, int r, int x0, int x1, const int16_t* res,
                              int WB, int i0) {
    const int maxv = (1 << pic.bd) - 1;
    const int ph = P.ph, pw = P.pw, pp = ph * pw;
    for (int p = 0; p < P.p0; ++p) {
        const int16_t* rr = res + ((size_t)p * WB + i0) * 2;
        if (pw == 2) {
            const int ch0 = 2 * p, g = ch0 / pp, dy = (ch0 % pp) / pw;
            const int Y = r * ph + dy;
            if (Y >= pic.H) continue;
            const int X0 = 2 * x0, X1 = std::min(2 * x1, pic.W);
            io_add(pic.src[g] + (ptrdiff_t)Y * pic.ss[g] + X0, rr, X1 - X0, maxv,
                   pic.dst[g] + (ptrdiff_t)Y * pic.ds[g] + X0);
        } else {
            for (int k = 0; k < 2; ++k) {
                const int ch = 2 * p + k;
                if (ch >= P.c0) break;
                const int g = ch / pp, dy = ch % pp;
                const int Y = r * ph + dy;
                if (Y >= pic.H) continue;
                io_add2(pic.src[g] + (ptrdiff_t)Y * pic.ss[g] + x0, rr + k, x1 - x0, maxv,
                        pic.dst[g] + (ptrdiff_t)Y * pic.ds[g] + x0);
            }
        }
    }
}

// Zero the columns of a ring row that lie outside the picture (depth-wise layers read them as 0).
static inline void zero_outside(int16_t* row, int npairs, int WB, int xorg, int Wq) {
    // column x is at index x - xorg
    const int ilo = std::max(0, std::min(WB, -xorg));       // index of column 0
    const int ihi = std::max(0, std::min(WB, Wq - xorg));   // index of column Wq
    for (int p = 0; p < npairs; ++p) {
        int16_t* b = row + (size_t)p * WB * 2;
        if (ilo > 0) std::memset(b, 0, (size_t)ilo * 4);
        if (ihi < WB) std::memset(b + (size_t)ihi * 2, 0, (size_t)(WB - ihi) * 4);
    }
}

// acc*m + b in wrapping 64-bit arithmetic (exact for valid inputs; no UB on garbage columns)
static inline int64_t mul_add_wrap(int64_t acc, int64_t m, int64_t b) {
    return (int64_t)((uint64_t)acc * (uint64_t)m + (uint64_t)b);
}

static inline int32_t requant_scalar(int64_t acc, const LayerPlan& L, int f) {
    const int64_t z = mul_add_wrap(acc, L.mult[f], L.bround[f]) >> L.shift[f];
    return (int32_t)(z < L.lo ? L.lo : (z > L.hi ? L.hi : z));
}


#if NLF_VW == 1  // ------------------------------------------------------------ scalar row kernels

static inline int16_t act(const int16_t* row, int WB, int c, int i) {
    return row[((size_t)(c >> 1) * WB + i) * 2 + (c & 1)];
}

static void pw_row(const LayerPlan& L, const int16_t* in, int16_t* out, int WB, int i0, int n) {
    const int cin = L.cin;
    for (int i = i0; i < i0 + n; ++i) {
        for (int f = 0; f < 2 * L.pout; ++f) {
            int64_t acc = 0;
            const int32_t* w = L.w.data() + (size_t)f * cin;
            for (int c = 0; c < cin; ++c) acc += (int64_t)w[c] * act(in, WB, c, i);
            out[((size_t)(f >> 1) * WB + i) * 2 + (f & 1)] = (int16_t)requant_scalar(acc, L, f);
        }
    }
}

static void dw_row(const LayerPlan& L, const int16_t* const rows[3], int16_t* out, int WB, int i0, int n) {
    for (int f = 0; f < 2 * L.pout; ++f) {
        const int32_t* w = L.w.data() + (size_t)f * 9;
        for (int i = i0; i < i0 + n; ++i) {
            int64_t acc = 0;
            for (int dy = 0; dy < 3; ++dy)
                for (int dx = 0; dx < 3; ++dx) acc += (int64_t)w[dy * 3 + dx] * act(rows[dy], WB, f, i + dx);
            out[((size_t)(f >> 1) * WB + i) * 2 + (f & 1)] = (int16_t)requant_scalar(acc, L, f);
        }
    }
}

#elif NLF_VW == 16  // ------------------------------------------------------ AVX-512 row kernels

typedef __m512i V;
static inline V vload(const int16_t* p) { return _mm512_loadu_si512((const void*)p); }
static inline void vstore(int16_t* p, V v) { _mm512_storeu_si512((void*)p, v); }
static inline V vzero() { return _mm512_setzero_si512(); }
static inline V vdot(V acc, V x, int32_t w) { return _mm512_dpwssd_epi32(acc, x, _mm512_set1_epi32(w)); }
static inline V vdot2(V acc, V x, V w) { return _mm512_dpwssd_epi32(acc, x, w); }
static inline V vbcast(int32_t w) { return _mm512_set1_epi32(w); }
static inline V vloadw(const int32_t* p) { return _mm512_load_si512((const void*)p); }
static inline V vsra(V acc, int32_t s) { return _mm512_srav_epi32(acc, _mm512_set1_epi32(s)); }  // s > 31: sign
static inline V vkeep(V z, bool keep) { return _mm512_maskz_mov_epi32((__mmask16)(0u - (unsigned)keep), z); }
static inline V vbcast_fresh(const int32_t* p) {  // volatile: never merged with another broadcast of *p
    V r;
    __asm__ volatile("vpbroadcastd %1, %0" : "=v"(r) : "m"(*p));
    return r;
}

// z (int32, pixel order) from 16 int32 accumulators, high-dword form.
static inline V rq_fast(V acc, int64_t M, int64_t B) {
    const V vm = _mm512_set1_epi64(M), vb = _mm512_set1_epi64(B);
    const V e = _mm512_add_epi64(_mm512_mul_epi32(acc, vm), vb);
    const V o = _mm512_add_epi64(_mm512_mul_epi32(_mm512_srli_epi64(acc, 32), vm), vb);
    const V idx = _mm512_set_epi32(31, 15, 29, 13, 27, 11, 25, 9, 23, 7, 21, 5, 19, 3, 17, 1);
    return _mm512_permutex2var_epi32(e, idx, o);
}
// general form: 64-bit arithmetic shift and clamp
static inline V rq_general(V acc, int64_t m, int64_t b, int64_t s, int32_t lo, int32_t hi) {
    const V vm = _mm512_set1_epi64(m), vb = _mm512_set1_epi64(b);
    const __m128i cnt = _mm_cvtsi64_si128(s);
    const V vlo = _mm512_set1_epi64(lo), vhi = _mm512_set1_epi64(hi);
    V e = _mm512_sra_epi64(_mm512_add_epi64(_mm512_mul_epi32(acc, vm), vb), cnt);
    V o = _mm512_sra_epi64(_mm512_add_epi64(_mm512_mul_epi32(_mm512_srli_epi64(acc, 32), vm), vb), cnt);
    e = _mm512_min_epi64(_mm512_max_epi64(e, vlo), vhi);
    o = _mm512_min_epi64(_mm512_max_epi64(o, vlo), vhi);
    const V idx = _mm512_set_epi32(30, 14, 28, 12, 26, 10, 24, 8, 22, 6, 20, 4, 18, 2, 16, 0);
    return _mm512_permutex2var_epi32(e, idx, o);
}
// two channels' z -> saturated int16 pairs (z0, z1) per pixel; ReLU clamps at 0
static inline V pair(V z0, V z1, bool relu) {
    V p = _mm512_packs_epi32(z0, z1);
    if (relu) p = _mm512_max_epi16(p, vzero());
    const V sh = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15));
    return _mm512_shuffle_epi8(p, sh);
}

#elif NLF_VW == 8  // ---------------------------------------------------------- AVX2 row kernels

typedef __m256i V;
static inline V vload(const int16_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline void vstore(int16_t* p, V v) { _mm256_storeu_si256((__m256i*)p, v); }
static inline V vzero() { return _mm256_setzero_si256(); }
static inline V vdot(V acc, V x, int32_t w) { return _mm256_add_epi32(acc, _mm256_madd_epi16(x, _mm256_set1_epi32(w))); }
// the add in place, in asm: the compiler neither reassociates a chain of these (holding every product
// in a register of its own) nor copies the accumulator between registers in each loop iteration (it
// did both, and spilled: 10.2 -> 8.6 cycles per packed pixel in the 12->12 layer, AMD Zen 3)
static inline V vdot2(V acc, V x, V w) {
    const V m = _mm256_madd_epi16(x, w);
    __asm__("vpaddd %1, %0, %0" : "+x"(acc) : "x"(m));
    return acc;
}
// an empty asm that makes the compiler load v into a register here, instead of folding the load into
// each instruction that uses it
static inline void in_register(V& v) { __asm__("" : "+x"(v)); }
static inline V vbcast(int32_t w) { return _mm256_set1_epi32(w); }
static inline V vloadw(const int32_t* p) { return _mm256_load_si256((const __m256i*)p); }
static inline V vsra(V acc, int32_t s) { return _mm256_srav_epi32(acc, _mm256_set1_epi32(s)); }  // s > 31: sign
static inline V vkeep(V z, bool keep) { return _mm256_and_si256(z, _mm256_set1_epi32(-(int)keep)); }
static inline V vbcast_fresh(const int32_t* p) { return _mm256_set1_epi32(*p); }

static inline V rq_fast(V acc, int64_t M, int64_t B) {
    const V vm = _mm256_set1_epi64x(M), vb = _mm256_set1_epi64x(B);
    const V e = _mm256_add_epi64(_mm256_mul_epi32(acc, vm), vb);
    const V o = _mm256_add_epi64(_mm256_mul_epi32(_mm256_srli_epi64(acc, 32), vm), vb);
    return _mm256_blend_epi32(_mm256_srli_epi64(e, 32), o, 0xAA);
}
// general form (rare): scalar, through memory
static inline V rq_general(V acc, int64_t m, int64_t b, int64_t s, int32_t lo, int32_t hi) {
    alignas(32) int32_t a[8];
    _mm256_store_si256((__m256i*)a, acc);
    for (int k = 0; k < 8; ++k) {
        const int64_t z = mul_add_wrap(a[k], m, b) >> s;
        a[k] = (int32_t)(z < lo ? lo : (z > hi ? hi : z));
    }
    return _mm256_load_si256((const __m256i*)a);
}
static inline V pair(V z0, V z1, bool relu) {
    V p = _mm256_packs_epi32(z0, z1);
    if (relu) p = _mm256_max_epi16(p, vzero());
    const V sh = _mm256_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
                                  0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);
    return _mm256_shuffle_epi8(p, sh);
}

#endif

#if NLF_VW > 1  // ------------------------------------------------- SIMD row kernels (shared)

// An empty asm that "changes" p: loads through p cannot be hoisted out of the caller's loops.
template <typename P>
static inline void hide(P*& p) {
    __asm__("" : "+r"(p));
}

// Row kernels compute NLF_VW-column vectors starting at ring index i0 (a multiple of 16) and store
// whole vectors (columns past the requested range are computed from whatever the rings hold there
// and never read as valid data). Depth-wise input rows are indexed so that input index i + dx holds
// column x + dx - 1 of output index i (the input stage's ring origin is one column further left).

template <int RQ>
static inline V rq(V acc, const LayerPlan& L, int f) {
    if (RQ == nlf::RQ_FOLD) return vsra(acc, L.s32[f]);
    if (RQ == nlf::RQ_HIGH) return rq_fast(acc, L.fm[f], L.fb[f]);
    return rq_general(acc, L.mult[f], L.bround[f], L.shift[f], L.lo, L.hi);
}
// Calls fn(std::integral_constant<int, L.rq>()): the one place a layer's requantisation form becomes a
// template argument of the row kernels.
template <typename F>
static inline void with_rq(const LayerPlan& L, F&& fn) {
    switch (L.rq) {
        case nlf::RQ_FOLD: return fn(std::integral_constant<int, nlf::RQ_FOLD>());
        case nlf::RQ_HIGH: return fn(std::integral_constant<int, nlf::RQ_HIGH>());
        default: return fn(std::integral_constant<int, nlf::RQ_GENERAL>());
    }
}

// the accumulator of channel f before the first product (RQ_FOLD starts from bias + round); a fresh
// broadcast load per accumulator (a load-port uop) rather than a register copy of one (a vector-ALU uop)
template <int RQ>
static inline V acc0(const LayerPlan& L, int f) {
    return RQ == nlf::RQ_FOLD ? vbcast_fresh(&L.b32[f]) : vzero();
}

// Point-wise layer: NB pixel vectors per iteration share the weight broadcasts; PIN input pairs held
// in registers (PIN = 0: any number of pairs, read from the ring).
template <int RQ, int PIN, int NB>
static inline void pw_block(const LayerPlan& L, const int16_t* __restrict in, int16_t* __restrict out, size_t ps,
                            size_t i) {
    const int pin = PIN ? PIN : L.pin;
    const int32_t* __restrict wp = L.wp.data();
    V X[PIN ? PIN : 1][NB];
    if (PIN)
        for (int j = 0; j < PIN; ++j)
            for (int b = 0; b < NB; ++b) X[j][b] = vload(in + j * ps + i + b * 2 * NLF_VW);
    for (int q = 0; q < L.pout; ++q) {
        const int32_t* w0 = wp + (size_t)(2 * q) * pin;
        const int32_t* w1 = w0 + pin;
        V a0[NB], a1[NB];
        for (int b = 0; b < NB; ++b) {
            a0[b] = acc0<RQ>(L, 2 * q);
            a1[b] = acc0<RQ>(L, 2 * q + 1);
        }
        for (int j = 0; j < pin; ++j) {
            const int32_t c0 = w0[j], c1 = w1[j];
            for (int b = 0; b < NB; ++b) {
                const V x = PIN ? X[PIN ? j : 0][b] : vload(in + j * ps + i + b * 2 * NLF_VW);
                a0[b] = vdot(a0[b], x, c0);
                a1[b] = vdot(a1[b], x, c1);
            }
        }
        for (int b = 0; b < NB; ++b)
            vstore(out + q * ps + i + b * 2 * NLF_VW,
                   pair(rq<RQ>(a0[b], L, 2 * q), rq<RQ>(a1[b], L, 2 * q + 1), L.relu));
    }
}

template <int RQ, int PIN>
static void pw_row_t(const LayerPlan& L, const int16_t* in, int16_t* out, int WB, int i0, int nvec) {
    const size_t ps = (size_t)WB * 2;  // int16 elements between pairs
    int v = 0;
    for (; v + 2 <= nvec; v += 2) pw_block<RQ, PIN, 2>(L, in, out, ps, (size_t)(i0 + NLF_VW * v) * 2);
    if (v < nvec) pw_block<RQ, PIN, 1>(L, in, out, ps, (size_t)(i0 + NLF_VW * v) * 2);
}

template <int NB>
static inline void dw_block(const V (&W)[18], const int16_t* r0, const int16_t* r1, const int16_t* r2, size_t i,
                            V i0v, V i1v, V (&a0)[2], V (&a1)[2]) {
    const int16_t* rr[3] = {r0 + i, r1 + i, r2 + i};
    for (int b = 0; b < NB; ++b) {
        a0[b] = i0v;
        a1[b] = i1v;
    }
    for (int dy = 0; dy < 3; ++dy)
        for (int dx = 0; dx < 3; ++dx)
            for (int b = 0; b < NB; ++b) {
                const V x = vload(rr[dy] + 2 * dx + b * 2 * NLF_VW);
                a0[b] = vdot2(a0[b], x, W[(dy * 3 + dx) * 2]);
                a1[b] = vdot2(a1[b], x, W[(dy * 3 + dx) * 2 + 1]);
            }
}

template <int RQ>
static void dw_row_t(const LayerPlan& L, const int16_t* const rows[3], int16_t* out, int WB, int i0, int nvec) {
    const size_t ps = (size_t)WB * 2;
    for (int q = 0; q < L.pout; ++q) {
        V W[18];  // (w, 0) and (0, w) of the 9 taps, held in registers across the row
        const int32_t* wv = L.wvec() + (size_t)q * 18 * 16;
        for (int k = 0; k < 18; ++k) W[k] = vloadw(wv + k * 16);
        const int16_t* r0 = rows[0] + q * ps;
        const int16_t* r1 = rows[1] + q * ps;
        const int16_t* r2 = rows[2] + q * ps;
        int16_t* o = out + q * ps;
        const V i0v = acc0<RQ>(L, 2 * q), i1v = acc0<RQ>(L, 2 * q + 1);
        int v = 0;
        V a0[2], a1[2];
        for (; v + 2 <= nvec; v += 2) {
            const size_t i = (size_t)(i0 + NLF_VW * v) * 2;
            dw_block<2>(W, r0, r1, r2, i, i0v, i1v, a0, a1);
            for (int b = 0; b < 2; ++b)
                vstore(o + i + b * 2 * NLF_VW,
                       pair(rq<RQ>(a0[b], L, 2 * q), rq<RQ>(a1[b], L, 2 * q + 1), L.relu));
        }
        if (v < nvec) {
            const size_t i = (size_t)(i0 + NLF_VW * v) * 2;
            dw_block<1>(W, r0, r1, r2, i, i0v, i1v, a0, a1);
            vstore(o + i, pair(rq<RQ>(a0[0], L, 2 * q), rq<RQ>(a1[0], L, 2 * q + 1), L.relu));
        }
    }
}

// Input pairs a point-wise step may hold in registers (more are read from the ring where they are
// used: PIN = 0). AVX2 has 16 vector registers: holding 2 rows x 6 pairs beside 8 accumulators spilled,
// and reading them from the ring took the 12->12 layer from 14 to 10 cycles per packed pixel and the
// last layer from 2.5 to 1.8 (tools/kernel_layers.cpp, AMD Zen 3). AVX-512 has 32.
constexpr int PIN_IN_REGISTERS = NLF_VW == 8 ? 2 : 8;

template <int RQ>
static void pw_dispatch(const LayerPlan& L, const int16_t* in, int16_t* out, int WB, int i0, int nvec) {
    if (L.pin > PIN_IN_REGISTERS) return pw_row_t<RQ, 0>(L, in, out, WB, i0, nvec);
    switch (L.pin) {
        case 1: return pw_row_t<RQ, 1>(L, in, out, WB, i0, nvec);
        case 2: return pw_row_t<RQ, 2>(L, in, out, WB, i0, nvec);
        case 3: return pw_row_t<RQ, 3>(L, in, out, WB, i0, nvec);
        case 4: return pw_row_t<RQ, 4>(L, in, out, WB, i0, nvec);
        case 5: return pw_row_t<RQ, 5>(L, in, out, WB, i0, nvec);
        case 6: return pw_row_t<RQ, 6>(L, in, out, WB, i0, nvec);
        case 8: return pw_row_t<RQ, 8>(L, in, out, WB, i0, nvec);
        default: return pw_row_t<RQ, 0>(L, in, out, WB, i0, nvec);
    }
}

static void pw_row(const LayerPlan& L, const int16_t* in, int16_t* out, int WB, int i0, int n) {
    const int nvec = (n + NLF_VW - 1) / NLF_VW;
    with_rq(L, [&](auto rq) { pw_dispatch<decltype(rq)::value>(L, in, out, WB, i0, nvec); });
}

static void dw_row(const LayerPlan& L, const int16_t* const rows[3], int16_t* out, int WB, int i0, int n) {
    const int nvec = (n + NLF_VW - 1) / NLF_VW;
    with_rq(L, [&](auto rq) { dw_row_t<decltype(rq)::value>(L, rows, out, WB, i0, nvec); });
}


// ------------------------------------------------------------------ row-pair pipeline kernels
// Two rows at a time. A stage read by a depth-wise layer is stored as vertical pairs ("VP"): channel
// row c of a slot holds (row r, row r+1) of channel c in each 32-bit lane, so one VPDPWSSD applies
// two taps of one channel (no lane wasted); any other stage as channel pairs ("CP") per row.

// point-wise layer on rows (r, r+1), CP input -> VP output (channel rows f = 0..2*pout-1);
// rows flagged invalid (outside the picture) are stored as 0: the next depth-wise layer's padding
// FB output channels x 2 rows per block: 2*FB independent accumulator chains (VPDPWSSD has a latency
// of ~5 cycles and two ports, so about ten chains must be in flight to keep both busy)
template <int RQ, int PIN, int FB>
static inline void pw2_vp_block(const LayerPlan& L, const V (&X0)[PIN ? PIN : 1], const V (&X1)[PIN ? PIN : 1],
                                const int16_t* in0, const int16_t* in1, int16_t* out, size_t ps, size_t i, int f,
                                int pin, bool valid0, bool valid1) {
    const int32_t* wp = L.wp.data() + (size_t)f * pin;
    hide(wp);  // keeps the compiler from hoisting (and spilling) the weights of every block
    V a0[FB], a1[FB];
    for (int k = 0; k < FB; ++k) {
        a0[k] = acc0<RQ>(L, f + k);
        a1[k] = acc0<RQ>(L, f + k);
    }
    for (int j = 0; j < pin; ++j) {
        const V x0 = PIN ? X0[PIN ? j : 0] : vload(in0 + j * ps + i);
        const V x1 = PIN ? X1[PIN ? j : 0] : vload(in1 + j * ps + i);
        for (int k = 0; k < FB; ++k) {
            const V w = vbcast(wp[(size_t)k * pin + j]);
            a0[k] = vdot2(a0[k], x0, w);
            a1[k] = vdot2(a1[k], x1, w);
        }
    }
    for (int k = 0; k < FB; ++k)
        vstore(out + (f + k) * ps + i,
               pair(vkeep(rq<RQ>(a0[k], L, f + k), valid0), vkeep(rq<RQ>(a1[k], L, f + k), valid1), L.relu));
}

template <int RQ, int PIN>
static void pw2_vp_t(const LayerPlan& L, const int16_t* in0, const int16_t* in1, int16_t* out, int WB, int i0,
                     int nvec, bool valid0, bool valid1) {
    const int pin = PIN ? PIN : L.pin;
    const size_t ps = (size_t)WB * 2;
    const int nf = 2 * L.pout;
    for (int v = 0; v < nvec; ++v) {
        const size_t i = (size_t)(i0 + NLF_VW * v) * 2;
        V X0[PIN ? PIN : 1], X1[PIN ? PIN : 1];
        if (PIN)
            for (int j = 0; j < PIN; ++j) {
                X0[j] = vload(in0 + j * ps + i);
                X1[j] = vload(in1 + j * ps + i);
            }
        int f = 0;
        for (; f + 4 <= nf; f += 4) pw2_vp_block<RQ, PIN, 4>(L, X0, X1, in0, in1, out, ps, i, f, pin, valid0, valid1);
        if (f < nf) pw2_vp_block<RQ, PIN, 2>(L, X0, X1, in0, in1, out, ps, i, f, pin, valid0, valid1);
    }
}

template <int RQ>
static void pw2_vp_dispatch(const LayerPlan& L, const int16_t* in0, const int16_t* in1, int16_t* out, int WB,
                            int i0, int nvec, bool valid0, bool valid1) {
    if (L.pin > PIN_IN_REGISTERS) return pw2_vp_t<RQ, 0>(L, in0, in1, out, WB, i0, nvec, valid0, valid1);
    switch (L.pin) {
        case 1: return pw2_vp_t<RQ, 1>(L, in0, in1, out, WB, i0, nvec, valid0, valid1);
        case 2: return pw2_vp_t<RQ, 2>(L, in0, in1, out, WB, i0, nvec, valid0, valid1);
        case 4: return pw2_vp_t<RQ, 4>(L, in0, in1, out, WB, i0, nvec, valid0, valid1);
        case 6: return pw2_vp_t<RQ, 6>(L, in0, in1, out, WB, i0, nvec, valid0, valid1);
        case 8: return pw2_vp_t<RQ, 8>(L, in0, in1, out, WB, i0, nvec, valid0, valid1);
        default: return pw2_vp_t<RQ, 0>(L, in0, in1, out, WB, i0, nvec, valid0, valid1);
    }
}

static void pw2_vp(const LayerPlan& L, const int16_t* in0, const int16_t* in1, int16_t* out, int WB, int i0, int n,
                   bool valid0, bool valid1) {
    const int nvec = (n + NLF_VW - 1) / NLF_VW;
    with_rq(L, [&](auto rq) {
        pw2_vp_dispatch<decltype(rq)::value>(L, in0, in1, out, WB, i0, nvec, valid0, valid1);
    });
}

#if NLF_VW == 8
// AVX2 (16 vector registers; the AVX-512 version below keeps 24 weight broadcasts and 16 accumulators
// in its 32). Compiled for AVX2, that version spilled: about 60 loads per step (inputs loaded twice,
// weights, spills), 15.2 cycles per packed pixel against 8.9 for this one (AMD Zen 3). Here one channel
// at a time crosses a chunk of the row with its 12 weight vectors in registers (the adds after
// VPMADDWD have a latency of 1: its two accumulators suffice), each input vector is loaded once for
// its two products (folded into both, 12 loads and a spilled weight: 12.4 cycles), and the
// accumulator's start value is added last, from memory; the first channel's results wait in a
// small buffer for the second's, with which they are packed into channel pairs.
template <int RQ>
static void dw2_t(const LayerPlan& L, const int16_t* A, const int16_t* B, int16_t* out0, int16_t* out1, int WB,
                  int i0, int nvec) {
    const size_t ps = (size_t)WB * 2;
    constexpr int CH = 16;  // vectors per chunk
    V z0[CH][2];            // the first channel's results, rows r and r+1
    for (int q = 0; q < L.pout; ++q) {
        for (int v0 = 0; v0 < nvec; v0 += CH) {
            const int nv = std::min(CH, nvec - v0);
            for (int k = 0; k < 2; ++k) {
                const int c = 2 * q + k;
                const int32_t* w = L.wvp.data() + (size_t)c * 12;
                V W[12];
                for (int j = 0; j < 12; ++j) W[j] = vbcast(w[j]);
                const int16_t* a = A + c * ps;
                const int16_t* b = B + c * ps;
                const V init = acc0<RQ>(L, c);
                const V* initp = &init;
                hide(initp);  // read from memory where it is added: the 12 weights use every register
                for (int v = 0; v < nv; ++v) {
                    const size_t i = (size_t)(i0 + NLF_VW * (v0 + v)) * 2;
                    V s0, s1;
                    for (int dx = 0; dx < 3; ++dx) {  // each input vector read once, used twice
                        V xa = vload(a + i + 2 * dx);
                        in_register(xa);
                        s0 = dx ? vdot2(s0, xa, W[dx * 4 + 0]) : _mm256_madd_epi16(xa, W[0]);
                        s1 = dx ? vdot2(s1, xa, W[dx * 4 + 2]) : _mm256_madd_epi16(xa, W[2]);
                        V xb = vload(b + i + 2 * dx);
                        in_register(xb);
                        s0 = vdot2(s0, xb, W[dx * 4 + 1]);
                        s1 = vdot2(s1, xb, W[dx * 4 + 3]);
                    }
                    s0 = _mm256_add_epi32(s0, *initp);
                    s1 = _mm256_add_epi32(s1, *initp);
                    if (k == 0) {
                        z0[v][0] = rq<RQ>(s0, L, c);
                        z0[v][1] = rq<RQ>(s1, L, c);
                    } else {
                        vstore(out0 + q * ps + i, pair(z0[v][0], rq<RQ>(s0, L, c), L.relu));
                        vstore(out1 + q * ps + i, pair(z0[v][1], rq<RQ>(s1, L, c), L.relu));
                    }
                }
            }
        }
    }
}
#else
// depth-wise layer on rows (r, r+1): VP input slots A = (r-1, r), B = (r+1, r+2) -> CP rows out0, out1
template <int RQ>
static void dw2_t(const LayerPlan& L, const int16_t* A, const int16_t* B, int16_t* out0, int16_t* out1, int WB,
                  int i0, int nvec) {
    const size_t ps = (size_t)WB * 2;
    for (int q = 0; q < L.pout; ++q) {
        const int c0 = 2 * q, c1 = 2 * q + 1;
        const int32_t* w0 = L.wvp.data() + (size_t)c0 * 12;
        const int32_t* w1 = L.wvp.data() + (size_t)c1 * 12;
        const int16_t *a0p = A + c0 * ps, *b0p = B + c0 * ps, *a1p = A + c1 * ps, *b1p = B + c1 * ps;
        // NB vectors per step: 4*NB independent accumulator chains
        auto step = [&](auto nb, size_t i) {
            constexpr int NB = decltype(nb)::value;
            V s00[NB], s01[NB], s10[NB], s11[NB];  // s<channel><row>
            for (int b = 0; b < NB; ++b) {
                s00[b] = acc0<RQ>(L, c0);
                s01[b] = acc0<RQ>(L, c0);
                s10[b] = acc0<RQ>(L, c1);
                s11[b] = acc0<RQ>(L, c1);
            }
            for (int dx = 0; dx < 3; ++dx) {
                const V u0 = vbcast(w0[dx * 4 + 0]), u1 = vbcast(w0[dx * 4 + 1]);
                const V u2 = vbcast(w0[dx * 4 + 2]), u3 = vbcast(w0[dx * 4 + 3]);
                const V t0 = vbcast(w1[dx * 4 + 0]), t1 = vbcast(w1[dx * 4 + 1]);
                const V t2 = vbcast(w1[dx * 4 + 2]), t3 = vbcast(w1[dx * 4 + 3]);
                for (int b = 0; b < NB; ++b) {
                    const size_t o = i + 2 * dx + b * 2 * NLF_VW;
                    const V xa0 = vload(a0p + o), xb0 = vload(b0p + o);
                    const V xa1 = vload(a1p + o), xb1 = vload(b1p + o);
                    s00[b] = vdot2(vdot2(s00[b], xa0, u0), xb0, u1);
                    s01[b] = vdot2(vdot2(s01[b], xa0, u2), xb0, u3);
                    s10[b] = vdot2(vdot2(s10[b], xa1, t0), xb1, t1);
                    s11[b] = vdot2(vdot2(s11[b], xa1, t2), xb1, t3);
                }
            }
            for (int b = 0; b < NB; ++b) {
                const size_t o = i + b * 2 * NLF_VW;
                vstore(out0 + q * ps + o, pair(rq<RQ>(s00[b], L, c0), rq<RQ>(s10[b], L, c1), L.relu));
                vstore(out1 + q * ps + o, pair(rq<RQ>(s01[b], L, c0), rq<RQ>(s11[b], L, c1), L.relu));
            }
        };
        int v = 0;
        for (; v + 2 <= nvec; v += 2) step(std::integral_constant<int, 2>(), (size_t)(i0 + NLF_VW * v) * 2);
        if (v < nvec) step(std::integral_constant<int, 1>(), (size_t)(i0 + NLF_VW * v) * 2);
    }
}
#endif

static void dw2(const LayerPlan& L, const int16_t* A, const int16_t* B, int16_t* out0, int16_t* out1, int WB, int i0,
                int n) {
    const int nvec = (n + NLF_VW - 1) / NLF_VW;
    with_rq(L, [&](auto rq) { dw2_t<decltype(rq)::value>(L, A, B, out0, out1, WB, i0, nvec); });
}

// Row-pair pipeline for one item (SIMD code paths, networks with P.vp). Stage s computes the row pair
// (r, r+1), r = t + D_s, at step t (t = y0 - 2H, y0 - 2H + 2, ...); a VP stage keeps 2 slots (the pairs
// (r-1, r) and (r+1, r+2) a depth-wise layer reads), a CP stage 1 slot of 2 rows.
template <typename T>
static void process_item_vp(const Plan& P, const Pic<T>& pic, Scratch& S, const Item& it, unsigned* bad) {
    const int L = (int)P.L.size();
    const int H = P.halo, Hq = pic.Hq, Wq = pic.Wq, WB = S.WB;
    const size_t rowsz = (size_t)WB * 2;  // int16 elements of one pair row
    unsigned b = 0;
    // slot of stage s holding the pair that starts at row r (zeros if the pair is outside the picture)
    auto slot = [&](int s, int r) -> int16_t* {
        if (r + 1 < 0 || r >= Hq) return S.zero;
        int16_t* base = S.stage[s];
        if (!P.dw_input(s)) return base;
        const int k = ((r - (it.y0 - P.D(s))) >> 1) & 1;
        return base + (size_t)k * 2 * P.pairs(s) * rowsz;
    };
    for (int t = it.y0 - 2 * H; t < it.y1; t += 2) {
        for (int s = 0; s <= L; ++s) {
            const int D = P.D(s);
            const int r = t + D;
            if (r < it.y0 - D || r >= it.y1 + D) continue;  // not needed by this item
            if (r + 1 < 0 || r >= Hq) continue;              // outside the picture: slot() gives zeros
            int16_t* out = slot(s, r);
            const int xs = it.x0 - D, xe = it.x1 + D;
            const int xorg = xs - nlf::LM;
            const int np = P.pairs(s);
            const bool valid0 = r >= 0, valid1 = r + 1 < Hq;
            if (s == 0) {  // always CP (the first layer is point-wise)
                const int xa = std::max(0, xs), xb = std::min(Wq, xe);
                if (xb > xa) {
                    if (valid0) b |= input_row(P, pic, r, xa, xb, out, WB, xa - xorg);
                    if (valid1) b |= input_row(P, pic, r + 1, xa, xb, out + np * rowsz, WB, xa - xorg);
                }
            } else {
                const LayerPlan& Ly = P.L[s - 1];
                if (Ly.kind == NLF_LAYER_PW) {
                    const int16_t* in = slot(s - 1, r);
                    const size_t inrow = (size_t)P.pairs(s - 1) * rowsz;
                    if (P.dw_input(s)) {
                        pw2_vp(Ly, in, in + inrow, out, WB, nlf::LM, xe - xs, valid0, valid1);
                    } else {
                        pw_row(Ly, in, out, WB, nlf::LM, xe - xs);
                        pw_row(Ly, in + inrow, out + np * rowsz, WB, nlf::LM, xe - xs);
                    }
                } else {  // depth-wise: output is CP (P.vp excludes depth-wise after depth-wise)
                    dw2(Ly, slot(s - 1, r - 1), slot(s - 1, r + 1), out, out + np * rowsz, WB, nlf::LM, xe - xs);
                }
            }
            if (P.dw_input(s) && (xorg < 0 || xorg + WB > Wq)) zero_outside(out, 2 * np, WB, xorg, Wq);
            if (s == L) {
                if (r >= it.y0 && r < it.y1) output_row(P, pic, r, it.x0, it.x1, out, WB, nlf::LM);
                if (valid1 && r + 1 >= it.y0 && r + 1 < it.y1)
                    output_row(P, pic, r + 1, it.x0, it.x1, out + np * rowsz, WB, nlf::LM);
            }
        }
    }
    *bad |= b;
}

#endif  // NLF_VW > 1

// ---------------------------------------------------------------------------------- pipeline
// Process one item: rows [y0, y1) x columns [x0, x1) of the packed output. Stage s keeps its rows in
// a ring whose index LM holds column x0 - D_s (the first column it computes), so every stage starts
// on a 64-byte boundary.
template <typename T>
static void process_item(const Plan& P, const Pic<T>& pic, Scratch& S, const Item& it, unsigned* bad) {
    const int L = (int)P.L.size();
    const int H = P.halo, Hq = pic.Hq, Wq = pic.Wq, WB = S.WB;
    unsigned b = 0;
    for (int t = it.y0 - 2 * H; t < it.y1; ++t) {
        for (int s = 0; s <= L; ++s) {
            const int D = P.D(s);
            const int r = t + D;
            if (r < std::max(0, it.y0 - D) || r >= std::min(Hq, it.y1 + D)) continue;
            int16_t* out = S.row(P, s, r, Hq);
            const int xs = it.x0 - D, xe = it.x1 + D;  // columns this stage computes
            const int xorg = xs - nlf::LM;               // column at ring index 0
            if (s == 0) {
                const int xa = std::max(0, xs), xb = std::min(Wq, xe);
                if (xb > xa) b |= input_row(P, pic, r, xa, xb, out, WB, xa - xorg);
            } else {
                const LayerPlan& Ly = P.L[s - 1];
                if (Ly.kind == NLF_LAYER_PW) {
                    pw_row(Ly, S.row(P, s - 1, r, Hq), out, WB, nlf::LM, xe - xs);
                } else {
                    const int16_t* rows[3] = {S.row(P, s - 1, r - 1, Hq), S.row(P, s - 1, r, Hq),
                                              S.row(P, s - 1, r + 1, Hq)};
                    dw_row(Ly, rows, out, WB, nlf::LM, xe - xs);
                }
            }
            if (s < L && P.L[s].kind == NLF_LAYER_DW && (xorg < 0 || xorg + WB > Wq))
                zero_outside(out, P.pairs(s), WB, xorg, Wq);
            if (s == L && r >= it.y0 && r < it.y1) output_row(P, pic, r, it.x0, it.x1, out, WB, nlf::LM);
        }
    }
    *bad |= b;
}

template <typename T>
static void process_any(const Plan& P, const Pic<T>& pic, Scratch& S, const Item& it, unsigned* bad) {
#if NLF_VW > 1
    if (P.vp && !nlf::g_force_rowwise) return process_item_vp(P, pic, S, it, bad);
#endif
    process_item(P, pic, S, it, bad);
}

static void process_item_u8(const Plan& P, const void* pic, Scratch& S, const Item& it, unsigned* bad) {
    process_any(P, *static_cast<const Pic<uint8_t>*>(pic), S, it, bad);
}
static void process_item_u16(const Plan& P, const void* pic, Scratch& S, const Item& it, unsigned* bad) {
    process_any(P, *static_cast<const Pic<uint16_t>*>(pic), S, it, bad);
}

#endif  // NLF_ISA_PASS
