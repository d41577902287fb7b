"""The rank of this process in a multi-process training job, and sampling seeds salted with it.

Every rank of a data-parallel job must draw its own patches: with one seed
shared by all ranks, two ranks holding the same image would draw the same
positions and the estimator's samples would be correlated across the global
batch. :func:`process_index` finds the rank from whichever framework set up
the job; :func:`salted_seed` mixes it into a 64-bit seed, leaving the seed
unchanged on rank 0 (so a single-process run draws what it always drew).
"""

from __future__ import annotations

import json
import os
import sys

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = 2**64 - 1


def _torch_rank() -> int | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return None


def _jax_rank() -> int | None:
    """``jax.process_index()`` in a multi-process JAX job; None otherwise, without starting a JAX backend."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    try:
        if jax.distributed.is_initialized():
            return int(jax.process_index())
        # multi-host runtimes that need no jax.distributed.initialize (TPU pods): ask only once a backend runs
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized() and jax.process_count() > 1:
            return int(jax.process_index())
    except (AttributeError, ImportError, RuntimeError):  # another JAX version, or no backend could start
        return None
    return None


def _tf_config_rank() -> int | None:
    """The global worker index of ``TF_CONFIG`` (chief first, then the workers), as MultiWorkerMirroredStrategy ranks them."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return None
    try:
        config = json.loads(text)
        task = config["task"]
        kind, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError):
        return None
    cluster = config.get("cluster", {})
    if kind == "chief":
        return index
    if kind == "worker":
        return len(cluster.get("chief", [])) + index
    return None


def process_index() -> int:
    """This process's rank: ``torch.distributed``'s (when initialized), JAX's process index (in a
    multi-process JAX job), the worker index of ``TF_CONFIG`` (MultiWorkerMirroredStrategy), torchrun's
    ``RANK``, in that order; 0 in a single-process run.

    Read on every call (a few microseconds), so it follows a process group set up after the model was built.
    """
    for rank in (_torch_rank(), _jax_rank(), _tf_config_rank()):
        if rank is not None:
            return rank
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def salted_seed(seed: int, index: int | None = None) -> int:
    """``seed`` (an int in ``[0, 2**64)``) mixed with a process index (this process's by default).

    Index 0 returns ``seed`` itself; other indices give seeds that differ from
    it and from each other (an odd multiplier is a bijection of 64-bit words,
    and the xor keeps distinct indices distinct).
    """
    index = process_index() if index is None else int(index)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return (int(seed) ^ ((index * _GOLDEN) & _MASK64)) & _MASK64
