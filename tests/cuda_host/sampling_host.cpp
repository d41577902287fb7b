// atskern/gpu/sampling.cu compiled for the host (tests/test_cuda_host_sampling.py): one extern "C" launcher per
// kernel, taking the grid and block sizes and then exactly the kernel's own arguments. The selecting kernels run
// blocks of ATS_SELECT_THREADS threads (32 here, so that small rows span many blocks; sampling_host_t64.cpp: 64).
#include "cuda_shim.h"
#ifndef ATS_SELECT_THREADS
#define ATS_SELECT_THREADS 32
#endif
#ifndef ATS_ROW_CLUSTER
#define ATS_ROW_CLUSTER 4  // blocks of a row's cluster (sample_cluster_rows); sampling_host_t64.cpp: 2
#endif
#include "sampling.cu"

extern "C" int host_row_cluster() { return ATS_ROW_CLUSTER; }

#define U64 unsigned long long

#define SAMPLING_HOST(suffix, T)                                                                                      \
    extern "C" void host_row_max_##suffix(unsigned grid, unsigned block, const T* weights, long long size,            \
                                          int nchunks, long long chunk, U64* rowmax) {                                \
        launch(grid, block, [=] { row_max_##suffix(weights, size, nchunks, chunk, rowmax); });                        \
    }                                                                                                                 \
    extern "C" void host_chunk_topn_##suffix(unsigned grid, unsigned block, const T* weights, long long size,         \
                                             int nchunks, long long chunk, int n, U64 seed, const U64* seed_ptr,      \
                                             int logits, const U64* rowmax, int pass, const long long* status,        \
                                             U64* row_bound, double* cand_keys, long long* cand_idx, int* cand_count, \
                                             int capacity, const double* row_plan, unsigned* counters,                \
                                             double* screen_keys, long long* screen_idx) {                            \
        launch(grid, block, [=] {                                                                                     \
            chunk_topn_##suffix(weights, size, nchunks, chunk, n, seed, seed_ptr, logits, rowmax, pass, status,       \
                                row_bound, cand_keys, cand_idx, cand_count, capacity, row_plan, counters,             \
                                screen_keys, screen_idx);                                                             \
        });                                                                                                           \
    }                                                                                                                 \
    extern "C" void host_chunk_stats_##suffix(unsigned grid, unsigned block, const T* weights, long long size,        \
                                              int nchunks, long long chunk, int logits, const U64* rowmax, int pass,  \
                                              const long long* status, double* stats, int n, int planned,             \
                                              int capacity, unsigned* counters, double* row_plan) {                   \
        launch(grid, block, [=] {                                                                                     \
            chunk_stats_##suffix(weights, size, nchunks, chunk, logits, rowmax, pass, status, stats, n, planned,       \
                                 capacity, counters, row_plan);                                                       \
        });                                                                                                           \
    }                                                                                                                 \
    extern "C" void host_finish_rows_##suffix(unsigned grid, unsigned block, const T* weights, long long size,        \
                                              int nchunks, int n, int logits, const U64* rowmax, int pass,            \
                                              const double* cand_keys, const long long* cand_idx,                     \
                                              const int* cand_count, const double* stats, long long* status,          \
                                              U64* row_bound, int dims, long long g0, long long g1, long long g2,     \
                                              int* indices, void* probs, int single, int select, int presorted,      \
                                              U64 seed,                                                               \
                                              const U64* seed_ptr, int capacity, const double* row_plan,              \
                                              const unsigned* counters, const double* screen_keys,                    \
                                              const long long* screen_idx, long long* status_host) {                  \
        launch(grid, block, [=] {                                                                                     \
            finish_rows_##suffix(weights, size, nchunks, n, logits, rowmax, pass, cand_keys, cand_idx, cand_count,    \
                                 stats, status, row_bound, dims, g0, g1, g2, indices, probs, single, select, presorted, \
                                 seed,                                                                                \
                                 seed_ptr, capacity, row_plan, counters, screen_keys, screen_idx, status_host);       \
        });                                                                                                           \
    }                                                                                                                 \
    extern "C" void host_select_rows_##suffix(unsigned grid, unsigned block, const T* weights, long long size,        \
                                              int nchunks, long long chunk, int n, U64 seed, const U64* seed_ptr,     \
                                              int logits, const U64* rowmax, int pass, long long* status,             \
                                              U64* row_bound, double* cand_keys, long long* cand_idx,                 \
                                              int* cand_count, int capacity, const double* row_plan,                  \
                                              unsigned* counters, double* screen_keys, long long* screen_idx,         \
                                              const double* stats, int dims, long long g0, long long g1,              \
                                              long long g2, int* indices, void* probs, int single,                    \
                                              long long* status_host) {                                               \
        launch(grid, block, [=] {                                                                                     \
            select_rows_##suffix(weights, size, nchunks, chunk, n, seed, seed_ptr, logits, rowmax, pass, status,      \
                                 row_bound, cand_keys, cand_idx, cand_count, capacity, row_plan, counters,            \
                                 screen_keys, screen_idx, stats, dims, g0, g1, g2, indices, probs, single,            \
                                 status_host);                                                                        \
        });                                                                                                           \
    }                                                                                                                 \
    extern "C" void host_sample_rows_##suffix(unsigned grid, unsigned block, const T* weights, long long size, int n,  \
                                              U64 seed, const U64* seed_ptr, int logits, long long* status,           \
                                              U64* row_bound, int capacity, double* screen_keys,                     \
                                              long long* screen_idx, int dims, long long g0, long long g1,            \
                                              long long g2, int* indices, void* probs, int single,                    \
                                              long long* status_host) {                                               \
        launch(grid, block, [=] {                                                                                     \
            sample_rows_##suffix(weights, size, n, seed, seed_ptr, logits, status, row_bound, capacity, screen_keys,  \
                                 screen_idx, dims, g0, g1, g2, indices, probs, single, status_host);                 \
        });                                                                                                           \
    }                                                                                                                 \
    extern "C" void host_sample_cluster_rows_##suffix(unsigned grid, unsigned block, const T* weights, long long size, \
                                                      int n, U64 seed, const U64* seed_ptr, int logits,               \
                                                      long long* status, U64* row_bound, int capacity,                \
                                                      double* screen_keys, long long* screen_idx,                     \
                                                      double* cluster_stats, unsigned* cluster_counts,                \
                                                      long long span, int dims, long long g0, long long g1,           \
                                                      long long g2, int* indices, void* probs, int single,            \
                                                      long long* status_host) {                                       \
        launch_clusters(grid, block, ATS_ROW_CLUSTER, [=] {                                                           \
            sample_cluster_rows_##suffix(weights, size, n, seed, seed_ptr, logits, status, row_bound, capacity,       \
                                         screen_keys, screen_idx, cluster_stats, cluster_counts, span, dims, g0, g1,  \
                                         g2, indices, probs, single, status_host);                                    \
        });                                                                                                           \
    }                                                                                                                 \
    extern "C" void host_exponential_keys_##suffix(unsigned grid, unsigned block, const T* weights, long long size,   \
                                                   long long total, U64 seed, const U64* seed_ptr, int logits,        \
                                                   const U64* rowmax, const long long* status, double* keys) {        \
        launch(grid, block, [=] {                                                                                     \
            exponential_keys_##suffix(weights, size, total, seed, seed_ptr, logits, rowmax, status, keys);           \
        });                                                                                                           \
    }                                                                                                                 \
    extern "C" void host_replacement_draws_##suffix(unsigned grid, unsigned block, const T* weights, long long size,  \
                                                    int nchunks, long long chunk, int n, long long rows, U64 seed,    \
                                                    const U64* seed_ptr, int logits, const U64* rowmax,               \
                                                    const long long* status, const double* stats, int dims,           \
                                                    long long g0, long long g1, long long g2, int* indices,           \
                                                    void* probs, int single) {                                        \
        launch(grid, block, [=] {                                                                                     \
            replacement_draws_##suffix(weights, size, nchunks, chunk, n, rows, seed, seed_ptr, logits, rowmax,        \
                                       status, stats, dims, g0, g1, g2, indices, probs, single);                      \
        });                                                                                                           \
    }

SAMPLING_HOST(f32, float)
SAMPLING_HOST(f64, double)
