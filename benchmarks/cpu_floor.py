"""This machine's floors for cpu-fused: instruction peaks and memory bandwidth, then each kernel's time against them.

    python benchmarks/cpu_floor.py peaks [--threads 1,2] [--reps 15] [--json OUT.json]
    python benchmarks/cpu_floor.py kernels ARTIFACT... [--threads 1,2] [--rounds 7] [--calls 9] [--stat min] [--json OUT.json]
    python benchmarks/cpu_floor.py table --peaks PEAKS.json... --bench BENCH_OR_KERNELS.json [--json OUT.json]

``peaks`` (a CPU with AVX512-FP16 and AMX: Sapphire Rapids or later): C micro-benchmarks (compiled here with g++
-march=sapphirerapids into a temporary folder, run one process per measurement,
on 1 and 2 threads at once, median of ``--reps`` repetitions; every thread runs the same loop on its own data and
the rate is the total over threads):

* ``fma_f32``: ``vfmadd231ps`` zmm, 16 independent accumulators (MAC/s = 16 lanes per instruction);
* ``fma_f16``: ``vfmadd231ph`` zmm, 16 accumulators (32 lanes: AVX512-FP16, the bf16 library's GMBI chain);
* ``dp_bf16``: ``vdpbf16ps`` zmm (32 MACs per instruction);
* ``int8_bw``: ``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd`` zmm (AVX512BW: the cpu-fused INT8 1x1's sequence,
  64 u8 x s8 MACs per three instructions), 8 independent accumulators;
* ``int8_vnni``: ``vpdpbusd`` zmm (AVX512-VNNI: the same 64 MACs in one instruction), 16 accumulators;
* ``amx_bf16``: ``TDPBF16PS``, four 16x16 fp32 accumulator tiles fed by two A and two B tiles (16x16x32 = 8192
  MACs per instruction; after ``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, as gmbinet_cpu.cpp);
* ``amx_int8``: ``TDPBUSD`` (u8 x s8, 16x16x64 = 16384 MACs per instruction), the same tiles;
* ``read`` / ``write`` / ``copy``: streaming zmm loads (summed into 8 accumulators), ordinary zmm stores (each
  line read for ownership first, as the kernels' stores), load + store; working set (all threads together,
  split evenly; copy: half source, half destination) 1 MiB per thread (L2: 2 MiB per core here), 8 MiB (past
  both L2s: the size of what one op of the network moves, in L3), 64 MiB (the VM reports a 480 MiB L3 shared
  with other guests, so partly L3) and 1 GiB (DRAM).  Bytes per second count every byte loaded or stored once
  (copy: read + written).

``kernels``: per-kernel times of several artifacts, interleaved in rounds (see ``kernels()``): at 1 thread CPU
time, which other tenants' preemption does not inflate, for a machine shared as this one is.

``table``: the per-kernel table.  For each kernel group of the network (stem, down2, GMBI 2, ... DF1+head), from
the artifact's own plan (``FusedNet.state``: buffer shapes and dtypes) and the per-kernel wall times of
``cpu_fused_bench.py --kernels`` (one entry per artifact and thread count):

* MACs: 3x3 / depthwise / 1x1 convolution multiply-adds only (no bias, ReLU, sigmoid: the floor is strict), split
  into the GMBI modules' 1x1s (AMX bf16 in the ``avx512amx`` library, u8 x s8 in an int8 artifact, fp32 FMA
  otherwise) and the rest (fp32 FMAs; the GMBI depthwise chain in fp16 in the ``avx512amx`` library);
* bytes: every activation buffer an op reads, once, plus every buffer it writes, once, at the plan's dtype
  (fp32), plus its parameters; not counted: re-reads (the residual, halos), the two-phase z round trip, scratch;
* compute floor = FMA MACs / FMA rate + 1x1 MACs / its unit's rate (one thread issues both, in turn);
  bandwidth floor = per op, bytes / copy rate of the level its bytes fit (<= 2 MiB (one L2) per thread: the L2
  rate; else the 8 MiB (L3) rate: the whole activation arena, 21 MB at 512x512, stays in L3 between ops), and
  in brackets the strict lower bound with every byte at the L2 rate;
* time / max(floors): how far the op is from the nearer of its two floors.

The rates the floors use are each measurement's best repetition (``--peak-stat max``, the default: on a shared
machine other tenants only ever lower a rate) or its median (``--peak-stat median``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 1 << 20
L2_PER_CORE = 2 * MIB  # this Xeon's (lscpu: 4 MiB in 2 instances)

SOURCE = r"""
#include <immintrin.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <ctime>
#include <string>
#include <vector>
#include <algorithm>

static double now() { timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static volatile float sink_f; static volatile int sink_i;

// ---- compute loops: `iters` iterations, returns MACs done
static double fma_f32(long iters) {
  __m512 a[16]; const __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < 16; ++i) a[i] = _mm512_set1_ps((float)i);
  for (long n = 0; n < iters; ++n)
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) a[i] = _mm512_fmadd_ps(a[i], x, y);
  __m512 s = a[0]; for (int i = 1; i < 16; ++i) s = _mm512_add_ps(s, a[i]);
  sink_f = _mm512_reduce_add_ps(s);
  return (double)iters * 16 * 16;
}
static double fma_f16(long iters) {
  __m512h a[16]; const __m512h x = _mm512_set1_ph((_Float16)0.999f), y = _mm512_set1_ph((_Float16)1e-3f);
  for (int i = 0; i < 16; ++i) a[i] = _mm512_set1_ph((_Float16)(0.01f * i));
  for (long n = 0; n < iters; ++n)
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) a[i] = _mm512_fmadd_ph(a[i], x, y);
  __m512h s = a[0]; for (int i = 1; i < 16; ++i) s = _mm512_add_ph(s, a[i]);
  sink_f = (float)_mm512_reduce_add_ph(s);
  return (double)iters * 16 * 32;
}
static double dp_bf16(long iters) {
  __m512 a[16]; const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), y = (__m512bh)_mm512_set1_epi32(0x33003300);
  for (int i = 0; i < 16; ++i) a[i] = _mm512_set1_ps((float)i);
  for (long n = 0; n < iters; ++n)
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) a[i] = _mm512_dpbf16_ps(a[i], x, y);
  __m512 s = a[0]; for (int i = 1; i < 16; ++i) s = _mm512_add_ps(s, a[i]);
  sink_f = _mm512_reduce_add_ps(s);
  return (double)iters * 16 * 32;
}
static double int8_bw(long iters) {  // the INT8 1x1's sequence (gmbinet_cpu.cpp q_dot4), 8 chains
  const __m512i w = _mm512_set1_epi8(-2), one = _mm512_set1_epi16(1);
#define EK_Q(k) __m512i a##k = _mm512_set1_epi32(k), z##k = _mm512_set1_epi8((char)(3 + k));
  EK_Q(0) EK_Q(1) EK_Q(2) EK_Q(3) EK_Q(4) EK_Q(5) EK_Q(6) EK_Q(7)
#undef EK_Q
  // z "changes" every iteration (as the panel loads do): the empty asm stops hoisting and costs no instruction
#define EK_Q(k) __asm__("" : "+v"(z##k)); a##k = _mm512_add_epi32(a##k, _mm512_madd_epi16(_mm512_maddubs_epi16(z##k, w), one));
  for (long n = 0; n < iters; ++n) { EK_Q(0) EK_Q(1) EK_Q(2) EK_Q(3) EK_Q(4) EK_Q(5) EK_Q(6) EK_Q(7) }
#undef EK_Q
  __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
                               _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)));
  sink_i = _mm512_reduce_add_epi32(s);
  return (double)iters * 8 * 64;
}
static double int8_vnni(long iters) {
  __m512i a[16]; const __m512i z = _mm512_set1_epi8(3), w = _mm512_set1_epi8(-2);
  for (int i = 0; i < 16; ++i) a[i] = _mm512_set1_epi32(i);
  for (long n = 0; n < iters; ++n)
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) a[i] = _mm512_dpbusd_epi32(a[i], z, w);
  __m512i s = a[0]; for (int i = 1; i < 16; ++i) s = _mm512_add_epi32(s, a[i]);
  sink_i = _mm512_reduce_add_epi32(s);
  return (double)iters * 16 * 64;
}

struct TileCfg { uint8_t palette, start; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };
static void tile_config() {
  TileCfg c; std::memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; ++t) { c.colsb[t] = 64; c.rows[t] = 16; }
  _tile_loadconfig(&c);
}
alignas(64) static uint8_t tile_src[16 * 64];
static double amx_bf16(long iters) {
  tile_config();
  for (int i = 0; i < 16 * 64; i += 2) { tile_src[i] = 0x80; tile_src[i + 1] = 0x3f; }
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_loadd(4, tile_src, 64); _tile_loadd(5, tile_src, 64); _tile_loadd(6, tile_src, 64); _tile_loadd(7, tile_src, 64);
  for (long n = 0; n < iters; ++n) {
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float out[16 * 16];
  _tile_stored(0, out, 64); sink_f = out[0];
  _tile_release();
  return (double)iters * 4 * 16 * 16 * 32;
}
static double amx_int8(long iters) {
  tile_config();
  std::memset(tile_src, 1, sizeof tile_src);
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_loadd(4, tile_src, 64); _tile_loadd(5, tile_src, 64); _tile_loadd(6, tile_src, 64); _tile_loadd(7, tile_src, 64);
  for (long n = 0; n < iters; ++n) {
    _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
  }
  alignas(64) int32_t out[16 * 16];
  _tile_stored(0, out, 64); sink_i = out[0];
  _tile_release();
  return (double)iters * 4 * 16 * 16 * 64;
}

// ---- memory loops over a thread's own buffer(s), `passes` times; returns bytes moved
static double mem_read(float* a, float*, size_t n, long passes) {
  __m512 s[8]; for (int i = 0; i < 8; ++i) s[i] = _mm512_setzero_ps();
  for (long p = 0; p < passes; ++p)
    for (size_t i = 0; i < n; i += 128)
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) s[j] = _mm512_add_ps(s[j], _mm512_load_ps(a + i + 16 * j));
  __m512 t = s[0]; for (int i = 1; i < 8; ++i) t = _mm512_add_ps(t, s[i]);
  sink_f = _mm512_reduce_add_ps(t);
  return (double)passes * n * 4;
}
static double mem_write(float* a, float*, size_t n, long passes) {
  for (long p = 0; p < passes; ++p) {
    const __m512 v = _mm512_set1_ps((float)p);
    for (size_t i = 0; i < n; i += 64) {
      _mm512_store_ps(a + i, v); _mm512_store_ps(a + i + 16, v); _mm512_store_ps(a + i + 32, v); _mm512_store_ps(a + i + 48, v);
    }
    __asm__ __volatile__("" ::: "memory");
  }
  return (double)passes * n * 4;
}
static double mem_copy(float* a, float* b, size_t n, long passes) {
  for (long p = 0; p < passes; ++p) {
    for (size_t i = 0; i < n; i += 64) {
      __m512 x0 = _mm512_load_ps(a + i), x1 = _mm512_load_ps(a + i + 16), x2 = _mm512_load_ps(a + i + 32),
             x3 = _mm512_load_ps(a + i + 48);
      _mm512_store_ps(b + i, x0); _mm512_store_ps(b + i + 16, x1); _mm512_store_ps(b + i + 32, x2); _mm512_store_ps(b + i + 48, x3);
    }
    __asm__ __volatile__("" ::: "memory");
  }
  return (double)passes * n * 8;
}

struct Job { std::string test; long work; size_t floats; float* a; float* b; double done, t0, t1; };
static pthread_barrier_t start_bar, end_bar;
static int reps;
static void* worker(void* p) {
  Job* j = (Job*)p;
  for (int r = 0; r < reps + 1; ++r) {  // rep 0: warm-up (page faults, clocks)
    pthread_barrier_wait(&start_bar);
    j->t0 = now();  // timed here: the main thread may wake from the barrier after a short job has ended
    const std::string& t = j->test;
    double d = 0;
    if (t == "fma_f32") d = fma_f32(j->work);
    else if (t == "fma_f16") d = fma_f16(j->work);
    else if (t == "dp_bf16") d = dp_bf16(j->work);
    else if (t == "int8_bw") d = int8_bw(j->work);
    else if (t == "int8_vnni") d = int8_vnni(j->work);
    else if (t == "amx_bf16") d = amx_bf16(j->work);
    else if (t == "amx_int8") d = amx_int8(j->work);
    else if (t == "read") d = mem_read(j->a, j->b, j->floats, j->work);
    else if (t == "write") d = mem_write(j->a, j->b, j->floats, j->work);
    else if (t == "copy") d = mem_copy(j->a, j->b, j->floats, j->work);
    j->done = d;
    j->t1 = now();
    pthread_barrier_wait(&end_bar);
  }
  return nullptr;
}

// usage: floor TEST THREADS WORK WORKING_SET_BYTES REPS -> one JSON line: per-rep total rate (units per s)
int main(int argc, char** argv) {
  if (argc != 6) { std::fprintf(stderr, "usage: %s TEST THREADS WORK BYTES REPS\n", argv[0]); return 2; }
  std::string test = argv[1];
  int threads = std::atoi(argv[2]); long work = std::atol(argv[3]); size_t bytes = std::strtoull(argv[4], 0, 10);
  reps = std::atoi(argv[5]);
  if (test.rfind("amx", 0) == 0 && syscall(SYS_arch_prctl, 0x1023, 18) != 0) {  // ARCH_REQ_XCOMP_PERM, XTILEDATA
    std::printf("{\"error\": \"arch_prctl(ARCH_REQ_XCOMP_PERM) refused\"}\n"); return 1;
  }
  std::vector<Job> jobs(threads);
  for (int t = 0; t < threads; ++t) {
    size_t per = bytes / threads;
    if (test == "copy") per /= 2;
    size_t floats = (per / 4) / 128 * 128;
    jobs[t] = {test, work, floats, nullptr, nullptr, 0, 0, 0};
    if (floats) {
      jobs[t].a = (float*)aligned_alloc(64, floats * 4); std::memset(jobs[t].a, 1, floats * 4);
      jobs[t].b = (float*)aligned_alloc(64, floats * 4); std::memset(jobs[t].b, 1, floats * 4);
    }
  }
  pthread_barrier_init(&start_bar, nullptr, threads + 1);
  pthread_barrier_init(&end_bar, nullptr, threads + 1);
  std::vector<pthread_t> th(threads);
  for (int t = 0; t < threads; ++t) pthread_create(&th[t], nullptr, worker, &jobs[t]);
  std::printf("{\"test\": \"%s\", \"threads\": %d, \"bytes\": %zu, \"rates\": [", test.c_str(), threads, bytes);
  for (int r = 0; r < reps + 1; ++r) {
    pthread_barrier_wait(&start_bar);
    pthread_barrier_wait(&end_bar);
    double t0 = jobs[0].t0, t1 = jobs[0].t1, total = 0;
    for (auto& j : jobs) { total += j.done; t0 = std::min(t0, j.t0); t1 = std::max(t1, j.t1); }
    double el = t1 - t0;
    if (r > 0) std::printf("%s%.6g", r > 1 ? ", " : "", total / el);
  }
  std::printf("]}\n");
  for (int t = 0; t < threads; ++t) pthread_join(th[t], nullptr);
  return 0;
}
"""

FLAGS = ("-O3", "-std=c++17", "-march=sapphirerapids", "-mtune=sapphirerapids", "-lpthread")
# test -> (work per thread per repetition, what the rate counts)
COMPUTE = {"fma_f32": (4_000_000, "MAC/s"), "fma_f16": (4_000_000, "MAC/s"), "dp_bf16": (4_000_000, "MAC/s"),
           "int8_bw": (8_000_000, "MAC/s"), "int8_vnni": (4_000_000, "MAC/s"),
           "amx_bf16": (2_000_000, "MAC/s"), "amx_int8": (2_000_000, "MAC/s")}
MEMORY = ("read", "write", "copy")
# L2: 1 MiB per thread; 8 MiB: past both L2s, the size of what the network's ops move (L3); 64 MiB; 1 GiB: DRAM
LEVELS = {"L2": None, "8MiB": 8 * MIB, "64MiB": 64 * MIB, "1GiB": 1024 * MIB}
L3_LEVEL_MAX = 32 * MIB  # an op moving more than this would be timed against the 64 MiB rate (none at 512x512)
MOVE_BYTES = 1024 * MIB  # bytes each memory repetition moves per thread (passes = this / buffer)


def build(tmp: Path) -> Path:
    src, exe = tmp / "floor.cpp", tmp / "floor"
    src.write_text(SOURCE)
    subprocess.run(["g++", str(src), "-o", str(exe), *FLAGS], check=True)
    return exe


def run_one(exe: Path, test: str, threads: int, work: int, nbytes: int, reps: int) -> dict:
    out = subprocess.run([str(exe), test, str(threads), str(work), str(nbytes), str(reps)], capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"error: {test} on {threads} thread(s): {out.stdout.strip() or out.stderr.strip()}")
    rec = json.loads(out.stdout)
    rates = rec["rates"]
    return {"test": test, "threads": threads, "bytes": nbytes, "reps": len(rates), "median": statistics.median(rates),
            "min": min(rates), "max": max(rates), "rates": rates}


def peaks(args) -> dict:
    from edgekit.kernels.cpu.runtime import cpu_description

    threads = [int(t) for t in args.threads.split(",")]
    res = {"command": " ".join(["python", "benchmarks/cpu_floor.py", *sys.argv[1:]]),
           "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "cpu": {"model": cpu_description(), "logical_cpus": len(os.sched_getaffinity(0)),
                   "platform": platform.platform()},
           "load_average_before": os.getloadavg(), "compute": [], "memory": []}
    with tempfile.TemporaryDirectory(prefix="cpu_floor_") as tmp:
        exe = build(Path(tmp))
        for t in threads:
            for test, (work, unit) in COMPUTE.items():
                r = run_one(exe, test, t, work, 0, args.reps)
                r["unit"] = unit
                res["compute"].append(r)
                print(f"{test:<10} {t} thr  {r['median'] / 1e9:9.1f} G{unit}  ({r['min'] / 1e9:.1f}-{r['max'] / 1e9:.1f})",
                      file=sys.stderr, flush=True)
            for level, size in LEVELS.items():
                nbytes = (1 * MIB * t) if size is None else size
                for test in MEMORY:
                    per = nbytes // t // (2 if test == "copy" else 1)
                    passes = max(1, MOVE_BYTES // (per * (2 if test == "copy" else 1)))
                    r = run_one(exe, test, t, passes, nbytes, args.reps)
                    r.update(level=level, unit="B/s")
                    res["memory"].append(r)
                    print(f"{test:<10} {t} thr  {level:<6} {nbytes / MIB:6.0f} MiB  {r['median'] / 1e9:7.1f} GB/s  "
                          f"({r['min'] / 1e9:.1f}-{r['max'] / 1e9:.1f})", file=sys.stderr, flush=True)
    res["load_average_after"] = os.getloadavg()
    return res


def print_peaks(res: dict) -> None:
    threads = sorted({r["threads"] for r in res["compute"]})
    print("| peak (median of reps) | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in threads) + " |")
    print("|---|" + "---|" * len(threads))
    for test in COMPUTE:
        cells = [next(r for r in res["compute"] if r["test"] == test and r["threads"] == t) for t in threads]
        print(f"| {test} | " + " | ".join(f"{c['median'] / 1e9:.1f} GMAC/s ({c['min'] / 1e9:.1f}-{c['max'] / 1e9:.1f})"
                                        for c in cells) + " |")
    for level in LEVELS:
        for test in MEMORY:
            cells = [next(r for r in res["memory"] if r["test"] == test and r["threads"] == t and r["level"] == level)
                     for t in threads]
            print(f"| {test} {level} | " + " | ".join(
                f"{c['median'] / 1e9:.1f} GB/s ({c['min'] / 1e9:.1f}-{c['max'] / 1e9:.1f})" for c in cells) + " |")


# ----------------------------------------------------------------------------------------------
# the per-kernel table

GROUP_ORDER = ("stem", "down2", "gmbi2", "down3", "gmbi3", "down4", "gmbi4", "down5", "gmbi5", "decoder5", "DF4",
               "DF3", "DF2", "DF1+head")


def group_of(names) -> str:
    key = "+".join(names)
    return key.split("_")[0] if key.startswith("gmbi") else key


def kernel_work(artifact: str, height: int = 512, width: int = 512) -> dict:
    """``count_work`` for a cpu-fused artifact at batch 1, with the ISA its runner picks here."""
    from edgekit import runtime

    runner = runtime.load(artifact, threads=1)
    fused = runner.fused
    plan, _, _, layers = fused.state(1, height, width)
    return {"isa": runner.isa, **count_work(plan, fused.offsets, layers)}


def count_work(plan, offsets, layers) -> dict:
    """{"int8", "groups": {group: {"fma_macs", "gmbi_dw_macs", "pw1x1_macs", "bytes", "op_bytes", ...}}} for a plan
    (``plan_gmbinet``), its parameter offsets and the program's ops (``build_program``'s layer names per op); see the
    module docstring for the counting rule.  Needs no library: the program is built from addresses only."""
    from edgekit.kernels.graph import KERNEL_ARGS

    launches = {ln.layer: ln for ln in plan.launches}
    work = {}
    for names in layers:
        g = group_of(names)
        w = work.setdefault(g, {"fma_macs": 0, "gmbi_dw_macs": 0, "pw1x1_macs": 0, "bytes": 0, "op_bytes": [],
                                "buffers_read": [], "buffers_written": []})
        lns = [launches[n] for n in names]
        op_read, op_written, op_bytes = [], [], 0
        for ln in lns:
            a = dict(zip(KERNEL_ARGS[ln.kind], [v for _, v in ln.args]))
            # parameters: every array of the layer, once
            op_bytes += sum(nb for k, (_, nb) in offsets.items() if k.split(".")[0] == ln.layer)
            if ln.kind == "stem":
                w["fma_macs"] += a["cin"] * 9 * a["cout"] * a["h1"] * a["w1"]
            elif ln.kind in ("s2", "up"):
                px = a["ho"] * a["wo"]
                w["fma_macs"] += a["cin"] * 9 * px + a["cin"] * a["cout"] * px
            elif ln.kind == "pw":
                w["fma_macs"] += a["cin"] * a["cout"] * a["ho"] * a["wo"]
            elif ln.kind == "gmbi":
                px = a["H"] * a["W"]
                w["gmbi_dw_macs"] += a["C"] * 9 * px
                w["pw1x1_macs"] += a["C"] * a["C"] * px
            elif ln.kind == "head":
                w["fma_macs"] += a["cin"] * a["cout"] * a["h1"] * a["w1"]
            op_read += [a["x"]] + ([a["high"]] if ln.kind == "up" else [])
            op_written.append(a["out"])
        # DF1+head as one op: DF1's output stays in the band's scratch, neither written nor read back
        inner = set(op_written) & set(op_read)
        op_read = [b for b in dict.fromkeys(op_read) if b not in inner]
        op_written = [b for b in dict.fromkeys(op_written) if b not in inner]
        w["buffers_read"] += op_read
        w["buffers_written"] += op_written
        op_bytes += sum(plan.buffers[b].nbytes for b in op_read + op_written)
        w["op_bytes"].append(op_bytes)
        w["bytes"] += op_bytes
    return {"int8": any(k.endswith(".pw_q") for k in offsets), "groups": work}


PEAK_STAT = ["max"]  # table --peak-stat


def rate(peaks_res: dict, test: str, threads: int, level: str = None) -> float:
    rows = peaks_res["memory" if level else "compute"]
    return next(r[PEAK_STAT[0]] for r in rows if r["test"] == test and r["threads"] == threads
                and (level is None or r["level"] == level))


def table(args) -> dict:
    # several peak files: a later file's measurement replaces an earlier one's of the same test, threads and level
    peaks_res, merged = {"compute": [], "memory": []}, {}
    for path in args.peaks:
        rec = json.loads(Path(path).read_text())
        for part in ("compute", "memory"):
            for r in rec[part]:
                merged[(part, r["test"], r["threads"], r.get("level"))] = {**r, "from": path}
    for (part, *_), r in merged.items():
        peaks_res[part].append(r)
    bench = json.loads(Path(args.bench).read_text())
    out = {"peaks": args.peaks, "peak_rates_used": peaks_res, "bench": args.bench, "bench_date_utc": bench.get("date_utc"), "tables": []}
    works = {}
    for prof in bench["kernels"]:
        art, t = prof["artifact"], prof["threads"]
        if art not in works:
            works[art] = kernel_work(art)
        wk = works[art]
        isa = prof["isa"]
        int8 = wk["int8"]
        unit = "amx_bf16" if isa == "avx512amx" else ("int8_bw" if int8 else "fma_f32")
        dw_unit = "fma_f16" if isa == "avx512amx" else "fma_f32"
        l2_bytes = L2_PER_CORE * t
        rows = []
        for g in GROUP_ORDER:
            w = wk["groups"].get(g)
            ms = prof["per_group_median_ms"].get(g)
            if w is None or ms is None:
                continue
            fma_s = w["fma_macs"] / rate(peaks_res, "fma_f32", t) + w["gmbi_dw_macs"] / rate(peaks_res, dw_unit, t)
            pw_s = w["pw1x1_macs"] / rate(peaks_res, unit, t)
            # per op: the L2 rate if its bytes fit the L2 of the cores it runs on, else the 8 MiB (L3) rate
            levels = ["L2" if b <= l2_bytes else ("8MiB" if b <= L3_LEVEL_MAX else "64MiB") for b in w["op_bytes"]]
            bw_s = sum(b / rate(peaks_res, "copy", t, lv) for b, lv in zip(w["op_bytes"], levels))
            bw_l2_s = sum(b / rate(peaks_res, "copy", t, "L2") for b in w["op_bytes"])
            level = "/".join(sorted(set(levels)))
            floor_ms = 1e3 * max(fma_s + pw_s, bw_s)
            rows.append({"group": g, "ms": ms, "fma_macs": w["fma_macs"] + w["gmbi_dw_macs"],
                         "pw1x1_macs": w["pw1x1_macs"], "pw1x1_unit": unit, "dw_unit": dw_unit, "bytes": w["bytes"],
                         "level": level, "compute_floor_ms": 1e3 * (fma_s + pw_s), "fma_floor_ms": 1e3 * fma_s,
                         "pw1x1_floor_ms": 1e3 * pw_s, "bw_floor_ms": 1e3 * bw_s, "bw_floor_all_l2_ms": 1e3 * bw_l2_s,
                         "bound": "compute" if fma_s + pw_s >= bw_s else "bandwidth",
                         "x_floor": ms / floor_ms})
        tot = {k: sum(r[k] for r in rows) for k in ("ms", "fma_macs", "pw1x1_macs", "bytes", "compute_floor_ms",
                                                   "fma_floor_ms", "pw1x1_floor_ms", "bw_floor_ms", "bw_floor_all_l2_ms")}
        tot["sum_of_max_floors_ms"] = sum(max(r["compute_floor_ms"], r["bw_floor_ms"]) for r in rows)
        out["tables"].append({"artifact": art, "isa": isa, "int8": int8, "threads": t, "rows": rows, "total": tot})
    return out


def print_table(res: dict) -> None:
    for tb in res["tables"]:
        kind = "int8 1x1" if tb["int8"] else ("bf16 1x1 on AMX" if tb["isa"] == "avx512amx" else "fp32")
        print(f"\n{tb['artifact']}: {tb['isa']} ({kind}), {tb['threads']} thread(s), batch 1, 512x512")
        print("| kernel | wall ms | FMA MMAC | 1x1 MMAC (unit) | MB moved (level) | FMA floor ms | 1x1 floor ms | "
              "BW floor ms (all at L2 rate) | time / max(floors) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in tb["rows"]:
            unit = {"amx_bf16": "AMX", "int8_bw": "u8s8", "fma_f32": "FMA"}[r["pw1x1_unit"]] if r["pw1x1_macs"] else "-"
            print(f"| {r['group']} | {r['ms']:.3f} | {r['fma_macs'] / 1e6:.1f} | "
                  f"{r['pw1x1_macs'] / 1e6:.1f} ({unit}) | {r['bytes'] / 1e6:.2f} ({r['level']}) | "
                  f"{r['fma_floor_ms']:.3f} | {r['pw1x1_floor_ms']:.3f} | {r['bw_floor_ms']:.3f} ({r['bw_floor_all_l2_ms']:.3f}) | "
                  f"{r['x_floor']:.1f}x ({r['bound']}) |")
        t = tb["total"]
        print(f"| **sum** | {t['ms']:.2f} | {t['fma_macs'] / 1e6:.0f} | {t['pw1x1_macs'] / 1e6:.0f} | "
              f"{t['bytes'] / 1e6:.1f} | {t['fma_floor_ms']:.3f} | {t['pw1x1_floor_ms']:.3f} | "
              f"{t['bw_floor_ms']:.3f} ({t['bw_floor_all_l2_ms']:.3f}) | "
              f"{t['ms'] / t['sum_of_max_floors_ms']:.1f}x (sum of max floors {t['sum_of_max_floors_ms']:.2f} ms) |")


def kernels(args) -> dict:
    """Per-kernel times of several cpu-fused artifacts, interleaved: each round runs ``--calls`` calls of every
    (artifact, threads) in turn; per round each op's minimum (``--stat min``) or median over the calls, then the
    median over rounds.  1 thread: the calling thread's CPU time (``FusedNet.forward(cpu_clock=True)``: other
    tenants' preemption does not count, their cache pressure still does); 2+ threads: wall time."""
    import numpy as np

    from edgekit import runtime

    threads = [int(t) for t in args.threads.split(",")]
    fstat = np.min if args.stat == "min" else np.median
    setups = []
    for path in args.artifacts:
        for t in threads:
            runner = runtime.load(path, threads=t)
            x = np.random.default_rng(0).standard_normal((1, *runner.input_shape)).astype(np.float32)
            fused = runner.fused
            _, _, ops, layers = fused.state(1, *runner.input_shape[1:])
            for _ in range(3):
                fused.forward(x)
            setups.append({"path": path, "threads": t, "isa": runner.isa, "fused": fused, "x": x, "n": len(ops),
                           "layers": layers, "rounds": []})
    res = {"command": " ".join(["python", "benchmarks/cpu_floor.py", *sys.argv[1:]]),
           "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "load_average_before": os.getloadavg(), "stat": args.stat, "rounds": args.rounds, "calls": args.calls,
           "kernels": []}
    for k in range(args.rounds):
        for st in (setups if k % 2 == 0 else setups[::-1]):
            per_call = []
            for _ in range(args.calls):
                t = np.zeros(st["n"])
                st["fused"].forward(st["x"], timings=t, cpu_clock=st["threads"] == 1)
                per_call.append(t)
            st["rounds"].append(fstat(np.array(per_call), axis=0))
        print(f"round {k + 1}/{args.rounds}", file=sys.stderr, flush=True)
    for st in setups:
        med = np.median(np.array(st["rounds"]), axis=0)
        groups = {}
        for names, ms in zip(st["layers"], med):
            groups[group_of(names)] = groups.get(group_of(names), 0.0) + float(ms)
        res["kernels"].append({"artifact": st["path"], "threads": st["threads"], "isa": st["isa"],
                               "clock": "cpu" if st["threads"] == 1 else "wall",
                               "per_group_median_ms": groups, "sum_of_op_medians_ms": float(med.sum())})
    res["load_average_after"] = os.getloadavg()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("peaks", help="measure this machine's instruction peaks and memory bandwidth")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json")
    k = sub.add_parser("kernels", help="per-kernel times of cpu-fused artifacts, interleaved")
    k.add_argument("artifacts", nargs="+")
    k.add_argument("--threads", default="1,2")
    k.add_argument("--rounds", type=int, default=7)
    k.add_argument("--calls", type=int, default=9)
    k.add_argument("--stat", choices=("min", "median"), default="min")
    k.add_argument("--json")
    q = sub.add_parser("table", help="each kernel's time against its floors")
    q.add_argument("--peaks", required=True, nargs="+", help="the JSON(s) of `peaks` (later ones win)")
    q.add_argument("--bench", required=True, help="a cpu_fused_bench.py --kernels JSON, or the JSON of `kernels`")
    q.add_argument("--peak-stat", choices=("max", "median"), default="max",
                   help="which rate of the repetitions is the peak: max (default: on a shared machine other tenants "
                        "only ever lower a rate, so the best repetition is the nearest to the hardware's) or median")
    q.add_argument("--json")
    args = ap.parse_args(argv)
    if args.cmd == "peaks":
        res = peaks(args)
        print_peaks(res)
    elif args.cmd == "kernels":
        res = kernels(args)
        for kp in res["kernels"]:
            print(f"{kp['artifact']} {kp['isa']} {kp['threads']} thread(s), {kp['clock']} ms: " +
                  ", ".join(f"{g} {ms:.3f}" for g, ms in kp["per_group_median_ms"].items()) +
                  f"; sum {kp['sum_of_op_medians_ms']:.2f}")
    else:
        PEAK_STAT[0] = args.peak_stat
        res = table(args)
        res["peak_stat"] = args.peak_stat
        print_table(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
