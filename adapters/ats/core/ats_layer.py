"""``ats.core.ats_layer``: the 2019 module of ``SamplePatches``, ``Expectation`` and ``attention_sampling``.

The layers are defined in :mod:`ats.core` and re-exported here under their
2019 import path.
"""

from . import Expectation, SamplePatches, attention_sampling
from ..utils.layers import ActivityRegularizer, TotalReshape

__all__ = ["SamplePatches", "Expectation", "attention_sampling", "ActivityRegularizer", "TotalReshape"]
