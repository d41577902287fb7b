"""XLA-native TensorFlow ops: atskern's sampling, patch gather/scatter and estimator, in plain TF ops.

Unlike :mod:`ats.ops` (which calls atskern's kernels through
``tf.numpy_function``), everything here is TensorFlow graph ops, so it runs
eagerly, in ``tf.function`` and under ``tf.function(jit_compile=True)`` on
any device. The draws equal atskern's for the same seed: Philox4x32-10 in
``tf.uint32`` operations (``ats._xla_philox``), keys and sums in float64 (TF
always has it), ``tf.math.top_k`` (ties to the lower index, as atskern); they
can differ only where atskern's own near-tie caveat applies (a key or a CDF
step equal to within float64 rounding, since XLA may sum in another order).

Rules R1-R3: without replacement, a row with fewer positive weights than
``n`` is completed with its lowest-index zero-weight cells (probability 0);
``probs`` are float64 probabilities cast to the attention's dtype; the
estimator gives ``probs == 0`` entries weight 0 and gradient 0. Value checks
(NaN, inf, negative weights, empty rows, ``probs`` range) run when called
eagerly; inside ``tf.function`` only shapes and arguments are checked. A
batch size that differs between ``offsets`` and the images (or ``features``
and ``probs``) is a ValueError where both are static; known only at run
time, it fails the reshape of one to the other's batch (XLA drops
assertions), never reading another image's pixels or broadcasting a batch of 1.
"""

from __future__ import annotations

import numbers

import numpy as np

from .._requires import require

require("tensorflow", "ats.tf.xla")
# ruff: noqa: E402

import tensorflow as tf

from atskern import _validation

from .. import _xla_common as common
from .. import _xla_philox as px

OPS = px.UInt32Ops(
    const=lambda value: tf.constant(value, tf.uint32),
    add=tf.math.add,
    mul=tf.math.multiply,
    xor=tf.bitwise.bitwise_xor,
    band=tf.bitwise.bitwise_and,
    shr=lambda a, bits: tf.bitwise.right_shift(a, tf.constant(bits, tf.uint32)),
)

TWO_POW_M53 = 2.0**-53


def _eager(*tensors) -> bool:
    return tf.executing_eagerly() and all(hasattr(t, "numpy") for t in tensors)


def _tensor(value, name: str):
    if isinstance(value, (tf.Tensor, tf.Variable, np.ndarray)):
        return tf.convert_to_tensor(value)
    raise TypeError(f"{name} must be a TensorFlow tensor or a NumPy array, got {type(value).__name__}")


def int32_saturated(values):
    """An integer tensor cast to int32 with saturation (``common.int32_clamps``), not wrapping."""
    low, high = common.int32_clamps(values.dtype.as_numpy_dtype)
    if high is not None:
        values = tf.minimum(values, tf.constant(high, values.dtype))
    if low is not None:
        values = tf.maximum(values, tf.constant(low, values.dtype))
    return tf.cast(values, tf.int32)


# --- the generator ----------------------------------------------------------------------------


def seed_words(seed):
    """Philox key ``(k0, k1)`` uint32 scalars of an int seed in ``[0, 2**64)`` or a uint32 tensor ``[k0, k1]``."""
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seed = int(seed)
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed}")
        return tf.constant(seed & 0xFFFFFFFF, tf.uint32), tf.constant(seed >> 32, tf.uint32)
    if isinstance(seed, (tf.Tensor, tf.Variable)) and seed.dtype == tf.uint32 and tuple(seed.shape) == (2,):
        return seed[0], seed[1]
    raise TypeError(f"seed must be an int in [0, 2**64) or a uint32 tensor [k0, k1], got {seed!r}")


def _blocks(rows, count: int, stream: int, k0, k1):
    """``(rows, count, 4)`` uint32 words of blocks ``0..count-1`` of each row."""
    q = tf.broadcast_to(tf.cast(tf.range(count), tf.uint32)[None, :], [rows, count])
    row = tf.broadcast_to(tf.cast(tf.range(rows), tf.uint32)[:, None], [rows, count])
    return tf.stack(px.block_words(OPS, q, row, stream, k0, k1), axis=-1)


def _uniform64(hi, lo):
    """``(((hi << 21) | (lo >> 11)) + 1) 2**-53`` in float64 (every step exact)."""
    low = tf.cast(tf.bitwise.right_shift(lo, tf.constant(11, tf.uint32)), tf.float64)
    return (tf.cast(hi, tf.float64) * 2.0**21 + low + 1.0) * TWO_POW_M53


def position_uniforms(rows, size: int, k0, k1):
    """``(rows, size)`` float64 uniforms of positions (sampling without replacement: HI and LO streams)."""
    count = -(-size // 4)
    hi = tf.reshape(_blocks(rows, count, px.STREAM_HI, k0, k1), [rows, 4 * count])[:, :size]
    lo = tf.reshape(_blocks(rows, count, px.STREAM_LO, k0, k1), [rows, 4 * count])[:, :size]
    return _uniform64(hi, lo)


def replacement_uniforms(rows, n: int, k0, k1):
    """``(rows, n)`` float64 uniforms of draws (sampling with replacement)."""
    count = -(-n // 2)
    words = tf.reshape(_blocks(rows, count, px.STREAM_REPLACE, k0, k1), [rows, 2 * count, 2])[:, :n]
    return _uniform64(words[..., 0], words[..., 1])


# --- sampling ---------------------------------------------------------------------------------


def _unravel(flat, grid):
    coords = []
    for size in reversed(grid):
        coords.append(flat % size)
        flat = flat // size
    return tf.cast(tf.stack(coords[::-1], axis=-1), tf.int32)


def _ravel(indices, grid):
    flat = tf.cast(indices[..., 0], tf.int32)
    for d in range(1, len(grid)):
        flat = flat * grid[d] + tf.cast(indices[..., d], tf.int32)
    return flat


def top_positions(rows, n: int):
    """int32 positions of each row's ``n`` largest entries, largest first, ties to the lower position; -0.0 ties
    +0.0 (XLA's top-k orders it below)."""
    return tf.math.top_k(tf.where(rows == 0, tf.zeros_like(rows), rows), n, sorted=True).indices


def _power_of_two(exponent):
    """``2.0 ** exponent`` for int64 ``exponent`` in [-1022, 1023], built from its bits: exact on every device."""
    return tf.bitcast(tf.bitwise.left_shift(exponent + 1023, tf.constant(52, tf.int64)), tf.float64)


def power_of_two_factors(rows):
    """A float64 ``(B, 1)`` factor and divisor whose quotient is ``2**-e``, ``e`` the exponent of each row's largest
    finite weight in float64 ``rows`` ``(B, N)`` (as ``frexp`` gives it), read from its bits (TensorFlow has no
    ``frexp``): scale with :func:`apply_power_of_two`. Both are normal numbers (``2**-1024`` alone is subnormal,
    which XLA's CPU flushes to zero)."""
    top = tf.reduce_max(tf.where(tf.math.is_finite(rows), rows, tf.zeros_like(rows)), axis=1, keepdims=True)
    biased = tf.bitwise.bitwise_and(tf.bitwise.right_shift(tf.bitcast(top, tf.int64), tf.constant(52, tf.int64)),
                                    tf.constant(0x7FF, tf.int64))
    exponent = tf.where((top > 0) & (biased > 0), biased - 1022, tf.zeros_like(biased))
    half = tf.math.floordiv(exponent, tf.constant(2, tf.int64))
    return _power_of_two(-half), _power_of_two(exponent - half)


def apply_power_of_two(x, factor, divisor):
    """``x * factor / divisor`` (float64; the pair of :func:`power_of_two_factors`): a product and a quotient. Two
    products, ``x * a * b``, Grappler's arithmetic optimizer regroups as ``x * (a * b)`` in a plain ``tf.function``,
    and ``a * b = 2**-1024`` is subnormal, which TensorFlow flushes to zero (rows near 1e308 then drew in position
    order with NaN probabilities)."""
    return x * factor / divisor


def power_of_two_scaled(rows):
    """float64 ``rows`` ``(B, N)`` times ``2**-e`` (:func:`power_of_two_factors`): exact (keys, sums and draws scale
    by a power of two), the largest weight in [1/2, 1), so a row of weights near 1e308 sums to a finite number and
    no key ``-log(u) / w`` of a weight near 1e-300 overflows."""
    return apply_power_of_two(rows, *power_of_two_factors(rows))


def _weights(attention, logits: bool):
    size = int(np.prod(attention.shape[1:]))  # static (grid_of): the rows' length stays known with a None batch
    flat = tf.cast(tf.reshape(attention, [-1, size]), tf.float64)
    if not logits:
        return power_of_two_scaled(flat)
    top = tf.reduce_max(flat, axis=1, keepdims=True)
    top = tf.where(tf.math.is_finite(top), top, tf.zeros_like(top))
    return tf.exp(flat - top)


def _without_replacement(w, n: int, k0, k1):
    rows, size = tf.shape(w)[0], w.shape[1]
    u = position_uniforms(rows, size, k0, k1)
    positive = w > 0
    keys = tf.where(positive, -tf.math.log(u) / tf.where(positive, w, tf.ones_like(w)), tf.constant(np.inf, tf.float64))
    return _smallest(keys, n)


def _smallest(keys, n: int):
    """Flat indices of each row's ``n`` smallest ``(key, position)``, exactly, with a float32 top-k first
    (XLA's float64 top-k is a full sort): see ``ats.jax._sampling.smallest`` for why this is exact."""
    size = keys.shape[1]
    m = min(size, n + max(n, 16))
    if m == size:
        return tf.math.top_k(-keys, n).indices
    rounded = tf.cast(keys, tf.float32)
    candidates = tf.math.top_k(-rounded, m).indices  # indices only: XLA's CPU top-k rewrite then applies
    coarse = tf.gather(rounded, candidates, batch_dims=1)
    separated = tf.reduce_all(coarse[:, m - 1] > coarse[:, n - 1])

    def refine():
        exact = tf.gather(keys, candidates, batch_dims=1)
        return tf.gather(candidates, tf.math.top_k(-exact, n).indices, batch_dims=1)

    return tf.cond(separated, refine, lambda: tf.math.top_k(-keys, n).indices)


def _with_replacement(w, n: int, k0, k1):
    rows, size = tf.shape(w)[0], w.shape[1]
    cdf = tf.math.cumsum(w, axis=1)
    targets = replacement_uniforms(rows, n, k0, k1) * cdf[:, -1:]
    flat = tf.searchsorted(cdf, targets, side="left", out_type=tf.int32)
    # a zero-weight cell is never drawn, whatever order XLA sums in: move to the first positive cell
    # at or after the found one (exact integer counts), or to the row's last positive cell
    positive = tf.cast(w > 0, tf.int32)
    counts = tf.math.cumsum(positive, axis=1)
    before = tf.gather(counts - positive, tf.minimum(flat, size - 1), batch_dims=1)
    moved = tf.searchsorted(counts, before + 1, side="left", out_type=tf.int32)
    last = tf.searchsorted(counts, counts[:, -1:], side="left", out_type=tf.int32)
    return tf.where(moved < size, moved, last)


def sample_indices(attention, n_samples, seed, *, replace=False, logits=False, strict=False):
    """atskern's draw in TensorFlow ops: ``(indices, probs)`` equal to ``atskern.sample(attention, n, seed=seed)``.

    ``attention`` ``(B, *grid)`` (1-3 grid dims, floating) holds non-negative
    weights or, with ``logits=True``, log-weights. ``seed`` is an int in
    ``[0, 2**64)`` or a uint32 tensor ``[seed % 2**32, seed // 2**32]`` (may be
    a variable, so a compiled step can draw anew each call). Returns int32
    ``indices`` ``(B, n, D)`` in draw order and ``probs`` ``(B, n)`` in the
    attention's dtype (0 for R1 fillers), with no gradient (:func:`sample`'s
    sampled attention has one). ``strict=True`` makes short rows an error
    (checked eagerly only).
    """
    attention = _tensor(attention, "attention")
    n = common.positive_int(n_samples, "n_samples")
    replace = common.boolean(replace, "replace")
    logits = common.boolean(logits, "logits")
    strict = common.boolean(strict, "strict")
    grid = common.grid_of(attention.shape, attention.dtype.is_floating, n, not replace)
    k0, k1 = seed_words(seed)
    if _eager(attention):
        values = attention.numpy()
        common.attention_values(values, n, replace, logits, strict)
        if not logits and attention.dtype in (tf.float32, tf.float64):  # 16-bit subnormals are normal in float64
            common.refuse_subnormal_rows(values, values.dtype, "TensorFlow", "rescale the row (or use atskern.sample "
                                         "or ats.ops outside XLA, exact for any positive scale)")
    w = _weights(tf.stop_gradient(attention), logits)
    flat = _with_replacement(w, n, k0, k1) if replace else _without_replacement(w, n, k0, k1)
    probs = tf.gather(w, flat, batch_dims=1) / tf.reduce_sum(w, axis=1, keepdims=True)
    return _unravel(flat, grid), tf.cast(probs, attention.dtype)


def sample(attention, n_samples, seed=None, *, replace=False, deterministic=False):
    """``(indices, sampled_attention)``: the draw and each drawn cell's weight over its row's sum,
    a differentiable gather of ``attention`` (computed in float64, cast back). ``deterministic=True``
    takes the ``n_samples`` largest weights (no seed needed)."""
    attention = _tensor(attention, "attention")
    n = common.positive_int(n_samples, "n_samples")
    replace = common.boolean(replace, "replace")
    deterministic = common.boolean(deterministic, "deterministic")
    grid = common.grid_of(attention.shape, attention.dtype.is_floating, n, not replace or deterministic)
    rows = tf.reshape(attention, [tf.shape(attention)[0], -1])
    if deterministic:
        if _eager(attention):  # as sampling's (in a graph, values are not checked)
            common.attention_values(attention.numpy(), n, False, False, False)
        flat = top_positions(tf.stop_gradient(rows), n)
        indices = _unravel(flat, grid)
    else:
        if seed is None:
            raise TypeError("seed is required to sample (an int or a uint32 tensor [k0, k1])")
        indices, _ = sample_indices(attention, n, seed, replace=replace)
        flat = _ravel(indices, grid)
    rows64 = power_of_two_scaled(tf.cast(rows, tf.float64))
    sampled = tf.gather(rows64, flat, batch_dims=1) / tf.reduce_sum(rows64, axis=1, keepdims=True)
    return indices, tf.cast(sampled, attention.dtype)


# --- patches ----------------------------------------------------------------------------------


def patch_offsets(samples, grid_shape, level_shape, patch_size, *, margin=0.0):
    """int32 first pixel of the patch around each sampled cell (exact, rule R5; see ``ats.jax.patch_offsets``)."""
    samples = _tensor(samples, "samples")
    if not samples.dtype.is_integer:
        raise TypeError(f"samples must be integer grid cells, got {samples.dtype.name}")
    dims = samples.shape[-1]
    grid = common.size_tuple(grid_shape, dims, "grid_shape")
    level = common.size_tuple(level_shape, dims, "level_shape")
    patch = common.size_tuple(patch_size, dims, "patch_size")
    margins = common.margins(margin, dims)
    columns = []
    for d in range(dims):
        table = tf.constant(common.offset_table(grid[d], level[d], patch[d], margins[d]))
        cells = tf.clip_by_value(int32_saturated(samples[..., d]), 0, grid[d] - 1)
        columns.append(tf.gather(table, cells))
    return tf.stack(columns, axis=-1)


def _same_batch(offsets, images, what: str):
    """A ValueError where the static batch sizes of ``offsets`` and ``images`` (tensors) differ."""
    b, batch = offsets.shape[0], images.shape[0]
    if b is not None and batch is not None and b != batch:
        raise ValueError(f"offsets has batch size {b} (shape {tuple(offsets.shape)}) but {what} has batch size {batch}")


def _index_grid(offsets, patch, spatial, channels, channels_first: bool, image_batch):
    """Full gather indices ``(B, K, [C,] *P, [C,] rank)`` into the image (clipped) and the inside mask.

    The batch indices are the image's ``tf.range(image_batch)`` reshaped to the offsets' batch: where the two
    differ at run time the reshape fails (XLA drops assertions, and its gather would clip the batch index)."""
    ndim = len(spatial)
    batch, count = tf.shape(offsets)[0], tf.shape(offsets)[1]
    rank = 2 + ndim + 1
    channel_axis = 2 if channels_first else rank - 1
    first_patch_axis = 3 if channels_first else 2
    out_shape = [batch, count] + [0] * (rank - 2)
    out_shape[channel_axis] = channels
    for d in range(ndim):
        out_shape[first_patch_axis + d] = patch[d]

    b_index = tf.reshape(tf.range(image_batch, dtype=tf.int32), [batch] + [1] * (rank - 1))
    c_shape = [1] * rank
    c_shape[channel_axis] = channels
    c_index = tf.reshape(tf.range(channels, dtype=tf.int32), c_shape)
    positions, inside = [], None
    for d in range(ndim):
        start = tf.clip_by_value(int32_saturated(offsets[:, :, d]), -patch[d], spatial[d])
        shape = [batch, count] + [1] * (rank - 2)
        shape[first_patch_axis + d] = patch[d]
        pos = tf.reshape(start[:, :, None] + tf.range(patch[d], dtype=tf.int32), shape)
        ok = (pos >= 0) & (pos < spatial[d])
        inside = ok if inside is None else inside & ok
        positions.append(tf.clip_by_value(pos, 0, spatial[d] - 1))
    parts = [b_index, c_index, *positions] if channels_first else [b_index, *positions, c_index]
    index = tf.stack([tf.broadcast_to(p, out_shape) for p in parts], axis=-1)
    return index, tf.broadcast_to(inside, out_shape)


def _geometry(shape, channels_first: bool):
    shape = tuple(shape)
    if len(shape) not in (3, 4, 5):
        raise ValueError(f"x must have 1 to 3 spatial dimensions (rank 3 to 5), got shape {shape}")
    if channels_first:
        return tuple(int(s) for s in shape[2:]), int(shape[1])
    return tuple(int(s) for s in shape[1:-1]), int(shape[-1])


def _scatter(grad, offsets, spatial, channels_first: bool):
    patch = tuple(int(s) for s in (grad.shape[3:] if channels_first else grad.shape[2:-1]))
    channels = int(grad.shape[2] if channels_first else grad.shape[-1])
    dtype = tf.float32 if grad.dtype.size < 4 else grad.dtype
    batch = tf.shape(grad)[0]
    index, inside = _index_grid(offsets, patch, spatial, channels, channels_first, batch)
    image = [batch, channels, *spatial] if channels_first else [batch, *spatial, channels]
    values = tf.where(inside, tf.cast(grad, dtype), tf.zeros([], dtype))
    return tf.tensor_scatter_nd_add(tf.zeros(image, dtype), index, values)


def scatter_patches(grad, offsets, spatial_shape, *, channels_first=False):
    """The exact adjoint of :func:`extract_patches`: patches added at their offsets into zeros
    (``tf.tensor_scatter_nd_add``), parts outside dropped; float32 for 16-bit gradients."""
    grad = _tensor(grad, "grad")
    offsets = _tensor(offsets, "offsets")
    spatial = common.size_tuple(tuple(spatial_shape), offsets.shape[-1], "spatial_shape")
    if not grad.dtype.is_floating:
        raise TypeError(f"grad must be floating, got {grad.dtype.name}")
    _same_batch(offsets, grad, "grad")
    return _scatter(grad, offsets, spatial, common.boolean(channels_first, "channels_first"))


def extract_patches(x, offsets, patch_size, *, fill=0, channels_first=False):
    """One patch per offset, ``(B, K, *P, C)`` (or ``(B, K, C, *P)``), ``fill`` outside ``x``; one
    ``tf.gather_nd`` with clipped indices and a mask. For floating ``x`` the gradient is
    :func:`scatter_patches` (``tf.custom_gradient``)."""
    x = _tensor(x, "x")
    offsets = _tensor(offsets, "offsets")
    channels_first = common.boolean(channels_first, "channels_first")
    spatial, channels = _geometry(x.shape, channels_first)
    if len(offsets.shape) != 3 or offsets.shape[2] != len(spatial):
        raise ValueError(f"offsets must be (batch, K, {len(spatial)}) for x of shape {tuple(x.shape)}, got {tuple(offsets.shape)}")
    if not offsets.dtype.is_integer:
        raise TypeError(f"offsets must be an integer tensor, got {offsets.dtype.name}")
    fill = common.checked_fill(fill, x.dtype.as_numpy_dtype)
    patch = common.size_tuple(patch_size, len(spatial), "patch_size")
    _same_batch(offsets, x, "x")

    def gather(image):
        index, inside = _index_grid(offsets, patch, spatial, channels, channels_first, tf.shape(image)[0])
        return tf.where(inside, tf.gather_nd(image, index), tf.cast(fill, image.dtype))

    if not x.dtype.is_floating:
        return gather(x)

    @tf.custom_gradient
    def differentiable(image):
        def grad_fn(upstream):
            return tf.cast(_scatter(upstream, offsets, spatial, channels_first), image.dtype)

        return gather(image), grad_fn

    return differentiable(x)


def extract_multiscale(levels, samples, grid_shape, patch_sizes, *, margin=0.0, fill=0, channels_first=False):
    """The patch around each sampled cell from every level of a pyramid (a list, one entry per level)."""
    levels = list(levels)
    if not isinstance(patch_sizes, (list, tuple)) or len(patch_sizes) != len(levels):
        raise ValueError(f"patch_sizes must hold one patch size per level ({len(levels)}), got {patch_sizes!r}")
    out = []
    for i, (x, size) in enumerate(zip(levels, patch_sizes)):
        x = _tensor(x, f"levels[{i}]")
        spatial, _ = _geometry(x.shape, channels_first)
        patch = common.size_tuple(size, len(spatial), f"patch_sizes[{i}]")
        offsets = patch_offsets(samples, grid_shape, spatial, patch, margin=margin)
        out.append(extract_patches(x, offsets, patch, fill=fill, channels_first=channels_first))
    return out


# --- the estimator ----------------------------------------------------------------------------


def mass_left(probs64, unit: float):
    """``pm_k`` per row, float64: ``1 - sum_{j<k} a_j``, or ``sum_{j>=k} a_j`` (the draws still to come, a lower
    bound) where that is lost in the rounding of the probabilities (``unit`` per entry;
    ``atskern.estimator._mass_left``)."""
    before = tf.math.cumsum(probs64, axis=1, exclusive=True)
    still_to_come = tf.math.cumsum(probs64, axis=1, reverse=True)
    left = 1.0 - before
    draws = tf.cast(tf.range(1, tf.shape(probs64)[1] + 1), tf.float64)
    noise = 2.0 * unit * before + draws * 2.0**-53
    return tf.where(left > noise, tf.maximum(left, still_to_come), still_to_come)


def _coefficients(probs, replace: bool):
    """Feature coefficients ``c`` and attention-gradient scales ``s`` ``(B, n)``, float64, 0 where probs == 0
    (R3); ``n`` may be known only at run time."""
    probs64 = tf.cast(probs, tf.float64)
    n = tf.cast(tf.shape(probs64)[1], tf.float64)
    filler = probs64 == 0
    safe = tf.where(filler, tf.ones_like(probs64), probs64)
    if replace:
        c = tf.ones_like(probs64) / n
        s = 1.0 / (n * safe)
    else:
        remaining = tf.range(n - 1.0, -1.0, -1.0, dtype=tf.float64)
        pm = mass_left(probs64, _validation.unit_roundoff(probs.dtype.as_numpy_dtype))
        c = (pm + remaining * probs64) / n
        s = (pm / safe + remaining) / n
    zero = tf.zeros_like(probs64)
    return tf.where(filler, zero, c), tf.where(filler, zero, s)


def _expand(weights, rank: int):
    return tf.reshape(weights, tf.concat([tf.shape(weights), tf.ones([rank - 2], tf.int32)], axis=0))


def expectation_grad(grad, features, probs, *, replace=False):
    """``(grad_probs, grad_features)``: exactly ``atskern.expectation_grad`` (float64 inside, rule R3)."""
    rank = len(features.shape)
    c, s = _coefficients(probs, replace)
    grad64 = tf.cast(grad, tf.float64)[:, None]
    grad_features = tf.cast(_expand(c, rank) * grad64, features.dtype)
    products = grad64 * tf.cast(features, tf.float64)
    inner = tf.reduce_sum(tf.reshape(products, [tf.shape(probs)[0], tf.shape(probs)[1], -1]), axis=2)
    return tf.cast(s * inner, probs.dtype), grad_features


def expectation(features, probs, *, replace=False):
    """The ATS estimate ``(B, *F)`` of ``features`` ``(B, n, *F)`` under ``probs`` ``(B, n)``, with the unbiased
    gradients of ``atskern.expectation_grad`` (``tf.custom_gradient``); ``probs == 0`` entries weigh 0 (R3)."""
    features = _tensor(features, "features")
    probs = _tensor(probs, "probs")
    replace = common.boolean(replace, "replace")
    if len(probs.shape) != 2:
        raise ValueError(f"probs must be (batch, n), got shape {tuple(probs.shape)}")
    if len(features.shape) < 2 or not features.shape[:2].is_compatible_with(probs.shape):
        raise ValueError(f"features must be (batch, n, ...) with probs' (batch, n) = {tuple(probs.shape)}, got "
                         f"{tuple(features.shape)}")
    if not features.dtype.is_floating or not probs.dtype.is_floating:
        raise TypeError(f"features and probs must be floating, got {features.dtype.name} and {probs.dtype.name}")
    if probs.shape[1] == 0:
        raise ValueError(f"probs must not be empty, got shape {tuple(probs.shape)}")
    if _eager(probs):
        common.probs_values(probs.numpy(), replace)
    rank = len(features.shape)

    @tf.custom_gradient
    def estimate(f, a):
        c, _ = _coefficients(a, replace)
        c = tf.reshape(c, tf.shape(f)[:2])  # a batch that differs at run time fails here, never broadcasts
        value = tf.cast(tf.reduce_sum(_expand(c, rank) * tf.cast(f, tf.float64), axis=1), f.dtype)

        def grad_fn(upstream):
            grad_probs, grad_features = expectation_grad(upstream, f, a, replace=replace)
            return grad_features, grad_probs

        return value, grad_fn

    return estimate(features, probs)
