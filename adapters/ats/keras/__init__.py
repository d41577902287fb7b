"""``ats.keras``: the attention-sampling Keras 3 layers and helpers, on the TensorFlow, torch and JAX backends.

(Minimal version from the keras-helpers branch: the helper names only; the
keras-layers branch adds the core layers here.)
"""

from __future__ import annotations

from .._keras import require_keras

require_keras("ats.keras")
# ruff: noqa: E402

# keras-helpers: the 2019 helpers in keras.ops
from .builder import ATSBuilder, ATSOutput
from .data import FromTensors, LevelPatches, MultiResolutionBatch, level_offsets
from .image_layers import ImageLinearTransform, ImagePan, ResizeImages
from .layers import ActivityRegularizer, L2Normalize, SampleSoftmax, TotalReshape
from .regularizers import MultinomialEntropy, multinomial_entropy
from .functions import Expected, Sample, expected, sample
from .training import Batcher, DataTransform, LambdaTransform, compose_sequences

__all__ = [
    # keras-helpers
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
