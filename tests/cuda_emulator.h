// cuda_emulator.h -- just enough of CUDA to run refattn's kernels on the CPU, for tests on machines
// without a GPU (tests/cuda_emulator.py). Prepended to the loader's translation unit, unchanged.
//
// One OS thread runs everything: the grid's blocks one after another, and a block's threads as
// cooperative fibers (ucontext) switched only at barriers. __syncthreads() waits until every thread
// of the block has arrived, __syncwarp() until the 32 threads of the warp have; shuffles go through a
// per-warp exchange buffer between two warp barriers. __shared__ variables become function-local
// statics: shared by the threads of the (single) running block. Scheduling is deterministic, and a
// barrier that some thread never reaches is reported as a deadlock instead of hanging. Device math
// is the host's <cmath>: the same IEEE semantics, not necessarily CUDA's last bit.
// What it cannot show: timing, and memory-model or warp-synchronous subtleties of real hardware.
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

struct emu_dim3 { unsigned x, y, z; };
static emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

constexpr unsigned MAX_THREADS = 1024;
constexpr size_t STACK = 256 * 1024;

struct Barrier { unsigned count = 0, size = 0; unsigned long generation = 0; };

struct Fiber {
    ucontext_t context;
    std::vector<char> stack;
    bool done = false;
    Barrier* waiting = nullptr;   // the barrier it waits at, or null when runnable
    unsigned long generation = 0; // ... and that barrier's generation when it arrived
};

static ucontext_t scheduler;
static Fiber fibers[MAX_THREADS];
static unsigned current = 0, nthreads = 0;
static Barrier block_barrier, warp_barrier[MAX_THREADS / 32];
static void (*kernel)(const void*) = nullptr;
static const void* params = nullptr;

inline void arrive(Barrier& b) {
    if (++b.count == b.size) {  // the last to arrive releases the others and goes on
        b.count = 0;
        ++b.generation;
        return;
    }
    Fiber& f = fibers[current];
    f.waiting = &b;
    f.generation = b.generation;
    swapcontext(&f.context, &scheduler);
}

inline void body() {
    kernel(params);
    fibers[current].done = true;
}

// Run one block: resume runnable fibers round-robin until all have returned.
inline int run_block(unsigned threads) {
    nthreads = threads;
    block_barrier = Barrier{0, threads, 0};
    for (unsigned w = 0; w < threads / 32; ++w) warp_barrier[w] = Barrier{0, 32, 0};
    for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = fibers[t];
        f.stack.resize(STACK);
        f.done = false;
        f.waiting = nullptr;
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack.data();
        f.context.uc_stack.ss_size = STACK;
        f.context.uc_link = &scheduler;
        makecontext(&f.context, body, 0);
    }
    for (;;) {
        bool progress = false, all_done = true;
        for (unsigned t = 0; t < threads; ++t) {
            Fiber& f = fibers[t];
            if (f.done) continue;
            all_done = false;
            if (f.waiting && f.waiting->generation == f.generation) continue;  // still waiting
            f.waiting = nullptr;
            current = t;
            threadIdx = {t, 0, 0};
            progress = true;
            swapcontext(&scheduler, &f.context);
        }
        if (all_done) return 0;
        if (!progress) {
            std::fprintf(stderr, "emulator: deadlock in block (%u, %u, %u): a barrier not reached by "
                                 "every thread\n", blockIdx.x, blockIdx.y, blockIdx.z);
            return 2;
        }
    }
}

}  // namespace emu

inline void __syncthreads() { emu::arrive(emu::block_barrier); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::arrive(emu::warp_barrier[threadIdx.x / 32]); }
[[noreturn]] inline void __trap() { std::fprintf(stderr, "__trap() in a kernel\n"); std::abort(); }

template <typename V>
V __shfl_xor_sync(unsigned, V value, int lane_mask, int width = 32) {
    static V slot[emu::MAX_THREADS];
    const unsigned t = threadIdx.x, lane = t % 32;
    slot[t] = value;
    __syncwarp();
    const unsigned src = lane ^ (unsigned)lane_mask;
    const V got = slot[t - lane + ((src / width) == (lane / width) ? src : lane)];
    __syncwarp();
    return got;
}

inline double __longlong_as_double(long long x) { double d; std::memcpy(&d, &x, sizeof d); return d; }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}

// Run `kernel` on a grid of (gx, gy, gz) blocks of `threads` threads with `params`.
extern "C" int emu_launch(void* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned threads,
                          const void* params) {
    if (threads == 0 || threads % 32 || threads > emu::MAX_THREADS) return 1;
    emu::kernel = reinterpret_cast<void (*)(const void*)>(kernel);
    emu::params = params;
    gridDim = {gx, gy, gz};
    blockDim = {threads, 1, 1};
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx = {x, y, z};
                if (int rc = emu::run_block(threads)) return rc;
            }
    return 0;
}
