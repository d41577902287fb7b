"""Numba sampling kernels: validation fused into sampling, without and with replacement.

Inputs arrive flattened to ``(B, N)`` weights (see ``atskern.sampling``, which turns the
per-row status these kernels return into errors).

Without replacement each position gets the key ``-log(u) / a`` (exponential keys; the n
smallest in increasing order are a successive-sampling draw). Rows are cut into chunks
(:func:`chunk_size`), processed in parallel in one pass that also validates the weights (sums,
counts, largest entry), each chunk keeping its ``n`` smallest keys in a max-heap; the finish sorts
the row's candidates and keeps its ``n`` smallest (inside the parallel pass where a row is one
chunk). Ties are broken by position, so the result is the row's exact ``n`` smallest
``(key, position)`` pairs whatever the chunking or thread count. Inside a chunk a key
is computed only when the high word of its uniform cannot rule it out: ``-log(u) / a >= t``
whenever ``1 - u >= a t``. A row with fewer than ``n`` positive entries is padded with its
lowest zero-weight positions (rule R1 of DESIGN.md).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from .._validation import SCALE_FREE_EXPONENTS
from .._rng import STREAM_HI, STREAM_LO, STREAM_REPLACE, TWO_POW_M32
from ._jit import jit
from ._block_scan import F32_EDGE, F32_SLACK, ordered_sum, ordered_sum_flags, ordered_sum_squares
from .philox import block_words, pick_word, to_uniform

FUSED = False
"""The front end computes logits' weights and rescales rows for this backend (see ``atskern.sampling``)."""

MIN_CHUNK = 1 << 14
"""Fewest positions of a parallel work item (see :func:`chunk_size`)."""

BLOCK = 1 << 10
"""Positions whose high words are generated together (a vectorizable loop)."""

_REJECT_MARGIN = 1.0 + 1e-12
_TWO_POW_32 = 2.0**32

SEGMENT = 1 << 16
"""Positions at the head of an item whose statistics are taken before any of their keys, for the first bound
(512 KiB of float64 weights at most, in a core's cache for the second pass)."""

PIECE = 64
"""Positions per piece of the with-replacement prefix sum (see :func:`_replacement_row`)."""

_PIECE_SLACK = 1.0 + 2.0**-30  # far above the rounding of PIECE sequential float64 additions

SERIAL_WORK = 1 << 17
"""Up to this many positions in all (rows times positions per row) a call runs on the calling thread: waking
the thread pool costs more than it saves (and on a busy machine a parallel region waits for its slowest
thread). So does every call of one row with replacement, whatever its size: its threads would split rows.
The draws do not depend on it."""

GROUP_WORK = 1 << 12
"""Fewest positions of a parallel task (unless one work item is more): a task runs its items (many, for tiny rows)
one after another with one set of scratch arrays. Read at each call; the draws do not depend on it."""

_EXPONENT_LOW, _EXPONENT_HIGH = SCALE_FREE_EXPONENTS
_SCREEN_LOW = 2.0 ** (SCALE_FREE_EXPONENTS[0] - 1)
_SCREEN_HIGH = 2.0 ** SCALE_FREE_EXPONENTS[1]


@jit(inline="always")
def _greater(key_a, idx_a, key_b, idx_b):
    return key_a > key_b or (key_a == key_b and idx_a > idx_b)


@jit(inline="always")
def _sift_down(keys, idx, start, size):
    """Restore the max-heap property below ``start`` in ``keys[:size]``."""
    parent = start
    while True:
        child = 2 * parent + 1
        if child >= size:
            return
        if child + 1 < size and _greater(keys[child + 1], idx[child + 1], keys[child], idx[child]):
            child += 1
        if not _greater(keys[child], idx[child], keys[parent], idx[parent]):
            return
        keys[parent], keys[child] = keys[child], keys[parent]
        idx[parent], idx[child] = idx[child], idx[parent]
        parent = child


@jit(inline="always")
def _push(keys, idx, size, key, position):
    """Insert into the max-heap ``keys[:size]``; returns the new size."""
    child = size
    keys[child] = key
    idx[child] = position
    while child > 0:
        parent = (child - 1) // 2
        if not _greater(keys[child], idx[child], keys[parent], idx[parent]):
            break
        keys[parent], keys[child] = keys[child], keys[parent]
        idx[parent], idx[child] = idx[child], idx[parent]
        child = parent
    return size + 1


@jit(inline="always")
def _replace_top(keys, idx, size, key, position):
    keys[0] = key
    idx[0] = position
    _sift_down(keys, idx, 0, size)


@jit(inline="always")
def _fill_block(block_start, block_stop, row, k0, k1, hi_words):
    """HI words of a block's positions, in position order: ``hi_words[p - block_start]``."""
    first_q = block_start // 4
    for j in range((block_stop - block_start + 3) // 4):
        w0, w1, w2, w3 = block_words(np.uint64(first_q + j), row, STREAM_HI, k0, k1)
        hi_words[4 * j] = np.uint32(w0)
        hi_words[4 * j + 1] = np.uint32(w1)
        hi_words[4 * j + 2] = np.uint32(w2)
        hi_words[4 * j + 3] = np.uint32(w3)


@jit(inline="always")
def _headroom(hi):
    """``1 - (hi + 1) 2**-32``, an upper bound of ``1 - u`` for any uniform with this HI word."""
    return np.float64(np.uint32(0xFFFFFFFF) - hi) * TWO_POW_M32


@jit(inline="always")
def _negatives(values, positive):
    """The count of negative entries of ``values``, of which ``positive`` are positive: a second pass (in cache)
    only where some entry is not positive; elsewhere there are none."""
    negative = 0
    if positive < values.size:
        for i in range(values.size):
            negative += np.int64(np.float64(values[i]) < 0.0)
    return negative


@jit(inline="always")
def _flag64(hi, a, scaled):
    """Whether a float64 weight's key might be below ``t``: ``float(2**32 - 1 - hi) < a (t 2**32)`` with ``scaled``
    ``= t 2**32``, the exact test ``1 - u < a t`` scaled by 2**32 (see :func:`_flag_block`)."""
    return np.float64(np.uint32(0xFFFFFFFF) - hi) < a * scaled


@jit
def _block_stats(values):
    """A block's weights ``values`` (a 1-D slice): their float64 sum (:func:`ordered_sum`'s order, so it does not
    depend on the chunking, the thread count, the path or the compiled copy; a NaN or inf makes it non-finite),
    the counts of positive and negative entries, and the sum of squares (for :func:`_first_bound`). Negative
    entries are counted (a second pass, in cache) only in a block with a non-positive or NaN entry: elsewhere
    there are none."""
    total, positive, squares = ordered_sum_squares(values, 0, values.size)
    return total, positive, _negatives(values, positive), squares


@jit
def _scan_block(values, hi_words, bound, flags):
    """A block's float64 sum (:func:`_block_stats`'s, bit for bit), its counts of positive and negative entries,
    and :func:`_flag_block`'s flags (bit for bit), in one vectorized pass (negative entries counted again in
    cache, only in a block with a non-positive one)."""
    if values.itemsize == 4:
        total, positive = ordered_sum_flags(values, hi_words, np.float32(bound * _TWO_POW_32 * F32_SLACK), flags)
    else:
        total, positive = ordered_sum_flags(values, hi_words, bound * _TWO_POW_32, flags)
    return total, positive, _negatives(values, positive)


@jit
def _flag_block(values, hi_words, bound, flags):
    """Per position of a block whether its key might be below ``bound`` (``1 - u >= a t`` rules a key
    out): one vectorized loop.

    float32 weights take the test in float32 (twice the lanes): ``hi + a t 2**32 >= 2**32 - 2048`` with
    ``t`` enlarged by ``2**-20``, a superset of the float64 test (the float32 roundings of ``hi``, of the
    product and of the sum move it by less than 512, and the relative ones are inside the enlargement;
    an underflowing product leaves only ``hi`` near 2**32, where the float64 test can pass). float64 weights
    take ``float(2**32 - 1 - hi) < a (t 2**32)``, the exact test scaled by 2**32 (one product fewer per
    position; it differs only where ``a t`` is subnormal, and then passes more). The positions either flags
    are tested again exactly, so neither test changes a draw.
    """
    if values.itemsize == 4:
        scaled = np.float32(bound * _TWO_POW_32 * F32_SLACK)
        for i in range(values.size):
            flags[i] = np.float32(hi_words[i]) + values[i] * scaled >= F32_EDGE
    else:
        scaled = bound * _TWO_POW_32
        for i in range(values.size):
            flags[i] = _flag64(hi_words[i], np.float64(values[i]), scaled)


@jit(parallel=True)
def _chunk_pass(weights, k0, k1, chunk, spare, group, cand_keys, cand_idx, cand_count, row_bound, chunk_stats,
                block_sums, grid, indices, probs, status):
    """One pass over the weights, tasks of ``group`` consecutive (row, chunk) items in parallel (see
    :func:`_item_range`).

    The loop body is one call: a small parallel region compiles in a fraction of the time.
    """
    items = weights.shape[0] * cand_keys.shape[1]
    for task in prange((items + group - 1) // group):
        _item_range(weights, k0, k1, chunk, spare, task * group, min(items, (task + 1) * group), cand_keys, cand_idx,
                    cand_count, row_bound, chunk_stats, block_sums, grid, indices, probs, status)


@jit
def _chunk_pass_serial(weights, k0, k1, chunk, spare, cand_keys, cand_idx, cand_count, row_bound, chunk_stats,
                       block_sums, grid, indices, probs, status):
    """:func:`_chunk_pass` on the calling thread: the same items in the same order, for work too small to pay
    for waking the thread pool (the draws, probabilities and status are bitwise the same)."""
    _item_range(weights, k0, k1, chunk, spare, 0, weights.shape[0] * cand_keys.shape[1], cand_keys, cand_idx,
                cand_count, row_bound, chunk_stats, block_sums, grid, indices, probs, status)


@jit
def _item_range(weights, k0, k1, chunk, spare, first, stop, cand_keys, cand_idx, cand_count, row_bound, chunk_stats,
                block_sums, grid, indices, probs, status):
    """Items ``first..stop`` (item ``i`` is row ``i // nchunks``, chunk ``i % nchunks``) one after another, with one
    set of scratch arrays for them all (allocated per item, they cost tiny rows a large share of their time):
    :func:`_chunk_item`, then, where a row is one chunk, the row's finish (:func:`_finish_row`) on the same
    thread while its candidates are in cache, so the finish of many rows runs on every thread instead of after
    the parallel pass on one (the same results, bit for bit)."""
    nchunks, capacity = cand_keys.shape[1], cand_keys.shape[2]
    hi_words = np.empty(BLOCK, np.uint32)
    flags = np.zeros(BLOCK, np.bool_)
    keys = np.empty(capacity, np.float64)
    positions = np.empty(capacity, np.int64)
    idx = np.empty(indices.shape[1], np.int64)
    for item in range(first, stop):
        b = item // nchunks
        _chunk_item(weights, k0, k1, chunk, spare, b, item - b * nchunks, cand_keys, cand_idx, cand_count, row_bound,
                    chunk_stats, block_sums, hi_words, flags)
        if nchunks == 1:
            _finish_row(weights, cand_keys, cand_idx, cand_count, chunk_stats, block_sums, grid, indices, probs,
                        status, b, keys, positions, idx)


@jit
def _chunk_item(weights, k0, k1, chunk, spare, b, c, cand_keys, cand_idx, cand_count, row_bound, chunk_stats,
                block_sums, hi_words, flags):
    """Item (row ``b``, chunk ``c``): validate its positions and keep the ``capacity`` smallest
    keys of its positive ones in a max-heap (``hi_words`` and ``flags``: :func:`_select`'s scratch).

    Per block of ``BLOCK`` positions it records the float64 sum (``block_sums``), and per chunk
    the counts of positive and negative entries (``chunk_stats``). ``row_bound[b, 0]`` is
    shared by the items of row ``b``: any item's full-heap threshold bounds the row's final
    n-th smallest key, so keys strictly above it are dropped early. The result does not depend
    on when (or whether) an item sees another's bound.

    The item's first ``SEGMENT`` positions (its head, in cache for a second pass) take their statistics
    first, then their keys, keeping only keys below the item's own bound :func:`_first_bound` (not
    shared: another item's keys may lie above it), so few keys are computed before the heap is full; if
    fewer than ``capacity`` fall below it (and the row's shared bound has not come below it meanwhile),
    the head is selected again without it. Once the heap is full its threshold is below the first bound,
    so the ``capacity`` smallest keys kept are the item's smallest and the draws are the same. The rest
    of the item goes block by block, each block's statistics taken just before its keys (one read).
    """
    size = weights.shape[1]
    capacity = cand_keys.shape[2]
    keys = cand_keys[b, c]
    idx = cand_idx[b, c]
    row_weights = weights[b]
    start = c * chunk
    stop = min(size, start + chunk)
    sums = block_sums[b]
    head = min(stop, start + SEGMENT)
    total = 0.0
    squares = 0.0
    positive = 0
    negative = 0
    for block_start in range(start, head, BLOCK):
        t, pos, neg, sq = _block_stats(row_weights[block_start:min(head, block_start + BLOCK)])
        sums[block_start // BLOCK] = t
        total += t
        squares += sq
        positive += pos
        negative += neg
    first = np.inf
    if negative == 0 and positive >= capacity:
        first = _first_bound(capacity + spare, total, squares)
    count, _, _ = _select(row_weights, k0, k1, b, start, head, keys, idx, 0, row_bound, first, sums, False, hi_words,
                          flags)
    if count < capacity and first < row_bound[b, 0]:  # too few below the first bound: again without it
        count, _, _ = _select(row_weights, k0, k1, b, start, head, keys, idx, 0, row_bound, np.inf, sums, False,
                              hi_words, flags)
    if head < stop:
        count, pos, neg = _select(row_weights, k0, k1, b, head, stop, keys, idx, count, row_bound, np.inf, sums,
                                  True, hi_words, flags)
        positive += pos
        negative += neg
    chunk_stats[b, c, 0] = positive
    chunk_stats[b, c, 1] = negative
    cand_count[b, c] = count


@jit(inline="always")
def _first_bound(want, total, squares):
    """A bound ``t`` below which at least ``want`` keys are expected (``n + 5 sqrt(n) + 10`` by default, so
    fewer than ``n`` almost never fall), or inf where the weights are too uneven for that.

    A key ``-log(u) / a`` falls below ``t`` with probability ``1 - exp(-a t) >= a t - (a t)**2 / 2``, so
    at least ``W t - S t**2 / 2`` keys are expected (``W`` the weights' sum, ``S`` the sum of their
    squares); ``t`` is the smaller root of that bound equal to ``want``.
    """
    disc = total * total - 2.0 * squares * want
    if not (want > 0.0 and np.isfinite(total) and total > 0.0 and np.isfinite(disc) and disc > 0.0):
        return np.inf
    return 2.0 * want / (total + math.sqrt(disc))


@jit
def _select(row_weights, k0, k1, b, start, stop, keys, idx, count, row_bound, first, sums, take_stats, hi_words,
            flags):
    """Add the keys of positions ``start..stop`` below ``first`` and the row's shared bound ``row_bound[b, 0]``
    to the max-heap ``keys[:count]`` of the ``keys.size`` smallest; returns how many it holds, and with
    ``take_stats`` the counts of positive and negative weights (block sums into ``sums``, each block's
    statistics taken in its flags' pass, :func:`_scan_block`). Inside a block a key is computed only when the
    high word of its uniform cannot rule it out. ``hi_words`` (uint32) and ``flags`` (bool) are scratch of
    ``BLOCK`` entries, written for each block before they are read (flags past a block's end, in its last 8-byte
    word, are never tested)."""
    positive = 0
    negative = 0
    capacity = keys.size
    k0 = np.uint64(k0)
    k1 = np.uint64(k1)
    flag_words = flags.view(np.uint64)  # 8 flags at a time: most are all clear
    threshold = keys[0] if count == capacity else np.inf
    for block_start in range(start, stop, BLOCK):
        block_stop = min(stop, block_start + BLOCK)
        bound = min(threshold, row_bound[b, 0], first) * _REJECT_MARGIN
        _fill_block(block_start, block_stop, b, k0, k1, hi_words)
        if take_stats:
            t, pos, neg = _scan_block(row_weights[block_start:block_stop], hi_words, bound, flags)
            sums[block_start // BLOCK] = t
            positive += pos
            negative += neg
        else:
            _flag_block(row_weights[block_start:block_stop], hi_words, bound, flags)
        for w in range((block_stop - block_start + 7) // 8):
            if flag_words[w] == 0:
                continue
            for p in range(block_start + 8 * w, min(block_start + 8 * w + 8, block_stop)):
                if not flags[p - block_start]:
                    continue
                a = np.float64(row_weights[p])
                hi = np.uint64(hi_words[p - block_start])
                if not (a > 0.0 and _headroom(hi) < a * bound):
                    continue
                l0, l1, l2, l3 = block_words(np.uint64(p // 4), b, STREAM_LO, k0, k1)
                key = -np.log(to_uniform(hi, pick_word(l0, l1, l2, l3, p & 3))) / a
                if key > min(row_bound[b, 0], first):
                    continue
                if count < capacity:
                    count = _push(keys, idx, count, key, p)
                elif key < threshold:
                    _replace_top(keys, idx, capacity, key, p)
                else:
                    continue
                if count == capacity:
                    threshold = keys[0]
                    bound = min(threshold, row_bound[b, 0], first) * _REJECT_MARGIN
                    if threshold < row_bound[b, 0]:
                        row_bound[b, 0] = threshold
    return count, positive, negative


@jit(inline="always")
def _write_coords(indices, b, k, position, grid):
    """Grid coordinates of a flat (row-major) position, by integer division and remainder (unsigned: one
    division instruction gives both, twice as fast as Python's signed floor division; positions and grid
    sides are never negative)."""
    rest = np.uint64(position)
    for d in range(indices.shape[2] - 1, -1, -1):
        side = np.uint64(grid[d])
        quotient = rest // side
        indices[b, k, d] = rest - quotient * side
        rest = quotient


@jit(inline="always")
def _row_status(weights, b, total, positive, negative, status):
    """Fill ``status[b]`` (see ``atskern._validation.STATUS_COLUMNS``).

    Non-finite entries and the largest weight's exponent take a second pass, only over rows
    whose total says they may matter: a non-finite total, or one outside
    ``[N 2**(low-1), 2**high)`` (the largest weight lies in ``[total / N, total]``).
    """
    size = weights.shape[1]
    nonfinite = 0
    exponent = 0
    if not (_SCREEN_LOW * size <= total < _SCREEN_HIGH):
        top = 0.0
        for p in range(size):
            a = np.float64(weights[b, p])
            if np.isfinite(a):
                top = max(top, a)
            else:
                nonfinite += 1
        if top > 0.0:
            exponent = math.frexp(top)[1]
    status[b, 0] = nonfinite
    status[b, 1] = negative
    status[b, 2] = positive
    status[b, 3] = exponent


_INSERTION_SORT = 32
"""Up to this many candidates a row's are sorted by insertion alone (an argsort's allocation costs more)."""


@jit(inline="always")
def _row_smallest(cand_keys, cand_idx, cand_count, b, keys, positions, order_idx):
    """The row's candidate positions of the ``n`` (``order_idx.size``) smallest ``(key, position)`` pairs, in
    increasing order, into ``order_idx``; returns how many (fewer than ``n`` only in a row with fewer positive
    entries).

    Every full chunk's largest kept key (its heap's top) bounds the row's n-th smallest, so only the
    candidates up to the smallest such bound are gathered (``keys``, ``positions``) and sorted by key (a
    quicksort: 1.6x faster than merging through a heap for n in the hundreds), then by ``(key, position)`` by
    insertion, which moves only equal keys (a few candidates, up to ``_INSERTION_SORT``, by insertion alone)."""
    nchunks, capacity = cand_keys.shape[1], cand_keys.shape[2]
    n = order_idx.size
    bound = np.inf
    for c in range(nchunks):
        if cand_count[b, c] == capacity:
            bound = min(bound, cand_keys[b, c, 0])
    m = 0
    for c in range(nchunks):
        for j in range(cand_count[b, c]):
            if cand_keys[b, c, j] <= bound:
                keys[m] = cand_keys[b, c, j]
                positions[m] = cand_idx[b, c, j]
                m += 1
    if m > _INSERTION_SORT:  # by key first: the insertion below then only moves equal keys
        order = np.argsort(keys[:m])
        keys[:m] = keys[order]
        positions[:m] = positions[order]
    for i in range(1, m):  # by (key, position), in place
        key, position = keys[i], positions[i]
        j = i
        while j > 0 and _greater(keys[j - 1], positions[j - 1], key, position):
            keys[j], positions[j] = keys[j - 1], positions[j - 1]
            j -= 1
        keys[j], positions[j] = key, position
    count = min(n, m)
    order_idx[:count] = positions[:count]
    return count


@jit
def _finish_rows(weights, cand_keys, cand_idx, cand_count, chunk_stats, block_sums, grid, indices, probs, status):
    """:func:`_finish_row` of every row, on the calling thread (rows of several chunks: their candidates are
    complete only after the parallel pass)."""
    nchunks = cand_count.shape[1]
    keys = np.empty(nchunks * cand_keys.shape[2], np.float64)
    positions = np.empty(nchunks * cand_keys.shape[2], np.int64)
    idx = np.empty(indices.shape[1], np.int64)
    for b in range(cand_count.shape[0]):
        _finish_row(weights, cand_keys, cand_idx, cand_count, chunk_stats, block_sums, grid, indices, probs, status,
                    b, keys, positions, idx)


@jit
def _finish_row(weights, cand_keys, cand_idx, cand_count, chunk_stats, block_sums, grid, indices, probs, status, b,
                keys, positions, idx):
    """Row ``b``: its chunks' candidates' ``n`` smallest keys in increasing order (:func:`_row_smallest`, with
    ``keys``, ``positions`` and ``idx`` as scratch), pad a row with fewer positive entries with its lowest
    zero-weight positions (fillers, rule R1), and write grid coordinates, float64 probabilities and the row's
    status."""
    nchunks = cand_count.shape[1]
    n = indices.shape[1]
    positive = 0
    negative = 0
    for c in range(nchunks):
        positive += chunk_stats[b, c, 0]
        negative += chunk_stats[b, c, 1]
    count = _row_smallest(cand_keys, cand_idx, cand_count, b, keys, positions, idx)
    total = 0.0
    for j in range(block_sums.shape[1]):
        total += block_sums[b, j]
    _row_status(weights, b, total, positive, negative, status)
    p = 0
    for k in range(count, n):  # fillers: the lowest positions without positive weight
        while weights[b, p] > 0.0:
            p += 1
        idx[k] = p
        p += 1
    for k in range(n):
        _write_coords(indices, b, k, idx[k], grid)
        a = np.float64(weights[b, idx[k]])
        probs[b, k] = a / total if a > 0.0 and total > 0.0 else 0.0  # total <= 0: a refused row


@jit
def _summarize(status):
    """The last row of ``status``: the largest non-finite and negative counts, the smallest
    positive count, and how many rows have an exponent outside ``SCALE_FREE_EXPONENTS``."""
    rows = status.shape[0] - 1
    status[rows, 0] = 0
    status[rows, 1] = 0
    status[rows, 2] = status[0, 2]
    status[rows, 3] = 0
    for b in range(rows):
        status[rows, 0] = max(status[rows, 0], status[b, 0])
        status[rows, 1] = max(status[rows, 1], status[b, 1])
        status[rows, 2] = min(status[rows, 2], status[b, 2])
        status[rows, 3] += not (_EXPONENT_LOW <= status[b, 3] <= _EXPONENT_HIGH)


@jit
def _without_replacement(weights, k0, k1, chunk, serial, spare, group, grid, indices, probs, status):
    rows, size = weights.shape
    n = indices.shape[1]
    nchunks = (size + chunk - 1) // chunk
    capacity = min(n, chunk, size)
    cand_keys = np.empty((rows, nchunks, capacity), np.float64)
    cand_idx = np.empty((rows, nchunks, capacity), np.int64)
    cand_count = np.empty((rows, nchunks), np.int64)
    row_bound = np.full((rows, 8), np.inf)  # one cache line per row: no false sharing
    chunk_stats = np.empty((rows, nchunks, 2), np.int64)
    block_sums = np.empty((rows, (size + BLOCK - 1) // BLOCK), np.float64)
    if serial:
        _chunk_pass_serial(weights, k0, k1, chunk, spare, cand_keys, cand_idx, cand_count, row_bound, chunk_stats,
                           block_sums, grid, indices, probs, status)
    else:
        _chunk_pass(weights, k0, k1, chunk, spare, group, cand_keys, cand_idx, cand_count, row_bound, chunk_stats,
                    block_sums, grid, indices, probs, status)
    if nchunks > 1:  # a row of one chunk is finished by its item
        _finish_rows(weights, cand_keys, cand_idx, cand_count, chunk_stats, block_sums, grid, indices, probs, status)
    _summarize(status)


def chunk_size(rows, size, threads=None):
    """Positions per work item: whole rows when there are enough rows for the threads, else
    rows split so every thread has work (at least ``MIN_CHUNK`` positions, a multiple of ``BLOCK``).

    The draws do not depend on this: each item keeps its exact n smallest keys, and sums are
    taken per ``BLOCK``.
    """
    threads = numba.get_num_threads() if threads is None else threads
    pieces = max(1, -(-threads // rows))
    chunk = max(MIN_CHUNK, -(-size // pieces))
    return -(-chunk // BLOCK) * BLOCK


@jit
def _with_replacement(weights, k0, k1, serial, group, grid, indices, probs, status):
    if serial:
        _replacement_range(weights, 0, weights.shape[0], k0, k1, grid, indices, probs, status)
    else:
        _replacement_rows(weights, k0, k1, group, grid, indices, probs, status)
    _summarize(status)


@jit(parallel=True)
def _replacement_rows(weights, k0, k1, group, grid, indices, probs, status):
    """Tasks of ``group`` consecutive rows in parallel (see :func:`_replacement_range`)."""
    rows = weights.shape[0]
    for task in prange((rows + group - 1) // group):
        _replacement_range(weights, task * group, min(rows, (task + 1) * group), k0, k1, grid, indices, probs, status)


@jit
def _replacement_range(weights, first, stop, k0, k1, grid, indices, probs, status):
    """Rows ``first..stop`` (:func:`_replacement_row`) one after another, with one set of scratch arrays for them
    all (allocated per row, they cost tiny rows a large share of their time)."""
    n = indices.shape[1]
    sums = np.empty((weights.shape[1] + PIECE - 1) // PIECE, np.float64)
    targets = np.empty(n, np.float64)
    order = np.empty(n, np.int64)
    for b in range(first, stop):
        _replacement_row(weights, b, k0, k1, grid, indices, probs, status, sums, targets, order)


@jit
def _piece_sums(weights, b, sums):
    """One pass over row ``b``: the float64 sum of each piece of ``PIECE`` positions (``sums``, each in
    :func:`ordered_sum`'s order, the same in every compiled copy) and the counts of positive and negative
    entries (negative ones counted again in cache, only in a piece with a non-positive entry)."""
    size = weights.shape[1]
    positive = 0
    negative = 0
    row = weights[b]
    for s in range(sums.size):
        start = s * PIECE
        stop = min(size, start + PIECE)
        sums[s], piece_positive = ordered_sum(row, start, stop - start)
        positive += piece_positive
        negative += _negatives(row[start:stop], piece_positive)
    return positive, negative


@jit(inline="always")
def _sort_order(targets, order):
    """``order``: the positions of ``targets`` in increasing order, by insertion up to ``_INSERTION_SORT`` (an
    argsort's allocation costs more), else by argsort. Equal targets may come in either order: they draw the same
    position."""
    n = targets.size
    if n > _INSERTION_SORT:
        order[:] = np.argsort(targets)
        return
    for i in range(n):
        target = targets[i]
        j = i
        while j > 0 and targets[order[j - 1]] > target:
            order[j] = order[j - 1]
            j -= 1
        order[j] = i


@jit
def _replacement_row(weights, b, k0, k1, grid, indices, probs, status, sums, targets, order):
    """Row ``b``: one vectorized pass for the piece sums and the status, then ``n`` inverse-CDF draws (``sums``, one
    per piece, ``targets`` and ``order``, ``n`` each, are scratch).

    The prefix sum is taken piece by piece: ``start_c`` is the sequential float64 sum of the sums of pieces
    ``0..c-1`` (``start`` of the last piece plus its sum is the row's total), and inside piece ``c`` the prefix
    sum at ``p`` adds the weights from ``start_c`` one by one. Draw ``k`` is the first position of positive
    weight whose prefix sum reaches ``u_k * total`` (the row's last positive position if rounding leaves the
    target unreached). Only the pieces holding a target are scanned (sorted targets; a piece is skipped only
    when its end, inflated far beyond rounding, is still below the target). The reference's single running
    sum differs from this one by rounding, so the two can differ only where a target lies within rounding of
    a prefix sum, as on the GPU.
    """
    size = weights.shape[1]
    n = indices.shape[1]
    k0 = np.uint64(k0)
    k1 = np.uint64(k1)
    positive, negative = _piece_sums(weights, b, sums)
    total = 0.0
    for s in range(sums.size):
        total += sums[s]
    _row_status(weights, b, total, positive, negative, status)
    if not (positive > 0 and np.isfinite(total) and total > 0.0):
        for k in range(n):  # an invalid row (refused unless validate=False): in-range fillers
            indices[b, k, :] = 0
            probs[b, k] = 0.0
        return
    targets = np.empty(n, np.float64)
    for k in range(n):
        w0, w1, w2, w3 = block_words(np.uint64(k // 2), b, STREAM_REPLACE, k0, k1)
        if k % 2 == 0:
            targets[k] = to_uniform(w0, w1) * total
        else:
            targets[k] = to_uniform(w2, w3) * total
    _sort_order(targets, order)
    k = 0
    start = 0.0
    for s in range(sums.size):
        end = start + sums[s]
        if end * _PIECE_SLACK >= targets[order[k]]:
            acc = start
            for p in range(s * PIECE, min(size, (s + 1) * PIECE)):
                a = np.float64(weights[b, p])
                acc += a
                if not a > 0.0:
                    continue
                while k < n and targets[order[k]] <= acc:
                    _write_coords(indices, b, order[k], p, grid)
                    probs[b, order[k]] = a / total
                    k += 1
                if k == n:
                    return
        start = end
    last = size - 1
    while not weights[b, last] > 0.0:
        last -= 1
    a = np.float64(weights[b, last])
    while k < n:
        _write_coords(indices, b, order[k], last, grid)
        probs[b, order[k]] = a / total
        k += 1


def sample(weights, n, grid, seed, replace, chunk=None, serial=None, spare=None):
    """The CPU sampling backend (see ``atskern.sampling`` for the interface).

    ``weights`` is ``(B, N)`` float32/float64, C-contiguous; ``grid`` an int64 array of the grid
    shape (its product is N); ``seed`` a 64-bit integer. Returns ``indices`` int32
    ``(B, n, D)``, float64 ``probs`` ``(B, n)`` and the int64 ``status`` ``(B + 1, 4)``: one
    row per batch row, then the summary row (see ``atskern.sampling``). Rows that the status
    marks invalid still get in-range indices. ``chunk`` (a multiple of ``BLOCK``) overrides
    :func:`chunk_size` without replacement; ``serial`` (default: up to ``SERIAL_WORK`` positions in all, or
    one row with replacement) runs the call on the calling thread; ``spare`` (default ``5 sqrt(n) + 10``) is
    how many keys beyond ``n`` the first bound of an item expects (see :func:`_first_bound`; a test makes it
    negative to force the reselection). None of them changes a bit of the results.
    """
    rows, size = weights.shape
    if serial is None:
        serial = rows * size <= SERIAL_WORK or (replace and rows == 1)
    indices = np.empty((rows, n, grid.shape[0]), np.int32)
    probs = np.empty((rows, n), np.float64)
    status = np.empty((rows + 1, 4), np.int64)
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    if replace:
        _with_replacement(weights, k0, k1, serial, max(1, GROUP_WORK // size), grid, indices, probs, status)
    else:
        if chunk is None:
            chunk = -(-size // BLOCK) * BLOCK if serial else chunk_size(rows, size)
        spare = 5.0 * math.sqrt(n) + 10.0 if spare is None else float(spare)
        group = max(1, GROUP_WORK // min(chunk, size))
        _without_replacement(weights, k0, k1, chunk, serial, spare, group, grid, indices, probs, status)
    return indices, probs, status
