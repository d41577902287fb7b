"""Numba sampling kernels: row statistics, sampling without and with replacement.

Inputs arrive validated and flattened to ``(B, N)`` weights (see ``atskern.sampling``).

Without replacement each position gets the key ``-log(u) / a`` (exponential
keys; the n smallest in increasing order are a successive-sampling draw).
Rows are cut into chunks (:func:`chunk_size`), processed in parallel, each
keeping its ``n`` smallest keys in a max-heap; a merge keeps the row's ``n``
smallest. Ties are broken by position, so the result is the row's exact ``n``
smallest ``(key, position)`` pairs whatever the chunking or thread count.
Inside a chunk a key is computed only when the high word of its uniform
cannot rule it out: ``-log(u) / a >= t`` whenever ``1 - u >= a t``.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .._rng import STREAM_HI, STREAM_LO, STREAM_REPLACE, TWO_POW_M32
from ._jit import jit
from .philox import block_words, pick_word, to_uniform

MIN_CHUNK = 1 << 14
"""Fewest positions of a parallel work item (see :func:`chunk_size`)."""

STATS_CHUNK = 1 << 16
"""Positions per work item of :func:`row_statistics` (fixed: it sets the float64 summation order)."""

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


@jit(parallel=True, fastmath={"reassoc", "nsz", "arcp", "contract"})
def _chunk_statistics(weights, chunk):
    """Per (row, chunk): sum, count of positive and count of negative entries (float64 counters
    vectorize; they are exact below 2**53). A NaN or inf makes the chunk's sum non-finite."""
    rows, size = weights.shape
    nchunks = (size + chunk - 1) // chunk
    sums = np.zeros((rows, nchunks))
    positive = np.zeros((rows, nchunks))
    negative = np.zeros((rows, nchunks))
    for item in prange(rows * nchunks):
        b = item // nchunks
        c = item - b * nchunks
        values = weights[b, c * chunk : min(size, (c + 1) * chunk)]
        acc = 0.0
        pos = 0.0
        neg = 0.0
        for p in range(values.size):
            a = np.float64(values[p])
            acc += a
            pos += 1.0 if a > 0.0 else 0.0
            neg += 1.0 if a < 0.0 else 0.0
        sums[b, c] = acc
        positive[b, c] = pos
        negative[b, c] = neg
    return sums, positive, negative


def row_statistics(weights):
    """``(nonfinite, negative, positive, totals)`` per row of ``(B, N)`` weights, as NumPy arrays.

    Chunk sums are added in chunk order (``STATS_CHUNK`` is fixed), so totals
    do not depend on the thread count. Non-finite entries are counted only in
    rows whose sum is not finite.
    """
    sums, positive, negative = _chunk_statistics(weights, STATS_CHUNK)
    totals = np.zeros(sums.shape[0])
    for c in range(sums.shape[1]):
        totals += sums[:, c]
    nonfinite = np.zeros(sums.shape[0], np.int64)
    for row in np.flatnonzero(~np.isfinite(totals)):
        nonfinite[row] = np.count_nonzero(~np.isfinite(weights[row]))
    return nonfinite, negative.sum(axis=1).astype(np.int64), positive.sum(axis=1).astype(np.int64), totals


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


@jit(parallel=True)
def _chunk_candidates(weights, k0, k1, chunk, cand_keys, cand_idx, cand_count, row_bound):
    """Each (row, chunk) item keeps the ``capacity`` smallest keys of its positions in a max-heap.

    ``row_bound[b, 0]`` is shared by the items of row ``b``: any item's full-heap
    threshold bounds the row's final n-th smallest key, so keys strictly
    above it are dropped early. The result does not depend on when (or
    whether) an item sees another's bound.
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
        stop = min(size, (c + 1) * chunk)
        for block_start in range(c * chunk, stop, BLOCK):
            block_stop = min(stop, block_start + BLOCK)
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


@jit(parallel=True)
def _merge_candidates(cand_keys, cand_idx, cand_count, n, out):
    """The ``n`` smallest ``(key, position)`` of each row's candidates, in increasing order."""
    rows, nchunks = cand_count.shape
    for b in prange(rows):
        keys = np.empty(n, np.float64)
        idx = np.empty(n, np.int64)
        count = 0
        for c in range(nchunks):
            for j in range(cand_count[b, c]):
                key = cand_keys[b, c, j]
                position = cand_idx[b, c, j]
                if count < n:
                    count = _push(keys, idx, count, key, position)
                elif _greater(keys[0], idx[0], key, position):
                    _replace_top(keys, idx, n, key, position)
        for end in range(n - 1, 0, -1):
            keys[0], keys[end] = keys[end], keys[0]
            idx[0], idx[end] = idx[end], idx[0]
            _sift_down(keys, idx, 0, end)
        for k in range(n):
            out[b, k] = idx[k]


def chunk_size(rows, size, threads=None):
    """Positions per work item: whole rows when there are enough rows for the threads, else
    rows split so every thread has work (at least ``MIN_CHUNK`` positions, a multiple of ``BLOCK``).

    The draws do not depend on this: each item keeps its exact n smallest keys.
    """
    threads = numba.get_num_threads() if threads is None else threads
    pieces = max(1, -(-threads // rows))
    chunk = max(MIN_CHUNK, -(-size // pieces))
    return -(-chunk // BLOCK) * BLOCK


def sample_without_replacement(weights, n, seed, out, chunk=None):
    """Write into ``out`` (B, n) the flat positions of a successive-sampling draw per row.

    ``weights`` is ``(B, N)`` float32/float64, valid (finite, non-negative,
    at least ``n`` positive entries per row); ``seed`` is a 64-bit integer.
    ``chunk`` (a multiple of ``BLOCK``) overrides :func:`chunk_size`.
    """
    rows, size = weights.shape
    chunk = chunk_size(rows, size) if chunk is None else chunk
    nchunks = (size + chunk - 1) // chunk
    capacity = min(n, chunk, size)
    cand_keys = np.empty((rows, nchunks, capacity), np.float64)
    cand_idx = np.empty((rows, nchunks, capacity), np.int64)
    cand_count = np.empty((rows, nchunks), np.int64)
    row_bound = np.full((rows, 8), np.inf)  # one cache line per row: no false sharing
    _chunk_candidates(weights, seed & 0xFFFFFFFF, seed >> 32, chunk, cand_keys, cand_idx, cand_count, row_bound)
    _merge_candidates(cand_keys, cand_idx, cand_count, n, out)
    return out


@jit(parallel=True)
def _replacement_draws(weights, n, k0, k1, out):
    rows, size = weights.shape
    k0 = np.uint64(k0)
    k1 = np.uint64(k1)
    for b in prange(rows):
        total = 0.0
        for p in range(size):
            total += np.float64(weights[b, p])
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
                out[b, order[k]] = p
                k += 1
            if k == n:
                break
        while k < n:
            out[b, order[k]] = last_positive
            k += 1


def sample_with_replacement(weights, n, seed, out):
    """Write into ``out`` (B, n) the flat positions of ``n`` independent draws per row (inverse CDF)."""
    _replacement_draws(weights, n, seed & 0xFFFFFFFF, seed >> 32, out)
    return out
