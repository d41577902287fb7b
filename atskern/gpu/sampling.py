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
import threading

import numpy as np

from .._backend import cupy
from . import _launch, _mapped, _module, _sequence

SOURCE = "sampling.cu"
MAX_SELECTION_N = 2048  # ATS_MAX_N in sampling.cu: larger n sorts every key of the row (cp.argsort)
PER_THREAD = 4  # ATS_PER_THREAD in sampling.cu
STATS = 6  # ATS_STATS in sampling.cu
COUNTER_KINDS = 3  # ATS_COUNTER_KINDS in sampling.cu: counters per row and pass
RANK_MAX = 1024  # ATS_RANK_MAX in sampling.cu: a screened row of more kept keys is sorted rather than ranked
SELECT_THREADS = (32, 64, 128, 256)
"""Block sizes the selecting kernels compile for (ATS_SELECT_THREADS: CUB's block primitives take it at compile
time; the selection buffer of MAX_SELECTION_N + PER_THREAD * threads entries must fit 48 KiB)."""
MIN_BLOCKS = 2
"""ATS_MIN_BLOCKS: selecting blocks an SM must hold at once (their register cap); a tuning knob, draws unchanged."""
SCREEN_UNROLL = 4
"""ATS_SCREEN_UNROLL: tiles of float32 loads a thread of the statistics and screening passes issues before using
them (and generator chains it interleaves; float64: half as many tiles, the same bytes); a tuning knob, draws
unchanged."""
MIN_CHUNK = 1 << 12
"""Fewest positions of a chunk (4 tiles of 256 threads): a small map still spreads over many short blocks (the
latency of a block is about one tile per 1024 positions, serialized), and finish_rows merges only the prefix of
each chunk's list under the row's bound, so many chunks cost the merge little."""
MAX_SLOTS = 1 << 31  # positions in a chunk and candidate slots of a row: the kernels hold them in 32 bits
MAX_CHUNK = MAX_SLOTS - (1 << 16)
"""Most positions of a chunk: the streaming loops step through a chunk in 32-bit offsets, up to 2^16 past its end
(a tile of 512 threads times 8 unrolled tiles, the largest knob values), short of 2^31."""
BLOCKS_PER_SM = 2
"""Target chunks per multiprocessor: one wave of selecting blocks (``MIN_BLOCKS`` of them fit an SM at once; on
the H200, 2 beat 4 for 1 x 4096²)."""
REPLACE_TILES = 8
"""With replacement, most tiles of a chunk: a draw's block finds its chunk from the chunk sums, then scans the
positions from the chunk's start a tile a step."""
FUSED = True
"""``atskern.sampling``: this backend takes logits as they are and applies the scale-free rescaling itself."""
FUSED_FINISH = False
"""Plans' ``fused``: each row finished by its last ``select_rows`` block instead of a ``finish_rows`` launch after
``chunk_topn`` (one launch and one kernel boundary fewer per call; the same draws). Off: on an H100
(``bench.gpu_tuning --only finish``, 2026-11-26) the fused plan's wall time was 0.82x to 1.13x the two-launch plan's
over seven shapes, no better, and its one-row ``select_rows`` (71.8 us GPU on 1 x 4096², n=10) cost more than
``chunk_topn`` and ``finish_rows`` apart (49.4 + 18.9): the row's last block finishes it while the others are
done, so the launch saved buys nothing on the device."""
WHOLE_ROWS = 1 << 14
"""Most positions of a row that one block samples alone (``sample_rows``, a plan's ``whole_rows``) whatever the
row count: without replacement and with ``n`` up to :data:`MAX_SELECTION_N`, such a call is one launch of a block
per row -- statistics, status, the float64 rescaling, selection and finish, with no kernel boundary and no zeroed
memory for one row -- instead of a memset and three launches (``chunk_stats``, ``chunk_topn``, ``finish_rows``)
whose blocks meet through device memory. The same draws. 0: never (:data:`WHOLE_ROWS_FILLED` included).

One block streams a row slower than many SMs do: on the H200 (``bench.gpu_tuning --only whole``, 2026-11-27,
``bench/results/gpu-nvidia-h200-whole-rows.md``) every case up to 128² was 1.15-1.50x faster whole in wall time
(float32 and float64, 1 to 1024 rows), 181² was 0.94-1.23x, and 256² and more with few rows 0.47-1.11x; see
:data:`WHOLE_ROWS_FILLED` for many rows. By default only where ``n`` leaves a row a screening buffer
(:func:`screen_capacity`: n up to 1273 with 256 threads), which the table's n = 10 and 100 use: there both
plans rank or sort the same buffer and differ in the streaming and the launches; a larger ``n`` would select a
whole row in one block against the chunks' blocks in parallel, not measured (:data:`WHOLE_ROWS_UNSCREENED`)."""
WHOLE_ROWS_FILLED = 1 << 17
"""Most positions of a row that one block samples alone in a call of at least one row per multiprocessor: then
the blocks fill the GPU and one launch beats the chunked plan's three further up. On the H200 (132 SMs; the same
table) every case of 132 to 528 rows up to 362² was 1.00-1.30x faster whole (float32 and float64); 512² was
0.97-1.18x, left to the chunked plan."""
ROW_CLUSTER = 0
"""Blocks of a thread block cluster that sample each row of a whole-row plan together (``sample_cluster_rows``;
Hopper and later, compute capability 9.0): the statistics and the screening split over the cluster's SMs, which
meet at the cluster's barrier; then one block ranks and finishes the row, in the same single launch. One block a
row is latency-bound on a single row (eight warps on one SM: ``bench/results/gpu-nvidia-h200-whole-rows.md``).
2 to 8 (the portable cluster sizes); 0: one block a row (``sample_rows``). The same draws. Off: it has not run
on a GPU (``bench.gpu_tuning --only cluster`` measures it)."""
MAX_ROW_CLUSTER = 8  # the largest portable cluster size
MAX_GRID_BLOCKS = 2**31 - 1  # CUDA's largest gridDim.x
WHOLE_ROWS_UNSCREENED = False
"""Also send to ``sample_rows`` the rows that ``n`` leaves no screening buffer (each then selected by its block
alone): not measured, off; the tests turn it on to run every row of a call through ``sample_rows``."""
MAPPED_STATUS = False
"""``sample(host_status=True)`` (a validated call of ``atskern.sample``) on a recorded call (:func:`maps_status`):
the block that writes the status's summary row also copies the whole status into this thread's page-locked,
device-mapped host buffer (``atskern.gpu._mapped``; the kernels never read host memory), and :func:`read_status`
waits for the stream and reads it, with no device-to-host copy queued behind the kernels (on an H100 the validated
call took 17 to 23 us more than ``validate=False``: ``bench.gpu_tuning --only where``). Off: on an H200
(``bench.gpu_tuning --only status``, 2026-11-26, ``bench/results/gpu-nvidia-h200-30bbccd.md``) the mapped status was
0.96x to 1.01x the copied one's wall time over seven shapes, no faster: the copy is not where that time goes."""


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


def stats_threads(threads: int) -> int:
    """Block size of ``chunk_stats`` (ATS_STATS_THREADS): twice the selecting blocks', at most 512 -- the
    statistics pass streams the map with no shared buffer, and more threads an SM keep more loads in flight."""
    return min(2 * threads, 512)


def compile_options(threads: int, row_cluster: int = 0) -> tuple[str, ...]:
    """The nvcc/NVRTC options of the module whose selecting kernels run ``threads``-thread blocks (and, for
    ``sample_cluster_rows``, clusters of ``row_cluster`` blocks)."""
    options = _options(threads, MIN_BLOCKS, SCREEN_UNROLL)
    return options + (f"-DATS_ROW_CLUSTER={row_cluster}",) if row_cluster else options


@functools.lru_cache(maxsize=None)
def _options(threads: int, min_blocks: int, unroll: int) -> tuple[str, ...]:
    return (f"-DATS_SELECT_THREADS={threads}", f"-DATS_MIN_BLOCKS={min_blocks}", f"-DATS_SCREEN_UNROLL={unroll}")


def chunk_size(rows: int, size: int, threads: int, multiprocessors: int) -> int:
    """Positions per block: at most ``BLOCKS_PER_SM`` blocks per multiprocessor over the call (one wave: a row
    cut into one piece more would leave a second wave of a few blocks, each as long as the first -- 288 blocks for
    32 rows of 1024² on the H100's 264 slots took 2.7x the time per cell of 261), at least ``MIN_CHUNK`` positions
    each, a whole number of tiles.

    The draws do not depend on it: each block keeps its exact n smallest keys.
    """
    target_blocks = BLOCKS_PER_SM * multiprocessors
    pieces = max(1, target_blocks // rows)
    tile = PER_THREAD * threads
    chunk = max(MIN_CHUNK, -(-size // pieces))
    return -(-chunk // tile) * tile


@dataclasses.dataclass
class Workspace:
    """Device memory of one call (allocated with the caller's ``empty(shape, dtype)``)."""

    counters: object  # uint32 (6 * B,): per pass, chunk_stats blocks done, screened keys and select_rows blocks
    #                   done of each row
    row_bound: object  # uint64 (B + 1,): the rows' shared bounds (complemented bits, 0: none), then the count of
    #                    finish_rows blocks done
    rowmax: object  # uint64 (B,), logits only
    status: object  # int64 (B + 1, 4)
    stats: object  # float64 (B * nchunks * STATS,)
    row_plan: object  # float64 (2 * B,): per pass, each row's plan (chunk_stats -> chunk_topn, finish_rows)
    screen_keys: object  # float64 (B * capacity,): the screened rows' kept keys
    screen_idx: object  # int64 (B * capacity,): and their positions
    cand_keys: object  # float64 (B * nchunks * n,), without replacement
    cand_idx: object  # int64
    cand_count: object  # int32 (B * nchunks,)
    keys: object  # float64 (B, N), only where n is too large for the selection
    cluster_stats: object  # float64 (B * C * (2 STATS + 1),): a row cluster's partial statistics (two passes) and
    #                        logit maxima, block by block (sample_cluster_rows)
    cluster_counts: object  # uint32 (B,): each row cluster's screened count (zeroed by the kernel)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a call launches: block size, chunking, and whether all keys are sorted instead of selected."""

    threads: int
    chunk: int
    nchunks: int
    sort: bool
    capacity: int = 0
    """Slots of a row's screening buffer (:func:`screen_capacity`; 0: no row is screened)."""
    fused: bool = False
    """Rows finished inside the selecting launch (``select_rows``; :data:`FUSED_FINISH`)."""
    whole_rows: bool = False
    """Each row sampled by one block in one launch (``sample_rows``; :data:`WHOLE_ROWS`)."""
    row_cluster: int = 0
    """With ``whole_rows``: each row sampled by a cluster of this many blocks (``sample_cluster_rows``, ``chunk``
    positions a block; :data:`ROW_CLUSTER`), 0: by one block."""


def plan(rows: int, size: int, n: int, replace: bool, threads: int, multiprocessors: int, chunk: int | None = None,
         fused: bool | None = None, whole_rows: bool | None = None, row_cluster: int | None = None) -> Plan:
    """The launch plan of a call (pure: tests build it for the host build of the kernels); ``fused`` defaults to
    :data:`FUSED_FINISH` (it applies without replacement where keys are selected, not sorted), ``whole_rows`` to
    rows of at most :data:`WHOLE_ROWS` positions, or :data:`WHOLE_ROWS_FILLED` with at least one row per
    multiprocessor, where ``n`` leaves the rows a screening buffer (:func:`screen_capacity`) unless
    :data:`WHOLE_ROWS_UNSCREENED` (it applies where keys are selected, not sorted, to rows short of
    2^31 positions; it takes precedence over ``fused`` and ``chunk``); a whole-row plan's ``row_cluster`` defaults
    to :data:`ROW_CLUSTER`."""
    if threads not in SELECT_THREADS:
        raise ValueError(f"threads must be one of {SELECT_THREADS} (the block size of the selecting kernels), "
                         f"got {threads}")
    if replace and rows * n > MAX_GRID_BLOCKS:
        raise ValueError(f"n={n} draws with replacement from each of {rows} rows make {rows * n} draws, more than one "
                         f"GPU launch takes (a block a draw, at most 2**31 - 1): draw from fewer rows per call")
    sort = not replace and n > MAX_SELECTION_N
    tile = PER_THREAD * threads  # a chunk starts on a tile: a thread's 4 positions share one Philox block
    if whole_rows is None:
        screened = WHOLE_ROWS_UNSCREENED or screen_capacity(n, size, threads) > 0
        whole_rows = WHOLE_ROWS > 0 and screened and (
            size <= WHOLE_ROWS or (rows >= multiprocessors and size <= WHOLE_ROWS_FILLED))
    whole = bool(whole_rows) and not (replace or sort)
    if whole and size < MAX_CHUNK:  # one chunk, the row: screened or selected in 32-bit positions
        cluster = ROW_CLUSTER if row_cluster is None else int(row_cluster)
        if cluster > 1:  # a whole number of tiles a block
            if cluster > MAX_ROW_CLUSTER:
                raise ValueError(f"row_cluster must be at most {MAX_ROW_CLUSTER} (a portable cluster), got {cluster}")
            per_block = -(-size // cluster)
            span = max(tile, -(-per_block // tile) * tile)
            return Plan(threads=threads, chunk=span, nchunks=cluster, sort=False,
                        capacity=screen_capacity(n, size, threads), whole_rows=True, row_cluster=cluster)
        return Plan(threads=threads, chunk=max(tile, -(-size // tile) * tile), nchunks=1, sort=False,
                    capacity=screen_capacity(n, size, threads), whole_rows=True)
    if chunk is None:
        chunk = chunk_size(rows, size, threads, multiprocessors)
        if replace:  # a draw's block scans from its chunk's start: short chunks, short scans
            chunk = min(chunk, REPLACE_TILES * tile)
    chunk = -(-chunk // tile) * tile
    # 32-bit positions within a chunk and candidate slots (nchunks * n) within a row
    chunk = min(chunk, MAX_CHUNK)
    if -(-size // chunk) * n >= MAX_SLOTS:
        chunk = -(-(-(-size // (MAX_SLOTS // n - 1))) // tile) * tile
    capacity = 0 if replace or sort else screen_capacity(n, size, threads)
    fused = (FUSED_FINISH if fused is None else bool(fused)) and not (replace or sort)
    return Plan(threads=threads, chunk=chunk, nchunks=-(-size // chunk), sort=sort, capacity=capacity, fused=fused)


def workspace_specs(rows: int, size: int, n: int, p: Plan, replace: bool, logits: bool) -> dict:
    """The call's device arrays (the :class:`Workspace` fields) as ``{field: (shape, dtype) or None}``."""
    items = rows * p.nchunks
    select = not replace and not p.whole_rows  # candidate lists: chunk_topn's (sample_rows keeps its own)
    planned = select and not p.sort
    chunked = not p.whole_rows  # a launch per pass, meeting through statistics and counters in device memory
    return {  # the ZEROED fields first and together: one memset
        "counters": ((COUNTER_KINDS * 2 * rows,), np.uint32) if planned else None,
        "row_bound": ((rows + 1,), np.uint64),
        "rowmax": ((rows,), np.uint64) if logits and chunked else None,
        "status": ((rows + 1, 4), np.int64),
        "stats": ((items * STATS,), np.float64) if chunked else None,
        "row_plan": ((2 * rows,), np.float64) if planned else None,
        "screen_keys": ((rows * p.capacity,), np.float64) if p.capacity else None,
        "screen_idx": ((rows * p.capacity,), np.int64) if p.capacity else None,
        "cand_keys": ((items * n,), np.float64) if select else None,
        "cand_idx": ((items * n,), np.int64) if select else None,
        "cand_count": ((items,), np.int32) if select else None,
        "keys": ((rows, size), np.float64) if select and p.sort else None,
        "cluster_stats": ((rows * p.row_cluster * (2 * STATS + 1),), np.float64) if p.row_cluster else None,
        "cluster_counts": ((rows,), np.uint32) if p.row_cluster else None,
    }


def workspace(empty, rows: int, size: int, n: int, p: Plan, replace: bool, logits: bool) -> Workspace:
    """The call's device memory from ``empty(shape, dtype)`` (the host build's; the CuPy path uses :func:`layout`
    and :func:`allocate`)."""
    specs = workspace_specs(rows, size, n, p, replace, logits)
    return Workspace(**{name: None if spec is None else empty(*spec) for name, spec in specs.items()})


def _ptr(array):
    return 0 if array is None else array


SORT_STEP = "sort"
"""A step of :func:`launches` that is not a kernel: sort every key of the row (:func:`sort_keys`)."""
ZERO_STEP = "zero"
"""The first step of :func:`launches`, not a kernel: zero the :data:`ZEROED` fields of the workspace (one
``memsetAsync`` over them on the device: they lie together, first in the allocation)."""
ZEROED = ("counters", "row_bound", "rowmax")


def zero_workspace(ws: Workspace):
    """:data:`ZERO_STEP` on a workspace of arrays (the host build's)."""
    for name in ZEROED:
        array = getattr(ws, name)
        if array is not None:
            array[...] = 0


def launches(weights, n: int, grid, seed: int, replace: bool, logits: bool, ws: Workspace, p: Plan, indices, probs,
             seed_ptr=None, status_host=None) -> list:
    """The steps of one call, in order: :data:`ZERO_STEP` first (but for one row sampled by one block: nothing
    to zero), then ``(kernel name, grid, block, args)`` tuples (and :data:`SORT_STEP` where all keys are sorted).
    ``seed_ptr`` (a device uint64 array) overrides ``seed``; ``status_host`` (mapped host memory,
    :data:`MAPPED_STATUS`) receives a copy of the final status.

    The arguments are the arrays (or device addresses) and plain Python integers, in the kernels' parameter order;
    ``atskern.gpu._launch`` packs them, the host harness types them from the kernels' parameter lists."""
    rows, size = weights.shape
    suffix = _suffix(weights.dtype)
    double = weights.dtype == np.float64 or logits
    t, nchunks, chunk = p.threads, p.nchunks, p.chunk
    n, logits = int(n), int(bool(logits))
    seed = seed if isinstance(seed, _sequence.Slot) else int(seed)
    dims = len(grid)
    g = [int(s) for s in grid] + [1] * (3 - dims)
    geometry = (dims, g[0], g[1], g[2])
    seed_args = (seed, _ptr(seed_ptr), logits, _ptr(ws.rowmax))
    items = rows * nchunks
    single = int(probs.dtype == np.float32)  # probs written in float32 (else float64)
    if p.whole_rows and p.row_cluster:  # as sample_rows, a cluster of blocks a row
        return ([ZERO_STEP] if rows > 1 else []) + [
            (f"sample_cluster_rows_{suffix}", (rows * p.row_cluster,), (t,),
             (weights, size, n, seed, _ptr(seed_ptr), logits, ws.status, ws.row_bound, p.capacity,
              _ptr(ws.screen_keys), _ptr(ws.screen_idx), ws.cluster_stats, ws.cluster_counts, chunk, *geometry,
              indices, probs, single, _ptr(status_host)))]
    if p.whole_rows:  # row_bound[rows] elects the block that writes the summary row: one row elects itself
        return ([ZERO_STEP] if rows > 1 else []) + [
            (f"sample_rows_{suffix}", (rows,), (t,),
             (weights, size, n, seed, _ptr(seed_ptr), logits, ws.status, ws.row_bound, p.capacity,
              _ptr(ws.screen_keys), _ptr(ws.screen_idx), *geometry, indices, probs, single, _ptr(status_host)))]
    steps = [ZERO_STEP]
    if logits:
        steps.append((f"row_max_{suffix}", (items,), (t,), (weights, size, nchunks, chunk, ws.rowmax)))

    capacity = p.capacity
    screen_args = (capacity, _ptr(ws.row_plan), _ptr(ws.counters), _ptr(ws.screen_keys), _ptr(ws.screen_idx))

    def chunk_pass(pass_):
        return (f"chunk_topn_{suffix}", (items,), (t,),
                (weights, size, nchunks, chunk, n, *seed_args, pass_, ws.status, ws.row_bound, _ptr(ws.cand_keys),
                 _ptr(ws.cand_idx), _ptr(ws.cand_count), *screen_args))

    def stats_pass(pass_, planned=0):
        return (f"chunk_stats_{suffix}", (items,), (stats_threads(t),),
                (weights, size, nchunks, chunk, logits, _ptr(ws.rowmax), pass_, ws.status, ws.stats, n, planned,
                 capacity, _ptr(ws.counters), _ptr(ws.row_plan)))

    def select_rows(pass_):
        return (f"select_rows_{suffix}", (items,), (t,),
                (weights, size, nchunks, chunk, n, *seed_args, pass_, ws.status, ws.row_bound, _ptr(ws.cand_keys),
                 _ptr(ws.cand_idx), _ptr(ws.cand_count), *screen_args, ws.stats, *geometry, indices, probs, single,
                 _ptr(status_host)))

    def finish(pass_, select, presorted=0):
        return (f"finish_rows_{suffix}", (rows,), (t,),
                (weights, size, nchunks, n, logits, _ptr(ws.rowmax), pass_, _ptr(ws.cand_keys), _ptr(ws.cand_idx),
                 _ptr(ws.cand_count), ws.stats, ws.status, ws.row_bound, *geometry, indices, probs, single, select,
                 presorted, seed, _ptr(seed_ptr), *screen_args, _ptr(status_host)))

    if replace:
        steps += [stats_pass(0), finish(0, 0)]
        if double:
            steps.append(stats_pass(1))
        steps.append((f"replacement_draws_{suffix}", (rows * n,), (t,),
                      (weights, size, nchunks, chunk, n, rows, *seed_args, ws.status, ws.stats, *geometry, indices,
                       probs, single)))
    elif p.sort:
        steps += [stats_pass(0), finish(0, 0)]
        if double:
            steps.append(stats_pass(1))
        total = rows * size
        steps.append((f"exponential_keys_{suffix}", (min(-(-total // t), 1 << 20),), (t,),
                      (weights, size, total, *seed_args, ws.status, ws.keys)))
        steps += [SORT_STEP, finish(0, 1, presorted=1)]
    else:
        for pass_ in (0, 1) if double else (0,):
            steps.append(stats_pass(pass_, 1))
            steps += [select_rows(pass_)] if p.fused else [chunk_pass(pass_), finish(pass_, 1)]
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
def _clusters(device_id: int) -> bool:
    """Whether the device launches thread block clusters (compute capability 9.0 or more)."""
    return int(cupy().cuda.Device(device_id).compute_capability) >= 90


KERNEL_GROUPS = {("f32", "chunks"): 1, ("f64", "chunks"): 2, ("f32", "select_rows"): 3, ("f64", "select_rows"): 4,
                 ("f32", "sample_rows"): 5, ("f64", "sample_rows"): 6, ("f32", "sample_cluster_rows"): 7,
                 ("f64", "sample_cluster_rows"): 8}
"""``ATS_GROUP`` of sampling.cu per (dtype suffix, kind): which module variant defines a kernel (kind: ``select_rows``,
``sample_rows`` or ``sample_cluster_rows``, each a plan's only selecting kernel, else ``chunks``)."""


def kernel_group(name: str) -> int:
    """The ``ATS_GROUP`` whose module defines kernel ``name``: each dtype's kernels compile apart, and
    ``select_rows`` (the fused finish), ``sample_rows`` (a block per row) and ``sample_cluster_rows`` (a cluster per
    row) apart from the rest, so a call compiles what it launches and little more."""
    suffix = name.rsplit("_", 1)[-1]
    if suffix not in ("f32", "f64"):
        raise ValueError(f"not a kernel of {SOURCE}: {name!r}")
    kind = next((k for k in ("select_rows", "sample_rows", "sample_cluster_rows") if name.startswith(k + "_")),
                "chunks")
    return KERNEL_GROUPS[(suffix, kind)]


def function(name: str, options: tuple[str, ...]):
    """The compiled kernel ``name`` (a CuPy ``RawKernel``) of :data:`SOURCE` with ``options`` on the current device,
    from the module of its group (:func:`kernel_group`)."""
    return _module.function(SOURCE, name, options + (f"-DATS_GROUP={kernel_group(name)}",))


@functools.lru_cache(maxsize=None)
def _handle(name: str, options: tuple[str, ...], device_id: int) -> int:
    """The ``CUfunction`` of a compiled kernel of :data:`SOURCE` on device ``device_id`` (the current one when
    called), memoized: a call launches several, and looking each up costs host time."""
    return function(name, options).kernel.ptr


ALIGNMENT = 256


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a call's arrays lie in its one device allocation (byte offsets, each 256-byte aligned): the
    :class:`Workspace` fields, then ``indices`` and ``probs``."""

    total: int
    specs: dict  # name -> (shape, dtype), or None where the call has no such array
    offsets: dict  # name -> offset, for the arrays it has
    zeroed: int  # bytes from offset 0 that ZERO_STEP clears (the ZEROED fields)


@functools.lru_cache(maxsize=1024)
def layout(rows: int, size: int, n: int, p: Plan, replace: bool, logits: bool, dims: int, probs_dtype) -> Layout:
    """The :class:`Layout` of a call (memoized: per call only the allocation and the addresses are made)."""
    specs = workspace_specs(rows, size, n, p, replace, logits)
    specs["indices"] = ((rows, n, dims), np.dtype(np.int32))
    specs["probs"] = ((rows, n), np.dtype(probs_dtype))
    offsets, at, zeroed = {}, 0, 0
    for name, spec in specs.items():
        if spec is not None:
            offsets[name] = at
            at += -(-math.prod(spec[0]) * np.dtype(spec[1]).itemsize // ALIGNMENT) * ALIGNMENT
            if name in ZEROED:
                zeroed = at
    return Layout(total=max(at, ALIGNMENT), specs=specs, offsets=offsets, zeroed=zeroed)


def allocate(lay: Layout, arrays: bool):
    """One allocation of the current CuPy allocator for a call (one allocator call instead of a dozen: through
    torch's allocator each costs ~10 µs): ``(workspace, indices, probs, memory)``. The status, indices and probs are
    CuPy arrays; the other workspace fields are CuPy arrays with ``arrays`` (the sort step reads them), else their
    device addresses (kernel arguments as they are: building a CuPy array costs host time). ``memory`` must outlive
    the launches (the arrays hold it)."""
    cp = cupy()
    memory = cp.cuda.alloc(lay.total)
    base = memory.ptr

    def array(name):
        shape, dtype = lay.specs[name]
        return cp.ndarray(shape, dtype, memptr=memory + lay.offsets[name])

    fields = {}
    for name in _WORKSPACE_FIELDS:
        if lay.specs[name] is None:
            fields[name] = None
        elif arrays or name == "status":
            fields[name] = array(name)
        else:
            fields[name] = base + lay.offsets[name]
    return Workspace(**fields), array("indices"), array("probs"), memory


_WORKSPACE_FIELDS = tuple(field.name for field in dataclasses.fields(Workspace))


@dataclasses.dataclass(frozen=True)
class RecordedCall:
    """A call shape's plan, layout and packed launch sequence (None where the plan sorts every key: its sort step
    is not a kernel of this module)."""

    plan: Plan
    layout: Layout
    sequence: _sequence.LaunchSequence | None


@functools.lru_cache(maxsize=256)
def recorded_call(rows: int, size: int, n: int, grid: tuple, replace: bool, logits: bool, dtype, threads: int, chunk,
                  device_id: int, seed_on_device: bool, knobs: tuple, status_slot: bool = False) -> RecordedCall:
    """The :class:`RecordedCall` of a call shape on device ``device_id``: :func:`launches` with the allocation's
    offsets for the workspace, indices and probs, and slots for the weights, the seed, (``seed_on_device``) the
    seed's device address and (``status_slot``) the status's host copy's address, in that order; ``dtype`` is the
    weights' and the probabilities'. ``knobs`` (``BLOCKS_PER_SM``, ``MIN_BLOCKS``, ``SCREEN_UNROLL``,
    ``FUSED_FINISH``, the ``WHOLE_ROWS`` knobs and ``ROW_CLUSTER``: their values now) keys the memo, so that a tuning
    change takes effect."""
    p = plan(rows, size, n, replace, threads, _multiprocessors(device_id), chunk,
             row_cluster=None if ROW_CLUSTER < 2 or _clusters(device_id) else 0)
    lay = layout(rows, size, n, p, replace, logits, len(grid), dtype)
    if p.sort:
        return RecordedCall(p, lay, None)
    weights = _sequence.Slot("weights", (rows, size), np.dtype(dtype))
    seed, seed_ptr = _sequence.Slot("seed"), _sequence.Slot("seed_ptr") if seed_on_device else None
    ws = Workspace(**{name: None if lay.specs[name] is None else _sequence.Offset(lay.offsets[name])
                      for name in _WORKSPACE_FIELDS})
    status = _sequence.Slot("status_host") if status_slot else None
    indices = _sequence.Offset(lay.offsets["indices"])
    probs = _sequence.Offset(lay.offsets["probs"], lay.specs["probs"][1])
    options = compile_options(threads, p.row_cluster)
    steps = []
    for step in launches(weights, n, grid, seed, replace, logits, ws, p, indices, probs, seed_ptr, status):
        if step == ZERO_STEP:
            steps.append((_sequence.MEMSET, 0, lay.zeroed))
        else:
            name, grid_dims, block, args = step
            steps.append((_handle(name, options, device_id), grid_dims, block, args))
    slots = (weights, seed) + ((seed_ptr,) if seed_on_device else ()) + ((status,) if status_slot else ())
    return RecordedCall(p, lay, _sequence.LaunchSequence(steps, slots))


def maps_status(n: int, replace: bool) -> bool:
    """Whether a call copies its status into mapped host memory (:data:`MAPPED_STATUS`): every recorded call, that
    is every plan but the one that sorts all keys (its sort step is not a kernel). The status is final once the
    first pass's finish writes its summary row, on every path; the copy is made there."""
    return bool(replace) or int(n) <= MAX_SELECTION_N


def sample(weights, n, grid, seed, replace, *, logits=False, seed_ptr=None, threads=None, chunk=None,
           host_status=False):
    """The GPU sampling backend (see ``atskern.sampling``); ``logits=True`` takes log-weights as they are.

    Returns int32 ``indices`` ``(B, n, D)``, ``probs`` ``(B, n)`` in the weights' dtype (computed in float64 and
    rounded as NumPy's cast rounds) and the int64 ``status``
    ``(B + 1, 4)``, all CuPy arrays on the current stream; nothing is read back. Every temporary comes from
    CuPy's current allocator (``cupy.cuda.using_allocator`` routes them elsewhere, e.g. to torch's).

    The launches of a call shape are recorded once (:func:`recorded_call`) and replayed with the call's
    allocation, weights and seed (``atskern.gpu._sequence``).

    ``host_status=True`` (a caller that reads the status with :func:`read_status` before this thread's next call):
    with :data:`MAPPED_STATUS`, on a call :func:`maps_status` admits, the status returned is a NumPy array in this
    thread's mapped host buffer, a copy the kernels make; valid once :func:`read_status` has waited for the stream.
    """
    cp = cupy()
    rows, size = weights.shape
    threads = _module.THREADS_PER_BLOCK if threads is None else threads
    device_id = cp.cuda.runtime.getDevice()
    mapped = None
    if host_status and MAPPED_STATUS and maps_status(n, replace):
        mapped = _mapped.status_buffer((rows + 1, 4), device_id)
    call = recorded_call(rows, size, int(n), tuple(grid), bool(replace), bool(logits), weights.dtype, threads, chunk,
                         device_id, seed_ptr is not None,
                         (BLOCKS_PER_SM, MIN_BLOCKS, SCREEN_UNROLL, FUSED_FINISH, WHOLE_ROWS, WHOLE_ROWS_FILLED,
                          WHOLE_ROWS_UNSCREENED, ROW_CLUSTER),
                         mapped is not None)
    lay = call.layout
    if call.sequence is None:
        return sample_from_lists(weights, n, grid, seed, replace, logits, seed_ptr, call.plan, lay, device_id)
    memory = cp.cuda.alloc(lay.total)
    values = (weights, seed, seed_ptr) if seed_ptr is not None else (weights, seed)
    if mapped is not None:
        values += (mapped[1],)
    call.sequence.replay(memory.ptr, values, cp.cuda.get_current_stream().ptr)
    specs, offsets = lay.specs, lay.offsets
    status = mapped[0] if mapped is not None else cp.ndarray(*specs["status"], memptr=memory + offsets["status"])
    return (cp.ndarray(*specs["indices"], memptr=memory + offsets["indices"]),
            cp.ndarray(*specs["probs"], memptr=memory + offsets["probs"]), status)


def sample_from_lists(weights, n, grid, seed, replace, logits, seed_ptr, p: Plan, lay: Layout, device_id: int):
    """:func:`sample` from launch lists built and packed now (:func:`launches`, :func:`run_steps`): the path of plans
    that sort every key (their sort step reads CuPy arrays), and ``bench.host_path``'s baseline."""
    ws, indices, probs, memory = allocate(lay, arrays=p.sort)
    steps = launches(weights, n, grid, seed, replace, logits, ws, p, indices, probs, seed_ptr)
    run_steps(steps, ws, n, lay, memory, compile_options(p.threads, p.row_cluster), device_id)
    return indices, probs, ws.status


def run_steps(steps, ws: Workspace, n: int, lay: Layout, memory, options: tuple[str, ...], device_id: int,
              after_step=None):
    """Issue :func:`launches`' steps on CuPy's current stream: the memset over ``memory`` (from :func:`allocate`),
    the sort step, and the kernels compiled with ``options``; ``after_step()`` is called after each (the tuning
    probe records an event there)."""
    cp = cupy()
    stream = cp.cuda.get_current_stream().ptr
    for step in steps:
        if step == ZERO_STEP:
            cp.cuda.runtime.memsetAsync(memory.ptr, 0, lay.zeroed, stream)
        elif step == SORT_STEP:
            sort_keys(cp, ws, n)
        else:
            name, grid_dims, block, args = step
            _launch.launch(_handle(name, options, device_id), grid_dims, block, args, stream)
        if after_step is not None:
            after_step()


class _Pinned(threading.local):
    def __init__(self):
        self.memory, self.words, self.address = None, np.zeros(0, np.int64), 0


_pinned = _Pinned()


def read_status(status) -> np.ndarray:
    """The status on the host, after a wait for the current stream (the call's one host synchronization): a CuPy
    array through one copy into this thread's page-locked buffer on the stream (cheaper than ``status.get()``); a
    NumPy one (``sample(host_status=True)`` with :data:`MAPPED_STATUS`: written by the kernels into mapped host
    memory) as it is once the stream is done."""
    cp = cupy()
    if type(status) is np.ndarray:
        cp.cuda.get_current_stream().synchronize()
        return status.copy()
    size = status.size
    if _pinned.words.size < size:
        _pinned.memory = cp.cuda.alloc_pinned_memory(max(8 * size, 4096))
        _pinned.words = np.frombuffer(_pinned.memory, np.int64)
        _pinned.address = _pinned.words.ctypes.data
    stream = cp.cuda.get_current_stream()
    cp.cuda.runtime.memcpyAsync(_pinned.address, status.data.ptr, 8 * size, cp.cuda.runtime.memcpyDeviceToHost,
                                stream.ptr)
    stream.synchronize()
    return _pinned.words[:size].reshape(status.shape).copy()
