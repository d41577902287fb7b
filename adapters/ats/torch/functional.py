"""Functional API of ``ats.torch``: sampling, patch extraction and the ATS estimator on torch tensors.

Images are channels-first, ``(B, C, *spatial)`` (PyTorch's layout) unless
``channels_first=False``; attention maps are ``(B, *grid)``; 1 to 3 spatial
dimensions.
"""

from __future__ import annotations

import functools
import math
import numbers

import numpy as np
import torch

from atskern import _offsets, _validation

from .. import _errors
from .._layer_args import MODES  # noqa: F401 (the layers' modes, shared by every front end)
from . import _ops


# --- argument checks (Python, before any kernel) --------------------------------------------


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# one size check for every front end (atskern's): a single int for every dim, or one positive int per dim
size_tuple = _validation.check_patch_size


def require_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_attention(attention, n: int, without_replacement: bool) -> int:
    """Grid dims D of an attention map ``(B, *grid)``; ValueErrors name ``attention`` or ``n_samples``."""
    require_tensor(attention, "attention")
    if attention.dim() not in (2, 3, 4):
        raise ValueError(
            f"attention must be (batch, *grid) with 1 to 3 grid dimensions (rank 2 to 4), got shape {tuple(attention.shape)}"
        )
    if not attention.is_floating_point():
        raise TypeError(f"attention must be a floating tensor, got {attention.dtype}")
    if attention.shape[0] == 0 or 0 in attention.shape[1:]:
        raise ValueError(f"attention must not be empty (at least one row and one position), got shape {tuple(attention.shape)}")
    positions = math.prod(attention.shape[1:])
    if without_replacement and n > positions:
        raise ValueError(
            f"n_samples={n} is larger than the {positions} positions of the attention map {tuple(attention.shape[1:])}; "
            "sampling without replacement (or top-k) cannot draw more (use replace=True)"
        )
    return attention.dim() - 1


# --- sampling ---------------------------------------------------------------------------------


@torch.compiler.disable
def random_key(generator: torch.Generator | None = None) -> torch.Tensor:
    """A CPU int64 scalar seed for the sampling kernel, drawn from ``generator`` (torch's default one when None)."""
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=generator)


def key_tensor(key) -> torch.Tensor:
    """A sampling key as a CPU int64 scalar: an int in [0, 2**64) or such a tensor (int64 wraps around), or a
    one-element CUDA int64 tensor (a device key, returned as it is)."""
    if isinstance(key, torch.Tensor) and key.device.type == "cuda":
        if key.numel() != 1 or key.dtype != torch.int64:
            raise TypeError(f"a CUDA key must be a one-element int64 tensor, got {key.dtype} {tuple(key.shape)}")
        return key
    if isinstance(key, torch.Tensor):
        if key.numel() != 1 or key.dtype != torch.int64 or key.device.type != "cpu":
            raise TypeError(f"key must be an int or a CPU int64 scalar tensor, got {key.dtype} {tuple(key.shape)} on {key.device}")
        return key.reshape(())
    if isinstance(key, bool) or not isinstance(key, numbers.Integral) or not 0 <= key < 2**64:
        raise TypeError(f"key must be an int in [0, 2**64) or a CPU int64 scalar tensor, got {key!r}")
    key = int(key)
    return torch.tensor(key - 2**64 if key >= 2**63 else key, dtype=torch.int64)


def _ravel(indices: torch.Tensor, grid) -> torch.Tensor:
    """Row-major flat index of ``(..., D)`` grid coordinates (Python-int sizes: no host-to-device copies)."""
    flat = indices[..., 0]
    for d in range(1, len(grid)):
        flat = flat * int(grid[d]) + indices[..., d]
    return flat


def _unravel(flat: torch.Tensor, grid) -> torch.Tensor:
    coords = []
    for size in reversed(grid):
        coords.append(flat % int(size))
        flat = flat // int(size)
    return torch.stack(coords[::-1], dim=-1)


def sample(attention, n_samples, *, replace=False, key=None, deterministic=False, strict=False, validate=True):
    """Sample ``n_samples`` positions per row of an attention map.

    Parameters
    ----------
    attention : tensor ``(B, *grid)``, 1 to 3 grid dimensions, floating
        Non-negative weights (e.g. from :class:`~ats.torch.SampleSoftmax`);
        rows need not sum exactly to 1.
    n_samples : int
    replace : bool
        Independent draws, or (default) successive sampling without replacement.
    key : None, int in [0, 2**64) or CPU int64 scalar tensor
        Seed of atskern's counter-based generator: the same key and weights
        give the same draws on the CPU and on CUDA. None draws one from
        torch's default generator (so ``torch.manual_seed`` makes runs repeat).
        On CUDA, a one-element int64 CUDA tensor is a *device key*: the kernels
        read it on the device, and it is advanced by one in place after the
        draw, so a CUDA graph that captured it draws fresh positions on every
        replay (a host key is baked into a captured graph).
    validate : bool
        Check the attention rows (default; in top-k mode too). On CUDA the check is asynchronous
        (nothing waits for the device): a bad row raises a device-side assert
        at the next synchronization, which leaves the process's CUDA context
        unusable, as torch's own device asserts do; ``atskern.sample`` on the
        CPU tensors names the row. ``validate=False`` opts out: rows
        with NaN/inf, negative weights or no positive weight then give in-range
        indices (and whatever their gather gives as sampled attention).
    deterministic : bool
        Take the ``n_samples`` largest weights, largest first, ties to the lower
        position (inference; as ``tf.math.top_k`` and ``lax.top_k``).
    strict : bool
        Without replacement, a row with fewer than ``n_samples`` positive
        weights is drawn as all its positive cells followed by
        zero-probability fillers (estimator weight exactly 0; DESIGN.md R1).
        ``strict=True`` raises a ValueError instead.

    Returns
    -------
    indices : int64 ``(B, n_samples, D)``
        Grid coordinates in draw order (no gradient).
    sampled_attention : ``(B, n_samples)``, attention's dtype
        Each drawn position's normalized weight, a torch gather of
        ``attention`` (so its gradient flows back to ``attention``).
    """
    n = positive_int(n_samples, "n_samples")
    for value, name in ((replace, "replace"), (deterministic, "deterministic"), (strict, "strict"),
                        (validate, "validate")):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    check_attention(attention, n, not replace or deterministic)
    grid = tuple(attention.shape[1:])
    flat = attention.reshape(attention.shape[0], -1)
    if deterministic:
        rows = flat.detach()
        if validate and torch.jit.is_tracing():
            rows = _checked_rows(rows, n, strict)
        elif validate:
            _check_rows(rows, n, strict)
        flat_index = top_indices(rows, n)
        indices = _unravel(flat_index, grid)
    else:
        weights = attention.detach()
        if weights.dtype not in (torch.float32, torch.float64):
            weights = weights.to(torch.float32)
        key = random_key() if key is None else key_tensor(key)
        if key.device.type == "cuda" and key.device != attention.device:
            raise ValueError(f"a CUDA key must be on attention's device {attention.device}, got {key.device}")
        try:
            indices = _ops.sample_patches_indices(weights.contiguous(), key, n, replace, strict,
                                                      validate).to(torch.int64)
        except ValueError as error:
            raise _errors.sampling_error(error) from None
        if key.device.type == "cuda":
            key.add_(1)  # the device key's counter: the next draw (or graph replay) uses the next seed
        flat_index = _ravel(indices, grid)
    return indices, _normalized_gather(flat, flat_index)


def top_indices(flat, n: int):
    """The positions of the ``n`` largest entries of each row of ``flat`` ``(B, N)``, largest first, ties to the
    lower position: the order of ``tf.math.top_k`` and ``lax.top_k`` (``torch.topk`` orders ties as it likes, so
    a uniform map took other cells than on TensorFlow or JAX)."""
    kth = torch.topk(flat, n, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above = flat > kth
    tied = flat == kth
    wanted = n - above.sum(dim=1, keepdim=True)  # of the tied entries: the lowest positions
    chosen = above | (tied & (torch.cumsum(tied, dim=1) <= wanted))
    size = flat.shape[1]
    rank = torch.where(chosen, size - torch.arange(size, device=flat.device), -1)
    index = torch.topk(rank, n, dim=1, sorted=True).indices  # the n chosen, by increasing position
    return index.gather(1, torch.sort(flat.gather(1, index), dim=1, descending=True, stable=True).indices)


def _normalized_gather(flat, flat_index):
    """``flat[b, i] / sum(flat[b])`` in float64 over weights divided by the row's largest (differentiable; the
    detached largest cancels), cast back: a row's sum that overflows the attention's dtype (float16 weights of 20
    over 64², float64 near 1e308) no longer makes every sampled attention 0."""
    wide = flat.to(torch.float64)
    top = wide.detach().amax(dim=1, keepdim=True)
    top = torch.where(top > 0, top, 1.0)  # an all-zero row (validate=False): 0 / 0 as before
    scaled = wide / top
    return (scaled.gather(1, flat_index) / scaled.sum(dim=1, keepdim=True)).to(flat.dtype)


def _check_rows(flat, n: int, strict: bool):
    """Top-k mode's row checks, as sampling's: a ValueError naming the first bad row (NaN/inf, negative weights,
    no positive weight; with ``strict``, fewer than ``n`` positive); asynchronous on a device or in a compiled
    graph (``torch._assert_async``, :data:`_ops.INVALID_ROWS`)."""
    nonfinite = (~torch.isfinite(flat)).sum(dim=1)
    negative = (flat < 0).sum(dim=1)
    positive = (flat > 0).sum(dim=1)
    need = n if strict else 1
    if flat.device.type != "cpu" or torch.compiler.is_compiling():
        ok = (nonfinite.amax() == 0) & (negative.amax() == 0) & (positive.amin() >= need)
        torch._assert_async(ok, _ops.INVALID_ROWS)
        return
    status = torch.stack([nonfinite, negative, positive, torch.zeros_like(positive)], dim=1).numpy()
    try:
        _validation.check_rows(status, n, False, False, strict)
    except ValueError as error:
        raise _errors.sampling_error(error) from None


# --- patches ----------------------------------------------------------------------------------


def _int64(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.int64)


def _int64_cells(samples: torch.Tensor) -> torch.Tensor:
    """Integer ``samples`` as int64, a uint64 cell of 2**63 or more as int64's largest (a plain cast wrapped it to
    a negative cell, whose patch then held real pixels instead of ``fill``)."""
    if samples.dtype != torch.uint64:
        return samples.to(torch.int64)
    bits = samples.view(torch.int64)
    return torch.where(bits < 0, torch.iinfo(torch.int64).max, bits)


def patch_offsets(samples, grid_shape, level_shape, patch_size, *, margin=0):
    """First pixel of the patch around each sampled cell, in one image level (as ``atskern.patch_offsets``).

    A cell ``s`` of a grid of ``G`` cells has its centre at
    ``c = L * (m + (s + 0.5) / G * (1 - 2 m))`` in a level of ``L`` pixels;
    the patch of ``P`` pixels starts at ``round(c - P / 2)`` (half to even),
    computed in int64 torch ops exactly as atskern does (exact .5 ties).
    ``margin``: a number or ``fractions.Fraction``, one per dim, or the pair
    ``(receptive_field, low_shape)`` for ``receptive_field / 2 / low_shape[d]``;
    each in ``[0, 0.5)`` (under ``torch.compile(dynamic=True)`` a float margin
    becomes a symbolic number, which the exact arithmetic cannot trace: pass a
    ``Fraction``, or none). ``samples``: an integer tensor ``(B, K, D)``.
    Returns int32 ``(B, K, D)`` on the samples' device (a level or patch
    longer than ``2**31 - 1`` pixels, which int32 cannot address, is refused).
    """
    grid, level, patch, margins = _offset_arguments(samples, grid_shape, level_shape, patch_size, margin)
    _validation.check_int32_offsets(level, patch)
    return _offsets_of(samples, grid, level, patch, margins, torch.int32, _cells_in_grid(samples, grid))


def sampled_offsets(indices, grid_shape, level_shape, patch_size, *, margin=0):
    """:func:`patch_offsets` of ``indices`` from :func:`sample`, which lie in the grid: on CUDA too, eager calls then
    look each cell's offset up in a table (one op per dim instead of about twenty; a cell outside the grid would
    fail torch's index check, never read out of bounds)."""
    grid, level, patch, margins = _offset_arguments(indices, grid_shape, level_shape, patch_size, margin)
    _validation.check_int32_offsets(level, patch)
    return _offsets_of(indices, grid, level, patch, margins, torch.int32, True)


TABLE_CELLS = 1 << 16
"""Largest grid side whose offsets eager calls look up in a cached table (an int32 or int64 per cell) instead of
computing them."""


def _offsets_of(samples, grid, level, patch, margins, dtype, in_grid: bool) -> torch.Tensor:
    """The offsets of checked arguments in ``dtype`` (int32: clipped to int32; int64: exact), from cached
    per-dim tables where the cells lie in the grid (``in_grid``) and the call is eager, else by the exact
    arithmetic in torch ops (which ``torch.compile`` fuses, and traces and CUDA graphs record)."""
    if in_grid and _table_lookup_allowed(samples, grid):
        cells = samples if samples.dtype == torch.int64 else samples.to(torch.int64)
        dims = samples.shape[-1]
        columns = [_offset_table(*_exact_arguments(d, grid, level, patch, margins), samples.device, dtype)[cells[..., d]]
                   for d in range(dims)]
        return torch.stack(columns, dim=-1)
    offsets = _exact_offsets(samples, grid, level, patch, margins)
    if dtype == torch.int64:
        return offsets
    bound = _offsets.INT32_MAX
    return offsets.clamp(-bound, bound).to(torch.int32)


_LOOKUP_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _table_lookup_allowed(samples, grid) -> bool:
    """Whether :func:`_offsets_of` may look offsets up: an eager call (not traced, compiled, under ``torch.func``
    or captured into a CUDA graph, where the table's first copy to the device cannot run) on cells of a signed or
    uint8 dtype, in grids of at most :data:`TABLE_CELLS` cells a side."""
    if samples.dtype not in _LOOKUP_DTYPES or max(grid) > TABLE_CELLS:
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(samples):
        return False
    return not (samples.is_cuda and torch.cuda.is_current_stream_capturing())


def _cells_in_grid(samples, grid) -> bool:
    """Whether every cell of CPU ``samples`` lies in the grid (False on other devices: the check would wait for
    the device)."""
    if samples.device.type != "cpu" or samples.numel() == 0 or not _table_lookup_allowed(samples, grid):
        return False
    low = samples.amin(dim=(0, 1)).tolist()
    high = samples.amax(dim=(0, 1)).tolist()
    return min(low) >= 0 and all(h < g for h, g in zip(high, grid))


@functools.lru_cache(maxsize=64)
def _offset_table(grid: int, level: int, patch: int, num: int, den: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """The offsets of cells ``0 .. grid - 1`` of one dim (``atskern._offsets.table``, clipped to int32 for int32),
    on ``device``: made once per set of arguments (on a GPU its copy waits for the device, once)."""
    starts = _offsets.table(grid, level, patch, num, den)  # int64: the caller checked fits_int64
    if dtype == torch.int32:
        starts = np.clip(starts, -_offsets.INT32_MAX, _offsets.INT32_MAX).astype(np.int32)
    return torch.from_numpy(starts).to(device)


def _offset_arguments(samples, grid_shape, level_shape, patch_size, margin):
    """:func:`patch_offsets`' arguments checked: ``(grid, level, patch, margins)``."""
    require_tensor(samples, "samples")
    if samples.dim() != 3 or samples.shape[-1] not in (1, 2, 3):
        raise ValueError(f"samples must be (batch, K, D) with D in 1..3, got shape {tuple(samples.shape)}")
    if samples.dtype.is_floating_point or samples.dtype.is_complex or samples.dtype == torch.bool:
        raise TypeError(f"samples must be an integer tensor (grid cells, e.g. from sample()), got {samples.dtype}")
    dims = samples.shape[-1]
    if torch.jit.is_tracing():  # a traced shape's entries are 0-d tensors (the trace keeps the sizes it saw)
        grid_shape, level_shape = (tuple(int(s) for s in shape) for shape in (grid_shape, level_shape))
    grid = _validation.check_shape(tuple(grid_shape), dims, "grid_shape")
    level = _validation.check_shape(tuple(level_shape), dims, "level_shape")
    patch = size_tuple(patch_size, dims)
    return grid, level, patch, _validation.check_margin(margin, dims)


def _exact_offsets(samples, grid, level, patch, margins) -> torch.Tensor:
    """The int64 offsets of :func:`patch_offsets`' checked arguments, not clipped (extract_multiscale's: a level
    longer than int32 can address keeps them exact)."""
    dims = samples.shape[-1]
    cells = _int64_cells(samples).clamp(-_offsets.SAMPLE_LIMIT, _offsets.SAMPLE_LIMIT)
    starts = []
    for d in range(dims):
        args = _exact_arguments(d, grid, level, patch, margins)
        starts.append(_offsets.start(cells[..., d], *args, to_int=_int64))
    return torch.stack(starts, dim=-1)


def _exact_arguments(d: int, grid, level, patch, margins) -> tuple[int, ...]:
    """Dim ``d``'s ``(grid, level, patch, num, den)``, or a ValueError where int64 cannot hold its arithmetic."""
    args = (grid[d], level[d], patch[d], margins[d].numerator, margins[d].denominator)
    if not _offsets.fits_int64(*args):
        raise ValueError(f"patch_offsets: grid_shape, level_shape, patch_size and margin of dim {d} are too "
                         f"large for exact int64 arithmetic ({args}); atskern.patch_offsets and "
                         "extract_multiscale compute them in Python integers")
    return args


def _check_images(x, name: str, channels_first: bool) -> tuple[int, ...]:
    require_tensor(x, name)
    if x.dim() not in (3, 4, 5):
        layout = "(batch, channels, *spatial)" if channels_first else "(batch, *spatial, channels)"
        raise ValueError(f"{name} must be {layout} with 1 to 3 spatial dimensions (rank 3 to 5), got shape {tuple(x.shape)}")
    return tuple(x.shape[2:]) if channels_first else tuple(x.shape[1:-1])


def _checked_fill(fill, dtype: torch.dtype):
    """``fill`` as an exact Python scalar for the kernel (ints never pass through float), or a
    ValueError/TypeError naming ``fill`` when ``dtype`` cannot hold it (atskern's rule, in plain Python so
    that ``torch.compile`` traces it)."""
    if isinstance(fill, torch.Tensor):
        if fill.numel() != 1:
            raise TypeError(f"fill must be a scalar number, got a tensor of shape {tuple(fill.shape)}")
        fill = fill.item()
    if isinstance(fill, complex) or not isinstance(fill, numbers.Real):
        raise TypeError(f"fill must be a real number, got {fill!r} ({type(fill).__name__})")
    if dtype == torch.bool:
        if fill not in (0, 1):
            raise _unrepresentable(fill, dtype)
        return bool(fill)
    if isinstance(fill, bool) and dtype != torch.bool:
        raise TypeError(f"fill must be a number, got {fill!r}")
    if dtype.is_floating_point:
        value = float(fill)
        if value - value == 0 and abs(value) > torch.finfo(dtype).max:  # finite (math.isfinite: not on a SymFloat)
            raise _unrepresentable(fill, dtype)
        return value
    if not (isinstance(fill, numbers.Integral) or float(fill).is_integer()):
        raise _unrepresentable(fill, dtype)
    value = int(fill)
    info = torch.iinfo(dtype)
    if not info.min <= value <= info.max:
        raise _unrepresentable(fill, dtype)
    return value


def _unrepresentable(fill, dtype: torch.dtype) -> ValueError:
    """The error for a ``fill`` that ``dtype`` cannot hold (built only when raised: under ``torch.compile`` a
    symbolic ``fill``'s message cannot be traced)."""
    return ValueError(f"fill={fill!r} cannot be represented in the images' dtype {dtype}")


def extract_patches(x, offsets, patch_size, *, fill=0, channels_first=True):
    """Gather one patch per offset from a batch of images, differentiably.

    ``x`` ``(B, C, *spatial)`` (or ``(B, *spatial, C)`` with
    ``channels_first=False``), any real, integer or bool dtype of item size 1, 2, 4 or 8 (complex and float8
    data through an integer view of the same size);
    ``offsets`` integer ``(B, K, D)``, each patch's first pixel (pixels outside
    ``x`` take ``fill``). Returns ``(B, K, C, *patch_size)`` (or
    ``(B, K, *patch_size, C)``). The gradient scatters the patch gradients
    back with ``atskern.scatter_patches`` (only when ``x`` requires it).
    """
    channels_first = _validation.check_channels_first(channels_first)
    spatial = _check_images(x, "x", channels_first)
    require_tensor(offsets, "offsets")
    if offsets.dim() != 3 or offsets.shape[0] != x.shape[0] or offsets.shape[2] != len(spatial):
        raise ValueError(
            f"offsets must be (batch, K, {len(spatial)}) for x of shape {tuple(x.shape)}, got {tuple(offsets.shape)}"
        )
    if offsets.dtype.is_floating_point or offsets.dtype == torch.bool:
        raise TypeError(f"offsets must be an integer tensor, got {offsets.dtype}")
    size = size_tuple(patch_size, len(spatial))
    if x.dtype.is_complex or (x.dtype.is_floating_point and x.dtype.itemsize == 1):
        raise TypeError(f"x must be a real, integer or bool tensor, got {x.dtype}; gather complex or float8 data "
                        "through an integer view of the same item size (x.view(torch.int64), x.view(torch.uint8))")
    fill = _checked_fill(fill, x.dtype)
    return _ops.extract_patches(x, offsets.contiguous(), list(size), fill, channels_first)


def extract_multiscale(levels, samples, grid_shape, patch_sizes, *, margin=0, fill=0, channels_first=True):
    """Gather the patch around each sampled cell from every level of an image pyramid.

    ``levels`` is a list of image batches, ``samples`` integer ``(B, K, D)``
    cells of ``grid_shape``, ``patch_sizes`` one size per level. Each level's
    offsets come from :func:`patch_offsets`, and each level's gradient is
    scattered back into it. Returns one patch tensor per level.
    """
    levels = _validation.check_levels(levels, "levels")
    if not isinstance(patch_sizes, (list, tuple)) or len(patch_sizes) != len(levels):
        raise ValueError(f"patch_sizes must hold one patch size per level ({len(levels)}), got {patch_sizes!r}")
    channels_first = _validation.check_channels_first(channels_first)
    patches = []
    require_tensor(samples, "samples")
    for i, (x, size) in enumerate(zip(levels, patch_sizes)):
        spatial = _check_images(x, f"levels[{i}]", channels_first)
        if samples.dim() and samples.shape[0] != x.shape[0]:
            raise ValueError(f"samples and levels[{i}] must share the batch size, got {samples.shape[0]} and {x.shape[0]}")
        grid, level, patch, margins = _offset_arguments(samples, grid_shape, spatial, size, margin)
        offsets = _offsets_of(samples, grid, level, patch, margins, torch.int64, _cells_in_grid(samples, grid))
        patches.append(extract_patches(x, offsets, size, fill=fill, channels_first=channels_first))
    return patches


# --- the estimator ----------------------------------------------------------------------------


def _mass_left(probs64: torch.Tensor, unit: float) -> torch.Tensor:
    """``pm_k``: ``1 - sum_{j<k} a_j``, or ``sum_{j>=k} a_j`` where that is lost in the rounding of the
    probabilities (``unit`` per entry; ``atskern.estimator._mass_left``)."""
    n = probs64.shape[1]
    before = torch.cumsum(probs64, dim=1) - probs64
    still_to_come = torch.flip(torch.cumsum(torch.flip(probs64, (1,)), dim=1), (1,))
    left = 1.0 - before
    noise = 2.0 * unit * before + torch.arange(1, n + 1, dtype=torch.float64, device=probs64.device) * 2.0**-53
    return torch.where(left > noise, torch.maximum(left, still_to_come), still_to_come)


def _coefficients(probs: torch.Tensor, replace: bool):
    """``c_k`` of ``F = sum_k c_k f_k`` and the attention-gradient scale, float64 ``(B, n)``;
    0 for both at a filler (``probs == 0``: rule R3 of DESIGN.md), with no division by zero."""
    probs64 = probs.to(torch.float64)
    n = probs64.shape[1]
    drawn = probs64 > 0
    safe = torch.where(drawn, probs64, 1.0)
    if replace:
        return drawn.to(torch.float64) * (1.0 / n), torch.where(drawn, 1.0 / (n * safe), 0.0)
    mass_left = _mass_left(probs64, torch.finfo(probs.dtype).eps / 2)
    remaining = torch.arange(n - 1, -1, -1, dtype=torch.float64, device=probs64.device)
    weights = torch.where(drawn, (mass_left + remaining * probs64) / n, 0.0)
    return weights, torch.where(drawn, (mass_left / safe + remaining) / n, 0.0)


BAD_PROBS_ON_DEVICE = ("ats.torch.expectation: probs must be finite, in [0, 1] and, without replacement, sum to "
                       "at most 1 per row (checked on the device; CPU tensors name the row)")


def _check_probs(probs: torch.Tensor, replace: bool):
    """R3: ``probs`` finite, in [0, 1] and, without replacement, rows summing to at most 1 + rounding
    (1e-6 for float64, ``n`` times the dtype's epsilon, at least ``2**-20``, otherwise); a ValueError names the row."""
    p64 = probs.detach().to(torch.float64)
    inside = (p64 >= 0) & (p64 <= 1)  # NaN and inf fail one of them
    n = probs.shape[1]
    tolerance = 1e-6 if probs.dtype == torch.float64 else n * max(2.0**-20, torch.finfo(probs.dtype).eps)
    ok = inside.all()
    if not replace:  # a row's sum decides only where every entry is inside
        ok = ok & (p64.sum(dim=1) <= 1 + tolerance).all()
    if probs.is_cuda:  # no host round trip (CUDA-graph capturable): a device assert, raised at the next sync
        torch._assert_async(ok, BAD_PROBS_ON_DEVICE)
    elif not bool(ok):
        raise _validation.explain_bad_probs(p64.cpu().numpy(), replace, tolerance)


# Under torch.jit.trace a check in Python runs once, at trace time, and torch._assert_async is dropped (nothing uses
# its result): the checks a trace must repeat are ops that return a checked copy, which what follows reads.


@torch.library.custom_op("atskern::checked_rows", mutates_args=())
def _checked_rows(flat: torch.Tensor, n: int, strict: bool) -> torch.Tensor:
    """:func:`_check_rows` as an op: the rows, checked, as a copy."""
    _check_rows(flat, n, strict)
    return flat.clone()


@torch.library.custom_op("atskern::checked_probs", mutates_args=())
def _checked_probs(probs: torch.Tensor, replace: bool) -> torch.Tensor:
    """:func:`_check_probs` as an op: ``probs``, checked, as a copy (its gradient passes through)."""
    _check_probs(probs, replace)
    return probs.clone()


@_checked_rows.register_fake
def _(flat, n, strict):
    return torch.empty_like(flat)


@_checked_probs.register_fake
def _(probs, replace):
    return torch.empty_like(probs)


_checked_probs.register_autograd(lambda ctx, grad: (grad, None))


def _expand(weights: torch.Tensor, dims: int) -> torch.Tensor:
    return weights.reshape(weights.shape + (1,) * (dims - 2))


class _Expectation(torch.autograd.Function):
    """The estimate ``sum_k c_k f_k`` with the unbiased gradients of ``atskern.expectation_grad``; a function of
    the new style (``setup_context``, a generated vmap rule), so ``torch.func`` transforms take it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(features, probs, replace):
        weights, scale = _coefficients(probs, replace)  # (B, n): computed once per step, kept for the backward
        return (_expand(weights.to(features.dtype), features.dim()) * features).sum(dim=1), weights, scale

    @staticmethod
    def setup_context(ctx, inputs, output):
        features, probs, replace = inputs
        _, weights, scale = output
        ctx.mark_non_differentiable(weights, scale)
        ctx.save_for_backward(features, probs, weights, scale)
        ctx.replace = replace
        ctx.probs_dtype = probs.dtype

    @staticmethod
    def backward(ctx, grad, _grad_weights, _grad_scale):
        features, probs, weights, scale = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a second derivative also runs through the coefficients
            weights, scale = _coefficients(probs, ctx.replace)
        grad_features = grad_probs = None
        upstream = grad.unsqueeze(1)
        if ctx.needs_input_grad[0]:
            grad_features = _expand(weights.to(features.dtype), features.dim()) * upstream
        if ctx.needs_input_grad[1]:
            products = upstream.to(torch.float64) * features.to(torch.float64)
            inner = products.reshape(scale.shape[0], scale.shape[1], math.prod(products.shape[2:])).sum(dim=2)
            grad_probs = (scale * inner).to(ctx.probs_dtype)
        return grad_features, grad_probs, None


def expectation(features, probs, *, replace=False, validate=True):
    """The ATS estimate of ``sum_i a_i f_i`` from ``n`` sampled features, with unbiased gradients.

    ``features`` ``(B, n, *F)`` and ``probs`` ``(B, n)`` (the sampled attention
    in draw order) give ``(B, *F)``. The gradients are exactly those of
    ``atskern.expectation_grad``: ``c_k g`` for the features and, for
    ``probs``, ``w (pm_k / a_k + n - 1 - k) <g, f_k>`` without replacement or
    ``w <g, f_k> / a_k`` with (``w = 1/n``, ``pm_k = 1 - sum_{j<k} a_j``), the
    unbiased estimate of ``<g, f_i>`` rather than the derivative of the value.
    ``replace`` must match how the positions were drawn.

    A drawn entry with ``probs == 0`` (a filler of a short row, or a
    probability its dtype cannot hold; DESIGN.md R1-R3) gets coefficient 0
    and both gradients exactly 0. ``validate`` checks that ``probs`` are
    finite, in [0, 1] and, without replacement, sum to at most 1 per row (a
    ValueError naming the row; on CUDA a device-side assert instead, with no
    host round trip, raised at the next synchronization; skipped while
    ``torch.compile`` traces and under ``torch.func.vmap``, whose values
    cannot steer Python). ``torch.func`` transforms (``vmap``, ``grad``,
    ``jacrev``) and second derivatives work.
    """
    require_tensor(features, "features")
    require_tensor(probs, "probs")
    if probs.dim() != 2:
        raise ValueError(f"probs must be (batch, n), got shape {tuple(probs.shape)}")
    if features.dim() < 2 or tuple(features.shape[:2]) != tuple(probs.shape):
        raise ValueError(f"features must be (batch, n, ...) = {tuple(probs.shape)} + (...), got {tuple(features.shape)}")
    if not features.is_floating_point() or not probs.is_floating_point():
        raise TypeError(f"features and probs must be floating, got {features.dtype} and {probs.dtype}")
    if not isinstance(replace, bool):
        raise TypeError(f"replace must be True or False, got {replace!r}")
    if probs.shape[1] == 0:
        raise ValueError(f"probs must not be empty, got shape {tuple(probs.shape)}")
    if validate and torch.jit.is_tracing():
        probs = _checked_probs(probs, replace)
    elif validate and not torch.compiler.is_compiling() and not _under_vmap(probs):
        _check_probs(probs, replace)
    return _Expectation.apply(features, probs, replace)[0]


def _under_vmap(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is batched by ``torch.func.vmap`` at any level of ``torch.func`` wrappers (``vmap(grad(f))``
    wraps the batched tensor in a gradient-tracking one): its values cannot steer Python control flow."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_batchedtensor(tensor):
            return True
        tensor = functorch.get_unwrapped(tensor)
    return False


# --- attention helpers ------------------------------------------------------------------------


def sample_softmax(x, *, smooth=0.0):
    """Softmax over every axis but the batch, optionally mixed with the uniform distribution.

    Under ``torch.autocast`` a 16-bit ``x`` is normalized in float32 and the map comes out float32, on every
    device (CUDA's autocast does that for softmax, CPU's does not): the sampled attention's gradient,
    ``<g, f_k> / (n a_k)`` and more, exceeds float16's range on maps of 65536 cells and more.
    """
    flat = x.reshape(x.shape[0], -1)
    if flat.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(flat.device.type):
        flat = flat.float()
    p = torch.softmax(flat, dim=1)
    if smooth > 0:
        p = p * (1 - smooth) + smooth / p.shape[1]
    return p.reshape(x.shape)


def multinomial_entropy(x, strength=1.0, eps=1e-6):
    """``strength * sum(x log(x + eps)) / batch``: minus ``strength`` times the rows' mean entropy."""
    return strength * torch.sum(x * torch.log(x + eps)) / x.shape[0]
