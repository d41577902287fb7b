"""The constructor arguments every ``SamplePatches`` layer shares (``ats.keras``, ``ats.torch``, ``ats.slides``), checked once.

Plain Python, no framework import: each front end calls :func:`check_sampling_args`
and :func:`check_seed` before it builds anything, so bad settings raise the same ValueError, naming
the argument, on every front end.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._xla_common import boolean

MODES = ("sample", "topk", "auto")


def config_number(value):
    """A real number as ``get_config`` can store it in JSON: an int, or a float (a ``Fraction`` receptive field
    too, which the margin reads back as the simplest fraction that rounds to it)."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def check_sampling_args(n_patches, mode, receptive_field=0, fill=0):
    """``(n_patches, receptive_field, fill)`` normalized (int, number, int or float), or a ValueError naming the
    first bad argument: ``n_patches`` a positive integer, ``mode`` one of :data:`MODES`, ``receptive_field`` a
    finite number >= 0, ``fill`` a real number."""
    if isinstance(n_patches, (bool, np.bool_)) or not isinstance(n_patches, numbers.Integral) or n_patches < 1:
        raise ValueError(f"n_patches must be a positive integer, got {n_patches!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if (isinstance(receptive_field, (bool, np.bool_)) or not isinstance(receptive_field, numbers.Real)
            or not 0 <= receptive_field < math.inf):
        raise ValueError(f"receptive_field must be a finite number >= 0, got {receptive_field!r}")
    if isinstance(fill, (bool, np.bool_)) or not isinstance(fill, numbers.Real):
        raise ValueError(f"fill must be a real number, got {fill!r}")
    return int(n_patches), receptive_field, int(fill) if isinstance(fill, numbers.Integral) else float(fill)


check_flag = boolean
"""A layer's True/False argument (``bool("no")`` would be True), or a TypeError naming it: the functional APIs'
check (``ats._xla_common.boolean``)."""


def check_scale(scale) -> float:
    """The factor a slide reader multiplies pixels by (1/255 for uint8 slides), a positive number, or a
    ValueError naming ``scale``."""
    value = float(scale)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return value


def check_patch_size_arg(patch_size):
    """A layer's ``patch_size`` as given: a positive int, or a tuple of them (one per spatial dim, checked against
    the inputs when the layer is called); a TypeError or ValueError naming it otherwise."""
    if isinstance(patch_size, numbers.Integral) and not isinstance(patch_size, (bool, np.bool_)):
        if patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer or one per spatial dim, got {patch_size!r}")
        return int(patch_size)
    if isinstance(patch_size, np.ndarray) and patch_size.ndim == 1:  # 2019 unpacked any sequence, arrays too
        patch_size = patch_size.tolist()
    if not isinstance(patch_size, (list, tuple)) or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, (bool, np.bool_)) and s >= 1 for s in patch_size):
        raise TypeError(f"patch_size must be a positive integer or a tuple of them (one per spatial dim), "
                        f"got {patch_size!r}")
    return tuple(int(s) for s in patch_size)


def check_seed(seed):
    """``seed`` as None or an int in ``[0, 2**64)``, or a ValueError."""
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be None or an int in [0, 2**64), got {seed!r}")
    return int(seed)
