// atskern/gpu/patches.cu compiled for the host (tests/test_cuda_host.py): one extern "C" launcher per kernel,
// taking the grid and block sizes and then exactly the kernel's own arguments.
#include "cuda_shim.h"
#include "patches.cu"

#define GATHER_HOST(name, T)                                                                                    \
    extern "C" void host_##name(unsigned grid, unsigned block, const T* x, OFFSET_PARAMS, T* out,               \
                                long long units, long long image_bytes, GEOMETRY_PARAMS,                        \
                                unsigned long long fill_bits, int lanes_log2, int unit_rows, int slots) {       \
        launch(grid, block, [=] {                                                                               \
            name(x, offsets, stride_b, stride_k, stride_d, kind, out, units, image_bytes, count, rows, p0, p1,   \
                 p2, scale, s0, s1, s2, dims, fill_bits, lanes_log2, unit_rows, slots);                         \
        });                                                                                                     \
    }

GATHER_HOST(gather_u8_i32, unsigned char)
GATHER_HOST(gather_u16_i32, unsigned short)
GATHER_HOST(gather_u32_i32, unsigned int)
GATHER_HOST(gather_u64_i32, unsigned long long)
GATHER_HOST(gather_u8_i64, unsigned char)
GATHER_HOST(gather_u16_i64, unsigned short)
GATHER_HOST(gather_u32_i64, unsigned int)
GATHER_HOST(gather_u64_i64, unsigned long long)

#define SCATTER_HOST(suffix, F)                                                                                 \
    extern "C" void host_scatter_##suffix(unsigned grid, unsigned block, const F* grad, OFFSET_PARAMS, F* out,  \
                                          GEOMETRY_PARAMS, long long tiles, long long tiles_w, long long tiles_h, \
                                          int tile_w_log2, int tile_h, int pixels, int chunk) {                 \
        launch(grid, block, [=] {                                                                               \
            scatter_##suffix(grad, offsets, stride_b, stride_k, stride_d, kind, out, count, rows, p0, p1, p2,    \
                             scale, s0, s1, s2, dims, tiles, tiles_w, tiles_h, tile_w_log2, tile_h, pixels,     \
                             chunk);                                                                            \
        });                                                                                                     \
    }                                                                                                           \
    extern "C" void host_scatter_atomic_##suffix(unsigned grid, unsigned block, const F* grad, OFFSET_PARAMS,   \
                                                 F* out, long long total, GEOMETRY_PARAMS) {                    \
        launch(grid, block, [=] {                                                                               \
            scatter_atomic_##suffix(grad, offsets, stride_b, stride_k, stride_d, kind, out, total, count, rows,  \
                                    p0, p1, p2, scale, s0, s1, s2, dims);                                       \
        });                                                                                                     \
    }

SCATTER_HOST(f32_i32, float)
SCATTER_HOST(f64_i32, double)
SCATTER_HOST(f32_i64, float)
SCATTER_HOST(f64_i64, double)
