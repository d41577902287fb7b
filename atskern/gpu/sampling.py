"""CuPy sampling kernels (CUDA source: ``sampling.cu``); the twins of ``atskern.cpu.sampling``.

:func:`sample` is the backend interface of ``atskern.sampling``: indices, probs and the per-row status,
computed by a fixed sequence of launches with the validation fused into the sampling pass (see the header of
``sampling.cu``). Nothing is read back and nothing waits for the device, so a call is asynchronous and CUDA-graph
capturable; ``atskern.sampling`` reads the status back when validating. The draws equal the CPU kernel's for the
same seed (the same Philox numbers and keys), up to rounding ties.

The launch plan is pure Python (:func:`launches`): the same plan runs on CuPy arrays here and on NumPy arrays
through the host build of ``sampling.cu`` in ``tests/test_cuda_host_sampling.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from .._backend import cupy
from . import _module

SOURCE = "sampling.cu"
MAX_SELECTION_N = 2048  # ATS_MAX_N in sampling.cu: larger n sorts every key of the row (cp.argsort)
PER_THREAD = 4  # ATS_PER_THREAD in sampling.cu
STATS = 6  # ATS_STATS in sampling.cu
RANK_MAX = 1024  # ATS_RANK_MAX in sampling.cu: a screened row of more kept keys is sorted rather than ranked
SELECT_THREADS = (32, 64, 128, 256)
"""Block sizes the selecting kernels compile for (ATS_SELECT_THREADS: CUB's block primitives take it at compile
time; the selection buffer of MAX_SELECTION_N + PER_THREAD * threads entries must fit 48 KiB)."""
MIN_BLOCKS = 2
"""ATS_MIN_BLOCKS: selecting blocks an SM must hold at once (their register cap); a tuning knob, draws unchanged."""
MIN_CHUNK = 1 << 12
"""Fewest positions of a chunk (4 tiles of 256 threads): a small map still spreads over many short blocks (the
latency of a block is about one tile per 1024 positions, serialized), and finish_rows merges only the prefix of
each chunk's list under the row's bound, so many chunks cost the merge little."""
MAX_SLOTS = 1 << 31  # positions in a chunk and candidate slots of a row: the kernels hold them in 32 bits
BLOCKS_PER_SM = 2
"""Target chunks per multiprocessor: one wave of selecting blocks (``MIN_BLOCKS`` of them fit an SM at once; on
the H200, 2 beat 4 for 1 x 4096²)."""
REPLACE_TILES = 8
"""With replacement, most tiles of a chunk: a draw's block finds its chunk from the chunk sums, then scans the
positions from the chunk's start a tile a step."""
NULL = np.uint64(0)  # a null pointer argument
FUSED = True
"""``atskern.sampling``: this backend takes logits as they are and applies the scale-free rescaling itself."""


def _suffix(dtype) -> str:
    return "f32" if np.dtype(dtype) == np.float32 else "f64"


def max_selection_n(threads: int | None = None) -> int:
    """Largest ``n`` the shared-memory selection handles (any block size of :data:`SELECT_THREADS`); beyond it
    every key of the row is computed and sorted."""
    return MAX_SELECTION_N


def selection_capacity(threads: int) -> int:
    """Entries of a selecting block's buffer (ATS_CAPACITY): the ``n`` kept and one tile of offers; 12 bytes each
    (36 KiB for 256 threads), sorted with ``cub::BlockRadixSort``."""
    return MAX_SELECTION_N + PER_THREAD * threads


def screen_want(n: int) -> float:
    """Keys a screened row expects below its bound (ATS_SCREEN_WANT in sampling.cu): fewer than ``n`` fall below it
    with probability about 1e-9."""
    return n + 6.0 * math.sqrt(n) + 16.0


def screen_capacity(n: int, size: int, threads: int) -> int:
    """Slots of a row's screening buffer (ATS: twice the keys expected below the bound, plus 64), or 0 where rows are
    selected chunk by chunk instead: ``n`` too large for the buffer to fit a selecting block's sort, or rows of 2^31
    positions and more (finish_rows' fallback selects a row alone, in 32-bit positions).

    More keys than that fall below the bound only far out in the tail (the bound expects a lower bound of the count);
    then, as with fewer than ``n``, finish_rows selects the row alone: slower, the same draws.
    """
    capacity = math.ceil(2.0 * screen_want(n)) + 64
    if capacity > selection_capacity(threads) or size >= MAX_SLOTS - PER_THREAD * threads:
        return 0
    return capacity


def compile_options(threads: int) -> tuple[str, ...]:
    """The nvcc/NVRTC options of the module whose selecting kernels run ``threads``-thread blocks."""
    return (f"-DATS_SELECT_THREADS={threads}", f"-DATS_MIN_BLOCKS={MIN_BLOCKS}")


def chunk_size(rows: int, size: int, threads: int, multiprocessors: int) -> int:
    """Positions per block: about ``BLOCKS_PER_SM`` blocks per multiprocessor over the call (one wave), at least
    ``MIN_CHUNK`` positions each, a whole number of tiles.

    The draws do not depend on it: each block keeps its exact n smallest keys.
    """
    target_blocks = BLOCKS_PER_SM * multiprocessors
    pieces = max(1, -(-target_blocks // rows))
    tile = PER_THREAD * threads
    chunk = max(MIN_CHUNK, -(-size // pieces))
    return -(-chunk // tile) * tile


@dataclasses.dataclass
class Workspace:
    """Device memory of one call (allocated with the caller's ``empty(shape, dtype)``)."""

    status: object  # int64 (B + 1, 4)
    stats: object  # float64 (B * nchunks * STATS,)
    counters: object  # uint32 (4 * B,): per pass, chunk_stats blocks done and screened keys of each row
    row_plan: object  # float64 (2 * B,): per pass, each row's plan (chunk_stats -> chunk_topn, finish_rows)
    screen_keys: object  # float64 (B * capacity,): the screened rows' kept keys
    screen_idx: object  # int64 (B * capacity,): and their positions
    row_bound: object  # uint64 (B + 1,): the rows' shared bounds, then finish_rows' count of blocks done
    rowmax: object  # uint64 (B,), logits only
    cand_keys: object  # float64 (B * nchunks * n,), without replacement
    cand_idx: object  # int64
    cand_count: object  # int32 (B * nchunks,)
    keys: object  # float64 (B, N), only where n is too large for the selection


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a call launches: block size, chunking, and whether all keys are sorted instead of selected."""

    threads: int
    chunk: int
    nchunks: int
    sort: bool
    capacity: int = 0
    """Slots of a row's screening buffer (:func:`screen_capacity`; 0: no row is screened)."""


def plan(rows: int, size: int, n: int, replace: bool, threads: int, multiprocessors: int, chunk: int | None = None) -> Plan:
    """The launch plan of a call (pure: tests build it for the host build of the kernels)."""
    if threads not in SELECT_THREADS:
        raise ValueError(f"threads must be one of {SELECT_THREADS} (the block size of the selecting kernels), "
                         f"got {threads}")
    sort = not replace and n > MAX_SELECTION_N
    tile = PER_THREAD * threads  # a chunk starts on a tile: a thread's 4 positions share one Philox block
    if chunk is None:
        chunk = chunk_size(rows, size, threads, multiprocessors)
        if replace:  # a draw's block scans from its chunk's start: short chunks, short scans
            chunk = min(chunk, REPLACE_TILES * tile)
    chunk = -(-chunk // tile) * tile
    # 32-bit positions within a chunk and candidate slots (nchunks * n) within a row
    chunk = min(chunk, MAX_SLOTS - tile)
    if -(-size // chunk) * n >= MAX_SLOTS:
        chunk = -(-(-(-size // (MAX_SLOTS // n - 1))) // tile) * tile
    capacity = 0 if replace or sort else screen_capacity(n, size, threads)
    return Plan(threads=threads, chunk=chunk, nchunks=-(-size // chunk), sort=sort, capacity=capacity)


def workspace(empty, rows: int, size: int, n: int, p: Plan, replace: bool, logits: bool, status_empty=None) -> Workspace:
    """The call's device memory from ``empty(shape, dtype)`` (the status from ``status_empty`` when given)."""
    items = rows * p.nchunks
    select = not replace
    planned = select and not p.sort
    return Workspace(
        status=(status_empty or empty)((rows + 1, 4), np.int64),
        stats=empty((items * STATS,), np.float64),
        counters=empty((4 * rows,), np.uint32) if planned else None,
        row_plan=empty((2 * rows,), np.float64) if planned else None,
        screen_keys=empty((rows * p.capacity,), np.float64) if p.capacity else None,
        screen_idx=empty((rows * p.capacity,), np.int64) if p.capacity else None,
        row_bound=empty((rows + 1,), np.uint64),
        rowmax=empty((rows,), np.uint64) if logits else None,
        cand_keys=empty((items * n,), np.float64) if select else None,
        cand_idx=empty((items * n,), np.int64) if select else None,
        cand_count=empty((items,), np.int32) if select else None,
        keys=empty((rows, size), np.float64) if select and p.sort else None,
    )


def _ptr(array):
    return NULL if array is None else array


SORT_STEP = "sort"
"""A step of :func:`launches` that is not a kernel: sort every key of the row (:func:`sort_keys`)."""


def launches(weights, n: int, grid, seed: int, replace: bool, logits: bool, ws: Workspace, p: Plan, indices, probs,
             seed_ptr=None) -> list:
    """The kernel launches of one call, in order: ``(kernel name, grid, block, args)`` tuples (and
    :data:`SORT_STEP` where all keys are sorted). ``seed_ptr`` (a device uint64 array) overrides ``seed``."""
    rows, size = weights.shape
    suffix = _suffix(weights.dtype)
    double = weights.dtype == np.float64 or logits
    t, nchunks, chunk = p.threads, p.nchunks, p.chunk
    dims = len(grid)
    g = [int(s) for s in grid] + [1] * (3 - dims)
    geometry = (np.int32(dims), np.int64(g[0]), np.int64(g[1]), np.int64(g[2]))
    seed_args = (np.uint64(seed), _ptr(seed_ptr), np.int32(logits), _ptr(ws.rowmax))
    items = rows * nchunks
    steps = [("prepare", (-(-(rows + 1) // t),), (t,),
              (np.int64(rows), ws.row_bound, _ptr(ws.rowmax), _ptr(ws.counters)))]
    if logits:
        steps.append((f"row_max_{suffix}", (items,), (t,), (weights, np.int64(size), np.int32(nchunks), np.int64(chunk), ws.rowmax)))

    capacity = np.int32(p.capacity)
    single = np.int32(probs.dtype == np.float32)  # probs written in float32 (else float64)
    screen_args = (capacity, _ptr(ws.row_plan), _ptr(ws.counters), _ptr(ws.screen_keys), _ptr(ws.screen_idx))

    def chunk_pass(pass_):
        return (f"chunk_topn_{suffix}", (items,), (t,),
                (weights, np.int64(size), np.int32(nchunks), np.int64(chunk), np.int32(n), *seed_args, np.int32(pass_),
                 ws.status, ws.row_bound, _ptr(ws.cand_keys), _ptr(ws.cand_idx), _ptr(ws.cand_count), *screen_args))

    def stats_pass(pass_, planned=0):
        return (f"chunk_stats_{suffix}", (items,), (t,),
                (weights, np.int64(size), np.int32(nchunks), np.int64(chunk), np.int32(logits), _ptr(ws.rowmax),
                 np.int32(pass_), ws.status, ws.stats, np.int32(n), np.int32(planned), capacity, _ptr(ws.counters),
                 _ptr(ws.row_plan)))

    def finish(pass_, select, presorted=0):
        return (f"finish_rows_{suffix}", (rows,), (t,),
                (weights, np.int64(size), np.int32(nchunks), np.int32(n), np.int32(logits), _ptr(ws.rowmax),
                 np.int32(pass_), _ptr(ws.cand_keys), _ptr(ws.cand_idx), _ptr(ws.cand_count), ws.stats, ws.status,
                 ws.row_bound, *geometry, indices, probs, single, np.int32(select), np.int32(presorted), np.uint64(seed),
                 _ptr(seed_ptr), *screen_args))

    if replace:
        steps += [stats_pass(0), finish(0, 0)]
        if double:
            steps.append(stats_pass(1))
        steps.append((f"replacement_draws_{suffix}", (rows * n,), (t,),
                      (weights, np.int64(size), np.int32(nchunks), np.int64(chunk), np.int32(n), np.int64(rows),
                       *seed_args, ws.status, ws.stats, *geometry, indices, probs, single)))
    elif p.sort:
        steps += [stats_pass(0), finish(0, 0)]
        if double:
            steps.append(stats_pass(1))
        total = rows * size
        steps.append((f"exponential_keys_{suffix}", (min(-(-total // t), 1 << 20),), (t,),
                      (weights, np.int64(size), np.int64(total), *seed_args, ws.status, ws.keys)))
        steps += [SORT_STEP, finish(0, 1, presorted=1)]
    else:
        steps += [stats_pass(0, 1), chunk_pass(0), finish(0, 1)]
        if double:
            steps += [stats_pass(1, 1), chunk_pass(1), finish(1, 1)]
    return steps


def sort_keys(xp, ws: Workspace, n: int):
    """:data:`SORT_STEP`: each row's ``n`` smallest keys (NaN, the non-positive weights, last; ties by position)
    as one presorted candidate list per row."""
    rows = ws.keys.shape[0]
    order = xp.argsort(ws.keys, axis=1, kind="stable")[:, :n] if xp is np else xp.argsort(ws.keys, axis=1)[:, :n]
    keys = xp.take_along_axis(ws.keys, order, axis=1)
    ws.cand_idx[: rows * n] = order.reshape(-1)
    ws.cand_keys[: rows * n] = keys.reshape(-1)
    ws.cand_count[:rows] = (~xp.isnan(keys)).sum(axis=1).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_id: int) -> int:
    return int(cupy().cuda.Device(device_id).attributes["MultiProcessorCount"])


@functools.lru_cache(maxsize=None)
def _kernel(name: str, options: tuple[str, ...], device_id: int):
    """A compiled kernel of :data:`SOURCE` on device ``device_id`` (the current one when called), memoized: a call
    launches several, and looking each up costs host time."""
    return _module.function(SOURCE, name, options)


ALIGNMENT = 256


@functools.lru_cache(maxsize=None)
def _itemsize(dtype) -> int:
    return np.dtype(dtype).itemsize  # np.dtype() and np.prod cost microseconds: a dozen arrays a call


def _one_allocation(build):
    """``build(empty, scratch)`` with every array carved from one allocation of the current allocator (256-byte
    aligned): one allocator call per ``sample`` instead of one per array (through torch's allocator each costs
    ~10 µs). ``empty(shape, dtype)`` gives a CuPy array; ``scratch(shape, dtype)`` only the device address (a
    uint64 kernel argument: building a CuPy array costs host time, and the kernels' scratch is never read here).
    Returns ``build``'s result and the allocation, which must outlive the launches."""
    cp = cupy()
    sizes = []

    def measure(shape, dtype):
        sizes.append(-(-math.prod(shape) * _itemsize(dtype) // ALIGNMENT) * ALIGNMENT)

    build(measure, measure)
    memory = cp.cuda.alloc(max(sum(sizes), 1))
    base = memory.ptr
    offsets = iter(np.cumsum([0] + sizes[:-1]).tolist())

    def carve(shape, dtype):
        return cp.ndarray(shape, dtype, memptr=memory + next(offsets))

    def address(shape, dtype):
        return np.uint64(base + next(offsets))

    return build(carve, address), memory


def sample(weights, n, grid, seed, replace, *, logits=False, seed_ptr=None, threads=None, chunk=None):
    """The GPU sampling backend (see ``atskern.sampling``); ``logits=True`` takes log-weights as they are.

    Returns int32 ``indices`` ``(B, n, D)``, ``probs`` ``(B, n)`` in the weights' dtype (computed in float64 and
    rounded as NumPy's cast rounds) and the int64 ``status``
    ``(B + 1, 4)``, all CuPy arrays on the current stream; nothing is read back. Every temporary comes from
    CuPy's current allocator (``cupy.cuda.using_allocator`` routes them elsewhere, e.g. to torch's).
    """
    cp = cupy()
    rows, size = weights.shape
    threads = _module.THREADS_PER_BLOCK if threads is None else threads
    device_id = cp.cuda.Device().id
    sms = _multiprocessors(device_id)
    p = plan(rows, size, n, replace, threads, sms, chunk)

    def build(empty, scratch):  # the status is returned; the sort step reads its workspace as arrays
        ws = workspace(empty if p.sort else scratch, rows, size, n, p, replace, logits, status_empty=empty)
        return ws, empty((rows, n, len(grid)), np.int32), empty((rows, n), weights.dtype)

    (ws, indices, probs), memory = _one_allocation(build)
    options = compile_options(p.threads)
    for step in launches(weights, n, grid, seed, replace, logits, ws, p, indices, probs, seed_ptr):
        if step == SORT_STEP:
            sort_keys(cp, ws, n)
            continue
        name, grid_dims, block, args = step
        _kernel(name, options, device_id)(grid_dims, block, args)
    return indices, probs, ws.status
