"""Seeds salted with the process rank: rank 0 keeps the seed, other ranks get distinct seeds."""

import json
import random
import os
import subprocess
import sys

import pytest

from ats import _distributed


def test_rank_zero_keeps_the_seed():
    for seed in (0, 1, 12345, 2**64 - 1):
        assert _distributed.salted_seed(seed, 0) == seed


def test_ranks_get_distinct_seeds():
    for seed in (0, 7, 2**63 + 5):
        salted = {_distributed.salted_seed(seed, rank) for rank in range(4096)}
        assert len(salted) == 4096
        assert all(0 <= s < 2**64 for s in salted)


def test_negative_index_is_refused():
    with pytest.raises(ValueError, match="index"):
        _distributed.salted_seed(1, -1)


@pytest.mark.parametrize(
    "config, rank",
    [
        ({"cluster": {"worker": ["a", "b"]}, "task": {"type": "worker", "index": 1}}, 1),
        ({"cluster": {"chief": ["c"], "worker": ["a", "b"]}, "task": {"type": "worker", "index": 1}}, 2),
        ({"cluster": {"chief": ["c"], "worker": ["a"]}, "task": {"type": "chief", "index": 0}}, 0),
    ],
)
def test_rank_from_tf_config(monkeypatch, config, rank):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert _distributed._tf_config_rank() == rank


def test_rank_from_torchrun_environment(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setattr(_distributed, "_torch_rank", lambda: None)
    monkeypatch.setattr(_distributed, "_jax_rank", lambda: None)
    assert _distributed.process_index() == 3
    monkeypatch.setenv("RANK", "0")
    assert _distributed.process_index() == 0


def test_an_initialized_framework_decides_even_for_rank_zero(monkeypatch):
    """torch.distributed's rank 0 is not overridden by a TF_CONFIG or RANK left in the environment."""
    monkeypatch.setattr(_distributed, "_torch_rank", lambda: 0)
    monkeypatch.setenv("RANK", "1")
    config = {"cluster": {"worker": ["a", "b"]}, "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert _distributed.process_index() == 0
    monkeypatch.setattr(_distributed, "_torch_rank", lambda: None)
    monkeypatch.setattr(_distributed, "_jax_rank", lambda: None)
    assert _distributed.process_index() == 1


def test_asking_for_the_rank_starts_no_jax_backend():
    pytest.importorskip("jax")
    code = (
        "import jax\n"
        "from jax._src import xla_bridge\n"
        "from ats import _distributed\n"
        "assert _distributed.process_index() == 0\n"
        "print(xla_bridge.backends_are_initialized())\n"
    )
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.pop("RANK", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def _circular_distance(a: int, b: int) -> int:
    d = (a - b) % 2**64
    return min(d, 2**64 - d)


def test_salted_device_key_sequences_stay_far_apart():
    """A device key counts up by one per draw: rank r draws salted_seed(seed, r) + t. For every seed, two of the
    first 1024 ranks start more than 2**42 apart (ats.torch.device_key's docstring says so)."""
    masks = [_distributed.salted_seed(0, r) for r in range(1024)]  # seed 0: the xor masks themselves
    # |(s ^ m) - s| >= 2**(h+1) - m for the top bit h of m, with equality for some s: the worst seed
    bound = min(2 ** (m.bit_length()) - m for m in (a ^ b for i, a in enumerate(masks) for b in masks[i + 1:]))
    assert bound > 2**42
    rng = random.Random(0)
    for _ in range(2000):  # and directly, for random seeds and rank pairs
        seed = rng.getrandbits(64)
        a, b = rng.sample(range(1024), 2)
        assert _circular_distance(_distributed.salted_seed(seed, a), _distributed.salted_seed(seed, b)) >= bound
