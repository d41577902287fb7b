"""Functional API of ``ats.jax``: sampling, patch extraction and the ATS estimator for JAX.

Mirrors :mod:`ats.torch.functional` (same function and argument names, same
rules), with JAX's conventions: images are channels-last ``(B, *spatial, C)``
unless ``channels_first=True`` (torch's default is channels-first), and the
sampling key is explicit (JAX has no global generator, so ``key`` is
required where torch would draw one).

Two implementations sit behind ``path=`` (``ats.jax._paths``): ``"xla"``,
everything in ``jax.numpy``/``lax`` (compiles under ``jax.jit``, batches under
``jax.vmap``, runs on any JAX device); ``"kernel"``, atskern's Numba kernels
(called directly when eager, through ``jax.pure_callback`` when traced);
``"auto"`` (default) picks the faster one measured for the device and the
call (the kernel on CPU for sampling, and for patches when eager; XLA on
GPU/TPU). Both give the same draws (exactly with JAX's 64-bit mode; without
it the XLA path can differ at near ties), the same patches and the same
gradients.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import atskern

from . import _checks as c
from . import _estimator, _kernel, _patches, _paths, _rng, _sampling


# Each public function runs one compiled computation (cached per shape and static argument), also
# when called eagerly: JAX's op-by-op dispatch of the ~200 Philox operations would be far slower.
# Under an outer ``jax.jit`` these simply inline.


@partial(jax.jit, static_argnames=("n", "replace", "logits"))
def _draw(attention, k0, k1, *, n, replace, logits):
    flat, w = _sampling.draw(attention, n, k0, k1, replace=replace, logits=logits)
    return _sampling.unravel(flat, attention.shape[1:]), _sampling.probabilities(w, flat, attention.dtype)


_extract = jax.jit(_patches.extract, static_argnums=(2, 3, 4))
_NAN = float("nan")
_scatter = jax.jit(_patches.scatter_patches, static_argnums=(2,), static_argnames=("channels_first",))
_expectation = jax.jit(_estimator.expectation, static_argnums=(2,))


def _kernel_draw(attention, n, k0, k1, *, replace, logits, strict, validate):
    """The kernel path: atskern.sample on the host array when eager, a ``pure_callback`` when traced."""
    if _paths.is_concrete(attention, k0, k1):
        weights = np.asarray(_kernel._kernel_weights(attention))
        seed = int(k0) | (int(k1) << 32)
        indices, probs = atskern.sample(weights, n, replace=replace, logits=logits, seed=seed, strict=strict, validate=validate)
        return jnp.asarray(indices.astype(np.int32, copy=False)), jnp.asarray(probs).astype(attention.dtype)
    return _kernel.sample_indices(attention, n, k0, k1, replace=replace, logits=logits, strict=strict, validate=validate)


_PATH_DOC = """path : "auto", "xla" or "kernel"
        Which implementation runs (module docstring): ``"auto"`` (default)
        takes atskern's kernel on CPU devices where it measured faster and the
        pure-JAX ops elsewhere (GPU/TPU); ``"xla"`` forces the ``jnp`` ops,
        ``"kernel"`` atskern's kernels (through ``jax.pure_callback`` when
        traced; on a GPU that is a host round trip)."""


def sample_indices(attention, n_samples, key, *, replace=False, logits=False, strict=False, validate=True, path="auto"):
    """atskern's draw in JAX: ``(indices, probs)`` as ``atskern.sample(attention, n, seed=key)``.

    Parameters
    ----------
    attention : array ``(B, *grid)``, 1 to 3 grid dimensions, floating
        Non-negative weights (rows need not be normalized), or unnormalized
        log-probabilities with ``logits=True``.
    n_samples : int
    key : int in ``[0, 2**64)``, uint32 array ``[k0, k1]`` or a JAX PRNG key
        The seed of atskern's Philox streams; an int ``s`` is ``[s % 2**32, s // 2**32]``.
        A traced key is fine (draws then change per call without recompiling).
    replace : bool
        Independent draws (inverse CDF), or successive sampling (default).
    strict : bool
        Without replacement, a row with fewer positive weights than
        ``n_samples`` is completed with zero-probability fillers (its
        lowest-index zero cells, rule R1); ``strict=True`` raises instead.
    validate : bool
        Check the rows' values (NaN, inf, negative weights, empty rows,
        short rows when ``strict``) and raise a ValueError naming the row
        (default). Eagerly on both paths; under ``jit`` only on the kernel
        path (a bad row then fails the computation with atskern's message):
        traced values are unknown to Python. ``validate=False`` skips it
        (bad rows then give in-range but meaningless draws).
    {path}

    Returns
    -------
    indices : int32 ``(B, n_samples, D)``, grid coordinates in draw order.
    probs : ``(B, n_samples)``, attention's dtype: each draw's probability
        under its row (0 for fillers and for probabilities the dtype cannot hold),
        with no gradient (:func:`sample`'s sampled attention has one).

    The kernel path is atskern, so its draws are atskern's. On the XLA path,
    with JAX's 64-bit mode on the draws equal atskern's (up to atskern's
    near-tie caveat); without it keys are float32 and a row can differ at
    near ties, and with replacement the running sums are double-floats (two
    float32 words, within about 2**-46 of the row's sum), so a draw differs
    only where its target lies that close to a CDF step (see the README).
    """
    attention = c.as_array(attention, "attention")
    n = c.positive_int(n_samples, "n_samples")
    replace = c.boolean(replace, "replace")
    logits = c.boolean(logits, "logits")
    strict = c.boolean(strict, "strict")
    validate = c.boolean(validate, "validate")
    c.attention(attention, n, not replace)
    k0, k1 = _rng.seed_words(key)
    if _paths.choose(path, "sample", attention) == "kernel":
        return _kernel_draw(attention, n, k0, k1, replace=replace, logits=logits, strict=strict, validate=validate)
    if validate and c.is_concrete(attention):
        c.attention_values(attention, n, replace, logits, strict)
        if not logits:  # XLA would read such a row as empty (its cells in position order)
            c.refuse_subnormal_rows(attention, _flushed_in(attention), "XLA",
                                    "use path='kernel' (exact for any positive scale) or rescale the row")
    return _draw(lax.stop_gradient(attention), k0, k1, n=n, replace=replace, logits=logits)


sample_indices.__doc__ = sample_indices.__doc__.replace("{path}", _PATH_DOC)


def _flushed_in(attention):
    """The dtype whose subnormals XLA flushes in ``attention``'s row statistics: float32 where the map or the
    compute dtype is float32 (with x64 on, the cast of a float32 map to float64 reads its subnormals as 0), else
    float64 (float16 and bfloat16 maps convert exactly)."""
    float32 = np.dtype(np.float32)
    return float32 if float32 in (np.dtype(attention.dtype), np.dtype(_rng.compute_dtype())) else np.dtype(np.float64)


def sample(attention, n_samples, *, replace=False, key=None, deterministic=False, strict=False, validate=True, path="auto"):
    """Sample ``n_samples`` positions per row of an attention map, as ``ats.torch.functional.sample``.

    Parameters
    ----------
    attention : array ``(B, *grid)``, 1 to 3 grid dimensions, floating
        Non-negative weights (e.g. from :func:`sample_softmax`); rows need
        not sum exactly to 1.
    n_samples : int
    replace : bool
        Independent draws, or (default) successive sampling without replacement.
    key : int in ``[0, 2**64)``, uint32 array ``[k0, k1]`` or a JAX PRNG key
        Seed of atskern's counter-based generator (see :func:`sample_indices`):
        the same key and weights give atskern's (and ``ats.torch``'s) draws.
        Required unless ``deterministic=True`` (JAX has no global generator
        to draw one from, unlike torch).
    deterministic : bool
        Take the ``n_samples`` largest weights, largest first (ties: lower
        index first; inference).
    strict, validate :
        As in :func:`sample_indices` (short rows get zero-probability
        fillers unless ``strict``; value checks unless ``validate=False``).
    {path}

    Returns
    -------
    indices : int32 ``(B, n_samples, D)``
        Grid coordinates in draw order (no gradient).
    sampled_attention : ``(B, n_samples)``, attention's dtype
        Each drawn cell's weight divided by its row's sum (in float32, or
        float64 under JAX's 64-bit mode), a differentiable gather of
        ``attention``: its gradient flows back to ``attention``.
    """
    attention = c.as_array(attention, "attention")
    n = c.positive_int(n_samples, "n_samples")
    replace = c.boolean(replace, "replace")
    deterministic = c.boolean(deterministic, "deterministic")
    _paths.check(path)
    grid = c.attention(attention, n, not replace or deterministic)
    if deterministic:
        if c.boolean(validate, "validate") and c.is_concrete(attention):  # the rows sampling refuses
            c.attention_values(attention, n, False, False, c.boolean(strict, "strict"))
        flat = _sampling.top_cells(lax.stop_gradient(attention), n)
        indices = _sampling.unravel(flat, grid)
    else:
        if key is None:
            raise TypeError("key is required to sample (an int seed, a uint32 [k0, k1] array or a JAX PRNG key)")
        indices, _ = sample_indices(attention, n, key, replace=replace, strict=strict, validate=validate, path=path)
        flat = _sampling.ravel(indices, grid)
    if c.boolean(validate, "validate") and c.is_concrete(attention):  # the sampled attention below is XLA's: such a row would be 0 / 0
        c.refuse_subnormal_rows(attention, _flushed_in(attention), "XLA",
                                "rescale the row (sample_indices' kernel path draws from any positive scale)")
    scaled = _sampling.power_of_two_scaled(attention.reshape(attention.shape[0], -1).astype(_rng.compute_dtype()))
    sampled = jnp.take_along_axis(scaled, flat, axis=1) / jnp.sum(scaled, axis=1, keepdims=True)
    return indices, sampled.astype(attention.dtype)


sample.__doc__ = sample.__doc__.replace("{path}", _PATH_DOC)


def patch_offsets(samples, grid_shape, level_shape, patch_size, *, margin=0.0):
    """First pixel of the patch around each sampled cell in one image level (as ``atskern.patch_offsets``).

    A cell ``s`` of ``G`` cells has its centre at ``c = L (m + (s + 1/2) / G (1 - 2 m))``
    in a level of ``L`` pixels; the patch of ``P`` pixels starts at
    ``rint(c - P / 2)``, half to even, computed exactly (rule R5): ``margin``
    (a number or one per dim, in ``[0, 1/2)``, or the pair ``(receptive_field,
    low_shape)`` for ``receptive_field / 2 / low_shape[d]``, as atskern reads it;
    a ``fractions.Fraction`` is exact) goes into a per-cell
    lookup table built in rational arithmetic. Returns int32 ``(..., D)``;
    cells outside the grid are clipped into it.
    """
    samples = c.as_index_array(samples, "samples")
    if not jnp.issubdtype(samples.dtype, jnp.integer):
        raise TypeError(f"samples must be integer grid cells, got {samples.dtype}")
    dims = samples.shape[-1]
    grid = c.size_tuple(grid_shape, dims, "grid_shape")
    level = c.size_tuple(level_shape, dims, "level_shape")
    patch = c.size_tuple(patch_size, dims, "patch_size")
    return _patches.offsets_from_samples(samples, grid, level, patch, c.margins(margin, dims))


def _spatial(x, name: str, channels_first: bool) -> tuple[int, ...]:
    if x.ndim not in (3, 4, 5):
        layout = "(batch, channels, *spatial)" if channels_first else "(batch, *spatial, channels)"
        raise ValueError(f"{name} must be {layout} with 1 to 3 spatial dimensions (rank 3 to 5), got shape {tuple(x.shape)}")
    return tuple(x.shape[2:]) if channels_first else tuple(x.shape[1:-1])




def _kernel_extract(x, offsets, patch, fill, channels_first):
    """The kernel path: atskern.extract_patches on the host arrays when eager, a callback when traced."""
    if _paths.is_concrete(x, offsets):
        return _kernel.eager_extract(x, offsets, patch, fill, channels_first)
    return _kernel.extract(x, offsets, patch, fill, channels_first)


def extract_patches(x, offsets, patch_size, *, fill=0, channels_first=False, path="auto"):
    """Gather one patch per offset, differentiably; pixels outside ``x`` take ``fill``.

    Parameters
    ----------
    x : array ``(B, *spatial, C)`` (or ``(B, C, *spatial)`` with ``channels_first``), any dtype
        1 to 3 spatial dimensions.
    offsets : integer array ``(B, K, D)``
        Each patch's first pixel; anywhere (pixels outside ``x`` take ``fill``).
    patch_size : int or D ints
    fill : number (a Python or NumPy scalar; a bool for bool ``x``), representable in ``x``'s dtype
    channels_first : bool
        JAX's default is channels-last (``ats.torch``'s is channels-first).
    {path}

    Returns ``(B, K, *patch_size, C)`` (or ``(B, K, C, *patch_size)``) of
    ``x``'s dtype. For a floating ``x`` the gradient is :func:`scatter_patches`
    of the patch gradient (a ``jax.custom_vjp`` on both paths), the exact
    adjoint; ``offsets`` get no gradient.
    """
    x = c.as_array(x, "x")
    channels_first = c.boolean(channels_first, "channels_first")
    spatial = _spatial(x, "x", channels_first)
    offsets = c.as_index_array(offsets, "offsets")
    if offsets.ndim != 3 or offsets.shape[0] != x.shape[0] or offsets.shape[2] != len(spatial):
        raise ValueError(f"offsets must be (batch, K, {len(spatial)}) for x of shape {tuple(x.shape)}, got {tuple(offsets.shape)}")
    if not jnp.issubdtype(offsets.dtype, jnp.integer):
        raise TypeError(f"offsets must be an integer array, got {offsets.dtype}")
    patch = c.size_tuple(patch_size, len(spatial), "patch_size")
    fill = c.checked_fill(fill, x.dtype)
    if isinstance(fill, float) and fill != fill:
        fill = _NAN  # one NaN object: fill is a static argument, and NaN != NaN would recompile every call
    if _paths.choose(path, "patches", x, offsets) == "kernel":
        return _kernel_extract(x, offsets, patch, fill, channels_first)
    return _extract(x, offsets, patch, fill, channels_first)


extract_patches.__doc__ = extract_patches.__doc__.replace("{path}", _PATH_DOC)


def scatter_patches(grad, offsets, spatial_shape, *, channels_first=False, path="auto"):
    """Each patch of ``grad`` added at its offset into zeros of ``spatial_shape``: the adjoint of
    :func:`extract_patches` (overlaps sum, parts outside dropped). float32 for 16-bit gradients.
    ``path`` as in :func:`extract_patches` (``atskern.scatter_patches`` or a ``jnp`` scatter-add)."""
    grad = c.as_array(grad, "grad")
    offsets = c.as_index_array(offsets, "offsets")
    channels_first = c.boolean(channels_first, "channels_first")
    if offsets.ndim != 3 or grad.ndim != offsets.shape[2] + 3 or grad.shape[:2] != offsets.shape[:2]:
        raise ValueError(f"grad must be (batch, K, *patch, C) matching offsets {tuple(offsets.shape)}, got {tuple(grad.shape)}")
    if not jnp.issubdtype(grad.dtype, jnp.floating):
        raise TypeError(f"grad must be floating, got {grad.dtype}")
    if not jnp.issubdtype(offsets.dtype, jnp.integer):
        raise TypeError(f"offsets must be an integer array, got {offsets.dtype}")
    spatial = c.size_tuple(tuple(spatial_shape), offsets.shape[2], "spatial_shape")
    if _paths.choose(path, "patches", grad, offsets) == "kernel":
        if _paths.is_concrete(grad, offsets):
            return _kernel.eager_scatter(grad, offsets, spatial, channels_first)
        return _kernel.scatter_patches(grad, offsets, spatial, channels_first)
    return _scatter(grad, offsets, spatial, channels_first=channels_first)


def extract_multiscale(levels, samples, grid_shape, patch_sizes, *, margin=0.0, fill=0, channels_first=False, path="auto"):
    """Gather the patch around each sampled cell from every level of an image pyramid.

    ``levels`` is a list of image batches (``(B, *spatial_l, C)``, or
    channels-first), ``samples`` integer ``(B, K, D)`` cells of
    ``grid_shape``, ``patch_sizes`` one size per level. Each level's offsets
    come from :func:`patch_offsets` (``margin`` as there), and each level's
    gradient is scattered back into it. Returns one patch array per level.
    ``fill``, ``channels_first`` and ``path`` as in :func:`extract_patches`.
    """
    levels = list(levels)
    if not isinstance(patch_sizes, (list, tuple)) or len(patch_sizes) != len(levels):
        raise ValueError(f"patch_sizes must hold one patch size per level ({len(levels)}), got {patch_sizes!r}")
    _paths.check(path)
    samples = c.as_index_array(samples, "samples")
    patches = []
    for i, (x, size) in enumerate(zip(levels, patch_sizes)):
        x = c.as_array(x, f"levels[{i}]")
        spatial = _spatial(x, f"levels[{i}]", channels_first)
        if samples.ndim != 3 or samples.shape[0] != x.shape[0]:
            raise ValueError(
                f"samples must be (batch, K, D) with the batch size of levels[{i}] ({x.shape[0]}), got {tuple(samples.shape)}"
            )
        patch = c.size_tuple(size, len(spatial), f"patch_sizes[{i}]")
        offsets = patch_offsets(samples, grid_shape, spatial, patch, margin=margin)
        patches.append(extract_patches(x, offsets, patch, fill=fill, channels_first=channels_first, path=path))
    return patches


def expectation(features, probs, *, replace=False, validate=True):
    """The ATS estimate of ``sum_i a_i f_i`` from ``n`` sampled features, with unbiased gradients.

    ``features`` ``(B, n, *F)`` and ``probs`` ``(B, n)`` (the sampled
    attention in draw order) give ``(B, *F)``. A ``jax.custom_vjp`` whose
    gradients are exactly ``atskern.expectation_grad``'s: ``c_k g`` for the
    features and, for ``probs``, the unbiased estimate of ``<g, f_i>``
    rather than the derivative of the value. ``replace`` must match how the
    cells were drawn. Rule R3: ``probs == 0`` entries (fillers, or
    probabilities the dtype cannot hold) get weight 0 and both gradients 0.
    ``validate`` checks that ``probs`` are finite, in [0, 1] and, without
    replacement, sum to at most 1 + tolerance per row (a ValueError naming
    the row); only when called eagerly (traced values are unknown).
    One implementation (the estimator is a few elementwise ops: no kernel path).
    """
    features, probs, replace = _estimator_inputs(features, probs, replace, validate)
    return _expectation(features, probs, replace)


def _estimator_inputs(features, probs, replace, validate):
    """``features``, ``probs`` and ``replace`` of the estimator, checked (shapes, dtypes, and the values of
    concrete ``probs`` when ``validate``)."""
    features = c.as_array(features, "features")
    probs = c.as_array(probs, "probs")
    replace = c.boolean(replace, "replace")
    if probs.ndim != 2:
        raise ValueError(f"probs must be (batch, n), got shape {tuple(probs.shape)}")
    if probs.shape[1] == 0:
        raise ValueError(f"probs must not be empty, got shape {tuple(probs.shape)}")
    if features.ndim < 2 or tuple(features.shape[:2]) != tuple(probs.shape):
        raise ValueError(f"features must be (batch, n, ...) = {tuple(probs.shape)} + (...), got {tuple(features.shape)}")
    if not jnp.issubdtype(features.dtype, jnp.floating) or not jnp.issubdtype(probs.dtype, jnp.floating):
        raise TypeError(f"features and probs must be floating, got {features.dtype} and {probs.dtype}")
    if c.boolean(validate, "validate") and c.is_concrete(probs):
        c.probs_values(probs, replace)
    return features, probs, replace


def expectation_grad(grad, features, probs, *, replace=False, validate=True):
    """``(grad_probs, grad_features)`` of :func:`expectation` for upstream ``grad`` ``(B, *F)``, as atskern's
    (the same checks as :func:`expectation`)."""
    grad = c.as_array(grad, "grad")
    features, probs, replace = _estimator_inputs(features, probs, replace, validate)
    if not jnp.issubdtype(grad.dtype, jnp.floating):
        raise TypeError(f"grad must be floating, got {grad.dtype}")
    if tuple(grad.shape) != (probs.shape[0],) + tuple(features.shape[2:]):
        raise ValueError(f"grad must be (batch, *F) = {(probs.shape[0],) + tuple(features.shape[2:])}, got {tuple(grad.shape)}")
    return _estimator.grads(grad, features, probs, replace)


# --- attention helpers (as ats.torch.functional's) ----------------------------------------------


def sample_softmax(x, *, smooth=0.0):
    """Softmax over every axis but the batch, optionally mixed with the uniform distribution.

    ``x`` ``(B, *grid)`` logits; returns the same shape, each row summing to 1:
    ``(1 - smooth) softmax(x) + smooth / N`` over the ``N`` cells of a row.
    """
    x = c.as_array(x, "x")
    if isinstance(smooth, bool) or not isinstance(smooth, (int, float)) or not 0 <= smooth <= 1:
        raise ValueError(f"smooth must be a number in [0, 1], got {smooth!r}")
    p = jax.nn.softmax(x.reshape(x.shape[0], -1), axis=1)
    if smooth > 0:
        p = p * (1 - smooth) + smooth / p.shape[1]
    return p.reshape(x.shape)


def multinomial_entropy(x, strength=1.0, eps=1e-6):
    """``strength * sum(x log(x + eps)) / batch``: minus ``strength`` times the rows' mean entropy.

    Added to a loss it rewards spread-out attention (the 2019 regularizer).
    """
    x = c.as_array(x, "x")
    return strength * jnp.sum(x * jnp.log(x + eps)) / x.shape[0]
