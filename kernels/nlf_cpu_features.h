/*
 * nlf_cpu_features.h — the run-time x86 feature checks of the two CPU libraries (host code, C++17).
 *
 * Included by filter_cpu.cpp (the filter kernel) and train_cpu.cpp (the training engine), which
 * compile code paths for three levels (nlf_cpu::Level) and pick the best one the CPU runs. Both
 * AVX-512 paths need the AVX-512 core (F/BW/DQ/VL) and one feature more, their own: the filter's
 * integer multiply-adds VNNI (VPDPWSSD), the training engine's float math FMA. On other compilers or
 * architectures only the portable level exists.
 */
#ifndef NLF_CPU_FEATURES_H
#define NLF_CPU_FEATURES_H

namespace nlf_cpu {

enum Level { LEVEL_PORTABLE = 0, LEVEL_AVX2 = 1, LEVEL_AVX512 = 2 };
enum Extra { EXTRA_VNNI, EXTRA_FMA };  // what an AVX-512 path needs beyond the core

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
inline bool has(int level, Extra extra) {
    __builtin_cpu_init();
    if (level == LEVEL_PORTABLE) return true;
    if (level == LEVEL_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (level != LEVEL_AVX512) return false;
    const bool core = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    return core && (extra == EXTRA_VNNI ? __builtin_cpu_supports("avx512vnni") : __builtin_cpu_supports("fma"));
}
#else
inline bool has(int level, Extra) { return level == LEVEL_PORTABLE; }
#endif

// The best level this CPU runs, among those a library was compiled with (levels above `compiled` are
// not considered: a build without SIMD code paths has only the portable one).
inline int best(Extra extra, int compiled) {
    for (int level = compiled; level > LEVEL_PORTABLE; --level)
        if (has(level, extra)) return level;
    return LEVEL_PORTABLE;
}

}  // namespace nlf_cpu

#endif  // NLF_CPU_FEATURES_H
