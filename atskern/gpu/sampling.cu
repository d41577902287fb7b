// Sampling kernels for atskern.gpu.sampling: validation fused into the draw, no host work between launches.
//
// A call is a fixed sequence of launches (atskern.gpu.sampling.plan), each reading what the previous ones wrote
// in device memory, so it is asynchronous and CUDA-graph capturable:
//   (a memset)     the host zeroes the counters, the rows' shared key bounds (0 stands for +inf: shared_bound),
//                  the count of finish_rows blocks done and the logits maxima (0 is below -inf): no launch.
//   row_max        (logits only) per (row, chunk) block: the largest finite logit, atomicMax into the row's slot.
//   chunk_stats    per (row, chunk) block, one read of the chunk: the float64 sum and sum of squares, the largest
//                  finite weight and the counts of non-finite, negative and positive weights (the row's status).
//                  Without replacement the row's last block to finish adds the row's statistics and writes its
//                  plan (row_plan_of): screened below a bound t, selected chunk by chunk, or skipped (pass 0 of a
//                  row that pass 1 rescales).
//   chunk_topn     per (row, chunk) block, the exponential keys -log(u_p) / a_p. A key is computed only when the
//                  high Philox word cannot rule it out (1 - u >= a t implies -log(u) / a >= t).
//                  Screened rows (even weights: most rows): every key at most t goes to the row's buffer through
//                  an atomic slot count, no barrier, loads of several tiles in flight (screen_range): one more read
//                  of the map at about the speed of the statistics pass.
//                  Selected rows (uneven, short or bad rows): the chunk's n smallest keys (select_range): offers up
//                  to the current n-th best key are appended in position order (a block scan) to a shared-memory
//                  buffer that cub::BlockRadixSort compacts when it is about full (stable, so ties go to the lower
//                  position; n <= ATS_MAX_N = 2048, larger n sorts every key: exponential_keys and sampling.py),
//                  and the row's blocks share their n-th best keys through a global bound (atomicMin on the bits of
//                  a non-negative double, monotone).
//   finish_rows    per row: sums the chunks' statistics (a block reduction in a fixed order), writes the row's
//                  status, takes the row's exact n smallest (key, position) pairs, ties by position: a screened
//                  row's buffer ranked or sorted (or, with fewer than n keys under t or more than the buffer holds,
//                  the row selected by this block alone), a selected row's chunk lists merged (only each sorted
//                  list's prefix under a bound of the row's n-th key, see merge_lists); pads a short row with
//                  fillers (rule R1), and writes grid coordinates and probabilities. The block that counts itself
//                  done last (pass 0) also writes the status's summary row (what the host reads back when
//                  validating).
//   select_rows    (a plan with `fused`, atskern.gpu.sampling.FUSED_FINISH) chunk_topn and finish_rows in one launch:
//                  each (row, chunk) block selects, and the row's last block to count itself done finishes the row.
//   (float64 only) chunk_stats, chunk_topn and finish_rows (or select_rows) again with pass = 1: rows whose
//                  largest weight's exponent is outside SCALE_FREE_EXPONENTS are redone on weights times
//                  2^-exponent (exact), every other block returns at once: the CPU's scale-free rule without a host
//                  round trip.
// Short rows (a plan with `whole_rows`, atskern.gpu.sampling.WHOLE_ROWS) take one launch instead, after the memset
// (none for one row): sample_rows, a block per row doing all of the above for its row (statistics, status, pass 1's
// rescaling, plan, screening or selection, finish), blocks meeting only to elect the one writing the summary row;
// or (ROW_CLUSTER, sm_90) sample_cluster_rows, a thread block cluster per row whose blocks split the streaming
// passes and meet at the cluster's barrier, one of them then finishing the row.
// With replacement chunk_stats gathers the statistics (short chunks) and replacement_draws finds each draw with one
// block: a scan of the row's chunk sums, then of the positions from the chunk found (no prefix sum over the row in
// memory). The sort fallback takes its statistics from chunk_stats.
//
// Rows that validation would refuse (NaN/inf, negative weights, no positive weight) still get in-range indices;
// their probabilities are 0 (their estimator weight is 0).

// The kernels a module defines (atskern.gpu.sampling.kernel_group: one NVRTC compile per group, so a call compiles
// only its dtype's kernels, about half the work): ATS_GROUP 1, every float32 kernel but select_rows and the
// whole-row kernels; 2, every such float64 one; 3 and 4, select_rows_f32 and select_rows_f64 (the fused finish, off by
// default); 5 and 6, sample_rows_f32 and sample_rows_f64 (a block per row); 7 and 8, sample_cluster_rows_f32 and
// sample_cluster_rows_f64 (a cluster per row, off by default; sm_90 and later); 0 (the default: CI's nvcc check, the
// host harness), all of them.
#ifndef ATS_GROUP
#define ATS_GROUP 0
#endif
#define ATS_IN_GROUP(group) (ATS_GROUP == 0 || ATS_GROUP == (group))

#include "philox.cuh"
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>

// The selecting launches (chunk_topn, finish_rows) run blocks of exactly ATS_SELECT_THREADS threads, a compile-time
// constant for CUB's block primitives: atskern.gpu.sampling compiles one module per block size (-D option).
#ifndef ATS_SELECT_THREADS
#define ATS_SELECT_THREADS 256
#endif
// Blocks of the selecting kernels an SM must hold at once: caps their registers at 65536 / (threads * blocks)
// (2 with 256 threads: at most 128 registers; CUDA 13's ptxas for sm_90 spills nothing in finish_rows and
// 20-100 bytes in chunk_topn, the tile-ahead loads; 3 or 4 spill around the sorts: slower on the H200). A tuning
// knob for a GPU session (atskern.gpu.sampling.MIN_BLOCKS); the draws do not depend on it.
#ifndef ATS_MIN_BLOCKS
#define ATS_MIN_BLOCKS 2
#endif
#define ATS_SELECT_BOUNDS __launch_bounds__(ATS_SELECT_THREADS, ATS_MIN_BLOCKS)
// Most threads of a chunk_stats block (atskern.gpu.sampling.stats_threads: twice a selecting block, at most 512;
// two such blocks an SM, as many chunks as selecting blocks).
#define ATS_STATS_THREADS (2 * ATS_SELECT_THREADS < 512 ? 2 * ATS_SELECT_THREADS : 512)
// Keys chunk_topn expects below its first tile's own bound (first_bound): fewer than n fall below it with
// probability about 1e-5 (a host harness sets n, so that the tile is often taken again).
#ifndef ATS_HEAD_WANT
#define ATS_HEAD_WANT(n) ((n) + 4.0 * sqrt((double)(n)) + 6.0)
#endif
#define ATS_MAX_N 2048                                        // largest n selected in shared memory (MAX_SELECTION_N)
#define ATS_PER_THREAD 4                                      // positions per thread and tile (one Philox block)
#define ATS_TILE (ATS_PER_THREAD * ATS_SELECT_THREADS)
#define ATS_CAPACITY (ATS_MAX_N + ATS_TILE)                   // the n kept plus one tile of offers
#define ATS_SORT_ITEMS (ATS_CAPACITY / ATS_SELECT_THREADS)    // items per thread of the largest sort
#define ATS_PAD_KEY 0xFFFFFFFFFFFFFFFFull                     // above every key's bits (+inf is 0x7FF0...)
#define ATS_PAD_VALUE 0xFFFFFFFFu
#define ATS_REJECT_MARGIN (1.0 + 1e-12)
#define ATS_INF_BITS 0x7FF0000000000000ull
#define ATS_INF __longlong_as_double(0x7FF0000000000000LL)
#define ATS_EXPONENT_LOW (-64)   // SCALE_FREE_EXPONENTS in atskern/_validation.py
#define ATS_EXPONENT_HIGH 64
#define ATS_STATS 6              // per (row, chunk): sum, largest finite weight, non-finite, negative, positive, squares

static_assert(ATS_SELECT_THREADS % 32 == 0 && ATS_SELECT_THREADS <= 256 && ATS_MAX_N % ATS_SELECT_THREADS == 0,
              "ATS_SELECT_THREADS: 32, 64, 128 or 256 (the selection buffer must fit 48 KiB of shared memory)");

// The selection buffer of a block: the best keys so far and the offers since, as (key bits, value) pairs.
// A key is a non-negative double (-0.0 is stored as +0.0), so its bits as an unsigned integer order exactly as the
// keys do, +inf included. The value is the entry's position relative to the chunk start (chunk_topn) or its slot
// in the row's candidate lists (finish_rows); both order exactly as the positions do.
struct SelectList {
    unsigned long long keys[ATS_CAPACITY];
    unsigned int values[ATS_CAPACITY];
};

template <int ITEMS>
using BlockSort = cub::BlockRadixSort<unsigned long long, ATS_SELECT_THREADS, ITEMS, unsigned int>;
using BlockOffsets = cub::BlockScan<int, ATS_SELECT_THREADS>;

// The sorts run on registers, so their temporary storage shares the list's memory: 12 bytes an entry in all
// (36 KiB for 256 threads), one sort per size of the used prefix (the smallest that holds it).
struct TopN {
    union {
        SelectList list;
        BlockSort<1>::TempStorage sort1;
        BlockSort<2>::TempStorage sort2;
        BlockSort<4>::TempStorage sort4;
        BlockSort<8>::TempStorage sort8;
        BlockSort<ATS_SORT_ITEMS>::TempStorage sort_all;
        long long summary[4][32];  // finish_rows' summary row, one entry per warp, before its merge
    } u;
    BlockOffsets::TempStorage scan;
};

// What each thread knows of the buffer (block-uniform: every thread updates its copy the same way). Entries
// [0, kept) are the best so far, sorted by (key, position); [kept, count) are offers, in increasing position.
struct Selection {
    int kept = 0;
    int count = 0;
    double threshold = ATS_INF;  // the n-th best key once n are kept: a larger key cannot be among the n best
};

__device__ __forceinline__ unsigned long long key_bits(double key) {
    return (unsigned long long)__double_as_longlong(key + 0.0);  // -0.0 + 0.0 is +0.0
}

// Sorts the first `count` entries (stable: equal keys keep their order) and keeps the first `keep`. Called by
// every thread of the block, the list complete (a barrier since its last write). With begin_bit > 0 the order is
// that of the keys' bits from begin_bit up only (finish_rows' bound: fewer radix passes).
template <int ITEMS>
__device__ void sort_prefix(typename BlockSort<ITEMS>::TempStorage& storage, SelectList& list, int count, int keep,
                            int begin_bit = 0) {
    unsigned long long keys[ITEMS];
    unsigned int values[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {  // blocked arrangement: thread t holds entries [t * ITEMS, (t + 1) * ITEMS)
        const int j = (int)threadIdx.x * ITEMS + i;
        keys[i] = j < count ? list.keys[j] : ATS_PAD_KEY;
        values[i] = j < count ? list.values[j] : ATS_PAD_VALUE;
    }
    __syncthreads();  // every entry read before the sort writes its storage over the list
    BlockSort<ITEMS>(storage).Sort(keys, values, begin_bit);
    __syncthreads();  // the sort's last reads of its storage done before the list is written again
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const int j = (int)threadIdx.x * ITEMS + i;
        if (j < keep) {
            list.keys[j] = keys[i];
            list.values[j] = values[i];
        }
    }
}

// At most 32 entries: a bitonic network on (key bits from begin_bit up, value) pairs in one warp's registers (no
// radix passes, no block barriers inside). The values of a list are distinct and increase with the position (or
// slot) wherever two entries' keys tie and their order matters (kept entries sorted by (key, position), then
// offers of later positions), so ordering by (key, value) is the stable sort by key. Every warp runs the network
// on the same entries (the host harness's shuffles are block-wide); warp 0 writes. Called by every thread.
__device__ void sort_small(SelectList& list, int count, int keep, int begin_bit) {
    const int lane = (int)(threadIdx.x & 31u);
    unsigned long long key = lane < count ? list.keys[lane] : ATS_PAD_KEY;
    unsigned int value = lane < count ? list.values[lane] : ATS_PAD_VALUE;
    const unsigned long long order = begin_bit ? key >> begin_bit : key;
    unsigned long long rank = order;
#pragma unroll
    for (int k = 2; k <= 32; k <<= 1) {
#pragma unroll
        for (int j = k >> 1; j > 0; j >>= 1) {
            const unsigned long long other_key = __shfl_xor_sync(0xFFFFFFFFu, key, j);
            const unsigned long long other_rank = __shfl_xor_sync(0xFFFFFFFFu, rank, j);
            const unsigned int other_value = __shfl_xor_sync(0xFFFFFFFFu, value, j);
            const bool other_first = other_rank < rank || (other_rank == rank && other_value < value);
            const bool ascending = (lane & k) == 0, lower = (lane & j) == 0;
            if (lower == ascending ? other_first : !other_first && !(other_rank == rank && other_value == value)) {
                key = other_key;
                rank = other_rank;
                value = other_value;
            }
        }
    }
    __syncthreads();  // every warp has read the entries before warp 0 writes
    if (threadIdx.x < 32u && lane < keep) {
        list.keys[lane] = key;
        list.values[lane] = value;
    }
}

// Sorts the list's first `count` entries (by the key bits from begin_bit up) and keeps the first `keep`, with the
// smallest sort that holds them. Called by every thread of the block; the kept entries are visible on return.
__device__ void sort_list(TopN& s, int count, int keep, int begin_bit = 0) {
    __syncthreads();  // the entries written by other threads are visible
    if (count <= 32) {
        sort_small(s.u.list, count, keep, begin_bit);
    } else if (count <= ATS_SELECT_THREADS) {
        sort_prefix<1>(s.u.sort1, s.u.list, count, keep, begin_bit);
    } else if (count <= 2 * ATS_SELECT_THREADS) {
        sort_prefix<2>(s.u.sort2, s.u.list, count, keep, begin_bit);
    } else if (count <= 4 * ATS_SELECT_THREADS) {
        sort_prefix<4>(s.u.sort4, s.u.list, count, keep, begin_bit);
    } else if (count <= 8 * ATS_SELECT_THREADS) {
        sort_prefix<8>(s.u.sort8, s.u.list, count, keep, begin_bit);
    } else {
        sort_prefix<ATS_SORT_ITEMS>(s.u.sort_all, s.u.list, count, keep, begin_bit);
    }
    __syncthreads();  // the kept entries are visible
}

// Sorts kept + offers and keeps the n first. Called by every thread of the block.
//
// Ties: the kept entries come from earlier positions than every offer and are sorted by (key, position); the
// offers are in increasing position; a stable sort by key therefore orders by (key, position), the reference's
// order (smallest key first, ties to the lower position).
__device__ void topn_compact(TopN& s, Selection& sel, int n) {
    const int count = sel.count;
    const int keep = min(n, count);
    sort_list(s, count, keep);
    sel.kept = keep;
    sel.count = keep;
    sel.threshold = keep == n ? __longlong_as_double((long long)s.u.list.keys[n - 1]) : ATS_INF;
}

// Before a tile: compact when the next tile's offers might not fit, or as soon as n entries are there to give the
// first threshold (without it every positive position of the following tiles would be offered).
__device__ __forceinline__ bool topn_needs_compaction(const Selection& sel, int n) {
    return sel.count > ATS_CAPACITY - ATS_TILE || (sel.kept < n && sel.count >= n);
}

// Appends this thread's offers (ATS_PER_THREAD candidates, those flagged) after the offers of the lower threads:
// the block's offers land in the order of (thread, lane), the order of their positions. Called by every thread.
__device__ __forceinline__ void topn_offer(TopN& s, Selection& sel, const bool (&offered)[ATS_PER_THREAD],
                                           const double (&keys)[ATS_PER_THREAD],
                                           const unsigned int (&values)[ATS_PER_THREAD]) {
    int mine = 0;
#pragma unroll
    for (int lane = 0; lane < ATS_PER_THREAD; ++lane) mine += offered[lane];
    if (!__syncthreads_or(mine)) return;  // the common case once a threshold is known: no scan, no writes
    int at = 0, total = 0;
    BlockOffsets(s.scan).ExclusiveSum(mine, at, total);
    at += sel.count;
#pragma unroll
    for (int lane = 0; lane < ATS_PER_THREAD; ++lane) {
        if (offered[lane]) {
            s.u.list.keys[at] = key_bits(keys[lane]);
            s.u.list.values[at] = values[lane];
            ++at;
        }
    }
    sel.count += total;  // the next __syncthreads_or or compaction orders these writes and the scan's reuse
}

struct BlockStats {  // one entry per warp
    double sum[32];
    double top[32];
    double squares[32];
    long long count[3][32];
};

// A float32 weight widened to float64 without float32 arithmetic: CuPy compiles with -ftz=true, which may flush a
// subnormal float32 to zero in a conversion; its bits give it exactly.
__device__ __forceinline__ double widen(float x) {
    const unsigned int bits = __float_as_uint(x);
    if ((bits & 0x7F800000u) == 0u) {
        const double magnitude = (double)(bits & 0x007FFFFFu) * 0x1.0p-149;
        return (bits >> 31) ? -magnitude : magnitude;
    }
    return (double)x;
}
__device__ __forceinline__ double widen(double x) { return x; }

// Order-preserving map of a double to unsigned bits (atomicMax of the logits maximum); 0 is below every double.
__device__ __forceinline__ unsigned long long ordered_bits(double x) {
    const unsigned long long bits = (unsigned long long)__double_as_longlong(x);
    return (bits >> 63) ? ~bits : bits | 0x8000000000000000ull;
}
__device__ __forceinline__ double from_ordered_bits(unsigned long long bits) {
    if (bits == 0ull) return -ATS_INF;
    return __longlong_as_double((long long)((bits >> 63) ? bits & 0x7FFFFFFFFFFFFFFFull : ~bits));
}

// The row's logit maximum as logits_to_weights uses it: 0 where no logit is finite.
__device__ __forceinline__ double logits_top(const unsigned long long* rowmax, long long row) {
    const double top = from_ordered_bits(rowmax[row]);
    return isfinite(top) ? top : 0.0;
}

// The weight of a position: exp(l - top) for logits, times 2^-shift (pass 1's exact rescaling).
template <typename T>
__device__ __forceinline__ double weight_of(T raw, int logits, double top, int shift) {
    const double x = widen(raw);
    const double a = logits ? exp(x - top) : x;
    return shift ? ldexp(a, -shift) : a;
}
// weight_of where PLAIN says at compile time that there are no logits and no shift (the weights as they are): the
// streaming loops' common case, compiled without exp and ldexp (fewer registers: ptxas spilled in those loops).
template <bool PLAIN, typename T>
__device__ __forceinline__ double weight_as(T raw, int logits, double top, int shift) {
    if (PLAIN) return widen(raw);
    return weight_of(raw, logits, top, shift);
}
template <typename T>
__device__ __forceinline__ double weight_at(const T* row_weights, long long p, int logits, double top, int shift) {
    return weight_of(row_weights[p], logits, top, shift);
}

// A thread's ATS_PER_THREAD raw weights from position `first` (those below `stop`; 0 past it): 16-byte loads where
// the four are there and aligned (a row's start need not be).
__device__ __forceinline__ void load_lanes(const float* row_weights, long long first, long long stop,
                                           float (&raw)[ATS_PER_THREAD]) {
    const float* at = row_weights + first;
    if (first + 4 <= stop && ((unsigned long long)at & 15ull) == 0ull) {
        const float4 v = *reinterpret_cast<const float4*>(at);
        raw[0] = v.x;
        raw[1] = v.y;
        raw[2] = v.z;
        raw[3] = v.w;
    } else {
#pragma unroll
        for (int lane = 0; lane < ATS_PER_THREAD; ++lane) raw[lane] = first + lane < stop ? at[lane] : 0.0f;
    }
}
__device__ __forceinline__ void load_lanes(const double* row_weights, long long first, long long stop,
                                           double (&raw)[ATS_PER_THREAD]) {
    const double* at = row_weights + first;
    if (first + 4 <= stop && ((unsigned long long)at & 15ull) == 0ull) {
        const double2 v0 = *reinterpret_cast<const double2*>(at);
        const double2 v1 = *reinterpret_cast<const double2*>(at + 2);
        raw[0] = v0.x;
        raw[1] = v0.y;
        raw[2] = v1.x;
        raw[3] = v1.y;
    } else {
#pragma unroll
        for (int lane = 0; lane < ATS_PER_THREAD; ++lane) raw[lane] = first + lane < stop ? at[lane] : 0.0;
    }
}

// frexp exponent of a positive finite x (0 for 0): the status's exponent column.
__device__ __forceinline__ long long exponent_of(double top) {
    if (!(top > 0.0)) return 0;
    int exponent = 0;
    frexp(top, &exponent);
    return exponent;
}

// The power of two a row is rescaled by in pass 1 (0: not rescaled): rows_to_rescale of atskern/_validation.py.
__device__ __forceinline__ int rescale_shift_of(long long nonfinite, long long positive, long long exponent,
                                                int is_double) {
    if (!is_double || nonfinite != 0 || positive <= 0) return 0;
    return (exponent < ATS_EXPONENT_LOW || exponent > ATS_EXPONENT_HIGH) ? (int)exponent : 0;
}
__device__ __forceinline__ int rescale_shift(const long long* row_status, int is_double) {
    return rescale_shift_of(row_status[0], row_status[2], row_status[3], is_double);
}

__device__ __forceinline__ unsigned long long effective_seed(unsigned long long seed, const unsigned long long* seed_ptr) {
    return seed_ptr ? seed_ptr[0] : seed;
}

// The row's shared bound: every block's full-list threshold bounds the row's n-th smallest key from above, so a
// key strictly above it cannot be drawn. Read at any time, it is a valid bound: the draws do not depend on timing.
// row_bound[row] holds the complement of the bound's bits (bits of a non-negative double order as the doubles do,
// so their complements order the other way: atomicMax tightens), and 0 stands for +inf: a zeroed array (one
// memset of the host, no launch) holds no bound.
__device__ __forceinline__ double shared_bound(const unsigned long long* row_bound, long long row) {
    const unsigned long long stored = ((const volatile unsigned long long*)row_bound)[row];
    return stored ? __longlong_as_double((long long)~stored) : ATS_INF;
}

__device__ __forceinline__ void publish_bound(unsigned long long* row_bound, long long row, double threshold) {
    if (threshold >= 0.0 && threshold < ATS_INF) {
        atomicMax(row_bound + row, ~(unsigned long long)__double_as_longlong(threshold + 0.0));  // +0.0, never -0.0
    }
}

template <typename V>
__device__ __forceinline__ V warp_sum(V value) {
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xFFFFFFFFu, value, offset);
    return value;
}

// The warp's largest (smallest) value, in lane 0.
template <typename V>
__device__ __forceinline__ V warp_max(V value) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const V other = __shfl_down_sync(0xFFFFFFFFu, value, offset);
        value = other > value ? other : value;
    }
    return value;
}

template <typename V>
__device__ __forceinline__ V warp_min(V value) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const V other = __shfl_down_sync(0xFFFFFFFFu, value, offset);
        value = other < value ? other : value;
    }
    return value;
}

// Block-wide statistics (a fixed tree: deterministic for a given block size) into out[0..ATS_STATS). Called by
// every thread of the block; blockDim.x is a multiple of 32.
__device__ void reduce_stats(BlockStats& b, double* out, double sum, double top, long long nonfinite,
                             long long negative, long long positive, double squares) {
    const unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    sum = warp_sum(sum);
    squares = warp_sum(squares);
    top = warp_max(top);
    nonfinite = warp_sum(nonfinite);
    negative = warp_sum(negative);
    positive = warp_sum(positive);
    if (lane == 0) {
        b.sum[warp] = sum;
        b.top[warp] = top;
        b.squares[warp] = squares;
        b.count[0][warp] = nonfinite;
        b.count[1][warp] = negative;
        b.count[2][warp] = positive;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0, t = 0.0, q = 0.0;
        long long c0 = 0, c1 = 0, c2 = 0;
        for (unsigned int i = 0; i < (blockDim.x >> 5); ++i) {
            s += b.sum[i];
            q += b.squares[i];
            t = b.top[i] > t ? b.top[i] : t;
            c0 += b.count[0][i];
            c1 += b.count[1][i];
            c2 += b.count[2][i];
        }
        out[0] = s;
        out[1] = t;
        out[2] = (double)c0;  // counts below 2^53 are exact in a double
        out[3] = (double)c1;
        out[4] = (double)c2;
        out[5] = q;
    }
}

// counters (6 * rows): per pass, the row's chunk_stats blocks done (ATS_DONE), its screened keys (ATS_SCREENED) and
// its select_rows blocks done (ATS_SELECTED).
#define ATS_DONE 0
#define ATS_SCREENED 1
#define ATS_SELECTED 2
#define ATS_COUNTER_KINDS 3
__device__ __forceinline__ long long counter_at(int pass, int kind, long long rows, long long row) {
    return ((long long)ATS_COUNTER_KINDS * pass + kind) * rows + row;
}

// The largest finite value of row_weights[start, stop) (-inf where none is finite), in every thread of the block:
// each thread's positions, then warp shuffles and the warps' maxima (a maximum: the order does not matter).
// Called by every thread of the block.
template <typename T>
__device__ double block_finite_max(BlockStats& b, const T* __restrict__ row_weights, long long start, long long stop) {
    double top = -ATS_INF;
    for (long long p = start + threadIdx.x; p < stop; p += blockDim.x) {
        const double x = widen(row_weights[p]);
        if (isfinite(x) && x > top) top = x;
    }
    top = warp_max(top);
    if ((threadIdx.x & 31u) == 0u) b.top[threadIdx.x >> 5] = top;
    __syncthreads();
    for (unsigned int i = 0; i < (blockDim.x >> 5); ++i) top = b.top[i] > top ? b.top[i] : top;
    __syncthreads();  // every thread has read b.top before it is written again
    return top;
}

// The largest finite logit of each row: block (row, chunk) reduces its chunk and atomicMax-es the row's slot.
template <typename T>
__device__ void row_max(const T* __restrict__ weights, long long size, int nchunks, long long chunk,
                        unsigned long long* __restrict__ rowmax) {
    __shared__ BlockStats block_stats;
    const long long row = blockIdx.x / nchunks;
    const long long start = (blockIdx.x % nchunks) * chunk;
    const double top = block_finite_max(block_stats, weights + row * size, start, min(size, start + chunk));
    if (threadIdx.x == 0 && top > -ATS_INF) atomicMax(rowmax + row, ordered_bits(top));
}

#if ATS_IN_GROUP(1)
extern "C" __global__ void row_max_f32(const float* weights, long long size, int nchunks, long long chunk,
                                       unsigned long long* rowmax) {
    row_max<float>(weights, size, nchunks, chunk, rowmax);
}
#endif

#if ATS_IN_GROUP(2)
extern "C" __global__ void row_max_f64(const double* weights, long long size, int nchunks, long long chunk,
                                       unsigned long long* rowmax) {
    row_max<double>(weights, size, nchunks, chunk, rowmax);
}
#endif

// The t with W t - S t^2 / 2 = want (the smaller root), below which at least `want` of the keys of weights with sum
// W and sum of squares S fall in expectation (1 - exp(-a t) >= a t - (a t)^2 / 2); +inf where there is none (W not
// positive and finite, S > W^2 / (2 want)) or t is not a positive finite double.
__device__ __forceinline__ double count_bound(double want, double total, double squares) {
    if (!(total > 0.0) || !isfinite(total)) return ATS_INF;
    const double disc = total * total - 2.0 * squares * want;
    if (!(isfinite(disc) && disc > 0.0)) return ATS_INF;
    const double t = 2.0 * want / (total + sqrt(disc));
    return (t > 0.0 && t < ATS_INF) ? t : ATS_INF;
}

// The first tile's bound of select_range (block-uniform; called by every thread): count_bound of the tile's weights
// (about `want` of its keys below it), or +inf where the tile has bad or too few usable weights or t would not be
// below the row's shared bound (row_bound null: none). Thread 0's reading of the shared bound becomes
// every thread's (*shared), so that whether the first tile is taken again is block-uniform.
__device__ double first_bound(BlockStats& b, double want, double total, double squares, int usable, int bad,
                              const unsigned long long* row_bound, long long row, double* shared) {
    const unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    total = warp_sum(total);
    squares = warp_sum(squares);
    usable = warp_sum(usable);
    bad = warp_sum(bad);
    if (lane == 0) {
        b.sum[warp] = total;
        b.top[warp] = squares;
        b.count[0][warp] = usable;
        b.count[1][warp] = bad;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double w = 0.0, q = 0.0;
        long long u = 0, d = 0;
        for (unsigned int i = 0; i < (blockDim.x >> 5); ++i) {
            w += b.sum[i];
            q += b.top[i];
            u += b.count[0][i];
            d += b.count[1][i];
        }
        const double t = (d == 0 && (double)u >= want) ? count_bound(want, w, q) : ATS_INF;
        const double limit = row_bound ? shared_bound(row_bound, row) : ATS_INF;
        b.sum[0] = t < limit ? t : ATS_INF;
        b.top[0] = limit;
    }
    __syncthreads();
    const double t = b.sum[0];
    *shared = b.top[0];
    __syncthreads();  // every thread has read the result before the storage is used again
    return t;
}

// The row's statistics from its chunks into out[0..ATS_STATS) (total, largest finite weight, counts, squares):
// thread t adds chunks t, t + blockDim.x, ... in order, then reduce_stats' fixed tree. The order depends on the
// block size and the chunk count only (the plan), never on timing. Called by every thread of the block. `stats` is
// read past this SM's L1 (chunk_stats' last block reads what the row's other blocks wrote).
__device__ void row_stats(BlockStats& b, double* out, const double* stats, long long row, int nchunks) {
    double sum = 0.0, top = 0.0, squares = 0.0;
    long long nonfinite = 0, negative = 0, positive = 0;
    for (int c = threadIdx.x; c < nchunks; c += blockDim.x) {
        const volatile double* at = stats + (row * nchunks + c) * ATS_STATS;
        sum += at[0];
        const double t = at[1];
        top = t > top ? t : top;
        nonfinite += (long long)at[2];
        negative += (long long)at[3];
        positive += (long long)at[4];
        squares += at[5];
    }
    reduce_stats(b, out, sum, top, nonfinite, negative, positive, squares);
}

// A row's plan (row_plan[pass * rows + row], written by chunk_stats, read by chunk_topn and finish_rows): from its
// statistics `row` (row_stats), ATS_PLAN_SKIP for pass 0 of a row that pass 1 rescales, a finite t > 0 for a row
// screened below t (a valid row where at least ATS_SCREEN_WANT(n) keys are expected below t: count_bound of the
// row's sum W and sum of squares S), or +inf for a row selected chunk by chunk (bad rows, rows
// too short or too uneven for the bound: S > W^2 / (2 want), and every row when capacity is 0).
//
// Screening keeps every key at most t. With at least n of them (probability about 1 - 1e-9 with want = n + 6
// sqrt(n) + 16 expected, Poisson-like), the row's n smallest keys are all at most t, so they are among the kept;
// with fewer, or more than the buffer's `capacity` (about twice want: sampling.py), finish_rows selects the row
// alone, exactly.
#ifndef ATS_SCREEN_WANT
#define ATS_SCREEN_WANT(n) ((double)(n) + 6.0 * sqrt((double)(n)) + 16.0)
#endif
#define ATS_PLAN_SKIP (-1.0)

__device__ double row_plan_of(const double* row, int n, int capacity, int is_double, int pass) {
    const long long nonfinite = (long long)row[2], negative = (long long)row[3], positive = (long long)row[4];
    if (!pass && rescale_shift_of(nonfinite, positive, exponent_of(row[1]), is_double)) return ATS_PLAN_SKIP;
    if (capacity <= 0 || capacity > ATS_CAPACITY || nonfinite != 0 || negative != 0) return ATS_INF;
    const double want = ATS_SCREEN_WANT(n);
    return (double)positive < want ? ATS_INF : count_bound(want, row[0], row[5]);
}

// The n smallest (key, position) pairs of the row's positions [start, stop) into s.u.list, sorted (values:
// positions relative to start); returns how many (fewer than n where fewer weights are positive). Called by every
// thread of the block. row_bound: the row's shared bound, read and published (chunk_topn), or null (finish_rows
// selecting a row alone).
//
// Offers up to the current n-th best key are appended in position order (a block scan) to the buffer, which
// cub::BlockRadixSort compacts when it is about full (stable, so ties go to the lower position); a key is computed
// only when the high Philox word cannot rule it out (1 - u >= a t implies -log(u) / a >= t). The next tile's
// weights and the shared bound are read a tile ahead (any bound read earlier is valid), so their latency overlaps
// the current tile's work and barriers. The first tile takes keys only below its own bound (the CPU kernel's first
// bound, on the tile's weights): below it the tile holds about `want` keys, so that few are computed, offered and
// sorted before the first threshold. If fewer than n fall below it, the tile is taken again without it (exact
// either way). Block-uniform, like the shared bound the first tile uses (thread 0's reading). Not inlined, like the
// streaming loops: its own registers (ptxas, sm_90: chunk_topn_f32 then spills nothing, from 16 bytes).
template <typename T>
__device__ __noinline__ int select_range(TopN& s, BlockStats& block_stats, const T* __restrict__ row_weights, long long row,
                            long long start, long long stop, int n, unsigned long long seed, int logits,
                            double top_logit, int shift, unsigned long long* __restrict__ row_bound) {
    Selection sel;
    T ahead[ATS_PER_THREAD];
    load_lanes(row_weights, start + ATS_PER_THREAD * (long long)threadIdx.x, stop, ahead);
    double shared_ahead = row_bound ? shared_bound(row_bound, row) : ATS_INF;
    double head_bound = ATS_INF;
    const double want = ATS_HEAD_WANT(n);
    if (want <= (double)ATS_TILE) {  // block-uniform
        double total = 0.0, squares = 0.0;
        int usable = 0, bad = 0;
#pragma unroll
        for (int lane = 0; lane < ATS_PER_THREAD; ++lane) {
            if (start + ATS_PER_THREAD * (long long)threadIdx.x + lane >= stop) break;
            const double a = weight_of(ahead[lane], logits, top_logit, shift);
            bad += !(a >= 0.0) || !isfinite(a);
            if (a > 0.0 && isfinite(a)) {
                total += a;
                squares += a * a;
                ++usable;
            }
        }
        head_bound = first_bound(block_stats, want, total, squares, usable, bad, row_bound, row, &shared_ahead);
    }
    bool again = false;  // the first tile again, without head_bound
    T raw[ATS_PER_THREAD];
    double shared_limit = 0.0;
    for (long long tile = start; tile < stop;) {
        const long long first = tile + ATS_PER_THREAD * (long long)threadIdx.x;
        if (!again) {
#pragma unroll
            for (int lane = 0; lane < ATS_PER_THREAD; ++lane) raw[lane] = ahead[lane];
            shared_limit = shared_ahead;
            if (tile + ATS_TILE < stop) {
                load_lanes(row_weights, first + ATS_TILE, stop, ahead);
                if (row_bound) shared_ahead = shared_bound(row_bound, row);
            }
        }
        if (topn_needs_compaction(sel, n)) {
            topn_compact(s, sel, n);
            if (row_bound && threadIdx.x == 0 && sel.kept == n) publish_bound(row_bound, row, sel.threshold);
        }
        const double limit = fmin(fmin(sel.threshold, shared_limit), head_bound);
        const double bound = limit * ATS_REJECT_MARGIN;
        bool offered[ATS_PER_THREAD] = {};
        double keys[ATS_PER_THREAD];
        unsigned int offsets[ATS_PER_THREAD];
        if (first < stop) {
            PhiloxWords hi, lo;
            bool have_hi = false, have_lo = false;
#pragma unroll
            for (int lane = 0; lane < ATS_PER_THREAD; ++lane) {
                const long long p = first + lane;
                if (p >= stop) break;
                const double a = weight_of(raw[lane], logits, top_logit, shift);
                if (!(a > 0.0) || !isfinite(a)) continue;
                if (!have_hi) {
                    hi = block_words((unsigned long long)first >> 2, (unsigned int)row, ATS_STREAM_HI, seed);
                    have_hi = true;
                }
                if (!(headroom(hi.w[lane]) < a * bound)) continue;
                if (!have_lo) {
                    lo = block_words((unsigned long long)first >> 2, (unsigned int)row, ATS_STREAM_LO, seed);
                    have_lo = true;
                }
                keys[lane] = -log(to_uniform(hi.w[lane], lo.w[lane])) / a;
                offsets[lane] = (unsigned int)(p - start);  // a range holds at most 2^31 positions (plan)
                offered[lane] = keys[lane] <= limit;
            }
        }
        topn_offer(s, sel, offered, keys, offsets);
        if (head_bound < ATS_INF) {  // block-uniform: the first tile is done
            head_bound = ATS_INF;
            if (sel.count < n) {  // too few keys below the tile's bound: the tile again (sel.kept is 0)
                sel.count = 0;
                again = true;
                continue;
            }
        }
        again = false;
        tile += ATS_TILE;
    }
    topn_compact(s, sel, n);
    if (row_bound && threadIdx.x == 0 && sel.kept == n) publish_bound(row_bound, row, sel.threshold);
    return sel.kept;
}

#ifndef ATS_SCREEN_UNROLL
#define ATS_SCREEN_UNROLL 4  // tiles of float32 weights a thread loads before using them (loads in flight)
#endif
// The streaming loops' unrolling for weights of type T: ATS_SCREEN_UNROLL tiles of float32, half as many of float64
// (the same bytes in flight; four tiles of doubles took 32 registers for the loads alone and spilled).
template <typename T>
__host__ __device__ constexpr int unroll_of() {
    return sizeof(T) == 8 ? (ATS_SCREEN_UNROLL + 1) / 2 : ATS_SCREEN_UNROLL;
}

// Whether every one of a thread's float32 weights is a positive normal number (bits 0x00800000 to 0x7F7FFFFF: not
// zero, subnormal, negative, infinite or NaN), the plain loops' common case: one unsigned maximum per weight.
template <int UNROLL>
__device__ __forceinline__ bool positive_normals(const float (&raw)[UNROLL][ATS_PER_THREAD]) {
    unsigned int above = 0u;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
        for (int lane = 0; lane < ATS_PER_THREAD; ++lane) {
            const unsigned int offset = __float_as_uint(raw[u][lane]) - 0x00800000u;
            above = offset > above ? offset : above;
        }
    }
    return above < 0x7F000000u;
}

// One tile of screen_range: the keys of positions at to at + 3 (those below stop) that the high words `hi` do not
// rule out. FAST: all four inside the range and positive normal float32 weights, taken as they are.
template <bool FAST, bool PLAIN, typename T>
__device__ __forceinline__ void screen_tile(const T (&raw)[ATS_PER_THREAD], const PhiloxWords& hi, long long at,
                                            long long stop, long long row, unsigned long long seed, int logits,
                                            double top_logit, int shift, double t, double bound, unsigned int* count,
                                            int capacity, double* __restrict__ keys,
                                            long long* __restrict__ positions) {
    double a[ATS_PER_THREAD];
    bool hit[ATS_PER_THREAD];
    bool need = false;
#pragma unroll
    for (int lane = 0; lane < ATS_PER_THREAD; ++lane) {
        if constexpr (FAST) {
            a[lane] = (double)raw[lane];
        } else {
            a[lane] = at + lane < stop ? weight_as<PLAIN>(raw[lane], logits, top_logit, shift) : 0.0;
        }
        hit[lane] = (FAST || a[lane] > 0.0) && headroom(hi.w[lane]) < a[lane] * bound;
        need |= hit[lane];
    }
    if (!need) return;
    const PhiloxWords lo = block_words((unsigned long long)at >> 2, (unsigned int)row, ATS_STREAM_LO, seed);
#pragma unroll
    for (int lane = 0; lane < ATS_PER_THREAD; ++lane) {
        if (!hit[lane]) continue;
        const double key = -log(to_uniform(hi.w[lane], lo.w[lane])) / a[lane];
        if (!(key <= t)) continue;
        const unsigned int slot = atomicAdd(count, 1u);
        if (slot < (unsigned int)capacity) {
            keys[slot] = key;
            positions[slot] = at + lane;
        }
    }
}

// Screening: every key of positions [start, stop) at most t goes to the row's buffer (keys, positions) at a slot
// taken from *count (slots past `capacity` are counted, not written; finish_rows then selects the row alone). No
// barrier: each thread streams its positions, ATS_SCREEN_UNROLL tiles of loads at a time; the high Philox word
// rules out nearly every key (1 - u >= a t implies -log(u) / a >= t), so few keys are computed and fewer kept.
template <bool PLAIN, typename T>
__device__ __noinline__ void screen_range(const T* __restrict__ row_weights, long long row, long long start, long long stop,
                             unsigned long long seed, int logits, double top_logit, int shift, double t,
                             unsigned int* count, int capacity, double* __restrict__ keys,
                             long long* __restrict__ positions) {
    constexpr int UNROLL = unroll_of<T>();
    const double bound = t * ATS_REJECT_MARGIN;
    for (long long first = start + ATS_PER_THREAD * (long long)threadIdx.x; first < stop;
         first += (long long)ATS_TILE * UNROLL) {
        T raw[UNROLL][ATS_PER_THREAD];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) load_lanes(row_weights, first + (long long)u * ATS_TILE, stop, raw[u]);
        PhiloxWords his[UNROLL];  // independent generator chains, interleaved by the compiler
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            his[u] = block_words((unsigned long long)(first + (long long)u * ATS_TILE) >> 2, (unsigned int)row,
                                 ATS_STREAM_HI, seed);
        }
        if constexpr (PLAIN && sizeof(T) == 4) {
            if (first + (long long)(UNROLL - 1) * ATS_TILE + ATS_PER_THREAD <= stop && positive_normals<UNROLL>(raw)) {
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    screen_tile<true, PLAIN>(raw[u], his[u], first + (long long)u * ATS_TILE, stop, row, seed, logits,
                                             top_logit, shift, t, bound, count, capacity, keys, positions);
                }
                continue;
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const long long at = first + (long long)u * ATS_TILE;
            if (at >= stop) break;
            screen_tile<false, PLAIN>(raw[u], his[u], at, stop, row, seed, logits, top_logit, shift, t, bound, count,
                                      capacity, keys, positions);
        }
    }
}

// screen_range for weights as they are (PLAIN) or for logits or rescaled weights.
template <typename T>
__device__ __forceinline__ void screen_weights(const T* __restrict__ row_weights, long long row, long long start,
                                               long long stop, unsigned long long seed, int logits, double top_logit,
                                               int shift, double t, unsigned int* count, int capacity,
                                               double* __restrict__ keys, long long* __restrict__ positions) {
    if (!logits && !shift) {
        screen_range<true>(row_weights, row, start, stop, seed, logits, top_logit, shift, t, count, capacity, keys,
                           positions);
    } else {
        screen_range<false>(row_weights, row, start, stop, seed, logits, top_logit, shift, t, count, capacity, keys,
                            positions);
    }
}

// Block (row, chunk) of a launch over rows * nchunks blocks: its row, positions [start, stop), the power of two
// pass 1 rescales the row by (rescale_shift), and whether the block has nothing to do (pass 1, a row not rescaled).
struct ChunkItem {
    long long item, rows, row, start, stop;
    int shift;
    bool skip;
};

template <typename T>
__device__ __forceinline__ ChunkItem chunk_item(long long size, int nchunks, long long chunk, int logits, int pass,
                                                const long long* status) {
    ChunkItem c;
    c.item = blockIdx.x;
    c.rows = gridDim.x / nchunks;
    c.row = c.item / nchunks;
    c.shift = pass ? rescale_shift(status + c.row * 4, sizeof(T) == 8 || logits) : 0;
    c.skip = pass && !c.shift;
    c.start = (c.item % nchunks) * chunk;
    c.stop = min(size, c.start + chunk);
    return c;
}

// Block (row, chunk) after chunk_stats: a screened row's keys at most its plan's t into the row's buffer
// (screen_range), a selected row's chunk n smallest keys into the chunk's candidate list (select_range); nothing for
// pass 0 of a row that pass 1 redoes. Called by every thread of the block (c not skipped).
template <typename T>
__device__ void chunk_select(TopN& s, BlockStats& block_stats, const ChunkItem& c, const T* __restrict__ weights,
                             long long size, int n, unsigned long long seed,
                             const unsigned long long* __restrict__ seed_ptr, int logits,
                             const unsigned long long* __restrict__ rowmax, int pass,
                             unsigned long long* __restrict__ row_bound, double* __restrict__ cand_keys,
                             long long* __restrict__ cand_idx, int* __restrict__ cand_count, int capacity,
                             const double* __restrict__ row_plan, unsigned int* __restrict__ counters,
                             double* __restrict__ screen_keys, long long* __restrict__ screen_idx) {
    const long long item = c.item, rows = c.rows, row = c.row, start = c.start, stop = c.stop;
    const double plan = row_plan[pass * rows + row];
    if (plan == ATS_PLAN_SKIP) return;  // pass 0 of a row that pass 1 redoes
    seed = effective_seed(seed, seed_ptr);
    const double top_logit = logits ? logits_top(rowmax, row) : 0.0;
    const T* row_weights = weights + row * size;
    if (plan < ATS_INF) {  // block-uniform
        screen_weights(row_weights, row, start, stop, seed, logits, top_logit, c.shift, plan,
                       counters + counter_at(pass, ATS_SCREENED, rows, row), capacity, screen_keys + row * capacity,
                       screen_idx + row * capacity);
        return;
    }
    const int kept = select_range(s, block_stats, row_weights, row, start, stop, n, seed, logits, top_logit, c.shift,
                                  row_bound);
    for (int i = threadIdx.x; i < kept; i += blockDim.x) {
        cand_keys[item * n + i] = __longlong_as_double((long long)s.u.list.keys[i]);
        cand_idx[item * n + i] = start + s.u.list.values[i];
    }
    if (threadIdx.x == 0) cand_count[item] = kept;
}

// One block per (row, chunk): chunk_select (finish_rows then finishes the rows).
template <typename T>
__device__ void chunk_topn(const T* __restrict__ weights, long long size, int nchunks, long long chunk, int n,
                           unsigned long long seed, const unsigned long long* __restrict__ seed_ptr, int logits,
                           const unsigned long long* __restrict__ rowmax, int pass, const long long* __restrict__ status,
                           unsigned long long* __restrict__ row_bound, double* __restrict__ cand_keys,
                           long long* __restrict__ cand_idx, int* __restrict__ cand_count, int capacity,
                           const double* __restrict__ row_plan, unsigned int* __restrict__ counters,
                           double* __restrict__ screen_keys, long long* __restrict__ screen_idx) {
    __shared__ TopN s;
    __shared__ BlockStats block_stats;
    const ChunkItem c = chunk_item<T>(size, nchunks, chunk, logits, pass, status);
    if (c.skip) return;  // the whole block
    chunk_select<T>(s, block_stats, c, weights, size, n, seed, seed_ptr, logits, rowmax, pass, row_bound, cand_keys,
                    cand_idx, cand_count, capacity, row_plan, counters, screen_keys, screen_idx);
}

#define ATS_CHUNK_TOPN(suffix, T)                                                                                     \
    extern "C" __global__ void ATS_SELECT_BOUNDS chunk_topn_##suffix(                                                  \
        const T* weights, long long size, int nchunks, long long chunk, int n, unsigned long long seed,               \
        const unsigned long long* seed_ptr, int logits, const unsigned long long* rowmax, int pass,                   \
        const long long* status, unsigned long long* row_bound, double* cand_keys, long long* cand_idx,               \
        int* cand_count, int capacity, const double* row_plan, unsigned int* counters, double* screen_keys,           \
        long long* screen_idx) {                                                                                      \
        chunk_topn<T>(weights, size, nchunks, chunk, n, seed, seed_ptr, logits, rowmax, pass, status, row_bound,     \
                      cand_keys, cand_idx, cand_count, capacity, row_plan, counters, screen_keys, screen_idx);       \
    }
#if ATS_IN_GROUP(1)
ATS_CHUNK_TOPN(f32, float)
#endif
#if ATS_IN_GROUP(2)
ATS_CHUNK_TOPN(f64, double)
#endif

// A chunk's statistics, as chunk_stats reduces them (counts as the CPU kernel takes them: -inf is negative, +inf
// positive; the largest finite weight, 0 below).
struct ChunkSums {
    double sum = 0.0, top = 0.0, squares = 0.0;
    int nonfinite = 0, negative = 0, positive = 0;  // a chunk holds fewer than 2^31 positions (plan)
};

// A plain float32 weight's statistics from its bits, as the general path takes them from the widened double (CuPy's
// -ftz=true may flush subnormals in float32 arithmetic and comparisons, never in integer tests of the bits):
// negative and positive counts (-inf and +inf included, NaN in neither), non-finite count; the sums and the
// largest weight (as the bits of a non-negative float, which order as their values) over finite weights only (a
// row with a non-finite weight is refused: its sum is never used). Fewer live doubles than the general path.
__device__ __forceinline__ void add_plain_bits(ChunkSums& t, unsigned int& top_bits, float x) {
    const unsigned int bits = __float_as_uint(x), magnitude = bits & 0x7FFFFFFFu;
    const bool minus = (bits >> 31) != 0u;
    const bool number = magnitude != 0u && magnitude <= 0x7F800000u;  // not a zero, not NaN
    t.negative += minus && number;
    t.positive += !minus && number;
    if (magnitude >= 0x7F800000u) {
        ++t.nonfinite;
        return;
    }
    if (!minus && bits > top_bits) top_bits = bits;
    const double a = widen(x);
    t.sum += a;
    t.squares += a * a;
}

// This thread's part of positions [start, stop) of a row (PLAIN: weight_as; plain float32: add_plain_bits). Not inlined: each version gets its
// own registers, and ptxas reports each (inlined into chunk_stats beside exp and ldexp, the loop spilled 84 bytes
// at 64 registers). The sums are returned, not accumulated through a reference: that put them in local memory.
template <bool PLAIN, typename T, int UNROLL = unroll_of<T>()>
__device__ __noinline__ ChunkSums stats_range(const T* __restrict__ row_weights, long long start, long long stop,
                                              int logits, double top_logit, int shift) {
    ChunkSums t;
    constexpr bool BITS = PLAIN && sizeof(T) == 4;
    unsigned int top_bits = 0u;  // BITS: the largest finite non-negative weight's bits
    // UNROLL tiles (of the block's own size: ATS_STATS_THREADS threads, more than a selecting block, for more
    // loads in flight per SM; unroll_of<T>() unless sample_rows asks for more) loaded before any is added, added
    // in tile order: the sums depend on the block size (the plan), not on the unrolling
    // positions as 32-bit offsets from the chunk's start: fewer registers (a chunk holds at most MAX_CHUNK, 2^16
    // short of 2^31: an offset stepped past the end stays an int)
    const T* __restrict__ chunk_weights = row_weights + start;
    const int count = (int)(stop - start);
    const int tile = ATS_PER_THREAD * (int)blockDim.x;
    for (int first = ATS_PER_THREAD * (int)threadIdx.x; first < count; first += tile * UNROLL) {
        T raw[UNROLL][ATS_PER_THREAD];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) load_lanes(chunk_weights, first + u * tile, count, raw[u]);
        if constexpr (BITS) {
            // every position of the group inside the chunk and a positive normal weight: what add_plain_bits does
            // with each, in the same order, without its tests (widening a normal float32 is exact under -ftz)
            if (first + (UNROLL - 1) * tile + ATS_PER_THREAD <= count && positive_normals<UNROLL>(raw)) {
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
                    for (int lane = 0; lane < ATS_PER_THREAD; ++lane) {
                        const unsigned int bits = __float_as_uint(raw[u][lane]);
                        top_bits = bits > top_bits ? bits : top_bits;
                        const double a = (double)raw[u][lane];
                        t.sum += a;
                        t.squares += a * a;
                    }
                }
                t.positive += UNROLL * ATS_PER_THREAD;
                continue;
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
            for (int lane = 0; lane < ATS_PER_THREAD; ++lane) {
                if (first + u * tile + lane >= count) break;
                if constexpr (BITS) {
                    add_plain_bits(t, top_bits, raw[u][lane]);
                    continue;
                }
                const double a = weight_as<PLAIN>(raw[u][lane], logits, top_logit, shift);
                t.sum += a;
                t.negative += a < 0.0;  // counted as the CPU kernel does: -inf is negative, +inf positive
                t.positive += a > 0.0;
                if (!isfinite(a)) {
                    ++t.nonfinite;
                    continue;
                }
                t.top = a > t.top ? a : t.top;
                t.squares += a * a;
            }
        }
    }
    if constexpr (BITS) t.top = widen(__uint_as_float(top_bits));
    return t;
}

// stats_range for weights as they are (PLAIN) or for logits or rescaled weights, UNROLL tiles at a time.
template <typename T, int UNROLL = unroll_of<T>()>
__device__ __forceinline__ ChunkSums stats_weights(const T* __restrict__ row_weights, long long start, long long stop,
                                                   int logits, double top_logit, int shift) {
    return (!logits && !shift) ? stats_range<true, T, UNROLL>(row_weights, start, stop, logits, top_logit, shift)
                               : stats_range<false, T, UNROLL>(row_weights, start, stop, logits, top_logit, shift);
}

// The statistics of every path: one block per (row, chunk) of ATS_SELECT_THREADS threads (sum, largest finite
// weight, counts, sum of squares), without the selection's shared memory and register cap, so many blocks share an
// SM. With `planned` (without replacement, before chunk_topn), the row's last block to finish (a count in
// counters) adds the row's statistics and writes its plan (row_plan_of).
template <typename T>
__device__ void chunk_stats(const T* __restrict__ weights, long long size, int nchunks, long long chunk, int logits,
                            const unsigned long long* __restrict__ rowmax, int pass,
                            const long long* __restrict__ status, double* __restrict__ stats, int n, int planned,
                            int capacity, unsigned int* __restrict__ counters, double* __restrict__ row_plan) {
    __shared__ BlockStats block_stats;
    __shared__ double row_info[ATS_STATS];
    __shared__ int last;
    const ChunkItem c = chunk_item<T>(size, nchunks, chunk, logits, pass, status);
    if (c.skip) return;  // the whole block
    const long long item = c.item, rows = c.rows, row = c.row, start = c.start, stop = c.stop;
    const int shift = c.shift;
    const double top_logit = logits ? logits_top(rowmax, row) : 0.0;
    const T* row_weights = weights + row * size;
    const ChunkSums t = stats_weights(row_weights, start, stop, logits, top_logit, shift);
    reduce_stats(block_stats, stats + item * ATS_STATS, t.sum, t.top, t.nonfinite, t.negative, t.positive, t.squares);
    if (!planned) return;
    if (threadIdx.x == 0) {
        __threadfence();  // this chunk's statistics before its count
        last = atomicAdd(counters + counter_at(pass, ATS_DONE, rows, row), 1u) == (unsigned int)nchunks - 1u;
    }
    __syncthreads();
    if (!last) return;  // block-uniform
    __threadfence();
    row_stats(block_stats, row_info, stats, row, nchunks);
    __syncthreads();
    if (threadIdx.x == 0) row_plan[pass * rows + row] = row_plan_of(row_info, n, capacity, sizeof(T) == 8 || logits, pass);
}

#define ATS_CHUNK_STATS(suffix, T)                                                                                    \
    extern "C" __global__ void __launch_bounds__(ATS_STATS_THREADS, 2) chunk_stats_##suffix(                       \
        const T* weights, long long size, int nchunks, long long chunk, int logits, const unsigned long long* rowmax, \
        int pass, const long long* status, double* stats, int n, int planned, int capacity, unsigned int* counters,   \
        double* row_plan) {                                                                                           \
        chunk_stats<T>(weights, size, nchunks, chunk, logits, rowmax, pass, status, stats, n, planned, capacity,      \
                       counters, row_plan);                                                                           \
    }
#if ATS_IN_GROUP(1)
ATS_CHUNK_STATS(f32, float)
#endif
#if ATS_IN_GROUP(2)
ATS_CHUNK_STATS(f64, double)
#endif

// A probability into `probs`: float64, or (single) float32 rounded to nearest even with subnormal results kept,
// as NumPy's cast gives it (CuPy compiles with -ftz=true, which may flush them in a conversion).
__device__ __forceinline__ void store_prob(void* probs, long long at, double p, int single) {
    if (!single) {
        static_cast<double*>(probs)[at] = p;
        return;
    }
    const double magnitude = fabs(p);
    float out;
    if (magnitude < 0x1.0p-126) {
        const unsigned int bits = (unsigned int)rint(magnitude * 0x1.0p149);  // the subnormal's bits (2^23: FLT_MIN)
        out = __uint_as_float(bits | (p < 0.0 ? 0x80000000u : 0u));
    } else {
        out = (float)p;
    }
    static_cast<float*>(probs)[at] = out;
}

__device__ __forceinline__ void write_coords(int* indices, long long at, long long position, int dims, long long g0,
                                             long long g1, long long g2) {
    // integer division and remainder, never unravel_index (rule R4); grid (g0, g1, g2) of `dims` dimensions
    const long long g[3] = {g0, g1, g2};
    for (int d = dims - 1; d >= 0; --d) {
        indices[at * dims + d] = (int)(position % g[d]);
        position /= g[d];
    }
}

// A row's draws: the positions position_of(k) of its `kept` smallest keys in order (k < kept), as grid coordinates
// and probabilities (a / total where the row is valid, else 0), then fillers (rule R1) up to n. Called by every
// thread of the block, the selection complete.
template <typename T, typename PositionOf>
__device__ void write_draws(const PositionOf& position_of, int kept, long long row, int n,
                            const T* __restrict__ row_weights, long long size, int logits, double top_logit, int shift,
                            int valid, double total, int dims, long long g0, long long g1, long long g2,
                            int* __restrict__ indices, void* __restrict__ probs, int single) {
    for (int k = threadIdx.x; k < kept; k += blockDim.x) {
        const long long position = position_of(k);
        const long long at = row * n + k;
        write_coords(indices, at, position, dims, g0, g1, g2);
        const double a = weight_at(row_weights, position, logits, top_logit, shift);
        store_prob(probs, at, (valid && a > 0.0) ? a / total : 0.0, single);
    }
    if (threadIdx.x == 0) {
        // Fillers (rule R1): the lowest positions without positive weight, in increasing order, probability 0.
        // At most 2n positions are looked at: the row has fewer than n positive ones.
        int k = kept;
        for (long long p = 0; p < size && k < n; ++p) {
            if (!(weight_at(row_weights, p, logits, top_logit, shift) > 0.0)) {
                write_coords(indices, row * n + k, p, dims, g0, g1, g2);
                store_prob(probs, row * n + k++, 0.0, single);
            }
        }
        for (; k < n; ++k) {  // not reached for a valid row; keeps a bad one in range
            write_coords(indices, row * n + k, 0, dims, g0, g1, g2);
            store_prob(probs, row * n + k, 0.0, single);
        }
    }
}

// A row's status (atskern._validation.STATUS_COLUMNS) into out[0..4) from its statistics (row_stats).
__device__ __forceinline__ void write_row_status(long long* out, const double* stats) {
    out[0] = (long long)stats[2];
    out[1] = (long long)stats[3];
    out[2] = (long long)stats[4];
    out[3] = exponent_of(stats[1]);
}

// Whether a row's statistics pass validation: no non-finite or negative weight, a positive one.
__device__ __forceinline__ int valid_row(const double* stats) {
    return stats[2] == 0.0 && stats[3] == 0.0 && stats[4] > 0.0;
}

// Whether this block is the last of `rows` to count itself done in *done (zeroed before the launch; a one-row
// launch needs no count): the one that writes the summary row. Called by one thread, after the block's status
// writes, which the fence puts before the count.
__device__ __forceinline__ int last_to_finish(unsigned long long* done, long long rows) {
    __threadfence();
    return rows == 1 || atomicAdd(done, 1ull) == (unsigned long long)rows - 1ull;
}

struct RowInfo {
    double stats[ATS_STATS];  // row_stats
    double total;
    double top_logit;
    double bound;  // the row's shared bound when the merge starts
    int shift;
    int skip;
    int valid;
    int redo;  // pass 0 of a row that pass 1 redoes: no merge
    int last;  // this block is the last to write its row's status: it writes the summary row
};

// A read of data the kernel's own blocks may have written during this launch (COHERENT: select_rows' finish, at the
// L2 where the writers' fence put it, never a stale line of this SM's L1) or that an earlier launch wrote (a plain
// load: finish_rows, which then keeps its registers unspilled).
template <bool COHERENT, typename V>
__device__ __forceinline__ V load_written(const V* p) {
    if (COHERENT) return __ldcg(p);
    return *p;
}

// How many leading entries of a list sorted by key are at most `bound`: a galloping then a binary search, about
// 2 log2(answer) reads (a chunk's list mostly holds few keys under a good bound).
template <bool COHERENT>
__device__ int prefix_at_most(const double* keys, int count, double bound) {
    if (count <= 0 || !(load_written<COHERENT>(keys) <= bound)) return 0;
    int good = 1, bad = count + 1;  // keys[good - 1] <= bound; bad: count + 1 or keys[bad - 1] > bound
    for (int probe = 2; probe <= count; probe *= 2) {
        if (load_written<COHERENT>(keys + probe - 1) <= bound) {
            good = probe;
        } else {
            bad = probe;
            break;
        }
    }
    while (bad - good > 1) {
        const int mid = good + (bad - good) / 2;
        if (load_written<COHERENT>(keys + mid - 1) <= bound) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    return good;
}

// The merge of finish_rows: the row's exact n smallest (key, slot) pairs of its chunk lists into s.u.list (values:
// slots, chunk c's i-th entry at c * n + i); returns how many (min(n, candidates)). Called by every thread.
//
// Only the keys at most `bound`, an upper bound of the row's n-th smallest key, can be among them, and each chunk's
// list is sorted by (key, position), so they are a prefix of each list. The bound is the smallest of the row's
// shared bound (chunk_topn: a block's n-th best key) and, when the lists hold more than a buffer, the n-th smallest
// of the lists' heads (the first j entries of each chunk: n of the row's keys are at most it), taken on the keys'
// high 32 bits (half the radix passes) and rounded up to the largest key with the same high bits. The prefixes
// are gathered in slot order (a scan over the chunks), which is the position order, and one stable sort by key
// orders them by (key, position), the reference's order. Where they do not fit the buffer (exact ties of many
// keys, +inf keys), every slot is offered tile by tile up to the bound, compacting as chunk_topn does.
// Not inlined: finish_rows then spills nothing at 256 threads and MIN_BLOCKS 2 (ptxas, CUDA 13).
template <bool COHERENT>
__device__ __noinline__ int merge_lists(TopN& s, int* lens, int* offs, const double* __restrict__ keys, const int* __restrict__ counts,
                           int nchunks, int n, double bound) {
    if ((long long)nchunks * n > ATS_CAPACITY) {
        const int j = min(n, max(1, (2 * n + nchunks - 1) / nchunks));  // about 2n heads
        const int heads = min(nchunks, ATS_CAPACITY / j) * j;  // the first chunks' heads: any n of them bound
        if (heads >= n) {
            for (int e = threadIdx.x; e < heads; e += blockDim.x) {
                const int c = e / j, i = e - c * j;
                s.u.list.keys[e] = i < load_written<COHERENT>(counts + c) ? key_bits(load_written<COHERENT>(keys + (long long)c * n + i)) : ATS_PAD_KEY;
                s.u.list.values[e] = (unsigned int)e;
            }
            sort_list(s, heads, n, 32);
            const unsigned long long high = s.u.list.keys[n - 1] >> 32;
            __syncthreads();  // every thread has read the n-th entry before the list is written again
            // the first n entries' high bits are at most `high`; +inf (0x7FF00000) or a pad bounds nothing
            if (high < (ATS_INF_BITS >> 32)) bound = fmin(bound, __longlong_as_double((long long)((high << 32) | 0xFFFFFFFFull)));
        }
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int total = 0;  // block-uniform
    for (int c0 = 0; c0 < nchunks; c0 += ATS_SELECT_THREADS) {
        const int c = c0 + (int)threadIdx.x;
        const int len = c < nchunks ? prefix_at_most<COHERENT>(keys + (long long)c * n, load_written<COHERENT>(counts + c), bound) : 0;
        int at = 0, sum = 0;
        BlockOffsets(s.scan).ExclusiveSum(len, at, sum);
        lens[threadIdx.x] = len;
        offs[threadIdx.x] = total + at;
        __syncthreads();
        if (total + sum <= ATS_CAPACITY) {  // block-uniform
            const int here = min(ATS_SELECT_THREADS, nchunks - c0);
            for (int l = warp; l < here; l += ATS_SELECT_THREADS / 32) {  // a warp per chunk, a lane per entry
                for (int i = lane; i < lens[l]; i += 32) {
                    const long long slot = (long long)(c0 + l) * n + i;
                    s.u.list.keys[offs[l] + i] = key_bits(load_written<COHERENT>(keys + slot));
                    s.u.list.values[offs[l] + i] = (unsigned int)slot;
                }
            }
        }
        total += sum;
        __syncthreads();  // lens, offs and the scan's storage are reused
    }
    if (total <= ATS_CAPACITY) {
        sort_list(s, total, min(n, total));
        return min(n, total);
    }
    Selection sel;
    const long long offers = (long long)nchunks * n;  // slots; below 2^31 (plan)
    for (long long tile = 0; tile < offers; tile += ATS_TILE) {
        if (topn_needs_compaction(sel, n)) topn_compact(s, sel, n);
        const double limit = fmin(sel.threshold, bound);
        bool offered[ATS_PER_THREAD] = {};
        double offer_keys[ATS_PER_THREAD];
        unsigned int slots[ATS_PER_THREAD];
#pragma unroll
        for (int lane_ = 0; lane_ < ATS_PER_THREAD; ++lane_) {
            // blocked: a thread's slots are consecutive, so the block offers them in slot order
            const long long slot = tile + ATS_PER_THREAD * (long long)threadIdx.x + lane_;
            if (slot >= offers) break;
            if ((int)(slot % n) >= load_written<COHERENT>(counts + slot / n)) continue;
            offer_keys[lane_] = load_written<COHERENT>(keys + slot);
            slots[lane_] = (unsigned int)slot;
            offered[lane_] = offer_keys[lane_] <= limit;
        }
        topn_offer(s, sel, offered, offer_keys, slots);
    }
    topn_compact(s, sel, n);
    return sel.kept;
}

// The summary row status[rows]: largest non-finite and negative counts, smallest positive count, and the number
// of rows whose exponent is outside SCALE_FREE_EXPONENTS. Called by every thread of the block that finished last
// (every row's status written and fenced before its block counted itself done), the list's memory free. With
// status_host (mapped host memory: atskern.gpu.sampling.MAPPED_STATUS), the whole status is then copied there with
// coalesced stores, so the host reads it after its wait for the stream with no copy queued (the kernels never read
// host memory).
__device__ void summarize_rows(TopN& s, long long* status, long long rows, long long* status_host) {
    __threadfence();
    const volatile long long* rows_status = status;  // written by other blocks: read past this SM's L1
    long long nonfinite = 0, negative = 0, positive = 0x7FFFFFFFFFFFFFFFll, outside = 0;
    for (long long row = threadIdx.x; row < rows; row += blockDim.x) {
        const long long f = rows_status[row * 4], g = rows_status[row * 4 + 1], p = rows_status[row * 4 + 2];
        const long long e = rows_status[row * 4 + 3];
        nonfinite = f > nonfinite ? f : nonfinite;
        negative = g > negative ? g : negative;
        positive = p < positive ? p : positive;
        outside += e < ATS_EXPONENT_LOW || e > ATS_EXPONENT_HIGH;
    }
    // each warp's extremes by shuffles, then thread 0 over the warps (not over every thread: a serial loop of
    // shared-memory reads was microseconds of a one-block finish)
    nonfinite = warp_max(nonfinite);
    negative = warp_max(negative);
    positive = warp_min(positive);
    outside = warp_sum(outside);
    if ((threadIdx.x & 31u) == 0u) {
        const unsigned int warp = threadIdx.x >> 5;
        s.u.summary[0][warp] = nonfinite;
        s.u.summary[1][warp] = negative;
        s.u.summary[2][warp] = positive;
        s.u.summary[3][warp] = outside;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (unsigned int i = 1; i < (blockDim.x >> 5); ++i) {
            nonfinite = s.u.summary[0][i] > nonfinite ? s.u.summary[0][i] : nonfinite;
            negative = s.u.summary[1][i] > negative ? s.u.summary[1][i] : negative;
            positive = s.u.summary[2][i] < positive ? s.u.summary[2][i] : positive;
            outside += s.u.summary[3][i];
        }
        long long* out = status + rows * 4;
        out[0] = nonfinite;
        out[1] = negative;
        out[2] = positive;
        out[3] = outside;
    }
    __syncthreads();  // the summary's reads of the list's memory done before the merge writes it; the summary row
                      // visible to the block's threads
    if (status_host != nullptr) {
        for (long long i = threadIdx.x; i < (rows + 1) * 4; i += blockDim.x) status_host[i] = rows_status[i];
    }
}

// A screened row's kept keys (count of them, n <= count <= capacity, in the order the atomics gave) sorted by
// (key, position) into s.u.list (values: slots of the row's buffer); returns n. Equal keys (rare: the radix sort
// orders them by slot) are put in position order by thread 0. Called by every thread of the block.
template <bool COHERENT>
__device__ int sort_screened(TopN& s, const double* __restrict__ keys, const long long* __restrict__ positions,
                             int count, int n) {
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
        s.u.list.keys[i] = key_bits(load_written<COHERENT>(keys + i));
        s.u.list.values[i] = (unsigned int)i;
    }
    sort_list(s, count, count);
    bool tie = false;
    for (int i = threadIdx.x; i < n && i + 1 < count; i += blockDim.x) tie |= s.u.list.keys[i] == s.u.list.keys[i + 1];
    if (__syncthreads_or(tie)) {
        if (threadIdx.x == 0) {  // insertion by position inside each run of equal keys
            for (int i = 1; i < count; ++i) {
                const unsigned long long key = s.u.list.keys[i];
                const unsigned int slot = s.u.list.values[i];
                int j = i;
                for (; j > 0 && s.u.list.keys[j - 1] == key &&
                       load_written<COHERENT>(positions + s.u.list.values[j - 1]) > load_written<COHERENT>(positions + slot); --j) {
                    s.u.list.keys[j] = s.u.list.keys[j - 1];
                    s.u.list.values[j] = s.u.list.values[j - 1];
                }
                s.u.list.keys[j] = key;
                s.u.list.values[j] = slot;
            }
        }
        __syncthreads();
    }
    return n;
}

// A screened row's n smallest kept keys by rank (count of them, n <= count <= ATS_RANK_MAX): each entry's rank is
// the number of entries before it in (key, position) order (positions read only for equal keys), and entry i
// goes to s.u.list.values[rank] (slots); no sort, no barrier but two. Called by every thread of the block.
#ifndef ATS_RANK_MAX
#define ATS_RANK_MAX 1024
#endif
template <bool COHERENT>
__device__ int rank_screened(TopN& s, const double* __restrict__ keys, const long long* __restrict__ positions,
                             int count, int n) {
    for (int i = threadIdx.x; i < count; i += blockDim.x) s.u.list.keys[i] = key_bits(load_written<COHERENT>(keys + i));
    __syncthreads();
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
        const unsigned long long key = s.u.list.keys[i];
        int rank = 0, equal = 0;
        for (int j = 0; j < count; ++j) {
            const unsigned long long other = s.u.list.keys[j];
            rank += other < key;
            equal += other == key;
        }
        if (equal > 1) {  // ties (itself included once): the lower positions first
            const long long position = load_written<COHERENT>(positions + i);
            for (int j = 0; j < count; ++j) rank += s.u.list.keys[j] == key && load_written<COHERENT>(positions + j) < position;
        }
        if (rank < n) s.u.list.values[rank] = (unsigned int)i;
    }
    __syncthreads();
    return n;
}


// The shared memory of a row's finish besides the selection buffer and the block statistics.
struct FinishShared {
    RowInfo info;
    int lens[ATS_SELECT_THREADS];
    int offs[ATS_SELECT_THREADS];
};

// Row `row` of `rows` by one block: merge the row's candidate lists (or sort a screened row's keys), status,
// fillers, coordinates and probabilities. select = 0 (with replacement): the status only. Run by finish_rows (a
// block per row) or by the row's last select_rows block, which reads what the row's other blocks wrote during the
// same launch: such data (lists, counts, screened keys and positions, counters) is read with load_written, COHERENT
// there: at the L2 where the writers' fence and count put it, never from this SM's L1.
template <typename T, bool COHERENT>
__device__ void finish_row(TopN& s, BlockStats& block_stats, FinishShared& f, long long row, long long rows,
                           const T* __restrict__ weights, long long size, int nchunks, int n, int logits,
                           const unsigned long long* __restrict__ rowmax, int pass, const double* cand_keys,
                           const long long* cand_idx, const int* cand_count, const double* __restrict__ stats,
                           long long* __restrict__ status, unsigned long long* __restrict__ row_bound, int dims,
                           long long g0, long long g1, long long g2, int* __restrict__ indices,
                           void* __restrict__ probs, int single, int select, int presorted, unsigned long long seed,
                           const unsigned long long* __restrict__ seed_ptr, int capacity,
                           const double* __restrict__ row_plan, const unsigned int* counters,
                           const double* screen_keys, const long long* screen_idx, long long* status_host) {
    RowInfo& info = f.info;
    int* lens = f.lens;
    int* offs = f.offs;
    const T* row_weights = weights + row * size;
    const int is_double = sizeof(T) == 8 || logits;
    if (threadIdx.x == 0) {
        // pass 1 redoes rescaled rows; a presorted list was drawn from rescaled keys (exponential_keys)
        const int shift = (pass || presorted) ? rescale_shift(status + row * 4, is_double) : 0;
        info.skip = pass && !shift;
        info.shift = shift;
    }
    __syncthreads();
    if (info.skip) return;  // block-uniform
    row_stats(block_stats, info.stats, stats, row, nchunks);
    __syncthreads();
    if (threadIdx.x == 0) {
        info.total = info.stats[0];
        info.top_logit = logits ? logits_top(rowmax, row) : 0.0;
        info.valid = valid_row(info.stats);
        info.bound = shared_bound(row_bound, row);
        info.redo = 0;
        info.last = 0;
        if (!pass && !presorted) {  // the status is final here (a presorted or pass 1 finish keeps it)
            long long* out = status + row * 4;
            write_row_status(out, info.stats);
            // A row that pass 1 redoes starts again from an open bound (chunk_topn pass 1 runs after this), and
            // its merge here would be overwritten: skipped.
            if (select && rescale_shift(out, is_double)) {
                row_bound[row] = 0ull;  // no bound
                info.redo = 1;
            }
            info.last = last_to_finish(row_bound + rows, rows);  // row_bound[rows]: finish_rows blocks done
        }
    }
    __syncthreads();
    if (info.last) summarize_rows(s, status, rows, status_host);  // block-uniform: the block that finished last
    if (!select || info.redo) return;  // block-uniform
    // The row's candidate lists: one per chunk (cand_count[row * nchunks + c] entries from slot (row * nchunks + c)
    // * n), or one presorted list of the row's n smallest keys in order (sort_keys), used as it is; so is a single
    // chunk's list (its exact n smallest keys, sorted).
    // A screened row (its plan a finite t): its buffer's keys sorted, or the row selected alone.
    const double plan = presorted ? ATS_INF : row_plan[pass * rows + row];
    const int screened = plan < ATS_INF;  // block-uniform
    const long long screen_base = row * capacity;
    const unsigned int screened_count = screened ? load_written<COHERENT>(counters + counter_at(pass, ATS_SCREENED, rows, row)) : 0u;
    const int alone = screened && !(screened_count >= (unsigned int)n && screened_count <= (unsigned int)capacity);
    const int direct = presorted || nchunks == 1;
    const long long base = row * (presorted ? 1 : nchunks) * n;
    int kept;
    if (alone) {
        // the fallback for a screened row with too few or too many kept keys: the whole row selected by this block
        // alone (positions below 2^31: sampling.py screens no longer row), without a shared bound
        kept = select_range(s, block_stats, row_weights, row, 0, size, n, effective_seed(seed, seed_ptr), logits,
                            info.top_logit, info.shift, (unsigned long long*)nullptr);
    } else if (screened && screened_count <= ATS_RANK_MAX) {
        kept = rank_screened<COHERENT>(s, screen_keys + screen_base, screen_idx + screen_base, (int)screened_count, n);
    } else if (screened) {
        kept = sort_screened<COHERENT>(s, screen_keys + screen_base, screen_idx + screen_base, (int)screened_count, n);
    } else {
        kept = direct ? min(n, load_written<COHERENT>(cand_count + row * (presorted ? 1 : nchunks)))
                      : merge_lists<COHERENT>(s, lens, offs, cand_keys + base, cand_count + row * nchunks, nchunks, n,
                                    info.bound);
    }
    const auto position_of = [&](int k) -> long long {
        return alone ? (long long)s.u.list.values[k]
               : screened ? load_written<COHERENT>(screen_idx + screen_base + s.u.list.values[k])
               : load_written<COHERENT>(cand_idx + base + (direct ? k : (long long)s.u.list.values[k]));
    };
    write_draws(position_of, kept, row, n, row_weights, size, logits, info.top_logit, info.shift, info.valid,
                info.total, dims, g0, g1, g2, indices, probs, single);
}

// One block per row: finish_row (after chunk_topn, or alone: the status of the with-replacement and sort paths).
template <typename T>
__device__ void finish_rows(const T* __restrict__ weights, long long size, int nchunks, int n, int logits,
                            const unsigned long long* __restrict__ rowmax, int pass, const double* __restrict__ cand_keys,
                            const long long* __restrict__ cand_idx, const int* __restrict__ cand_count,
                            const double* __restrict__ stats, long long* __restrict__ status,
                            unsigned long long* __restrict__ row_bound, int dims, long long g0, long long g1,
                            long long g2, int* __restrict__ indices, void* __restrict__ probs, int single, int select,
                            int presorted, unsigned long long seed, const unsigned long long* __restrict__ seed_ptr,
                            int capacity, const double* __restrict__ row_plan,
                            const unsigned int* __restrict__ counters, const double* __restrict__ screen_keys,
                            const long long* __restrict__ screen_idx, long long* __restrict__ status_host) {
    __shared__ TopN s;
    __shared__ BlockStats block_stats;
    __shared__ FinishShared f;
    finish_row<T, false>(s, block_stats, f, blockIdx.x, gridDim.x, weights, size, nchunks, n, logits, rowmax, pass, cand_keys,
                  cand_idx, cand_count, stats, status, row_bound, dims, g0, g1, g2, indices, probs, single, select,
                  presorted, seed, seed_ptr, capacity, row_plan, counters, screen_keys, screen_idx, status_host);
}

#define ATS_FINISH_ROWS(suffix, T)                                                                                    \
    extern "C" __global__ void ATS_SELECT_BOUNDS finish_rows_##suffix(                                                 \
        const T* weights, long long size, int nchunks, int n, int logits, const unsigned long long* rowmax, int pass, \
        const double* cand_keys, const long long* cand_idx, const int* cand_count, const double* stats,               \
        long long* status, unsigned long long* row_bound, int dims, long long g0, long long g1, long long g2,          \
        int* indices, void* probs, int single, int select, int presorted, unsigned long long seed,                    \
        const unsigned long long* seed_ptr, int capacity, const double* row_plan, const unsigned int* counters,       \
        const double* screen_keys, const long long* screen_idx, long long* status_host) {                             \
        finish_rows<T>(weights, size, nchunks, n, logits, rowmax, pass, cand_keys, cand_idx, cand_count, stats,      \
                       status, row_bound, dims, g0, g1, g2, indices, probs, single, select, presorted, seed,       \
                       seed_ptr, capacity, row_plan, counters, screen_keys, screen_idx, status_host);                 \
    }
#if ATS_IN_GROUP(1)
ATS_FINISH_ROWS(f32, float)
#endif
#if ATS_IN_GROUP(2)
ATS_FINISH_ROWS(f64, double)
#endif

// chunk_select with a register allocation of its own, as in chunk_topn (inlined into select_rows, whose finish
// and fences take registers too, its loops spilled more: ptxas, CUDA 13, sm_90).
template <typename T>
__device__ __noinline__ void chunk_select_apart(TopN& s, BlockStats& block_stats, const ChunkItem& c,
                                                const T* weights, long long size, int n, unsigned long long seed,
                                                const unsigned long long* seed_ptr, int logits,
                                                const unsigned long long* rowmax, int pass,
                                                unsigned long long* row_bound, double* cand_keys, long long* cand_idx,
                                                int* cand_count, int capacity, const double* row_plan,
                                                unsigned int* counters, double* screen_keys, long long* screen_idx) {
    chunk_select<T>(s, block_stats, c, weights, size, n, seed, seed_ptr, logits, rowmax, pass, row_bound, cand_keys,
                    cand_idx, cand_count, capacity, row_plan, counters, screen_keys, screen_idx);
}

// finish_row with a register allocation of its own (not inlined: the selection's loops keep theirs).
template <typename T>
__device__ __noinline__ void finish_row_apart(TopN& s, BlockStats& block_stats, FinishShared& f, long long row,
                                              long long rows, const T* weights, long long size, int nchunks, int n,
                                              int logits, const unsigned long long* rowmax, int pass,
                                              const double* cand_keys, const long long* cand_idx,
                                              const int* cand_count, const double* stats, long long* status,
                                              unsigned long long* row_bound, int dims, long long g0, long long g1,
                                              long long g2, int* indices, void* probs, int single,
                                              unsigned long long seed, const unsigned long long* seed_ptr,
                                              int capacity, const double* row_plan, const unsigned int* counters,
                                              const double* screen_keys, const long long* screen_idx,
                                              long long* status_host) {
    finish_row<T, true>(s, block_stats, f, row, rows, weights, size, nchunks, n, logits, rowmax, pass, cand_keys, cand_idx,
                  cand_count, stats, status, row_bound, dims, g0, g1, g2, indices, probs, single, 1, 0, seed, seed_ptr,
                  capacity, row_plan, counters, screen_keys, screen_idx, status_host);
}

// chunk_topn and finish_rows in one launch (a plan with `fused`): block (row, chunk) runs chunk_select, and the
// row's last block to finish (a count in counters, after every thread's fence) runs finish_row for the row while
// other rows' blocks still select: one launch and one kernel boundary fewer per call.
template <typename T>
__device__ void select_rows(const T* __restrict__ weights, long long size, int nchunks, long long chunk, int n,
                            unsigned long long seed, const unsigned long long* __restrict__ seed_ptr, int logits,
                            const unsigned long long* __restrict__ rowmax, int pass, long long* __restrict__ status,
                            unsigned long long* __restrict__ row_bound, double* __restrict__ cand_keys,
                            long long* __restrict__ cand_idx, int* __restrict__ cand_count, int capacity,
                            const double* __restrict__ row_plan, unsigned int* __restrict__ counters,
                            double* __restrict__ screen_keys, long long* __restrict__ screen_idx,
                            const double* __restrict__ stats, int dims, long long g0, long long g1, long long g2,
                            int* __restrict__ indices, void* __restrict__ probs, int single,
                            long long* __restrict__ status_host) {
    __shared__ TopN s;
    __shared__ BlockStats block_stats;
    __shared__ FinishShared f;
    __shared__ int last;
    const ChunkItem c = chunk_item<T>(size, nchunks, chunk, logits, pass, status);
    if (c.skip) return;  // the whole block; the row's finish skips it too (pass 1, a row not rescaled)
    chunk_select_apart<T>(s, block_stats, c, weights, size, n, seed, seed_ptr, logits, rowmax, pass, row_bound, cand_keys,
                    cand_idx, cand_count, capacity, row_plan, counters, screen_keys, screen_idx);
    __threadfence();  // every thread's writes (list, count, screened keys) before the block counts itself done
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(counters + counter_at(pass, ATS_SELECTED, c.rows, c.row), 1u) == (unsigned int)nchunks - 1u;
    }
    __syncthreads();
    if (!last) return;  // block-uniform
    __threadfence();
    finish_row_apart<T>(s, block_stats, f, c.row, c.rows, weights, size, nchunks, n, logits, rowmax, pass, cand_keys,
                        cand_idx, cand_count, stats, status, row_bound, dims, g0, g1, g2, indices, probs, single, seed,
                        seed_ptr, capacity, row_plan, counters, screen_keys, screen_idx, status_host);
}

#define ATS_SELECT_ROWS(suffix, T)                                                                                    \
    extern "C" __global__ void ATS_SELECT_BOUNDS select_rows_##suffix(                                                 \
        const T* weights, long long size, int nchunks, long long chunk, int n, unsigned long long seed,               \
        const unsigned long long* seed_ptr, int logits, const unsigned long long* rowmax, int pass, long long* status, \
        unsigned long long* row_bound, double* cand_keys, long long* cand_idx, int* cand_count, int capacity,         \
        const double* row_plan, unsigned int* counters, double* screen_keys, long long* screen_idx,                   \
        const double* stats, int dims, long long g0, long long g1, long long g2, int* indices, void* probs,           \
        int single, long long* status_host) {                                                                         \
        select_rows<T>(weights, size, nchunks, chunk, n, seed, seed_ptr, logits, rowmax, pass, status, row_bound,    \
                       cand_keys, cand_idx, cand_count, capacity, row_plan, counters, screen_keys, screen_idx, stats, \
                       dims, g0, g1, g2, indices, probs, single, status_host);                                        \
    }
#if ATS_IN_GROUP(3)
ATS_SELECT_ROWS(f32, float)
#endif
#if ATS_IN_GROUP(4)
ATS_SELECT_ROWS(f64, double)
#endif

// Tiles of weights a thread of sample_rows loads before adding any in its statistics pass (float32; float64 half
// as many: the same bytes): one block streams a whole row, so it needs more loads in flight than a chunk_stats
// block, one of many over a row. A tuning knob; the sums do not depend on it (stats_range adds in tile order).
#ifndef ATS_ROW_UNROLL
#define ATS_ROW_UNROLL 8
#endif
template <typename T>
__host__ __device__ constexpr int row_unroll_of() {
    return sizeof(T) == 8 ? (ATS_ROW_UNROLL + 1) / 2 : ATS_ROW_UNROLL;
}

// The statistics of positions [start, stop) of a row by one block into out[0..ATS_STATS) (total, largest finite
// weight, counts, squares): stats_range with sample_rows' unrolling, then reduce_stats' fixed tree. Called by every
// thread; out is visible to all on return.
template <typename T>
__device__ void block_row_stats(BlockStats& b, double* out, const T* __restrict__ row_weights, long long start,
                                long long stop, int logits, double top_logit, int shift) {
    const ChunkSums t = stats_weights<T, row_unroll_of<T>()>(row_weights, start, stop, logits, top_logit, shift);
    reduce_stats(b, out, t.sum, t.top, t.nonfinite, t.negative, t.positive, t.squares);
    __syncthreads();
}

// A whole row's selection and draws by one block (sample_rows; block 0 of sample_cluster_rows): a screened row (t
// finite) whose buffer `keys`, `positions` holds `count` keys, n <= count <= capacity, ranked or sorted; else the
// row selected by this block alone (select_range). COHERENT: other blocks wrote the buffer (read past this SM's
// L1). Called by every thread of the block.
template <bool COHERENT, typename T>
__device__ void finish_whole_row(TopN& s, BlockStats& block_stats, const T* __restrict__ row_weights, long long row,
                                 long long size, int n, unsigned long long seed, int logits, double top_logit,
                                 int shift, double t, unsigned int count, int capacity, const double* keys,
                                 const long long* positions, int valid, double total, int dims, long long g0,
                                 long long g1, long long g2, int* __restrict__ indices, void* __restrict__ probs,
                                 int single) {
    int kept = -1;  // block-uniform: -1 until a selection is complete
    if (t < ATS_INF && count >= (unsigned int)n && count <= (unsigned int)capacity) {
        kept = count <= ATS_RANK_MAX ? rank_screened<COHERENT>(s, keys, positions, (int)count, n)
                                     : sort_screened<COHERENT>(s, keys, positions, (int)count, n);
    }
    const int alone = kept < 0;
    if (alone) {
        kept = select_range(s, block_stats, row_weights, row, 0, size, n, seed, logits, top_logit, shift,
                            (unsigned long long*)nullptr);
    }
    const auto position_of = [&](int k) -> long long {
        return alone ? (long long)s.u.list.values[k] : load_written<COHERENT>(positions + s.u.list.values[k]);
    };
    write_draws(position_of, kept, row, n, row_weights, size, logits, top_logit, shift, valid, total, dims, g0, g1,
                g2, indices, probs, single);
}

// One block per row (a plan with `whole_rows`: short rows, atskern.gpu.sampling.WHOLE_ROWS): the whole call in one
// launch, with no kernel boundary and nothing shared between blocks but the count that elects the block writing
// the summary row (row_bound[rows], zeroed by the host; a one-row call needs no zeroed memory). The block takes
// the row's logit maximum (logits), its statistics and status, and for float64 rows outside the scale-free range
// the statistics again on the rescaled weights (pass 1's exact rescaling, in the same launch); then the row's plan
// (row_plan_of): a screened row's keys at most t go to the row's buffer (screen_range, a shared-memory count) and
// are ranked or sorted; a selected row, or a screened one with fewer than n or more than `capacity` keys kept, is
// selected by this block alone (select_range). The draws are finish_rows' for the same row and seed.
template <typename T>
__device__ void sample_rows(const T* __restrict__ weights, long long size, int n, unsigned long long seed,
                            const unsigned long long* __restrict__ seed_ptr, int logits, long long* __restrict__ status,
                            unsigned long long* __restrict__ row_bound, int capacity, double* __restrict__ screen_keys,
                            long long* __restrict__ screen_idx, int dims, long long g0, long long g1, long long g2,
                            int* __restrict__ indices, void* __restrict__ probs, int single,
                            long long* __restrict__ status_host) {
    __shared__ TopN s;
    __shared__ BlockStats block_stats;
    __shared__ double stats[ATS_STATS];
    __shared__ double plan;
    __shared__ int shift, last;
    __shared__ unsigned int screened;
    const long long row = blockIdx.x, rows = gridDim.x;
    const T* row_weights = weights + row * size;
    const int is_double = sizeof(T) == 8 || logits;
    seed = effective_seed(seed, seed_ptr);
    double top_logit = 0.0;
    if (logits) {  // block-uniform: logits_top's value
        const double top = block_finite_max(block_stats, row_weights, 0, size);
        top_logit = isfinite(top) ? top : 0.0;
    }
    block_row_stats(block_stats, stats, row_weights, 0, size, logits, top_logit, 0);
    if (threadIdx.x == 0) {
        long long* out = status + row * 4;
        write_row_status(out, stats);
        shift = rescale_shift(out, is_double);
        screened = 0u;
        last = last_to_finish(row_bound + rows, rows);
    }
    __syncthreads();
    if (last) summarize_rows(s, status, rows, status_host);  // block-uniform
    if (shift) block_row_stats(block_stats, stats, row_weights, 0, size, logits, top_logit, shift);  // block-uniform
    if (threadIdx.x == 0) plan = row_plan_of(stats, n, capacity, is_double, 1);
    __syncthreads();
    const double t = plan, total = stats[0];
    const int valid = valid_row(stats);
    const long long screen_base = row * capacity;
    if (t < ATS_INF) {
        screen_weights(row_weights, row, 0, size, seed, logits, top_logit, shift, t, &screened, capacity,
                       screen_keys + screen_base, screen_idx + screen_base);
        // every key and the count written; the block reads its own writes with plain loads, coherent for the block
        // after the barrier (never ld.global.nc, the non-coherent path: tests/test_cuda_sources.py checks the PTX)
        __syncthreads();
    }
    finish_whole_row<false>(s, block_stats, row_weights, row, size, n, seed, logits, top_logit, shift, t,
                            t < ATS_INF ? screened : 0u, capacity, screen_keys + screen_base,
                            screen_idx + screen_base, valid, total, dims, g0, g1, g2, indices, probs, single);
}

#define ATS_SAMPLE_ROWS(suffix, T)                                                                                    \
    extern "C" __global__ void ATS_SELECT_BOUNDS sample_rows_##suffix(                                                 \
        const T* weights, long long size, int n, unsigned long long seed, const unsigned long long* seed_ptr,          \
        int logits, long long* status, unsigned long long* row_bound, int capacity, double* screen_keys,               \
        long long* screen_idx, int dims, long long g0, long long g1, long long g2, int* indices, void* probs,           \
        int single, long long* status_host) {                                                                         \
        sample_rows<T>(weights, size, n, seed, seed_ptr, logits, status, row_bound, capacity, screen_keys,            \
                       screen_idx, dims, g0, g1, g2, indices, probs, single, status_host);                            \
    }
#if ATS_IN_GROUP(5)
ATS_SAMPLE_ROWS(f32, float)
#endif
#if ATS_IN_GROUP(6)
ATS_SAMPLE_ROWS(f64, double)
#endif

// Blocks of one row's cluster (sample_cluster_rows, Hopper thread block clusters: sm_90). A compile-time constant of
// the kernel's __cluster_dims__: atskern.gpu.sampling compiles one module per cluster size (-D option).
#ifndef ATS_ROW_CLUSTER
#define ATS_ROW_CLUSTER 2
#endif
#ifdef ATS_HOST_BUILD  // the host harness (tests/cuda_host/cuda_shim.h) provides cluster_sync and cluster_rank
#define ATS_CLUSTER_DIMS
#else
#define ATS_CLUSTER_DIMS __cluster_dims__(ATS_ROW_CLUSTER, 1, 1)
// Every thread of the cluster's blocks meets here; global memory written before it is visible to the cluster's
// threads after it (release, acquire). Called by every thread of every block of the cluster.
__device__ __forceinline__ void cluster_sync() {
    // not .aligned: a warp may reach it diverged (after a per-thread loop), as cooperative groups' cluster sync allows
    asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
}
__device__ __forceinline__ unsigned int cluster_rank() {
    unsigned int rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    return rank;
}
#endif

// Partial statistics of one cluster block into its slot of `partials` (ATS_STATS doubles), then the cluster's
// barrier, then the row's statistics from the cluster's slots in rank order (row_stats: the same order in every
// block, so every block holds the same values in out). Called by every thread of every block of the cluster.
template <typename T>
__device__ void cluster_row_stats(BlockStats& b, double* out, double* __restrict__ partials, long long row,
                                  unsigned int rank, const T* __restrict__ row_weights, long long start, long long stop,
                                  int logits, double top_logit, int shift) {
    block_row_stats(b, out, row_weights, start, stop, logits, top_logit, shift);
    if (threadIdx.x == 0) {
        for (int i = 0; i < ATS_STATS; ++i) partials[(row * ATS_ROW_CLUSTER + rank) * ATS_STATS + i] = out[i];
    }
    __threadfence();
    cluster_sync();
    row_stats(b, out, partials, row, ATS_ROW_CLUSTER);
    __syncthreads();
}

// One cluster of ATS_ROW_CLUSTER blocks per row (a plan with `row_cluster`, atskern.gpu.sampling.ROW_CLUSTER): the
// whole call in one launch as sample_rows, the row's streaming passes split over the cluster's blocks (block `rank`
// takes positions [rank * span, (rank + 1) * span), span a whole number of tiles), which meet at the cluster's
// barrier and through device memory: `cluster_stats` (each block's partial statistics of pass 0 and pass 1, then
// its largest finite logit: rows * ATS_ROW_CLUSTER * (2 ATS_STATS + 1) doubles) and `cluster_counts` (the row's
// screened count, zeroed by rank 0 before the first barrier). No shared memory is read across a cluster barrier.
// Every block combines the partials in rank order (the same statistics, status, rescaling and plan in each); each
// screens its span into the row's buffer; after the last barrier rank 0 alone ranks or sorts the buffer (or selects
// the row alone: fewer than n or more than `capacity` keys kept, or a selected row) and finishes the row. Rank 0
// writes the status and takes part in the election of the block writing the summary row (row_bound[rows], zeroed
// by the host where rows > 1). The draws are sample_rows' for the same row and seed.
template <typename T>
__device__ void sample_cluster_rows(const T* __restrict__ weights, long long size, int n, unsigned long long seed,
                                    const unsigned long long* __restrict__ seed_ptr, int logits,
                                    long long* __restrict__ status, unsigned long long* __restrict__ row_bound,
                                    int capacity, double* __restrict__ screen_keys, long long* __restrict__ screen_idx,
                                    double* __restrict__ cluster_stats, unsigned int* __restrict__ cluster_counts,
                                    long long span, int dims, long long g0, long long g1, long long g2,
                                    int* __restrict__ indices, void* __restrict__ probs, int single,
                                    long long* __restrict__ status_host) {
    __shared__ TopN s;
    __shared__ BlockStats block_stats;
    __shared__ double stats[ATS_STATS];
    __shared__ double plan;
    __shared__ int last;
    const unsigned int rank = cluster_rank();
    const long long row = blockIdx.x / ATS_ROW_CLUSTER, rows = gridDim.x / ATS_ROW_CLUSTER;
    const long long start = min(size, (long long)rank * span), stop = min(size, start + span);
    const T* row_weights = weights + row * size;
    const int is_double = sizeof(T) == 8 || logits;
    double* pass0 = cluster_stats;
    double* pass1 = cluster_stats + rows * ATS_ROW_CLUSTER * ATS_STATS;
    double* logit_tops = cluster_stats + 2 * rows * ATS_ROW_CLUSTER * ATS_STATS;
    unsigned int* count = cluster_counts + row;
    seed = effective_seed(seed, seed_ptr);
    if (rank == 0 && threadIdx.x == 0) *count = 0u;  // used after the first cluster barrier
    double top_logit = 0.0;
    if (logits) {  // cluster-uniform: the largest of the blocks' finite maxima, logits_top's value
        const double top = block_finite_max(block_stats, row_weights, start, stop);
        if (threadIdx.x == 0) logit_tops[row * ATS_ROW_CLUSTER + rank] = top;
        __threadfence();
        cluster_sync();
        double best = -ATS_INF;
        for (int r = 0; r < ATS_ROW_CLUSTER; ++r) {
            const double other = load_written<true>(logit_tops + row * ATS_ROW_CLUSTER + r);
            best = other > best ? other : best;
        }
        top_logit = isfinite(best) ? best : 0.0;
    }
    cluster_row_stats(block_stats, stats, pass0, row, rank, row_weights, start, stop, logits, top_logit, 0);
    long long row_status[4];
    write_row_status(row_status, stats);
    const int shift = rescale_shift(row_status, is_double);  // cluster-uniform
    if (rank == 0 && threadIdx.x == 0) {
        for (int i = 0; i < 4; ++i) status[row * 4 + i] = row_status[i];
        last = last_to_finish(row_bound + rows, rows);
    }
    __syncthreads();
    if (rank == 0 && last) summarize_rows(s, status, rows, status_host);  // block-uniform
    if (shift) cluster_row_stats(block_stats, stats, pass1, row, rank, row_weights, start, stop, logits, top_logit, shift);
    if (threadIdx.x == 0) plan = row_plan_of(stats, n, capacity, is_double, 1);
    __syncthreads();
    const double t = plan, total = stats[0];
    const int valid = valid_row(stats);
    const long long screen_base = row * capacity;
    if (t < ATS_INF) {  // cluster-uniform
        screen_weights(row_weights, row, start, stop, seed, logits, top_logit, shift, t, count, capacity,
                       screen_keys + screen_base, screen_idx + screen_base);
    }
    __threadfence();
    cluster_sync();  // every block's keys and count written
    if (rank != 0) return;  // the whole block
    finish_whole_row<true>(s, block_stats, row_weights, row, size, n, seed, logits, top_logit, shift, t,
                           t < ATS_INF ? load_written<true>(count) : 0u, capacity, screen_keys + screen_base,
                           screen_idx + screen_base, valid, total, dims, g0, g1, g2, indices, probs, single);
}

#define ATS_SAMPLE_CLUSTER_ROWS(suffix, T)                                                                            \
    extern "C" __global__ void ATS_SELECT_BOUNDS ATS_CLUSTER_DIMS sample_cluster_rows_##suffix(                        \
        const T* weights, long long size, int n, unsigned long long seed, const unsigned long long* seed_ptr,          \
        int logits, long long* status, unsigned long long* row_bound, int capacity, double* screen_keys,               \
        long long* screen_idx, double* cluster_stats, unsigned int* cluster_counts, long long span, int dims,           \
        long long g0, long long g1, long long g2, int* indices, void* probs, int single, long long* status_host) {     \
        sample_cluster_rows<T>(weights, size, n, seed, seed_ptr, logits, status, row_bound, capacity, screen_keys,    \
                               screen_idx, cluster_stats, cluster_counts, span, dims, g0, g1, g2, indices, probs,     \
                               single, status_host);                                                                  \
    }
#if ATS_IN_GROUP(7)
ATS_SAMPLE_CLUSTER_ROWS(f32, float)
#endif
#if ATS_IN_GROUP(8)
ATS_SAMPLE_CLUSTER_ROWS(f64, double)
#endif

// Keys of every position, for n too large for the shared-memory selection (the caller sorts them; sampling.py):
// NaN where a <= 0 or a is not finite (sorted after every positive position, even one whose key is +inf).
template <typename T>
__device__ void exponential_keys(const T* __restrict__ weights, long long size, long long total,
                                 unsigned long long seed, const unsigned long long* __restrict__ seed_ptr, int logits,
                                 const unsigned long long* __restrict__ rowmax, const long long* __restrict__ status,
                                 double* __restrict__ keys) {
    seed = effective_seed(seed, seed_ptr);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / size;
        const long long p = i % size;
        const int shift = rescale_shift(status + row * 4, sizeof(T) == 8 || logits);
        const double a = weight_at(weights + row * size, p, logits, logits ? logits_top(rowmax, row) : 0.0, shift);
        if (!(a > 0.0) || !isfinite(a)) {
            keys[i] = __longlong_as_double(0x7FF8000000000000LL);
            continue;
        }
        const PhiloxWords hi = block_words((unsigned long long)p >> 2, (unsigned int)row, ATS_STREAM_HI, seed);
        const PhiloxWords lo = block_words((unsigned long long)p >> 2, (unsigned int)row, ATS_STREAM_LO, seed);
        keys[i] = -log(to_uniform(hi.w[p & 3], lo.w[p & 3])) / a;
    }
}

#define ATS_EXPONENTIAL_KEYS(suffix, T)                                                                               \
    extern "C" __global__ void exponential_keys_##suffix(const T* weights, long long size, long long total,           \
                                                         unsigned long long seed, const unsigned long long* seed_ptr,  \
                                                         int logits, const unsigned long long* rowmax,                \
                                                         const long long* status, double* keys) {                     \
        exponential_keys<T>(weights, size, total, seed, seed_ptr, logits, rowmax, status, keys);                     \
    }
#if ATS_IN_GROUP(1)
ATS_EXPONENTIAL_KEYS(f32, float)
#endif
#if ATS_IN_GROUP(2)
ATS_EXPONENTIAL_KEYS(f64, double)
#endif

// With replacement, one block of ATS_SELECT_THREADS threads per draw: draw k of a row is the first position of
// positive weight whose float64 prefix sum reaches u_k * total. The block adds the row's chunk sums (row_stats'
// order) for the total, finds the chunk with a block scan of the chunk sums, ATS_SELECT_THREADS chunks a step,
// then scans the positions from that chunk's start a tile (ATS_TILE positions) a step. Prefix sums taken in
// another order than the total can miss the target by rounding: then the draw is the row's last positive position.
using BlockPrefix = cub::BlockScan<double, ATS_SELECT_THREADS>;

struct DrawShared {
    BlockPrefix::TempStorage scan;
    BlockStats stats;
    double row[ATS_STATS];
    double start;  // prefix sum before the chunk found
    int hit;       // the first hit of a step (chunk or position offset), INT_MAX for none
};

template <typename T>
__device__ void replacement_draws(const T* __restrict__ weights, long long size, int nchunks, long long chunk, int n,
                                  long long rows, unsigned long long seed, const unsigned long long* __restrict__ seed_ptr,
                                  int logits, const unsigned long long* __restrict__ rowmax,
                                  const long long* __restrict__ status, const double* __restrict__ stats, int dims,
                                  long long g0, long long g1, long long g2, int* __restrict__ indices,
                                  void* __restrict__ probs, int single) {
    __shared__ DrawShared sh;
    const long long draw = blockIdx.x;
    if (draw >= rows * n) return;  // the whole block
    const long long row = draw / n;
    const int k = (int)(draw % n);
    const T* row_weights = weights + row * size;
    const int shift = rescale_shift(status + row * 4, sizeof(T) == 8 || logits);
    const double top_logit = logits ? logits_top(rowmax, row) : 0.0;
    const long long* row_status = status + row * 4;
    const bool valid = row_status[0] == 0 && row_status[1] == 0 && row_status[2] > 0;
    // of the rescaled weights where pass 1 redid the row's sums (chunk_topn, select = 0)
    row_stats(sh.stats, sh.row, stats, row, nchunks);
    __syncthreads();
    const double total = sh.row[0];
    seed = effective_seed(seed, seed_ptr);
    const PhiloxWords w = block_words((unsigned long long)k >> 1, (unsigned int)row, ATS_STREAM_REPLACE, seed);
    const int word = 2 * (k & 1);
    const double target = to_uniform(w.w[word], w.w[word + 1]) * total;
    long long found = -1;
    if (valid) {  // block-uniform
        // the chunk: the first whose prefix sum (with its own sum) reaches the target, else the last
        if (threadIdx.x == 0) sh.hit = 0x7FFFFFFF;
        __syncthreads();  // the reset before any atomicMin (a block of one warp may scan without a barrier)
        double acc = 0.0;  // block-uniform: the prefix sum before this step's chunks
        for (int c0 = 0; c0 < nchunks; c0 += ATS_SELECT_THREADS) {
            const int c = c0 + (int)threadIdx.x;
            const double own = c < nchunks ? stats[(row * nchunks + c) * ATS_STATS] : 0.0;
            double before = 0.0, step = 0.0;
            BlockPrefix(sh.scan).ExclusiveSum(own, before, step);
            const bool hit = c < nchunks && (acc + before + own >= target || c == nchunks - 1);
            if (hit) atomicMin(&sh.hit, c);
            __syncthreads();
            const int first = sh.hit;
            if (c == first) sh.start = acc + before;
            __syncthreads();
            if (first != 0x7FFFFFFF) break;
            acc += step;
        }
        acc = sh.start;
        const int c = sh.hit;
        __syncthreads();  // every thread has read sh.hit and sh.start
        for (long long tile = c * chunk; tile < size; tile += ATS_TILE) {
            if (threadIdx.x == 0) sh.hit = 0x7FFFFFFF;
            __syncthreads();  // the reset before any atomicMin (a block of one warp may scan without a barrier)
            const long long first = tile + ATS_PER_THREAD * (long long)threadIdx.x;
            T raw[ATS_PER_THREAD];
            load_lanes(row_weights, first, size, raw);
            double a[ATS_PER_THREAD], local[ATS_PER_THREAD];
            double run = 0.0;
#pragma unroll
            for (int lane = 0; lane < ATS_PER_THREAD; ++lane) {
                a[lane] = first + lane < size ? weight_of(raw[lane], logits, top_logit, shift) : 0.0;
                run += a[lane];
                local[lane] = run;
            }
            double before = 0.0, step = 0.0;
            BlockPrefix(sh.scan).ExclusiveSum(run, before, step);
#pragma unroll
            for (int lane = 0; lane < ATS_PER_THREAD; ++lane) {
                if (first + lane < size && a[lane] > 0.0 && acc + (before + local[lane]) >= target) {
                    atomicMin(&sh.hit, ATS_PER_THREAD * (int)threadIdx.x + lane);
                    break;
                }
            }
            __syncthreads();
            const int hit = sh.hit;
            __syncthreads();  // every thread has read sh.hit before the next step resets it
            if (hit != 0x7FFFFFFF) {
                found = tile + hit;
                break;
            }
            acc += step;
        }
        for (long long end = size; found < 0 && end > 0; end -= ATS_SELECT_THREADS) {  // rounding: the last positive
            if (threadIdx.x == 0) sh.hit = -1;
            __syncthreads();
            const long long p = end - ATS_SELECT_THREADS + (long long)threadIdx.x;
            if (p >= 0 && weight_at(row_weights, p, logits, top_logit, shift) > 0.0) atomicMax(&sh.hit, (int)threadIdx.x);
            __syncthreads();
            if (sh.hit >= 0) found = end - ATS_SELECT_THREADS + sh.hit;
            __syncthreads();  // every thread has read sh.hit before the next step resets it
        }
    }
    if (threadIdx.x == 0) {
        const long long at = row * n + k;
        write_coords(indices, at, found < 0 ? 0 : found, dims, g0, g1, g2);
        store_prob(probs, at, found < 0 ? 0.0 : weight_at(row_weights, found, logits, top_logit, shift) / total, single);
    }
}

#define ATS_REPLACEMENT_DRAWS(suffix, T)                                                                              \
    extern "C" __global__ void replacement_draws_##suffix(                                                            \
        const T* weights, long long size, int nchunks, long long chunk, int n, long long rows, unsigned long long seed, \
        const unsigned long long* seed_ptr, int logits, const unsigned long long* rowmax, const long long* status,    \
        const double* stats, int dims, long long g0, long long g1, long long g2, int* indices, void* probs,           \
        int single) {                                                                                                 \
        replacement_draws<T>(weights, size, nchunks, chunk, n, rows, seed, seed_ptr, logits, rowmax, status, stats,  \
                             dims, g0, g1, g2, indices, probs, single);                                               \
    }
#if ATS_IN_GROUP(1)
ATS_REPLACEMENT_DRAWS(f32, float)
#endif
#if ATS_IN_GROUP(2)
ATS_REPLACEMENT_DRAWS(f64, double)
#endif
