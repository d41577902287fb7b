// Host shims of the CUDA built-ins that atskern/gpu/*.cu use, so a kernel source compiles as C++20 and runs on the
// CPU: a launch runs its blocks one after another, each block's threads as std::threads that meet at
// __syncthreads (a std::barrier); __shared__ variables are function statics, shared by the threads of the one
// block that runs at a time. For CPU-only CI of the kernels' own code (tests/test_cuda_host.py), not for speed.
#pragma once

#include <barrier>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 0, y = 0, z = 0;
};
struct uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* block_barrier = nullptr;
inline std::mutex atomic_mutex;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(n)
#define __shared__ static

inline void __syncthreads() { block_barrier->arrive_and_wait(); }

template <typename T>
inline T __ldg(const T* p) { return *p; }

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

// Runs body() as a grid of `grid` blocks of `block` threads.
inline void launch(unsigned grid, unsigned block, const std::function<void()>& body) {
    gridDim = dim3{grid, 1, 1};
    blockDim = dim3{block, 1, 1};
    std::barrier<> barrier((std::ptrdiff_t)block);
    block_barrier = &barrier;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t) {
        threads.emplace_back([&, t] {
            threadIdx = dim3{t, 0, 0};
            for (unsigned b = 0; b < grid; ++b) {
                blockIdx = dim3{b, 0, 0};
                body();
                barrier.arrive_and_wait();  // the next block starts when every thread has finished this one
            }
        });
    }
    for (auto& thread : threads) thread.join();
    block_barrier = nullptr;
}
