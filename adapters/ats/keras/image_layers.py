"""Image layers of the 2019 library (``ResizeImages``, ``ImageLinearTransform``, ``ImagePan``) in ``keras.ops``.

Re-exported by :mod:`ats.utils.layers`, their 2019 import path. Written with
``keras.ops`` and ``keras.random`` only, so they run on Keras 3's
TensorFlow, torch and JAX backends. The two augmentations act only in
training (``training=True``, as ``model.fit`` passes it) and are the
identity otherwise, as in 2019; their randomness comes from a
``keras.random.SeedGenerator`` (``seed=`` makes it reproducible; the
generator's state is a Keras variable, so a seeded layer also draws afresh
per step under ``jax.jit`` and ``jit_compile=True``).
"""

from __future__ import annotations

from .._keras import require_keras

require_keras("ats.keras.image_layers")
# ruff: noqa: E402

import numbers

import keras
from keras import ops

from .._keras import register
from .._layer_args import check_flag

__all__ = ["ResizeImages", "ImageLinearTransform", "ImagePan"]

_RESIZE_MODES = ("nearest", "bilinear", "bicubic", "lanczos3", "lanczos5", "area")
# what keras.ops.image.resize implements on each backend (Keras 3.15)
_BACKEND_RESIZE_MODES = {
    "tensorflow": _RESIZE_MODES,
    "jax": ("nearest", "bilinear", "bicubic", "lanczos3", "lanczos5"),
    "torch": ("nearest", "bilinear", "bicubic"),
}


def _pair(value, name):
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) of numbers, got {value!r}") from None
    if low > high:
        raise ValueError(f"{name} must have low <= high, got {value!r}")
    return low, high


def _probability(p):
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p <= 1:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    return float(p)


def _seed(seed):
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be None or an int in [0, 2**31), got {seed!r}")
    return int(seed)


def _per_sample(x, columns=None):
    """Shape of a per-sample random draw broadcastable against ``x``, or ``(B, columns)``."""
    batch = ops.shape(x)[0]
    if columns is not None:
        return (batch, columns)
    return (batch,) + (1,) * (len(x.shape) - 1)


@register
class ResizeImages(keras.layers.Layer):
    """Resize images (``(B, H, W, C)``, or ``(B, C, H, W)`` in ``channels_first``) to ``size``.

    Typically makes ``x_low`` from ``x_high`` inside the model. ``mode`` is
    ``"bilinear"`` or ``"bicubic"`` as in 2019, or any other interpolation of
    ``keras.ops.image.resize``. Keras 3 samples at pixel centres
    (``half_pixel_centers``), unlike the 2019 TF1 op, so resized pixels
    differ slightly from 2019's.
    """

    def __init__(self, size, mode="bilinear", antialias=False, **kwargs):
        super().__init__(**kwargs)
        if isinstance(size, (str, bytes)) or not hasattr(size, "__len__") or len(size) != 2 or not all(
                isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in size):
            raise ValueError(f"size must be (height, width) with positive integer entries, got {size!r}")
        size = tuple(int(s) for s in size)  # (2.7, 3) was (2, 3) once
        if mode not in _RESIZE_MODES:
            raise ValueError(f"Unsupported resize mode {mode!r}; use one of {_RESIZE_MODES}")
        backend = keras.backend.backend()
        available = _BACKEND_RESIZE_MODES.get(backend, _RESIZE_MODES)
        if mode not in available:
            raise ValueError(
                f"Unsupported resize mode {mode!r} on the Keras {backend!r} backend; it has {available} "
                "(bilinear, bicubic and nearest run on every backend)"
            )
        self.size = size
        self.mode = mode
        self.antialias = check_flag(antialias, "antialias")

    def call(self, x):
        return ops.image.resize(x, self.size, interpolation=self.mode, antialias=self.antialias)

    def compute_output_shape(self, input_shape):
        if keras.config.image_data_format() == "channels_first":
            return tuple(input_shape[:2]) + self.size
        return (input_shape[0], *self.size, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "size": list(self.size), "mode": self.mode, "antialias": self.antialias}


@register
class ImageLinearTransform(keras.layers.Layer):
    """In training, with probability ``p`` per sample, replace an image ``I`` by ``a * I + b``.

    ``a`` is uniform in ``[a[0], a[1]]`` and ``b`` in ``[b[0], b[1]]``, drawn
    per sample (brightness and contrast augmentation). Identity in inference.
    """

    def __init__(self, a=(0.8, 1.2), b=(-0.1, 0.1), p=0.8, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.a = _pair(a, "a")
        self.b = _pair(b, "b")
        self.p = _probability(p)
        self.seed = _seed(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    def transform(self, x):
        """The random transform itself (what ``call`` applies in training)."""
        shape = _per_sample(x)
        dtype = x.dtype
        a = keras.random.uniform(shape, self.a[0], self.a[1], dtype=dtype, seed=self.seed_generator)
        b = keras.random.uniform(shape, self.b[0], self.b[1], dtype=dtype, seed=self.seed_generator)
        apply = ops.cast(keras.random.uniform(shape, dtype=dtype, seed=self.seed_generator) < self.p, dtype)
        return (apply * a + (1 - apply)) * x + apply * b

    def call(self, x, training=None):
        return self.transform(x) if training else x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "a": list(self.a), "b": list(self.b), "p": self.p, "seed": self.seed}


@register
class ImagePan(keras.layers.Layer):
    """In training, with probability ``p`` per sample, shift an image by up to ``pixels`` pixels.

    The shift is uniform in ``[-pixels, pixels]`` along each enabled axis
    (``horizontally``: the width, ``vertically``: the height); pixels shifted
    in are 0. ``mode`` is the interpolation of fractional shifts,
    ``"NEAREST"`` or ``"BILINEAR"`` (either case), as 2019's
    ``tf.contrib.image.translate``. Identity in inference. Images
    ``(B, H, W, C)`` (``(B, C, H, W)`` in ``channels_first``).
    """

    def __init__(self, pixels=100, p=0.8, horizontally=True, vertically=False, mode="NEAREST", seed=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(pixels, bool) or not isinstance(pixels, numbers.Real) or not 0 <= pixels < float("inf"):
            raise ValueError(f"pixels must be a non-negative number, got {pixels!r}")
        if str(mode).upper() not in ("NEAREST", "BILINEAR"):
            raise ValueError(f"mode must be 'NEAREST' or 'BILINEAR', got {mode!r}")
        self.pixels = pixels
        self.p = _probability(p)
        self.horizontally = check_flag(horizontally, "horizontally")
        self.vertically = check_flag(vertically, "vertically")
        self.mode = str(mode).upper()
        self.seed = _seed(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"ImagePan needs images (batch, height, width, channels), got shape {tuple(input_shape)}")

    def transform(self, x):
        """The random shift itself (what ``call`` applies in training)."""
        shape = _per_sample(x, 2)
        shift = keras.random.uniform(shape, -self.pixels, self.pixels, dtype="float32", seed=self.seed_generator)
        apply = ops.cast(keras.random.uniform((shape[0], 1), seed=self.seed_generator) < self.p, "float32")
        axes = ops.convert_to_tensor([[float(self.horizontally), float(self.vertically)]], dtype="float32")
        shift = shift * apply * axes
        dx, dy = shift[:, 0], shift[:, 1]
        ones, zeros = ops.ones_like(dx), ops.zeros_like(dx)
        # output pixel (x, y) reads input pixel (x - dx, y - dy)
        matrix = ops.stack([ones, zeros, -dx, zeros, ones, -dy, zeros, zeros], axis=1)
        panned = ops.image.affine_transform(
            ops.cast(x, "float32"), matrix, interpolation=self.mode.lower(), fill_mode="constant", fill_value=0
        )
        return ops.cast(panned, x.dtype)

    def call(self, x, training=None):
        return self.transform(x) if training else x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "pixels": self.pixels,
            "p": self.p,
            "horizontally": self.horizontally,
            "vertically": self.vertically,
            "mode": self.mode,
            "seed": self.seed,
        }
