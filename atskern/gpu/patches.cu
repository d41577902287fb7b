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
// Gather: a group of 2^lanes_log2 threads per patch row (Wp contiguous elements of the output). The row is
// cut at the output's 16-byte boundaries; every whole 16-byte chunk whose source lies in the image is one
// 16-byte store fed by one or two aligned 16-byte loads (funnel-shifted when source and destination are
// aligned differently), the partial chunks at the row's ends and the chunks touching the border go
// element by element.

// Whether load16(p) reads only inside [begin, end): its aligned blocks, not only the 16 bytes it returns.
__device__ __forceinline__ bool load16_inside(const unsigned char* p, unsigned long long begin, unsigned long long end) {
    const unsigned long long address = reinterpret_cast<unsigned long long>(p);
    const unsigned long long first = address & ~15ULL;
    return first >= begin && first + ((address & 15ULL) ? 32ULL : 16ULL) <= end;
}

// The 16 bytes at p (any alignment) from aligned 16-byte loads; each load holds at least one of them.
__device__ __forceinline__ uint4 load16(const unsigned char* p) {
    const unsigned long long address = reinterpret_cast<unsigned long long>(p);
    const unsigned shift = (unsigned)(address & 15ULL);
    const uint4* aligned = reinterpret_cast<const uint4*>(address - shift);
    const uint4 a = __ldg(aligned);
    if (shift == 0) return a;
    const uint4 b = __ldg(aligned + 1);
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

// dst[t] = src[t - lo] for lo <= t < hi, fill for the other t < width; lanes threads share the row. The
// 16-byte loads stay inside the image's bytes [begin, end) (chunks whose aligned blocks would leave it, at the
// image's first and last bytes, go element by element), so no load leaves the image's allocation.
template <typename T, typename I>
__device__ __forceinline__ void copy_row(T* __restrict__ dst, const T* __restrict__ src, I lo, I hi, I width, T fill,
                                         int lane, int lanes, unsigned long long begin, unsigned long long end) {
    const long long item = (long long)sizeof(T);
    const unsigned long long start = reinterpret_cast<unsigned long long>(dst);
    const unsigned long long first = start >> 4;
    const unsigned long long last = (start + (unsigned long long)width * sizeof(T) - 1ULL) >> 4;
    for (unsigned long long chunk = first + (unsigned long long)lane; chunk <= last; chunk += (unsigned long long)lanes) {
        // byte0 is a multiple of sizeof(T) in (-16, width * sizeof(T)): dst is T-aligned, chunks 16-aligned
        const long long byte0 = (long long)(chunk << 4) - (long long)start;
        const I e0 = byte0 <= 0 ? I(0) : (I)(byte0 / item);
        const long long stop = (byte0 + 16) / item;
        const I e1 = stop < (long long)width ? (I)stop : width;
        if (byte0 >= 0 && (long long)(e1 - e0) * item == 16 && e0 >= lo && e1 <= hi &&
            load16_inside(reinterpret_cast<const unsigned char*>(src + (e0 - lo)), begin, end)) {
            *reinterpret_cast<uint4*>(dst + e0) = load16(reinterpret_cast<const unsigned char*>(src + (e0 - lo)));
        } else {
            for (I e = e0; e < e1; ++e) dst[e] = (e >= lo && e < hi) ? src[e - lo] : fill;
        }
    }
}

template <typename T, typename I>
__device__ void gather(const T* __restrict__ x, const Offsets& off, T* __restrict__ out, long long total_rows,
                       long long image_bytes, const Geometry& g, unsigned long long fill_bits, int lanes_log2) {
    const T fill = (T)fill_bits;  // the fill's bytes are the low bytes of fill_bits (little endian)
    const int lanes = 1 << lanes_log2;
    const int lane = (int)(threadIdx.x & (unsigned)(lanes - 1));
    const I per_block = (I)(blockDim.x >> lanes_log2);
    const I width = (I)(g.p2 * g.scale), image_width = (I)(g.s2 * g.scale);
    const I p0 = (I)g.p0, p1 = (I)g.p1, rows = (I)g.rows, count = (I)g.count;
    const I s0_size = (I)g.s0, s1_size = (I)g.s1;
    const I step = (I)gridDim.x * per_block;
    const unsigned long long image_begin = reinterpret_cast<unsigned long long>(x);
    const unsigned long long image_end = image_begin + (unsigned long long)image_bytes;
    for (I row = (I)blockIdx.x * per_block + (I)(threadIdx.x >> lanes_log2); row < (I)total_rows; row += step) {
        I rest = row;
        const I i1 = rest % p1;
        rest /= p1;
        const I i0 = rest % p0;
        rest /= p0;
        const I r = rest % rows;
        const I bk = rest / rows;
        const I b = bk / count;
        const Box box = patch_box(off, g, b, bk - b * count);
        const long long s0 = box.o0 + i0, s1 = box.o1 + i1;
        I lo = 0, hi = 0;  // the part [lo, hi) of the row inside the image
        const T* src = x;  // element lo of the row in the image (read only for lo <= t < hi)
        if (s0 >= 0 && s0 < g.s0 && s1 >= 0 && s1 < g.s1) {
            const long long inside = (long long)image_width - box.o2;  // >= 0: o2 <= S2 * scale
            lo = (I)(box.o2 < 0 ? -box.o2 : 0);                        // <= width: o2 >= -P2 * scale
            hi = inside < (long long)width ? (I)inside : width;
            if (hi < lo) hi = lo;
            if (hi > lo) {
                const I image_row = ((b * rows + r) * s0_size + (I)s0) * s1_size + (I)s1;
                src = x + (image_row * image_width + (I)box.o2 + lo);
            }
        }
        copy_row<T, I>(out + row * width, src, lo, hi, width, fill, lane, lanes, image_begin, image_end);
    }
}

#define GATHER(name, T, I)                                                                                     \
    extern "C" __global__ void name(const T* x, OFFSET_PARAMS, T* out, long long total_rows,                  \
                                    long long image_bytes, GEOMETRY_PARAMS, unsigned long long fill_bits,      \
                                    int lanes_log2) {                                                          \
        gather<T, I>(x, OFFSETS, out, total_rows, image_bytes, GEOMETRY, fill_bits, lanes_log2);               \
    }

GATHER(gather_u8_i32, unsigned char, int)
GATHER(gather_u16_i32, unsigned short, int)
GATHER(gather_u32_i32, unsigned int, int)
GATHER(gather_u64_i32, unsigned long long, int)
GATHER(gather_u8_i64, unsigned char, long long)
GATHER(gather_u16_i64, unsigned short, long long)
GATHER(gather_u32_i64, unsigned int, long long)
GATHER(gather_u64_i64, unsigned long long, long long)

// ---------------------------------------------------------------------------------------------------------
// Deterministic scatter in gather form: every image element is written exactly once (0 where no patch
// covers it), by the thread that owns it, as 0 + g_k1 + g_k2 + ... over its covering patches in increasing
// patch index: the CPU kernel's order, so the result is bitwise the CPU's, run to run and device to device.
//
// One block of SCATTER_THREADS threads per tile: one s0, tile_h rows of S1 and 2^tile_w_log2 elements of W
// (tile_h * 2^tile_w_log2 = pixels * SCATTER_THREADS; thread t owns the tile elements t + p * SCATTER_THREADS).
// The block walks the image's patches in chunks of `chunk` (<= SCATTER_THREADS): each thread tests one
// patch's box against the tile, a block scan packs the hits into shared memory in patch order, and every
// thread adds the hits that cover its elements. No atomics, no sort, no temporary buffers, no memset.

#define SCATTER_THREADS 256
#define SCATTER_PIXELS 16

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
    for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // block-uniform: the barriers are safe
        long long rest = tile;
        const I a2 = (I)(rest % tiles_w) * (I)tile_w;
        rest /= tiles_w;
        const I a1 = (I)(rest % tiles_h) * (I)tile_h;
        rest /= tiles_h;
        const I s0 = (I)(rest % g.s0);
        rest /= g.s0;
        const I r = (I)(rest % g.rows);
        const I b = (I)(rest / g.rows);
        const I h_end = a1 + (I)tile_h < s1_size ? a1 + (I)tile_h : s1_size;
        const I w_end = a2 + (I)tile_w < image_width ? a2 + (I)tile_w : image_width;
        F sums[SCATTER_PIXELS];
#pragma unroll
        for (int p = 0; p < SCATTER_PIXELS; ++p) sums[p] = F(0);
        for (long long k0 = 0; k0 < g.count; k0 += chunk) {
            int hit = 0;
            I base = 0, o1 = 0, o2 = 0;
            const long long k = k0 + tid;
            if (tid < chunk && k < g.count) {
                const Box box = patch_box(off, g, b, k);
                const long long i0 = (long long)s0 - box.o0;
                if (i0 >= 0 && i0 < g.p0 && box.o1 < (long long)h_end && (long long)a1 < box.o1 + g.p1 &&
                    box.o2 < (long long)w_end && (long long)a2 < box.o2 + (long long)width) {
                    hit = 1;
                    base = ((((I)b * count + (I)k) * rows + r) * p0 + (I)i0) * p1 * width;
                    o1 = (I)box.o1;
                    o2 = (I)box.o2;
                }
            }
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
#pragma unroll
        for (int p = 0; p < SCATTER_PIXELS; ++p) {
            if (p >= pixels) break;
            const int q = tid + p * SCATTER_THREADS;
            const I s1 = a1 + (I)(q >> tile_w_log2), w = a2 + (I)(q & (tile_w - 1));
            if (s1 < h_end && w < w_end) out[(((b * rows + r) * s0_size + s0) * s1_size + s1) * image_width + w] = sums[p];
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

#define SCATTER(suffix, F, I)                                                                                   \
    extern "C" __global__ void __launch_bounds__(SCATTER_THREADS)                                              \
        scatter_##suffix(const F* grad, OFFSET_PARAMS, F* out, GEOMETRY_PARAMS, long long tiles,               \
                         long long tiles_w, long long tiles_h, int tile_w_log2, int tile_h, int pixels, int chunk) { \
        scatter<F, I>(grad, OFFSETS, out, GEOMETRY, tiles, tiles_w, tiles_h, tile_w_log2, tile_h, pixels, chunk);  \
    }                                                                                                           \
    extern "C" __global__ void scatter_atomic_##suffix(const F* grad, OFFSET_PARAMS, F* out, long long total,  \
                                                       GEOMETRY_PARAMS) {                                       \
        scatter_atomic<F, I>(grad, OFFSETS, out, total, GEOMETRY);                                              \
    }

SCATTER(f32_i32, float, int)
SCATTER(f64_i32, double, int)
SCATTER(f32_i64, float, long long)
SCATTER(f64_i64, double, long long)
