"""Helpers of the 2019 library: ``ats.utils.layers`` and ``ats.utils.regularizers``."""
