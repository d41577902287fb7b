"""``ats.core.builder``: the 2019 module of ``ATSBuilder`` and ``ATSOutput`` (defined in :mod:`ats.keras.builder`)."""

from ..keras.builder import ATSBuilder, ATSOutput

__all__ = ["ATSBuilder", "ATSOutput"]
