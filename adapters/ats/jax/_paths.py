"""Which implementation an ``ats.jax`` call runs: atskern's kernels or the pure-JAX (XLA) ops.

``path="xla"``: the ``jnp``/``lax`` ops (``_sampling``, ``_patches``), on
any device, under every transformation. ``path="kernel"``: atskern's Numba
kernels, called directly when the call is eager (concrete arrays, no
transformation) and through ``jax.pure_callback`` when traced (``_kernel``).
``path="auto"`` (the default) picks what measured faster
(``python -m bench --only xla``; README, "Paths: kernel or XLA"):

================  ===========================  =====================
operation         CPU device                   GPU / TPU
================  ===========================  =====================
sampling          kernel (eager and traced)    xla
patch gather      kernel eager, xla traced     xla
================  ===========================  =====================

Sampling maps are small, so the callback's copy costs little and atskern's
sampler is 2-10x faster than the compiled Philox. A traced patch gather is
not: ``pure_callback`` copies its operands to the host, the whole image
(hundreds of MB at 2048x2048), so under ``jit``/``grad`` the XLA gather wins.
Both paths give the same patches and gradients exactly; the draws are the
same except that, without JAX's 64-bit mode, the XLA path ranks keys in
float32 and may differ at near ties (the kernel path is atskern itself).
"""

from __future__ import annotations

import jax

PATHS = ("auto", "xla", "kernel")


def check(path) -> str:
    if not isinstance(path, str) or path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return path


def is_concrete(*arrays) -> bool:
    """True unless an argument is a tracer (under ``jit``, ``vmap``, ``grad``...)."""
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def platform(*arrays) -> str:
    """The platform (``"cpu"``, ``"gpu"``, ``"tpu"``) the arrays live on; JAX's default backend for tracers."""
    for a in arrays:
        if not isinstance(a, jax.core.Tracer) and isinstance(a, jax.Array):
            devices = a.devices()
            if len(devices) == 1:
                return next(iter(devices)).platform
    return jax.default_backend()


def choose(path: str, operation: str, *arrays) -> str:
    """``"kernel"`` or ``"xla"`` for ``operation`` (``"sample"`` or ``"patches"``) on these arrays."""
    path = check(path)
    if path != "auto":
        return path
    if platform(*arrays) != "cpu":
        return "xla"
    if operation == "sample":
        return "kernel"
    return "kernel" if is_concrete(*arrays) else "xla"
