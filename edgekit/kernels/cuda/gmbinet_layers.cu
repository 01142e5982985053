// The remaining GMBINet (arXiv 2508.16397) layers, inference only, BN folded at load time, so that
// the whole eval-mode network runs as one sequence of our own launches (edgekit/kernels/gmbinet.py
// plans it; edgekit/backends/cuda_fused/runner.py runs it):
//
//   stem        3x3 stride-2 conv + ReLU                          gmbinet_stem_{f32,f16}
//   DownBlock   DW 3x3 stride 2 + ReLU, then PW 1x1 + ReLU        gmbinet_dwpw_s2_{f32,f16}
//   GMBI        (edgekit/kernels/cuda/gmbi_fused.cu, included below)           gmbi_fused_{f32,f16}
//   ConvBlock   PW 1x1 + ReLU                                      gmbinet_pw_{f32,f16}
//   DecoderFusion  DW 3x3 + ReLU on (low + nearest-up(high)), then PW 1x1 + ReLU
//                                                                   gmbinet_dwpw_up_{f32,f16}
//   head        1x1 conv + sigmoid at d1 resolution, nearest-upsampled to the input size
//                                                                   gmbinet_head_{f32,f16}
//
// All tensors are NCHW and contiguous.  T (float or __half) is the activation storage type; the
// folded parameters, accumulation and every intermediate are fp32.  The stem reads the fp32
// network input and the head writes fp32 probabilities in both variants, so a runtime needs no
// conversion launches.  Every kernel writes every element of its output.
//
// DW + PW fusion (one launch per DownBlock / ConvBlock / DecoderFusion): a block owns an output
// tile of tile_h x tile_w pixels of one image; phase A computes the depthwise result (or, for the
// plain 1x1, copies the input) for *all* Cin channels of the tile into shared memory; phase B is the
// 1x1 conv from shared memory (the same 2-pixel x 4-output-channel work item as the GMBI kernel's
// phase B: one broadcast float4 of transposed weights per input channel, 8 FMAs).  The intermediate
// never goes to global memory.  Shared memory: Cin * tile_h * tile_w floats (the planner keeps it
// <= 48 KB, so these kernels never need the dynamic shared-memory opt-in).
//   block (256,1,1); grid (ceil(W/tile_w), ceil(H/tile_h), N * co_splits); block z = n * co_splits + s
//   computes output channels [s*co_per_block, min(Cout, (s+1)*co_per_block)); co_per_block and Cout
//   are multiples of 4; pw_wt is [Cin][Cout] and 16-byte aligned.
//   Kernel arguments (PyCUDA format "PPPPPPPiiiiiiiiffiiiii"):
//     x, high, out, dw_w[Cin][9], dw_b[Cin], pw_wt[Cin][Cout], pw_b[Cout],
//     Cin, Cout, H, W (output size), Hi, Wi (x's size), Hh, Wh (high's size),
//     scale_h = float(Hh) / float(H), scale_w = float(Wh) / float(W) (fp32, for the nearest upsample),
//     tile_h, tile_w, co_per_block, co_splits, smem_floats
//   Unused pointers (high for s2/pw, dw_w/dw_b for pw) may be any value; they are never read.
//
// Nearest upsampling follows PyTorch's F.interpolate(mode="nearest", size=...) exactly:
// src = min(floor(dst * (float(in) / float(out))), in - 1) in fp32, src = dst when the sizes match;
// the fp32 scale is computed on the host and passed in.
//
// This file also compiles as plain C++ under host emulation (edgekit/kernels/cuda/emu/gmbinet_emu_main.cpp).

#include "gmbi_fused.cu"

#define GMBINET_THREADS GMBI_THREADS

namespace gmbinet {

using gmbi::Io;

enum Mode { kPointwise = 0, kUpsampleAdd = 1, kStride2 = 2 };

// PyTorch's nearest source index (upsample_nearest2d, size given, no scale factor): `scale` is
// float(in_size) / float(out_size), computed on the host in fp32 (an fp32 division here would be a
// called subroutine that costs a stack frame and spills).
GMBI_DEVICE int nearest_src(int dst, int in_size, int out_size, float scale) {
    if (in_size == out_size) return dst;
    return min((int)floorf((float)dst * scale), in_size - 1);
}

template <typename T, int MODE>
GMBI_DEVICE float dw_value(const T* __restrict__ xp, const T* __restrict__ hp, const float* __restrict__ dw_w,
                           const float* __restrict__ dw_b, int ci, int gy, int gx, int H, int W, int Hi, int Wi,
                           int Hh, int Wh, float sh, float sw) {
    if (MODE == kPointwise) return Io<T>::load(xp + (size_t)gy * Wi + gx);
    float acc = GMBI_LDG(dw_b + ci);
    const float* w = dw_w + ci * 9;
    GMBI_UNROLL
    for (int ky = 0; ky < 3; ++ky) {
        const int yy = (MODE == kStride2 ? 2 * gy : gy) + ky - 1;
        if (yy < 0 || yy >= Hi) continue;
        const int sy = MODE == kUpsampleAdd ? nearest_src(yy, Hh, H, sh) : 0;
        GMBI_UNROLL
        for (int kx = 0; kx < 3; ++kx) {
            const int xx = (MODE == kStride2 ? 2 * gx : gx) + kx - 1;
            if (xx < 0 || xx >= Wi) continue;
            float v = Io<T>::load(xp + (size_t)yy * Wi + xx);
            if (MODE == kUpsampleAdd) v += Io<T>::load(hp + (size_t)sy * Wh + nearest_src(xx, Wh, W, sw));
            acc = fmaf(GMBI_LDG(w + ky * 3 + kx), v, acc);
        }
    }
    return fmaxf(acc, 0.0f);
}

template <typename T, int MODE>
GMBI_DEVICE void dwpw_body(const T* __restrict__ x, const T* __restrict__ high, T* __restrict__ out,
                           const float* __restrict__ dw_w, const float* __restrict__ dw_b,
                           const float* __restrict__ pw_wt, const float* __restrict__ pw_b, int Cin, int Cout,
                           int H, int W, int Hi, int Wi, int Hh, int Wh, float sh, float sw, int tile_h, int tile_w,
                           int co_per_block, int co_splits, int smem_floats) {
    float* const zs = GMBI_SMEM();  // [Cin][P]
    const int P = tile_h * tile_w;
    GMBI_ASSERT(Cin * P <= smem_floats);
    (void)smem_floats;
    const int tid = (int)threadIdx.x;
    const int n = (int)blockIdx.z / co_splits;
    const int split = (int)blockIdx.z - n * co_splits;
    const int ty0 = (int)blockIdx.y * tile_h;
    const int tx0 = (int)blockIdx.x * tile_w;
    const int th = min(tile_h, H - ty0);
    const int tw = min(tile_w, W - tx0);
    const size_t HW = (size_t)H * (size_t)W;
    const size_t HWi = (size_t)Hi * (size_t)Wi;
    const size_t HWh = (size_t)Hh * (size_t)Wh;
    const T* __restrict__ xn = x + (size_t)n * (size_t)Cin * HWi;
    const T* __restrict__ hn = MODE == kUpsampleAdd ? high + (size_t)n * (size_t)Cin * HWh : nullptr;
    T* __restrict__ on = out + (size_t)n * (size_t)Cout * HW;

    // ---------------- phase A: depthwise result (or the input) for all Cin channels of the tile ----------------
    // Consecutive threads take consecutive tile pixels of one channel: coalesced reads along W.
    const int items_a = Cin * P;
    for (int item = tid; item < items_a; item += GMBINET_THREADS) {
        const int ci = item / P;
        const int p = item - ci * P;
        const int ly = p / tile_w, lx = p - ly * tile_w;
        float v = 0.0f;  // tile pixels outside the image: never stored, but keep the 1x1 inputs finite
        if (ly < th && lx < tw)
            v = dw_value<T, MODE>(xn + (size_t)ci * HWi, MODE == kUpsampleAdd ? hn + (size_t)ci * HWh : nullptr,
                                  dw_w, dw_b, ci, ty0 + ly, tx0 + lx, H, W, Hi, Wi, Hh, Wh, sh, sw);
        zs[item] = v;
    }
    GMBI_SYNC_BLOCK();

    // ---------------- phase B: 1x1 conv + bias + ReLU ----------------
    const int co_begin = split * co_per_block;
    const int co_cnt = min(co_per_block, Cout - co_begin);
    const int npg = (P + GMBI_PX - 1) / GMBI_PX;
    const int ncg = co_cnt > 0 ? co_cnt / GMBI_CO : 0;
    const int items = npg * ncg;
    for (int item = tid; item < items; item += GMBINET_THREADS) {
        const int cg = item / npg;
        const int pg = item - cg * npg;
        const int co0 = co_begin + cg * GMBI_CO;
        float acc[GMBI_PX][GMBI_CO];
        gmbi_pw_item(acc, pw_wt, pw_b, co0, Cin, Cout, zs, P, pg, npg);
        GMBI_UNROLL
        for (int k = 0; k < GMBI_PX; ++k) {
            const int p = pg + k * npg;
            if (p >= P) continue;
            const int ly = p / tile_w, lx = p - ly * tile_w;
            if (ly >= th || lx >= tw) continue;
            const size_t off = (size_t)(ty0 + ly) * W + (size_t)(tx0 + lx);
            GMBI_UNROLL
            for (int j = 0; j < GMBI_CO; ++j) Io<T>::store(on + (size_t)(co0 + j) * HW + off, fmaxf(acc[k][j], 0.0f));
        }
    }
}

// 3x3 stride-2 conv (padding 1) + bias + ReLU from the fp32 network input.  One thread per output
// pixel; GMBI_CO output channels at a time (one float4 of the [Cin*9][Cout] weights, broadcast).
//   block (256,1,1); grid (ceil(Ho*Wo/256), N, 1); format "PPPPiiiiii": x, out, w, b, Cin, Cout, H, W, Ho, Wo
template <typename T>
GMBI_DEVICE void stem_body(const float* __restrict__ x, T* __restrict__ out, const float* __restrict__ w,
                           const float* __restrict__ b, int Cin, int Cout, int H, int W, int Ho, int Wo) {
    const int n = (int)blockIdx.y;
    const int p = (int)blockIdx.x * GMBINET_THREADS + (int)threadIdx.x;
    if (p >= Ho * Wo) return;
    const int oy = p / Wo, ox = p - oy * Wo;
    const size_t HW = (size_t)H * (size_t)W;
    const float* xn = x + (size_t)n * (size_t)Cin * HW;
    T* on = out + (size_t)n * (size_t)Cout * (size_t)Ho * (size_t)Wo + p;
    for (int co0 = 0; co0 < Cout; co0 += GMBI_CO) {
        const float4 bias = GMBI_LDG4(b + co0);
        float a0 = bias.x, a1 = bias.y, a2 = bias.z, a3 = bias.w;
        for (int ci = 0; ci < Cin; ++ci) {
            const float* xc = xn + (size_t)ci * HW;
            GMBI_UNROLL
            for (int ky = 0; ky < 3; ++ky) {
                const int iy = 2 * oy + ky - 1;
                if (iy < 0 || iy >= H) continue;
                GMBI_UNROLL
                for (int kx = 0; kx < 3; ++kx) {
                    const int ix = 2 * ox + kx - 1;
                    if (ix < 0 || ix >= W) continue;
                    const float v = GMBI_LDG(xc + (size_t)iy * W + ix);
                    const float4 wv = GMBI_LDG4(w + (size_t)((ci * 9 + ky * 3 + kx) * Cout + co0));
                    a0 = fmaf(wv.x, v, a0);
                    a1 = fmaf(wv.y, v, a1);
                    a2 = fmaf(wv.z, v, a2);
                    a3 = fmaf(wv.w, v, a3);
                }
            }
        }
        const size_t plane = (size_t)Ho * (size_t)Wo;
        Io<T>::store(on + (size_t)co0 * plane, fmaxf(a0, 0.0f));
        Io<T>::store(on + (size_t)(co0 + 1) * plane, fmaxf(a1, 0.0f));
        Io<T>::store(on + (size_t)(co0 + 2) * plane, fmaxf(a2, 0.0f));
        Io<T>::store(on + (size_t)(co0 + 3) * plane, fmaxf(a3, 0.0f));
    }
}

// Head: 1x1 conv (w [Cout][Cin]) + bias + sigmoid at the d1 resolution (Hd, Wd), nearest-upsampled to
// (H, W).  One thread per *output* pixel: it reads its source pixel's Cin values and recomputes the
// (tiny) dot product, so upsampling costs no extra pass and every output element is written.
// Output is fp32 in both variants.  The sigmoid uses expf in both (the output is fp32).
//   block (256,1,1); grid (ceil(H*W/256), N, 1); format "PPPPiiiiiiff":
//   d, out, w, b, Cin, Cout, Hd, Wd, H, W, scale_h = float(Hd) / float(H), scale_w = float(Wd) / float(W)
template <typename T>
GMBI_DEVICE void head_body(const T* __restrict__ d, float* __restrict__ out, const float* __restrict__ w,
                           const float* __restrict__ b, int Cin, int Cout, int Hd, int Wd, int H, int W, float sh,
                           float sw) {
    const int n = (int)blockIdx.y;
    const int p = (int)blockIdx.x * GMBINET_THREADS + (int)threadIdx.x;
    if (p >= H * W) return;
    const int oy = p / W, ox = p - oy * W;
    const int sy = nearest_src(oy, Hd, H, sh), sx = nearest_src(ox, Wd, W, sw);
    const size_t HWd = (size_t)Hd * (size_t)Wd;
    const T* dn = d + (size_t)n * (size_t)Cin * HWd + (size_t)sy * Wd + sx;
    float* on = out + (size_t)n * (size_t)Cout * (size_t)H * (size_t)W + p;
    for (int co = 0; co < Cout; ++co) {
        float acc = GMBI_LDG(b + co);
        for (int ci = 0; ci < Cin; ++ci) acc = fmaf(GMBI_LDG(w + co * Cin + ci), Io<T>::load(dn + (size_t)ci * HWd), acc);
        on[(size_t)co * H * W] = 1.0f / (1.0f + expf(-acc));
    }
}

}  // namespace gmbinet

// ------------------------------------------------------------------------------------------------
// entry points

#define GMBINET_DWPW_ENTRY(NAME, T, MODE)                                                                  \
    GMBI_KERNEL NAME(const T* __restrict__ x, const T* __restrict__ high, T* __restrict__ out,              \
                     const float* __restrict__ dw_w, const float* __restrict__ dw_b,                        \
                     const float* __restrict__ pw_wt, const float* __restrict__ pw_b, int Cin, int Cout,   \
                     int H, int W, int Hi, int Wi, int Hh, int Wh, float scale_h, float scale_w,            \
                     int tile_h, int tile_w, int co_per_block, int co_splits, int smem_floats) {            \
        gmbinet::dwpw_body<T, MODE>(x, high, out, dw_w, dw_b, pw_wt, pw_b, Cin, Cout, H, W, Hi, Wi, Hh, Wh, \
                                    scale_h, scale_w, tile_h, tile_w, co_per_block, co_splits, smem_floats); \
    }

GMBINET_DWPW_ENTRY(gmbinet_pw_f32, float, gmbinet::kPointwise)
GMBINET_DWPW_ENTRY(gmbinet_pw_f16, __half, gmbinet::kPointwise)
GMBINET_DWPW_ENTRY(gmbinet_dwpw_s2_f32, float, gmbinet::kStride2)
GMBINET_DWPW_ENTRY(gmbinet_dwpw_s2_f16, __half, gmbinet::kStride2)
GMBINET_DWPW_ENTRY(gmbinet_dwpw_up_f32, float, gmbinet::kUpsampleAdd)
GMBINET_DWPW_ENTRY(gmbinet_dwpw_up_f16, __half, gmbinet::kUpsampleAdd)

GMBI_KERNEL gmbinet_stem_f32(const float* __restrict__ x, float* __restrict__ out, const float* __restrict__ w,
                             const float* __restrict__ b, int Cin, int Cout, int H, int W, int Ho, int Wo) {
    gmbinet::stem_body<float>(x, out, w, b, Cin, Cout, H, W, Ho, Wo);
}

GMBI_KERNEL gmbinet_stem_f16(const float* __restrict__ x, __half* __restrict__ out, const float* __restrict__ w,
                             const float* __restrict__ b, int Cin, int Cout, int H, int W, int Ho, int Wo) {
    gmbinet::stem_body<__half>(x, out, w, b, Cin, Cout, H, W, Ho, Wo);
}

GMBI_KERNEL gmbinet_head_f32(const float* __restrict__ d, float* __restrict__ out, const float* __restrict__ w,
                             const float* __restrict__ b, int Cin, int Cout, int Hd, int Wd, int H, int W,
                             float scale_h, float scale_w) {
    gmbinet::head_body<float>(d, out, w, b, Cin, Cout, Hd, Wd, H, W, scale_h, scale_w);
}

GMBI_KERNEL gmbinet_head_f16(const __half* __restrict__ d, float* __restrict__ out, const float* __restrict__ w,
                             const float* __restrict__ b, int Cin, int Cout, int Hd, int Wd, int H, int W,
                             float scale_h, float scale_w) {
    gmbinet::head_body<__half>(d, out, w, b, Cin, Cout, Hd, Wd, H, W, scale_h, scale_w);
}
