// kernel_ab.cpp — A/B timing of builds of the C++ filter kernel in one process (a tool, not a test).
//
// Loads each library given (any build of kernels/filter_cpu.cpp), filters the same random 1080p frame
// (Y with 1x2 packing, U+V with 1x1, 5x12 networks; SIZE=WxH for another) with each in turn, N rounds interleaved, checks
// that every library gives the same output and prints min / p25 / median ms per frame. Interleaving in
// one process makes the comparison fair on a machine whose speed drifts (shared cores).
//
//   g++ -O3 -std=c++17 tools/kernel_ab.cpp -o kernel_ab -ldl
//   git show HEAD~3:kernels/filter_cpu.cpp > /tmp/old/filter_cpu.cpp; cp kernels/nlf_filter.h /tmp/old/
//   g++ -O3 -std=c++17 -shared -fPIC -pthread /tmp/old/filter_cpu.cpp -o /tmp/old.so
//   N=80 ./kernel_ab 1 /tmp/old.so hevc_ext/_nlf_cpu*.so        # threads, libraries...
//   WIDE=1 ...   # the unit tests' wider ranges (±127 weights, 8-bit multipliers) instead of the signalled ones
//   SIZE=416x240 ...   # another frame size (luma packing as the paper's default: 2x2 from 2560x1600, 1x2 from 1080p)
#include "../kernels/nlf_filter.h"
#include <dlfcn.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
typedef int32_t (*FilterFn)(const nlf_network*, const nlf_planes*, int32_t, int32_t);
struct Net {
    std::vector<int32_t> w[5];
    std::vector<int64_t> mult[5], bias[5], shift[5];
    nlf_layer layers[5];
    nlf_network net;
    Net(int planes, int ph, int pw, std::mt19937& rng, int wmax, int mmax) {
        int c0 = planes * ph * pw;
        int cin[5] = {c0, 12, 12, 12, 12}, cout_[5] = {12, 12, 12, 12, c0}, kind[5] = {0, 1, 0, 1, 0};
        for (int l = 0; l < 5; ++l) {
            int taps = kind[l] ? 9 : cin[l];
            w[l].resize(cout_[l] * taps);
            for (auto& x : w[l]) x = (int)(rng() % (2 * wmax + 1)) - wmax;
            mult[l].resize(cout_[l]);
            for (auto& m : mult[l]) m = mmax / 4 + rng() % (mmax - mmax / 4);
            bias[l].assign(cout_[l], 1000); shift[l].assign(cout_[l], l == 0 ? 4 : (mmax > 64 ? 17 : 9));
            layers[l] = nlf_layer{kind[l], cin[l], cout_[l], l < 4, w[l].data(), mult[l].data(), bias[l].data(), shift[l].data()};
        }
        net = nlf_network{planes, ph, pw, 5, layers};
    }
};
int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s THREADS LIB.so [LIB.so ...]\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[1]);
    int wide = getenv("WIDE") ? 1 : 0;
    std::vector<FilterFn> fns;
    for (int i = 2; i < argc; ++i) {
        void* h = dlopen(argv[i], RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            std::printf("%s\n", dlerror());
            return 1;
        }
        fns.push_back((FilterFn)dlsym(h, "nlf_cpu_filter"));
    }
    int W = 1920, H = 1080;
    if (getenv("SIZE") && (std::sscanf(getenv("SIZE"), "%dx%d", &W, &H) != 2 || W < 2 || H < 2 || W % 2 || H % 2)) {
        std::fprintf(stderr, "SIZE must be WxH (even, >= 2), got %s\n", getenv("SIZE"));
        return 2;
    }
    const int ph = W * H >= 2560 * 1600 ? 2 : 1, pw = W * H >= 1920 * 1080 ? 2 : 1;
    std::mt19937 rng(1);
    Net ny(1, ph, pw, rng, wide ? 127 : 31, wide ? 256 : 16), nuv(2, 1, 1, rng, wide ? 127 : 31, wide ? 256 : 16);
    std::vector<uint8_t> y(W * H), u(W * H / 4), v(W * H / 4);
    for (auto* p : {&y, &u, &v})
        for (auto& x : *p) x = (uint8_t)rng();
    std::vector<std::vector<uint8_t>> oy(fns.size(), std::vector<uint8_t>(W * H)), ou(fns.size(), std::vector<uint8_t>(W * H / 4)), ov = ou;
    std::vector<std::vector<double>> t(fns.size());
    int n = getenv("N") ? atoi(getenv("N")) : 60;
    for (int r = 0; r < n; ++r)
        for (size_t k = 0; k < fns.size(); ++k) {
            nlf_planes py{H, W, 8, 1, 0, 0, {y.data(), nullptr}, {oy[k].data(), nullptr}, {W, 0}, {W, 0}};
            nlf_planes puv{H / 2, W / 2, 8, 1, 0, 0, {u.data(), v.data()}, {ou[k].data(), ov[k].data()}, {W / 2, W / 2}, {W / 2, W / 2}};
            auto t0 = std::chrono::steady_clock::now();
            int rc = fns[k](&ny.net, &py, threads, -1) | fns[k](&nuv.net, &puv, threads, -1);
            if (rc) { printf("error %d\n", rc); return 1; }
            t[k].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e3);
        }
    for (size_t k = 0; k < fns.size(); ++k) {
        bool same = oy[k] == oy[0] && ou[k] == ou[0] && ov[k] == ov[0];
        std::sort(t[k].begin(), t[k].end());
        printf("%-28s min %6.2f  p25 %6.2f  median %6.2f ms  %s\n", argv[k + 2], t[k][0], t[k][t[k].size() / 4], t[k][t[k].size() / 2], same ? "same output" : "OUTPUT DIFFERS");
    }
}
