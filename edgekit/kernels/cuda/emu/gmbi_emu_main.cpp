// CPU runner for edgekit/kernels/cuda/gmbi_fused.cu under host emulation (see gmbi_emu.h).
//
//   gmbi_emu IN OUT
//
// IN (little endian): int32 header[14] = {magic 0x474d4249, dtype (0 = f32, 1 = f16), N, C, H, W,
//   tile_h, tile_w, co_per_block, co_splits, buf_a, buf_b, smem_bytes, threads}, then x (N*C*H*W
//   elements of dtype), dw_w (C*9 f32), dw_b (C f32), pw_wt (C*C f32, [ci][co]), pw_b (C f32).
// OUT: the output tensor (N*C*H*W elements of dtype).  The output buffer is poisoned with NaN
// before the launch so unwritten elements are visible.
#include "gmbi_emu.h"
#include "../gmbi_fused.cu"

#include <fstream>
#include <iostream>

template <typename T>
static bool read_vec(std::ifstream& f, std::vector<T>& v, size_t n) {
    v.resize(n);
    return bool(f.read(reinterpret_cast<char*>(v.data()), n * sizeof(T)));
}

// 16-byte aligned copies, as a device allocation would be.
static float* aligned_copy(const std::vector<float>& v) {
    float* p = static_cast<float*>(std::aligned_alloc(64, ((v.size() * 4 + 63) / 64) * 64));
    std::memcpy(p, v.data(), v.size() * 4);
    return p;
}

template <typename T>
static int run(std::ifstream& f, const int* h, const char* out_path) {
    const int N = h[2], C = h[3], H = h[4], W = h[5], tile_h = h[6], tile_w = h[7], cob = h[8],
              splits = h[9], buf_a = h[10], buf_b = h[11], smem_bytes = h[12], threads = h[13];
    const size_t numel = (size_t)N * C * H * W;
    std::vector<T> x;
    std::vector<float> dw_w, dw_b, pw_wt, pw_b;
    if (!read_vec(f, x, numel) || !read_vec(f, dw_w, (size_t)C * 9) || !read_vec(f, dw_b, (size_t)C) ||
        !read_vec(f, pw_wt, (size_t)C * C) || !read_vec(f, pw_b, (size_t)C)) {
        std::cerr << "truncated input file\n";
        return 2;
    }
    std::vector<T> out(numel);
    for (auto& v : out) v = T(std::nanf(""));
    float *a = aligned_copy(dw_w), *b = aligned_copy(dw_b), *c = aligned_copy(pw_wt), *d = aligned_copy(pw_b);
    emu::Dim3 grid{(unsigned)((W + tile_w - 1) / tile_w), (unsigned)((H + tile_h - 1) / tile_h), (unsigned)(N * splits)};
    emu::launch(grid, (unsigned)threads, (size_t)smem_bytes, [&] {
        if constexpr (sizeof(T) == 4)
            gmbi_fused_f32(x.data(), out.data(), a, b, c, d, C, H, W, tile_h, tile_w, cob, splits, buf_a, buf_b);
        else
            gmbi_fused_f16(x.data(), out.data(), a, b, c, d, C, H, W, tile_h, tile_w, cob, splits, buf_a, buf_b);
    });
    std::free(a); std::free(b); std::free(c); std::free(d);
    std::ofstream o(out_path, std::ios::binary);
    o.write(reinterpret_cast<const char*>(out.data()), numel * sizeof(T));
    return o ? 0 : 2;
}

int main(int argc, char** argv) {
    if (argc != 3) {
        std::cerr << "usage: gmbi_emu IN OUT\n";
        return 2;
    }
    std::ifstream f(argv[1], std::ios::binary);
    int h[14];
    if (!f.read(reinterpret_cast<char*>(h), sizeof h) || h[0] != 0x474d4249) {
        std::cerr << "bad input header\n";
        return 2;
    }
    if (h[13] != GMBI_THREADS) {
        std::cerr << "the kernel is written for " << GMBI_THREADS << " threads per block\n";
        return 2;
    }
    return h[1] == 0 ? run<float>(f, h, argv[2]) : run<__half>(f, h, argv[2]);
}
