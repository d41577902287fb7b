"""Keras 3 glue: the TensorFlow-backend check and the serialization package name.

The backend is checked before Keras is imported (from ``KERAS_BACKEND`` or
``keras.json``), so that a non-TensorFlow setup gets this module's message
rather than whatever importing that backend fails with, and again after.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

PACKAGE = "ats"


def _configured_backend() -> str:
    """The backend Keras will use (or uses, once imported), as Keras decides it."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        return keras.backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as handle:
            return json.load(handle).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def _refuse(what: str, backend: str):
    raise ImportError(
        f"{what} runs on the TensorFlow backend of Keras 3, but the Keras backend is {backend!r}; "
        "set KERAS_BACKEND=tensorflow before importing keras"
    )


def require_tensorflow_backend(what: str = "ats") -> None:
    """Raise ImportError unless Keras 3 runs (or will run) on the TensorFlow backend."""
    backend = _configured_backend()
    if backend != "tensorflow":
        _refuse(what, backend)
    import keras

    major = int(keras.__version__.split(".")[0])
    if major < 3:
        raise ImportError(f"{what} needs Keras 3, found keras {keras.__version__}")
    if keras.backend.backend() != "tensorflow":
        _refuse(what, keras.backend.backend())


BACKENDS = ("tensorflow", "torch", "jax")


def require_keras(what: str = "ats.keras") -> str:
    """Raise ImportError unless Keras 3 runs on one of :data:`BACKENDS`; return the backend's name."""
    from ._requires import require

    require("keras", what)
    backend = _configured_backend()
    if backend not in BACKENDS:
        raise ImportError(f"{what} runs on the Keras 3 backends {BACKENDS}, but the Keras backend is {backend!r}")
    if "keras" not in sys.modules and importlib.util.find_spec(backend) is None:
        source = "KERAS_BACKEND" if os.environ.get("KERAS_BACKEND") else "Keras' default"
        raise ImportError(f"{what}: Keras' backend is {backend!r} ({source}), which is not installed; install it "
                          f"or set KERAS_BACKEND to an installed one of {BACKENDS}")
    import keras

    major = int(keras.__version__.split(".")[0])
    if major < 3:
        raise ImportError(f"{what} needs Keras 3, found keras {keras.__version__}")
    backend = keras.backend.backend()
    if backend not in BACKENDS:
        raise ImportError(f"{what} runs on the Keras 3 backends {BACKENDS}, but the Keras backend is {backend!r}")
    return backend


def register(cls):
    """Register ``cls`` for ``keras.models.load_model`` under the package name ``ats``."""
    import keras

    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)
