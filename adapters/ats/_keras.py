"""Keras 3 glue: the TensorFlow-backend check and the serialization package name."""

from __future__ import annotations

import keras

PACKAGE = "ats"


def require_tensorflow_backend(what: str = "ats") -> None:
    """Raise ImportError unless Keras 3 runs on the TensorFlow backend."""
    major = int(keras.__version__.split(".")[0])
    if major < 3:
        raise ImportError(f"{what} needs Keras 3, found keras {keras.__version__}")
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ImportError(
            f"{what} runs on the TensorFlow backend of Keras 3, but the Keras backend is {backend!r}; "
            "set KERAS_BACKEND=tensorflow before importing keras"
        )


def register(cls):
    """Register ``cls`` for ``keras.models.load_model`` under the package name ``ats``."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)
