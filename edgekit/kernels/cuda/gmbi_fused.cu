// Fused GMBI module (GMBINet, arXiv 2508.16397) -- one launch per module, inference only.
//
//   x  : [N, C, H, W]  (NCHW, contiguous), C = 4 * G, G <= 32
//   out: [N, C, H, W]  (must not alias x: neighbouring blocks read x halos while this one writes)
//
//   groups x_0..x_3 (G channels each), group i: depthwise 3x3, dilation d_i = i + 1, zero padding d_i
//   y_0 = ReLU(DW_1(x_0)),  y_i = ReLU(DW_{i+1}(sigmoid(y_{i-1}) * x_i + x_i))      (BN folded)
//   z_i = sigmoid(y_{i+1}) * y_i + y_i  (i < 3),  z_3 = y_3
//   out = ReLU(W_1x1 . concat(z) + b) + x                                            (BN folded)
//
// Design (kernels/README.md has the long version):
//  * One kernel does everything.  z never goes to global memory: a block owns an output tile of
//    tile_h x tile_w pixels, computes z for *all* C channels of that tile into shared memory, then
//    does the 1x1 fusion conv (a [C x C] x [C x P] product) from shared memory, adds bias, ReLU and
//    the residual, and writes the tile once.  A second kernel for the 1x1 would cost a full write
//    + read of z (C*H*W elements) per module and a second launch; at these sizes (<= 1 MB per
//    activation) the network is launch/latency bound, so one launch per module wins.
//  * The guidance chain is channel-wise inside a group: output channel c of group i depends only on
//    channel c of groups i-1 (guidance) and i.  So the four channels {c, G+c, 2G+c, 3G+c} (a
//    "lane") form an independent 4-stage chain.  Each warp owns one lane at a time and walks its
//    chain with private shared-memory scratch and only __syncwarp between stages; 8 warps run 8
//    lanes concurrently, so there is no block-wide barrier until z is complete.
//  * Halos (rows/cols around the tile, clipped to the image):  y_3 is needed on the tile (halo 0),
//    so u_3 = sigmoid(y_2)*x_3 + x_3 on halo 4, y_2 on halo 4, u_2 on halo 4+3 = 7, y_1 on halo 7,
//    u_1 on halo 7+2 = 9, y_0 on halo 9, x_0 on halo 9+1 = 10.  Outside the image nothing is
//    computed: the next conv's zero padding means any tap outside the image reads 0, so regions
//    are clipped to the image and taps are bounds-checked.
//      stage 1: y_0 on R9 from x_0 (global, L1-cached taps)   -> u_1 = sig(y_0)x_1+x_1 into bufB
//      stage 2: y_1 on R7 from bufB (dil 2)                    -> u_2 into bufA
//      stage 3: y_2 on R4 from bufA (dil 3)                    -> u_3 into bufB (u_1 is dead)
//      stage 4: y_3 on the tile from bufB (dil 4), then z_0..z_3 for the tile pixels.
//    y_0, y_1, y_2 at tile pixels are parked in the z area of shared memory as they are produced.
//  * fp32 accumulation everywhere; the storage type T (float or __half) is used only for x / out.
//    Folded parameters are fp32.  Intermediates (u, y, z) live in shared memory as fp32.
//
// Shared memory (dynamic, floats):  z[C][tile_h*tile_w]  then  min(G, 8) x { bufB[buf_b], bufA[buf_a] }
//   buf_b >= min(tile_h+18, H) * min(tile_w+18, W)   (region with halo 9; also holds halo-4 region)
//   buf_a >= min(tile_h+14, H) * min(tile_w+14, W)   (region with halo 7)
// Launch: block (256,1,1); grid (ceil(W/tile_w), ceil(H/tile_h), N * co_splits); block z = n *
//   co_splits + s computes output channels [s*co_per_block, min(C, (s+1)*co_per_block)).
//   co_per_block must be a multiple of 4.  Pointers to the fp32 parameter arrays must be 16-byte
//   aligned (float4 loads).
//
// This file also compiles as plain C++ (GMBI_HOST_EMULATION, see edgekit/kernels/cuda/emu/) so the exact same
// source can be executed on a CPU with one host thread per CUDA thread for testing.

#ifndef GMBI_HOST_EMULATION
#include <cuda_fp16.h>
#define GMBI_DEVICE __device__ __forceinline__
#define GMBI_KERNEL extern "C" __global__ void __launch_bounds__(GMBI_THREADS)
#define GMBI_SMEM() gmbi_dynamic_smem()
#define GMBI_SYNC_BLOCK() __syncthreads()
#define GMBI_SYNC_WARP() __syncwarp()
#define GMBI_LDG(p) __ldg(p)
#define GMBI_LDG4(p) __ldg(reinterpret_cast<const float4*>(p))
#define GMBI_FAST_EXP(v) __expf(v)
#define GMBI_FAST_DIV(a, b) __fdividef(a, b)
#define GMBI_ASSERT(cond) ((void)0)
#define GMBI_UNROLL _Pragma("unroll")
extern __shared__ float gmbi_smem_[];
__device__ __forceinline__ float* gmbi_dynamic_smem() { return gmbi_smem_; }
#endif

#define GMBI_THREADS 256
#define GMBI_WARPS (GMBI_THREADS / 32)
#define GMBI_PX 2  // pixels per thread-item in the 1x1 phase
#define GMBI_CO 4  // output channels per thread-item in the 1x1 phase (one float4 of weights)

// One work item of a 1x1-conv phase (the GMBI fusion, and the DW+PW kernels of gmbinet_layers.cu):
// acc[k][j] = b[co0 + j] + sum_ci w[ci * ldw + co0 + j] * z[ci * P + pixel(pg + k * npg)], with z
// (cin x P) in shared memory and the weights transposed (ci-major, ldw = output channels).
GMBI_DEVICE void gmbi_pw_item(float (&acc)[GMBI_PX][GMBI_CO], const float* __restrict__ pw_wt,
                              const float* __restrict__ pw_b, int co0, int cin, int ldw, const float* zs,
                              int P, int pg, int npg) {
    int pidx[GMBI_PX];
    GMBI_UNROLL
    for (int k = 0; k < GMBI_PX; ++k) pidx[k] = min(pg + k * npg, P - 1);  // clamp: loads stay in z
    const float4 bias = GMBI_LDG4(pw_b + co0);
    GMBI_UNROLL
    for (int k = 0; k < GMBI_PX; ++k) {
        acc[k][0] = bias.x; acc[k][1] = bias.y; acc[k][2] = bias.z; acc[k][3] = bias.w;
    }
    const float* wt = pw_wt + co0;
#ifndef GMBI_HOST_EMULATION
#pragma unroll 4
#endif
    for (int ci = 0; ci < cin; ++ci) {
        const float4 wv = GMBI_LDG4(wt + (size_t)ci * ldw);
        const float* zrow = zs + ci * P;
        GMBI_UNROLL
        for (int k = 0; k < GMBI_PX; ++k) {
            const float z = zrow[pidx[k]];
            acc[k][0] = fmaf(wv.x, z, acc[k][0]);
            acc[k][1] = fmaf(wv.y, z, acc[k][1]);
            acc[k][2] = fmaf(wv.z, z, acc[k][2]);
            acc[k][3] = fmaf(wv.w, z, acc[k][3]);
        }
    }
}

// Halo of each stage's region (see header).
#define GMBI_HALO_R1 9
#define GMBI_HALO_R2 7
#define GMBI_HALO_R3 4

namespace gmbi {

template <typename T>
struct Io;

template <>
struct Io<float> {
    static GMBI_DEVICE float load(const float* p) { return GMBI_LDG(p); }
    static GMBI_DEVICE void store(float* p, float v) { *p = v; }
    // Accurate expf for the fp32 path (the fp32 result is checked to 1e-5 relative L2).
    static GMBI_DEVICE float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }
};

template <>
struct Io<__half> {
    static GMBI_DEVICE float load(const __half* p) { return __half2float(GMBI_LDG(p)); }
    static GMBI_DEVICE void store(__half* p, float v) { *p = __float2half_rn(v); }
    // fp16 storage: the fast exp / approximate division (~2 ulp fp32) are far below fp16 rounding.
    // For v < -88, 1 + exp(-v) = inf and the result is 0, as it should be.
    static GMBI_DEVICE float sigmoid(float v) { return GMBI_FAST_DIV(1.0f, 1.0f + GMBI_FAST_EXP(-v)); }
};

// A rectangle of the image, [y0, y0 + h) x [x0, x0 + w); stored row-major with stride w.
struct Region {
    int y0, x0, h, w;
};

GMBI_DEVICE Region clip_region(int ty0, int tx0, int tile_h, int tile_w, int halo, int H, int W) {
    Region r;
    r.y0 = max(ty0 - halo, 0);
    r.x0 = max(tx0 - halo, 0);
    r.h = min(ty0 + tile_h + halo, H) - r.y0;
    r.w = min(tx0 + tile_w + halo, W) - r.x0;
    return r;
}

GMBI_DEVICE void load_w9(const float* __restrict__ dw_w, int ch, float (&w)[9]) {
    GMBI_UNROLL
    for (int t = 0; t < 9; ++t) w[t] = GMBI_LDG(dw_w + ch * 9 + t);
}

// 3x3 depthwise conv, dilation 1, at (gy, gx) straight from the global input plane.
template <typename T>
GMBI_DEVICE float dw_global(const T* __restrict__ plane, int gy, int gx, int H, int W,
                            const float (&w)[9], float bias) {
    float acc = bias;
    GMBI_UNROLL
    for (int ky = 0; ky < 3; ++ky) {
        const int yy = gy + ky - 1;
        if (yy < 0 || yy >= H) continue;
        GMBI_UNROLL
        for (int kx = 0; kx < 3; ++kx) {
            const int xx = gx + kx - 1;
            if (xx >= 0 && xx < W) acc = fmaf(w[ky * 3 + kx], Io<T>::load(plane + (size_t)yy * W + xx), acc);
        }
    }
    return acc;
}

// 3x3 depthwise conv, dilation DIL, at (gy, gx) from a shared-memory region.  Taps outside the
// image are the conv's zero padding; taps inside the image always lie inside `src` because
// src's halo is the output region's halo + DIL.
template <int DIL>
GMBI_DEVICE float dw_smem(const float* buf, const Region& src, int gy, int gx, int H, int W,
                          const float (&w)[9], float bias) {
    float acc = bias;
    GMBI_UNROLL
    for (int ky = 0; ky < 3; ++ky) {
        const int yy = gy + (ky - 1) * DIL;
        if (yy < 0 || yy >= H) continue;
        GMBI_ASSERT(yy >= src.y0 && yy < src.y0 + src.h);
        const int row = (yy - src.y0) * src.w - src.x0;
        GMBI_UNROLL
        for (int kx = 0; kx < 3; ++kx) {
            const int xx = gx + (kx - 1) * DIL;
            if (xx >= 0 && xx < W) {
                GMBI_ASSERT(xx >= src.x0 && xx < src.x0 + src.w);
                acc = fmaf(w[ky * 3 + kx], buf[row + xx], acc);
            }
        }
    }
    return acc;
}

// One guided stage of a channel chain, on region `dst_r`: y = ReLU(dw_DIL(src)) (the previous
// stage's u, held in shared memory over `src_r`), stored to the tile's z plane where it overlaps the
// tile, and u_next = sig(y) * x_next + x_next written to `dst` for the following stage.
template <typename T, int DIL>
GMBI_DEVICE void guided_stage(const float* src, const Region& src_r, float* dst, const Region& dst_r,
                              const T* x_next, float* z_plane, const float (&w)[9], float b, int H, int W,
                              int ty0, int tx0, int th, int tw, int tile_w, int lane) {
    const int cnt = dst_r.h * dst_r.w;
    for (int i = lane; i < cnt; i += 32) {
        const int ry = i / dst_r.w, rx = i - ry * dst_r.w;
        const int gy = dst_r.y0 + ry, gx = dst_r.x0 + rx;
        const float y = fmaxf(dw_smem<DIL>(src, src_r, gy, gx, H, W, w, b), 0.0f);
        const int ly = gy - ty0, lx = gx - tx0;
        if ((unsigned)ly < (unsigned)th && (unsigned)lx < (unsigned)tw) z_plane[ly * tile_w + lx] = y;
        const float xv = Io<T>::load(x_next + (size_t)gy * W + gx);
        dst[i] = fmaf(Io<T>::sigmoid(y), xv, xv);
    }
}

template <typename T>
GMBI_DEVICE void fused_body(const T* __restrict__ x, T* __restrict__ out,
                            const float* __restrict__ dw_w,   // [C][9]  folded depthwise weights
                            const float* __restrict__ dw_b,   // [C]     folded depthwise bias
                            const float* __restrict__ pw_wt,  // [C_in][C_out] folded 1x1 weights, transposed
                            const float* __restrict__ pw_b,   // [C]     folded 1x1 bias
                            int C, int H, int W, int tile_h, int tile_w, int co_per_block,
                            int co_splits, int buf_a, int buf_b) {
    float* const smem = GMBI_SMEM();
    const int G = C >> 2;
    const int P = tile_h * tile_w;
    float* const zs = smem;  // [C][P]

    const int tid = (int)threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int n = (int)blockIdx.z / co_splits;
    const int split = (int)blockIdx.z - n * co_splits;
    const int ty0 = (int)blockIdx.y * tile_h;
    const int tx0 = (int)blockIdx.x * tile_w;
    const int th = min(tile_h, H - ty0);  // valid rows / cols of this (possibly partial) tile
    const int tw = min(tile_w, W - tx0);
    const size_t HW = (size_t)H * (size_t)W;
    const T* __restrict__ xn = x + (size_t)n * (size_t)C * HW;
    T* __restrict__ on = out + (size_t)n * (size_t)C * HW;

    const Region r1 = clip_region(ty0, tx0, tile_h, tile_w, GMBI_HALO_R1, H, W);
    const Region r2 = clip_region(ty0, tx0, tile_h, tile_w, GMBI_HALO_R2, H, W);
    const Region r3 = clip_region(ty0, tx0, tile_h, tile_w, GMBI_HALO_R3, H, W);
    GMBI_ASSERT(r1.h * r1.w <= buf_b && r3.h * r3.w <= buf_b && r2.h * r2.w <= buf_a);

    // ---------------- phase A: z for all C channels of the tile, one lane per warp ----------------
    for (int c = warp; c < G; c += GMBI_WARPS) {  // warp-uniform loop: all 32 lanes see every sync
        float* const bufB = smem + (size_t)C * P + (size_t)warp * (size_t)(buf_a + buf_b);
        float* const bufA = bufB + buf_b;
        const int ch0 = c, ch1 = G + c, ch2 = 2 * G + c, ch3 = 3 * G + c;
        float w[9];

        // stage 1: y_0 on R1 (dil 1, from global x_0); u_1 = sig(y_0) x_1 + x_1 -> bufB
        {
            load_w9(dw_w, ch0, w);
            const float b = GMBI_LDG(dw_b + ch0);
            const T* x0 = xn + (size_t)ch0 * HW;
            const T* x1 = xn + (size_t)ch1 * HW;
            const int cnt = r1.h * r1.w;
            for (int i = lane; i < cnt; i += 32) {
                const int ry = i / r1.w, rx = i - ry * r1.w;
                const int gy = r1.y0 + ry, gx = r1.x0 + rx;
                const float y = fmaxf(dw_global<T>(x0, gy, gx, H, W, w, b), 0.0f);
                const int ly = gy - ty0, lx = gx - tx0;
                if ((unsigned)ly < (unsigned)th && (unsigned)lx < (unsigned)tw) zs[ch0 * P + ly * tile_w + lx] = y;
                const float xv = Io<T>::load(x1 + (size_t)gy * W + gx);
                bufB[i] = fmaf(Io<T>::sigmoid(y), xv, xv);
            }
        }
        GMBI_SYNC_WARP();

        // stage 2: y_1 on R2 (dil 2, from bufB); u_2 = sig(y_1) x_2 + x_2 -> bufA
        load_w9(dw_w, ch1, w);
        guided_stage<T, 2>(bufB, r1, bufA, r2, xn + (size_t)ch2 * HW, zs + (size_t)ch1 * P, w,
                           GMBI_LDG(dw_b + ch1), H, W, ty0, tx0, th, tw, tile_w, lane);
        GMBI_SYNC_WARP();

        // stage 3: y_2 on R3 (dil 3, from bufA); u_3 = sig(y_2) x_3 + x_3 -> bufB (u_1 is dead)
        load_w9(dw_w, ch2, w);
        guided_stage<T, 3>(bufA, r2, bufB, r3, xn + (size_t)ch3 * HW, zs + (size_t)ch2 * P, w,
                           GMBI_LDG(dw_b + ch2), H, W, ty0, tx0, th, tw, tile_w, lane);
        GMBI_SYNC_WARP();

        // stage 4: y_3 on the tile (dil 4, from bufB), then the backward enhancement in place.
        // Tile pixels outside the image get z = 0 so the 1x1 phase never reads unset memory.
        {
            load_w9(dw_w, ch3, w);
            const float b = GMBI_LDG(dw_b + ch3);
            for (int i = lane; i < P; i += 32) {
                const int ly = i / tile_w, lx = i - ly * tile_w;
                float z0 = 0.0f, z1 = 0.0f, z2 = 0.0f, z3 = 0.0f;
                if (ly < th && lx < tw) {
                    const float y3 = fmaxf(dw_smem<4>(bufB, r3, ty0 + ly, tx0 + lx, H, W, w, b), 0.0f);
                    const float y2 = zs[ch2 * P + i];
                    const float y1 = zs[ch1 * P + i];
                    const float y0 = zs[ch0 * P + i];
                    z0 = fmaf(Io<T>::sigmoid(y1), y0, y0);
                    z1 = fmaf(Io<T>::sigmoid(y2), y1, y1);
                    z2 = fmaf(Io<T>::sigmoid(y3), y2, y2);
                    z3 = y3;
                }
                zs[ch0 * P + i] = z0;
                zs[ch1 * P + i] = z1;
                zs[ch2 * P + i] = z2;
                zs[ch3 * P + i] = z3;
            }
        }
        GMBI_SYNC_WARP();  // bufB is rewritten by this warp's next lane
    }
    GMBI_SYNC_BLOCK();

    // ---------------- phase B: 1x1 fusion conv + bias + ReLU + residual ----------------
    // Work item = GMBI_PX pixels (p = pg + k * npg, so consecutive threads touch consecutive
    // pixels: conflict-free z reads, coalesced stores) x GMBI_CO output channels (one float4 of
    // the transposed weights, the same address across a warp -> broadcast).
    const int co_begin = split * co_per_block;
    const int co_cnt = min(co_per_block, C - co_begin);
    const int npg = (P + GMBI_PX - 1) / GMBI_PX;
    const int ncg = co_cnt > 0 ? co_cnt / GMBI_CO : 0;
    const int items = npg * ncg;
    for (int item = tid; item < items; item += GMBI_THREADS) {
        const int cg = item / npg;
        const int pg = item - cg * npg;
        const int co0 = co_begin + cg * GMBI_CO;
        float acc[GMBI_PX][GMBI_CO];
        gmbi_pw_item(acc, pw_wt, pw_b, co0, C, C, zs, P, pg, npg);
        GMBI_UNROLL
        for (int k = 0; k < GMBI_PX; ++k) {
            const int p = pg + k * npg;
            if (p >= P) continue;
            const int ly = p / tile_w, lx = p - ly * tile_w;
            if (ly >= th || lx >= tw) continue;
            const size_t off = (size_t)(ty0 + ly) * W + (size_t)(tx0 + lx);
            GMBI_UNROLL
            for (int j = 0; j < GMBI_CO; ++j) {
                const size_t idx = (size_t)(co0 + j) * HW + off;
                Io<T>::store(on + idx, fmaxf(acc[k][j], 0.0f) + Io<T>::load(xn + idx));
            }
        }
    }
}

}  // namespace gmbi

GMBI_KERNEL gmbi_fused_f32(const float* __restrict__ x, float* __restrict__ out,
                           const float* __restrict__ dw_w, const float* __restrict__ dw_b,
                           const float* __restrict__ pw_wt, const float* __restrict__ pw_b,
                           int C, int H, int W, int tile_h, int tile_w, int co_per_block,
                           int co_splits, int buf_a, int buf_b) {
    gmbi::fused_body<float>(x, out, dw_w, dw_b, pw_wt, pw_b, C, H, W, tile_h, tile_w, co_per_block,
                            co_splits, buf_a, buf_b);
}

GMBI_KERNEL gmbi_fused_f16(const __half* __restrict__ x, __half* __restrict__ out,
                           const float* __restrict__ dw_w, const float* __restrict__ dw_b,
                           const float* __restrict__ pw_wt, const float* __restrict__ pw_b,
                           int C, int H, int W, int tile_h, int tile_w, int co_per_block,
                           int co_splits, int buf_a, int buf_b) {
    gmbi::fused_body<__half>(x, out, dw_w, dw_b, pw_wt, pw_b, C, H, W, tile_h, tile_w, co_per_block,
                             co_splits, buf_a, buf_b);
}
