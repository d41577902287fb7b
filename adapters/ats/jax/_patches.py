"""Patch gather with a fill value and its exact adjoint (scatter-add), in pure JAX.

Images are channels-last ``(B, *spatial, C)`` or channels-first
``(B, C, *spatial)``; offsets ``(B, K, D)`` integers, anywhere (pixels outside
the image take ``fill``). Each patch is a dynamic slice of the image padded
with ``fill``, vmapped (one XLA gather). Its custom VJP is
:func:`scatter_patches`, the exact adjoint: each patch's gradient added back
at its offset, the parts outside the image dropped, accumulated in float32 for
16-bit floats (in the image's dtype otherwise).

Offsets of the patches around sampled cells come from :func:`patch_offsets`,
a per-dim lookup table built with exact rational arithmetic (rule R5), so the
half-way cases round half to even exactly and no float64 is needed.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .._xla_common import int32_clamps, offset_table


def _geometry(shape, channels_first: bool):
    if channels_first:
        return tuple(shape[2:]), shape[1]
    return tuple(shape[1:-1]), shape[-1]


def gather(x, offsets, patch, fill, channels_first: bool):
    """Patches ``(B, K, *P, C)`` (or ``(B, K, C, *P)``) without a custom gradient.

    ``x`` is padded by ``P`` with ``fill`` on both sides of each spatial dim
    and each patch is a ``lax.dynamic_slice`` of it, vmapped over patches and
    images (one XLA gather; under ``jit`` the pad fuses into it). Offsets are
    first clipped to ``[-P, S]``: a patch further out is all fill either way.
    """
    spatial, channels = _geometry(x.shape, channels_first)
    ndim = len(spatial)
    first = 2 if channels_first else 1
    config = [(0, 0, 0)] * x.ndim
    for d in range(ndim):
        config[first + d] = (patch[d], patch[d], 0)
    padded = jax.lax.pad(x, jnp.asarray(fill).astype(x.dtype), config)
    low = jnp.asarray([-p for p in patch], jnp.int32)
    high = jnp.asarray(spatial, jnp.int32)
    starts = jnp.clip(int32_saturated(offsets), low, high)
    starts = starts + jnp.asarray(patch, jnp.int32)
    sizes = ((channels,) + tuple(patch)) if channels_first else (tuple(patch) + (channels,))

    def one(image, start):
        zero = jnp.zeros((), jnp.int32)
        index = (zero, *start) if channels_first else (*start, zero)
        return jax.lax.dynamic_slice(image, index, sizes)

    return jax.vmap(jax.vmap(one, in_axes=(None, 0)))(padded, starts)


def int32_saturated(values):
    """Integer ``values`` cast to int32 with saturation (``int32_clamps``), not wrapping: uint8 offsets stay
    positive, int64 ones of 2**32 + 1 stay outside."""
    low, high = int32_clamps(values.dtype)
    if high is not None:
        values = jnp.minimum(values, jnp.asarray(high, values.dtype))
    if low is not None:
        values = jnp.maximum(values, jnp.asarray(low, values.dtype))
    return values.astype(jnp.int32)


def scatter_patches(grad, offsets, spatial_shape, *, channels_first: bool = False):
    """The adjoint of :func:`extract_patches`: each patch added into zeros at its offset.

    ``grad`` ``(B, K, *P, C)`` (or ``(B, K, C, *P)``); returns
    ``(B, *spatial_shape, C)`` (or ``(B, C, *spatial_shape)``), float32 for
    16-bit gradients, the gradient's dtype otherwise. It is the exact linear
    transpose of the zero-fill gather (``jax.linear_transpose``): a scatter-add
    of the patches into the padded image, then its interior.
    """
    if channels_first:
        patch, channels = tuple(grad.shape[3:]), grad.shape[2]
    else:
        patch, channels = tuple(grad.shape[2:-1]), grad.shape[-1]
    dtype = jnp.float32 if jnp.dtype(grad.dtype).itemsize < 4 else grad.dtype
    spatial = tuple(int(s) for s in spatial_shape)
    image = (grad.shape[0], channels) + spatial if channels_first else (grad.shape[0],) + spatial + (channels,)
    transpose = jax.linear_transpose(
        lambda img: gather(img, offsets, patch, 0, channels_first), jax.ShapeDtypeStruct(image, dtype)
    )
    return transpose(grad.astype(dtype))[0]


def with_adjoint(gather_fn, scatter_fn):
    """``extract(x, offsets, patch, fill, channels_first)``: ``gather_fn`` with ``scatter_fn`` as the gradient
    of a floating ``x`` (``offsets`` get none). Both take ``(..., channels_first)`` positionally:
    ``gather_fn(x, offsets, patch, fill, channels_first)`` and
    ``scatter_fn(grad, offsets, spatial, channels_first)``. The XLA path (here) and the kernel path
    (``ats.jax._kernel``) pair their own gather and scatter with it."""

    @partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
    def extract_float(x, offsets, patch, fill, channels_first, spatial):
        return gather_fn(x, offsets, patch, fill, channels_first)

    def forward(x, offsets, patch, fill, channels_first, spatial):
        return gather_fn(x, offsets, patch, fill, channels_first), (offsets, jnp.zeros((), x.dtype))

    def backward(patch, fill, channels_first, spatial, residual, grad):
        offsets, like = residual
        image = scatter_fn(grad, offsets, spatial, channels_first).astype(like.dtype)
        return image, None  # offsets: no cotangent (a float0 array needs a concrete shape, which jax.export lacks)

    extract_float.defvjp(forward, backward)

    def extract(x, offsets, patch, fill, channels_first: bool):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return gather_fn(x, offsets, patch, fill, channels_first)
        spatial, _ = _geometry(x.shape, channels_first)
        return extract_float(x, offsets, patch, fill, channels_first, spatial)

    return extract


extract = with_adjoint(gather, lambda grad, offsets, spatial, channels_first: scatter_patches(
    grad, offsets, spatial, channels_first=channels_first))
extract.__doc__ = "Differentiable gather: the gradient of ``x`` is :func:`scatter_patches` (``offsets`` get none)."


def offsets_from_samples(samples, grid, level, patch, margins):
    """``(B, K, D)`` int32 offsets of sampled cells, one table lookup per dim (cells clipped into the grid)."""
    columns = []
    for d in range(len(grid)):
        table = jnp.asarray(offset_table(grid[d], level[d], patch[d], margins[d]))
        cells = jnp.clip(int32_saturated(samples[..., d]), 0, grid[d] - 1)
        columns.append(table[cells])
    return jnp.stack(columns, axis=-1)
