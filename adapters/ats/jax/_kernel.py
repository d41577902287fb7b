"""The kernel path of ``ats.jax``: atskern's Numba kernels called through ``jax.pure_callback``.

Where JAX runs on the CPU, the host *is* the device, and atskern's kernels
beat the same work written in ``jnp`` ops (README, "Paths: kernel or XLA").
These wrappers call them from inside JAX: the inputs arrive as NumPy arrays
on the host, atskern computes, the results go back as JAX arrays. They work
eagerly and under ``jax.jit`` (the callback is a node of the compiled
program), batch under ``jax.vmap`` (``vmap_method="sequential"``: one
callback per vmapped element, so a vmapped batch draws exactly what each
element would draw alone, as on the XLA path), and differentiate where
atskern has an adjoint: patch extraction is a ``jax.custom_vjp`` whose
backward pass is a second callback to ``atskern.scatter_patches``.

Results equal atskern's exactly (they *are* atskern's): the draws for the
seed ``k0 + 2**32 k1``, the patches and their adjoint. Sampling weights of a
16-bit dtype are cast to float32 first, as ``ats.torch`` does. A callback on
a GPU or TPU would cost a device-to-host round trip per call; the
``path="auto"`` choice (``ats.jax._paths``) therefore uses this path only on
CPU devices.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

import atskern
from atskern._fpenv import ieee_subnormals
from atskern._memory import aligned_empty

from ._patches import with_adjoint

VMAP = "sequential"


def to_jax(array: np.ndarray):
    """A fresh, 64-byte aligned NumPy result as a JAX CPU array without a copy (DLPack), else a copy.

    Only for arrays nothing else references (atskern's fresh outputs): JAX
    assumes its buffers immutable, and the alias keeps the NumPy array alive.
    """
    try:
        return jax.dlpack.from_dlpack(array)
    except (BufferError, TypeError, ValueError, RuntimeError):  # dtypes DLPack lacks (bfloat16 in NumPy), odd layouts
        return jnp.asarray(array)


def _host_extract(image, starts, patch, fill, channels_first: bool, out):
    """``atskern.extract_patches`` into ``out``; an empty ``out`` (no images, patches or channels: atskern refuses
    empty arrays) stays as it is, as on the XLA path."""
    if out.size:
        atskern.extract_patches(image, starts, patch, fill=fill, channels_first=channels_first, out=out)
    return out


def _host_scatter(g, starts, spatial, channels_first: bool, out):
    """``atskern.scatter_patches`` into ``out``; zeros where ``g`` is empty (no patch adds anything)."""
    if g.size:
        return atskern.scatter_patches(g, starts, spatial, channels_first=channels_first, out=out)
    out[...] = 0
    return out


def _image_shape(grad_shape, spatial, channels_first: bool):
    return (grad_shape[0], grad_shape[2], *spatial) if channels_first else (grad_shape[0], *spatial, grad_shape[-1])


def eager_extract(x, offsets, patch, fill, channels_first: bool):
    """``atskern.extract_patches`` on the host buffers of concrete CPU arrays, into an aligned buffer handed to JAX."""
    image = np.asarray(x)
    out = aligned_empty(_patch_shape(image.shape, offsets.shape, patch, channels_first), image.dtype)
    return to_jax(_host_extract(image, np.asarray(offsets), patch, fill, channels_first, out))


def eager_scatter(grad, offsets, spatial, channels_first: bool):
    """``atskern.scatter_patches`` of concrete arrays (float32 for 16-bit gradients), handed to JAX without a copy."""
    g = np.asarray(grad)
    g = g.astype(np.float32) if g.dtype.itemsize < 4 else g
    out = aligned_empty(_image_shape(g.shape, spatial, channels_first), g.dtype)
    return to_jax(_host_scatter(g, np.asarray(offsets), spatial, channels_first, out))


def _seed(key_words) -> int:
    words = np.asarray(key_words, dtype=np.uint64)
    return int(words[0]) | (int(words[1]) << 32)


def _kernel_weights(attention):
    """float32/float64 weights for atskern (16-bit floats are widened to float32)."""
    if attention.dtype in (jnp.float32, jnp.float64):
        return attention
    return attention.astype(jnp.float32)


def sample_indices(attention, n: int, k0, k1, *, replace: bool, logits: bool, strict: bool, validate: bool):
    """``(indices int32 (B, n, D), probs (B, n))`` from ``atskern.sample`` (probs in attention's dtype).

    ``validate`` runs atskern's value checks inside the callback (under
    ``jit`` a bad row then fails the computation with atskern's message).
    """
    weights = _kernel_weights(jax.lax.stop_gradient(attention))
    rows, dims = attention.shape[0], attention.ndim - 1
    shapes = (
        jax.ShapeDtypeStruct((rows, n, dims), jnp.int32),
        jax.ShapeDtypeStruct((rows, n), weights.dtype),
    )

    def host(w, key_words):
        w = np.asarray(w)
        with ieee_subnormals():  # XLA's threads flush subnormals: the cast below too
            indices, probs = atskern.sample(
                w, n, replace=replace, logits=logits, seed=_seed(key_words), strict=strict, validate=validate
            )
            return indices.astype(np.int32, copy=False), probs.astype(w.dtype, copy=False)

    key_words = jnp.stack([jnp.asarray(k0, jnp.uint32), jnp.asarray(k1, jnp.uint32)])
    indices, probs = jax.pure_callback(host, shapes, weights, key_words, vmap_method=VMAP)
    return indices, probs.astype(attention.dtype)


def _patch_shape(x_shape, offsets_shape, patch, channels_first: bool):
    batch, count = offsets_shape[:2]
    if channels_first:
        return (batch, count, x_shape[1], *patch)
    return (batch, count, *patch, x_shape[-1])


def gather(x, offsets, patch, fill, channels_first: bool):
    """``atskern.extract_patches`` as a callback (no gradient)."""
    shape = jax.ShapeDtypeStruct(_patch_shape(x.shape, offsets.shape, patch, channels_first), x.dtype)

    def host(image, starts):
        image = np.asarray(image)
        out = np.empty(shape.shape, image.dtype)
        return _host_extract(image, np.asarray(starts), patch, fill, channels_first, out)

    return jax.pure_callback(host, shape, x, offsets, vmap_method=VMAP)


def scatter_patches(grad, offsets, spatial, channels_first: bool):
    """``atskern.scatter_patches`` as a callback: float32 for 16-bit gradients, the gradient's dtype otherwise."""
    dtype = jnp.float32 if jnp.dtype(grad.dtype).itemsize < 4 else grad.dtype
    grad = grad.astype(dtype)
    image = _image_shape(grad.shape, spatial, channels_first)

    def host(g, starts):
        g = np.asarray(g)
        return _host_scatter(g, np.asarray(starts), spatial, channels_first, np.empty(image, g.dtype))

    return jax.pure_callback(host, jax.ShapeDtypeStruct(image, dtype), grad, offsets, vmap_method=VMAP)


extract = with_adjoint(gather, scatter_patches)
extract.__doc__ = ("Differentiable kernel gather: the gradient of ``x`` is :func:`scatter_patches` "
                   "(``offsets`` get none).")
