// Sampling kernels for atskern.gpu.sampling.
//
// Without replacement: every position p of a row gets the exponential key -log(u_p) / a_p; the n
// smallest (key, position) pairs in increasing order are a successive-sampling draw. One block
// streams over a chunk of a row once, keeping its n best in shared memory: offers below the
// current n-th best key are appended to a buffer, and when the buffer could overflow the block
// sorts best + buffer (bitonic) and keeps the n first. Most positions are rejected from the high
// Philox word alone (1 - u >= a t implies -log(u) / a >= t). A second kernel merges the chunks'
// lists per row the same way. No full sort of the row.
//
// With replacement: binary search of n uniforms in the row's float64 prefix sums.
#include "philox.cuh"

#define ATS_SORT_SIZE 2048
#define ATS_PER_THREAD 4
#define ATS_NO_INDEX 0x7FFFFFFFFFFFFFFFll
#define ATS_REJECT_MARGIN (1.0 + 1e-12)
#define ATS_INF __longlong_as_double(0x7FF0000000000000LL)
#define ATS_NAN __longlong_as_double(0x7FF8000000000000LL)

struct TopN {
    double keys[ATS_SORT_SIZE];
    long long idx[ATS_SORT_SIZE];
    int kept;     // entries [0, kept) are the best so far, sorted
    int pending;  // entries [n, n + pending) are offers not yet sorted in
    double threshold;
};

__device__ __forceinline__ bool lex_greater(double key_a, long long idx_a, double key_b, long long idx_b) {
    return key_a > key_b || (key_a == key_b && idx_a > idx_b);
}

__device__ void topn_init(TopN& s) {
    if (threadIdx.x == 0) {
        s.kept = 0;
        s.pending = 0;
        s.threshold = ATS_INF;
    }
    __syncthreads();
}

// Called by every thread of the block.
__device__ void topn_compact(TopN& s, int n) {
    const int kept = s.kept;
    const int used = n + s.pending;
    int sort_size = 1;
    while (sort_size < used) sort_size <<= 1;
    for (int i = threadIdx.x; i < sort_size; i += blockDim.x) {
        if ((i >= kept && i < n) || i >= used) {
            s.keys[i] = ATS_INF;
            s.idx[i] = ATS_NO_INDEX;
        }
    }
    __syncthreads();
    for (int size = 2; size <= sort_size; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < sort_size; i += blockDim.x) {
                const int partner = i ^ stride;
                if (partner > i) {
                    const bool ascending = (i & size) == 0;
                    if (lex_greater(s.keys[i], s.idx[i], s.keys[partner], s.idx[partner]) == ascending) {
                        const double key = s.keys[i];
                        s.keys[i] = s.keys[partner];
                        s.keys[partner] = key;
                        const long long index = s.idx[i];
                        s.idx[i] = s.idx[partner];
                        s.idx[partner] = index;
                    }
                }
            }
            __syncthreads();
        }
    }
    if (threadIdx.x == 0) {
        const int valid = min(n, kept + s.pending);
        s.kept = valid;
        s.pending = 0;
        s.threshold = valid == n ? s.keys[n - 1] : ATS_INF;
    }
    __syncthreads();
}

__device__ __forceinline__ void topn_offer(TopN& s, int n, double key, long long index) {
    const int slot = atomicAdd(&s.pending, 1);
    s.keys[n + slot] = key;
    s.idx[n + slot] = index;
}

// Before each tile of at most ATS_PER_THREAD offers per thread: make room.
__device__ __forceinline__ void topn_make_room(TopN& s, int n) {
    if (s.pending > ATS_SORT_SIZE - n - ATS_PER_THREAD * (int)blockDim.x) topn_compact(s, n);
}

template <typename T>
__device__ void chunk_topn(const T* __restrict__ weights, long long size, unsigned int row0, int n,
                           unsigned long long seed, long long chunk, double* __restrict__ cand_keys,
                           long long* __restrict__ cand_idx, int* __restrict__ cand_count) {
    __shared__ TopN s;
    const unsigned int row = row0 + blockIdx.y;  // the Philox row; arrays start at row0
    const long long start = (long long)blockIdx.x * chunk;
    const long long stop = min(size, start + chunk);
    const T* row_weights = weights + (long long)blockIdx.y * size;
    topn_init(s);
    for (long long tile = start; tile < stop; tile += ATS_PER_THREAD * (long long)blockDim.x) {
        topn_make_room(s, n);
        const double threshold = s.threshold;
        const double bound = threshold * ATS_REJECT_MARGIN;
        const long long first = tile + ATS_PER_THREAD * (long long)threadIdx.x;
        if (first < stop) {
            const PhiloxWords hi = block_words((unsigned long long)first >> 2, row, ATS_STREAM_HI, seed);
            PhiloxWords lo;
            bool have_lo = false;
#pragma unroll
            for (int lane = 0; lane < ATS_PER_THREAD; ++lane) {
                const long long p = first + lane;
                if (p >= stop) break;
                const double a = (double)row_weights[p];
                if (!(a > 0.0) || !(headroom(hi.w[lane]) < a * bound)) continue;
                if (!have_lo) {
                    lo = block_words((unsigned long long)first >> 2, row, ATS_STREAM_LO, seed);
                    have_lo = true;
                }
                const double key = -log(to_uniform(hi.w[lane], lo.w[lane])) / a;
                if (key <= threshold) topn_offer(s, n, key, p);
            }
        }
        __syncthreads();
    }
    topn_compact(s, n);
    const long long item = (long long)blockIdx.y * gridDim.x + blockIdx.x;
    for (int i = threadIdx.x; i < s.kept; i += blockDim.x) {
        cand_keys[item * n + i] = s.keys[i];
        cand_idx[item * n + i] = s.idx[i];
    }
    if (threadIdx.x == 0) cand_count[item] = s.kept;
}

extern "C" __global__ void chunk_topn_f32(const float* weights, long long size, unsigned int row0, int n,
                                          unsigned long long seed, long long chunk, double* cand_keys,
                                          long long* cand_idx, int* cand_count) {
    chunk_topn<float>(weights, size, row0, n, seed, chunk, cand_keys, cand_idx, cand_count);
}

extern "C" __global__ void chunk_topn_f64(const double* weights, long long size, unsigned int row0, int n,
                                          unsigned long long seed, long long chunk, double* cand_keys,
                                          long long* cand_idx, int* cand_count) {
    chunk_topn<double>(weights, size, row0, n, seed, chunk, cand_keys, cand_idx, cand_count);
}

// One block per row: the n smallest of the row's chunk lists, written in increasing order.
extern "C" __global__ void merge_topn(const double* __restrict__ cand_keys, const long long* __restrict__ cand_idx,
                                      const int* __restrict__ cand_count, int nchunks, int n, long long* __restrict__ out) {
    __shared__ TopN s;
    const int row = blockIdx.x;
    const long long offers = (long long)nchunks * n;
    topn_init(s);
    for (long long tile = 0; tile < offers; tile += ATS_PER_THREAD * (long long)blockDim.x) {
        topn_make_room(s, n);
        const double threshold = s.threshold;
        for (int lane = 0; lane < ATS_PER_THREAD; ++lane) {
            const long long j = tile + (long long)lane * blockDim.x + threadIdx.x;
            if (j >= offers) break;
            const int chunk = (int)(j / n);
            const int rank = (int)(j % n);
            if (rank >= cand_count[row * nchunks + chunk]) continue;
            const long long at = ((long long)row * nchunks + chunk) * n + rank;
            if (cand_keys[at] <= threshold) topn_offer(s, n, cand_keys[at], cand_idx[at]);
        }
        __syncthreads();
    }
    topn_compact(s, n);
    // Entries [kept, n) hold ATS_NO_INDEX: the row had fewer than n positive weights (fill_short_rows).
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[(long long)row * n + i] = s.idx[i];
}

// Rule R1: a row with p < n positive weights continues its draw with its n - p lowest positions
// whose weight is not positive, in increasing order. One thread per row; rows with a full draw
// return at once. Also keeps a bad row (NaN, no positive weight) in range when validation is off.
template <typename T>
__device__ void fill_short_rows(const T* __restrict__ weights, long long size, int rows, int n, long long* __restrict__ out) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    long long* drawn = out + (long long)row * n;
    if (drawn[n - 1] != ATS_NO_INDEX) return;
    int k = 0;
    while (k < n && drawn[k] != ATS_NO_INDEX) ++k;
    const T* row_weights = weights + (long long)row * size;
    for (long long p = 0; p < size && k < n; ++p) {
        if (!(row_weights[p] > (T)0)) drawn[k++] = p;
    }
}

extern "C" __global__ void fill_short_rows_f32(const float* weights, long long size, int rows, int n, long long* out) {
    fill_short_rows<float>(weights, size, rows, n, out);
}

extern "C" __global__ void fill_short_rows_f64(const double* weights, long long size, int rows, int n, long long* out) {
    fill_short_rows<double>(weights, size, rows, n, out);
}

// Keys of every position (for n too large for the shared-memory selection): NaN where a <= 0
// (sorted last; the caller then pads short rows with fill_short_rows: rule R1).
template <typename T>
__device__ void exponential_keys(const T* __restrict__ weights, long long size, long long total, unsigned int row0,
                                 unsigned long long seed, double* __restrict__ keys) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const unsigned int row = row0 + (unsigned int)(i / size);
        const long long p = i % size;
        const double a = (double)weights[i];
        if (!(a > 0.0)) {
            keys[i] = ATS_NAN;  // sorted after every positive position, even one whose key is +inf
            continue;
        }
        const PhiloxWords hi = block_words((unsigned long long)p >> 2, row, ATS_STREAM_HI, seed);
        const PhiloxWords lo = block_words((unsigned long long)p >> 2, row, ATS_STREAM_LO, seed);
        keys[i] = -log(to_uniform(hi.w[p & 3], lo.w[p & 3])) / a;
    }
}

extern "C" __global__ void exponential_keys_f32(const float* weights, long long size, long long total, unsigned int row0,
                                                unsigned long long seed, double* keys) {
    exponential_keys<float>(weights, size, total, row0, seed, keys);
}

extern "C" __global__ void exponential_keys_f64(const double* weights, long long size, long long total, unsigned int row0,
                                                unsigned long long seed, double* keys) {
    exponential_keys<double>(weights, size, total, row0, seed, keys);
}

// With replacement: draw k of a row is the first position whose prefix sum reaches u_k * total.
// A parallel prefix sum may differ from the exact one by rounding, so a zero-weight position that
// the search lands on is moved to the nearest positive one after it (or, at the end, before it).
template <typename T>
__device__ void replacement_draws(const T* __restrict__ weights, const double* __restrict__ cdf, long long size,
                                  int rows, int n, unsigned long long seed, long long* __restrict__ out) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= (long long)rows * n) return;
    const unsigned int row = (unsigned int)(i / n);
    const int k = (int)(i % n);
    const double* row_cdf = cdf + (long long)row * size;
    const T* row_weights = weights + (long long)row * size;
    const PhiloxWords w = block_words((unsigned long long)k >> 1, row, ATS_STREAM_REPLACE, seed);
    const int lane = 2 * (k & 1);
    const double target = to_uniform(w.w[lane], w.w[lane + 1]) * row_cdf[size - 1];
    long long lo = 0, hi = size - 1;
    while (lo < hi) {
        const long long mid = lo + (hi - lo) / 2;
        if (row_cdf[mid] >= target) hi = mid;
        else lo = mid + 1;
    }
    long long p = lo;
    while (p < size - 1 && !(row_weights[p] > (T)0)) ++p;
    while (p > 0 && !(row_weights[p] > (T)0)) --p;
    out[i] = p;
}

extern "C" __global__ void replacement_draws_f32(const float* weights, const double* cdf, long long size, int rows, int n,
                                                 unsigned long long seed, long long* out) {
    replacement_draws<float>(weights, cdf, size, rows, n, seed, out);
}

extern "C" __global__ void replacement_draws_f64(const double* weights, const double* cdf, long long size, int rows, int n,
                                                 unsigned long long seed, long long* out) {
    replacement_draws<double>(weights, cdf, size, rows, n, seed, out);
}
