// cuda_emulator.h -- just enough of CUDA to run refattn's kernels on the CPU, for tests on machines
// without a GPU (tests/cuda_emulator.py). Prepended to the loader's translation unit, unchanged.
//
// A launch runs the grid's blocks one after another; a block is REFATTN_THREADS OS threads, so
// __syncthreads() is a real barrier, __syncwarp() a barrier per 32 threads and the shuffles go
// through a per-warp exchange buffer between two warp barriers. __shared__ variables become
// function-local statics: shared by the threads of the (single) running block. Device math is the
// host's <cmath>: the same IEEE semantics, not necessarily the same last bit as CUDA's.
// What it cannot show: timing, memory-model and warp-synchronous subtleties of real hardware.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

struct emu_dim3 { unsigned x, y, z; };
static thread_local emu_dim3 threadIdx, blockIdx;
static emu_dim3 blockDim, gridDim;
static std::barrier<>* emu_block_barrier = nullptr;
static std::barrier<>* emu_warp_barrier[64];

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp_barrier[threadIdx.x / 32]->arrive_and_wait(); }
[[noreturn]] inline void __trap() { std::fprintf(stderr, "__trap() in a kernel\n"); std::abort(); }

template <typename V>
V __shfl_xor_sync(unsigned, V value, int lane_mask, int width = 32) {
    static V slot[1024];
    const unsigned t = threadIdx.x, lane = t % 32;
    slot[t] = value;
    __syncwarp();
    const unsigned src = (lane ^ (unsigned)lane_mask);
    const bool same_group = (src / width) == (lane / width);
    const V got = slot[t - lane + (same_group ? src : lane)];
    __syncwarp();
    return got;
}

inline double __longlong_as_double(long long x) { double d; std::memcpy(&d, &x, sizeof d); return d; }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}

typedef void (*emu_kernel)(const void*);

// Run `kernel` on a grid of (gx, gy, gz) blocks of `threads` threads with `params`.
extern "C" int emu_launch(void* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned threads,
                          const void* params) {
    if (threads % 32 || threads / 32 > 64) return 1;
    gridDim = {gx, gy, gz};
    blockDim = {threads, 1, 1};
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                std::barrier<> block(threads);
                std::vector<std::barrier<>*> warps;
                for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(new std::barrier<>(32));
                emu_block_barrier = &block;
                for (unsigned w = 0; w < threads / 32; ++w) emu_warp_barrier[w] = warps[w];
                std::vector<std::thread> pool;
                pool.reserve(threads);
                for (unsigned t = 0; t < threads; ++t)
                    pool.emplace_back([=] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {x, y, z};
                        reinterpret_cast<emu_kernel>(kernel)(params);
                    });
                for (auto& th : pool) th.join();
                for (auto* w : warps) delete w;
            }
    return 0;
}
