"""Attention sampling on whole-slide images in PyTorch: patches read from disk inside the step.

The attention network reads a low-resolution *pyramid level* of each slide
(never level 0); the sampled patches are read from level 0 of the slide file
with :mod:`atskern.io`, so the step's memory is O(patches) whatever the slide
size.

Recipe (many slides, DataLoader workers)::

    from torch.utils.data import DataLoader
    from ats.torch.slides import SlideDataset, collate_slides, SlideAttentionSampling

    data = SlideDataset(paths, labels, low_side=512)           # low view: the largest level <= 512 px a side
    loader = DataLoader(data, batch_size=4, shuffle=True, num_workers=2, collate_fn=collate_slides)
    model = SlideAttentionSampling(attention_logits, feature, patch_size=128, n_patches=10)
    for batch in loader:
        features, attention, patches = model(batch.x_low, batch.slides, batch.sizes)

Workers decode the low-resolution levels; each worker process opens its own
file handles (``atskern.io`` reopens after a fork). The batch carries slide
*paths*; the model opens each path once per process (a small LRU of open
slides) and reads the patches with the slide's thread pool and tile cache.

Slides of different sizes in one batch: **pad and mask**. ``collate_slides``
pads the low-resolution views to the batch's largest (zeros at the bottom and
right) and records each view's valid size; the attention network's logits at
grid cells whose centre lies in the padding are set to ``-inf`` before the
softmax, so they get probability 0 and are never sampled (a slide with fewer
valid cells than ``n_patches`` gets zero-probability fillers whose estimator
weight is 0, atskern's short-row rule). Each slide's cells map into its own
level 0. With a 'same'-padded convolutional attention network, a slide's
attention in a padded batch equals (up to normalization) that of the slide
alone except within the network's receptive field of its bottom/right border,
where deeper layers see the padding's activations instead of zeros. The alternative, per-slide
steps with gradient accumulation, is ``batch_size=1`` and ``loss /
accumulate`` with ``optimizer.step()`` every ``accumulate`` batches; it
needs no masking but runs the attention network once per slide.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import numpy as np
import torch

from atskern.io import grid as _grid
from atskern.io._cache import OpenSlides

from .._layer_args import check_flag, check_sampling_args, check_scale
from . import functional as F
from .modules import Expectation, KeyStreamState, RegularizedModel, _KeyStream


@functools.lru_cache(maxsize=8)
def _shared_cache(pid, cache_bytes):
    from atskern.io import TileCache

    return TileCache(cache_bytes)


OPEN_SLIDES = OpenSlides(64)
"""The slides :func:`open_cached` keeps open in this process (the least recently used is closed past 64)."""


def open_cached(slide, *, threads=None, cache_bytes=64 << 20):
    """``slide`` if it is an :class:`atskern.io.Slide`, else the path opened once per process.

    The slides opened this way share one tile cache of ``cache_bytes`` per
    process, and at most ``OPEN_SLIDES.maxsize`` stay open (the least recently
    used is closed), so memory and file descriptors stay bounded however many
    slides a run visits.
    """
    if hasattr(slide, "read_patches"):
        return slide
    try:
        path = os.path.abspath(os.fsdecode(slide))  # a relative path names a file of the current directory
    except TypeError:
        raise TypeError(f"slides must be atskern.io.Slide objects or paths (str, bytes or os.PathLike), got "
                        f"{type(slide).__name__}") from None
    return OPEN_SLIDES.get((path, threads, cache_bytes), functools.partial(_open, path, threads, cache_bytes))


def _open(path, threads, cache_bytes):
    from atskern.io import open_slide

    return open_slide(path, threads=threads, cache=_shared_cache(os.getpid(), cache_bytes))


class SlideBatch(NamedTuple):
    """A collated batch: ``x_low`` ``(B, C, Hmax, Wmax)`` float in [0, 1] (zero padded), ``sizes`` int64
    ``(B, 2)`` valid low-resolution sizes, ``slides`` the paths, ``labels`` a tensor (or None)."""

    x_low: torch.Tensor
    sizes: torch.Tensor
    slides: list
    labels: torch.Tensor | None


class SlideDataset(torch.utils.data.Dataset):
    """Slides as ``(x_low (C, h, w) float32, path, label)``: the low view read from a pyramid level, times
    ``scale`` (1/255 by default: [0, 1] for uint8 slides; 1/65535 for uint16, as the module's ``scale``).

    ``low_side``: the low view is the largest level whose sides are at most
    ``low_side`` pixels (``Slide.best_level``); ``low_level`` picks a level
    index instead. Slides are opened in the process that reads them (each
    DataLoader worker its own), never at construction.
    """

    def __init__(self, paths, labels=None, *, low_side=512, low_level=None, scale=1.0 / 255.0):
        self.paths = [os.fsdecode(p) for p in paths]
        if labels is not None and len(labels) != len(self.paths):
            raise ValueError(f"labels must have one entry per slide ({len(self.paths)}), got {len(labels)}")
        self.labels = labels
        self.low_side = int(low_side)
        self.low_level = low_level
        self.scale = check_scale(scale)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        slide = open_cached(self.paths[i], threads=1, cache_bytes=0)
        level = slide.best_level(self.low_side) if self.low_level is None else self.low_level
        low = slide.read_level(level)  # a small level of the pyramid: never level 0
        x_low = torch.from_numpy(np.ascontiguousarray(low.transpose(2, 0, 1))).float().mul_(self.scale)
        label = None if self.labels is None else self.labels[i]
        return x_low, self.paths[i], label


def collate_slides(items) -> SlideBatch:
    """Pad the low views of a batch to the largest (bottom/right zeros) and record their sizes."""
    lows, paths, labels = zip(*items)
    channels = lows[0].shape[0]
    for x, path in zip(lows, paths):
        if x.shape[0] != channels:
            raise ValueError(f"slides of one batch must have the same channels: {paths[0]} has {channels}, {path} "
                             f"has {x.shape[0]}")
    height = max(x.shape[1] for x in lows)
    width = max(x.shape[2] for x in lows)
    x_low = lows[0].new_zeros((len(lows), channels, height, width))
    for b, x in enumerate(lows):
        x_low[b, :, :x.shape[1], :x.shape[2]] = x
    sizes = torch.tensor([x.shape[1:] for x in lows], dtype=torch.int64)
    label_tensor = None if labels[0] is None else torch.as_tensor(labels)
    return SlideBatch(x_low, sizes, list(paths), label_tensor)


def valid_cells(grid, padded, sizes):
    """Bool tensor ``(B, *grid)``: cells whose centre lies in each slide's valid low view (see atskern.io.grid)."""
    return torch.from_numpy(_grid.valid_cells(tuple(grid), tuple(padded), np.asarray(sizes)))


slide_offsets = _grid.slide_offsets


class SlideAttentionSampling(KeyStreamState, RegularizedModel):
    """Attention sampling with a slide file as the high-resolution source.

    ``forward(x_low, slides, sizes=None)``: ``x_low`` ``(B, C, Hp, Wp)`` the
    low views (padded, see :func:`collate_slides`), ``slides`` B paths or
    :class:`atskern.io.Slide` objects, ``sizes`` ``(B, 2)`` the valid size of
    each low view (None: all of ``x_low``). ``attention`` maps ``x_low`` to
    *logits* ``(B, 1, *grid)`` or ``(B, *grid)`` (no softmax: this module
    masks the padding and normalizes). Patches of ``patch_size`` are read at
    ``level`` (default 0) of each slide, as float ``(B, n, C, *patch)`` in
    [0, 1] (``scale``), and ``feature`` runs on the ``B * n`` patches as one
    batch. Returns ``(features, attention, patches)`` like
    :class:`ats.torch.AttentionSampling`; ``regularization_loss`` holds the
    regularizer's value. ``mode``/``seed``/``replace`` as there; ``fill`` is
    the value of pixels outside a slide.
    """

    def __init__(self, attention, feature, patch_size, n_patches=10, replace=False, attention_regularizer=None, *,
                 level=0, mode="sample", seed=None, fill=0, scale=1.0 / 255.0, threads=None,
                 cache_bytes=64 << 20):
        super().__init__()
        n_patches, _, fill = check_sampling_args(n_patches, mode, fill=fill)
        self.attention = attention
        self.feature = feature
        self.attention_regularizer = attention_regularizer
        self.patch_size = F.size_tuple(patch_size, 2)
        self.n_patches = n_patches
        self.replace = check_flag(replace, "replace")
        self.level = int(level)
        self.mode = mode
        self.fill = fill
        self.scale = float(scale)
        self.threads = threads
        self.cache_bytes = cache_bytes
        self.expectation = Expectation(self.replace)
        self._keys = _KeyStream(seed)
        self.regularization_loss = None

    def deterministic(self) -> bool:
        return self.mode == "topk" or (self.mode == "auto" and not self.training)

    def attention_map(self, x_low, sizes=None):
        """The masked, normalized attention ``(B, *grid)`` over ``x_low`` (padding cells get 0)."""
        logits = self.attention(x_low)
        if logits.dim() == 4 and logits.shape[1] == 1:
            logits = logits[:, 0]
        if logits.dim() != 3:
            raise ValueError(f"attention must return logits (B, 1, gh, gw) or (B, gh, gw), got {tuple(logits.shape)}")
        if sizes is not None:
            mask = valid_cells(logits.shape[1:], x_low.shape[2:], torch.as_tensor(sizes)).to(logits.device)
            logits = logits.masked_fill(~mask, float("-inf"))
        return torch.softmax(logits.flatten(1), dim=1).view_as(logits)

    def read_patches(self, indices, grid, x_low, slides, sizes):
        """Read each slide's patches at its sampled cells: ``(B, n, C, *patch)`` float on ``x_low``'s device."""
        batch = []
        samples = indices.cpu().numpy()
        for b, slide in enumerate(slides):
            slide = open_cached(slide, threads=self.threads, cache_bytes=self.cache_bytes)
            level = slide.level(self.level)
            low = tuple(int(v) for v in (sizes[b] if sizes is not None else x_low.shape[2:]))
            offsets = slide_offsets(samples[b], grid, x_low.shape[2:], low, level.shape[:2], self.patch_size)
            pixels = slide.read_patches(offsets, self.patch_size, self.level, fill=self.fill)
            batch.append(torch.from_numpy(pixels))
        patches = torch.stack(batch).permute(0, 1, 4, 2, 3)  # (B, n, C, ph, pw)
        return patches.to(device=x_low.device, dtype=x_low.dtype).mul_(self.scale)

    def forward(self, x_low, slides, sizes=None):
        F.require_tensor(x_low, "x_low")
        if x_low.dim() != 4:
            raise ValueError(f"x_low must be (batch, channels, height, width), got shape {tuple(x_low.shape)}")
        if len(slides) != x_low.shape[0]:
            raise ValueError(f"slides must have one entry per x_low row ({x_low.shape[0]}), got {len(slides)}")
        if sizes is not None:
            sizes = torch.as_tensor(sizes, dtype=torch.int64).cpu()
            if sizes.shape != (x_low.shape[0], 2):
                raise ValueError(f"sizes must be (batch, 2), got shape {tuple(sizes.shape)}")
            padded = torch.tensor(x_low.shape[2:], dtype=torch.int64)
            if bool(((sizes < 1) | (sizes > padded)).any()):
                row = int(((sizes < 1) | (sizes > padded)).any(dim=1).nonzero()[0])
                raise ValueError(f"sizes[{row}] = {sizes[row].tolist()} must lie in [1, {tuple(x_low.shape[2:])}] "
                                 "(each slide's low view inside the padded x_low: collate_slides' sizes)")
        attention = self.attention_map(x_low, sizes)
        if self.attention_regularizer is not None:
            self.regularization_loss = self.attention_regularizer(attention)
        deterministic = self.deterministic()
        key = None if deterministic else self._keys.next()
        indices, sampled = F.sample(attention, self.n_patches, replace=self.replace, key=key,
                                    deterministic=deterministic)
        patches = self.read_patches(indices, attention.shape[1:], x_low, slides, sizes)
        b, n = patches.shape[:2]
        per_patch = self.feature(patches.flatten(0, 1))
        features = self.expectation(per_patch.unflatten(0, (b, n)), sampled)
        return features, attention, patches


def sample_from_slides(module, x_low, slides, attention, *, scale=1.0 / 255.0):
    """:class:`ats.torch.SamplePatches` with slides (paths or :class:`atskern.io.Slide`) as ``x_high``.

    ``x_low`` ``(B, C, h, w)`` is each slide's low view (unpadded; use
    :class:`SlideAttentionSampling` for batches of different sizes),
    ``attention`` ``(B, gh, gw)``. Patches come from level 0 of each slide at
    ``atskern.patch_offsets`` of the sampled cells (with the module's
    receptive-field margin), as ``(B, n, C, *patch)`` floats of ``x_low``'s
    dtype, pixel values times ``scale``. Returns ``(patches, sampled_attention)``.
    """
    F.require_tensor(x_low, "x_low")
    F.require_tensor(attention, "attention")
    if x_low.dim() != 4 or attention.dim() != 3:
        raise ValueError("with slides as x_high, x_low must be (batch, channels, height, width) and attention "
                         f"(batch, gh, gw), got shapes {tuple(x_low.shape)} and {tuple(attention.shape)}")
    if len(slides) != x_low.shape[0] or attention.shape[0] != x_low.shape[0]:
        raise ValueError(f"x_high (slides), x_low and attention must share the batch size, got {len(slides)}, "
                         f"{x_low.shape[0]} and {attention.shape[0]}")
    size = F.size_tuple(module.patch_size, 2)
    if module.use_logits:
        attention = F.sample_softmax(attention)
    deterministic = module.deterministic()
    key = None if deterministic else module._keys.next()
    indices, sampled = F.sample(attention, module.n_patches, replace=module.replace, key=key,
                                deterministic=deterministic)
    margin = [float(module.receptive_field) / 2.0 / s for s in x_low.shape[2:]]
    batch = []
    for b, slide in enumerate(slides):
        slide = open_cached(slide)
        level = slide.levels[0]
        offsets = F.patch_offsets(indices[b:b + 1].cpu(), attention.shape[1:], level.shape[:2], size, margin=margin)[0]
        batch.append(torch.from_numpy(slide.read_patches(offsets.numpy(), size, 0, fill=module.fill)))
    patches = torch.stack(batch).permute(0, 1, 4, 2, 3).to(device=x_low.device, dtype=x_low.dtype).mul_(scale)
    return patches, sampled
