"""Patch gather (``extract_patches``), its adjoint (``scatter_patches``) and the multi-scale versions.

Both backends work on one canonical layout (see ``atskern.cpu.patches``):
images ``(B, R, S0, S1, W)`` and patches ``(B, K, R, P0, P1, Wp)``, with
missing spatial dims as leading 1s and, in channels-last, the channels folded
into the last dim. The canonical image is always a view of the caller's array,
never a copy (a strided view of a large memmap is read only where patches
fall): when channels-last pixels cannot be folded (the channel axis is not
unit-stride within a pixel), the channels become the ``R`` axis instead and
the CPU kernel copies element by element. The CUDA kernels take contiguous
images (a non-contiguous CuPy image is copied).
"""

from __future__ import annotations

import functools
import importlib
import math

import numpy as np

from . import _check_memo, _offsets
from . import _validation as v
from ._backend import GPU, array_module, backend_of, require_current_device
from ._memory import aligned_empty, output_array

WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@functools.lru_cache(maxsize=None)
def _kernels(backend: str):
    """``atskern.<backend>.patches`` (imported on first use, then looked up: no import machinery per call)."""
    return importlib.import_module(f"atskern.{backend}.patches")


def _empty(xp, shape, dtype, what: str):
    """A new output array, or a ValueError naming ``what`` sized it where it cannot be allocated."""
    return output_array(shape, dtype, what, aligned_empty if xp is np else lambda s, d: xp.empty(s, dtype=d))


def _pad3(values, fill):
    return (fill,) * (3 - len(values)) + tuple(values)


def _reshape_view(array, shape):
    """``array`` reshaped without a copy, or None where that needs one."""
    try:
        return np.reshape(array, shape, copy=False)
    except ValueError:
        return None
    except TypeError:  # NumPy before 2.1 has no copy argument: a reshape that copied shares no memory
        reshaped = array.reshape(shape)
        return reshaped if np.may_share_memory(reshaped, array) else None


def _image_view(array, layout):
    """``(B, R, S0, S1, W)`` view of images in ``layout`` and whether the channels are folded into ``W``."""
    s0, s1, s2 = _pad3(layout.spatial, 1)
    if layout.channels_first:
        return array.reshape(layout.batch, layout.channels, s0, s1, s2), False
    folded = (layout.batch, 1, s0, s1, s2 * layout.channels)
    if not isinstance(array, np.ndarray):  # CuPy: the kernels need contiguous images anyway
        return array.reshape(folded), True
    view = _reshape_view(array, folded)
    if view is not None:
        return view, True
    # channels not unit-stride within a pixel: the channel axis becomes R (a view, only unit axes added)
    return np.moveaxis(array, -1, 1).reshape(layout.batch, layout.channels, s0, s1, s2), False


def _patches_view(array, layout, folded=True):
    """``(B, K, R, P0, P1, Wp)`` view of patches in ``layout`` (channels as ``R`` when not ``folded``)."""
    p0, p1, p2 = _pad3(layout.patch, 1)
    if layout.channels_first:
        return array.reshape(layout.batch, layout.count, layout.channels, p0, p1, p2)
    if not folded:
        return np.moveaxis(array, -1, 2).reshape(layout.batch, layout.count, layout.channels, p0, p1, p2)
    return array.reshape(layout.batch, layout.count, 1, p0, p1, p2 * layout.channels)


def _canonical_offsets(xp, offsets, layout, folded=True):
    """int64 ``(B, K, 3)``: clipped to ``[-P, S]`` per dim (same pixels, no overflow), padded, last dim
    scaled to the folded unit (pixels times channels) when the channels are folded into it."""
    offsets = xp.asarray(offsets)
    if np.dtype(offsets.dtype).kind == "u":
        ceiling = min(max(layout.spatial), int(np.iinfo(offsets.dtype).max))
        offsets = xp.minimum(offsets, offsets.dtype.type(ceiling))
    offsets = offsets.astype(xp.int64)
    low = xp.asarray([-p for p in layout.patch], dtype=xp.int64)
    high = xp.asarray(layout.spatial, dtype=xp.int64)
    offsets = xp.minimum(xp.maximum(offsets, low), high)
    canonical = xp.zeros((layout.batch, layout.count, 3), dtype=xp.int64)
    canonical[:, :, 3 - layout.ndim :] = offsets
    if folded and not layout.channels_first:
        canonical[:, :, 2] *= layout.channels
    return canonical


def _gather(xp, backend, x, offsets, layout, fill_value, out):
    word = WORDS[np.dtype(x.dtype).itemsize]
    if backend == GPU:
        require_current_device(x=x, offsets=offsets, out=out)
    if out is None:
        out = _empty(xp, layout.patches_shape, x.dtype, "x's batch, the offsets and patch_size")
    if backend == GPU:  # one launch on the raw offsets: the kernel clips them and maps the layout itself
        return _kernels(backend).gather(x, offsets, layout, fill_value, out)
    x = np.asarray(x)  # a memmap becomes a plain ndarray view: nothing is read
    images, folded = _image_view(x.view(word), layout)
    fill_word = np.asarray(fill_value).reshape(1).view(word)[0]
    canonical = _canonical_offsets(xp, offsets, layout, folded)
    _kernels(backend).gather(images, canonical, fill_word, _patches_view(out.view(word), layout, folded))
    return out


def extract_patches(x, offsets, patch_size, *, fill=0, channels_first=False, out=None):
    """Gather one patch per offset from a batch of images.

    Parameters
    ----------
    x : array ``(B, *spatial, C)`` (or ``(B, C, *spatial)`` with ``channels_first``), 1 to 3 spatial dims
        Any dtype of item size 1, 2, 4 or 8 (uint8, int16, float16, bfloat16,
        float32, float64, int64, ...); only bytes are moved. A ``numpy.memmap``
        is read only where patches fall. Any strides (sliced, reversed,
        broadcast, transposed views): the CPU kernel reads them in place.
    offsets : integer array ``(B, K, D)``
        First pixel of each patch; may be negative or beyond the image.
    patch_size : int or sequence of D ints
    fill : scalar
        Value of the pixels outside ``x`` (must be representable in x's dtype).
    channels_first : bool
        Image and patch layout ``(B, C, *spatial)`` / ``(B, K, C, *patch)``.
    out : array, optional
        C-contiguous buffer of the result's shape and dtype.

    Returns
    -------
    ``(B, K, *patch_size, C)`` (or ``(B, K, C, *patch_size)``) of x's dtype;
    freshly allocated host buffers are 64-byte aligned.
    """
    signature = _check_memo.gather_signature(x, offsets, patch_size, fill, channels_first, out)
    layout, fill_value, backend = _checked_gather(signature, x, offsets, patch_size, fill, channels_first, out)
    xp = array_module(backend)
    return _gather(xp, backend, x, offsets, layout, fill_value, out)


def _check_gather(x, offsets, patch_size, fill, channels_first, out):
    layout, fill_value = v.check_gather(x, offsets, patch_size, fill, channels_first, out)
    return layout, fill_value, backend_of(x=x, offsets=offsets, out=out)


_checked_gather = _check_memo.CheckMemo(_check_gather)


def _scatter(xp, backend, grad, offsets, layout, result_dtype, out, deterministic=True):
    if backend == GPU:  # one launch on the raw offsets, every element written once (no memset)
        require_current_device(grad=grad, offsets=offsets, out=out)
        out = _empty(xp, layout.image_shape, result_dtype, "grad's batch and spatial_shape") if out is None else out
        return _kernels(backend).scatter(grad, offsets, layout, out, deterministic=deterministic)
    grad = xp.ascontiguousarray(grad.astype(result_dtype, copy=False))
    if out is None:
        out = _empty(xp, layout.image_shape, result_dtype, "grad's batch and spatial_shape")
    kernels = _kernels(backend)
    patches = _patches_view(grad, layout)
    canonical = _canonical_offsets(xp, offsets, layout)
    images, _ = _image_view(out, layout)  # out is C-contiguous: always folded
    s0, s1, _ = images.shape[2:]
    bands = kernels.scatter_bands(layout.batch, images.shape[1], s0 * s1, math.prod(patches.shape[3:]))
    kernels.scatter(patches, canonical, bands, images)
    return out


def scatter_patches(grad, offsets, spatial_shape, *, channels_first=False, out=None, deterministic=True):
    """Add patches back into images: the exact adjoint of :func:`extract_patches`.

    Parameters
    ----------
    grad : array ``(B, K, *patch, C)`` (or ``(B, K, C, *patch)``), float32 or float64
        float16 and bfloat16 are accumulated in float32.
    offsets : integer array ``(B, K, D)``
        The offsets the patches were extracted at.
    spatial_shape : sequence of D ints
        The images' spatial size.
    channels_first, out
        As in :func:`extract_patches`; ``out`` is overwritten.
    deterministic : bool
        GPU only: False allows a faster atomic-add kernel whose float sums
        depend on scheduling. The CPU kernel is always deterministic.

    Returns
    -------
    ``(B, *spatial_shape, C)`` (or ``(B, C, *spatial_shape)``), float32 or
    float64: each patch added at its offset, overlaps summed in patch order,
    parts outside the image dropped.
    """
    signature = _check_memo.scatter_signature(grad, offsets, spatial_shape, channels_first, out, deterministic)
    layout, result_dtype, deterministic, backend = _checked_scatter(signature, grad, offsets, spatial_shape,
                                                                    channels_first, out, deterministic)
    xp = array_module(backend)
    return _scatter(xp, backend, grad, offsets, layout, result_dtype, out, deterministic)


def _check_scatter(grad, offsets, spatial_shape, channels_first, out, deterministic):
    layout, result_dtype = v.check_scatter(grad, offsets, spatial_shape, channels_first, out)
    deterministic = v.require_bool(deterministic, "deterministic")
    return layout, result_dtype, deterministic, backend_of(grad=grad, offsets=offsets, out=out)


_checked_scatter = _check_memo.CheckMemo(_check_scatter)


def _as_int64(mask):
    return mask.astype(np.int64)


def _patch_offsets(xp, samples, grid, level, patch, margins, dtype=np.int32):
    """Exact offsets (:mod:`atskern._offsets`), clipped to the range of ``dtype``: int32 for :func:`patch_offsets`,
    int64 inside the multiscale functions (a level may be longer than int32 can address)."""
    bound = np.iinfo(dtype).max
    if samples.dtype.kind == "u":  # uint64 cells past 2**63 would wrap in the cast: clamp them first
        samples = xp.minimum(samples, np.uint64(_offsets.SAMPLE_LIMIT))
    cells = xp.clip(samples.astype(xp.int64), -_offsets.SAMPLE_LIMIT, _offsets.SAMPLE_LIMIT)
    columns = []
    for d, margin in enumerate(margins):
        args = (int(grid[d]), int(level[d]), int(patch[d]), margin.numerator, margin.denominator)
        if _offsets.fits_int64(*args):
            start = _offsets.start(cells[..., d], *args, to_int=_as_int64)
        else:  # Python ints: exact beyond int64, slow (huge margin denominators)
            host = cells[..., d].get() if xp is not np else cells[..., d]
            start = _offsets.start(host.astype(object), *args, to_int=_as_int64)
            start = xp.asarray(np.clip(start, -bound, bound).astype(np.int64))
        columns.append(xp.clip(start, -bound, bound))
    return xp.stack(columns, axis=-1).astype(dtype)


def patch_offsets(samples, grid_shape, level_shape, patch_size, *, margin=0.0):
    """First pixel of the patch around each sampled grid cell, in one image level.

    A cell ``s`` of a grid of ``G`` cells (per dim) has its centre at
    ``c = L * (m + (s + 0.5) / G * (1 - 2 m))`` in a level of ``L`` pixels,
    with ``m = margin``; its patch of ``P`` pixels starts at
    ``rint(c - P / 2)`` (round half to even), computed in integer arithmetic,
    so exact ties round to even (float arithmetic misses them).

    ``margin``: a number for every dim, one number per dim, or the pair
    ``(receptive_field, low_shape)`` for ``receptive_field / 2 / low_shape[d]``
    (the margin of an attention network with a ``receptive_field``-pixel
    receptive field and no padding over a ``low_shape`` view). A
    ``fractions.Fraction`` or the pair is exact; a float is read as the
    simplest fraction (denominator up to 2**24) that rounds to it, so
    ``3 / 2 / 50`` means 3/100. Each margin lies in ``[0, 0.5)``.

    Returns int32 ``(B, K, D)``, on the samples' device (samples beyond
    ``+-2**31`` are clamped there first; offsets are clipped to int32, so
    a level or patch longer than ``2**31 - 1`` pixels is refused).
    """
    grid = v.check_samples(samples, grid_shape)
    ndim = len(grid)
    level = v.check_shape(level_shape, ndim, "level_shape")
    patch = v.check_patch_size(patch_size, ndim)
    v.check_int32_offsets(level, patch)
    margin = v.check_margin(margin, ndim)
    xp = array_module(backend_of(samples=samples))
    return _patch_offsets(xp, samples, grid, level, patch, margin)


def _multiscale_plan(arrays, samples, grid_shape, patch_sizes, margin, name):
    arrays = v.check_levels(arrays, name)
    grid = v.check_samples(samples, grid_shape)
    patch_sizes = [v.check_patch_size(p, len(grid), f"patch_sizes[{i}]") for i, p in
                   enumerate(v.check_per_level(patch_sizes, len(arrays), "patch_sizes"))]
    return arrays, grid, patch_sizes, v.check_margin(margin, len(grid))


def extract_multiscale(levels, samples, grid_shape, patch_sizes, *, margin=0.0, fill=0, channels_first=False):
    """Gather the patch around each sample from every level of an image pyramid.

    ``levels`` is a list of image batches (as ``x`` of :func:`extract_patches`,
    same batch size and spatial rank), ``samples`` integer ``(B, K, D)`` grid
    cells of ``grid_shape``, ``patch_sizes`` one patch size per level. The
    offsets of each level come from :func:`patch_offsets`. Returns a list with
    one patch array per level. All arguments are checked before any gather.
    """
    levels, grid, patch_sizes, margin = _multiscale_plan(levels, samples, grid_shape, patch_sizes, margin, "levels")
    channels_first = v.check_channels_first(channels_first)
    backend = backend_of(samples=samples, **{f"levels[{i}]": x for i, x in enumerate(levels)})
    xp = array_module(backend)
    plans = []
    for i, (x, patch) in enumerate(zip(levels, patch_sizes)):
        v.require_array(x, f"levels[{i}]")
        if x.ndim != len(grid) + 2:
            raise ValueError(f"levels[{i}] must have {len(grid)} spatial dims like samples, got shape {tuple(x.shape)}")
        batch = int(x.shape[0])
        v.check_samples(samples, grid, batch)
        spatial = x.shape[2:] if channels_first else x.shape[1:-1]
        offsets = _patch_offsets(xp, samples, grid, spatial, patch, margin, np.int64)
        plans.append((x, offsets) + v.check_gather(x, offsets, patch, fill, channels_first, None, f"levels[{i}]"))
    return [_gather(xp, backend, x, offsets, layout, fill_value, None) for x, offsets, layout, fill_value in plans]


def scatter_multiscale(grads, samples, grid_shape, level_shapes, patch_sizes, *, margin=0.0, channels_first=False):
    """The adjoint of :func:`extract_multiscale`: one gradient image per level.

    ``grads`` holds one patch gradient per level, ``level_shapes`` the spatial
    shape of each level. Returns a list of ``scatter_patches`` results.
    """
    grads, grid, patch_sizes, margin = _multiscale_plan(grads, samples, grid_shape, patch_sizes, margin, "grads")
    channels_first = v.check_channels_first(channels_first)
    level_shapes = v.check_per_level(level_shapes, len(grads), "level_shapes")
    backend = backend_of(samples=samples, **{f"grads[{i}]": g for i, g in enumerate(grads)})
    xp = array_module(backend)
    plans = []
    for i, (g, patch, shape) in enumerate(zip(grads, patch_sizes, level_shapes)):
        v.require_array(g, f"grads[{i}]")
        shape = v.check_shape(shape, len(grid), f"level_shapes[{i}]")
        v.check_samples(samples, grid, int(g.shape[0]) if g.ndim else None, "the grads")
        offsets = _patch_offsets(xp, samples, grid, shape, patch, margin, np.int64)
        layout, result_dtype = v.check_scatter(g, offsets, shape, channels_first, None, f"grads[{i}]")
        if layout.patch != patch:
            raise ValueError(f"grads[{i}] holds patches of size {layout.patch} but patch_sizes[{i}] is {patch}")
        plans.append((g, offsets, layout, result_dtype))
    return [_scatter(xp, backend, g, offsets, layout, dtype, None) for g, offsets, layout, dtype in plans]
