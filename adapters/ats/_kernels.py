"""The atskern functions the adapters call, resolved in one place."""

from __future__ import annotations

import atskern
from atskern._memory import aligned_empty

ALIGNMENT = 64

sample = atskern.sample
extract_patches = atskern.extract_patches
scatter_patches = atskern.scatter_patches

__all__ = ["ALIGNMENT", "aligned_empty", "sample", "extract_patches", "scatter_patches"]
