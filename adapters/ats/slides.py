"""Keras 3 (TensorFlow, torch or JAX backend): attention sampling with slide files as the high-resolution source.

:class:`SlidePatches` is ``SamplePatches`` for whole-slide images: its
inputs are ``[x_low, attention, slide_ids, sizes]`` where ``x_low`` holds the
low-resolution views (read from a pyramid level, zero padded to the batch's
largest), ``slide_ids`` int ``(B,)`` index the layer's ``slides`` (paths),
and ``sizes`` int ``(B, 2)`` are the views' valid sizes. Attention cells in
the padding get probability 0 (pad and mask, as in ``ats.torch.slides``);
the patches are read from level ``level`` of each slide with
:mod:`atskern.io` in a host callback (see Backends below), so only the
sampled tiles are read and decoded.

:class:`SlideSequence` is a ``keras.utils.PyDataset`` yielding
``((x_low, slide_ids, sizes), labels)`` batches; with ``workers > 1`` and
``use_multiprocessing=True`` each worker process opens its own file handles.

Backends: both run on every Keras 3 backend. The host callback that reads
the files is ``tf.numpy_function`` on TensorFlow (not under XLA), a direct
NumPy call on torch (eager; PyTorch users also have :mod:`ats.torch.slides`)
and ``jax.pure_callback`` on JAX (so the layer compiles under ``jax.jit``,
the reads running on the host). Sampling goes to the backend's op module
(:mod:`ats.keras.backends`), as for :func:`ats.keras.functions.sample`.
"""

from __future__ import annotations

from ._keras import require_keras

require_keras("ats.slides")
# ruff: noqa: E402

import functools
import numbers
import os

import keras
import numpy as np

from atskern.io import grid as _grid
from atskern.io._cache import OpenSlides

from ._keras import register
from ._layer_args import MODES, check_flag, check_sampling_args, check_scale  # noqa: F401 (MODES: public here)
from .keras._keys import check_seed
from .keras.backends import ops as backend_ops
from .keras.functions import _gather, draw


_SLIDES = OpenSlides(64)
"""The slides the layer and the sequence keep open in this process (the least recently used is closed past 64)."""


@functools.lru_cache(maxsize=8)
def _shared_cache(pid, cache_bytes):
    """The tile cache the slides of one process and budget share (bounded: a forked child's or another budget's
    cache replaces the least recently used)."""
    from atskern.io import TileCache

    return TileCache(cache_bytes)


def _slide(path, threads, cache_bytes):
    """``path`` opened once per process (at most ``_SLIDES.maxsize`` kept open); the slides share one tile cache of
    ``cache_bytes`` per process."""
    path = os.path.abspath(os.fsdecode(path))  # a relative path names a file of the current directory
    return _SLIDES.get((path, threads, cache_bytes), functools.partial(_open, path, threads, cache_bytes))


def _open(path, threads, cache_bytes):
    from atskern.io import open_slide

    return open_slide(path, threads=threads, cache=_shared_cache(os.getpid(), cache_bytes))


def _checked_sizes(sizes, padded) -> np.ndarray:
    """``sizes`` ``(B, 2)``, each slide's low view inside the padded ``x_low``, or a ValueError naming the row."""
    sizes = np.asarray(sizes)
    padded = tuple(int(p) for p in padded)
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ValueError(f"sizes must be (batch, 2), got shape {sizes.shape}")
    bad = (sizes < 1) | (sizes > np.array(padded))
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise ValueError(f"sizes[{row}] = {sizes[row].tolist()} must lie in [1, {padded}] (each slide's low view "
                         "inside the padded x_low: SlideSequence's sizes)")
    return sizes


def _check_concrete_sizes(sizes, padded) -> None:
    """Check ``sizes`` now where they have values (not traced by ``jax.jit``, whose callback would wrap the
    ValueError in a runtime error); traced sizes are checked in the host callback."""
    if keras.backend.backend() == "jax":
        import jax

        if isinstance(sizes, jax.core.Tracer):
            return
    _checked_sizes(keras.ops.convert_to_numpy(sizes), padded)


def _host_call(fn, args, shape, dtype):
    """``fn`` on NumPy copies of ``args`` (torch: eagerly; JAX: ``jax.pure_callback``), as a backend tensor."""
    from keras import ops

    shape = tuple(int(s) for s in shape)
    if keras.backend.backend() == "jax":
        import jax

        def host(*arrays):
            return np.asarray(fn(*(np.asarray(a) for a in arrays)), dtype=dtype).reshape(shape)

        return jax.pure_callback(host, jax.ShapeDtypeStruct(shape, np.dtype(dtype)), *args)
    out = np.asarray(fn(*(ops.convert_to_numpy(a) for a in args)), dtype=dtype).reshape(shape)
    return ops.convert_to_tensor(out)


def _patch_size(size):
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"patch_size must be a positive int or two of them, got {size!r}")
    return size


@register
class SlidePatches(keras.layers.Layer):
    """Sample cells of an attention map over padded low views and read the patches from slide files.

    Called on ``[x_low, attention, slide_ids, sizes]``: ``x_low``
    ``(B, Hp, Wp, C)``, ``attention`` ``(B, gh, gw)`` (weights, or logits with
    ``use_logits=True``), ``slide_ids`` int ``(B,)`` into ``slides``,
    ``sizes`` int ``(B, 2)``, each in ``[1, (Hp, Wp)]`` (else a ValueError).
    Returns ``[patches (B, n, ph, pw, C) float32 (pixels times scale),
    sampled_attention (B, n)]``, the latter
    differentiable with respect to the attention (the masked, normalized map).

    ``seed``: None (default) draws a fresh key on every call (the layer's seed
    generator). An int is the sampling key itself, as for the 2019 helpers
    (``atskern.sample(..., seed=seed)`` draws the same cells): every call
    reuses the same random numbers, so for training leave it None (unlike
    :class:`ats.keras.SamplePatches`, whose seed is mixed with the map).
    Cells whose centre lies outside a slide's own low view (the padding) are
    never drawn; a slide shorter than half a cell keeps the first cell.
    """

    def __init__(self, slides, n_patches, patch_size, replace=False, use_logits=False, mode="sample", seed=None,
                 fill=0, level=0, channels=3, scale=1.0 / 255.0, threads=None, cache_bytes=64 << 20, **kwargs):
        super().__init__(**kwargs)
        n_patches, _, fill = check_sampling_args(n_patches, mode, fill=fill)
        self.slides = [os.fsdecode(p) for p in slides]
        if not self.slides:
            raise ValueError("slides must name at least one slide file")
        self.n_patches = n_patches
        self.patch_size = _patch_size(patch_size)
        self.replace = check_flag(replace, "replace")
        self.use_logits = check_flag(use_logits, "use_logits")
        self.mode = mode
        self.seed = check_seed(seed)
        self.fill = fill
        self.level = int(level)
        self.channels = int(channels)
        self.scale = float(scale)
        self.threads = threads
        self.cache_bytes = int(cache_bytes)
        # TensorFlow: the reads run in tf.numpy_function (no XLA); JAX: jax.pure_callback (jit is fine)
        self.supports_jit = keras.backend.backend() == "jax"
        # draws without a seed: a Keras seed generator (a variable, so jitted steps draw afresh on JAX)
        # (always made, so that the layer's variables do not depend on its seed)
        self.seed_generator = keras.random.SeedGenerator()

    def load_own_variables(self, store):
        if len(store) == 0:  # saved before the layer had a seed generator
            return
        super().load_own_variables(store)

    def _deterministic(self, training) -> bool:
        return self.mode == "topk" or (self.mode == "auto" and not training)

    def _read(self, indices, slide_ids, sizes, padded, grid):
        out = np.empty((len(indices), self.n_patches, *self.patch_size, self.channels), np.float32)
        for b, (cells, sid) in enumerate(zip(indices, slide_ids)):
            if not 0 <= int(sid) < len(self.slides):
                raise ValueError(f"slide_ids[{b}] = {int(sid)} is not an index into the layer's "
                                 f"{len(self.slides)} slides")
            slide = _slide(self.slides[int(sid)], self.threads, self.cache_bytes)
            level = slide.level(self.level)
            offsets = _grid.slide_offsets(cells, grid, padded, sizes[b], level.shape[:2], self.patch_size)
            pixels = slide.read_patches(offsets, self.patch_size, self.level, fill=self.fill)
            if pixels.shape[-1] != self.channels:
                raise ValueError(f"{self.slides[int(sid)]} has {pixels.shape[-1]} channels, the layer expects "
                                 f"channels={self.channels}")
            np.multiply(pixels, self.scale, out=out[b], casting="unsafe")
        return out

    def call(self, inputs, training=None):
        if keras.backend.backend() != "tensorflow":
            return self._call_keras_ops(inputs, training)
        import tensorflow as tf

        from . import ops
        from ._bridge import numpy_call

        x_low, attention, slide_ids, sizes = inputs
        if attention.shape.rank != 3:
            raise ValueError(f"attention must be (batch, gh, gw), got shape {tuple(attention.shape)}")
        sizes = tf.cast(sizes, tf.int64)
        padded = tf.shape(x_low)[1:3]
        grid = tf.shape(attention)[1:3]
        mask = numpy_call(lambda g, p, s: _grid.valid_cells(tuple(g), tuple(p), _checked_sizes(s, p)),
                          [grid, padded, sizes], tf.bool, name="ats.slides.valid_cells")
        mask = tf.reshape(mask, tf.shape(attention))
        if self.use_logits:
            logits = tf.where(mask, attention, tf.constant(-np.inf, attention.dtype))
            flat = tf.nn.softmax(tf.reshape(logits, (tf.shape(attention)[0], -1)), axis=-1)
            attention = tf.reshape(flat, tf.shape(attention))
        else:
            attention = tf.where(mask, attention, tf.zeros_like(attention))
        deterministic = self._deterministic(training)
        seed = None if deterministic or self.seed is None else self.seed
        indices, sampled = ops.sample(attention, self.n_patches, replace=self.replace, seed=seed,
                                      deterministic=deterministic)
        patches = numpy_call(self._read, [indices, tf.cast(slide_ids, tf.int64), sizes, padded, grid], tf.float32,
                             name="ats.slides.read_patches", stateful=True)
        patches = tf.reshape(patches, (-1, self.n_patches, *self.patch_size, self.channels))
        return [tf.stop_gradient(patches), sampled]

    def _call_keras_ops(self, inputs, training):
        """torch and JAX: the same steps as the TensorFlow path in ``keras.ops``; shapes are static here."""
        from keras import ops

        x_low, attention, slide_ids, sizes = inputs
        if len(attention.shape) != 3:
            raise ValueError(f"attention must be (batch, gh, gw), got shape {tuple(attention.shape)}")
        padded = tuple(int(s) for s in x_low.shape[1:3])
        grid = tuple(int(s) for s in attention.shape[1:3])
        batch = int(attention.shape[0])
        _check_concrete_sizes(sizes, padded)
        mask = _host_call(lambda s: _grid.valid_cells(grid, padded, _checked_sizes(s, padded)), [sizes],
                          attention.shape, "bool")
        if self.use_logits:
            logits = ops.where(mask, attention, ops.full_like(attention, -np.inf))
            attention = ops.reshape(ops.softmax(ops.reshape(logits, (batch, -1)), axis=-1), attention.shape)
        else:
            attention = ops.where(mask, attention, ops.zeros_like(attention))
        if self._deterministic(training):
            flat = backend_ops().top_indices(ops.stop_gradient(ops.reshape(attention, (batch, -1))), self.n_patches)
            indices = ops.stack([flat // grid[1], flat % grid[1]], axis=-1)
        else:
            seed = self.seed
            if seed is None and keras.backend.backend() == "jax":
                seed = keras.random.randint((), 0, 2**31 - 1, dtype="int32", seed=self.seed_generator)
            indices = draw(attention, self.n_patches, replace=self.replace, seed=seed)
        sampled = _gather(attention, indices) / ops.sum(ops.reshape(attention, (batch, -1)), axis=1, keepdims=True)
        shape = (batch, self.n_patches, *self.patch_size, self.channels)
        patches = _host_call(lambda i, s, z: self._read(i, s, z, padded, grid), [indices, slide_ids, sizes], shape,
                             "float32")
        return [ops.stop_gradient(patches), sampled]

    def compute_output_spec(self, inputs, training=None):
        x_low, attention = inputs[0], inputs[1]
        batch = x_low.shape[0]
        return [keras.KerasTensor((batch, self.n_patches, *self.patch_size, self.channels), dtype="float32"),
                keras.KerasTensor((batch, self.n_patches), dtype=attention.dtype)]

    def get_config(self):
        return {**super().get_config(), "slides": self.slides, "n_patches": self.n_patches,
                "patch_size": list(self.patch_size), "replace": self.replace, "use_logits": self.use_logits,
                "mode": self.mode, "seed": self.seed, "fill": self.fill, "level": self.level,
                "channels": self.channels, "scale": self.scale, "threads": self.threads,
                "cache_bytes": self.cache_bytes}


class SlideSequence(keras.utils.PyDataset):
    """Batches ``((x_low, slide_ids, sizes), labels)`` over ``paths``; low views from a pyramid level.

    ``low_side``: the largest level whose sides are at most that many pixels.
    Views are multiplied by ``scale`` (as :class:`SlidePatches` scales the patches: 1/255 for uint8 slides,
    1/65535 for uint16) and zero padded to the batch's largest (bottom/right).
    """

    def __init__(self, paths, labels, batch_size=4, *, low_side=512, shuffle=False, seed=0, scale=1.0 / 255.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.paths = [os.fsdecode(p) for p in paths]
        self.labels = np.asarray(labels)
        if len(self.labels) != len(self.paths):
            raise ValueError(f"labels must have one entry per slide ({len(self.paths)}), got {len(self.labels)}")
        self.batch_size = int(batch_size)
        self.low_side = int(low_side)
        self.order = np.arange(len(self.paths))
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        self.scale = check_scale(scale)

    def __len__(self):
        return -(-len(self.paths) // self.batch_size)

    def on_epoch_end(self):
        if self.shuffle:
            self.rng.shuffle(self.order)

    def __getitem__(self, index):
        ids = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        views = []
        for i in ids:
            slide = _slide(self.paths[i], 1, 0)
            views.append(slide.read_level(slide.best_level(self.low_side)))
        height = max(v.shape[0] for v in views)
        width = max(v.shape[1] for v in views)
        x_low = np.zeros((len(ids), height, width, views[0].shape[2]), np.float32)
        for b, v in enumerate(views):
            np.multiply(v, self.scale, out=x_low[b, :v.shape[0], :v.shape[1]], casting="unsafe")
        sizes = np.array([v.shape[:2] for v in views], np.int64)
        return (x_low, ids.astype(np.int32), sizes), self.labels[ids]
