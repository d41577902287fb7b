"""The toy task of the Keras tests (NumPy only, importable by any backend's test process)."""

from __future__ import annotations

import numpy as np


def toy_images(n, size=256, seed=0):
    """Noise plus one framed 24x24 block; the label is the orientation of the bar inside it.

    At the 8x lower resolution the two classes look the same (both give the
    same 3x3 blob), so only high-resolution patches of the block carry the label.
    """
    rng = np.random.default_rng(seed)
    x = (rng.uniform(size=(n, size, size, 1)) * 0.1).astype("float32")
    labels = rng.integers(0, 2, n)
    for i, label in enumerate(labels):
        block = np.zeros((24, 24), "float32")
        block[0, :] = block[-1, :] = block[:, 0] = block[:, -1] = 1
        if label:
            block[11:13, :] = 1
        else:
            block[:, 11:13] = 1
        r, c = rng.integers(8, size - 32, 2)
        x[i, r : r + 24, c : c + 24, 0] += block
    return x, labels
