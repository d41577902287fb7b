"""Kernel errors restated in the adapters' terms (framework-free, shared by ``ats`` and ``ats.torch``)."""

from __future__ import annotations

import re

_LOGITS_HINT = re.compile(r"pass logits=True( for unnormalized log-probabilities)?")


def sampling_error(error: ValueError) -> ValueError:
    """``atskern.sample``'s ValueError with its ``logits=True`` hint in the adapters' terms (``use_logits``)."""
    message = _LOGITS_HINT.sub(
        "for unnormalized log-probabilities pass use_logits=True to SamplePatches, or apply a softmax first",
        str(error),
    )
    return ValueError(message)
