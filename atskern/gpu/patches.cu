// Patch gather and its deterministic adjoint on the canonical layout of atskern.patches:
// images (B, R, S0, S1, W), patches (B, K, R, P0, P1, Wp), offsets int64 (B, K, 3) clipped to
// [-P, S] and scaled to the last dim's unit. One thread per output element, so neighbouring
// threads write neighbouring addresses. I is the index type: int where every size fits, else long long.

struct Shape {
    long long count, rows, p0, p1, width, s0, s1, image_width;
};

// Kernels take the shape as scalars (CuPy passes NumPy scalars by value, not structs).
#define SHAPE_PARAMS                                                                                        \
    long long count, long long rows, long long p0, long long p1, long long width, long long s0, long long s1, \
        long long image_width
#define SHAPE Shape{count, rows, p0, p1, width, s0, s1, image_width}

template <typename I>
struct PatchIndex {
    I bk, r, i0, i1, t;
};

template <typename I>
__device__ __forceinline__ PatchIndex<I> patch_index(I i, I rows, I p0, I p1, I width) {
    PatchIndex<I> at;
    at.t = i % width;
    I rest = i / width;
    at.i1 = rest % p1;
    rest /= p1;
    at.i0 = rest % p0;
    rest /= p0;
    at.r = rest % rows;
    at.bk = rest / rows;
    return at;
}

template <typename I>
__device__ __forceinline__ bool inside(I v, I size) {
    return v >= 0 && v < size;
}

template <typename T, typename I>
__device__ void gather(const T* __restrict__ x, const long long* __restrict__ offsets, T* __restrict__ out,
                       long long total, Shape shape, T fill) {
    const I rows = (I)shape.rows, p0 = (I)shape.p0, p1 = (I)shape.p1, width = (I)shape.width;
    const I s0_size = (I)shape.s0, s1_size = (I)shape.s1, image_width = (I)shape.image_width;
    const I count = (I)shape.count;
    const I stride = (I)gridDim.x * (I)blockDim.x;
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < (I)total; i += stride) {
        const PatchIndex<I> at = patch_index<I>(i, rows, p0, p1, width);
        const long long* o = offsets + 3 * (long long)at.bk;
        const I s0 = (I)o[0] + at.i0, s1 = (I)o[1] + at.i1, w = (I)o[2] + at.t;
        T value = fill;
        if (inside(s0, s0_size) && inside(s1, s1_size) && inside(w, image_width)) {
            const I b = at.bk / count;
            value = x[(((b * rows + at.r) * s0_size + s0) * s1_size + s1) * image_width + w];
        }
        out[i] = value;
    }
}

#define GATHER(name, T, I)                                                                                  \
    extern "C" __global__ void name(const T* x, const long long* offsets, T* out, long long total,         \
                                    SHAPE_PARAMS, T fill) {                                                 \
        gather<T, I>(x, offsets, out, total, SHAPE, fill);                                                  \
    }

GATHER(gather_u8_i32, unsigned char, int)
GATHER(gather_u16_i32, unsigned short, int)
GATHER(gather_u32_i32, unsigned int, int)
GATHER(gather_u64_i32, unsigned long long, int)
GATHER(gather_u8_i64, unsigned char, long long)
GATHER(gather_u16_i64, unsigned short, long long)
GATHER(gather_u32_i64, unsigned int, long long)
GATHER(gather_u64_i64, unsigned long long, long long)

// Overlap lists: for each patch (b, k), the patches j != k of the same image whose boxes intersect
// it, in increasing j. Pass 0 (fill_lists == 0) writes counts[b * K + k]; pass 1 writes lists[starts[bk] ...].
__device__ __forceinline__ bool boxes_meet(const long long* a, const long long* c, const Shape& shape) {
    return a[0] < c[0] + shape.p0 && c[0] < a[0] + shape.p0 && a[1] < c[1] + shape.p1 && c[1] < a[1] + shape.p1 &&
           a[2] < c[2] + shape.width && c[2] < a[2] + shape.width;
}

extern "C" __global__ void overlaps(const long long* __restrict__ offsets, long long patches, SHAPE_PARAMS,
                                    const long long* __restrict__ starts, int* __restrict__ counts,
                                    int* __restrict__ lists, int fill_lists) {
    const Shape shape = SHAPE;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long bk = (long long)blockIdx.x * blockDim.x + threadIdx.x; bk < patches; bk += stride) {
        const long long b = bk / shape.count;
        const long long k = bk - b * shape.count;
        const long long* mine = offsets + 3 * bk;
        int found = 0;
        for (long long j = 0; j < shape.count; ++j) {
            if (j == k || !boxes_meet(mine, offsets + 3 * (b * shape.count + j), shape)) continue;
            if (fill_lists) lists[starts[bk] + found] = (int)j;
            ++found;
        }
        if (!fill_lists) counts[bk] = found;
    }
}

// Deterministic scatter: each image element covered by some patch is written by exactly one thread,
// the one of the first covering patch, which sums the covering patches' values in patch order
// (0 + g_first + g_next + ...), the same order as the CPU kernel. Uncovered elements stay as zeroed.
template <typename F, typename I>
__device__ void scatter(const F* __restrict__ grad, const long long* __restrict__ offsets,
                        const long long* __restrict__ starts, const int* __restrict__ lists, F* __restrict__ out,
                        long long total, Shape shape) {
    const I rows = (I)shape.rows, p0 = (I)shape.p0, p1 = (I)shape.p1, width = (I)shape.width;
    const I s0_size = (I)shape.s0, s1_size = (I)shape.s1, image_width = (I)shape.image_width;
    const I count = (I)shape.count;
    const I stride = (I)gridDim.x * (I)blockDim.x;
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < (I)total; i += stride) {
        const PatchIndex<I> at = patch_index<I>(i, rows, p0, p1, width);
        const long long* o = offsets + 3 * (long long)at.bk;
        const I s0 = (I)o[0] + at.i0, s1 = (I)o[1] + at.i1, w = (I)o[2] + at.t;
        if (!(inside(s0, s0_size) && inside(s1, s1_size) && inside(w, image_width))) continue;
        const I b = at.bk / count;
        const I k = at.bk - b * count;
        const long long first = starts[at.bk], last = starts[at.bk + 1];
        bool owner = true;
        F sum = F(0);
        sum += grad[i];
        for (long long n = first; n < last; ++n) {
            const I j = (I)lists[n];
            const long long* oj = offsets + 3 * ((long long)b * count + j);
            const I j0 = s0 - (I)oj[0], j1 = s1 - (I)oj[1], jt = w - (I)oj[2];
            if (!(inside(j0, p0) && inside(j1, p1) && inside(jt, width))) continue;
            if (j < k) {
                owner = false;
                break;
            }
            sum += grad[((((I)b * count + j) * rows + at.r) * p0 + j0) * p1 * width + j1 * width + jt];
        }
        if (owner) out[(((I)b * rows + at.r) * s0_size + s0) * s1_size * image_width + s1 * image_width + w] = sum;
    }
}

// Non-deterministic alternative (deterministic=False): one atomic add per patch element.
template <typename F, typename I>
__device__ void scatter_atomic(const F* __restrict__ grad, const long long* __restrict__ offsets, F* __restrict__ out,
                               long long total, Shape shape) {
    const I rows = (I)shape.rows, p0 = (I)shape.p0, p1 = (I)shape.p1, width = (I)shape.width;
    const I s0_size = (I)shape.s0, s1_size = (I)shape.s1, image_width = (I)shape.image_width;
    const I count = (I)shape.count;
    const I stride = (I)gridDim.x * (I)blockDim.x;
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < (I)total; i += stride) {
        const PatchIndex<I> at = patch_index<I>(i, rows, p0, p1, width);
        const long long* o = offsets + 3 * (long long)at.bk;
        const I s0 = (I)o[0] + at.i0, s1 = (I)o[1] + at.i1, w = (I)o[2] + at.t;
        if (!(inside(s0, s0_size) && inside(s1, s1_size) && inside(w, image_width))) continue;
        const I b = at.bk / count;
        atomicAdd(out + ((((b * rows + at.r) * s0_size + s0) * s1_size + s1) * image_width + w), grad[i]);
    }
}

#define SCATTER(suffix, F, I)                                                                               \
    extern "C" __global__ void scatter_##suffix(const F* grad, const long long* offsets,                   \
                                                const long long* starts, const int* lists, F* out,          \
                                                long long total, SHAPE_PARAMS) {                            \
        scatter<F, I>(grad, offsets, starts, lists, out, total, SHAPE);                                     \
    }                                                                                                       \
    extern "C" __global__ void scatter_atomic_##suffix(const F* grad, const long long* offsets, F* out,    \
                                                       long long total, SHAPE_PARAMS) {                     \
        scatter_atomic<F, I>(grad, offsets, out, total, SHAPE);                                             \
    }

SCATTER(f32_i32, float, int)
SCATTER(f64_i32, double, int)
SCATTER(f32_i64, float, long long)
SCATTER(f64_i64, double, long long)
