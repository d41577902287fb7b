"""``ats.utils.regularizers``: the 2019 import path of :mod:`ats.keras.regularizers` (every Keras 3 backend)."""

from ..keras.regularizers import MultinomialEntropy, multinomial_entropy

__all__ = ["MultinomialEntropy", "multinomial_entropy"]
