"""The per-backend ops of the ``ats.keras`` layers: one small module per Keras backend.

Each module (``tensorflow``, ``torch``, ``jax``) has the same functions, on
the backend's own tensors, channels-last. They serve the layers of
:mod:`ats.keras.core` and the 2019 helpers (:mod:`ats.keras.functions`,
:mod:`ats.keras.data`, :mod:`ats.slides`) alike:

- ``sample(attention, n, *, replace, key, deterministic)`` -> ``(indices int32 (B, n, D), sampled (B, n))``:
  atskern's draw for the Philox key ``key`` (uint32 words ``[k0, k1]``; on
  TensorFlow also None: a fresh key per run of the graph), or the top-k when
  ``deterministic``; ``sampled`` is a differentiable gather of the attention
  divided by its row's sum;
- ``top_indices(flat, n)``: int32 positions of each row's ``n`` largest entries, largest first, ties to the
  lower position (the top-k of ``ats.slides``);
- ``patch_offsets(indices, grid, level, size, *, margin)``: exact int32 first pixels;
- ``extract_patches(x, offsets, size, *, fill=0)``: the gather, with the scatter as its gradient;
- ``expectation(features, probs, *, replace)``: the estimator with ``atskern.expectation_grad``'s gradients;
- ``fingerprint(attention)``, ``key_words(state)`` and ``xor(words, salt)``: the layers' sampling keys
  (:mod:`ats.keras._keys`); ``seed_key(seed)``: the key of a helper's seed (None, an int or an integer
  scalar tensor);
- ``check_inputs(x_low, x_high, attention, size)``: the checks known only when the data arrives;
- ``spatial_shape(x)``, ``grid_shape(attention)``, ``static_value(value)`` (a value known now, as NumPy, or
  None) and ``x64()`` (whether 64-bit floats and integers are available).

:func:`ops` imports the module of the running backend.
"""

from __future__ import annotations

import importlib


def ops():
    """The op module of Keras' running backend (``ats.keras.backends.tensorflow``, ``.torch`` or ``.jax``)."""
    import keras

    return importlib.import_module(f"{__name__}.{keras.backend.backend()}")
