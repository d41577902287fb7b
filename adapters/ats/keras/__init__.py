"""ats.keras: attention sampling layers for Keras 3 on its TensorFlow, torch and JAX backends.

The 2019 names (``attention_sampling``, ``SamplePatches``, ``Expectation``)
and ``PatchesToBatch`` / ``BatchToPatches``; the 2019 import paths
(``ats.core``, ...) re-export them. Layers are written in ``keras.ops``; the
sampling, patch and estimator ops go to the running backend's module
(:mod:`ats.keras.backends`). Saved models (``.keras``) name the layers
``ats>SamplePatches`` etc., so a file saved on one backend loads on another.
"""

from .._keras import require_keras

require_keras("ats.keras")
# ruff: noqa: E402

from .core import BatchToPatches, Expectation, PatchesToBatch, SamplePatches, attention_sampling

__all__ = ["attention_sampling", "SamplePatches", "Expectation", "PatchesToBatch", "BatchToPatches"]
