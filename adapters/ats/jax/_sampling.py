"""Sampling in pure JAX with atskern's generator: the same draws as ``atskern.sample`` for the same seed.

Without replacement every position gets the exponential key ``-log(u) / a``
(``u`` from atskern's HI/LO Philox streams) and ``lax.top_k`` keeps the ``n``
smallest, ties going to the lower position as in atskern. Zero-weight cells
have key ``+inf``, so a row with fewer than ``n`` positive weights is
completed with its lowest-index zero-weight cells (rule R1's fillers, with
probability 0). With replacement: inverse CDF on the cumulative sum, in
float64 under x64 and otherwise in double-floats (two float32 words).

Precision. With JAX's 64-bit mode on (``jax_enable_x64``, globally or in a
``jax.enable_x64`` context) keys, sums and probabilities are float64 as in
atskern, so the draws are atskern's up to its own near-tie caveat (two keys
equal to within an ulp, or a with-replacement target within an ulp of a CDF
step). Without it (JAX's default; this module never changes the setting)
they are float32: keys carry about one float32 ulp of error, so a row's draw
differs from atskern's where two of its smallest keys are within ~2e-7 of
each other (relatively); the README measures how often. With replacement the
running sums and targets are double-floats, within about 2**-46 of the row's
sum, so a draw differs only where a target lies that close to a CDF step. Each row is first
multiplied by a power of two that brings its largest weight into [1/2, 1)
(exact: the draws do not change), so any normal positive scale works
(float32 weights of 3e38 included); a weight below ~1e-37 of its row maximum
gets an infinite key and, if drawn (only in rows with fewer larger weights
than ``n``), comes in position order. XLA on the CPU flushes subnormal
numbers to zero, so a row whose weights are all subnormal reads as empty
there (``sample_indices`` refuses it when validating; ``path="kernel"``
samples it exactly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from . import _double, _rng


def unravel(flat, grid) -> jnp.ndarray:
    """Row-major grid coordinates ``(..., D)`` int32 of flat indices, by division and remainder (rule R4)."""
    coords = []
    for size in reversed(grid):
        coords.append(flat % size)
        flat = flat // size
    return jnp.stack(coords[::-1], axis=-1).astype(jnp.int32)


def ravel(indices, grid) -> jnp.ndarray:
    """Flat row-major index of ``(..., D)`` grid coordinates."""
    flat = indices[..., 0].astype(jnp.int32)
    for d in range(1, len(grid)):
        flat = flat * grid[d] + indices[..., d].astype(jnp.int32)
    return flat


def weights(attention, logits: bool, dtype):
    """``(B, N)`` non-negative weights in ``dtype``: the attention, or ``exp(l - max_row(l))`` of logits."""
    flat = attention.reshape(attention.shape[0], -1).astype(dtype)
    if not logits:
        return flat
    top = jnp.max(flat, axis=1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0)
    return jnp.exp(flat - top)


def power_of_two_scaled(rows):
    """``rows`` ``(B, N)`` times ``2**-e``, ``e`` the exponent of each row's largest finite weight: exact (keys,
    sums and draws scale by a power of two), the largest weight in [1/2, 1), so a row's sum stays finite (3e38 +
    3e38 in float32) and no key overflows. Two normal factors: XLA's CPU flushes a subnormal one (``2**-128``,
    or ``1 / 3e38``) to zero."""
    top = jnp.max(jnp.where(jnp.isfinite(rows), rows, 0), axis=1, keepdims=True)
    exponent = lax.stop_gradient(jnp.frexp(top)[1]).astype(rows.dtype)
    half = jnp.floor(exponent / 2)
    return rows * jnp.exp2(-half) * jnp.exp2(half - exponent)


def _without_replacement(w, n: int, k0, k1, dtype):
    rows, size = w.shape
    hi, lo = _rng.position_words(rows, size, k0, k1)
    exponentials = _rng.exponentials(hi, lo, dtype)
    positive = w > 0
    keys = jnp.where(positive, exponentials / jnp.where(positive, w, 1), jnp.inf)
    return smallest(keys, n)


def smallest(keys, n: int):
    """Flat indices ``(B, n)`` of each row's ``n`` smallest ``(key, position)`` pairs, in increasing order.

    float32 keys go straight to ``lax.top_k``. XLA's CPU top-k of float64 is a
    full sort (about 50x slower), so float64 keys first pick ``m = 2n`` (at
    least ``n + 16``) candidates by their float32 rounding, then the exact
    order among those: rounding is monotone, so the float64 ``n`` smallest are
    among the candidates whenever the ``m``-th float32 key is above the
    ``n``-th. Rows where it is not (float32 ties, e.g. R1 fillers' infinite
    keys) take the full float64 top-k instead, so the result is always exact.
    """
    size = keys.shape[1]
    m = min(size, n + max(n, 16))
    if keys.dtype == jnp.float32 or m == size:
        return lax.top_k(-keys, n)[1]
    rounded = keys.astype(jnp.float32)
    candidates = lax.top_k(-rounded, m)[1]  # indices only: XLA's CPU top-k rewrite then applies
    coarse = jnp.take_along_axis(rounded, candidates, axis=1)
    separated = jnp.all(coarse[:, m - 1] > coarse[:, n - 1])

    def refine(_):
        exact = jnp.take_along_axis(keys, candidates, axis=1)
        return jnp.take_along_axis(candidates, lax.top_k(-exact, n)[1], axis=1)

    return lax.cond(separated, refine, lambda _: lax.top_k(-keys, n)[1], None)


def _searchsorted_rows(cdf, targets):
    return jax.vmap(lambda c, t: jnp.searchsorted(c, t, side="left"))(cdf, targets)


def _sum_tree(w):
    """The double-float sums of a complete binary tree over each row of ``w`` ``(B, N)``, zero-padded to ``P``, a
    power of two: ``(B, 2P)`` pairs, node ``j``'s children at ``2j`` and ``2j + 1``, the root at 1, cell ``i`` at
    ``P + i`` (entry 0 unused). Each sum adds two children, so it is within about ``2**-48 log2(P)`` of exact."""
    rows, size = w.shape
    width = 1 << (size - 1).bit_length()
    level = (jnp.pad(w, ((0, 0), (0, width - size))), jnp.zeros((rows, width), w.dtype))
    levels = [level]
    while level[0].shape[1] > 1:
        level = _double.add(tuple(part[:, 0::2] for part in level), tuple(part[:, 1::2] for part in level))
        levels.append(level)
    return tuple(jnp.concatenate([jnp.zeros((rows, 1), w.dtype)] + [lv[k] for lv in reversed(levels)], axis=1)
                 for k in range(2))


def _double_inverse_cdf(w, hi, lo):
    """Flat indices ``(B, n)`` of float32 ``w``'s draws whose uniforms have the words ``hi, lo``: the cell where the
    running sum first reaches ``u * total``, by descending :func:`_sum_tree` (left while the left sum reaches the
    rest of the target), all in double-floats (:mod:`._double`), whose steps are as fine as a float64 sum's where
    a float32 one's (its ulp) exceed small cells. A subtree of sum 0 is never entered, so where rounding leaves a
    target just past a cell's step or the row's total, the draw is the next or the last positive cell."""
    tree = _sum_tree(w)
    rows, depth = w.shape[0], (w.shape[1] - 1).bit_length()
    target = _double.multiply(_double.uniforms(hi, lo), (tree[0][:, 1:2], tree[1][:, 1:2]))
    row = jnp.arange(rows)[:, None]

    def step(_, state):
        node, rest = state
        left = (tree[0][row, 2 * node], tree[1][row, 2 * node])
        go_left = (left[0] > 0) & (_double.reaches(left, rest) | ~(tree[0][row, 2 * node + 1] > 0))
        rest = tuple(jnp.where(go_left, r, d) for r, d in zip(rest, _double.subtract(rest, left)))
        return 2 * node + jnp.where(go_left, 0, 1), rest

    node = lax.fori_loop(0, depth, step, (jnp.ones(hi.shape, jnp.int32), target))[0]
    return jnp.minimum(node - (1 << depth), w.shape[1] - 1)


def _with_replacement(w, n: int, k0, k1, dtype):
    rows, size = w.shape
    hi, lo = _rng.replacement_words(rows, n, k0, k1)
    if jnp.dtype(dtype) == jnp.float32:
        return _double_inverse_cdf(w, hi, lo)
    cdf = jnp.cumsum(w, axis=1)
    flat = _searchsorted_rows(cdf, _rng.uniforms(hi, lo, dtype) * cdf[:, -1:])
    # a parallel prefix sum need not be flat across zero weights: move to the next positive cell
    position = jnp.arange(size, dtype=jnp.int32)
    positive = w > 0
    next_positive = lax.cummin(jnp.where(positive, position, size), axis=1, reverse=True)
    last_positive = jnp.max(jnp.where(positive, position, -1), axis=1, keepdims=True)
    moved = jnp.take_along_axis(next_positive, jnp.clip(flat, 0, size - 1), axis=1)
    return jnp.where((flat < size) & (moved < size), moved, last_positive).astype(jnp.int32)


def draw(attention, n: int, k0, k1, *, replace: bool, logits: bool):
    """Flat indices ``(B, n)`` int32 and the compute-precision weights ``(B, N)`` of a draw (no checks)."""
    dtype = _rng.compute_dtype()
    w = power_of_two_scaled(weights(attention, logits, dtype))
    if replace:
        return _with_replacement(w, n, k0, k1, dtype), w
    return _without_replacement(w, n, k0, k1, dtype), w


def probabilities(w, flat, out_dtype):
    """Each drawn cell's probability under its row (``w`` summed in compute precision), cast to ``out_dtype`` (R2)."""
    total = jnp.sum(w, axis=1, keepdims=True)
    return (jnp.take_along_axis(w, flat, axis=1) / total).astype(out_dtype)


def top_cells(attention, n: int):
    """The ``n`` largest cells of each row, largest first (ties: lower index first), flat int32."""
    flat = attention.reshape(attention.shape[0], -1)
    flat = jnp.where(flat == 0, jnp.zeros_like(flat), flat)  # -0.0 ties +0.0 (XLA's top-k orders -0.0 below it)
    return lax.top_k(flat, n)[1].astype(jnp.int32)
