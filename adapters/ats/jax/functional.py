"""Functional API of ``ats.jax``: sampling, patch extraction and the ATS estimator in pure JAX.

Mirrors :mod:`ats.torch.functional`, with JAX's conventions: images are
channels-last ``(B, *spatial, C)`` unless ``channels_first=True``, and the
sampling key is explicit. Everything is written in ``jax.numpy``/``lax`` (no
Flax, no host callback), so it compiles under ``jax.jit``, batches under
``jax.vmap`` and runs on whatever device JAX uses.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from functools import partial

import jax

from . import _checks as c
from . import _estimator, _patches, _rng, _sampling


# Each public function runs one compiled computation (cached per shape and static argument), also
# when called eagerly: JAX's op-by-op dispatch of the ~200 Philox operations would be far slower.
# Under an outer ``jax.jit`` these simply inline.


@partial(jax.jit, static_argnames=("n", "replace", "logits"))
def _draw(attention, k0, k1, *, n, replace, logits):
    flat, w = _sampling.draw(attention, n, k0, k1, replace=replace, logits=logits)
    return _sampling.unravel(flat, attention.shape[1:]), _sampling.probabilities(w, flat, attention.dtype)


_extract = jax.jit(_patches.extract, static_argnums=(2, 3, 4))
_scatter = jax.jit(_patches.scatter_patches, static_argnums=(2,), static_argnames=("channels_first",))
_expectation = jax.jit(_estimator.expectation, static_argnums=(2,))


def sample_indices(attention, n_samples, key, *, replace=False, logits=False, strict=False):
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
        lowest-index zero cells, rule R1); ``strict=True`` raises instead
        (checked only when called outside ``jit``).

    Returns
    -------
    indices : int32 ``(B, n_samples, D)``, grid coordinates in draw order.
    probs : ``(B, n_samples)``, attention's dtype: each draw's probability
        under its row (0 for fillers and for probabilities the dtype cannot hold).

    With JAX's 64-bit mode on, the draws equal atskern's (up to atskern's
    near-tie caveat); without it they are computed in float32 and equal
    atskern's except in rows with near ties (see ``ats.jax._sampling``).
    Values are checked (NaN, inf, negative weights, empty rows) only when
    called eagerly.
    """
    attention = c.as_array(attention, "attention")
    n = c.positive_int(n_samples, "n_samples")
    replace = c.boolean(replace, "replace")
    logits = c.boolean(logits, "logits")
    strict = c.boolean(strict, "strict")
    c.attention(attention, n, not replace)
    k0, k1 = _rng.seed_words(key)
    if c.is_concrete(attention):
        c.attention_values(attention, n, replace, logits, strict)
    return _draw(lax.stop_gradient(attention), k0, k1, n=n, replace=replace, logits=logits)


def sample(attention, n_samples, *, key=None, replace=False, deterministic=False):
    """Sample ``n_samples`` positions per row of an attention map, as ``ats.torch.functional.sample``.

    ``attention`` ``(B, *grid)`` holds non-negative weights (e.g. a softmax).
    ``key`` seeds atskern's generator (see :func:`sample_indices`); it is
    required unless ``deterministic=True``, which takes the ``n_samples``
    largest weights, largest first. Returns ``indices`` int32
    ``(B, n_samples, D)`` (no gradient) and ``sampled_attention``
    ``(B, n_samples)``: each drawn cell's weight divided by its row's sum, a
    differentiable gather of ``attention``.
    """
    attention = c.as_array(attention, "attention")
    n = c.positive_int(n_samples, "n_samples")
    replace = c.boolean(replace, "replace")
    deterministic = c.boolean(deterministic, "deterministic")
    grid = c.attention(attention, n, not replace or deterministic)
    if deterministic:
        flat = _sampling.top_cells(lax.stop_gradient(attention), n)
        indices = _sampling.unravel(flat, grid)
    else:
        if key is None:
            raise TypeError("key is required to sample (an int seed, a uint32 [k0, k1] array or a JAX PRNG key)")
        indices, _ = sample_indices(attention, n, key, replace=replace)
        flat = _sampling.ravel(indices, grid)
    rows = attention.reshape(attention.shape[0], -1)
    dtype = _rng.compute_dtype()
    total = jnp.sum(rows.astype(dtype), axis=1, keepdims=True)
    sampled = jnp.take_along_axis(rows, flat, axis=1).astype(dtype) / total
    return indices, sampled.astype(attention.dtype)


def patch_offsets(samples, grid_shape, level_shape, patch_size, *, margin=0.0):
    """First pixel of the patch around each sampled cell in one image level (as ``atskern.patch_offsets``).

    A cell ``s`` of ``G`` cells has its centre at ``c = L (m + (s + 1/2) / G (1 - 2 m))``
    in a level of ``L`` pixels; the patch of ``P`` pixels starts at
    ``rint(c - P / 2)``, half to even, computed exactly (rule R5): ``margin``
    (a number or one per dim, in ``[0, 1/2)``; a ``fractions.Fraction`` such as
    ``Fraction(receptive_field, 2 * low_size)`` is exact) goes into a per-cell
    lookup table built in rational arithmetic. Returns int32 ``(..., D)``;
    cells outside the grid are clipped into it.
    """
    samples = c.as_array(samples, "samples")
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


def _fill(fill, name="fill"):
    if isinstance(fill, bool) or not isinstance(fill, (int, float)):
        raise TypeError(f"{name} must be a Python int or float, got {fill!r}")
    return fill


def extract_patches(x, offsets, patch_size, *, fill=0, channels_first=False):
    """Gather one patch per offset, differentiably; pixels outside ``x`` take ``fill``.

    ``x`` ``(B, *spatial, C)`` (or ``(B, C, *spatial)``), any dtype;
    ``offsets`` integer ``(B, K, D)``, each patch's first pixel (anywhere).
    Returns ``(B, K, *patch_size, C)`` (or ``(B, K, C, *patch_size)``). For a
    floating ``x`` the gradient is :func:`scatter_patches` of the patch
    gradient (a custom VJP), the exact adjoint.
    """
    x = c.as_array(x, "x")
    channels_first = c.boolean(channels_first, "channels_first")
    spatial = _spatial(x, "x", channels_first)
    offsets = c.as_array(offsets, "offsets")
    if offsets.ndim != 3 or offsets.shape[0] != x.shape[0] or offsets.shape[2] != len(spatial):
        raise ValueError(f"offsets must be (batch, K, {len(spatial)}) for x of shape {tuple(x.shape)}, got {tuple(offsets.shape)}")
    if not jnp.issubdtype(offsets.dtype, jnp.integer):
        raise TypeError(f"offsets must be an integer array, got {offsets.dtype}")
    patch = c.size_tuple(patch_size, len(spatial), "patch_size")
    return _extract(x, offsets, patch, _fill(fill), channels_first)


def scatter_patches(grad, offsets, spatial_shape, *, channels_first=False):
    """Each patch of ``grad`` added at its offset into zeros of ``spatial_shape``: the adjoint of
    :func:`extract_patches` (overlaps sum, parts outside dropped). float32 for 16-bit gradients."""
    grad = c.as_array(grad, "grad")
    offsets = c.as_array(offsets, "offsets")
    channels_first = c.boolean(channels_first, "channels_first")
    if offsets.ndim != 3 or grad.ndim != offsets.shape[2] + 3 or grad.shape[:2] != offsets.shape[:2]:
        raise ValueError(f"grad must be (batch, K, *patch, C) matching offsets {tuple(offsets.shape)}, got {tuple(grad.shape)}")
    if not jnp.issubdtype(grad.dtype, jnp.floating):
        raise TypeError(f"grad must be floating, got {grad.dtype}")
    spatial = c.size_tuple(tuple(spatial_shape), offsets.shape[2], "spatial_shape")
    return _scatter(grad, offsets, spatial, channels_first=channels_first)


def extract_multiscale(levels, samples, grid_shape, patch_sizes, *, margin=0.0, fill=0, channels_first=False):
    """The patch around each sampled cell from every level of an image pyramid (one list entry per level).

    Each level's offsets come from :func:`patch_offsets`; each level's
    gradient is scattered back into it.
    """
    levels = list(levels)
    if not isinstance(patch_sizes, (list, tuple)) or len(patch_sizes) != len(levels):
        raise ValueError(f"patch_sizes must hold one patch size per level ({len(levels)}), got {patch_sizes!r}")
    patches = []
    for i, (x, size) in enumerate(zip(levels, patch_sizes)):
        x = c.as_array(x, f"levels[{i}]")
        spatial = _spatial(x, f"levels[{i}]", channels_first)
        patch = c.size_tuple(size, len(spatial), f"patch_sizes[{i}]")
        offsets = patch_offsets(samples, grid_shape, spatial, patch, margin=margin)
        patches.append(extract_patches(x, offsets, patch, fill=fill, channels_first=channels_first))
    return patches


def expectation(features, probs, *, replace=False):
    """The ATS estimate of ``sum_i a_i f_i`` from ``n`` sampled features, with unbiased gradients.

    ``features`` ``(B, n, *F)`` and ``probs`` ``(B, n)`` (draw order) give
    ``(B, *F)``. A ``jax.custom_vjp`` whose gradients are exactly
    ``atskern.expectation_grad``'s (rule R3: ``probs == 0`` entries get
    weight 0 and gradient 0). ``replace`` must match how the cells were drawn.
    ``probs`` values are checked (finite, in [0, 1], rows summing to at most
    1 + tolerance without replacement) only when called eagerly.
    """
    features = c.as_array(features, "features")
    probs = c.as_array(probs, "probs")
    replace = c.boolean(replace, "replace")
    if probs.ndim != 2:
        raise ValueError(f"probs must be (batch, n), got shape {tuple(probs.shape)}")
    if features.ndim < 2 or tuple(features.shape[:2]) != tuple(probs.shape):
        raise ValueError(f"features must be (batch, n, ...) = {tuple(probs.shape)} + (...), got {tuple(features.shape)}")
    if not jnp.issubdtype(features.dtype, jnp.floating) or not jnp.issubdtype(probs.dtype, jnp.floating):
        raise TypeError(f"features and probs must be floating, got {features.dtype} and {probs.dtype}")
    if c.is_concrete(probs):
        c.probs_values(probs, replace)
    return _expectation(features, probs, replace)


def expectation_grad(grad, features, probs, *, replace=False):
    """``(grad_probs, grad_features)`` of :func:`expectation` for upstream ``grad`` ``(B, *F)``, as atskern's."""
    grad = c.as_array(grad, "grad")
    features = c.as_array(features, "features")
    probs = c.as_array(probs, "probs")
    if tuple(grad.shape) != (probs.shape[0],) + tuple(features.shape[2:]):
        raise ValueError(f"grad must be (batch, *F) = {(probs.shape[0],) + tuple(features.shape[2:])}, got {tuple(grad.shape)}")
    return _estimator.grads(grad, features, probs, c.boolean(replace, "replace"))
