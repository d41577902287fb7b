"""``ats.core.sampling``: the 2019 module of ``sample`` (defined in :mod:`ats.keras.functions`, with the
``Sample`` layer); every Keras 3 backend."""

from ..keras.functions import Sample, sample

__all__ = ["sample", "Sample"]
