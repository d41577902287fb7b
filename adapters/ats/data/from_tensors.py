"""``ats.data.from_tensors``: the 2019 module of ``FromTensors`` (defined in :mod:`ats.keras.data`, with
``level_offsets`` and the ``LevelPatches`` layer)."""

from ..keras.data import FromTensors, LevelPatches, level_offsets

__all__ = ["FromTensors", "level_offsets", "LevelPatches"]
