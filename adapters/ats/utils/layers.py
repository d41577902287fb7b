"""``ats.utils.layers``: the 2019 import path of the helper layers, defined in :mod:`ats.keras.layers`
(``SampleSoftmax``, ``L2Normalize``, ``ActivityRegularizer``, ``TotalReshape``) and
:mod:`ats.keras.image_layers` (``ResizeImages``, ``ImageLinearTransform``, ``ImagePan``); every Keras 3 backend."""

from ..keras.image_layers import ImageLinearTransform, ImagePan, ResizeImages
from ..keras.layers import ActivityRegularizer, L2Normalize, SampleSoftmax, TotalReshape

__all__ = [
    "SampleSoftmax",
    "L2Normalize",
    "ActivityRegularizer",
    "TotalReshape",
    "ResizeImages",
    "ImageLinearTransform",
    "ImagePan",
]
