"""The per-backend ops of the ``ats.keras`` layers: one small module per Keras backend.

Each module (``tensorflow``, ``torch``, ``jax``) has the same functions, on
the backend's own tensors, channels-last:

- ``sample(attention, n, *, replace, key, deterministic)`` -> ``(indices int32 (B, n, D), sampled (B, n))``:
  atskern's draw for the Philox key ``key`` (uint32 words ``[k0, k1]``), or
  the top-k when ``deterministic``; ``sampled`` is a differentiable gather
  of the attention divided by its row's sum;
- ``patch_offsets(indices, grid, level, size, margin)``: exact int32 first pixels;
- ``extract_patches(x, offsets, size, fill)``: the gather, with the scatter as its gradient;
- ``expectation(features, probs, replace)``: the estimator with ``atskern.expectation_grad``'s gradients;
- ``fingerprint(attention)`` and ``key_words(state)``: the sampling keys of :mod:`ats.keras._keys`;
- ``check_inputs(x_low, x_high, attention, size)``: the checks known only when the data arrives.

:func:`ops` imports the module of the running backend.
"""

from __future__ import annotations

import importlib


def ops():
    """The op module of Keras' running backend (``ats.keras.backends.tensorflow``, ``.torch`` or ``.jax``)."""
    import keras

    return importlib.import_module(f"{__name__}.{keras.backend.backend()}")
