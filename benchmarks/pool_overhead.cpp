// The fixed cost of the cpu-fused worker pool: one empty job (publish + wake + claim + join) at N threads, for the
// two ways a two-phase GMBI module is dispatched (two plain jobs, two pinned jobs; run_pinned2, one job with a
// phase barrier, was measured and not kept: benchmarks/out/fixed/run_pinned2_not_kept.patch), with 0, 20, 300 and 1000 us of calling-thread work between jobs (a worker still
// spinning vs one asleep on the condition variable).  It includes the kernel source, so it times the pool the
// library has.  Build and run (timing: under flock /work/notes/bench.lock, see benchmarks/RESULTS.md 14.8):
//   g++ -O2 -std=c++17 $(python -c "from edgekit.kernels.cpu.build import ISA_LEVELS; print(*ISA_LEVELS['avx512amx'][0])") \
//       -o /tmp/pool_overhead benchmarks/pool_overhead.cpp -lpthread && /tmp/pool_overhead 2
#include "../edgekit/kernels/cpu/gmbinet_cpu.cpp"
#include <cstdio>

static void empty_task(const void*, int, Scratch&) {}

static double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
static void busy_us(double us) { double t = now_us(); while (now_us() - t < us) _mm_pause(); }

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  const int reps = 2000;
  Pool pool(threads);
  {  // how long an idle worker spins before it sleeps on the condition variable: 4000 x _mm_pause (Pool::loop)
    double t = now_us();
    for (int k = 0; k < 4000; ++k) _mm_pause();
    std::printf("4000 x _mm_pause: %.1f us\n", now_us() - t);
  }
  const char* names[2] = {"2 x run (plain)", "2 x run_pinned"};
  for (double gap : {0.0, 20.0, 300.0, 1000.0}) {
    for (int way = 0; way < 2; ++way) {
      std::vector<double> ts;
      for (int r = 0; r < reps; ++r) {
        busy_us(gap);
        double t = now_us();
        if (way == 0) { pool.run(empty_task, nullptr, threads); pool.run(empty_task, nullptr, threads); }
        else { pool.run_pinned(empty_task, nullptr, threads); pool.run_pinned(empty_task, nullptr, threads); }
        ts.push_back(now_us() - t);
      }
      std::sort(ts.begin(), ts.end());
      std::printf("threads %d, gap %6.0f us, %-16s: median %6.2f us, p10 %6.2f, p90 %6.2f (one module's dispatch)\n",
                  threads, gap, names[way], ts[reps / 2], ts[reps / 10], ts[reps * 9 / 10]);
    }
  }
  return 0;
}
