// Host shims of the CUDA built-ins that atskern/gpu/*.cu use, so a kernel source compiles as C++20 and runs on the
// CPU: a launch runs its blocks one after another, each block's threads as fibers (ucontext) of the calling thread
// that meet at __syncthreads: a fiber runs until its next barrier, and the barrier opens when every fiber of the
// block has reached it (fibers that returned wait no more). Each round of a barrier runs the fibers in the other
// order than the round before, so that a read of another thread's write without a barrier between them sees a
// different value depending on the order, and a result that depends on it shows up. __shared__ variables are
// function statics, shared by the fibers of the one block that runs at a time. For CPU-only CI of the kernels' own
// code (tests/test_cuda_host*.py), not for speed; fibers instead of OS threads because a barrier then costs a few
// context switches in user space, not a scheduling round of the operating system for every thread.
#pragma once
#define ATS_HOST_BUILD  // atskern/gpu/sampling.cu: the cluster barrier and rank come from here

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <mutex>
#include <ucontext.h>
#include <vector>

struct dim3 {
    unsigned x = 0, y = 0, z = 0;
};
// CUDA's vector types with CUDA's alignment: a load or store of one at an address that is not a multiple of 16 faults
// on a GPU, and in a build with -fsanitize=alignment (tests/cuda_host_build.py's sanitized build) it is reported here.
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) double2 {
    double x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline dim3 threadIdx, blockIdx;  // the running fiber's (one OS thread runs every fiber of a launch)
inline dim3 blockDim, gridDim;
inline std::mutex atomic_mutex;

// The fibers of the block that runs: each one's context, and the scheduler's, which a barrier switches back to;
// in a cluster launch, which fibers wait at the cluster's barrier.
struct Fibers {
    ucontext_t scheduler;
    std::vector<ucontext_t> contexts;
    std::vector<unsigned char> done, at_cluster;
    unsigned current = 0;
};
inline Fibers* running_fibers = nullptr;
inline unsigned running_cluster_rank = 0;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))  // after every standard header: libstdc++ spells the attribute so
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static

inline void __syncthreads() {
    Fibers& fibers = *running_fibers;
    swapcontext(&fibers.contexts[fibers.current], &fibers.scheduler);  // back when every fiber has arrived
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Thread block clusters (launch_clusters): the rank of the running block in its cluster, and the cluster's barrier,
// where the fiber waits until every fiber of every block of the cluster has arrived (or returned).
inline unsigned cluster_rank() { return running_cluster_rank; }
inline void cluster_sync() {
    Fibers& fibers = *running_fibers;
    fibers.at_cluster[fibers.current] = 1;
    swapcontext(&fibers.contexts[fibers.current], &fibers.scheduler);
}

template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }

inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
    return (unsigned)(((((unsigned long long)hi) << 32) | lo) >> (shift & 31u));
}

template <typename T>
inline T atomicAdd(T* address, T value) {
    std::lock_guard<std::mutex> lock(atomic_mutex);
    T old = *address;
    *address = old + value;
    return old;
}

template <typename T>
inline T min(T a, T b) { return a < b ? a : b; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

template <typename T>
inline T atomicMin(T* address, T value) {
    std::lock_guard<std::mutex> lock(atomic_mutex);
    T old = *address;
    if (value < old) *address = value;
    return old;
}

template <typename T>
inline T atomicMax(T* address, T value) {
    std::lock_guard<std::mutex> lock(atomic_mutex);
    T old = *address;
    if (value > old) *address = value;
    return old;
}

using std::exp;
using std::fmin;
using std::frexp;
using std::isfinite;
using std::ldexp;
using std::log;

inline unsigned __float_as_uint(float x) {
    unsigned bits;
    std::memcpy(&bits, &x, 4);
    return bits;
}
inline float __uint_as_float(unsigned x) {
    float out;
    std::memcpy(&out, &x, sizeof out);
    return out;
}
inline long long __double_as_longlong(double x) {
    long long bits;
    std::memcpy(&bits, &x, 8);
    return bits;
}
inline double __longlong_as_double(long long bits) {
    double x;
    std::memcpy(&x, &bits, 8);
    return x;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline int __ffs(int x) { return x == 0 ? 0 : __builtin_ctz((unsigned)x) + 1; }

// Warp shuffles and ballots: each thread posts its value and reads its source lane's between two block barriers,
// so every thread of the block must make the call (the kernels call them block-uniformly, or with 32-thread blocks).
inline unsigned long long warp_slots[1024];

template <typename V>
inline V warp_read(V value, int source) {
    static_assert(sizeof(V) <= 8, "a shuffle moves at most 8 bytes");
    unsigned long long bits = 0;
    std::memcpy(&bits, &value, sizeof(V));
    warp_slots[threadIdx.x] = bits;
    __syncthreads();
    V out = value;
    if (source >= 0 && source < 32) {
        bits = warp_slots[(threadIdx.x & ~31u) + (unsigned)source];
        std::memcpy(&out, &bits, sizeof(V));
    }
    __syncthreads();
    return out;
}

template <typename V>
inline V __shfl_down_sync(unsigned, V value, int delta) { return warp_read(value, (int)(threadIdx.x & 31u) + delta); }
template <typename V>
inline V __shfl_up_sync(unsigned, V value, int delta) { return warp_read(value, (int)(threadIdx.x & 31u) - delta); }
template <typename V>
inline V __shfl_sync(unsigned, V value, int lane) { return warp_read(value, lane); }
template <typename V>
inline V __shfl_xor_sync(unsigned, V value, int mask) { return warp_read(value, (int)(threadIdx.x & 31u) ^ mask); }

inline unsigned __ballot_sync(unsigned, bool predicate) {
    warp_slots[threadIdx.x] = predicate;
    __syncthreads();
    unsigned bits = 0;
    for (unsigned lane = 0; lane < 32; ++lane) bits |= (unsigned)(warp_slots[(threadIdx.x & ~31u) + lane] != 0) << lane;
    __syncthreads();
    return bits;
}

// __syncthreads_or: a barrier that also tells every thread whether any thread's predicate was non-zero.
inline int __syncthreads_or(int predicate) {
    warp_slots[threadIdx.x] = predicate != 0;
    __syncthreads();
    int any = 0;
    for (unsigned t = 0; t < blockDim.x; ++t) any |= warp_slots[t] != 0;
    __syncthreads();
    return any;
}

inline const std::function<void()>* fiber_body = nullptr;

inline void fiber_main() {
    (*fiber_body)();
    running_fibers->done[running_fibers->current] = 1;
}  // returns to the scheduler (uc_link)


// Runs body() as a grid of `grid` blocks of `block` threads in clusters of `cluster` consecutive blocks. A cluster's
// blocks run one at a time between the cluster's barriers: block 0 until each of its fibers waits at the cluster
// barrier (or has returned), then block 1, ..., in alternating order from one barrier to the next; then the barrier
// opens. __shared__ variables are function statics, shared by the blocks of the cluster that run in turn: a kernel
// that reads a shared value it wrote before a cluster barrier after it reads another block's, and the tests see
// it. Global memory is the blocks' only channel, as on the device between blocks of different SMs.
// A block's fresh fibers, their stacks from `stacks` on.
__attribute__((noinline)) inline void make_fibers(Fibers& fibers, unsigned block, unsigned char* stacks,
                                                  std::size_t stack_bytes) {
    fibers.contexts.resize(block);
    fibers.done.assign(block, 0);
    fibers.at_cluster.assign(block, 0);
    for (unsigned t = 0; t < block; ++t) {
        ucontext_t& context = fibers.contexts[t];
        getcontext(&context);
        context.uc_stack.ss_sp = stacks + stack_bytes * t;
        context.uc_stack.ss_size = stack_bytes;
        context.uc_link = &fibers.scheduler;
        makecontext(&context, fiber_main, 0);
    }
}

// One cluster of launch_clusters: blocks first .. first + cluster - 1.
__attribute__((noinline)) inline void run_cluster(std::vector<Fibers>& members, unsigned first, unsigned block,
                                                  unsigned char* stacks, std::size_t stack_bytes) {
    const unsigned cluster = (unsigned)members.size();
    for (unsigned r = 0; r < cluster; ++r) {
        make_fibers(members[r], block, stacks + stack_bytes * block * r, stack_bytes);
    }
    for (bool forward_blocks = true;; forward_blocks = !forward_blocks) {  // one phase per cluster barrier
        bool any = false;
        for (unsigned i = 0; i < cluster; ++i) {
            const unsigned r = forward_blocks ? i : cluster - 1 - i;
            Fibers& fibers = members[r];
            running_fibers = &fibers;
            running_cluster_rank = r;
            blockIdx = dim3{first + r, 0, 0};
            for (bool forward = true;; forward = !forward) {  // the block's rounds up to the cluster barrier
                bool ran = false;
                for (unsigned j = 0; j < block; ++j) {
                    const unsigned t = forward ? j : block - 1 - j;
                    if (fibers.done[t] || fibers.at_cluster[t]) continue;
                    ran = any = true;
                    fibers.current = t;
                    threadIdx = dim3{t, 0, 0};
                    swapcontext(&fibers.scheduler, &fibers.contexts[t]);
                }
                if (!ran) break;
            }
        }
        if (!any) break;
        for (Fibers& fibers : members) std::fill(fibers.at_cluster.begin(), fibers.at_cluster.end(), 0);
    }
}

// Runs body() as a grid of `grid` blocks of `block` threads in clusters of `cluster` consecutive blocks. A cluster's
// blocks run one at a time between the cluster's barriers: block 0 until each of its fibers waits at the cluster
// barrier (or has returned), then block 1, ..., in alternating order from one barrier to the next; then the barrier
// opens. __shared__ variables are function statics, shared by the blocks of the cluster that run in turn: a kernel
// that reads a shared value it wrote before a cluster barrier after it reads another block's, and the tests see
// it. Global memory is the blocks' only channel, as on the device between blocks of different SMs.
inline void launch_clusters(unsigned grid, unsigned block, unsigned cluster, const std::function<void()>& body) {
    constexpr std::size_t stack_bytes = 256 * 1024;
    gridDim = dim3{grid, 1, 1};
    blockDim = dim3{block, 1, 1};
    std::vector<Fibers> members(cluster);
    // untouched pages of the stacks are not committed
    std::unique_ptr<unsigned char[]> stacks(new unsigned char[stack_bytes * block * cluster]);
    fiber_body = &body;
    for (unsigned first = 0; first < grid; first += cluster) {
        run_cluster(members, first, block, stacks.get(), stack_bytes);
    }
    running_fibers = nullptr;
    running_cluster_rank = 0;
    fiber_body = nullptr;
}

// Runs body() as a grid of `grid` blocks of `block` threads, one block after another (clusters of one block).
inline void launch(unsigned grid, unsigned block, const std::function<void()>& body) {
    launch_clusters(grid, block, 1, body);
}
