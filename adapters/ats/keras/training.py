"""Data pipelines for training attention-sampling models (2019 names), on ``keras.utils.PyDataset``.

The 2019 classes derived from ``keras.utils.Sequence``; Keras 3 renamed it
``PyDataset`` (``Sequence`` is an alias of it), so the classes keep their 2019
behaviour and feed ``model.fit`` directly. A wrapped dataset is anything with
``__len__`` and ``__getitem__`` returning ``(inputs, targets)``, where inputs
may be one array or a list or tuple of arrays (``[x_low, x_high]``); its
``on_epoch_end`` is called when it has one.

Nothing here depends on the Keras backend (the batches are NumPy arrays),
so the classes feed ``model.fit`` on TensorFlow, torch and JAX alike.
Their 2019 import path :mod:`ats.utils.training` re-exports them.

Keyword arguments the classes do not use go to ``PyDataset`` (``workers``,
``use_multiprocessing``, ``max_queue_size``).
"""

from __future__ import annotations

from .._keras import require_keras

require_keras("ats.keras.training")
# ruff: noqa: E402

import numbers

import keras
import numpy as np

__all__ = ["Batcher", "DataTransform", "LambdaTransform", "compose_sequences"]


def _epoch_end(sequence):
    hook = getattr(sequence, "on_epoch_end", None)
    if callable(hook):
        hook()


def _stack(items):
    """Stack a list of samples; lists and tuples of arrays are stacked per position, into a tuple.

    (A tuple, not a list: Keras 3 reads a list in a batch as one tensor, not as several inputs.)
    """
    first = items[0]
    if isinstance(first, (list, tuple)):
        return tuple(np.stack([item[k] for item in items]) for k in range(len(first)))
    return np.stack(items)


class Batcher(keras.utils.PyDataset):
    """Group a sequence of ``(inputs, targets)`` samples into batches of ``batch_size``.

    The last batch holds the remainder. The sample order is shuffled (with
    NumPy's global generator) at the end of every epoch, as in 2019.
    """

    def __init__(self, sequence, batch_size=16, **kwargs):
        super().__init__(**kwargs)
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if len(sequence) == 0:
            raise ValueError("sequence is empty: there is nothing to batch")
        self._batch_size = int(batch_size)
        self._sequence = sequence
        self._idxs = np.arange(len(sequence))

    def __len__(self):
        return -(-len(self._sequence) // self._batch_size)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"batch index {i} out of range for {len(self)} batches")
        i %= len(self)
        start = i * self._batch_size
        data = [self._sequence[j] for j in self._idxs[start : start + self._batch_size]]
        return _stack([d[0] for d in data]), _stack([d[1] for d in data])

    def on_epoch_end(self):
        np.random.shuffle(self._idxs)
        _epoch_end(self._sequence)


class DataTransform(keras.utils.PyDataset):
    """Apply ``_transform`` to the inputs of every item of a sequence (subclasses define it)."""

    def __init__(self, sequence, **kwargs):
        super().__init__(**kwargs)
        self._sequence = sequence

    def __len__(self):
        return len(self._sequence)

    def __getitem__(self, i):
        x, y = self._sequence[i]
        return self._transform(x), y

    def _transform(self, x):
        raise NotImplementedError(f"{type(self).__name__} must define _transform(x)")

    def on_epoch_end(self):
        _epoch_end(self._sequence)


class LambdaTransform(DataTransform):
    """Apply ``transform_function`` to the inputs of every item of a sequence."""

    def __init__(self, sequence, transform_function, **kwargs):
        super().__init__(sequence, **kwargs)
        if not callable(transform_function):
            raise TypeError(f"transform_function must be callable, got {transform_function!r}")
        self._transform_function = transform_function

    def _transform(self, x):
        return self._transform_function(x)


def compose_sequences(sequence, sequences):
    """Wrap ``sequence`` in each ``(cls, *args)`` of ``sequences`` in turn.

    ``compose_sequences(dataset, [(Batcher, 32), (LambdaTransform, f)])`` is
    ``LambdaTransform(Batcher(dataset, 32), f)``.
    """
    for entry in sequences:
        if not isinstance(entry, (list, tuple)) or not entry or not callable(entry[0]):
            raise TypeError(f"each entry of sequences must be (cls, *args), got {entry!r}")
        sequence = entry[0](sequence, *entry[1:])
    return sequence
