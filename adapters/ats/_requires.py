"""The frameworks the adapters import, checked first: a missing one names the pip extra that installs it."""

from __future__ import annotations

import importlib.util

EXTRAS = {"torch": "torch", "jax": "jax", "tensorflow": "tensorflow-cpu", "keras": "tensorflow-cpu"}
NAMES = {"torch": "PyTorch", "jax": "JAX", "tensorflow": "TensorFlow", "keras": "Keras 3"}


def require(module: str, what: str) -> None:
    """An ImportError saying how to install ``module`` (``torch``, ``jax``, ``tensorflow`` or ``keras``) unless it
    can be imported; ``what`` is the adapter that needs it."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{what} needs {NAMES[module]}, which is not installed: pip install "
                          f"'atskern[{EXTRAS[module]}]'" + (" (or [tensorflow] on a GPU)" if module == "tensorflow"
                                                             else ""))
