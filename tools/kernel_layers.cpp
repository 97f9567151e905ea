// kernel_layers.cpp — cycles per packed pixel of each row kernel of the C++ filter (a tool, not a test).
//
// Includes kernels/filter_cpu.cpp to call its row kernels (AVX-512; -DNS=nlf_avx2 for the AVX2 ones)
// directly on L1/L2-resident rows
// (one 5x12 network with the ranges the encoder signals, so every layer takes the folded
// requantisation), best of 20 x 200 calls each, and converts to cycles with a clock calibrated by a
// chain of dependent imul (3 cycles each). Run it several times and take the minimum on a shared
// machine. The AVX-512 kernels need an AVX-512 VNNI CPU.
//
//   g++ -O3 -std=c++17 -pthread tools/kernel_layers.cpp -o kernel_layers && ./kernel_layers [columns]
//   g++ -O3 -std=c++17 -pthread -DNS=nlf_avx2 tools/kernel_layers.cpp -o kernel_layers_avx2
//   output per kernel: name, ns per call, ns per pixel, cycles per pixel, GHz, then the multiply
//   instructions the kernel needs per packed pixel and its bound: those instructions at the rate this
//   core sustains in a loop of nothing else (measured first, printed as "rate"), and measured / bound
//   (AVX2: a VPMADDWD and its VPADDD per pair of taps; AVX-512: one VPDPWSSD)
#include "../kernels/filter_cpu.cpp"
#ifndef NS
#define NS nlf_avx512
#endif
#define nlf_avx2_IS_AVX2 1
#define NLF_CAT2(a, b) a##b
#define NLF_CAT(a, b) NLF_CAT2(a, b)
#if NLF_CAT(NS, _IS_AVX2)
// 8 independent (VPMADDWD; VPADDD into its own accumulator) pairs per loop
constexpr bool kAvx2 = true;
constexpr int kMulsPerLoop = 8;
static void mul_loop(long n) {
#define P(i) "vpmaddwd %%ymm14, %%ymm15, %%ymm" #i "\n vpaddd %%ymm" #i ", %%ymm" #i ", %%ymm" #i "\n"
    for (long k = 0; k < n; ++k)
        __asm__ volatile(P(0) P(1) P(2) P(3) P(4) P(5) P(6) P(7)::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5",
                         "xmm6", "xmm7", "xmm14", "xmm15");
#undef P
}
#else
// 12 independent VPDPWSSD chains per loop (latency about 5 cycles, 2 per cycle)
constexpr bool kAvx2 = false;
constexpr int kMulsPerLoop = 12;
__attribute__((target("avx512f,avx512vnni"))) static void mul_loop(long n) {
#define P(i) "vpdpwssd %%zmm30, %%zmm31, %%zmm" #i "\n"
    for (long k = 0; k < n; ++k)
        __asm__ volatile(P(0) P(1) P(2) P(3) P(4) P(5) P(6) P(7) P(8) P(9) P(10) P(11)::: "xmm0", "xmm1", "xmm2",
                         "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm30", "xmm31");
#undef P
}
#endif

#include <chrono>
#include <random>
int main(int argc, char** argv) {
    const int n = argc > 1 ? atoi(argv[1]) : 256;   // columns
    std::mt19937 rng(1);
    // network: pw 2->12, dw, pw 12->12, dw, pw 12->2 with small weights so it folds
    std::vector<int32_t> w[5];
    std::vector<int64_t> mult[5], bias[5], shift[5];
    int cin[5] = {2, 12, 12, 12, 12}, cout_[5] = {12, 12, 12, 12, 2}, kind[5] = {0, 1, 0, 1, 0};
    nlf_layer layers[5];
    for (int l = 0; l < 5; ++l) {
        int taps = kind[l] ? 9 : cin[l];
        w[l].resize(cout_[l] * taps);
        for (auto& x : w[l]) x = (int)(rng() % 63) - 31;
        mult[l].assign(cout_[l], 13); bias[l].assign(cout_[l], 1000); shift[l].assign(cout_[l], 10);
        layers[l] = nlf_layer{kind[l], cin[l], cout_[l], l < 4, w[l].data(), mult[l].data(), bias[l].data(), shift[l].data()};
    }
    nlf_network net{1, 1, 2, 5, layers};
    nlf::Plan P;
    if (nlf::build_plan(&net, 8, P)) { printf("plan: %s\n", nlf::g_last_error); return 1; }
    for (int l = 0; l < 5; ++l) printf("layer %d requantisation form %d (2 = fold)\n", l + 1, P.L[l].rq);
    const int WB = (nlf::LM + n + 16 + 2 + 15) / 16 * 16 + 16;
    std::vector<int16_t> A(12 * WB * 2 + 64), B(12 * WB * 2 + 64), o0(6 * WB * 2 + 64), o1(6 * WB * 2 + 64), cp(6*WB*2+64), vp(12*WB*2+64);
    for (auto* p : {&A, &B, &cp})
        for (auto& x : *p) x = (int16_t)(rng() % 3000);
    // calibration: a chain of dependent imul (3 cycles each)
    double ghz = 0;
    {
        double best = 1e9;
        for (int r = 0; r < 20; ++r) {
            long n = 2000000, x = 0;
            auto t = std::chrono::steady_clock::now();
            for (long k = 0; k < n; ++k) __asm__ volatile("imul %0, %0\n imul %0, %0\n imul %0, %0\n imul %0, %0" : "+r"(x));
            best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count() / (12.0 * n));
        }
        ghz = 1e-9 / best;
    }
    // sustained multiply instructions per cycle (best of 20 rounds)
    double rate = 0;
    {
        const long n = 1000000;
        const int per = kMulsPerLoop;
        for (int r = 0; r < 20; ++r) {
            auto t = std::chrono::steady_clock::now();
            mul_loop(n);
            const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
            rate = std::max(rate, per * n / (s * ghz * 1e9));
        }
        printf("rate %.2f %s per cycle\n", rate, kAvx2 ? "VPMADDWD+VPADDD pairs" : "VPDPWSSD");
    }
    const int VW = kAvx2 ? 8 : 16;
    // muls: multiply instructions per packed pixel (see the row kernels: a point-wise layer takes one per
    // output channel and input pair; the depth-wise layer on vertical pairs 12 per channel per 2*VW)
    auto bench = [&](const char* name, auto fn, double pixels, double muls) {
        for (int k = 0; k < 100; ++k) fn();
        double best = 1e9;
        for (int r = 0; r < 20; ++r) {
            auto t = std::chrono::steady_clock::now();
            for (int k = 0; k < 200; ++k) fn();
            double d = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count() / 200;
            best = std::min(best, d);
        }
        const double cyc = best * ghz * 1e9 / pixels;
        printf("%s %.1f %.3f %.2f %.2f  muls %.2f bound %.2f measured/bound %.2f\n", name, best * 1e9,
               best * 1e9 / pixels, cyc, ghz, muls, muls / rate, cyc * rate / muls);
    };
    auto pw_muls = [&](int l) { return (double)cout_[l] * ((cin[l] + 1) / 2) / VW; };
    bench("dw2", [&] { NS::dw2(P.L[1], A.data(), B.data(), o0.data(), o1.data(), WB, nlf::LM, n); }, 2.0 * n,
          12.0 * cout_[1] / (2 * VW));
    bench("pw2_vp_L3", [&] { NS::pw2_vp(P.L[2], cp.data(), cp.data(), vp.data(), WB, nlf::LM, n, true, true); }, 2.0 * n,
          pw_muls(2));
    bench("pw2_vp_L1", [&] { NS::pw2_vp(P.L[0], cp.data(), cp.data(), vp.data(), WB, nlf::LM, n, true, true); }, 2.0 * n,
          pw_muls(0));
    bench("pw_L5", [&] { NS::pw_row(P.L[4], cp.data(), o0.data(), WB, nlf::LM, n); }, 1.0 * n, pw_muls(4));
    return 0;
}
