// Host emulation of the few CUDA features edgekit/kernels/cuda/gmbi_fused.cu uses, so the kernel source can be
// compiled as plain C++ (g++ -std=c++20) and run on a CPU: one std::thread per CUDA thread,
// std::barrier for __syncthreads (whole block) and __syncwarp (per 32-thread warp).
//
// This is a correctness harness for the indexing / halo / synchronisation logic, meant to be run
// under AddressSanitizer (buffer overruns, including the exact dynamic shared-memory size) and
// ThreadSanitizer (a missing __syncwarp/__syncthreads shows up as a data race).  It says nothing
// about performance, and device-only behaviour (real warp scheduling, __ldg, alignment faults,
// fp16 hardware rounding of __expf) is only approximated.
#pragma once
#define GMBI_HOST_EMULATION 1

#include <cuda_fp16.h>   // host-side __half and conversions
#include <vector_types.h>  // float4

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

using std::max;
using std::min;

namespace emu {
struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local Dim3 thread_idx, block_idx;
inline float* smem = nullptr;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;

[[noreturn]] inline void fail(const char* what, const char* file, int line) {
    std::fprintf(stderr, "GMBI_ASSERT failed: %s at %s:%d (block %u,%u,%u thread %u)\n", what, file, line,
                 block_idx.x, block_idx.y, block_idx.z, thread_idx.x);
    std::abort();
}

inline float4 ldg4(const float* p) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) fail("float4 load from a non-16-byte-aligned address", __FILE__, __LINE__);
    float4 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// Runs kernel(args...) for every block of `grid` with `threads` host threads per block.  The threads
// are created once per launch and walk the blocks in lockstep (a barrier with the launching thread
// before and after each block), so no block overlaps another.  Shared memory is one exactly-sized heap
// buffer, refilled with NaN before every block.
template <typename F>
void launch(Dim3 grid, unsigned threads, size_t smem_bytes, F&& kernel) {
    const size_t nfloat = (smem_bytes + sizeof(float) - 1) / sizeof(float);
    const unsigned nblocks = grid.x * grid.y * grid.z;
    std::unique_ptr<float[]> buf(new float[nfloat]);
    smem = buf.get();
    std::barrier<> bb(threads);
    block_barrier = &bb;
    warp_barriers.clear();
    for (unsigned w = 0; w < (threads + 31) / 32; ++w)
        warp_barriers.emplace_back(new std::barrier<>(std::min(32u, threads - 32 * w)));
    std::barrier<> step(threads + 1);  // the workers and this thread
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
            thread_idx = Dim3{t, 0, 0};
            for (unsigned b = 0; b < nblocks; ++b) {
                step.arrive_and_wait();  // shared memory is ready for block b
                block_idx = Dim3{b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y)};
                kernel();
                step.arrive_and_wait();  // every thread is done with block b
            }
        });
    for (unsigned b = 0; b < nblocks; ++b) {
        for (size_t i = 0; i < nfloat; ++i) buf[i] = std::nanf("");
        step.arrive_and_wait();
        step.arrive_and_wait();
    }
    for (auto& th : pool) th.join();
    smem = nullptr;
}
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define GMBI_DEVICE inline
#define GMBI_KERNEL extern "C" void
#define GMBI_SMEM() (emu::smem)
#define GMBI_SYNC_BLOCK() emu::block_barrier->arrive_and_wait()
#define GMBI_SYNC_WARP() emu::warp_barriers[emu::thread_idx.x / 32]->arrive_and_wait()
#define GMBI_LDG(p) (*(p))
#define GMBI_LDG4(p) emu::ldg4(p)
#define GMBI_FAST_EXP(v) std::exp(v)
#define GMBI_FAST_DIV(a, b) ((a) / (b))
#define GMBI_ASSERT(cond) ((cond) ? (void)0 : emu::fail(#cond, __FILE__, __LINE__))
#define GMBI_UNROLL
