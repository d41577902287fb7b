"""``ats.utils.training``: the 2019 import path of :mod:`ats.keras.training` (``Batcher`` & co. on
``keras.utils.PyDataset``; every Keras 3 backend)."""

from ..keras.training import Batcher, DataTransform, LambdaTransform, compose_sequences

__all__ = ["Batcher", "DataTransform", "LambdaTransform", "compose_sequences"]
