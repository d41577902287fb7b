"""CuPy launches of ``patches.cu``: vectorized gather and its deterministic gather-form adjoint.

One kernel launch per call and no host synchronization: the offsets go to the
kernel as the caller gave them (any integer dtype, any strides; the kernel
clips them and maps them to the canonical layout itself), there are no
temporary buffers, and the deterministic scatter writes every image element
exactly once (no memset). The launch configuration is a pure function of the
validated layout (:func:`gather_plan`, :func:`scatter_plan`), memoized per
layout and device, so the host work per call is a dictionary lookup, a few
scalars and the launch (``atskern.gpu._launch``: through the driver, the
arguments packed as 64-bit words).

Canonical layout (as ``atskern.patches``): images ``(B, R, S0, S1, W)``,
patches ``(B, K, R, P0, P1, Wp)``; ``R`` is the channels in channels-first
(else 1), and in channels-last the channels are folded into the last dim
(``W = S2 * C``, ``Wp = P2 * C``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from .._backend import cupy
from . import _alignment, _launch, _module

SOURCE = "patches.cu"
WORD_NAMES = {1: "u8", 2: "u16", 4: "u32", 8: "u64"}
FLOAT_NAMES = {4: "f32", 8: "f64"}
OFFSET_KINDS = {("i", 1): 0, ("u", 1): 1, ("i", 2): 2, ("u", 2): 3, ("i", 4): 4, ("u", 4): 5, ("i", 8): 6, ("u", 8): 7}
"""The kernels' ``kind`` code of each integer offsets dtype (kind letter, item size)."""
INT32_LIMIT = 2**31 - 1
MAX_BLOCKS = 1 << 20
MAX_LANES = 32
GATHER_MAX_THREADS = 256
"""The gather's __launch_bounds__ (patches.cu GATHER_MAX_THREADS): its blocks have at most this many threads."""
GATHER_BATCH = 4
"""Rows whose loads the gather issues before their stores (patches.cu GATHER_BATCH)."""
GATHER_PERIODIC = True
"""patches.cu GATHER_PERIODIC: where a patch row is a multiple of 16 bytes long, the gather computes each chunk's place
in a row once per unit of rows instead of per row (fewer instructions per 16-byte chunk: Nsight Compute had the
gather issue-bound, DRAM at 27%); a tuning knob, the same output. On the H200 (``bench.gpu_tuning --only gather``,
``bench/results/gpu-nvidia-h200-077b93b-patches.md``) it took 4-5% off the kernel time of the 32², 64² and uint8
128² gathers; 16 or 32 rows per unit (``GATHER_UNIT_ROWS``) were slower but for 32² (4%)."""
GATHER_UNIT_ROWS = 8
"""Consecutive rows of a patch plane per thread group of the gather (one offsets read per unit; the kernel
issues the loads of 4 rows before their stores)."""
SCATTER_THREADS = 256
"""Block size of the deterministic scatter (fixed: its CUB block scan is compiled for it)."""
SCATTER_PIXELS = 16
"""Image elements per thread of the deterministic scatter (the kernel's register array holds at most this many)."""
SCATTER_STAGED = 1024
"""Patch boxes per image the deterministic scatter stages in shared memory (patches.cu SCATTER_STAGED)."""
SCATTER_BLOCKS = 2048
"""Most blocks of the deterministic scatter (a few waves of resident blocks on an H100/H200)."""
SCATTER_CHUNK = SCATTER_THREADS
"""Patches tested against a tile per pass of the deterministic scatter; tests lower it to exercise many passes."""


def _next_pow2(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


class Geometry(NamedTuple):
    """The kernels' ``GEOMETRY_PARAMS``: canonical sizes, spatial dims padded in front with 1s."""

    count: int
    rows: int
    p0: int
    p1: int
    p2: int
    scale: int
    s0: int
    s1: int
    s2: int
    dims: int

    @property
    def width(self) -> int:
        """Elements of one patch row (``Wp``)."""
        return self.p2 * self.scale

    @property
    def image_width(self) -> int:
        """Elements of one image row (``W``)."""
        return self.s2 * self.scale

    def args(self) -> tuple:
        return tuple(int(v) for v in self)


def geometry(layout) -> Geometry:
    """The canonical sizes of a validated :class:`atskern._validation.PatchLayout`."""
    pad = 3 - layout.ndim
    s0, s1, s2 = (1,) * pad + tuple(layout.spatial)
    p0, p1, p2 = (1,) * pad + tuple(layout.patch)
    rows, scale = (layout.channels, 1) if layout.channels_first else (1, layout.channels)
    return Geometry(layout.count, rows, p0, p1, p2, scale, s0, s1, s2, layout.ndim)


def index_suffix(*element_counts: int, headroom: int = 0) -> str:
    """``'i32'`` when every element index (plus ``headroom``, a grid stride) fits in an int, else ``'i64'``."""
    return "i32" if max(element_counts) + headroom < INT32_LIMIT else "i64"


def offset_args(offsets) -> tuple:
    """``(offsets, stride_b, stride_k, stride_d, kind)``: the array itself, its byte strides and dtype code."""
    return (offsets,) + _offset_scalars(offsets.dtype, offsets.strides)


@functools.lru_cache(maxsize=256)
def _offset_scalars(dtype, strides) -> tuple:
    """The scalars of :func:`offset_args` (memoized per dtype and strides: no NumPy scalars made per call)."""
    dtype = np.dtype(dtype)
    stride_b, stride_k, stride_d = (int(s) for s in strides)
    return stride_b, stride_k, stride_d, OFFSET_KINDS[(dtype.kind, dtype.itemsize)]


def fill_bits(fill_value) -> int:
    """The fill's bytes (a 0-d array of the images' dtype) as the low bytes of a uint64 (little endian)."""
    return int.from_bytes(np.asarray(fill_value).tobytes(), "little")


class Plan(NamedTuple):
    """One launch: kernel name, grid, block and the scalar arguments that depend only on the layout
    (``args`` go after the output array, ``tail`` last)."""

    kernel: str
    grid: tuple
    block: tuple
    args: tuple
    tail: tuple = ()


def gather_plan(layout, itemsize: int, threads: int, unit_rows: int | None = None) -> Plan:
    """Launch of the gather: a group of ``2**lanes_log2`` threads (enough for a row's 16-byte chunks, <= 32;
    each lane takes ``slots`` chunks of a row) per unit of ``unit_rows`` consecutive rows of one patch plane."""
    g = geometry(layout)
    threads = min(threads, GATHER_MAX_THREADS)
    unit_rows = min(unit_rows or GATHER_UNIT_ROWS, g.p1)
    planes = layout.batch * g.count * g.rows * g.p0
    units = planes * -(-g.p1 // unit_rows)
    chunks = -(-g.width * itemsize // 16) + 1  # + 1: the row need not start on a 16-byte boundary
    lanes = min(MAX_LANES, threads, _next_pow2(chunks))
    slots = -(-chunks // lanes)
    groups_per_block = threads // lanes
    blocks = max(1, min(MAX_BLOCKS, -(-units // groups_per_block)))
    out_elements = planes * g.p1 * g.width
    image_elements = layout.batch * g.rows * g.s0 * g.s1 * g.image_width
    # a batch's row pointers may pass the output's end by GATHER_BATCH rows (computed, never used)
    suffix = index_suffix(out_elements + GATHER_BATCH * g.width, image_elements, units, headroom=MAX_BLOCKS * threads)
    args = (int(units), int(image_elements * itemsize)) + g.args()
    tail = (lanes.bit_length() - 1, int(unit_rows), int(slots))
    return Plan(f"gather_{WORD_NAMES[itemsize]}_{suffix}", (blocks,), (threads,), args, tail)


def scatter_tile(s1: int, image_width: int, pixels: int = SCATTER_PIXELS) -> tuple[int, int]:
    """``(tile_h, tile_w)`` of the deterministic scatter: ``pixels * SCATTER_THREADS`` elements (``pixels`` a power
    of two), ``tile_w`` a power of two from 32 up; near square (256 wide) unless the image has fewer rows or narrower rows than that."""
    elements = pixels * SCATTER_THREADS
    tile_w = min(256, elements)
    if s1 < elements // tile_w:  # few rows (1-D images): wider tiles
        tile_w = min(elements, _next_pow2(-(-elements // s1)))
    tile_w = max(min(32, elements), min(tile_w, _next_pow2(image_width)))  # narrow rows: taller tiles
    return elements // tile_w, tile_w


def scatter_plan(layout, pixels: int = SCATTER_PIXELS, chunk: int = SCATTER_CHUNK) -> Plan:
    """Launch of the deterministic scatter: at most ``SCATTER_BLOCKS`` blocks, each taking a contiguous range of
    image tiles (so the patch boxes a thread keeps in registers serve many tiles)."""
    if pixels not in (1, 2, 4, 8, 16) or pixels > SCATTER_PIXELS or not 1 <= chunk <= SCATTER_THREADS:
        raise ValueError(f"pixels must be a power of two <= {SCATTER_PIXELS} and chunk in 1..{SCATTER_THREADS}, "
                         f"got {pixels}, {chunk}")
    g = geometry(layout)
    tile_h, tile_w = scatter_tile(g.s1, g.image_width, pixels)
    tiles_w = -(-g.image_width // tile_w)
    tiles_h = -(-g.s1 // tile_h)
    tiles = layout.batch * g.rows * g.s0 * tiles_h * tiles_w
    image_elements = layout.batch * g.rows * g.s0 * g.s1 * g.image_width
    grad_elements = layout.batch * g.count * g.rows * g.p0 * g.p1 * g.width
    # a tile's last index may pass the image's end by less than a tile; the rest is bounded by the sizes
    suffix = index_suffix(image_elements, grad_elements, headroom=tile_h * tile_w + g.image_width * tile_h)
    args = g.args() + tuple(int(v) for v in (tiles, tiles_w, tiles_h, tile_w.bit_length() - 1, tile_h, pixels, chunk))
    return Plan(f"{{float}}_{suffix}", (max(1, min(SCATTER_BLOCKS, tiles)),), (SCATTER_THREADS,), args)


def atomic_plan(layout, threads: int) -> Plan:
    """Launch of the atomic scatter: one thread per patch element (grid-strided)."""
    g = geometry(layout)
    total = layout.batch * g.count * g.rows * g.p0 * g.p1 * g.width
    image_elements = layout.batch * g.rows * g.s0 * g.s1 * g.image_width
    blocks = max(1, min(MAX_BLOCKS, -(-total // threads)))
    suffix = index_suffix(total, image_elements, headroom=MAX_BLOCKS * threads)
    return Plan(f"{{float}}_{suffix}", (blocks,), (threads,), (int(total),) + g.args())


def _device() -> int:
    return cupy().cuda.runtime.getDevice()


def compile_options(periodic: bool) -> tuple[str, ...]:
    """The NVRTC options of ``patches.cu`` for the value of its tuning knob (:data:`GATHER_PERIODIC`)."""
    return (f"-DGATHER_PERIODIC={int(periodic)}",)


@functools.lru_cache(maxsize=None)
def _kernel(name: str, device: int, periodic: bool) -> int:
    return _module.function(SOURCE, name, compile_options(periodic)).kernel.ptr


def _handle(name: str, device: int) -> int:
    """The ``CUfunction`` of kernel ``name`` on ``device``, compiled for the knob's value now (memoized)."""
    return _kernel(name, device, bool(GATHER_PERIODIC))


_cached_gather_plan = functools.lru_cache(maxsize=1024)(gather_plan)
_cached_scatter_plan = functools.lru_cache(maxsize=1024)(scatter_plan)
_cached_atomic_plan = functools.lru_cache(maxsize=1024)(atomic_plan)


def gather_launch(x, offsets, layout, fill_value, out, threads: int | None = None):
    """``(kernel name, grid, block, arguments)`` of the gather: pure host logic (the CPU tests run exactly these
    arguments through a host build of the kernel, tests/test_cuda_host.py)."""
    plan = _cached_gather_plan(layout, x.dtype.itemsize, threads or _module.THREADS_PER_BLOCK)
    args = (x,) + offset_args(offsets) + (out,) + plan.args + (fill_bits(fill_value),) + plan.tail
    return plan.kernel, plan.grid, plan.block, args


def scatter_launch(grad, offsets, layout, out, deterministic: bool = True, threads: int | None = None,
                   pixels: int | None = None, chunk: int | None = None):
    """``(kernel name, grid, block, arguments)`` of the deterministic (or atomic) scatter; ``grad`` already in
    ``out``'s dtype and C-contiguous."""
    name = FLOAT_NAMES[out.dtype.itemsize]
    if deterministic:
        plan = _cached_scatter_plan(layout, pixels or SCATTER_PIXELS, chunk or SCATTER_CHUNK)
        kernel = "scatter_" + plan.kernel.format(float=name)
    else:
        plan = _cached_atomic_plan(layout, threads or _module.THREADS_PER_BLOCK)
        kernel = "scatter_atomic_" + plan.kernel.format(float=name)
    return kernel, plan.grid, plan.block, (grad,) + offset_args(offsets) + (out,) + plan.args


def clear_caches():
    """Forget the memoized plans (after changing the module's tuning constants, as the tests do)."""
    for cache in (_cached_gather_plan, _cached_scatter_plan, _cached_atomic_plan, _offset_scalars):
        cache.cache_clear()


def gather(x, offsets, layout, fill_value, out):
    """``out`` (patches of ``layout``) = the patches of ``x`` at ``offsets``, ``fill_value`` outside. One launch
    (arrays at addresses or strides that are not a multiple of their item size go through byte copies first, and
    such an ``out`` is written through its bytes: ``atskern.gpu._alignment``)."""
    if _alignment.misaligned(x, offsets, out):
        written = _alignment.aligned_output(out)
        gather(_alignment.aligned(x), _alignment.aligned(offsets), layout, fill_value, written)
        return _alignment.written_back(out, written)
    if not x.flags.c_contiguous:
        x = cupy().ascontiguousarray(x)
    name, grid, block, args = gather_launch(x, offsets, layout, fill_value, out)
    _launch.launch(_handle(name, _device()), grid, block, args)
    return out


def scatter(grad, offsets, layout, out, *, deterministic=True):
    """``out`` (overwritten) = the patches ``grad`` added at ``offsets``, in ``out``'s float dtype.

    Deterministic (default): one launch writing every element once as the sum of its covering patches in
    patch order, bitwise the CPU kernel's result. ``deterministic=False``: zero ``out``, then atomic adds. Arrays
    that CUDA cannot address element by element go through byte copies, as in :func:`gather`.
    """
    if _alignment.misaligned(grad, offsets, out):
        written = _alignment.aligned_output(out)
        scatter(_alignment.aligned(grad), _alignment.aligned(offsets), layout, written, deterministic=deterministic)
        return _alignment.written_back(out, written)
    cp = cupy()
    if grad.dtype != out.dtype:
        grad = grad.astype(out.dtype)  # float16 / bfloat16 gradients accumulate in float32
    if not grad.flags.c_contiguous:
        grad = cp.ascontiguousarray(grad)
    name, grid, block, args = scatter_launch(grad, offsets, layout, out, bool(deterministic))
    if not deterministic:
        out.fill(0)
    _launch.launch(_handle(name, _device()), grid, block, args)
    return out
