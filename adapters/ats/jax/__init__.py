"""ats.jax: attention sampling for JAX (no Flax), draw for draw with atskern.

Functions (also in :mod:`ats.jax.functional`, mirroring
:mod:`ats.torch.functional`): ``sample``, ``sample_indices``,
``patch_offsets``, ``extract_patches``, ``scatter_patches``,
``extract_multiscale``, ``expectation``, ``expectation_grad``,
``sample_softmax``, ``multinomial_entropy``.

Sampling and patches have two paths (``path="auto"|"xla"|"kernel"``): atskern's
Numba kernels (directly when eager, ``jax.pure_callback`` when traced) and
pure JAX; ``"auto"`` takes the kernel on CPU devices where it measured
faster and pure JAX elsewhere (``ats.jax._paths``). On the pure-JAX path atskern's
Philox4x32-10 generator is written in ``jnp`` uint32 operations, so a seed
gives atskern's draws; selection is ``lax.top_k``, patches are vmapped
dynamic slices with a fill value and an exact scatter-add adjoint, the
estimator is a ``jax.custom_vjp``. All of it compiles under ``jax.jit``,
batches under ``jax.vmap`` and runs on any JAX device.

JAX's 64-bit mode is never changed here. With it on (``jax.config.update(
"jax_enable_x64", True)`` or a ``jax.enable_x64()`` context) sampling runs in
float64 as atskern does; with it off (the default) in float32, which can
reorder near-tied keys (see ``ats.jax._sampling`` and the README).
"""

from .._requires import require

require("jax", "ats.jax")
# ruff: noqa: E402

from . import functional
from ._paths import PATHS
from ._rng import x64_enabled
from .functional import (
    expectation,
    expectation_grad,
    extract_multiscale,
    multinomial_entropy,
    sample_softmax,
    extract_patches,
    patch_offsets,
    sample,
    sample_indices,
    scatter_patches,
)

__all__ = [
    "functional",
    "sample",
    "sample_indices",
    "patch_offsets",
    "extract_patches",
    "scatter_patches",
    "extract_multiscale",
    "expectation",
    "expectation_grad",
    "sample_softmax",
    "multinomial_entropy",
    "PATHS",
    "x64_enabled",
]
