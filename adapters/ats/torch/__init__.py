"""ats.torch: attention sampling for PyTorch over atskern's kernels.

Modules (channels-first images, the PyTorch layout): :class:`AttentionSampling`,
:class:`SamplePatches`, :class:`Expectation`, :class:`SampleSoftmax`,
:class:`MultinomialEntropy`. Functions in :mod:`ats.torch.functional`:
``sample``, ``patch_offsets``, ``extract_patches``, ``extract_multiscale``,
``expectation``. The kernels are torch custom ops (``atskern::sample``,
``atskern::extract_patches``, ``atskern::scatter_patches``), so
``torch.compile`` traces through them. Needs no TensorFlow.
"""

from .._requires import require

require("torch", "ats.torch")
# ruff: noqa: E402

from . import functional
from .functional import expectation, extract_multiscale, extract_patches, patch_offsets, sample
from .modules import (
    AttentionSampling,
    Expectation,
    MultinomialEntropy,
    SamplePatches,
    SampleSoftmax,
    device_key,
    multinomial_entropy,
)

__all__ = [
    "AttentionSampling",
    "SamplePatches",
    "Expectation",
    "SampleSoftmax",
    "MultinomialEntropy",
    "multinomial_entropy",
    "device_key",
    "functional",
    "sample",
    "patch_offsets",
    "extract_patches",
    "extract_multiscale",
    "expectation",
]
