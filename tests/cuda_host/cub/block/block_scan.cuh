// Host stand-in for CUB's BlockScan (tests/cuda_host): ExclusiveSum with the block aggregate, through shared
// TempStorage and two barriers, with CUB's contract (a __syncthreads before the storage is reused).
#pragma once

namespace cub {
template <typename T, int THREADS>
struct BlockScan {
    struct TempStorage {
        T values[THREADS];
    };
    TempStorage& storage;
    explicit BlockScan(TempStorage& s) : storage(s) {}
    void ExclusiveSum(T input, T& output, T& aggregate) {
        const unsigned tid = threadIdx.x;
        storage.values[tid] = input;
        __syncthreads();
        T before = T(0), total = T(0);
        for (unsigned i = 0; i < (unsigned)THREADS; ++i) {
            if (i < tid) before += storage.values[i];
            total += storage.values[i];
        }
        output = before;
        aggregate = total;
        __syncthreads();
    }
};
}  // namespace cub
