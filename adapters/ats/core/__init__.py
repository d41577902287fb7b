"""``ats.core``: the 2019 import path of the Keras layers ``attention_sampling``, ``SamplePatches``, ``Expectation``.

The layers live in :mod:`ats.keras` (Keras 3 on the TensorFlow, torch and
JAX backends); these are the same class objects. The 2019 submodules
(``ats.core.ats_layer``, ``builder``, ``expectation``, ``sampling``) are
attributes of this package, imported on first access.
"""

from __future__ import annotations

import importlib

from .._keras import require_keras

require_keras("ats.core")
# ruff: noqa: E402

from ..keras.core import BatchToPatches, Expectation, PatchesToBatch, SamplePatches, attention_sampling

_SUBMODULES = ("ats_layer", "builder", "expectation", "sampling")


def __getattr__(name):
    # the 2019 submodules, as attributes after ``import ats.core`` (imported on first use)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["attention_sampling", "SamplePatches", "Expectation", "PatchesToBatch", "BatchToPatches"]
