// Patch gather and its deterministic adjoint, one launch per call, on the canonical layout of atskern.patches:
// images (B, R, S0, S1, W) and patches (B, K, R, P0, P1, Wp), missing spatial dims as leading 1s, and in
// channels-last the channels folded into the last dim (W = S2 * C, Wp = P2 * C, `scale` = C; else scale = 1).
//
// Offsets arrive as the caller gave them: any integer dtype (`kind`), any strides (in bytes), shape (B, K, D).
// Each kernel reads a patch's offsets itself and clips them to [-P, S] per dim (the same pixels, no overflow),
// so the host does no work on them. I is the index type: int where every index fits, else long long.

#include <cub/block/block_scan.cuh>

struct Geometry {
    long long count, rows, p0, p1, p2, scale, s0, s1, s2;
    int dims;
};

struct Offsets {
    const char* base;
    long long stride_b, stride_k, stride_d;
    int kind;  // 0 int8, 1 uint8, 2 int16, 3 uint16, 4 int32, 5 uint32, 6 int64, 7 uint64
};

// Kernels take these as scalars (CuPy passes NumPy scalars by value, not structs).
#define GEOMETRY_PARAMS                                                                                          \
    long long count, long long rows, long long p0, long long p1, long long p2, long long scale, long long s0,   \
        long long s1, long long s2, int dims
#define GEOMETRY Geometry{count, rows, p0, p1, p2, scale, s0, s1, s2, dims}
#define OFFSET_PARAMS const char* offsets, long long stride_b, long long stride_k, long long stride_d, int kind
#define OFFSETS Offsets{offsets, stride_b, stride_k, stride_d, kind}

__device__ __forceinline__ long long load_offset(const char* p, int kind) {
    switch (kind) {
        case 0: return *reinterpret_cast<const signed char*>(p);
        case 1: return *reinterpret_cast<const unsigned char*>(p);
        case 2: return *reinterpret_cast<const short*>(p);
        case 3: return *reinterpret_cast<const unsigned short*>(p);
        case 4: return *reinterpret_cast<const int*>(p);
        case 5: return *reinterpret_cast<const unsigned int*>(p);
        case 6: return *reinterpret_cast<const long long*>(p);
        default: {
            const unsigned long long v = *reinterpret_cast<const unsigned long long*>(p);
            return v > 0x7fffffffffffffffULL ? 0x7fffffffffffffffLL : (long long)v;  // any such value is past the end
        }
    }
}

__device__ __forceinline__ long long clip(long long v, long long low, long long high) {
    return v < low ? low : (v > high ? high : v);
}

// First element of patch (b, k) in canonical units: (o0, o1) pixels, o2 in the last dim's elements.
struct Box {
    long long o0, o1, o2;
};

__device__ __forceinline__ Box patch_box(const Offsets& off, const Geometry& g, long long b, long long k) {
    const char* p = off.base + b * off.stride_b + k * off.stride_k;
    long long o[3] = {0, 0, 0};
#pragma unroll
    for (int c = 0; c < 3; ++c) {
        const int d = c - (3 - g.dims);
        if (d >= 0) o[c] = load_offset(p + d * off.stride_d, off.kind);
    }
    Box box;
    box.o0 = clip(o[0], -g.p0, g.s0);
    box.o1 = clip(o[1], -g.p1, g.s1);
    box.o2 = clip(o[2], -g.p2, g.s2) * g.scale;
    return box;
}

// ---------------------------------------------------------------------------------------------------------
// Gather: a group of 2^lanes_log2 threads per unit of `unit_rows` consecutive rows of one patch plane (the
// P1 rows of patch (b, k), channel row r, slice i0: one box, one offsets read per unit). Each patch row (Wp
// contiguous elements of the output) is cut at the output's 16-byte boundaries; lane l of the group takes the
// row's chunks l, l + lanes, ... (`slots` of them). Every whole 16-byte chunk whose source lies in the image is
// one 16-byte store fed by one or two aligned 16-byte loads (funnel-shifted when source and destination are
// aligned differently); the loads of GATHER_BATCH rows are issued before their stores (bytes in flight), whole
// chunks outside the image are one 16-byte store of the fill, and the partial chunks at a row's ends and the
// chunks touching the image's border go element by element.

#define GATHER_BATCH 4
// Rows whose length is a multiple of 16 bytes share each chunk's span (chunk_span), computed once per unit instead
// of per row; 0 computes it per row (atskern.gpu.patches.GATHER_PERIODIC, a tuning knob: the same output).
#ifndef GATHER_PERIODIC
#define GATHER_PERIODIC 1
#endif
#define GATHER_MAX_THREADS 256  // the launches' block size (atskern.gpu._module.THREADS_PER_BLOCK) at most
// blocks per SM the registers allow: 3 (<= 85 registers a thread) with int indices, 2 with 64-bit ones (no spills)

// Whether load16(p) reads only inside [begin, end): its aligned blocks, not only the 16 bytes it returns.
__device__ __forceinline__ bool load16_inside(const unsigned char* p, unsigned long long begin, unsigned long long end) {
    const unsigned long long address = reinterpret_cast<unsigned long long>(p);
    const unsigned long long first = address & ~15ULL;
    return first >= begin && first + ((address & 15ULL) ? 32ULL : 16ULL) <= end;
}

// The 16 bytes at `shift` (0..15) into the 32 bytes a, b (little endian).
__device__ __forceinline__ uint4 funnel16(uint4 a, uint4 b, unsigned shift) {
    if (shift == 0) return a;
    const unsigned bits = (shift & 3u) * 8u;
    unsigned v0, v1, v2, v3, v4;
    switch (shift >> 2) {
        case 0: v0 = a.x; v1 = a.y; v2 = a.z; v3 = a.w; v4 = b.x; break;
        case 1: v0 = a.y; v1 = a.z; v2 = a.w; v3 = b.x; v4 = b.y; break;
        case 2: v0 = a.z; v1 = a.w; v2 = b.x; v3 = b.y; v4 = b.z; break;
        default: v0 = a.w; v1 = b.x; v2 = b.y; v3 = b.z; v4 = b.w; break;
    }
    return make_uint4(__funnelshift_r(v0, v1, bits), __funnelshift_r(v1, v2, bits), __funnelshift_r(v2, v3, bits),
                      __funnelshift_r(v3, v4, bits));
}

// One output chunk of a patch row: its elements [e0, e1) and how it is written.
enum ChunkMode { CHUNK_NONE = 0, CHUNK_FAST = 1, CHUNK_FILL = 2, CHUNK_SLOW = 3 };

template <typename T, typename I>
struct Chunk {
    I e0, e1;
    int mode;
    const unsigned char* source;  // CHUNK_FAST: the chunk's first source byte
};

// Where chunk number `chunk` (counted from the row's first 16-byte line) falls in the row dst[0, width): its
// elements [e0, e1), whether the row has it at all and whether it is a whole aligned 16 bytes. It depends on the
// row only through dst's address modulo 16, so every row of a patch plane whose rows are a multiple of 16 bytes
// long shares it.
template <typename I>
struct ChunkSpan {
    I e0, e1;
    bool present, whole;
};

template <typename T, typename I>
__device__ __forceinline__ ChunkSpan<I> chunk_span(const T* dst, I width, unsigned long long chunk) {
    const long long item = (long long)sizeof(T);
    const unsigned long long start = reinterpret_cast<unsigned long long>(dst);
    const unsigned long long first = start >> 4;
    const unsigned long long last = (start + (unsigned long long)width * sizeof(T) - 1ULL) >> 4;
    ChunkSpan<I> span;
    span.e0 = 0;
    span.e1 = 0;
    span.present = first + chunk <= last;
    span.whole = false;
    if (!span.present) return span;
    // byte0 is a multiple of sizeof(T) in (-16, width * sizeof(T)): dst is T-aligned, chunks 16-aligned
    const long long byte0 = (long long)((first + chunk) << 4) - (long long)start;
    span.e0 = byte0 <= 0 ? I(0) : (I)(byte0 / item);
    const long long stop = (byte0 + 16) / item;
    span.e1 = stop < (long long)width ? (I)stop : width;
    span.whole = byte0 >= 0 && (long long)(span.e1 - span.e0) * item == 16;
    return span;
}

// The chunk `span` of a row whose part [lo, hi) comes from src (src[0] is element lo): how it is written. A fast
// chunk's 16-byte loads stay inside the image's bytes [begin, end) (chunks whose aligned blocks would leave it, at
// the image's first and last bytes, go element by element), so no load leaves the image's allocation.
template <typename T, typename I>
__device__ __forceinline__ Chunk<T, I> row_chunk(const ChunkSpan<I>& span, const T* src, I lo, I hi,
                                                 unsigned long long begin, unsigned long long end) {
    Chunk<T, I> c;
    c.e0 = span.e0;
    c.e1 = span.e1;
    c.mode = span.present ? CHUNK_SLOW : CHUNK_NONE;
    c.source = nullptr;
    if (span.whole) {
        if (c.e0 >= lo && c.e1 <= hi) {
            const unsigned char* s = reinterpret_cast<const unsigned char*>(src + (c.e0 - lo));
            if (load16_inside(s, begin, end)) {
                c.mode = CHUNK_FAST;
                c.source = s;
            }
        } else if (c.e1 <= lo || c.e0 >= hi) {
            c.mode = CHUNK_FILL;
        }
    }
    return c;
}

template <typename T, typename I>
__device__ void gather(const T* __restrict__ x, const Offsets& off, T* __restrict__ out, long long units,
                       long long image_bytes, const Geometry& g, unsigned long long fill_bits, int lanes_log2,
                       int unit_rows, int slots) {
    const T fill = (T)fill_bits;  // the fill's bytes are the low bytes of fill_bits (little endian)
    unsigned long long fill8 = sizeof(T) == 8 ? fill_bits : fill_bits & ((1ULL << (8 * (sizeof(T) & 7))) - 1ULL);
    fill8 *= sizeof(T) == 1 ? 0x0101010101010101ULL : sizeof(T) == 2 ? 0x0001000100010001ULL
           : sizeof(T) == 4 ? 0x0000000100000001ULL : 1ULL;  // the fill repeated over 8 bytes
    const uint4 fill16 = make_uint4((unsigned)fill8, (unsigned)(fill8 >> 32), (unsigned)fill8, (unsigned)(fill8 >> 32));
    const int lanes = 1 << lanes_log2;
    const int lane = (int)(threadIdx.x & (unsigned)(lanes - 1));
    const I per_block = (I)(blockDim.x >> lanes_log2);
    const I width = (I)(g.p2 * g.scale), image_width = (I)(g.s2 * g.scale);
    const I p0 = (I)g.p0, p1 = (I)g.p1, rows = (I)g.rows, count = (I)g.count;
    const I s0_size = (I)g.s0, s1_size = (I)g.s1;
    const I segments = (p1 + (I)unit_rows - 1) / (I)unit_rows;
    const I step = (I)gridDim.x * per_block;
    const unsigned long long image_begin = reinterpret_cast<unsigned long long>(x);
    const unsigned long long image_end = image_begin + (unsigned long long)image_bytes;
    const bool periodic = GATHER_PERIODIC && ((unsigned long long)width * sizeof(T)) % 16ULL == 0ULL;
    for (I unit = (I)blockIdx.x * per_block + (I)(threadIdx.x >> lanes_log2); unit < (I)units; unit += step) {
        const I segment = unit % segments;
        I rest = unit / segments;  // the plane (b, k, r, i0)
        const I plane = rest;
        const I i0 = rest % p0;
        rest /= p0;
        const I r = rest % rows;
        const I bk = rest / rows;
        const I b = bk / count;
        const Box box = patch_box(off, g, b, bk - b * count);
        const long long s0 = box.o0 + i0;
        I lo = 0, hi = 0;  // the part [lo, hi) of the plane's rows inside the image (rows inside S1)
        if (s0 >= 0 && s0 < g.s0) {
            const long long inside = (long long)image_width - box.o2;  // >= 0: o2 <= S2 * scale
            lo = (I)(box.o2 < 0 ? -box.o2 : 0);                        // <= width: o2 >= -P2 * scale
            hi = inside < (long long)width ? (I)inside : width;
            if (hi < lo) hi = lo;
        }
        const I first_row = segment * (I)unit_rows;  // i1 of the unit's first row
        const I n = p1 - first_row < (I)unit_rows ? p1 - first_row : (I)unit_rows;
        T* const dst0 = out + (plane * p1 + first_row) * width;
        // image row of (b, r, s0, s1 = o1 + first_row), valid only where 0 <= s0 < S0 and 0 <= s1 < S1
        const long long s1_first = box.o1 + (long long)first_row;
        const I plane_row = ((b * rows + r) * s0_size + (I)(hi > lo ? s0 : 0)) * s1_size;
        // row u of the unit: its part inside the image ([0, 0) where the row lies outside) and its source
        auto row_source = [&](I u, I& row_lo, I& row_hi) -> const T* {
            const long long s1 = s1_first + (long long)u;
            const bool inside = hi > lo && s1 >= 0 && s1 < g.s1;
            row_lo = inside ? lo : I(0);
            row_hi = inside ? hi : I(0);
            return inside ? x + ((plane_row + (I)s1) * image_width + (I)box.o2 + lo) : x;
        };
        for (int slot = 0; slot < slots; ++slot) {
            const unsigned long long chunk = (unsigned long long)(lane + slot * lanes);
            // rows a multiple of 16 bytes long: the unit's rows share the chunk's span, computed once
            const ChunkSpan<I> unit_span = periodic ? chunk_span<T, I>(dst0, width, chunk) : ChunkSpan<I>{};
            for (I u0 = 0; u0 < n; u0 += GATHER_BATCH) {
                uint4 a[GATHER_BATCH], bb[GATHER_BATCH];
                I e0[GATHER_BATCH];
                int mode[GATHER_BATCH];
                unsigned shift[GATHER_BATCH];
#pragma unroll
                for (int j = 0; j < GATHER_BATCH; ++j) {  // the loads of the batch's rows first
                    const I u = u0 + (I)j;
                    mode[j] = CHUNK_NONE;
                    e0[j] = 0;
                    shift[j] = 0;
                    if (u < n) {
                        I row_lo, row_hi;
                        const T* src = row_source(u, row_lo, row_hi);
                        const Chunk<T, I> c = row_chunk<T, I>(
                            periodic ? unit_span : chunk_span<T, I>(dst0 + u * width, width, chunk), src, row_lo,
                            row_hi, image_begin, image_end);
                        mode[j] = c.mode;
                        e0[j] = c.e0;
                        if (c.mode == CHUNK_FAST) {
                            const unsigned long long address = reinterpret_cast<unsigned long long>(c.source);
                            const uint4* aligned = reinterpret_cast<const uint4*>(address & ~15ULL);
                            shift[j] = (unsigned)(address & 15ULL);
                            a[j] = __ldg(aligned);
                            bb[j] = shift[j] ? __ldg(aligned + 1) : a[j];
                        }
                    }
                }
#pragma unroll
                for (int j = 0; j < GATHER_BATCH; ++j) {  // then the stores
                    const I u = u0 + (I)j;
                    T* const dst = dst0 + u * width;
                    if (mode[j] == CHUNK_FAST) {
                        *reinterpret_cast<uint4*>(dst + e0[j]) = funnel16(a[j], bb[j], shift[j]);
                    } else if (mode[j] == CHUNK_FILL) {
                        *reinterpret_cast<uint4*>(dst + e0[j]) = fill16;
                    } else if (mode[j] == CHUNK_SLOW) {  // rare: recompute the row's source
                        I row_lo, row_hi;
                        const T* src = row_source(u, row_lo, row_hi);
                        const Chunk<T, I> c = row_chunk<T, I>(chunk_span<T, I>(dst, width, chunk), src, row_lo,
                                                              row_hi, image_begin, image_end);
                        for (I e = c.e0; e < c.e1; ++e) dst[e] = (e >= row_lo && e < row_hi) ? src[e - row_lo] : fill;
                    }
                }
            }
        }
    }
}

#define GATHER(name, T, I, min_blocks)                                                                         \
    extern "C" __global__ void __launch_bounds__(GATHER_MAX_THREADS, min_blocks)                               \
        name(const T* x, OFFSET_PARAMS, T* out, long long units, long long image_bytes,                        \
                                    GEOMETRY_PARAMS, unsigned long long fill_bits, int lanes_log2,             \
                                    int unit_rows, int slots) {                                                \
        gather<T, I>(x, OFFSETS, out, units, image_bytes, GEOMETRY, fill_bits, lanes_log2, unit_rows, slots);  \
    }

GATHER(gather_u8_i32, unsigned char, int, 3)
GATHER(gather_u16_i32, unsigned short, int, 3)
GATHER(gather_u32_i32, unsigned int, int, 3)
GATHER(gather_u64_i32, unsigned long long, int, 3)
GATHER(gather_u8_i64, unsigned char, long long, 2)
GATHER(gather_u16_i64, unsigned short, long long, 2)
GATHER(gather_u32_i64, unsigned int, long long, 2)
GATHER(gather_u64_i64, unsigned long long, long long, 2)

// ---------------------------------------------------------------------------------------------------------
// Deterministic scatter in gather form: every image element is written exactly once (0 where no patch
// covers it), by the thread that owns it, as 0 + g_k1 + g_k2 + ... over its covering patches in increasing
// patch index: the CPU kernel's order, so the result is bitwise the CPU's, run to run and device to device.
//
// Blocks of SCATTER_THREADS threads, each taking a contiguous range of tiles: a tile is one s0, tile_h rows of S1
// and 2^tile_w_log2 elements of W (tile_h * 2^tile_w_log2 = pixels * SCATTER_THREADS; thread t owns the tile
// elements t + p * SCATTER_THREADS). The block walks the image's patches in chunks of `chunk`
// (<= SCATTER_THREADS): each thread tests one patch's box (the image's first SCATTER_STAGED boxes staged in
// shared memory once per image the block visits) against the tile; when one does, a block scan packs the hits
// into shared memory in patch order and every thread adds the hits that cover its elements. A tile no patch
// covers skips the scan and is written as 16-byte zeros where the rows are 16-byte aligned.
// No atomics, no sort, no temporary buffers, no memset.

#define SCATTER_THREADS 256
#define SCATTER_PIXELS 16
#define SCATTER_STAGED 1024  // patch boxes per image staged in shared memory

// a + b rounded to nearest, subnormals kept: CuPy compiles with -ftz=true, which would flush float32
// subnormals in a plain `+` (add.rn.ftz.f32) and break the bitwise match with the CPU (and exact adjointness).
__device__ __forceinline__ float add_exact(float a, float b) {
#ifdef __CUDA_ARCH__
    float sum;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(sum) : "f"(a), "f"(b));
    return sum;
#else
    return a + b;  // host builds of this file (tests/cuda_host): IEEE addition
#endif
}
__device__ __forceinline__ double add_exact(double a, double b) { return a + b; }  // -ftz touches only f32

template <typename F, typename I>
__device__ void scatter(const F* __restrict__ grad, const Offsets& off, F* __restrict__ out, const Geometry& g,
                        long long tiles, long long tiles_w, long long tiles_h, int tile_w_log2, int tile_h, int pixels,
                        int chunk) {
    typedef cub::BlockScan<int, SCATTER_THREADS> Scan;
    __shared__ typename Scan::TempStorage scan;
    __shared__ I hit_base[SCATTER_THREADS];  // grad index of (patch, r, i0, 0, 0)
    __shared__ I hit_o1[SCATTER_THREADS];
    __shared__ I hit_o2[SCATTER_THREADS];
    const int tid = (int)threadIdx.x;
    const I width = (I)(g.p2 * g.scale), image_width = (I)(g.s2 * g.scale);
    const I p0 = (I)g.p0, p1 = (I)g.p1, rows = (I)g.rows, count = (I)g.count;
    const I s0_size = (I)g.s0, s1_size = (I)g.s1;
    const int tile_w = 1 << tile_w_log2;
    // Tiles nobody covers are written with 16-byte stores of zeros where every tile row starts 16-byte aligned
    // (tile_w is a multiple of the vector's elements: tile columns start aligned when the image rows do).
    const int vector = (int)(16 / sizeof(F));
    const bool vectors = (reinterpret_cast<unsigned long long>(out) & 15ULL) == 0 && image_width % (I)vector == 0;
    // The block's contiguous range of tiles (a band of tile rows, in image order).
    const long long per_block = (tiles + (long long)gridDim.x - 1) / (long long)gridDim.x;
    const long long tile_begin = (long long)blockIdx.x * per_block;
    const long long tile_end = tile_begin + per_block < tiles ? tile_begin + per_block : tiles;
    // The boxes of image b's first SCATTER_STAGED patches, staged in shared memory once per image the block
    // visits (clipped offsets fit in I: |o| <= the sizes); later patches are read from the offsets per tile.
    __shared__ I staged_o0[SCATTER_STAGED];
    __shared__ I staged_o1[SCATTER_STAGED];
    __shared__ I staged_o2[SCATTER_STAGED];
    I staged_b = -1;
    const long long staged = g.count < SCATTER_STAGED ? g.count : SCATTER_STAGED;
    // tile_begin's coordinates, then stepped tile by tile (no 64-bit divisions per tile)
    long long rest = tile_begin;
    I a2 = (I)(rest % tiles_w) * (I)tile_w;
    rest /= tiles_w;
    I a1 = (I)(rest % tiles_h) * (I)tile_h;
    rest /= tiles_h;
    I s0 = (I)(rest % g.s0);
    rest /= g.s0;
    I r = (I)(rest % g.rows);
    I b = (I)(rest / g.rows);
    for (long long tile = tile_begin; tile < tile_end; ++tile) {  // block-uniform: the barriers are safe
        if (tile > tile_begin) {
            a2 += (I)tile_w;
            if (a2 >= image_width) {
                a2 = 0;
                a1 += (I)tile_h;
                if (a1 >= s1_size) {
                    a1 = 0;
                    if (++s0 == s0_size) {
                        s0 = 0;
                        if (++r == rows) {
                            r = 0;
                            ++b;
                        }
                    }
                }
            }
        }
        const I h_end = a1 + (I)tile_h < s1_size ? a1 + (I)tile_h : s1_size;
        const I w_end = a2 + (I)tile_w < image_width ? a2 + (I)tile_w : image_width;
        if (b != staged_b) {  // block-uniform
            __syncthreads();  // every thread is done with the previous image's boxes
            for (long long k = tid; k < staged; k += SCATTER_THREADS) {
                const Box box = patch_box(off, g, b, k);
                staged_o0[k] = (I)box.o0;
                staged_o1[k] = (I)box.o1;
                staged_o2[k] = (I)box.o2;
            }
            __syncthreads();
            staged_b = b;
        }
        F sums[SCATTER_PIXELS];
#pragma unroll
        for (int p = 0; p < SCATTER_PIXELS; ++p) sums[p] = F(0);
        int touched = 0;  // block-uniform: some patch covers part of the tile
        for (long long k0 = 0; k0 < g.count; k0 += chunk) {
            int hit = 0;
            I base = 0, o1 = 0, o2 = 0;
            const long long k = k0 + tid;
            if (tid < chunk && k < g.count) {
                I box_o0, box_o1, box_o2;
                if (k < staged) {
                    box_o0 = staged_o0[k];
                    box_o1 = staged_o1[k];
                    box_o2 = staged_o2[k];
                } else {
                    const Box box = patch_box(off, g, b, k);
                    box_o0 = (I)box.o0;
                    box_o1 = (I)box.o1;
                    box_o2 = (I)box.o2;
                }
                const I i0 = s0 - box_o0;  // the sums below in 64 bits: a box may end past the int range
                if (i0 >= 0 && i0 < p0 && box_o1 < h_end && (long long)a1 < (long long)box_o1 + g.p1 &&
                    box_o2 < w_end && (long long)a2 < (long long)box_o2 + (long long)width) {
                    hit = 1;
                    base = ((((I)b * count + (I)k) * rows + r) * p0 + i0) * p1 * width;
                    o1 = box_o1;
                    o2 = box_o2;
                }
            }
            if (!__syncthreads_or(hit)) continue;  // no patch of this chunk covers the tile
            touched = 1;
            int slot = 0, hits = 0;
            Scan(scan).ExclusiveSum(hit, slot, hits);
            if (hit) {
                hit_base[slot] = base;
                hit_o1[slot] = o1;
                hit_o2[slot] = o2;
            }
            __syncthreads();
            for (int j = 0; j < hits; ++j) {
                const I base_j = hit_base[j], o1_j = hit_o1[j], o2_j = hit_o2[j];
#pragma unroll
                for (int p = 0; p < SCATTER_PIXELS; ++p) {
                    if (p >= pixels) break;
                    const int q = tid + p * SCATTER_THREADS;
                    const I s1 = a1 + (I)(q >> tile_w_log2), w = a2 + (I)(q & (tile_w - 1));
                    const I i1 = s1 - o1_j, t = w - o2_j;
                    if (s1 < h_end && w < w_end && i1 >= 0 && i1 < p1 && t >= 0 && t < width) {
                        sums[p] = add_exact(sums[p], grad[base_j + i1 * width + t]);
                    }
                }
            }
            __syncthreads();  // the hit list and the scan storage are reused by the next chunk
        }
        F* const plane = out + ((b * rows + r) * s0_size + s0) * s1_size * image_width;
        if (!touched && vectors) {  // 0 everywhere: 16-byte stores
            const int per_row_log2 = tile_w_log2 - (vector == 4 ? 2 : 1);
            const int count_v = (tile_h * tile_w) / vector;
            for (int v = tid; v < count_v; v += SCATTER_THREADS) {
                const I s1 = a1 + (I)(v >> per_row_log2), w = a2 + (I)((v & ((1 << per_row_log2) - 1)) * vector);
                if (s1 < h_end && w < w_end) {
                    *reinterpret_cast<uint4*>(plane + s1 * image_width + w) = make_uint4(0, 0, 0, 0);
                }
            }
            continue;
        }
#pragma unroll
        for (int p = 0; p < SCATTER_PIXELS; ++p) {
            if (p >= pixels) break;
            const int q = tid + p * SCATTER_THREADS;
            const I s1 = a1 + (I)(q >> tile_w_log2), w = a2 + (I)(q & (tile_w - 1));
            if (s1 < h_end && w < w_end) plane[s1 * image_width + w] = sums[p];
        }
    }
}

// Non-deterministic alternative (deterministic=False): one atomic add per patch element into a zeroed image
// (float32 atomic adds flush subnormals to zero).
template <typename F, typename I>
__device__ void scatter_atomic(const F* __restrict__ grad, const Offsets& off, F* __restrict__ out, long long total,
                               const Geometry& g) {
    const I width = (I)(g.p2 * g.scale), image_width = (I)(g.s2 * g.scale);
    const I p0 = (I)g.p0, p1 = (I)g.p1, rows = (I)g.rows, count = (I)g.count;
    const I s0_size = (I)g.s0, s1_size = (I)g.s1;
    const I step = (I)gridDim.x * (I)blockDim.x;
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < (I)total; i += step) {
        I rest = i;
        const I t = rest % width;
        rest /= width;
        const I i1 = rest % p1;
        rest /= p1;
        const I i0 = rest % p0;
        rest /= p0;
        const I r = rest % rows;
        const I bk = rest / rows;
        const I b = bk / count;
        const Box box = patch_box(off, g, b, bk - b * count);
        const long long s0 = box.o0 + i0, s1 = box.o1 + i1, w = box.o2 + t;
        if (s0 < 0 || s0 >= g.s0 || s1 < 0 || s1 >= g.s1 || w < 0 || w >= (long long)image_width) continue;
        atomicAdd(out + ((((b * rows + r) * s0_size + (I)s0) * s1_size + (I)s1) * image_width + (I)w), grad[i]);
    }
}

#define SCATTER(suffix, F, I, min_blocks)                                                                      \
    extern "C" __global__ void __launch_bounds__(SCATTER_THREADS, min_blocks)                                  \
        scatter_##suffix(const F* grad, OFFSET_PARAMS, F* out, GEOMETRY_PARAMS, long long tiles,               \
                         long long tiles_w, long long tiles_h, int tile_w_log2, int tile_h, int pixels, int chunk) { \
        scatter<F, I>(grad, OFFSETS, out, GEOMETRY, tiles, tiles_w, tiles_h, tile_w_log2, tile_h, pixels, chunk);  \
    }                                                                                                           \
    extern "C" __global__ void scatter_atomic_##suffix(const F* grad, OFFSET_PARAMS, F* out, long long total,  \
                                                       GEOMETRY_PARAMS) {                                       \
        scatter_atomic<F, I>(grad, OFFSETS, out, total, GEOMETRY);                                              \
    }

// min_blocks: resident blocks per SM the registers allow without spills (ptxas): 4 = <= 64 registers a thread
SCATTER(f32_i32, float, int, 4)
SCATTER(f64_i32, double, int, 3)
SCATTER(f32_i64, float, long long, 2)
SCATTER(f64_i64, double, long long, 1)
