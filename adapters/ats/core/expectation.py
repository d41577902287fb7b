"""``ats.core.expectation``: the 2019 module of ``expected`` (defined in :mod:`ats.keras.functions`, with the
``Expected`` layer and 2019's private helpers); every Keras 3 backend."""

from ..keras.functions import Expected, _expected_with_replacement, _expected_without_replacement, expected

__all__ = ["expected", "Expected", "_expected_with_replacement", "_expected_without_replacement"]
