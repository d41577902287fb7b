"""TensorFlow ops of attention sampling over the atskern kernels.

- :func:`sample` draws positions (atskern kernel) and gathers the
  differentiable sampled attention with ``tf.gather_nd``; ``deterministic=True``
  takes the top-k positions instead (plain TF, no kernel).
- :func:`extract_patches` gathers patches (atskern kernel) with a custom
  gradient that scatters them back (``atskern.scatter_patches``); the gradient
  runs only when one is needed for the image.
- :func:`patch_offsets` and :func:`extract_multiscale` map sampled cells of
  an attention grid to patches of one or several image levels.
- :func:`expectation` is the ATS estimator with its unbiased gradients, as
  plain TF ops (no Python callback).

All work eagerly, inside ``tf.function`` and inside XLA contexts
(``tf.function(jit_compile=True)``, ``model.compile(jit_compile=True)``):
where a kernel cannot run (``tf.numpy_function`` does not compile under
XLA), :func:`sample` and :func:`extract_patches` use the plain TensorFlow ops
of :mod:`ats.tf.xla` instead, which draw the same positions for the same seed
(atskern's generator in TF ops) and gather the same patches. An unseeded
draw under XLA takes its key from TensorFlow's stateful random op.
:class:`XLAUnsupportedError` stays importable (old code catches it); the
ops no longer raise it. Second derivatives are not supported.
"""

from __future__ import annotations

import numbers

import numpy as np

from .._requires import require

require("tensorflow", "ats.ops")
# ruff: noqa: E402

import ml_dtypes
import tensorflow as tf

from atskern import _offsets, _validation

from .. import _distributed, _errors, _kernels, _xla_common
from .._bridge import XLAUnsupportedError, in_xla_context, numpy_call

__all__ = [
    "sample",
    "patch_offsets",
    "extract_patches",
    "extract_multiscale",
    "expectation",
    "XLAUnsupportedError",
]

_KERNEL_FLOATS = (tf.float32, tf.float64)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# one size check for every front end (atskern's): a single int for every dim, or one positive int per dim
_size_tuple = _validation.check_patch_size


_MASK32 = 0xFFFFFFFF


def _seed_tensor(seed):
    """The seed as an int64 scalar tensor (bits of a uint64), or None."""
    if seed is None:
        return None
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        if not 0 <= int(seed) < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        return tf.constant(np.array(int(seed), dtype=np.uint64).view(np.int64))
    seed = tf.convert_to_tensor(seed)
    if seed.dtype == tf.uint32 and seed.shape.as_list() == [2]:  # Philox key words [k0, k1]
        words = tf.cast(seed, tf.uint64)
        bits = tf.bitwise.bitwise_or(words[0], tf.bitwise.left_shift(words[1], tf.constant(32, tf.uint64)))
        return tf.bitcast(bits, tf.int64)
    if not seed.dtype.is_integer or seed.shape.rank != 0:
        raise TypeError(f"seed must be None, an int, an integer scalar tensor or uint32 key words [k0, k1], got {seed!r}")
    if seed.dtype == tf.uint64:
        return tf.bitcast(seed, tf.int64)
    return tf.cast(seed, tf.int64)


def _xla_seed(seed):
    """The seed as ``ats.tf.xla``'s key: an int, or uint32 words ``[k0, k1]`` (a fresh random key for None)."""
    if seed is None:
        # TensorFlow's stateful RNG (compiles under XLA): a new key on every run of the step, salted with the
        # process's rank, since workers that call tf.random.set_seed with one value would draw the same keys
        words = tf.bitcast(tf.random.uniform([2], tf.int32.min, tf.int32.max, dtype=tf.int32), tf.uint32)
        salt = _distributed.salted_seed(0)
        if salt:
            words = tf.bitwise.bitwise_xor(words, tf.constant([salt & _MASK32, salt >> 32], tf.uint32))
        return words
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return int(seed)
    bits = _seed_tensor(seed)
    low = tf.bitwise.bitwise_and(bits, tf.constant(_MASK32, tf.int64))
    high = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, tf.constant(32, tf.int64)), tf.constant(_MASK32, tf.int64))
    return tf.cast(tf.stack([low, high]), tf.uint32)


def _xla():
    from ..tf import xla

    return xla


# --- sampling -----------------------------------------------------------------


def _check_attention(attention, n: int, replace: bool):
    rank = attention.shape.rank
    if rank not in (2, 3, 4):
        raise ValueError(
            "attention must be (batch, *grid) with 1 to 3 grid dimensions (rank 2 to 4), "
            f"got shape {attention.shape}"
        )
    if not attention.dtype.is_floating:
        raise TypeError(f"attention must be a floating tensor, got {attention.dtype.name}")
    grid = attention.shape[1:]
    if grid.is_fully_defined() and not replace:
        positions = int(np.prod(grid.as_list()))
        if n > positions:
            raise ValueError(
                f"n_samples={n} is larger than the {positions} positions of the attention grid "
                f"{tuple(grid.as_list())}; sampling without replacement cannot draw more (use replace=True)"
            )
    return rank - 1


def _draw_indices(attention, n: int, replace: bool, seed, strict: bool = False):
    """int32 ``(B, n, D)`` indices from the atskern sampling kernel."""
    if attention.dtype not in _KERNEL_FLOATS:
        attention = tf.cast(attention, tf.float32)
    seed = _seed_tensor(seed)

    def draw(weights, *seed_bits):
        key = int(seed_bits[0]) % 2**64 if seed_bits else None
        if weights.shape[0] == 0:  # a replica's share of a short last batch (tf.distribute); atskern refuses it
            return np.empty((0, n, weights.ndim - 1), np.int32)
        try:
            indices, _ = _kernels.sample(weights, n, replace=replace, seed=key, strict=strict)
        except ValueError as error:
            raise _errors.sampling_error(error) from None
        return indices

    inputs = [attention] if seed is None else [attention, seed]
    return numpy_call(draw, inputs, tf.int32, name="ats.ops.sample", stateful=seed is None)


def _top_indices(flat, grid_shape, n: int):
    """int32 ``(B, n, D)`` indices of the ``n`` largest weights of each row, largest first."""
    flat_index = _xla().top_positions(flat, n)
    grid_shape = tf.cast(grid_shape, tf.int32)
    # row-major strides; tf.unravel_index has no XLA kernel
    strides = tf.math.cumprod(grid_shape, exclusive=True, reverse=True)
    return (flat_index[..., None] // strides) % grid_shape


def sample(attention, n_samples, *, replace=False, seed=None, deterministic=False, strict=False):
    """Sample ``n_samples`` positions per row of an attention map.

    Parameters
    ----------
    attention : tensor ``(B, *grid)``, 1 to 3 grid dimensions, floating
        Non-negative weights (a distribution per row, e.g. from
        ``SampleSoftmax``; rows need not sum exactly to 1).
    n_samples : int
    replace : bool
        Draw with replacement (independent draws) or without (successive
        sampling, the default of the 2019 library).
    seed : None, int in [0, 2**64), an integer scalar tensor or uint32 words ``[k0, k1]``
        Key of atskern's counter-based generator: the same seed and weights
        give the same draws (also under XLA, where :mod:`ats.tf.xla` draws
        them; the key words ``[k0, k1]`` are the seed ``k0 + 2**32 k1``).
        None draws a fresh key per call.
    deterministic : bool
        Take the ``n_samples`` largest weights (largest first) instead of
        sampling: reproducible inference; runs under XLA.
    strict : bool
        Without replacement, a row with fewer than ``n_samples`` positive
        weights (e.g. a float32 softmax that underflowed) is drawn as all its
        positive cells followed by zero-probability fillers (estimator weight
        exactly 0; DESIGN.md R1). ``strict=True`` raises instead.

    Returns
    -------
    indices : int32 ``(B, n_samples, D)``
        Grid coordinates in draw order (no gradient).
    sampled_attention : ``(B, n_samples)``, attention's dtype
        The normalized weight of each drawn position, gathered from
        ``attention`` with ``tf.gather_nd`` so gradients flow to it.
    """
    attention = tf.convert_to_tensor(attention)
    n = _positive_int(n_samples, "n_samples")
    replace = _validation.require_bool(replace, "replace")
    deterministic = _validation.require_bool(deterministic, "deterministic")
    strict = _validation.require_bool(strict, "strict")
    dims = _check_attention(attention, n, bool(replace and not deterministic))
    if not (replace and not deterministic) and not attention.shape[1:].is_fully_defined():
        check = tf.debugging.assert_greater_equal(
            tf.reduce_prod(tf.shape(attention)[1:]),
            n,
            message=f"n_samples={n} is larger than the number of attention positions; "
            "sampling without replacement (or top-k) cannot draw more (use replace=True or a larger map)",
        )
        with tf.control_dependencies([check]):
            attention = tf.identity(attention)
    batch = tf.shape(attention)[0]
    flat = tf.reshape(attention, (batch, -1))
    if deterministic:
        flat = _checked_rows(flat, n, bool(strict))
        indices = _top_indices(flat, tf.shape(attention)[1:], n)
    elif in_xla_context():
        if not attention.shape[1:].is_fully_defined():
            raise ValueError(f"attention's grid must be static to sample under XLA (jit_compile=True), got shape {attention.shape}")
        if strict:
            raise ValueError("strict=True is not available under XLA (the rows' values are not known when tracing)")
        sampling = attention if attention.dtype in _KERNEL_FLOATS else tf.cast(attention, tf.float32)
        indices, _ = _xla().sample_indices(sampling, n, _xla_seed(seed), replace=bool(replace))
    else:
        indices = _draw_indices(attention, n, bool(replace), seed, bool(strict))
    indices.set_shape((attention.shape[0], n, dims))
    sampled = _row_shares(flat, tf.gather_nd(attention, indices, batch_dims=1))
    sampled.set_shape((attention.shape[0], n))
    return indices, sampled


def _row_shares(flat, gathered):
    """``gathered / sum(flat)`` per row in float64, cast back: a sum that overflows the attention's dtype
    (unnormalized float16 weights) gave 0. float64 rows are first scaled by ``2**-e`` (``e`` the exponent of the
    row's largest; it cancels: ``ats.tf.xla.power_of_two_factors``), so that rows near 1e308 sum to a finite number
    and tiny ones stay normal (TensorFlow flushes subnormals); narrower weights need no scaling (their float64 sum
    cannot overflow, nor any of them be subnormal in float64), and a power-of-two scaling would not change a bit
    of the result: two passes over the map instead of eight."""
    if flat.dtype != tf.float64:
        return tf.cast(tf.cast(gathered, tf.float64) / tf.reduce_sum(tf.cast(flat, tf.float64), axis=1, keepdims=True),
                       flat.dtype)
    xla = _xla()
    factor, divisor = xla.power_of_two_factors(tf.stop_gradient(tf.cast(flat, tf.float64)))

    def scaled(x):
        return xla.apply_power_of_two(tf.cast(x, tf.float64), factor, divisor)

    total = tf.reduce_sum(scaled(flat), axis=1, keepdims=True)
    return tf.cast(scaled(gathered) / total, flat.dtype)


def _checked_rows(flat, n: int, strict: bool):
    """Top-k mode's row checks, as sampling's: eagerly a ValueError naming the first bad row (NaN/inf, negative
    weights, no positive weight; with ``strict``, fewer than ``n`` positive), in a graph an assertion."""
    if tf.executing_eagerly():
        if not flat.shape[0]:  # an empty batch has no bad row
            return flat
        try:
            _xla_common.attention_values(flat.numpy(), n, False, False, strict)
        except ValueError as error:
            raise _errors.sampling_error(error) from None
        return flat
    finite = tf.reduce_all(tf.math.is_finite(flat))
    non_negative = tf.reduce_all(flat >= 0)
    positive = tf.reduce_min(tf.reduce_sum(tf.cast(flat > 0, tf.int32), axis=1)) >= (n if strict else 1)
    check = tf.debugging.Assert(finite & non_negative & positive, [
        "attention rows must be finite and >= 0 with a positive weight (and, strict, n_samples of them)"])
    with tf.control_dependencies([check]):
        return tf.identity(flat)


# --- patches ------------------------------------------------------------------


def _per_dim(values, dims: int, name: str):
    """``dims`` int64 values of a shape given as ints or as an integer tensor (static ints where possible)."""
    if isinstance(values, (tf.Tensor, tf.Variable)):
        static = tf.get_static_value(values)
        if static is None:
            values = tf.cast(values, tf.int64)
            return [values[d] for d in range(dims)]
        values = static.tolist()
    if isinstance(values, (list, tuple)) and any(isinstance(v, (tf.Tensor, tf.Variable)) for v in values):
        values = [tf.get_static_value(v) if tf.get_static_value(v) is not None else tf.cast(v, tf.int64) for v in values]
        if len(values) != dims:
            raise ValueError(f"{name} must have {dims} entries (one per spatial dim), got {len(values)}")
        return [int(v) if not isinstance(v, tf.Tensor) else v for v in values]
    return list(_validation.check_shape(values, dims, name))


def _margin_terms(margin, dims: int):
    """Per-dim ``(num, den)`` of the margin fraction (ints, or int64 tensors for a dynamic low_shape),
    or None for a float margin tensor (then computed in float64, not exact at ties)."""
    if isinstance(margin, (tf.Tensor, tf.Variable)):
        return None
    if (isinstance(margin, (list, tuple)) and len(margin) == 2
            and (isinstance(margin[1], (tf.Tensor, tf.Variable)) or _validation._is_sequence(margin[1]))):
        receptive_field, low = margin
        if isinstance(receptive_field, (tf.Tensor, tf.Variable)):
            raise TypeError("margin's receptive_field must be a Python number (the layer's setting), got a tensor")
        low = _per_dim(low, dims, "margin's low_shape")
        if all(isinstance(v, int) for v in low):
            fractions = _validation.check_margin((receptive_field, low), dims)
            return [(f.numerator, f.denominator) for f in fractions]
        rf = _validation.simplest_fraction(_validation._real(receptive_field, "margin's receptive_field"))
        if rf < 0:
            raise ValueError(f"margin's receptive_field must be >= 0, got {receptive_field!r}")
        terms = []
        for v in low:  # a margin below 1/2 (receptive_field < low size), as the static path checks it
            den = rf.denominator * tf.cast(v, tf.int64)
            check = tf.debugging.assert_less(tf.constant(rf.numerator, tf.int64), den, message=(
                f"receptive_field={receptive_field} must be smaller than x_low's spatial sizes"))
            with tf.control_dependencies([check]):
                terms.append((rf.numerator, 2 * tf.identity(den)))
        return terms
    return [(f.numerator, f.denominator) for f in _validation.check_margin(margin, dims)]


def _float_offsets(cells, grid, level, size, margin):
    """The float64 formula, for a margin given as a float tensor (not exact at .5 ties)."""
    s = tf.cast(cells, tf.float64)
    m = tf.cast(margin, tf.float64)
    grid = tf.cast(tf.stack(grid), tf.float64)
    level = tf.cast(tf.stack(level), tf.float64)
    centre = level * (m + (s + 0.5) / grid * (1.0 - 2.0 * m))
    return tf.math.round(centre - tf.constant(size, tf.float64) / 2.0)


def _int64(mask):
    return tf.cast(mask, tf.int64)


def patch_offsets(samples, grid_shape, level_shape, patch_size, *, margin=0.0):
    """First pixel (int32 ``(B, K, D)``) of the patch around each sampled grid cell in one image level.

    A cell ``s`` of a grid of size ``G`` has its centre at
    ``c = L * (m + (s + 0.5) / G * (1 - 2 m))`` in a level of size ``L``; the
    patch starts at ``rint(c - P / 2)`` (half to even), computed in integer
    arithmetic exactly as ``atskern.patch_offsets`` (same margin forms: a
    number or ``fractions.Fraction``, one per dim, or the pair
    ``(receptive_field, low_shape)`` for ``receptive_field / 2 / low_shape[d]``;
    ``low_shape`` may be a tensor). ``grid_shape`` and ``level_shape`` may be
    integer tensors. A float *tensor* margin is computed in float64 instead
    (not exact at .5 ties).
    """
    samples = tf.convert_to_tensor(samples)
    dims = samples.shape[-1]
    if samples.shape.rank != 3 or dims is None:
        raise ValueError(f"samples must be (batch, K, D) with a known D, got shape {samples.shape}")
    if not samples.dtype.is_integer:
        raise TypeError(f"samples must be an integer tensor (grid cells), got {samples.dtype.name}")
    size = _validation.check_patch_size(patch_size, dims)
    grid = _per_dim(grid_shape, dims, "grid_shape")
    level = _per_dim(level_shape, dims, "level_shape")
    _validation.check_int32_offsets(level, size)
    limit = _offsets.SAMPLE_LIMIT
    if samples.dtype.max > limit:  # uint64 cells of 2**63 and more would wrap to negative ones
        samples = tf.minimum(samples, tf.constant(limit, samples.dtype))
    cells = tf.clip_by_value(tf.cast(samples, tf.int64), -limit, limit)
    terms = _margin_terms(margin, dims)
    if terms is None:
        start = _float_offsets(cells, grid, level, size, margin)
    else:
        columns = []
        for d, (num, den) in enumerate(terms):
            args = (grid[d], level[d], size[d], num, den)
            if all(isinstance(v, int) for v in args) and not _offsets.fits_int64(*args):
                raise ValueError(f"patch_offsets: grid_shape, level_shape, patch_size and margin of dim {d} are too "
                                 f"large for exact int64 arithmetic ({args}); use atskern.patch_offsets")
            columns.append(_offsets.start(cells[..., d], *args, to_int=_int64))
        start = tf.stack(columns, axis=-1)
    bound = _offsets.INT32_MAX
    return tf.cast(tf.clip_by_value(start, tf.cast(-bound, start.dtype), tf.cast(bound, start.dtype)), tf.int32)


def check_same_batch(tensors: dict):
    """A ValueError naming the tensors whose static batch sizes differ (unknown sizes are not checked here)."""
    sizes = {name: t.shape[0] for name, t in tensors.items() if t.shape.rank and t.shape[0] is not None}
    if len(set(sizes.values())) > 1:
        described = ", ".join(f"{name} {size}" for name, size in sizes.items())
        names = list(tensors)
        raise ValueError(f"{', '.join(names[:-1])} and {names[-1]} must share the batch size, got {described}")


def _patch_shape(x, offsets, patch_size, channels_first):
    batch, k = x.shape[0], offsets.shape[1]
    channels = x.shape[1] if channels_first else x.shape[-1]
    if channels_first:
        return (batch, k, channels, *patch_size)
    return (batch, k, *patch_size, channels)


def _check_patch_inputs(x, offsets, patch_size):
    if offsets.shape.rank != 3 or offsets.shape[-1] is None:
        raise ValueError(f"offsets must be (batch, K, D) with a known D, got shape {offsets.shape}")
    dims = offsets.shape[-1]
    if x.shape.rank != dims + 2:
        raise ValueError(
            f"x must be (batch, *spatial, channels) with {dims} spatial dimensions (rank {dims + 2}) "
            f"to match offsets {offsets.shape}, got shape {x.shape}"
        )
    if not offsets.dtype.is_integer:
        raise TypeError(f"offsets must be an integer tensor, got {offsets.dtype.name}")
    return _size_tuple(patch_size, dims, "patch_size")


def extract_patches(x, offsets, patch_size, *, fill=0, channels_first=False):
    """Patches of ``x`` starting at ``offsets``; pixels outside ``x`` take ``fill``.

    ``x`` ``(B, *spatial, C)`` (``(B, C, *spatial)`` when ``channels_first``),
    any dtype; ``offsets`` integer ``(B, K, D)``. Returns
    ``(B, K, *patch_size, C)`` (``(B, K, C, *patch_size)``) of ``x``'s dtype.
    For a floating ``x`` the gradient scatters the patches' gradient back
    (``atskern.scatter_patches``); it runs only when a gradient for ``x`` is
    requested.
    """
    x = tf.convert_to_tensor(x)
    offsets = tf.convert_to_tensor(offsets)
    channels_first = _validation.check_channels_first(channels_first)
    size = _check_patch_inputs(x, offsets, patch_size)
    _validation.check_fill(fill, _validation.check_movable_dtype(np.dtype(x.dtype.as_numpy_dtype), "x"))
    check_same_batch({"offsets": offsets, "x": x})
    offsets = _xla().int32_saturated(offsets)
    if in_xla_context():
        spatial = x.shape[2:] if channels_first else x.shape[1:-1]
        if not spatial.is_fully_defined():
            raise ValueError(f"x's spatial shape must be static to extract patches under XLA (jit_compile=True), got {x.shape}")
        return _xla().extract_patches(x, offsets, size, fill=fill, channels_first=channels_first)
    out_shape = _patch_shape(x, offsets, size, channels_first)

    def forward(image, starts, fill=fill):
        batch, k = starts.shape[:2]
        channels = image.shape[1] if channels_first else image.shape[-1]
        shape = (batch, k, channels, *size) if channels_first else (batch, k, *size, channels)
        out = _kernels.aligned_empty(shape, image.dtype)
        if not out.size:  # no images (a replica's share of a short last batch), patches or channels
            return out
        return _kernels.extract_patches(image, starts, size, fill=fill, channels_first=channels_first, out=out)

    def backward(grad, starts, image_shape):
        spatial = tuple(int(s) for s in (image_shape[2:] if channels_first else image_shape[1:-1]))
        if not grad.size:  # nothing gathered, nothing to add back
            return np.zeros(tuple(int(s) for s in image_shape), grad.dtype)
        return _kernels.scatter_patches(np.ascontiguousarray(grad), starts, spatial, channels_first=channels_first)

    @tf.custom_gradient
    def extract(image, starts):
        patches = numpy_call(forward, [image, starts], image.dtype, name="ats.ops.extract_patches")
        patches.set_shape(out_shape)

        def grad(upstream):
            if not image.dtype.is_floating:
                return None, None
            work = tf.float64 if image.dtype == tf.float64 else tf.float32

            @tf.custom_gradient
            def scatter(patch_grad):
                scattered = numpy_call(backward, [patch_grad, starts, tf.shape(image, out_type=tf.int64)], work,
                                       name="ats.ops.scatter_patches")
                scattered.set_shape(image.shape)

                def adjoint(image_grad):  # the scatter's own gradient (second derivatives): the gather, fill 0
                    gathered = numpy_call(lambda g, s: forward(g, s, 0), [image_grad, starts], work,
                                          name="ats.ops.extract_patches")
                    gathered.set_shape(patch_grad.shape)
                    return gathered

                return scattered, adjoint

            return tf.cast(scatter(tf.cast(upstream, work)), image.dtype), None

        return patches, grad

    return extract(x, offsets)


def extract_multiscale(levels, samples, grid_shape, patch_sizes, *, margin=0.0, fill=0, channels_first=False):
    """One patch per level of an image pyramid around each sampled grid cell.

    ``levels`` is a list of ``(B, *spatial_l, C)`` tensors (``(B, C, *spatial_l)`` when
    ``channels_first``), ``samples`` int ``(B, K, D)`` cells of a grid of shape ``grid_shape``,
    ``patch_sizes`` one patch size (an int or D ints) per level, as in ``atskern.extract_multiscale``.
    Returns a list of ``(B, K, *P_l, C)`` (``(B, K, C, *P_l)``) patches; gradients scatter back into
    every floating level.
    """
    levels = _validation.check_levels(levels, "levels")
    patch_sizes = _validation.check_per_level(patch_sizes, len(levels), "patch_sizes")
    channels_first = _validation.check_channels_first(channels_first)
    samples = tf.convert_to_tensor(samples)
    patches = []
    for i, (level, size) in enumerate(zip(levels, patch_sizes)):
        level = tf.convert_to_tensor(level)
        check_same_batch({"samples": samples, f"levels[{i}]": level})
        spatial = tf.shape(level)[2:] if channels_first else tf.shape(level)[1:-1]
        offsets = patch_offsets(samples, grid_shape, spatial, size, margin=margin)
        patches.append(extract_patches(level, offsets, size, fill=fill, channels_first=channels_first))
    return patches


# --- expectation ---------------------------------------------------------------


def _feature_weights(probs64, replace: bool, unit: float):
    """``c_k`` of ``F = sum_k c_k f_k`` and the attention-gradient scale, float64 ``(B, n)``; ``unit``: the unit
    roundoff of the probabilities' own dtype.

    A filler (``probs == 0``: rule R3 of DESIGN.md) gets 0 for both, with no division by zero.
    """
    n = tf.cast(tf.shape(probs64)[1], tf.float64)
    drawn = probs64 > 0
    safe = tf.where(drawn, probs64, tf.ones_like(probs64))
    zero = tf.zeros_like(probs64)
    if replace:
        return tf.where(drawn, tf.ones_like(probs64) / n, zero), tf.where(drawn, 1.0 / (n * safe), zero)
    mass_left = _xla().mass_left(probs64, unit)
    remaining = tf.range(n - 1.0, -1.0, -1.0, dtype=tf.float64)
    weights = tf.where(drawn, (mass_left + remaining * probs64) / n, zero)
    scale = tf.where(drawn, (mass_left / safe + remaining) / n, zero)
    return weights, scale


def _probs_tolerance(dtype, n):
    """How far above 1 a draw's probabilities may sum without replacement (rounding of ``dtype``)."""
    if dtype == tf.float64:
        return tf.constant(1e-6, tf.float64)
    return tf.cast(n, tf.float64) * max(2.0**-20, float(ml_dtypes.finfo(dtype.as_numpy_dtype).eps))  # bfloat16 too


def _checked_probs(probs, replace: bool):
    """``probs`` (R3: finite, in [0, 1], rows summing to at most 1 + rounding without replacement):
    a ValueError naming the row when eager, an assertion (InvalidArgumentError) in a graph."""
    p64 = tf.cast(probs, tf.float64)
    inside = tf.math.is_finite(p64) & (p64 >= 0) & (p64 <= 1)
    tolerance = _probs_tolerance(probs.dtype, tf.shape(probs)[1])
    ok = tf.reduce_all(inside)
    if not replace:
        ok = ok & tf.reduce_all(tf.reduce_sum(tf.where(inside, p64, tf.zeros_like(p64)), axis=1) <= 1 + tolerance)
    if tf.executing_eagerly():
        if not bool(ok):
            raise _validation.explain_bad_probs(p64.numpy(), replace, float(tolerance))
        return probs
    message = ("ats.ops.expectation: probs must be finite, in [0, 1] and (without replacement) sum to at most 1 "
               "per row; check the sampled attention (use replace=True if the draws were made with replacement)")
    with tf.control_dependencies([tf.debugging.Assert(ok, [message])]):
        return tf.identity(probs)


def _same_leading_shape(features, probs):
    """``probs``, in a graph after an assertion that ``features`` starts with its shape (``(batch, n)``, which
    may be unknown when traced: broadcasting would silently take a batch of 1 for every image)."""
    if tf.executing_eagerly():
        return probs
    same = tf.reduce_all(tf.equal(tf.shape(features)[:2], tf.shape(probs)))
    message = "ats.ops.expectation: features must be (batch, n, ...) with probs' (batch, n)"
    with tf.control_dependencies([tf.debugging.Assert(same, [message, tf.shape(features), tf.shape(probs)])]):
        return tf.identity(probs)


def _expand(weights, rank: int):
    return tf.reshape(weights, tf.concat([tf.shape(weights), tf.ones([rank - 2], tf.int32)], 0))


def expectation(features, probs, *, replace=False):
    """The ATS estimate of ``sum_i a_i f_i`` from ``n`` sampled features, with unbiased gradients.

    ``features`` ``(B, n, *F)`` and ``probs`` ``(B, n)`` (the sampled
    attention, in draw order) give ``(B, *F)``. The gradients are those of
    ``atskern.expectation_grad``: features get ``c_k g``, and ``probs`` gets the
    unbiased estimate of ``<g, f_i>`` (``w <g, f_k> / a_k`` with replacement,
    ``w (pm_k / a_k + n - 1 - k) <g, f_k>`` without), not the derivative of the
    forward value. ``replace`` must match how the positions were drawn.

    A drawn entry with ``probs == 0`` (a filler of a short row, or a
    probability its dtype cannot hold; DESIGN.md R1-R3) gets coefficient 0
    and both gradients exactly 0. ``probs`` must be finite, in [0, 1], and
    without replacement sum to at most 1 per row (up to rounding: 1e-6 for
    float64, ``n`` times the dtype's epsilon (at least ``2**-20``) otherwise):
    a ValueError naming the row when eager, an InvalidArgumentError in a graph.
    """
    features = tf.convert_to_tensor(features)
    probs = tf.convert_to_tensor(probs)
    if probs.shape.rank != 2:
        raise ValueError(f"probs must be (batch, n), got shape {probs.shape}")
    if features.shape.rank is None or features.shape.rank < 2:
        raise ValueError(f"features must be (batch, n, ...), got shape {features.shape}")
    if not features.dtype.is_floating or not probs.dtype.is_floating:
        raise TypeError(f"features and probs must be floating, got {features.dtype.name} and {probs.dtype.name}")
    if not features.shape[:2].is_compatible_with(probs.shape):
        raise ValueError(f"features {features.shape} must start with probs' shape {probs.shape}")
    if probs.shape[1] == 0:
        raise ValueError(f"probs must not be empty, got shape {tuple(probs.shape)}")
    rank = features.shape.rank
    replace = _validation.require_bool(replace, "replace")
    probs = _same_leading_shape(features, _checked_probs(probs, replace))

    @tf.custom_gradient
    def estimate(f, p):
        p64 = tf.cast(p, tf.float64)
        weights, scale = _feature_weights(p64, replace, _validation.unit_roundoff(p.dtype.as_numpy_dtype))
        # to f's own leading shape: a (batch, n) that differs from p's fails here even under XLA (which drops the
        # assertion of _same_leading_shape) instead of broadcasting a batch of 1
        weights_f = _expand(tf.reshape(tf.cast(weights, f.dtype), tf.shape(f)[:2]), rank)
        value = tf.reduce_sum(weights_f * f, axis=1)

        def grad(upstream):
            upstream = tf.convert_to_tensor(upstream)
            grad_features = weights_f * tf.expand_dims(upstream, 1)
            products = tf.cast(tf.expand_dims(upstream, 1), tf.float64) * tf.cast(f, tf.float64)
            inner = tf.reduce_sum(tf.reshape(products, tf.concat([tf.shape(p), [-1]], 0)), axis=2)
            grad_probs = tf.cast(scale * inner, p.dtype)
            return tf.cast(grad_features, f.dtype), grad_probs

        return value, grad

    result = estimate(features, probs)
    result.set_shape(features.shape[:1].concatenate(features.shape[2:]))
    return result


# The 2019 import path: ``ats.ops.extract_patches`` becomes a callable module
# that also holds ``extract_patches`` (see ats/ops/extract_patches.py).
from . import extract_patches as _extract_patches_module  # noqa: E402,F401
