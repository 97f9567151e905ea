/*
 * nlf_network_check.h — the checks both filter kernels make on a network before running it, and the
 * per-channel bounds from which they prove their exact requantisation forms (host code, C++17).
 *
 * Included by filter_cpu.cpp and by the host part of filter_cuda.cu, so that the two kernels accept and
 * reject the same networks with the same messages, and derive their forms from one computation. Limits
 * that belong to one kernel (the CUDA kernel's channel and layer counts) stay in that kernel.
 *
 * The ranges are those of hevc_ext/reference.py (IntNetwork.validate): weights within ±32767,
 * multipliers in [0, 2^31 - 1], |bias| <= 2^52, shifts in [0, 62], every accumulator inside int32 and
 * every acc*mult + bias + round inside int64 for the layer's input range.
 */
#ifndef NLF_NETWORK_CHECK_H
#define NLF_NETWORK_CHECK_H

#include "nlf_filter.h"

#include <stdint.h>

namespace nlf_check {

constexpr int32_t WEIGHT_MAX = 32767;
constexpr int64_t MAX_MULT = (int64_t(1) << 31) - 1;
constexpr int64_t MAX_ABS_BIAS = int64_t(1) << 52;
constexpr int64_t MAX_SHIFT = 62;
constexpr int32_t ACT_MAX = 32767;  // hidden activations are clamped to [0 or -32768, ACT_MAX]
typedef __int128 i128;
constexpr i128 I64_LIMIT = (i128)1 << 63;

// Each kernel's error reporter: records the message for nlf_last_error() and returns code.
typedef int (*FailFn)(int code, const char* fmt, ...);

// The network as a whole: plane count, packing, layers present.
inline int check_network(const nlf_network* net, FailFn fail) {
    if (!net) return fail(NLF_ERR_ARG, "network is NULL");
    if (net->planes != 1 && net->planes != 2)
        return fail(NLF_ERR_NETWORK, "planes must be 1 or 2, got %d", net->planes);
    if ((net->ph != 1 && net->ph != 2) || (net->pw != 1 && net->pw != 2))
        return fail(NLF_ERR_NETWORK, "packing must be 1x1, 1x2, 2x1 or 2x2, got %dx%d", net->ph, net->pw);
    if (net->nlayers < 1 || !net->layers) return fail(NLF_ERR_NETWORK, "network without layers");
    return NLF_OK;
}

// Layer i's shape, given the cin channels the previous layer gives (c0: the packed channels the last
// layer must give back).
inline int check_layer(const nlf_network* net, int i, int cin, int c0, FailFn fail) {
    const nlf_layer& s = net->layers[i];
    if (s.kind != NLF_LAYER_PW && s.kind != NLF_LAYER_DW)
        return fail(NLF_ERR_NETWORK, "layer %d: unknown kind %d", i + 1, s.kind);
    if (!s.weight || !s.mult || !s.bias || !s.shift) return fail(NLF_ERR_NETWORK, "layer %d: NULL array", i + 1);
    if (s.cin != cin)
        return fail(NLF_ERR_NETWORK, "layer %d: takes %d inputs, previous layer gives %d", i + 1, s.cin, cin);
    if (s.cout < 1) return fail(NLF_ERR_NETWORK, "layer %d: %d output channels", i + 1, s.cout);
    if (s.kind == NLF_LAYER_DW && s.cout != s.cin)
        return fail(NLF_ERR_NETWORK, "layer %d: depth-wise layer with %d inputs and %d outputs", i + 1, s.cin,
                    s.cout);
    if (i == net->nlayers - 1 && s.cout != c0)
        return fail(NLF_ERR_NETWORK, "last layer has %d outputs, expected %d", s.cout, c0);
    return NLF_OK;
}

// Weights per output channel: cin for a point-wise layer, 9 for a depth-wise one.
inline int taps(const nlf_layer& s) { return s.kind == NLF_LAYER_PW ? s.cin : 9; }

// Input range of the first layer (centred samples).
inline void first_input_range(int bitdepth, int64_t& lo, int64_t& hi) {
    lo = -(int64_t(1) << (bitdepth - 1));
    hi = (int64_t(1) << (bitdepth - 1)) - 1;
}
// The clamp of layer s's output, which is the next layer's input range.
inline int32_t output_min(const nlf_layer& s) { return s.relu ? 0 : -32768; }

// One output channel, analysed over the layer's input range.
struct Channel {
    int64_t amin = 0, amax = 0;  // bounds of the accumulator sum(w * x)
    int64_t mult = 0, br = 0;    // multiplier; bias + rounding offset ((1 << shift) >> 1)
    int shift = 0;
    // acc*mult + br lies inside int32 for every accumulator in [amin, amax]: with the multiplier folded
    // into the weights, a 32-bit wrapping accumulation started at br is exact, and an arithmetic shift
    // by min(shift, 31) gives the floor (a shift of 31 or more of |v| < 2^31 is its sign)
    bool fits32 = false;
    // high-dword form: with M = mult * 2^(32 - shift) <= INT32_MAX and B = br * 2^(32 - shift),
    // z = (acc*M + B) >> 32 and acc*M + B cannot overflow int64 (needs shift <= 32)
    bool high = false;
    int64_t M = 0, B = 0;
};

// Checks channel f of layer i (weights, multiplier, shift, bias, accumulator and product bounds) and
// fills c.
inline int analyse_channel(const nlf_layer& s, int i, int f, int64_t in_lo, int64_t in_hi, Channel& c,
                           FailFn fail) {
    const int n = taps(s);
    int64_t amin = 0, amax = 0;
    for (int k = 0; k < n; ++k) {
        const int64_t w = s.weight[(size_t)f * n + k];
        if (w < -WEIGHT_MAX || w > WEIGHT_MAX)
            return fail(NLF_ERR_NETWORK, "layer %d: weight %lld out of range", i + 1, (long long)w);
        amin += w >= 0 ? w * in_lo : w * in_hi;
        amax += w >= 0 ? w * in_hi : w * in_lo;
    }
    if (amin < INT32_MIN || amax > INT32_MAX)
        return fail(NLF_ERR_NETWORK, "layer %d: accumulator may exceed 32 bits", i + 1);
    const int64_t m = s.mult[f], b = s.bias[f], sh = s.shift[f];
    if (m < 0 || m > MAX_MULT)
        return fail(NLF_ERR_NETWORK, "layer %d: multiplier out of range 0..%lld", i + 1, (long long)MAX_MULT);
    if (sh < 0 || sh > MAX_SHIFT)
        return fail(NLF_ERR_NETWORK, "layer %d: shift out of range 0..%lld", i + 1, (long long)MAX_SHIFT);
    if (b < -MAX_ABS_BIAS || b > MAX_ABS_BIAS) return fail(NLF_ERR_NETWORK, "layer %d: bias out of range", i + 1);
    const int64_t br = b + ((int64_t(1) << sh) >> 1);
    const i128 t1 = (i128)amin * m + br, t2 = (i128)amax * m + br;
    // (cannot happen after the checks above: |acc*m| < 2^62 and |br| < 2^61 + 2^52; kept as the
    // statement of the 64-bit requirement the kernels rely on)
    if (t1 >= I64_LIMIT || t1 < -I64_LIMIT || t2 >= I64_LIMIT || t2 < -I64_LIMIT)
        return fail(NLF_ERR_NETWORK, "layer %d: product may exceed 64 bits", i + 1);
    c = Channel();
    c.amin = amin;
    c.amax = amax;
    c.mult = m;
    c.br = br;
    c.shift = (int)sh;
    c.fits32 = t1 >= INT32_MIN && t2 <= INT32_MAX;
    if (sh <= 32) {
        const i128 scale = (i128)1 << (32 - sh);  // multiply, not shift: br may be negative
        const i128 M = (i128)m * scale, B = (i128)br * scale;
        if (M <= (i128)INT32_MAX && B < I64_LIMIT && B >= -I64_LIMIT) {
            const i128 u1 = (i128)amin * M + B, u2 = (i128)amax * M + B;
            if (u1 < I64_LIMIT && u1 >= -I64_LIMIT && u2 < I64_LIMIT && u2 >= -I64_LIMIT) {
                c.high = true;
                c.M = (int64_t)M;
                c.B = (int64_t)B;
            }
        }
    }
    return NLF_OK;
}

}  // namespace nlf_check

#endif  // NLF_NETWORK_CHECK_H
