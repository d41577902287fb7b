"""Numba sampling kernels: validation fused into sampling, without and with replacement.

Inputs arrive flattened to ``(B, N)`` weights (see ``atskern.sampling``, which turns the
per-row status these kernels return into errors).

Without replacement each position gets the key ``-log(u) / a`` (exponential keys; the n
smallest in increasing order are a successive-sampling draw). Rows are cut into chunks
(:func:`chunk_size`), processed in parallel in one pass that also validates the weights (sums,
counts, largest entry), each chunk keeping its ``n`` smallest keys in a max-heap; a merge keeps
the row's ``n`` smallest. Ties are broken by position, so the result is the row's exact ``n``
smallest ``(key, position)`` pairs whatever the chunking or thread count. Inside a chunk a key
is computed only when the high word of its uniform cannot rule it out: ``-log(u) / a >= t``
whenever ``1 - u >= a t``. A row with fewer than ``n`` positive entries is padded with its
lowest zero-weight positions (rule R1 of DESIGN.md).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from .._rng import STREAM_HI, STREAM_LO, STREAM_REPLACE, TWO_POW_M32
from ._jit import jit
from .philox import block_words, pick_word, to_uniform

MIN_CHUNK = 1 << 14
"""Fewest positions of a parallel work item (see :func:`chunk_size`)."""

BLOCK = 1 << 10
"""Positions whose high words are generated together (a vectorizable loop)."""

GROUP = 32
"""Positions tested together for possible survivors; groups with none are skipped."""

_REJECT_MARGIN = 1.0 + 1e-12


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
    """HI words of a block's positions: position ``block_start + 4 j + lane`` in ``hi_words[lane, j]``."""
    first_q = block_start // 4
    for j in range((block_stop - block_start + 3) // 4):
        w0, w1, w2, w3 = block_words(np.uint64(first_q + j), row, STREAM_HI, k0, k1)
        hi_words[0, j] = np.uint32(w0)
        hi_words[1, j] = np.uint32(w1)
        hi_words[2, j] = np.uint32(w2)
        hi_words[3, j] = np.uint32(w3)


@jit(inline="always")
def _headroom(hi):
    """``1 - (hi + 1) 2**-32``, an upper bound of ``1 - u`` for any uniform with this HI word."""
    return np.float64(np.uint32(0xFFFFFFFF) - hi) * TWO_POW_M32


@jit(inline="always")
def _flag_groups(weights, row, block_start, block_stop, hi_words, bound, group_hits):
    """Per group of ``GROUP`` positions, how many might have a key below ``bound``."""
    if block_stop - block_start == BLOCK:
        for g in range(BLOCK // GROUP):
            hits = 0
            for j in range(g * (GROUP // 4), (g + 1) * (GROUP // 4)):
                for lane in range(4):
                    a = np.float64(weights[row, block_start + 4 * j + lane])
                    hits += _headroom(hi_words[lane, j]) < a * bound
            group_hits[g] = hits
    else:
        group_hits[:] = 1


@jit(fastmath={"reassoc", "nsz", "contract"})
def _block_statistics(weights, row, start, stop):
    """Sum (float64), positive count, negative count and largest entry of ``weights[row, start:stop]``.

    Vectorized (reassociated) in an order fixed by ``BLOCK``, so the sums do not depend on the
    chunking or thread count. A NaN or inf makes the sum non-finite.
    """
    total = 0.0
    positive = 0.0
    negative = 0.0
    top = 0.0
    for p in range(start, stop):
        a = np.float64(weights[row, p])
        total += a
        positive += 1.0 if a > 0.0 else 0.0
        negative += 1.0 if a < 0.0 else 0.0
        top = a if a > top else top
    return total, positive, negative, top


@jit(parallel=True)
def _chunk_pass(weights, k0, k1, chunk, cand_keys, cand_idx, cand_count, row_bound, chunk_stats, block_sums):
    """One pass over the weights: each (row, chunk) item validates its positions and keeps the
    ``capacity`` smallest keys of its positive ones in a max-heap.

    Per block of ``BLOCK`` positions it records the float64 sum (``block_sums``), and per chunk
    the counts of positive and negative entries and the largest entry (``chunk_stats``).
    ``row_bound[b, 0]`` is shared by the items of row ``b``: any item's full-heap threshold
    bounds the row's final n-th smallest key, so keys strictly above it are dropped early. The
    result does not depend on when (or whether) an item sees another's bound.
    """
    rows, size = weights.shape
    nchunks = cand_keys.shape[1]
    capacity = cand_keys.shape[2]
    k0 = np.uint64(k0)
    k1 = np.uint64(k1)
    for item in prange(rows * nchunks):
        b = item // nchunks
        c = item - b * nchunks
        keys = cand_keys[b, c]
        idx = cand_idx[b, c]
        hi_words = np.empty((4, BLOCK // 4), np.uint32)
        group_hits = np.empty(BLOCK // GROUP, np.int64)
        count = 0
        threshold = np.inf
        positive = 0.0
        negative = 0.0
        top = 0.0
        stop = min(size, (c + 1) * chunk)
        for block_start in range(c * chunk, stop, BLOCK):
            block_stop = min(stop, block_start + BLOCK)
            total, pos, neg, big = _block_statistics(weights, b, block_start, block_stop)
            block_sums[b, block_start // BLOCK] = total
            positive += pos
            negative += neg
            top = max(top, big)
            bound = min(threshold, row_bound[b, 0]) * _REJECT_MARGIN
            _fill_block(block_start, block_stop, b, k0, k1, hi_words)
            _flag_groups(weights, b, block_start, block_stop, hi_words, bound, group_hits)
            for g in range((block_stop - block_start + GROUP - 1) // GROUP):
                if group_hits[g] == 0:
                    continue
                for p in range(block_start + g * GROUP, min(block_start + (g + 1) * GROUP, block_stop)):
                    a = np.float64(weights[b, p])
                    hi = np.uint64(hi_words[p & 3, (p - block_start) // 4])
                    if not (a > 0.0 and _headroom(hi) < a * bound):
                        continue
                    l0, l1, l2, l3 = block_words(np.uint64(p // 4), b, STREAM_LO, k0, k1)
                    key = -np.log(to_uniform(hi, pick_word(l0, l1, l2, l3, p & 3))) / a
                    if key > row_bound[b, 0]:
                        continue
                    if count < capacity:
                        count = _push(keys, idx, count, key, p)
                    elif key < threshold:
                        _replace_top(keys, idx, capacity, key, p)
                    else:
                        continue
                    if count == capacity:
                        threshold = keys[0]
                        bound = min(threshold, row_bound[b, 0]) * _REJECT_MARGIN
                        if threshold < row_bound[b, 0]:
                            row_bound[b, 0] = threshold
        cand_count[b, c] = count
        chunk_stats[b, c, 0] = positive
        chunk_stats[b, c, 1] = negative
        chunk_stats[b, c, 2] = top


@jit(inline="always")
def _write_coords(indices, b, k, position, grid):
    """Grid coordinates of a flat (row-major) position, by integer division and remainder."""
    rest = position
    for d in range(indices.shape[2] - 1, -1, -1):
        indices[b, k, d] = rest % grid[d]
        rest //= grid[d]


@jit(inline="always")
def _row_status(weights, b, total, positive, negative, top, status):
    """Fill ``status[b]`` (see ``atskern._validation.STATUS_COLUMNS``)."""
    nonfinite = 0
    if not np.isfinite(total):
        for p in range(weights.shape[1]):
            nonfinite += not np.isfinite(weights[b, p])
    status[b, 0] = nonfinite
    status[b, 1] = np.int64(negative)
    status[b, 2] = np.int64(positive)
    status[b, 3] = math.frexp(top)[1] if 0.0 < top < np.inf else 0


@jit
def _finish_rows(weights, cand_keys, cand_idx, cand_count, chunk_stats, block_sums, grid, indices, probs, status):
    """Per row: merge the chunks' candidates into the ``n`` smallest keys in increasing order, pad
    a row with fewer positive entries with its lowest zero-weight positions (fillers, rule R1),
    and write grid coordinates, float64 probabilities and the row's status."""
    rows, nchunks = cand_count.shape
    n = indices.shape[1]
    keys = np.empty(n, np.float64)
    idx = np.empty(n, np.int64)
    for b in range(rows):
        count = 0
        positive = 0.0
        negative = 0.0
        top = 0.0
        for c in range(nchunks):
            positive += chunk_stats[b, c, 0]
            negative += chunk_stats[b, c, 1]
            top = max(top, chunk_stats[b, c, 2])
            for j in range(cand_count[b, c]):
                key = cand_keys[b, c, j]
                position = cand_idx[b, c, j]
                if count < n:
                    count = _push(keys, idx, count, key, position)
                elif _greater(keys[0], idx[0], key, position):
                    _replace_top(keys, idx, n, key, position)
        total = 0.0
        for j in range(block_sums.shape[1]):
            total += block_sums[b, j]
        _row_status(weights, b, total, positive, negative, top, status)
        for end in range(count - 1, 0, -1):
            keys[0], keys[end] = keys[end], keys[0]
            idx[0], idx[end] = idx[end], idx[0]
            _sift_down(keys, idx, 0, end)
        p = 0
        for k in range(count, n):  # fillers: the lowest positions without positive weight
            while weights[b, p] > 0.0:
                p += 1
            idx[k] = p
            p += 1
        for k in range(n):
            _write_coords(indices, b, k, idx[k], grid)
            a = np.float64(weights[b, idx[k]])
            probs[b, k] = a / total if a > 0.0 else 0.0


@jit
def _without_replacement(weights, k0, k1, chunk, grid, indices, probs, status):
    rows, size = weights.shape
    n = indices.shape[1]
    nchunks = (size + chunk - 1) // chunk
    capacity = min(n, chunk, size)
    cand_keys = np.empty((rows, nchunks, capacity), np.float64)
    cand_idx = np.empty((rows, nchunks, capacity), np.int64)
    cand_count = np.empty((rows, nchunks), np.int64)
    row_bound = np.full((rows, 8), np.inf)  # one cache line per row: no false sharing
    chunk_stats = np.empty((rows, nchunks, 3), np.float64)
    block_sums = np.empty((rows, (size + BLOCK - 1) // BLOCK), np.float64)
    _chunk_pass(weights, k0, k1, chunk, cand_keys, cand_idx, cand_count, row_bound, chunk_stats, block_sums)
    _finish_rows(weights, cand_keys, cand_idx, cand_count, chunk_stats, block_sums, grid, indices, probs, status)


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


@jit(parallel=True)
def _with_replacement(weights, k0, k1, grid, indices, probs, status):
    """Per row: one pass for the float64 total and the status, then ``n`` inverse-CDF draws
    (sorted targets, a second pass over the prefix sums that stops at the last target)."""
    rows, size = weights.shape
    n = indices.shape[1]
    k0 = np.uint64(k0)
    k1 = np.uint64(k1)
    for b in prange(rows):
        total = 0.0
        positive = 0.0
        negative = 0.0
        top = 0.0
        for p in range(size):
            a = np.float64(weights[b, p])
            total += a
            positive += 1.0 if a > 0.0 else 0.0
            negative += 1.0 if a < 0.0 else 0.0
            top = a if a > top else top
        _row_status(weights, b, total, positive, negative, top, status)
        if not (positive > 0.0 and np.isfinite(total) and total > 0.0):
            for k in range(n):  # an invalid row (refused unless validate=False): in-range fillers
                indices[b, k, :] = 0
                probs[b, k] = 0.0
            continue
        targets = np.empty(n, np.float64)
        for k in range(n):
            w0, w1, w2, w3 = block_words(np.uint64(k // 2), b, STREAM_REPLACE, k0, k1)
            if k % 2 == 0:
                targets[k] = to_uniform(w0, w1) * total
            else:
                targets[k] = to_uniform(w2, w3) * total
        order = np.argsort(targets)
        acc = 0.0
        k = 0
        last_positive = 0
        for p in range(size):
            a = np.float64(weights[b, p])
            if a > 0.0:
                last_positive = p
            acc += a
            while k < n and targets[order[k]] <= acc:
                _write_coords(indices, b, order[k], p, grid)
                probs[b, order[k]] = a / total
                k += 1
            if k == n:
                break
        a = np.float64(weights[b, last_positive])
        while k < n:
            _write_coords(indices, b, order[k], last_positive, grid)
            probs[b, order[k]] = a / total
            k += 1


def sample(weights, n, grid, seed, replace, chunk=None):
    """The CPU sampling backend (see ``atskern.sampling`` for the interface).

    ``weights`` is ``(B, N)`` float32/float64, C-contiguous; ``grid`` an int64 array of the grid
    shape (its product is N); ``seed`` a 64-bit integer. Returns ``indices`` int32
    ``(B, n, D)``, float64 ``probs`` ``(B, n)`` and the int64 ``status`` ``(B, 4)``. Rows that
    the status marks invalid still get in-range indices. ``chunk`` (a multiple of ``BLOCK``)
    overrides :func:`chunk_size` without replacement.
    """
    rows, size = weights.shape
    indices = np.empty((rows, n, grid.shape[0]), np.int32)
    probs = np.empty((rows, n), np.float64)
    status = np.empty((rows, 4), np.int64)
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    if replace:
        _with_replacement(weights, k0, k1, grid, indices, probs, status)
    else:
        chunk = chunk_size(rows, size) if chunk is None else chunk
        _without_replacement(weights, k0, k1, chunk, grid, indices, probs, status)
    return indices, probs, status
