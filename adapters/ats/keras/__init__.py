"""ats.keras: attention sampling layers and the 2019 helpers for Keras 3 on its TensorFlow, torch and JAX backends.

The 2019 names (``attention_sampling``, ``SamplePatches``, ``Expectation``,
``SampleSoftmax``, ``ATSBuilder``, ...) and ``PatchesToBatch`` /
``BatchToPatches``; the 2019 import paths (``ats.core``, ``ats.utils``,
``ats.data``) re-export them. Layers are written in ``keras.ops``; the
sampling, patch and estimator ops go to the running backend's module
(:mod:`ats.keras.backends`). Saved models (``.keras``) name the layers
``ats>SamplePatches`` etc., so a file saved on one backend loads on another.
"""

from .._keras import require_keras

require_keras("ats.keras")
# ruff: noqa: E402

from .builder import ATSBuilder, ATSOutput
from .core import BatchToPatches, Expectation, PatchesToBatch, SamplePatches, attention_sampling
from .data import FromTensors, LevelPatches, MultiResolutionBatch, level_offsets
from .functions import Expected, Sample, expected, sample
from .image_layers import ImageLinearTransform, ImagePan, ResizeImages
from .layers import ActivityRegularizer, L2Normalize, SampleSoftmax, TotalReshape
from .regularizers import MultinomialEntropy, multinomial_entropy
from .training import Batcher, DataTransform, LambdaTransform, compose_sequences

__all__ = [
    "attention_sampling",
    "SamplePatches",
    "Expectation",
    "PatchesToBatch",
    "BatchToPatches",
    "SampleSoftmax",
    "L2Normalize",
    "ActivityRegularizer",
    "TotalReshape",
    "ResizeImages",
    "ImageLinearTransform",
    "ImagePan",
    "MultinomialEntropy",
    "multinomial_entropy",
    "Batcher",
    "DataTransform",
    "LambdaTransform",
    "compose_sequences",
    "MultiResolutionBatch",
    "FromTensors",
    "level_offsets",
    "LevelPatches",
    "sample",
    "Sample",
    "expected",
    "Expected",
    "ATSBuilder",
    "ATSOutput",
]
