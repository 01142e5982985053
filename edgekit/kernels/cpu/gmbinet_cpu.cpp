// edgekit cpu-fused: the eval-mode GMBINet as fused CPU kernels (one source, compiled once per ISA level).
//
// Layout and design (see kernels/README.md, "CPU kernels"):
//  * NCHW activations, as the shared plan lays them out (edgekit.kernels.graph.plan_gmbinet owns the buffers).
//  * A task is a band of FULL-WIDTH output rows of one image.  Full width makes every band of every
//    channel one contiguous run, so each layer ends in a plain GEMM  out[co][p] = sum_k W[k][co] * panel[k][p]
//    over the band's pixels, and horizontal borders are zero columns of padded row buffers (no bounds checks).
//  * Each layer builds its K x P panel in per-thread scratch (stem: im2col of the stride-2 3x3; DownBlock:
//    the stride-2 depthwise; decoder fusion: depthwise of low + nearest-up(high); GMBI: z of the whole
//    four-group chain), then one register-blocked GEMM with the epilogue (bias, ReLU, residual, sigmoid).
//    Group split/merge is pointer arithmetic into x and into the panel, never a copy.
//  * SIMD: GCC vector extensions with VW floats per vector (8: AVX2, 16: AVX-512), chosen by the compile flags
//    of this translation unit.  Register blocking is a template on (output channels per block, vectors per block).
//  * A persistent worker pool (spin briefly, then sleep on a condition variable): no thread start-up per op.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>
#include <thread>
#include <vector>
#include <chrono>
#include <ctime>
#include <immintrin.h>

#if defined(__AVX512F__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
// The AVX-512 kernels, and the GMBI modules' 1x1 on AMX tiles in bf16 (fp32 accumulation): see "AMX" below.
#define VW 16
#define EK_ISA "avx512amx"
#define EK_AMX 1
#ifdef __AVX512FP16__
#define EK_FP16 1  // the GMBI chain in fp16 (see "The GMBI depthwise chain in fp16")
#endif
#include <sys/syscall.h>
#include <unistd.h>
#elif defined(__AVX512F__)
#define VW 16
#define EK_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
#define EK_ISA "avx2"
#else
#error "cpu-fused needs at least AVX2 + FMA"
#endif

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));

static inline vf vload(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof(v)); return v; }
static inline void vstore(float* p, vf v) { __builtin_memcpy(p, &v, sizeof(v)); }
#if VW == 16
static inline vf vset1(float x) { return (vf)_mm512_set1_ps(x); }
static inline vf vrcp(vf x) { return (vf)_mm512_rcp14_ps((__m512)x); }
// The first n (1..VW) lanes of a vector: a GEMM's last columns load and store through masks, so a tail never
// reads past its row nor writes into the next band's pixels (which another thread may own), and needs no copy.
typedef __mmask16 vmask;
static inline vmask tail_mask(int n) { return (vmask)((1u << n) - 1u); }
static inline vf vload_m(const float* p, vmask m) { return (vf)_mm512_maskz_loadu_ps(m, p); }
static inline void vstore_m(float* p, vf v, vmask m) { _mm512_mask_storeu_ps(p, m, (__m512)v); }
#else
static inline vf vset1(float x) { return (vf)_mm256_set1_ps(x); }
static inline vf vrcp(vf x) { return (vf)_mm256_rcp_ps((__m256)x); }
typedef __m256i vmask;
static inline vmask tail_mask(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
static inline vf vload_m(const float* p, vmask m) { return (vf)_mm256_maskload_ps(p, m); }
static inline void vstore_m(float* p, vf v, vmask m) { _mm256_maskstore_ps(p, m, (__m256)v); }
#endif
// even and odd lanes of two consecutive vectors (a = in[0..VW), b = in[VW..2VW))
static inline vf vevens(vf a, vf b) {
#if VW == 16
  return __builtin_shuffle(a, b, vi{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30});
#else
  return __builtin_shuffle(a, b, vi{0, 2, 4, 6, 8, 10, 12, 14});
#endif
}
static inline vf vodds(vf a, vf b) {
#if VW == 16
  return __builtin_shuffle(a, b, vi{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
#else
  return __builtin_shuffle(a, b, vi{1, 3, 5, 7, 9, 11, 13, 15});
#endif
}
// a[0]a[0]a[1]a[1]... : the low and high halves of a nearest 2x upsample of a
static inline vf vdup_lo(vf a) {
#if VW == 16
  return __builtin_shuffle(a, vi{0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7});
#else
  return __builtin_shuffle(a, vi{0, 0, 1, 1, 2, 2, 3, 3});
#endif
}
static inline vf vdup_hi(vf a) {
#if VW == 16
  return __builtin_shuffle(a, vi{8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15});
#else
  return __builtin_shuffle(a, vi{4, 4, 5, 5, 6, 6, 7, 7});
#endif
}
// dst[2j] = dst[2j+1] = src[j], j < n
static inline void upsample2_row(float* dst, const float* src, int n) {
  int j = 0;
  for (; j + VW <= n; j += VW) { vf v = vload(src + j); vstore(dst + 2 * j, vdup_lo(v)); vstore(dst + 2 * j + VW, vdup_hi(v)); }
  for (; j < n; ++j) dst[2 * j] = dst[2 * j + 1] = src[j];
}
static inline vf vmax0(vf a) { return a > 0.0f ? a : vset1(0.0f); }

static inline float ssigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

#ifdef EK_AMX
// ---------------------------------------------------------------------------------------------
// AMX: the GMBI modules' 1x1 as bf16 tile products with fp32 accumulation (TDPBF16PS: 16 x 16 x 32 MACs per
// instruction; measured on this session's Xeon, one core: ~1.8 TMAC/s against 120 GFMA/s for fp32 FMAs, and
// 60 GMAC/s for AVX512_BF16's vdpbf16ps, which is why that one is not used).  The tile product pairs K: a
// 32-bit word holds two bf16 of consecutive K.  The 1x1's K order is free, so a lane's four z (channels c,
// G+c, 2G+c, 3G+c) become two words per pixel, (z0, z1) in pair row c and (z2, z3) in pair row G+c, written by
// the chain's stage-4 pass the moment they are final (as the INT8 path packs its bytes): the panel is Kp pair
// rows of P words, Kp = 2G rounded up to 16 (the tile's depth), the rows past 2G zero.  Everything else
// (the chain, the epilogue, the other layers) stays fp32.

// fp32 -> bf16, round to nearest even (z and the weights are finite): the upper 16 bits of the result
static inline vu bf16_round(vf x) {
  vu b = (vu)x;
  return b + 0x7FFFu + ((b >> 16) & 1u);
}
static inline vu bf16_pair(vf lo, vf hi) { return (bf16_round(lo) >> 16) | (bf16_round(hi) & 0xFFFF0000u); }
static inline uint32_t bf16_bits(float x) {
  uint32_t b; std::memcpy(&b, &x, 4);
  return (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
}
static inline uint32_t bf16_pair_s(float lo, float hi) { return bf16_bits(lo) | (bf16_bits(hi) << 16); }

// Pair row kp of the panel holds channels (lo, lo + G): lo = kp for kp < G (z0, z1), G + kp for kp >= G (z2, z3).
static inline int pair_lo_channel(int kp, int G) { return kp < G ? kp : G + kp; }
static inline int amx_pairs(int C) { return ((C / 2 + 15) / 16) * 16; }  // Kp: 2G pair rows rounded up to 16

// Linux hands a process the AMX tile state only on request (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA).
// Refused (an old kernel, a hypervisor hiding it): the library runs the fp32 1x1 instead.
static bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

// The 1x1's weights as A tiles: [co block of 16][K step of 16 pairs][16 rows][16 words], word (co, kp) =
// (w[lo][co], w[lo + G][co]) in bf16; co past cout and kp past 2G are zero.  Packed on the first call with a
// given weight array and kept with an fp32 copy: a later call reuses the pack only while the weights at that
// address still equal the copy (a new program may reuse the address), so a stale pack is never run.
struct AmxPack {
  const float* src = nullptr; int C = 0; bool lane_major = false;
  std::vector<float> copy;
  uint32_t* words = nullptr;
};
struct AmxPacks {
  std::vector<AmxPack> packs;
  // lane_major: the A rows in lane order (row 4c + i is output channel iG + c, the four channels lane c's chain
  // reads from x), so the channels of a run of lanes are a run of co blocks (see gmbi_owned_pw_task)
  const uint32_t* get(const float* wt, int C, bool lane_major = false) {
    const size_t n = (size_t)C * C;
    for (AmxPack& p : packs)
      if (p.src == wt && p.C == C && p.lane_major == lane_major) {
        if (std::memcmp(p.copy.data(), wt, n * sizeof(float)) != 0) pack(p, wt, C);
        return p.words;
      }
    packs.emplace_back();
    AmxPack& p = packs.back();
    p.src = wt; p.C = C; p.lane_major = lane_major;
    pack(p, wt, C);
    return p.words;
  }
  static void pack(AmxPack& p, const float* wt, int C) {
    const int G4 = C / 4;
    const int G = C / 4, Kp = amx_pairs(C), steps = Kp / 16, cob = (C + 15) / 16;
    p.copy.assign(wt, wt + (size_t)C * C);
    std::free(p.words);
    p.words = static_cast<uint32_t*>(std::aligned_alloc(64, (size_t)cob * steps * 256 * 4));
    for (int b = 0; b < cob; ++b)
      for (int st = 0; st < steps; ++st)
        for (int r = 0; r < 16; ++r)
          for (int j = 0; j < 16; ++j) {
            const int row = b * 16 + r, kp = st * 16 + j;
            const int co = p.lane_major ? (row % 4) * G4 + row / 4 : row;
            uint32_t w = 0;
            if (row < C && kp < 2 * G) {
              const int lo = pair_lo_channel(kp, G);
              w = bf16_pair_s(wt[(long)lo * C + co], wt[(long)(lo + G) * C + co]);
            }
            p.words[(((long)b * steps + st) * 16 + r) * 16 + j] = w;
          }
  }
  ~AmxPacks() { for (AmxPack& p : packs) std::free(p.words); }
};
#endif

// ---------------------------------------------------------------------------------------------
// worker pool

namespace {

struct Scratch {
  std::vector<float*> bufs;
  std::vector<size_t> sizes;
  float* get(int slot, size_t n) {
    if ((int)bufs.size() <= slot) { bufs.resize(slot + 1, nullptr); sizes.resize(slot + 1, 0); }
    if (sizes[slot] < n) {
      std::free(bufs[slot]);
      size_t bytes = ((n * sizeof(float) + 4 * 64 + 63) / 64) * 64;
      bufs[slot] = static_cast<float*>(std::aligned_alloc(64, bytes));
      sizes[slot] = n;
    }
    return bufs[slot];
  }
  ~Scratch() { for (float* b : bufs) std::free(b); }
};

typedef void (*TaskFn)(const void* ctx, int task, Scratch& s);

struct Pool {
  // A job is (id, fn, ctx, n), published under the mutex; tasks are claimed from one 64-bit ticket
  // (job id << 32 | next index) by compare-and-swap, so a worker still holding an old job can never
  // claim (or lose) an index of a newer one.
  int nthreads;
  std::vector<std::thread> workers;
  std::vector<Scratch> scratch;
  std::mutex m;
  std::condition_variable cv;
  uint64_t job_id = 0;  // guarded by m
  TaskFn job_fn = nullptr;
  const void* job_ctx = nullptr;
  int job_n = 0;
#ifdef EK_AMX
  bool job_pinned = false;  // guarded by m; see run_pinned
#endif
  bool stop = false;
  std::atomic<uint64_t> gen{0};
  std::atomic<uint64_t> ticket{0};
  std::atomic<int> done{0};
  // non-finite values (NaN, +-inf) the stem read in its input since ek_take_nonfinite_inputs last zeroed it
  std::atomic<long long> nonfinite_inputs{0};
  Scratch shared;  // buffers every task of a job reads (the two-phase GMBI's z); grown by the calling thread only

  float* shared_z(size_t n) { return shared.get(0, n); }
#ifdef EK_AMX
  AmxPacks amx;  // the GMBI 1x1 weights as bf16 A tiles (used by the calling thread only, between jobs)
#endif

  explicit Pool(int n) : nthreads(std::max(1, n)), scratch(std::max(1, n)) {
    for (int t = 1; t < nthreads; ++t) workers.emplace_back([this, t] { loop(t); });
  }
  ~Pool() {
    { std::lock_guard<std::mutex> g(m); stop = true; gen.fetch_add(1); }
    cv.notify_all();
    for (auto& w : workers) w.join();
  }
  void drain(int tid, uint64_t id, TaskFn fn, const void* ctx, int n) {
    for (;;) {
      uint64_t t = ticket.load(std::memory_order_acquire);
      if ((t >> 32) != id || (int)(t & 0xffffffffu) >= n) return;
      if (ticket.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) {
        fn(ctx, (int)(t & 0xffffffffu), scratch[tid]);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  }
  void loop(int tid) {
    uint64_t seen = 0;
    for (;;) {
      // Spin a little (the next layer follows within microseconds), then sleep: the machine is shared.
      for (int spins = 0; gen.load(std::memory_order_acquire) == seen && spins < 4000; ++spins) _mm_pause();
      uint64_t id; TaskFn fn; const void* ctx; int n;
#ifdef EK_AMX
      bool pinned;
#endif
      {
        std::unique_lock<std::mutex> lk(m);
        cv.wait(lk, [&] { return gen.load() != seen; });
        seen = gen.load();
        if (stop) return;
        id = job_id; fn = job_fn; ctx = job_ctx; n = job_n;
#ifdef EK_AMX
        pinned = job_pinned;
#endif
      }
#ifdef EK_AMX
      if (pinned) {
        drain_pinned(tid, id, fn, ctx, n);
        continue;
      }
#endif
      drain(tid, id, fn, ctx, n);
    }
  }
  void run(TaskFn f, const void* c, int n) {
    if (n <= 0) return;
    if (nthreads == 1 || n == 1) {
      for (int k = 0; k < n; ++k) f(c, k, scratch[0]);
      return;
    }
    uint64_t id;
    {
      std::lock_guard<std::mutex> g(m);
      id = ++job_id;
      job_fn = f; job_ctx = c; job_n = n;
#ifdef EK_AMX
      job_pinned = false;
#endif
      done.store(0, std::memory_order_relaxed);
      ticket.store(id << 32, std::memory_order_release);
      gen.fetch_add(1, std::memory_order_release);
    }
    cv.notify_all();
    drain(0, id, f, c, n);
    // The last tasks run on other threads: spin briefly, then yield the core (on an oversubscribed machine
    // spinning would only keep those threads off it).
    for (int spins = 0; done.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < 2000) _mm_pause(); else std::this_thread::yield();
    }
  }
#ifdef EK_AMX
  // Pinned jobs (n <= 32 tasks): the ticket is (job id << 32 | one bit per claimed task).  Thread t first claims
  // its own tasks t, t + nthreads, ..., then any still unclaimed: task k runs on thread k % nthreads (the calling
  // thread is 0) unless that thread had not even started it when another ran out of work (a worker still
  // asleep or preempted on a shared machine), so locality is kept when it is free and never waited for.
  bool claim_pinned(uint64_t id, int k) {
    uint64_t t = ticket.load(std::memory_order_acquire);
    for (;;) {
      if ((t >> 32) != id || (t & (1ull << k))) return false;
      if (ticket.compare_exchange_weak(t, t | (1ull << k), std::memory_order_acq_rel)) return true;
    }
  }
  void drain_pinned(int tid, uint64_t id, TaskFn fn, const void* ctx, int n) {
    for (int pass = 0; pass < 2; ++pass)
      for (int k = pass ? 0 : tid; k < n; k += pass ? 1 : nthreads)
        if (claim_pinned(id, k)) {
          fn(ctx, k, scratch[tid]);
          done.fetch_add(1, std::memory_order_release);
        }
  }
  // For jobs whose task k should find the data that task k of the job before it left in its core's cache (the
  // two-phase GMBI's owned lanes): n <= 32.
  void run_pinned(TaskFn f, const void* c, int n) {
    if (n <= 0) return;
    if (nthreads == 1 || n == 1 || n > 32) {
      run(f, c, n);
      return;
    }
    uint64_t id;
    {
      std::lock_guard<std::mutex> g(m);
      id = ++job_id;
      job_fn = f; job_ctx = c; job_n = n; job_pinned = true;
      done.store(0, std::memory_order_relaxed);
      ticket.store(id << 32, std::memory_order_release);
      gen.fetch_add(1, std::memory_order_release);
    }
    cv.notify_all();
    drain_pinned(0, id, f, c, n);
    for (int spins = 0; done.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < 2000) _mm_pause(); else std::this_thread::yield();
    }
  }
#endif
};

// ---------------------------------------------------------------------------------------------
// GEMM over a band:  out[co][p] = epi(bias[co] + sum_k wt[k*cout + co] * panel[k*ld + p])
// epilogue: ReLU, then optionally + res[co*res_cs + p].

struct Gemm {
  const float* panel; long ld;  // K rows of P pixels, row stride ld floats
  const float* wt; const float* bias;  // wt [K][cout]
  int K, cout, P;
  float* out; long out_cs;  // channel stride of out (pixel p of channel co at out[co*out_cs + p])
  const float* res; long res_cs;  // residual (nullptr: none)
#ifdef EK_FP16
  bool out_half = false;  // out is fp16 storage: each result rounded to fp16 (nearest even) as it is stored
#endif
};

// MASK: the block's last vector holds only the lanes of m (the GEMM's last columns).
template <int COB, int NV, bool MASK>
static inline void micro(const Gemm& g, int co, const float* pan, long ld, float* out, long out_cs,
                         const float* res, long res_cs, vmask m) {
  auto ld_v = [&](const float* p, int v) { return (MASK && v == NV - 1) ? vload_m(p, m) : vload(p); };
  vf acc[COB][NV];
  for (int j = 0; j < COB; ++j) {
    vf b = vset1(g.bias[co + j]);
    for (int v = 0; v < NV; ++v) acc[j][v] = b;
  }
  const float* w = g.wt + co;
  for (int k = 0; k < g.K; ++k) {
    vf z[NV];
    for (int v = 0; v < NV; ++v) z[v] = ld_v(pan + k * ld + v * VW, v);
    for (int j = 0; j < COB; ++j) {
      vf wj = vset1(w[(long)k * g.cout + j]);
      for (int v = 0; v < NV; ++v) acc[j][v] += wj * z[v];
    }
  }
  for (int j = 0; j < COB; ++j)
    for (int v = 0; v < NV; ++v) {
      vf o = vmax0(acc[j][v]);
      if (res) o += ld_v(res + (co + j) * res_cs + v * VW, v);
#ifdef EK_FP16
      if (g.out_half) {  // out - g.out: the block's pixel offset, in elements of the fp16 buffer at g.out
        _Float16* h = reinterpret_cast<_Float16*>(g.out) + ((out - g.out) + (co + j) * out_cs + v * VW);
        const __m256i oh = _mm512_cvtps_ph((__m512)o, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        if (MASK && v == NV - 1) _mm256_mask_storeu_epi16(h, (__mmask16)m, oh);
        else _mm256_storeu_si256(reinterpret_cast<__m256i*>(h), oh);
        continue;
      }
#endif
      if (MASK && v == NV - 1) vstore_m(out + (co + j) * out_cs + v * VW, o, m);
      else vstore(out + (co + j) * out_cs + v * VW, o);
    }
}

#if VW == 16
constexpr int COB_MAIN = 8, NV_MAIN = 3;  // 24 accumulators of 32 zmm
#else
// 12 accumulators + 2 panel vectors + 1 broadcast of 16 ymm.  Measured (GEMM-only builds, 1 thread, CPU time):
// 6x2 and 4x2 ran the GMBI 1x1s in ~9 ms, 4x3 (which GCC spills) and 2x6 in ~12.5 ms, 8x1 in 10.5 ms.
constexpr int COB_MAIN = 6, NV_MAIN = 2;
#endif
constexpr int PBLK = NV_MAIN * VW;

// one block of n (1..8) output channels
template <int NV, bool MASK>
static inline void micro_n(int n, const Gemm& g, int co, const float* pan, long ld, float* out, long out_cs,
                           const float* res, long res_cs, vmask m) {
  switch (n) {
    case 1: micro<1, NV, MASK>(g, co, pan, ld, out, out_cs, res, res_cs, m); break;
    case 2: micro<2, NV, MASK>(g, co, pan, ld, out, out_cs, res, res_cs, m); break;
    case 3: micro<3, NV, MASK>(g, co, pan, ld, out, out_cs, res, res_cs, m); break;
    case 4: micro<4, NV, MASK>(g, co, pan, ld, out, out_cs, res, res_cs, m); break;
    case 5: micro<5, NV, MASK>(g, co, pan, ld, out, out_cs, res, res_cs, m); break;
    case 6: micro<6, NV, MASK>(g, co, pan, ld, out, out_cs, res, res_cs, m); break;
#if VW == 16
    case 7: micro<7, NV, MASK>(g, co, pan, ld, out, out_cs, res, res_cs, m); break;
    case 8: micro<8, NV, MASK>(g, co, pan, ld, out, out_cs, res, res_cs, m); break;
#endif
  }
}

// Any number of output channels: blocks of COB_MAIN, then the rest as one block, or, when fewer than 4 would be
// left (few FMAs per panel load), one COB_MAIN block fewer and the rest as two blocks of about half (at least 4
// each): 32 -> 6 6 6 6 4 4 on AVX2, 14 -> 6 4 4, 13 -> 6 4 3; widths that are multiples of 4 get the blocks
// they always had.
template <int NV, bool MASK>
static void gemm_block(const Gemm& g, const float* pan, long ld, float* out, long out_cs, const float* res,
                       long res_cs, vmask m) {
  int main_end = (g.cout / COB_MAIN) * COB_MAIN, rest = g.cout - main_end;
  if (rest > 0 && rest < 4 && main_end > 0) { main_end -= COB_MAIN; rest += COB_MAIN; }
  int co = 0;
  for (; co < main_end; co += COB_MAIN) micro<COB_MAIN, NV, MASK>(g, co, pan, ld, out, out_cs, res, res_cs, m);
  if (rest > COB_MAIN) {
    const int half = (rest + 1) / 2;
    micro_n<NV, MASK>(half, g, co, pan, ld, out, out_cs, res, res_cs, m);
    co += half;
    rest -= half;
  }
  if (rest > 0) micro_n<NV, MASK>(rest, g, co, pan, ld, out, out_cs, res, res_cs, m);
}

// Pixel blocks of PBLK; the last (fewer) columns as 1..NV_MAIN vectors, the last one masked: no padded copies.
static void gemm(const Gemm& g, Scratch&) {
  const vmask all = tail_mask(VW);
  int p = 0;
  for (; p + PBLK <= g.P; p += PBLK)
    gemm_block<NV_MAIN, false>(g, g.panel + p, g.ld, g.out + p, g.out_cs, g.res ? g.res + p : nullptr, g.res_cs, all);
  const int tail = g.P - p;
  if (tail > 0) {
    const int nv = (tail + VW - 1) / VW;
    const vmask m = tail_mask(tail - (nv - 1) * VW);
    const float* res = g.res ? g.res + p : nullptr;
    switch (nv) {
      case 1: gemm_block<1, true>(g, g.panel + p, g.ld, g.out + p, g.out_cs, res, g.res_cs, m); break;
      case 2: gemm_block<2, true>(g, g.panel + p, g.ld, g.out + p, g.out_cs, res, g.res_cs, m); break;
      default: gemm_block<NV_MAIN, true>(g, g.panel + p, g.ld, g.out + p, g.out_cs, res, g.res_cs, m); break;  // 3 (AVX-512)
    }
  }
}

// ---------------------------------------------------------------------------------------------
// padded row buffers: a row of W floats at column offset PADC, zero columns either side (taps up to
// dilation 4 need no bounds checks); rows out of the image read a shared zero row.

constexpr int PADC = 16;  // >= the largest dilation, and keeps every row 64-byte aligned
// Row stride of a K x P panel: P rounded up to 16 floats, plus 16 more when that is a multiple of 4 KB, so the K
// rows the GEMM streams at once are never a multiple of 4 KB apart (they would all map to one L1 set).
static inline long panel_ld(int P) {
  long ld = ((long)(P + 15) / 16) * 16;
  return ld % 1024 ? ld : ld + 16;
}
static inline int padded_stride(int W) { return ((W + 2 * PADC + 15) / 16) * 16; }

struct RowBuf {
  float* base; int stride; int row0; int nrows; const float* zero;
  float* row(int r) { return base + (long)(r - row0) * stride + PADC; }
  const float* tap(int r, int H) const {
    return (r < 0 || r >= H) ? zero + PADC : base + (long)(r - row0) * stride + PADC;
  }
};

static RowBuf rowbuf(Scratch& s, int slot, int row0, int nrows, int W, const float* zero) {
  int st = padded_stride(W);
  float* b = s.get(slot, (size_t)st * std::max(nrows, 1));
  for (int r = 0; r < nrows; ++r) {  // zero the pad columns (the row itself is always written)
    std::memset(b + (long)r * st, 0, PADC * sizeof(float));
    std::memset(b + (long)r * st + PADC + W, 0, (st - PADC - W) * sizeof(float));
  }
  return RowBuf{b, st, row0, nrows, zero};
}

static const float* zero_row(Scratch& s, int W) {
  int st = padded_stride(W);
  float* z = s.get(10, st);
  std::memset(z, 0, st * sizeof(float));
  return z;
}

// One channel's depthwise 3x3 (dilation d, + bias, ReLU) at column x of three padded rows a, b, c: the taps
// broadcast once per row call, the vector form for VW columns and the scalar form for the tail.
struct Dw3x3 {
  vf w[9], vb;
  const float* ws; float bs;
  Dw3x3(const float* w_, float bias) : ws(w_), bs(bias) {
    for (int k = 0; k < 9; ++k) w[k] = vset1(w_[k]);
    vb = vset1(bias);
  }
  vf operator()(const float* a, const float* b, const float* c, int x, int d) const {
    return vmax0(vb + w[0] * vload(a + x - d) + w[1] * vload(a + x) + w[2] * vload(a + x + d) +
                 w[3] * vload(b + x - d) + w[4] * vload(b + x) + w[5] * vload(b + x + d) + w[6] * vload(c + x - d) +
                 w[7] * vload(c + x) + w[8] * vload(c + x + d));
  }
  float scalar(const float* a, const float* b, const float* c, int x, int d) const {
    float s = bs + ws[0] * a[x - d] + ws[1] * a[x] + ws[2] * a[x + d] + ws[3] * b[x - d] + ws[4] * b[x] +
              ws[5] * b[x + d] + ws[6] * c[x - d] + ws[7] * c[x] + ws[8] * c[x + d];
    return s > 0.0f ? s : 0.0f;
  }
};

// one output row of a stride-1 dilated 3x3 depthwise conv (+bias, ReLU): out[x], x in [0, W)
static inline void dw_row(float* out, const float* a, const float* b, const float* c, const float* w, float bias,
                          int W, int d) {
  const Dw3x3 dw(w, bias);
  int x = 0;
  for (; x + VW <= W; x += VW) {
    vf s = dw(a, b, c, x, d);
    vstore(out + x, s);
  }
  for (; x < W; ++x) {
    float s = dw.scalar(a, b, c, x, d);
    out[x] = s;
  }
}

// sigmoid(y) for y >= 0 (every gate's argument is a ReLU output): e^-y = 2^t, t = -y log2(e) in [-115, 0], as
// 2^round(t) (exponent bits) x 2^f, f in [-0.5, 0.5] (Cephes exp2f polynomial, ~2e-7 relative), then the
// reciprocal estimate + one Newton step.  No clamp below (y >= 0), none at the top but y <= 80 (the exponent
// add must not reach denormals); the rounding is the 1.5 * 2^23 trick, so this file must NOT be built with
// -ffast-math.  About 18 vector ops (a Cephes expf with clamps on both sides was ~25).
static inline vf vsigmoid_pos(vf y) {
  y = y < 80.0f ? y : vset1(80.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: t + magic rounds t to an integer in the low mantissa bits
  vf t = y * -1.44269504088896341f;
  vf tm = t + magic;
  vf n = tm - magic;
  vf f = t - n;
  vi ni = (vi)tm - 0x4B400000;
  vf p = vset1(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  vf e = (vf)((vi)p + (ni << 23));
  vf d = 1.0f + e;
  vf r = vrcp(d);
  return r * (2.0f - d * r);
}

// sigmoid(x) of either sign (the head's logits): s = sigmoid(|x|), then 1 - s where x < 0.  The same
// polynomial as the gates, so there is one exponential in this file.
static inline vf vsigmoid(vf x) {
  vf ax = x < 0.0f ? -x : x;
  vf s = vsigmoid_pos(ax);
  return x < 0.0f ? 1.0f - s : s;
}

// One row of one stage of a GMBI lane (the four dilated depthwise convs, guidance forward and back), fused:
//   y = ReLU(dw_d(a, b, c) + bias), s = sigmoid(y)
//   U: u = s * xn + xn          forward guidance: the next stage's input (stages 1-3, band and halo rows)
//   Y: y stored                 the raw stage output, into the 1x1's panel (band rows)
//   Z: zp = s * zp + zp         backward enhancement of the previous stage's raw output, which sits in the
//                               panel: z_{i-1} = sigmoid(y_i) y_{i-1} + y_{i-1} (band rows, stages 2-4)
// so each sigmoid is computed once: four per lane pixel (the separate backward pass recomputed three more).
template <bool U, bool Y, bool Z>
static inline void dw_stage_row(float* y, float* u, float* zp, const float* a, const float* b, const float* c,
                                const float* w, float bias, const float* xn, int W, int d) {
  const Dw3x3 dw(w, bias);
  int x = 0;
  for (; x + VW <= W; x += VW) {
    vf s = dw(a, b, c, x, d);
    if (Y) vstore(y + x, s);
    vf g = vsigmoid_pos(s);
    if (U) { vf xv = vload(xn + x); vstore(u + x, g * xv + xv); }
    if (Z) { vf zv = vload(zp + x); vstore(zp + x, g * zv + zv); }
  }
  for (; x < W; ++x) {
    float s = dw.scalar(a, b, c, x, d);
    if (Y) y[x] = s;
    float g = ssigmoid(s);
    if (U) u[x] = g * xn[x] + xn[x];
    if (Z) zp[x] = g * zp[x] + zp[x];
  }
}

// ---------------------------------------------------------------------------------------------
// the layers.  Every kernel: a task = (image, band of output rows [r0, r1)).

struct Bands { int n, rows, per_image; };
static inline void band_of(int task, int per_image, int rows, int H, int& img, int& r0, int& r1) {
  img = task / per_image;
  r0 = (task % per_image) * rows;
  r1 = std::min(H, r0 + rows);
}

// --- GMBI: one pass per band (see kernels/README.md for the halo arithmetic: 10, 9, 7, 4, 0)
constexpr int HALO_R1 = 9, HALO_R2 = 7, HALO_R3 = 4;

// ---------------------------------------------------------------------------------------------
// INT8 1x1 of the GMBI modules (precision int8).  z >= 0 (ReLU outputs times 1 + sigmoid), so it is quantized
// unsigned, per module: q = min(round(z / s_z), 127); weights symmetric per output channel, s8.  The 1x1's K
// order is free, so the four z of one lane (channels c, G+c, 2G+c, 3G+c) form one 32-bit word per pixel,
// written by the chain's stage-4 pass the moment all four are final: the quantized panel is G rows of P words
// and the float z never reaches the 1x1.  The GEMM is vpmaddubsw (u8 x s8 pairs -> s16) + vpmaddwd (pairs
// -> s32): 7-bit activations keep every s16 pair sum below 2 x 127 x 127 = 32258, so nothing saturates.
#if VW == 16
typedef __m512i vq;
static inline vq q_load(const uint32_t* p) { return _mm512_loadu_si512(p); }
static inline vq q_load_m(const uint32_t* p, vmask m) { return _mm512_maskz_loadu_epi32(m, p); }
static inline vq q_set1(uint32_t w) { return _mm512_set1_epi32((int)w); }
static inline vq q_dot4(vq acc, vq z, vq w) {  // acc += sum of 4 u8 x s8 products per 32-bit lane
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(z, w), _mm512_set1_epi16(1)));
}
static inline vf q_to_f(vq a) { return (vf)_mm512_cvtepi32_ps(a); }
static inline vq q_zero() { return _mm512_setzero_si512(); }
static inline vi q_round(vf x) { return (vi)_mm512_cvtps_epi32((__m512)x); }
#else
typedef __m256i vq;
static inline vq q_load(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
static inline vq q_load_m(const uint32_t* p, vmask m) { return _mm256_maskload_epi32(reinterpret_cast<const int*>(p), m); }
static inline vq q_set1(uint32_t w) { return _mm256_set1_epi32((int)w); }
static inline vq q_dot4(vq acc, vq z, vq w) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(z, w), _mm256_set1_epi16(1)));
}
static inline vf q_to_f(vq a) { return (vf)_mm256_cvtepi32_ps(a); }
static inline vq q_zero() { return _mm256_setzero_si256(); }
static inline vi q_round(vf x) { return (vi)_mm256_cvtps_epi32((__m256)x); }
#endif

// round(z / s_z) clamped to [0, 127] (z >= 0).  Clamped in float first: the conversion of anything above 2^31
// is INT_MIN, which an integer clamp would turn into 0 instead of 127.
static inline vi q7(vf z, vf inv) {
  vf t = z * inv;
  t = t < 127.0f ? t : vset1(127.0f);
  t = t > 0.0f ? t : vset1(0.0f);
  return q_round(t);
}
static inline uint32_t q7s(float z, float inv) {
  float t = std::min(127.0f, std::max(0.0f, z * inv));
  return (uint32_t)std::lrint(t);
}

// Stage 4 of a lane with the INT8 1x1: y3 = ReLU(dw), z2 = sig(y3) y2 + y2, z3 = y3, and the lane's four z
// (z0, z1 final since stages 2 and 3) quantized into one word per pixel.
static inline void dw_stage4_q_row(uint32_t* q, const float* z0, const float* z1, const float* y2, const float* a,
                                   const float* b, const float* c, const float* w, float bias, float inv, int W) {
  const int d = 4;
  const Dw3x3 dw(w, bias);
  const vf vinv = vset1(inv);
  int x = 0;
  for (; x + VW <= W; x += VW) {
    vf s = dw(a, b, c, x, d);
    vf yv = vload(y2 + x);
    vf z2 = vsigmoid_pos(s) * yv + yv;
    vi word = q7(vload(z0 + x), vinv) | (q7(vload(z1 + x), vinv) << 8) | (q7(z2, vinv) << 16) | (q7(s, vinv) << 24);
    __builtin_memcpy(q + x, &word, sizeof(word));
  }
  for (; x < W; ++x) {
    float s = dw.scalar(a, b, c, x, d);
    float z2 = ssigmoid(s) * y2[x] + y2[x];
    q[x] = q7s(z0[x], inv) | (q7s(z1[x], inv) << 8) | (q7s(z2, inv) << 16) | (q7s(s, inv) << 24);
  }
}

// out[co][p] = ReLU(scale[co] * sum_c dot4(panel[c][p], wq[c][co]) + bias[co]) + res[co][p]
struct GemmQ {
  const uint32_t* panel; long ld;  // G rows of P words
  const uint32_t* wq; const float* scale; const float* bias;  // wq [G][cout] words of 4 s8
  int G, cout, P;
  float* out; long out_cs;
  const float* res; long res_cs;
};

constexpr int QCOB = 4, QNV = 2, QPBLK = QNV * VW;  // 8 accumulators + 2 panel + weight + temporaries of 16 ymm

template <int NV, bool MASK>
static inline void micro_q(const GemmQ& g, int co, const uint32_t* pan, long ld, float* out, long out_cs,
                           const float* res, long res_cs, vmask m) {
  vq acc[QCOB][NV];
  for (int j = 0; j < QCOB; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = q_zero();
  const uint32_t* w = g.wq + co;
  for (int c = 0; c < g.G; ++c) {
    vq z[NV];
    for (int v = 0; v < NV; ++v)
      z[v] = (MASK && v == NV - 1) ? q_load_m(pan + c * ld + v * VW, m) : q_load(pan + c * ld + v * VW);
    for (int j = 0; j < QCOB; ++j) {
      vq wj = q_set1(w[(long)c * g.cout + j]);
      for (int v = 0; v < NV; ++v) acc[j][v] = q_dot4(acc[j][v], z[v], wj);
    }
  }
  for (int j = 0; j < QCOB; ++j) {
    const vf sc = vset1(g.scale[co + j]), b = vset1(g.bias[co + j]);
    for (int v = 0; v < NV; ++v) {
      vf o = vmax0(q_to_f(acc[j][v]) * sc + b);
      float* op = out + (co + j) * out_cs + v * VW;
      if (MASK && v == NV - 1) {
        if (res) o += vload_m(res + (co + j) * res_cs + v * VW, m);
        vstore_m(op, o, m);
      } else {
        if (res) o += vload(res + (co + j) * res_cs + v * VW);
        vstore(op, o);
      }
    }
  }
}

// cout is a multiple of 4: the GMBI modules' widths are (the model's 4 equal channel groups).  The last columns
// (fewer than QPBLK) as one or two vectors, the last one masked, as in gemm().
static void gemm_q(const GemmQ& g, Scratch&) {
  const vmask all = tail_mask(VW);
  int p = 0;
  for (; p + QPBLK <= g.P; p += QPBLK)
    for (int co = 0; co < g.cout; co += QCOB)
      micro_q<QNV, false>(g, co, g.panel + p, g.ld, g.out + p, g.out_cs, g.res ? g.res + p : nullptr, g.res_cs, all);
  const int tail = g.P - p;
  if (tail > 0) {
    const int nv = (tail + VW - 1) / VW;
    const vmask m = tail_mask(tail - (nv - 1) * VW);
    const float* res = g.res ? g.res + p : nullptr;
    for (int co = 0; co < g.cout; co += QCOB) {
      if (nv == 1) micro_q<1, true>(g, co, g.panel + p, g.ld, g.out + p, g.out_cs, res, g.res_cs, m);
      else micro_q<QNV, true>(g, co, g.panel + p, g.ld, g.out + p, g.out_cs, res, g.res_cs, m);
    }
  }
}

#ifdef EK_AMX
// Stage 4 of a lane with the AMX 1x1: y3 = ReLU(dw), z2 = sig(y3) y2 + y2, z3 = y3, and the lane's four z as two
// words of bf16 pairs per pixel: p01 = (z0, z1), p23 = (z2, z3).
static inline void dw_stage4_bf16_row(uint32_t* p01, uint32_t* p23, const float* z0, const float* z1, const float* y2,
                                      const float* a, const float* b, const float* c, const float* w, float bias, int W) {
  const int d = 4;
  const Dw3x3 dw(w, bias);
  int x = 0;
  for (; x + VW <= W; x += VW) {
    vf s = dw(a, b, c, x, d);
    vf yv = vload(y2 + x);
    vf z2 = vsigmoid_pos(s) * yv + yv;
    vu w01 = bf16_pair(vload(z0 + x), vload(z1 + x)), w23 = bf16_pair(z2, s);
    __builtin_memcpy(p01 + x, &w01, sizeof(w01));
    __builtin_memcpy(p23 + x, &w23, sizeof(w23));
  }
  for (; x < W; ++x) {
    float s = dw.scalar(a, b, c, x, d);
    float z2 = ssigmoid(s) * y2[x] + y2[x];
    p01[x] = bf16_pair_s(z0[x], z1[x]);
    p23[x] = bf16_pair_s(z2, s);
  }
}

// out[co][p] = ReLU(bias[co] + sum_kp A[co][kp] . panel[kp][p]) + res[co][p] on AMX tiles.  Tiles 0-3: C (16
// co x 16 px fp32), 4-5: A (16 co x 16 pairs), 6-7: B (16 pairs x 16 px).  A block is NA x NB tiles of 16 x 16
// (up to 32 co x 32 px); the C tiles go through an L1 buffer into the fp32 epilogue, which stores only the
// block's real channels and pixels (masked), so neither a padded co nor a pixel past P is ever written.
struct GemmB {
  const uint32_t* panel; long ld;  // Kp pair rows of P words (readable up to P rounded up to 16)
  const uint32_t* wa; const float* bias;  // A tiles (AmxPacks)
  int Kp, cout, P;
  float* out; long out_cs;
  const float* res; long res_cs;
  int cb0 = 0, cb1 = 0;  // the co blocks [cb0, cb1) only (cb1 0: all)
  int lane_g = 0;        // nonzero: the A rows are lane-major (AmxPacks::get's lane_major), G = lane_g
  bool half = false;     // res and out are fp16 storage (res widened exactly; each result rounded to nearest)
};

static void amx_config() {
  struct { uint8_t palette, start; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  _tile_loadconfig(&cfg);
}

template <int NA, int NB>
static inline void amx_block(const GemmB& g, int cb, int p0, float* cbuf) {
  const int steps = g.Kp / 16;
  const long bstride = g.ld * 4;
  _tile_zero(0);
  if (NB > 1) _tile_zero(1);
  if (NA > 1) { _tile_zero(2); if (NB > 1) _tile_zero(3); }
  const uint32_t* a = g.wa + (long)cb * steps * 256;
  for (int st = 0; st < steps; ++st) {
    const uint32_t* b = g.panel + (long)st * 16 * g.ld + p0;
    _tile_loadd(4, a + st * 256, 64);
    _tile_loadd(6, b, bstride);
    _tile_dpbf16ps(0, 4, 6);
    if (NB > 1) { _tile_loadd(7, b + 16, bstride); _tile_dpbf16ps(1, 4, 7); }
    if (NA > 1) {
      _tile_loadd(5, a + (long)(steps + st) * 256, 64);
      _tile_dpbf16ps(2, 5, 6);
      if (NB > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, cbuf, 64);
  if (NB > 1) _tile_stored(1, cbuf + 256, 64);
  if (NA > 1) { _tile_stored(2, cbuf + 512, 64); if (NB > 1) _tile_stored(3, cbuf + 768, 64); }
  for (int i = 0; i < NA; ++i)
    for (int r = 0; r < 16; ++r) {
      const int row = (cb + i) * 16 + r;
      if (row >= g.cout) break;
      const int co = g.lane_g ? (row % 4) * g.lane_g + row / 4 : row;
      const vf bias = vset1(g.bias[co]);
      for (int j = 0; j < NB; ++j) {
        const int p = p0 + 16 * j;
        vf o = vmax0(vload(cbuf + (i * 2 + j) * 256 + r * 16) + bias);
        if (g.half) {
          _Float16* oh = reinterpret_cast<_Float16*>(g.out) + co * g.out_cs + p;
          const _Float16* rh = g.res ? reinterpret_cast<const _Float16*>(g.res) + co * g.res_cs + p : nullptr;
          const __mmask16 m = g.P - p >= 16 ? (__mmask16)0xFFFF : (__mmask16)tail_mask(g.P - p);
          if (rh) o += (vf)_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, rh));
          _mm256_mask_storeu_epi16(oh, m, _mm512_cvtps_ph((__m512)o, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
          continue;
        }
        float* op = g.out + co * g.out_cs + p;
        const float* rp = g.res ? g.res + co * g.res_cs + p : nullptr;
        if (g.P - p >= 16) {
          if (rp) o += vload(rp);
          vstore(op, o);
        } else {
          const vmask m = tail_mask(g.P - p);
          if (rp) o += vload_m(rp, m);
          vstore_m(op, o, m);
        }
      }
    }
}

static void gemm_amx(const GemmB& g, Scratch& s) {
  float* cbuf = s.get(13, 4 * 256);
  amx_config();
  const int cblocks = g.cb1 ? g.cb1 : (g.cout + 15) / 16;
  for (int p0 = 0; p0 < g.P; p0 += 32) {
    const bool two_p = g.P - p0 > 16;
    int cb = g.cb0;
    for (; cb + 2 <= cblocks; cb += 2) {
      if (two_p) amx_block<2, 2>(g, cb, p0, cbuf); else amx_block<2, 1>(g, cb, p0, cbuf);
    }
    if (cb < cblocks) {
      if (two_p) amx_block<1, 2>(g, cb, p0, cbuf); else amx_block<1, 1>(g, cb, p0, cbuf);
    }
  }
  _tile_release();
}
#endif

#ifdef EK_FP16
// ---------------------------------------------------------------------------------------------
// The GMBI depthwise chain in fp16 (AVX512-FP16: 32 lanes per zmm, twice the fp32 FMA rate, half the bytes), in
// the avx512amx library only, where the chain's z end as bf16 anyway: the lane's row buffers (x and the guided
// inputs u1..u3) and its z0..z2 rows are fp16, each stage's depthwise 3x3, bias, ReLU, sigmoid and the
// guidance / enhancement FMAs run in fp16, and stage 4 widens the four z to fp32 only to round them to the bf16
// pairs of the AMX panel.  fp16 keeps 11 significant bits (the bf16 z keep 8) and reaches 65504 (the published
// model's chain values stay below 30).  Every row runs as whole vectors of 32; the last one through masks, so
// nothing past W is read from x or written anywhere (the padded rows keep their zero columns).
typedef __m512h vh;
constexpr int HVW = 32;   // halves per vector
constexpr int PADH = 32;  // zero halves left of a row (>= the largest dilation; keeps rows 64-byte aligned)
// a padded fp16 row: PADH zeros, W values, zeros up to a whole vector past the last one (the taps of the last
// vector read up to 4 past it)
static inline int hstride(int W) { return PADH + ((W + HVW - 1) / HVW) * HVW + HVW; }
static inline __mmask32 hmask(int n) { return n >= HVW ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << n) - 1u); }
static inline vh hload(const _Float16* p) { return _mm512_loadu_ph(p); }
static inline vh hload_m(const _Float16* p, __mmask32 m) { return _mm512_castsi512_ph(_mm512_maskz_loadu_epi16(m, p)); }
static inline void hstore_m(_Float16* p, vh v, __mmask32 m) { _mm512_mask_storeu_epi16(p, m, _mm512_castph_si512(v)); }
static inline vh hset1(float x) { return _mm512_set1_ph((_Float16)x); }
// 32 floats (the lanes of m) -> 32 halves, round to nearest even
static inline vh h_from_f(const float* p, __mmask32 m) {
  const __m256h lo = _mm512_cvtxps_ph(_mm512_maskz_loadu_ps((__mmask16)m, p));
  const __m256h hi = _mm512_cvtxps_ph(_mm512_maskz_loadu_ps((__mmask16)(m >> 16), p + 16));
  return _mm512_castsi512_ph(_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_castph_si256(lo)), _mm256_castph_si256(hi), 1));
}
// the low / high 16 halves of v, widened (exactly) to fp32
static inline vf f_lo(vh v) { return (vf)_mm512_cvtxph_ps(_mm512_castph512_ph256(v)); }
static inline vf f_hi(vh v) {
  return (vf)_mm512_cvtxph_ps(_mm256_castsi256_ph(_mm512_extracti64x4_epi64(_mm512_castph_si512(v), 1)));
}

// fp16 storage of an activation buffer (EkOp.flags; the stem's GEMM epilogue rounds to it, nearest even, past
// 65504 -> inf): n halves widened (exactly) to n floats.  A masked tail: nothing past n is read or written.
static inline void f16_load_row(float* dst, const _Float16* src, int n) {
  int j = 0;
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j))));
  if (j < n) {
    const __mmask16 m = (__mmask16)((1u << (n - j)) - 1u);
    _mm512_mask_storeu_ps(dst + j, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, src + j)));
  }
}

// sigmoid(y), y >= 0, in fp16: e^-y = 2^t, t = -y log2(e), as scalef(2^f, round(t)), f in [-0.5, 0.5] (degree-4
// polynomial, 4e-5 relative, below fp16's 2^-11), then vrcpph.  y is clamped at 16 (sigmoid(16) rounds to 1 in
// fp16, and t stays far from fp16's overflow).  Max |error| over every finite fp16 y >= 0: 1.51 x 2^-11 (checked
// exhaustively against float64; tests/test_cpu_fused_amx.py's bound takes 2^-10).
static inline vh hsigmoid_pos(vh y) {
  y = _mm512_min_ph(y, hset1(16.0f));
  const vh t = _mm512_mul_ph(y, hset1(-1.44269504f));
  const vh n = _mm512_roundscale_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vh f = _mm512_sub_ph(t, n);
  vh p = hset1(9.618129e-3f);
  p = _mm512_fmadd_ph(p, f, hset1(5.550411e-2f));
  p = _mm512_fmadd_ph(p, f, hset1(2.402265e-1f));
  p = _mm512_fmadd_ph(p, f, hset1(6.931472e-1f));
  p = _mm512_fmadd_ph(p, f, hset1(1.0f));
  const vh e = _mm512_scalef_ph(p, n);
  return _mm512_rcp_ph(_mm512_add_ph(e, hset1(1.0f)));
}

// one channel's depthwise 3x3 (dilation d, + bias, ReLU) in fp16 at columns x..x+31 of three padded fp16 rows;
// the three tap rows accumulate apart (three chains of FMAs instead of one of nine)
struct Dw3x3h {
  vh w[9], vb;
  Dw3x3h(const float* w_, float bias) {
    for (int k = 0; k < 9; ++k) w[k] = hset1(w_[k]);
    vb = hset1(bias);
  }
  vh operator()(const _Float16* a, const _Float16* b, const _Float16* c, int x, int d) const {
    vh s0 = _mm512_fmadd_ph(w[0], hload(a + x - d), vb);
    vh s1 = _mm512_mul_ph(w[3], hload(b + x - d));
    vh s2 = _mm512_mul_ph(w[6], hload(c + x - d));
    s0 = _mm512_fmadd_ph(w[1], hload(a + x), s0);
    s1 = _mm512_fmadd_ph(w[4], hload(b + x), s1);
    s2 = _mm512_fmadd_ph(w[7], hload(c + x), s2);
    s0 = _mm512_fmadd_ph(w[2], hload(a + x + d), s0);
    s1 = _mm512_fmadd_ph(w[5], hload(b + x + d), s1);
    s2 = _mm512_fmadd_ph(w[8], hload(c + x + d), s2);
    return _mm512_max_ph(_mm512_add_ph(_mm512_add_ph(s0, s1), s2), _mm512_setzero_ph());
  }
};

// one row of stage 1-3 of a lane in fp16 (dw_stage_row's U, Y, Z, with U always): u = s xn + xn (xn: the next
// group's input row, fp32), y stored, zp = s zp + zp
// XH: xn points at fp16 storage (read as is) instead of floats (rounded to fp16 here: the same values)
template <bool Y, bool Z, bool XH = false>
static inline void dw_stage_row_h(_Float16* y, _Float16* u, _Float16* zp, const _Float16* a, const _Float16* b,
                                  const _Float16* c, const Dw3x3h& dw, const void* xn, int W, int d) {
  for (int x = 0; x < W; x += HVW) {
    const __mmask32 m = hmask(W - x);
    const vh s = dw(a, b, c, x, d);
    if (Y) hstore_m(y + x, s, m);
    const vh g = hsigmoid_pos(s);
    const vh xv = XH ? hload_m(static_cast<const _Float16*>(xn) + x, m) : h_from_f(static_cast<const float*>(xn) + x, m);
    hstore_m(u + x, _mm512_fmadd_ph(g, xv, xv), m);
    if (Z) { const vh zv = hload_m(zp + x, m); hstore_m(zp + x, _mm512_fmadd_ph(g, zv, zv), m); }
  }
}

// stage 4 of a lane in fp16: y3 = ReLU(dw) (= z3), z2 = sig(y3) y2 + y2, and the four z widened to fp32 and
// rounded to the two bf16-pair words per pixel of the AMX panel, p01 = (z0, z1), p23 = (z2, z3)
static inline void dw_stage4_bf16_row_h(uint32_t* p01, uint32_t* p23, const _Float16* z0, const _Float16* z1,
                                        const _Float16* y2, const _Float16* a, const _Float16* b, const _Float16* c,
                                        const Dw3x3h& dw, int W) {
  for (int x = 0; x < W; x += HVW) {
    const __mmask32 m = hmask(W - x);
    const vh s = dw(a, b, c, x, 4);
    const vh yv = hload_m(y2 + x, m);
    const vh z2 = _mm512_fmadd_ph(hsigmoid_pos(s), yv, yv);
    const vh v0 = hload_m(z0 + x, m), v1 = hload_m(z1 + x, m);
    const vu w01a = bf16_pair(f_lo(v0), f_lo(v1)), w23a = bf16_pair(f_lo(z2), f_lo(s));
    _mm512_mask_storeu_epi32(p01 + x, (__mmask16)m, (__m512i)w01a);
    _mm512_mask_storeu_epi32(p23 + x, (__mmask16)m, (__m512i)w23a);
    if (W - x > 16) {
      const vu w01b = bf16_pair(f_hi(v0), f_hi(v1)), w23b = bf16_pair(f_hi(z2), f_hi(s));
      _mm512_mask_storeu_epi32(p01 + x + 16, (__mmask16)(m >> 16), (__m512i)w01b);
      _mm512_mask_storeu_epi32(p23 + x + 16, (__mmask16)(m >> 16), (__m512i)w23b);
    }
  }
}

struct RowBufH {
  _Float16* base; int stride; int row0; const _Float16* zero;
  _Float16* row(int r) { return base + (long)(r - row0) * stride + PADH; }
  const _Float16* tap(int r, int H) const {
    return (r < 0 || r >= H) ? zero + PADH : base + (long)(r - row0) * stride + PADH;
  }
};
static RowBufH rowbuf_h(Scratch& s, int slot, int row0, int nrows, int W, const _Float16* zero) {
  const int st = hstride(W);
  _Float16* b = reinterpret_cast<_Float16*>(s.get(slot, ((size_t)st * std::max(nrows, 1) + 1) / 2));
  for (int r = 0; r < nrows; ++r) {  // zero the pad columns (the row itself is always written, through masks)
    std::memset(b + (long)r * st, 0, PADH * sizeof(_Float16));
    std::memset(b + (long)r * st + PADH + W, 0, (st - PADH - W) * sizeof(_Float16));
  }
  return RowBufH{b, st, row0, zero};
}
#endif  // EK_FP16

struct GmbiArgs {
  const float *x, *dw_w, *dw_b, *pw_wt, *pw_b; float* out;
  int N, C, H, W, band;
  float* z;  // two-phase mode: every image's z (N x C x zld floats); nullptr: banded mode
  long zld;
  // INT8 1x1 (wq non-null): weights, per-channel scales, 1 / s_z; the two-phase z is then N x G x zld words
  const uint32_t* wq; const float* qscale; float qinv;
  // AMX 1x1 (wa non-null): the weights as A tiles; the z panel is Kp pair rows of words (two-phase: N x Kp x zld)
  const uint32_t* wa;
  bool half = false;  // banded AMX mode only: x and out are fp16 storage (EkOp.flags X_HALF | OUT_HALF)
};

// The depthwise chain of lane c (channels c, G+c, 2G+c, 3G+c) of one image for output rows [r0, r1):
// z[(i G + c) * ld + (r - r0) W + x] = z_i.  Rows outside [r0, r1) that the dilations reach are recomputed
// (the halo: 10 rows of x, 9, 7, 4 of u1..u3).
// a.wq set: z0..z2 of the lane stay in this thread's scratch (4 rows of LD floats) and stage 4 writes the lane's
// quantized words to zq[c * LD + (r - r0) W + x] instead.  a.wa set (AMX): the same scratch, and stage 4 writes
// the lane's two bf16-pair words to zq[c * LD + ...] and zq[(G + c) * LD + ...].
static void gmbi_chain_lane(const GmbiArgs& a, const float* x, int c, int r0, int r1, float* z, long LD, Scratch& s,
                            uint32_t* zq = nullptr) {
  const int C = a.C, H = a.H, W = a.W, G = C / 4;
  const long HW = (long)H * W;
  (void)C;
  const float* zero = zero_row(s, W);
  auto lo = [&](int h) { return std::max(0, r0 - h); };
  auto hi = [&](int h) { return std::min(H, r1 + h); };
  const int x0a = lo(HALO_R1 + 1), x0b = hi(HALO_R1 + 1);
  const int a1 = lo(HALO_R1), b1 = hi(HALO_R1), a2 = lo(HALO_R2), b2 = hi(HALO_R2), a3 = lo(HALO_R3), b3 = hi(HALO_R3);
  RowBuf X0 = rowbuf(s, 2, x0a, x0b - x0a, W, zero);
  RowBuf U1 = rowbuf(s, 3, a1, b1 - a1, W, zero);
  RowBuf U2 = rowbuf(s, 4, a2, b2 - a2, W, zero);
  RowBuf U3 = rowbuf(s, 5, a3, b3 - a3, W, zero);
  {
    const float* xc[4];
    for (int i = 0; i < 4; ++i) xc[i] = x + (long)(i * G + c) * HW;
    float* zc[4];
    for (int i = 0; i < 4; ++i) zc[i] = zq ? z + (long)i * LD : z + (long)(i * G + c) * LD;
    const float* wts[4]; float bs[4];
    for (int i = 0; i < 4; ++i) { wts[i] = a.dw_w + (i * G + c) * 9; bs[i] = a.dw_b[i * G + c]; }
    for (int r = x0a; r < x0b; ++r) std::memcpy(X0.row(r), xc[0] + (long)r * W, W * sizeof(float));
    // Stage k+1 (dilation k+1) runs on its region (band + its halo); on band rows it also writes y_k into the
    // panel and, from stage 2 on, turns y_(k-1) there into z_(k-1) with the same sigmoid.
    const int ra[3] = {a1, a2, a3}, rb[3] = {b1, b2, b3};
    const RowBuf* src[3] = {&X0, &U1, &U2};
    RowBuf* dst[3] = {&U1, &U2, &U3};
    for (int k = 0; k < 3; ++k) {  // y_k, u_(k+1) = sig(y_k) x_(k+1) + x_(k+1)
      const int d = k + 1;
      for (int r = ra[k]; r < rb[k]; ++r) {
        const float *ta = src[k]->tap(r - d, H), *tb = src[k]->tap(r, H), *tc = src[k]->tap(r + d, H);
        const float* xn = xc[k + 1] + (long)r * W;
        float* u = dst[k]->row(r);
        const long o = (long)(r - r0) * W;
        if (r < r0 || r >= r1)  // halo row: only the guidance the next stage reads
          dw_stage_row<true, false, false>(nullptr, u, nullptr, ta, tb, tc, wts[k], bs[k], xn, W, d);
        else if (k == 0)
          dw_stage_row<true, true, false>(zc[0] + o, u, nullptr, ta, tb, tc, wts[0], bs[0], xn, W, d);
        else
          dw_stage_row<true, true, true>(zc[k] + o, u, zc[k - 1] + o, ta, tb, tc, wts[k], bs[k], xn, W, d);
      }
    }
#ifdef EK_AMX
    if (zq && a.wa) {  // stage 4 with the AMX 1x1: the lane's four z as two words of bf16 pairs per pixel
      for (int r = r0; r < r1; ++r) {
        const long o = (long)(r - r0) * W;
        dw_stage4_bf16_row(zq + (long)c * LD + o, zq + (long)(G + c) * LD + o, zc[0] + o, zc[1] + o, zc[2] + o,
                           U3.tap(r - 4, H), U3.tap(r, H), U3.tap(r + 4, H), wts[3], bs[3], W);
      }
      return;
    }
#endif
    if (zq) {  // stage 4 with the INT8 1x1: the lane's four z quantized into one word per pixel
      for (int r = r0; r < r1; ++r) {
        const long o = (long)(r - r0) * W;
        dw_stage4_q_row(zq + (long)c * LD + o, zc[0] + o, zc[1] + o, zc[2] + o, U3.tap(r - 4, H), U3.tap(r, H),
                        U3.tap(r + 4, H), wts[3], bs[3], a.qinv, W);
      }
      return;
    }
    for (int r = r0; r < r1; ++r)  // stage 4: y3 (= z3) on the band; z2 = sig(y3) y2 + y2
      dw_stage_row<false, true, true>(zc[3] + (long)(r - r0) * W, nullptr, zc[2] + (long)(r - r0) * W, U3.tap(r - 4, H),
                                      U3.tap(r, H), U3.tap(r + 4, H), wts[3], bs[3], nullptr, W, 4);
  }
}

#ifdef EK_FP16
// gmbi_chain_lane's AMX path with the chain in fp16 (see "The GMBI depthwise chain in fp16"): the same regions and
// halos, the row buffers fp16, the lane's z0..z2 in zh (3 rows of LD halves), and stage 4 writing the lane's two
// bf16-pair words to zq[c * LD + ...] and zq[(G + c) * LD + ...].
// XH: x is fp16 storage (GmbiArgs.half), passed as its first element's address
template <bool XH>
static void gmbi_chain_lane_h(const GmbiArgs& a, const void* x, int c, int r0, int r1, _Float16* zh, long LD,
                              Scratch& s, uint32_t* zq) {
  const int H = a.H, W = a.W, G = a.C / 4;
  const long HW = (long)H * W;
  const int st = hstride(W);
  _Float16* zero = reinterpret_cast<_Float16*>(s.get(14, (size_t)st / 2 + 1));
  std::memset(zero, 0, st * sizeof(_Float16));
  auto lo = [&](int h) { return std::max(0, r0 - h); };
  auto hi = [&](int h) { return std::min(H, r1 + h); };
  const int x0a = lo(HALO_R1 + 1), x0b = hi(HALO_R1 + 1);
  const int a1 = lo(HALO_R1), b1 = hi(HALO_R1), a2 = lo(HALO_R2), b2 = hi(HALO_R2), a3 = lo(HALO_R3), b3 = hi(HALO_R3);
  RowBufH X0 = rowbuf_h(s, 2, x0a, x0b - x0a, W, zero);
  RowBufH U1 = rowbuf_h(s, 3, a1, b1 - a1, W, zero);
  RowBufH U2 = rowbuf_h(s, 4, a2, b2 - a2, W, zero);
  RowBufH U3 = rowbuf_h(s, 5, a3, b3 - a3, W, zero);
  typedef typename std::conditional<XH, _Float16, float>::type XT;
  const XT* xc[4];
  for (int i = 0; i < 4; ++i) xc[i] = static_cast<const XT*>(x) + (long)(i * G + c) * HW;
  _Float16* zc[3] = {zh, zh + LD, zh + 2 * LD};
  const Dw3x3h dw[4] = {Dw3x3h(a.dw_w + c * 9, a.dw_b[c]), Dw3x3h(a.dw_w + (G + c) * 9, a.dw_b[G + c]),
                        Dw3x3h(a.dw_w + (2 * G + c) * 9, a.dw_b[2 * G + c]),
                        Dw3x3h(a.dw_w + (3 * G + c) * 9, a.dw_b[3 * G + c])};
  for (int r = x0a; r < x0b; ++r) {
    _Float16* row = X0.row(r);
    const XT* xr = xc[0] + (long)r * W;
    if (XH) {
      std::memcpy(row, xr, W * sizeof(_Float16));
      continue;
    }
    for (int j = 0; j < W; j += HVW) {
      const __mmask32 m = hmask(W - j);
      hstore_m(row + j, h_from_f(reinterpret_cast<const float*>(xr) + j, m), m);
    }
  }
  const int ra[3] = {a1, a2, a3}, rb[3] = {b1, b2, b3};
  const RowBufH* src[3] = {&X0, &U1, &U2};
  RowBufH* dst[3] = {&U1, &U2, &U3};
  for (int k = 0; k < 3; ++k) {  // y_k, u_(k+1) = sig(y_k) x_(k+1) + x_(k+1); on band rows z_(k-1) too
    const int d = k + 1;
    for (int r = ra[k]; r < rb[k]; ++r) {
      const _Float16 *ta = src[k]->tap(r - d, H), *tb = src[k]->tap(r, H), *tc = src[k]->tap(r + d, H);
      const XT* xn = xc[k + 1] + (long)r * W;
      _Float16* u = dst[k]->row(r);
      const long o = (long)(r - r0) * W;
      if (r < r0 || r >= r1)
        dw_stage_row_h<false, false, XH>(nullptr, u, nullptr, ta, tb, tc, dw[k], xn, W, d);
      else if (k == 0)
        dw_stage_row_h<true, false, XH>(zc[0] + o, u, nullptr, ta, tb, tc, dw[0], xn, W, d);
      else
        dw_stage_row_h<true, true, XH>(zc[k] + o, u, zc[k - 1] + o, ta, tb, tc, dw[k], xn, W, d);
    }
  }
  for (int r = r0; r < r1; ++r) {
    const long o = (long)(r - r0) * W;
    dw_stage4_bf16_row_h(zq + (long)c * LD + o, zq + (long)(G + c) * LD + o, zc[0] + o, zc[1] + o, zc[2] + o,
                         U3.tap(r - 4, H), U3.tap(r, H), U3.tap(r + 4, H), dw[3], W);
  }
}
#endif

// Banded mode: a task = (image, band of rows); the chain of every lane for the band (with its halo), then the
// 1x1 on the band's panel in this thread's scratch (L2-sized).
static void gmbi_task(const void* vctx, int task, Scratch& s) {
  const GmbiArgs& a = *static_cast<const GmbiArgs*>(vctx);
  const int C = a.C, H = a.H, W = a.W, G = C / 4;
  const int per = (H + a.band - 1) / a.band;
  int img, r0, r1;
  band_of(task, per, a.band, H, img, r0, r1);
  const long HW = (long)H * W;
  const float* x = a.x + (long)img * C * HW;
  float* out = a.out + (long)img * C * HW;
  const int P = (r1 - r0) * W;
  const long LD = panel_ld(P);
  if (a.wq) {  // INT8 1x1: a panel of G rows of words; each lane's float z only in a 4-row scratch
    uint32_t* zq = reinterpret_cast<uint32_t*>(s.get(1, (size_t)G * LD + VW));
    float* zf = s.get(0, (size_t)4 * LD + VW);
    for (int c = 0; c < G; ++c) gmbi_chain_lane(a, x, c, r0, r1, zf, LD, s, zq);
    GemmQ g{zq, LD, a.wq, a.qscale, a.pw_b, G, C, P, out + (long)r0 * W, HW, x + (long)r0 * W, HW};
    gemm_q(g, s);
    return;
  }
#ifdef EK_AMX
  if (a.wa) {  // AMX 1x1: a panel of Kp pair rows of words (the rows past 2G zero); each lane's float z in scratch
    const int Kp = amx_pairs(C);
    uint32_t* zw = reinterpret_cast<uint32_t*>(s.get(1, (size_t)Kp * LD + VW));
    if (Kp > 2 * G) std::memset(zw + (long)2 * G * LD, 0, (size_t)(Kp - 2 * G) * LD * sizeof(uint32_t));
    float* zf = s.get(0, (size_t)4 * LD + VW);
#ifdef EK_FP16
    if (a.half) {  // x and out in fp16: the same chain (it rounds x to fp16 anyway), the epilogue converts
      const _Float16* xh = reinterpret_cast<const _Float16*>(a.x) + (long)img * C * HW;
      _Float16* oh = reinterpret_cast<_Float16*>(a.out) + (long)img * C * HW;
#ifndef EK_PROFILE_NO_CHAIN
      for (int c = 0; c < G; ++c) gmbi_chain_lane_h<true>(a, xh, c, r0, r1, reinterpret_cast<_Float16*>(zf), LD, s, zw);
#endif
      GemmB g{zw, LD, a.wa, a.pw_b, Kp, C, P, reinterpret_cast<float*>(oh + (long)r0 * W), HW,
              reinterpret_cast<const float*>(xh + (long)r0 * W), HW};
      g.half = true;
#ifndef EK_PROFILE_NO_GEMM
      gemm_amx(g, s);
#endif
      return;
    }
#endif
#ifndef EK_PROFILE_NO_CHAIN
#ifdef EK_FP16
    for (int c = 0; c < G; ++c) gmbi_chain_lane_h<false>(a, x, c, r0, r1, reinterpret_cast<_Float16*>(zf), LD, s, zw);
#else
    for (int c = 0; c < G; ++c) gmbi_chain_lane(a, x, c, r0, r1, zf, LD, s, zw);
#endif
#endif
    GemmB g{zw, LD, a.wa, a.pw_b, Kp, C, P, out + (long)r0 * W, HW, x + (long)r0 * W, HW};
#ifndef EK_PROFILE_NO_GEMM
    gemm_amx(g, s);
#endif
    return;
  }
#endif
  float* z = s.get(0, (size_t)C * LD + VW);
#ifndef EK_PROFILE_NO_CHAIN
  for (int c = 0; c < G; ++c) gmbi_chain_lane(a, x, c, r0, r1, z, LD, s);
#endif
  Gemm g{z, LD, a.pw_wt, a.pw_b, C, C, P, out + (long)r0 * W, HW, x + (long)r0 * W, HW};
#ifndef EK_PROFILE_NO_GEMM
  gemm(g, s);
#endif
}

// Two-phase mode, for small images where a band's halo would cost more than its rows: phase 1, a task =
// (image, lane) over the whole image (no halo at all), into the shared z; phase 2, a task = (image, band of
// rows) of the 1x1 over z.
static void gmbi_lane_task(const void* vctx, int task, Scratch& s) {
  const GmbiArgs& a = *static_cast<const GmbiArgs*>(vctx);
  const int G = a.C / 4, img = task / G, c = task % G;
  const long HW = (long)a.H * a.W;
#ifdef EK_AMX
  if (a.wa) {
    uint32_t* zw = reinterpret_cast<uint32_t*>(a.z) + (long)img * amx_pairs(a.C) * a.zld;
    float* zf = s.get(0, (size_t)4 * a.zld + VW);
#ifdef EK_FP16
    gmbi_chain_lane_h<false>(a, a.x + (long)img * a.C * HW, c, 0, a.H, reinterpret_cast<_Float16*>(zf), a.zld, s, zw);
#else
    gmbi_chain_lane(a, a.x + (long)img * a.C * HW, c, 0, a.H, zf, a.zld, s, zw);
#endif
    return;
  }
#endif
  if (a.wq) {
    uint32_t* zq = reinterpret_cast<uint32_t*>(a.z) + (long)img * G * a.zld;
    float* zf = s.get(0, (size_t)4 * a.zld + VW);
    gmbi_chain_lane(a, a.x + (long)img * a.C * HW, c, 0, a.H, zf, a.zld, s, zq);
    return;
  }
  gmbi_chain_lane(a, a.x + (long)img * a.C * HW, c, 0, a.H, a.z + (long)img * a.C * a.zld, a.zld, s);
}

static void gmbi_pw_task(const void* vctx, int task, Scratch& s) {
  const GmbiArgs& a = *static_cast<const GmbiArgs*>(vctx);
  const int per = (a.H + a.band - 1) / a.band;
  int img, r0, r1;
  band_of(task, per, a.band, a.H, img, r0, r1);
  const long HW = (long)a.H * a.W, off = (long)r0 * a.W;
#ifdef EK_AMX
  if (a.wa) {
    const int Kp = amx_pairs(a.C);
    const uint32_t* zw = reinterpret_cast<const uint32_t*>(a.z) + (long)img * Kp * a.zld + off;
    GemmB g{zw, a.zld, a.wa, a.pw_b, Kp, a.C, (int)((r1 - r0) * a.W), a.out + (long)img * a.C * HW + off, HW,
            a.x + (long)img * a.C * HW + off, HW};
    gemm_amx(g, s);
    return;
  }
#endif
  if (a.wq) {
    const uint32_t* zq = reinterpret_cast<const uint32_t*>(a.z) + (long)img * (a.C / 4) * a.zld + off;
    GemmQ g{zq, a.zld, a.wq, a.qscale, a.pw_b, a.C / 4, a.C, (int)((r1 - r0) * a.W), a.out + (long)img * a.C * HW + off,
            HW, a.x + (long)img * a.C * HW + off, HW};
    gemm_q(g, s);
    return;
  }
  Gemm g{a.z + (long)img * a.C * a.zld + off, a.zld, a.pw_wt, a.pw_b, a.C, a.C, (int)((r1 - r0) * a.W),
         a.out + (long)img * a.C * HW + off, HW, a.x + (long)img * a.C * HW + off, HW};
  gemm(g, s);
}

#ifdef EK_AMX
// Two-phase with owned lanes (the AMX 1x1, 2+ threads): thread k keeps a run of lanes [c0, c1) (whole runs of 4,
// so that its channels are whole co blocks of the lane-major A rows) through both phases, for every image.
// Phase 1 runs the chains of its lanes into z; phase 2 the 1x1 for its lanes' output channels over the whole
// image: it reads all of z (half of it the other core wrote: 2 words per lane and pixel), but the residual x and
// the output only in its own channels, which its own phase 1 read and the next module's phase 1 on this thread
// reads (the same G in a stage).  The row-band 1x1 read and wrote every channel of its rows, half of them last
// touched by the other core.
static void owned_lanes(int k, int nthreads, int G, int& c0, int& c1) {
  const int runs = (G + 3) / 4;
  c0 = std::min(G, 4 * (k * runs / nthreads));
  c1 = std::min(G, 4 * ((k + 1) * runs / nthreads));
}

struct OwnedArgs { const GmbiArgs* a; int nthreads; };

static void gmbi_owned_lane_task(const void* vctx, int task, Scratch& s) {
  const OwnedArgs& o = *static_cast<const OwnedArgs*>(vctx);
  const GmbiArgs& a = *o.a;
  const int G = a.C / 4;
  int c0, c1;
  owned_lanes(task, o.nthreads, G, c0, c1);
  const long HW = (long)a.H * a.W;
  float* zf = s.get(0, (size_t)4 * a.zld + VW);
  for (int img = 0; img < a.N; ++img) {
    uint32_t* zw = reinterpret_cast<uint32_t*>(a.z) + (long)img * amx_pairs(a.C) * a.zld;
    for (int c = c0; c < c1; ++c) {
#ifdef EK_FP16
      gmbi_chain_lane_h<false>(a, a.x + (long)img * a.C * HW, c, 0, a.H, reinterpret_cast<_Float16*>(zf), a.zld, s, zw);
#else
      gmbi_chain_lane(a, a.x + (long)img * a.C * HW, c, 0, a.H, zf, a.zld, s, zw);
#endif
    }
  }
}

static void gmbi_owned_pw_task(const void* vctx, int task, Scratch& s) {
  const OwnedArgs& o = *static_cast<const OwnedArgs*>(vctx);
  const GmbiArgs& a = *o.a;
  const int G = a.C / 4, Kp = amx_pairs(a.C);
  int c0, c1;
  owned_lanes(task, o.nthreads, G, c0, c1);
  if (c1 <= c0) return;
  const long HW = (long)a.H * a.W;
  for (int img = 0; img < a.N; ++img) {
    GemmB g{reinterpret_cast<const uint32_t*>(a.z) + (long)img * Kp * a.zld, a.zld, a.wa, a.pw_b, Kp, a.C, (int)HW,
            a.out + (long)img * a.C * HW, HW, a.x + (long)img * a.C * HW, HW};
    g.cb0 = c0 / 4;            // rows 4 c0 .. 4 c1 - 1 of the lane-major A
    g.cb1 = (c1 + 3) / 4;      // (a last partial block stops at row C)
    g.lane_g = G;
    gemm_amx(g, s);
  }
}
#endif

static inline int nearest_src(int dst, float scale, int in) {
  // PyTorch's nearest: min(floor(dst * scale), in - 1), scale = float(in) / float(out)
  int s = (int)std::floor((float)dst * scale);
  return std::min(s, in - 1);
}

// --- head: 1x1 (cin -> cout) + sigmoid at d1's resolution, written straight into the nearest-upsampled output.
// x: row r0 of channel 0 of the band (rows of w1 floats, channels cs apart); out: this image's output.
struct HeadParams { const float *w, *b; int cin, cout, h1, w1, H, W; float sh, sw; };

static void head_band(const HeadParams& a, const float* x, long cs, int r0, int r1, float* out, Scratch& s) {
  const long HW = (long)a.H * a.W;
  float* prob = s.get(11, (size_t)a.w1 + VW);
  int* ix = reinterpret_cast<int*>(s.get(12, a.W));
  for (int j = 0; j < a.W; ++j) ix[j] = nearest_src(j, a.sw, a.w1);
  // output rows whose source row lies in the band: a contiguous range (the map is monotone)
  int oy0 = 0;
  while (oy0 < a.H && nearest_src(oy0, a.sh, a.h1) < r0) ++oy0;
  for (int co = 0; co < a.cout; ++co) {
    const float* wc = a.w + (long)co * a.cin;
    float* oc = out + (long)co * HW;
    int oy = oy0;
    for (int r = r0; r < r1; ++r) {
      const float* xr = x + (long)(r - r0) * a.w1;
      int j = 0;
      for (; j + VW <= a.w1; j += VW) {
        vf acc = vset1(a.b[co]);
        for (int c = 0; c < a.cin; ++c) acc += wc[c] * vload(xr + c * cs + j);
        vstore(prob + j, vsigmoid(acc));
      }
      for (; j < a.w1; ++j) {
        float acc = a.b[co];
        for (int c = 0; c < a.cin; ++c) acc += wc[c] * xr[c * cs + j];
        prob[j] = ssigmoid(acc);
      }
      for (; oy < a.H && nearest_src(oy, a.sh, a.h1) == r; ++oy) {
        float* o = oc + (long)oy * a.W;
        if (a.W == 2 * a.w1) {
          upsample2_row(o, prob, a.w1);
        } else {
          for (int q = 0; q < a.W; ++q) o[q] = prob[ix[q]];
        }
      }
    }
  }
}

struct HeadArgs { const float* x; float* out; HeadParams h; int N, band; };

static void head_task(const void* vctx, int task, Scratch& s) {
  const HeadArgs& a = *static_cast<const HeadArgs*>(vctx);
  const int per = (a.h.h1 + a.band - 1) / a.band;
  int img, r0, r1;
  band_of(task, per, a.band, a.h.h1, img, r0, r1);
  const long hw1 = (long)a.h.h1 * a.h.w1;
  head_band(a.h, a.x + (long)img * a.h.cin * hw1 + (long)r0 * a.h.w1, hw1, r0, r1,
            a.out + (long)img * a.h.cout * a.h.H * a.h.W, s);
}

// --- DW (stride 2, or stride 1 on low + up(high)) + PW, and PW alone.
enum { DWPW_S2 = 0, DWPW_UP = 1, PW_ONLY = 2 };

struct DwpwArgs {
  int mode;
  const float *x, *high, *dw_w, *dw_b, *pw_wt, *pw_b; float* out;
  int N, cin, cout, ho, wo, hi, wi, hh, wh; float sh, sw; int band;
  const HeadParams* head;  // non-null: DF1 + head, the DF output stays in scratch and out is the probability map
  bool x_half;             // x is stored as fp16 (EK_X_HALF; S2 / UP only, fp16-storage libraries only)
  bool out_half;           // out is stored as fp16 (EK_OUT_HALF; S2 only)
};

// even / odd columns of an input row: E[j] = in[2j] (j < wo), O[j+1] = in[2j+1], O[0] = 0, zero past the end.
static inline void deinterleave(const float* in, int wi, int wo, float* E, float* O) {
  O[0] = 0.0f;
  int j = 0;
  for (; 2 * (j + VW) <= wi; j += VW) {
    vf a = vload(in + 2 * j), b = vload(in + 2 * j + VW);
    vstore(E + j, vevens(a, b));
    vstore(O + j + 1, vodds(a, b));
  }
  for (; j < wo; ++j) {
    E[j] = in[2 * j];
    O[j + 1] = (2 * j + 1 < wi) ? in[2 * j + 1] : 0.0f;
  }
}

static void dwpw_task(const void* vctx, int task, Scratch& s) {
  const DwpwArgs& a = *static_cast<const DwpwArgs*>(vctx);
  const int per = (a.ho + a.band - 1) / a.band;
  int img, r0, r1;
  band_of(task, per, a.band, a.ho, img, r0, r1);
  const long HWo = (long)a.ho * a.wo, HWi = (long)a.hi * a.wi;
  const int P = (r1 - r0) * a.wo;
  const float* x = a.x + (long)img * a.cin * HWi;
#ifdef EK_FP16
  // x in fp16: every row this task reads is widened (exactly) into xrow first; the arithmetic stays fp32
  const _Float16* xh = a.x_half ? reinterpret_cast<const _Float16*>(a.x) + (long)img * a.cin * HWi : nullptr;
  float* xrow = a.x_half ? s.get(15, (size_t)a.wi + VW) : nullptr;
#endif
  float* out = a.out + (long)img * a.cout * HWo + (long)r0 * a.wo;
  if (a.mode == PW_ONLY) {  // the band of x is the panel: K rows of P pixels, channel stride HW
    Gemm g{x + (long)r0 * a.wi, HWi, a.pw_wt, a.pw_b, a.cin, a.cout, P, out, HWo, nullptr, 0};
    gemm(g, s);
    return;
  }
  const long LD = panel_ld(P);
  float* panel = s.get(0, (size_t)a.cin * LD + VW);
  if (a.mode == DWPW_S2) {
    float* E = s.get(1, a.wo + 2 * VW);
    float* O = s.get(2, a.wo + 1 + 2 * VW);
    for (int c = 0; c < a.cin; ++c) {
      const float* w = a.dw_w + c * 9; const float b = a.dw_b[c];
      const float* xc = x + (long)c * HWi;
      float* pc = panel + (long)c * LD;
      for (int r = r0; r < r1; ++r) {
        float* o = pc + (long)(r - r0) * a.wo;
        for (int j = 0; j < a.wo; ++j) o[j] = b;
        for (int ky = 0; ky < 3; ++ky) {
          int iy = 2 * r - 1 + ky;
          if (iy < 0 || iy >= a.hi) continue;
#ifdef EK_FP16
          if (xh) {
            f16_load_row(xrow, xh + (long)c * HWi + (long)iy * a.wi, a.wi);
            deinterleave(xrow, a.wi, a.wo, E, O);
          } else
#endif
          deinterleave(xc + (long)iy * a.wi, a.wi, a.wo, E, O);
          const float w0 = w[ky * 3], w1 = w[ky * 3 + 1], w2 = w[ky * 3 + 2];
          for (int j = 0; j < a.wo; ++j) o[j] += w0 * O[j] + w1 * E[j] + w2 * O[j + 1];
        }
        for (int j = 0; j < a.wo; ++j) o[j] = o[j] > 0.0f ? o[j] : 0.0f;
      }
    }
  } else {  // DWPW_UP: depthwise 3x3 (dil 1) of low + nearest-up(high), the sum built row by row
    const float* zero = zero_row(s, a.wo);
    RowBuf S = rowbuf(s, 3, std::max(0, r0 - 1), std::min(a.ho, r1 + 1) - std::max(0, r0 - 1), a.wo, zero);
    int* ix = reinterpret_cast<int*>(s.get(4, a.wo));
    for (int j = 0; j < a.wo; ++j) ix[j] = nearest_src(j, a.sw, a.wh);
    const float* high = a.high + (long)img * a.cin * a.hh * a.wh;
    const bool twice = (a.wh * 2 == a.wo);
    for (int c = 0; c < a.cin; ++c) {
      const float* lc = x + (long)c * HWi;
      const float* hc = high + (long)c * a.hh * a.wh;
      for (int r = S.row0; r < S.row0 + S.nrows; ++r) {
        float* d = S.row(r);
        const float* l = lc + (long)r * a.wi;
#ifdef EK_FP16
        if (xh) {
          f16_load_row(xrow, xh + (long)c * HWi + (long)r * a.wi, a.wi);
          l = xrow;
        }
#endif
        const float* h = hc + (long)nearest_src(r, a.sh, a.hh) * a.wh;
        if (twice) {
          upsample2_row(d, h, a.wh);
          for (int j = 0; j < a.wo; ++j) d[j] += l[j];
        } else {
          for (int j = 0; j < a.wo; ++j) d[j] = l[j] + h[ix[j]];
        }
      }
      float* pc = panel + (long)c * LD;
      for (int r = r0; r < r1; ++r)
        dw_row(pc + (long)(r - r0) * a.wo, S.tap(r - 1, a.ho), S.tap(r, a.ho), S.tap(r + 1, a.ho), a.dw_w + c * 9,
               a.dw_b[c], a.wo, 1);
    }
  }
  if (a.head) {
    float* d = s.get(5, (size_t)a.cout * LD + VW);
    Gemm g{panel, LD, a.pw_wt, a.pw_b, a.cin, a.cout, P, d, LD, nullptr, 0};
    gemm(g, s);
    head_band(*a.head, d, LD, r0, r1, a.out + (long)img * a.head->cout * a.head->H * a.head->W, s);
    return;
  }
#ifdef EK_FP16
  if (a.out_half) {  // S2 only: the epilogue rounds each result to fp16 as it stores it
    _Float16* oh = reinterpret_cast<_Float16*>(a.out) + (long)img * a.cout * HWo + (long)r0 * a.wo;
    Gemm g{panel, LD, a.pw_wt, a.pw_b, a.cin, a.cout, P, reinterpret_cast<float*>(oh), HWo, nullptr, 0};
    g.out_half = true;
    gemm(g, s);
    return;
  }
#endif
  Gemm g{panel, LD, a.pw_wt, a.pw_b, a.cin, a.cout, P, out, HWo, nullptr, 0};
  gemm(g, s);
}

// Non-finite values (NaN, +-inf) among p[0..n): exponent bits all ones, counted on the bits, so no float
// compare that a finite-math optimisation could fold away.
static inline long long count_nonfinite(const float* p, int n) {
  const vi abs_mask = (vi){} + 0x7fffffff, max_finite = (vi){} + 0x7f7fffff;
  vi neg = {};  // per lane, minus the count (a true vector compare is -1)
  int j = 0;
  for (; j + VW <= n; j += VW) {
    vi b;
    __builtin_memcpy(&b, p + j, sizeof(b));
    neg += (b & abs_mask) > max_finite;
  }
  long long c = 0;
  for (int l = 0; l < VW; ++l) c -= neg[l];
  for (; j < n; ++j) {
    uint32_t b;
    __builtin_memcpy(&b, p + j, sizeof(b));
    c += (b & 0x7fffffffu) > 0x7f7fffffu;
  }
  return c;
}

// --- stem: 3x3 stride-2 conv (+bias, ReLU) as im2col (cin*9 rows) of the band + GEMM.  It also counts the
// non-finite values of its input (the runner's finite check, folded into the one pass that reads every input
// value): the rows ky = 1 and ky = 2 of output row r read input rows 2r and 2r + 1, so counting at those two
// taps counts every input row exactly once (h1 = floor((H - 1) / 2) + 1 output rows cover rows 0 .. H - 1).
struct StemArgs { const float *x, *w, *b; float* out; int N, cin, cout, H, W, h1, w1, band;
                  std::atomic<long long>* nonfinite;
                  bool out_half; };  // out stored as fp16 (EK_OUT_HALF, fp16-storage libraries only)

static void stem_task(const void* vctx, int task, Scratch& s) {
  const StemArgs& a = *static_cast<const StemArgs*>(vctx);
  const int per = (a.h1 + a.band - 1) / a.band;
  int img, r0, r1;
  band_of(task, per, a.band, a.h1, img, r0, r1);
  const int P = (r1 - r0) * a.w1, K = a.cin * 9;
  const long HW = (long)a.H * a.W;
  const long LD = panel_ld(P);
  float* panel = s.get(0, (size_t)K * LD + VW);
  float* E = s.get(1, a.w1 + 2 * VW);
  float* O = s.get(2, a.w1 + 1 + 2 * VW);
  long long nonfinite = 0;
  for (int c = 0; c < a.cin; ++c) {
    const float* xc = a.x + ((long)img * a.cin + c) * HW;
    for (int r = r0; r < r1; ++r)
      for (int ky = 0; ky < 3; ++ky) {
        float* p0 = panel + (long)(c * 9 + ky * 3) * LD + (long)(r - r0) * a.w1;
        float* p1 = p0 + LD;
        float* p2 = p1 + LD;
        int iy = 2 * r - 1 + ky;
        if (iy < 0 || iy >= a.H) {
          std::memset(p0, 0, a.w1 * sizeof(float)); std::memset(p1, 0, a.w1 * sizeof(float));
          std::memset(p2, 0, a.w1 * sizeof(float));
          continue;
        }
        deinterleave(xc + (long)iy * a.W, a.W, a.w1, E, O);
        if (ky > 0) nonfinite += count_nonfinite(xc + (long)iy * a.W, a.W);  // the row is in L1 now
        std::memcpy(p0, O, a.w1 * sizeof(float));
        std::memcpy(p1, E, a.w1 * sizeof(float));
        std::memcpy(p2, O + 1, a.w1 * sizeof(float));
      }
  }
  if (nonfinite) a.nonfinite->fetch_add(nonfinite, std::memory_order_relaxed);
  const long HW1 = (long)a.h1 * a.w1;
#ifdef EK_FP16
  if (a.out_half) {  // the GEMM's epilogue rounds each result to fp16 as it stores it
    _Float16* outh = reinterpret_cast<_Float16*>(a.out) + (long)img * a.cout * HW1 + (long)r0 * a.w1;
    Gemm g{panel, LD, a.w, a.b, K, a.cout, P, reinterpret_cast<float*>(outh), HW1, nullptr, 0};
    g.out_half = true;
    gemm(g, s);
    return;
  }
#endif
  float* out = a.out + (long)img * a.cout * HW1 + (long)r0 * a.w1;
  Gemm g{panel, LD, a.w, a.b, K, a.cout, P, out, HW1, nullptr, 0};
  gemm(g, s);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// C interface (ctypes)

extern "C" {

// The op program: one planned layer per EkOp, its arguments a typed struct per op kind (named fields, no
// positions).  edgekit.kernels.cpu.runtime declares the same structs with ctypes and, at load, compares them
// field by field with ek_op_layout() below: a library whose structs differ is refused, never misread.
enum { GMBI_BANDED = 0, GMBI_TWO_PHASE = 1 };  // EkGmbiOp.mode
enum { OP_STEM = 0, OP_S2 = 1, OP_PW = 2, OP_UP = 3, OP_GMBI = 4, OP_HEAD = 5, OP_UP_HEAD = 6 };

struct EkStemOp {  // 3x3 stride-2 conv + ReLU: x (N x cin x H x W) -> out (N x cout x h1 x w1)
  const float *x, *w, *b; float* out;
  int32_t cin, cout, H, W, h1, w1;
};
struct EkDwpwOp {  // OP_S2 / OP_UP: depthwise 3x3 (+ nearest-up high) + 1x1; OP_PW: the 1x1 alone (dw_* unused)
  const float *x, *high, *dw_w, *dw_b, *pw_wt, *pw_b; float* out;
  int32_t cin, cout, ho, wo, hi, wi, hh, wh;
  float sh, sw;  // nearest scales of high -> the output size
};
struct EkUpHeadOp {  // DF1 + head in one pass: up.out is the probability map, DF1's output stays in scratch
  EkDwpwOp up;
  const float *head_w, *head_b;
  int32_t head_cout, H, W;
  float head_sh, head_sw;
};
struct EkGmbiOp {  // one GMBI module; pw_q non-null: the INT8 1x1 (packed s8 weights, per-channel scales, 1 / s_z)
  const float *x, *dw_w, *dw_b, *pw_wt, *pw_b; float* out;
  const uint32_t* pw_q; const float* pw_qscale;
  int32_t C, H, W, mode;
  float pw_qinv;
};
struct EkHeadOp {  // 1x1 + sigmoid at d1's resolution, nearest-upsampled into out (N x cout x H x W)
  const float *x, *w, *b; float* out;
  int32_t cin, cout, h1, w1, H, W;
  float sh, sw;
};
union EkOpArgs { EkStemOp stem; EkDwpwOp dwpw; EkUpHeadOp up_head; EkGmbiOp gmbi; EkHeadOp head; };
// EkOp.flags: which of the op's activation buffers are stored as fp16 (2 bytes a value, converted on load and
// store; the arithmetic is unchanged).  Only an fp16-storage library takes them (ek_half_storage_flags), and only
// where the kernel has the path: X_HALF on OP_S2 / OP_UP / OP_UP_HEAD (their x), OUT_HALF on OP_STEM and OP_S2,
// both (together) on a banded GMBI module with the AMX 1x1.
enum { EK_X_HALF = 1, EK_OUT_HALF = 2 };
// ek_half_storage_flags's capability bit beyond the flags: OUT_HALF on OP_S2 and X_HALF | OUT_HALF (both) on a
// banded OP_GMBI module whose 1x1 runs on AMX (stage 2's ping-pong buffers)
enum { EK_HALF_GMBI = 4 };
struct EkOp {
  int32_t kind, n, band, flags;  // kind: OP_*; n images; band: output rows per task; flags: EK_*_HALF
  EkOpArgs u;                  // the member named by kind
};

// "name:offset:size;" for every struct, every field and every kind code the Python side relies on
const char* ek_op_layout() {
  static const std::string text = [] {
    std::string s;
    auto add = [&s](const char* name, size_t a, size_t b) {
      s += name; s += ':'; s += std::to_string(a); s += ':'; s += std::to_string(b); s += ';';
    };
#define EK_STRUCT(S) add(#S, 0, sizeof(S))
#define EK_FIELD(S, f) add(#S "." #f, offsetof(S, f), sizeof(((S*)nullptr)->f))
    EK_STRUCT(EkStemOp);
    EK_FIELD(EkStemOp, x); EK_FIELD(EkStemOp, w); EK_FIELD(EkStemOp, b); EK_FIELD(EkStemOp, out);
    EK_FIELD(EkStemOp, cin); EK_FIELD(EkStemOp, cout); EK_FIELD(EkStemOp, H); EK_FIELD(EkStemOp, W);
    EK_FIELD(EkStemOp, h1); EK_FIELD(EkStemOp, w1);
    EK_STRUCT(EkDwpwOp);
    EK_FIELD(EkDwpwOp, x); EK_FIELD(EkDwpwOp, high); EK_FIELD(EkDwpwOp, dw_w); EK_FIELD(EkDwpwOp, dw_b);
    EK_FIELD(EkDwpwOp, pw_wt); EK_FIELD(EkDwpwOp, pw_b); EK_FIELD(EkDwpwOp, out);
    EK_FIELD(EkDwpwOp, cin); EK_FIELD(EkDwpwOp, cout); EK_FIELD(EkDwpwOp, ho); EK_FIELD(EkDwpwOp, wo);
    EK_FIELD(EkDwpwOp, hi); EK_FIELD(EkDwpwOp, wi); EK_FIELD(EkDwpwOp, hh); EK_FIELD(EkDwpwOp, wh);
    EK_FIELD(EkDwpwOp, sh); EK_FIELD(EkDwpwOp, sw);
    EK_STRUCT(EkUpHeadOp);
    EK_FIELD(EkUpHeadOp, up); EK_FIELD(EkUpHeadOp, head_w); EK_FIELD(EkUpHeadOp, head_b);
    EK_FIELD(EkUpHeadOp, head_cout); EK_FIELD(EkUpHeadOp, H); EK_FIELD(EkUpHeadOp, W);
    EK_FIELD(EkUpHeadOp, head_sh); EK_FIELD(EkUpHeadOp, head_sw);
    EK_STRUCT(EkGmbiOp);
    EK_FIELD(EkGmbiOp, x); EK_FIELD(EkGmbiOp, dw_w); EK_FIELD(EkGmbiOp, dw_b); EK_FIELD(EkGmbiOp, pw_wt);
    EK_FIELD(EkGmbiOp, pw_b); EK_FIELD(EkGmbiOp, out); EK_FIELD(EkGmbiOp, pw_q); EK_FIELD(EkGmbiOp, pw_qscale);
    EK_FIELD(EkGmbiOp, C); EK_FIELD(EkGmbiOp, H); EK_FIELD(EkGmbiOp, W); EK_FIELD(EkGmbiOp, mode);
    EK_FIELD(EkGmbiOp, pw_qinv);
    EK_STRUCT(EkHeadOp);
    EK_FIELD(EkHeadOp, x); EK_FIELD(EkHeadOp, w); EK_FIELD(EkHeadOp, b); EK_FIELD(EkHeadOp, out);
    EK_FIELD(EkHeadOp, cin); EK_FIELD(EkHeadOp, cout); EK_FIELD(EkHeadOp, h1); EK_FIELD(EkHeadOp, w1);
    EK_FIELD(EkHeadOp, H); EK_FIELD(EkHeadOp, W); EK_FIELD(EkHeadOp, sh); EK_FIELD(EkHeadOp, sw);
    EK_STRUCT(EkOpArgs);
    EK_FIELD(EkOpArgs, stem); EK_FIELD(EkOpArgs, dwpw); EK_FIELD(EkOpArgs, up_head); EK_FIELD(EkOpArgs, gmbi);
    EK_FIELD(EkOpArgs, head);
    EK_STRUCT(EkOp);
    EK_FIELD(EkOp, kind); EK_FIELD(EkOp, n); EK_FIELD(EkOp, band); EK_FIELD(EkOp, flags); EK_FIELD(EkOp, u);
#undef EK_FIELD
#undef EK_STRUCT
    add("kind.stem", OP_STEM, 0); add("kind.s2", OP_S2, 0); add("kind.pw", OP_PW, 0); add("kind.up", OP_UP, 0);
    add("kind.gmbi", OP_GMBI, 0); add("kind.head", OP_HEAD, 0); add("kind.up+head", OP_UP_HEAD, 0);
    add("flag.x_half", EK_X_HALF, 0); add("flag.out_half", EK_OUT_HALF, 0);
    add("gmbi_mode.banded", GMBI_BANDED, 0); add("gmbi_mode.two-phase", GMBI_TWO_PHASE, 0);
    return s;
  }();
  return text.c_str();
}

const char* ek_isa() { return EK_ISA; }
// 1: this library runs the GMBI 1x1 on AMX (built for it, and the OS granted the tile state); 0: fp32 everywhere
int ek_amx_active() {
#ifdef EK_AMX
  return amx_permitted() ? 1 : 0;
#else
  return 0;
#endif
}
int ek_vector_width() { return VW; }
// The EkOp.flags this library honours: fp16 storage of the stem's output and of the S2 / UP ops' input where the
// library converts with AVX512-FP16 (the avx512amx level); 0 elsewhere (any flag is then refused by ek_run).
int ek_half_storage_flags() {
#ifdef EK_FP16
  return EK_X_HALF | EK_OUT_HALF | (amx_permitted() ? EK_HALF_GMBI : 0);
#else
  return 0;
#endif
}
int ek_abi_version() { return 4; }  // 4: typed op structs (ek_op_layout)
void ek_gmbi_halos(int* out) { out[0] = HALO_R1; out[1] = HALO_R2; out[2] = HALO_R3; }

void* ek_pool_create(int threads) { return new Pool(threads); }
void ek_pool_destroy(void* p) { delete static_cast<Pool*>(p); }
int ek_pool_threads(void* p) { return static_cast<Pool*>(p)->nthreads; }
// The non-finite values (NaN, +-inf) the stem ops read in their input since the last call, each input value
// counted once, and zero the count: the runner's finite check (edgekit.backends.base.Runner.kernel_checks_finite).
// Read by the calling thread after ek_run returned (every task's count is added before its job completes).
long long ek_take_nonfinite_inputs(void* p) { return static_cast<Pool*>(p)->nonfinite_inputs.exchange(0); }

static double now_ms(bool cpu) {
  if (cpu) {  // CPU time of the calling thread: robust to preemption on a shared machine (1 thread only)
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
  }
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static DwpwArgs dwpw_args(int mode, const EkDwpwOp& o, int n, int band, const HeadParams* head) {
  return DwpwArgs{mode, o.x, o.high, o.dw_w, o.dw_b, o.pw_wt, o.pw_b, o.out, n, o.cin, o.cout, o.ho, o.wo, o.hi, o.wi,
                  o.hh, o.wh, o.sh, o.sw, band, head, false, false};
}

static void run_op(Pool& pool, const EkOp& op, double* ms, bool cpu) {
  double t0 = ms ? now_ms(cpu) : 0.0;
  switch (op.kind) {
    case OP_STEM: {
      const EkStemOp& o = op.u.stem;
      StemArgs a{o.x, o.w, o.b, o.out, op.n, o.cin, o.cout, o.H, o.W, o.h1, o.w1, op.band, &pool.nonfinite_inputs,
                 (op.flags & EK_OUT_HALF) != 0};
      pool.run(stem_task, &a, op.n * ((a.h1 + a.band - 1) / a.band));
      break;
    }
    case OP_S2: case OP_PW: case OP_UP: {
      const int mode = op.kind == OP_S2 ? DWPW_S2 : op.kind == OP_UP ? DWPW_UP : PW_ONLY;
      DwpwArgs a = dwpw_args(mode, op.u.dwpw, op.n, op.band, nullptr);
      a.x_half = (op.flags & EK_X_HALF) != 0;
      a.out_half = (op.flags & EK_OUT_HALF) != 0;
      pool.run(dwpw_task, &a, op.n * ((a.ho + a.band - 1) / a.band));
      break;
    }
    case OP_UP_HEAD: {
      const EkUpHeadOp& o = op.u.up_head;
      // the head reads DF1's output (cout channels at ho x wo) from the band's scratch
      HeadParams hp{o.head_w, o.head_b, o.up.cout, o.head_cout, o.up.ho, o.up.wo, o.H, o.W, o.head_sh, o.head_sw};
      DwpwArgs a = dwpw_args(DWPW_UP, o.up, op.n, op.band, &hp);
      a.x_half = (op.flags & EK_X_HALF) != 0;
      pool.run(dwpw_task, &a, op.n * ((a.ho + a.band - 1) / a.band));
      break;
    }
    case OP_GMBI: {
      const EkGmbiOp& o = op.u.gmbi;
      const bool q = o.pw_q != nullptr;
      GmbiArgs a{o.x, o.dw_w, o.dw_b, o.pw_wt, o.pw_b, o.out, op.n, o.C, o.H, o.W, op.band, nullptr, 0,
                 o.pw_q, q ? o.pw_qscale : nullptr, o.pw_qinv, nullptr};
#ifdef EK_AMX
      // two-phase, one image, on 2+ threads with at least a run of 4 lanes per thread: the owned-lanes cut.  A
      // batch keeps the crosswise cut: at batch 8 the owned one was 0.96x (per batch) and 0.90x (per image)
      const bool owned = !q && o.mode == GMBI_TWO_PHASE && op.n == 1 && pool.nthreads > 1 && pool.nthreads <= 32 &&
                         (o.C / 4 + 3) / 4 >= pool.nthreads;
      if (!q && amx_permitted()) a.wa = pool.amx.get(o.pw_wt, o.C, owned);
      a.half = op.flags != 0;  // ek_run let it through only for a banded AMX module with both flags
#endif
      if (o.mode == GMBI_TWO_PHASE) {
        a.zld = panel_ld(a.H * a.W);
        size_t rows = q ? a.C / 4 : a.C;
#ifdef EK_AMX
        if (a.wa) rows = amx_pairs(a.C);
#endif
        a.z = pool.shared_z((size_t)a.N * rows * a.zld + VW);
#ifdef EK_AMX
        if (a.wa && (int)rows > a.C / 2)  // the pair rows past 2G: zero (a tile multiplies them by zero weights)
          for (int i = 0; i < a.N; ++i)
            std::memset(a.z + ((long)i * rows + a.C / 2) * a.zld, 0, (rows - a.C / 2) * a.zld * sizeof(float));
#endif
#ifdef EK_AMX
        if (owned && a.wa) {
          const OwnedArgs oa{&a, pool.nthreads};
          pool.run_pinned(gmbi_owned_lane_task, &oa, pool.nthreads);
          pool.run_pinned(gmbi_owned_pw_task, &oa, pool.nthreads);
          break;
        }
#endif
        pool.run(gmbi_lane_task, &a, op.n * (a.C / 4));
        pool.run(gmbi_pw_task, &a, op.n * ((a.H + a.band - 1) / a.band));
      } else {
        pool.run(gmbi_task, &a, op.n * ((a.H + a.band - 1) / a.band));
      }
      break;
    }
    case OP_HEAD: {
      const EkHeadOp& o = op.u.head;
      HeadArgs a{o.x, o.out, HeadParams{o.w, o.b, o.cin, o.cout, o.h1, o.w1, o.H, o.W, o.sh, o.sw}, op.n, op.band};
      pool.run(head_task, &a, op.n * ((a.h.h1 + a.band - 1) / a.band));
      break;
    }
  }
  if (ms) *ms += now_ms(cpu) - t0;
}

// Run a planned sequence.  ms (optional, one per op) accumulates each op's wall time (cpu_clock: the
// calling thread's CPU time instead, meaningful at 1 thread).
int ek_run(void* pool, const EkOp* ops, int count, double* ms, int cpu_clock) {
  Pool& p = *static_cast<Pool*>(pool);
  for (int k = 0; k < count; ++k) {
    if (ops[k].kind < OP_STEM || ops[k].kind > OP_UP_HEAD || ops[k].band < 1) return -(k + 1);
    // a flag this library or this op kind has no fp16 path for: refused, never read as fp32
    const int kind = ops[k].kind, have = ek_half_storage_flags(), gmbi = (have & EK_HALF_GMBI) ? EK_OUT_HALF : 0;
    const int allowed = have & (kind == OP_STEM ? EK_OUT_HALF : kind == OP_S2 ? EK_X_HALF | gmbi
                                : (kind == OP_UP || kind == OP_UP_HEAD) ? EK_X_HALF : 0);
    if (kind == OP_GMBI && ops[k].flags) {  // both or none, banded, the AMX 1x1 (not INT8)
      const EkGmbiOp& g = ops[k].u.gmbi;
      if (!(have & EK_HALF_GMBI) || ops[k].flags != (EK_X_HALF | EK_OUT_HALF) || g.mode != GMBI_BANDED || g.pw_q)
        return -(k + 1);
    } else if (ops[k].flags & ~allowed) {
      return -(k + 1);
    }
    run_op(p, ops[k], ms ? ms + k : nullptr, cpu_clock != 0);
  }
  return 0;
}

}  // extern "C"
