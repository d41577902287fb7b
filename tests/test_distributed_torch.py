"""ats.torch under DistributedDataParallel: each rank draws its own patches, DDP averages the gradients.

The two-process test launches ``examples/distributed/torch_ddp.py`` with
torchrun (gloo, CPU) and replays both ranks in this process, one model copy
per rank, averaging their gradients by hand: the replay must give the
gradients and parameters the ranks recorded.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import ats.torch as at  # noqa: E402
from ats import _distributed  # noqa: E402
from ats.torch import functional as F  # noqa: E402
from ats.torch.modules import _KeyStream, rank_seed  # noqa: E402

from .conftest import HAS_GPU  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MASK = 2**64 - 1


@pytest.fixture
def rank(monkeypatch):
    """Set this process's rank the way torchrun does (``RANK``); no process group, no TF_CONFIG."""
    monkeypatch.delenv("TF_CONFIG", raising=False)

    def set_rank(r: int):
        monkeypatch.setenv("RANK", str(r))

    set_rank(0)
    return set_rank


def splitmix64(z: int) -> int:
    """The reference splitmix64 finalizer of ``z + golden`` (Vigna), written out independently of ats."""
    z = (z + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def scramble(z: int) -> int:
    """splitmix64's finalizer alone (no golden step first): how a rank r > 0 starts its fixed seed's stream."""
    return splitmix64((z - 0x9E3779B97F4A7C15) & MASK)


def key_value(key: torch.Tensor) -> int:
    return int(key) & MASK


def test_fixed_seed_stream_is_salted_by_rank(rank):
    seed = 1234
    stream = _KeyStream(seed)
    rank0 = [key_value(stream.next()) for _ in range(3)]
    # rank 0 keeps today's keys: splitmix64 of seed + call * golden
    assert rank0 == [splitmix64((seed + k * 0x9E3779B97F4A7C15) & MASK) for k in range(3)]
    rank(1)
    stream = _KeyStream(seed)
    rank1 = [key_value(stream.next()) for _ in range(3)]
    salt = (0x9E3779B97F4A7C15 * 1) & MASK
    base = scramble(seed ^ salt)  # not the salted seed itself: seed ^ salt == seed + step when no bits collide
    assert rank1 == [splitmix64((base + k * 0x9E3779B97F4A7C15) & MASK) for k in range(3)]
    assert not set(rank0) & set(rank1)
    assert _KeyStream(seed).seed == seed  # the salt is applied when keys are drawn, not stored


def test_default_generator_keys_are_salted_by_rank(rank):
    torch.manual_seed(5)
    plain = torch.randint(0, 2**63 - 1, (), dtype=torch.int64)  # what F.random_key draws
    torch.manual_seed(5)
    assert key_value(_KeyStream(None).next()) == int(plain)  # rank 0: unchanged
    rank(1)
    torch.manual_seed(5)  # every rank seeds torch the same way
    salted = key_value(_KeyStream(None).next())
    assert salted == int(plain) ^ 0x9E3779B97F4A7C15
    assert salted != int(plain)
    rank(3)
    torch.manual_seed(5)
    assert key_value(_KeyStream(None).next()) == int(plain) ^ ((3 * 0x9E3779B97F4A7C15) & MASK)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x_high = torch.rand(2, 1, 48, 48, generator=gen)
    return nn.functional.avg_pool2d(x_high, 4), x_high, torch.rand(2, 12, 12, generator=gen) + 0.01


@pytest.mark.parametrize("seed", [None, 77])
def test_sample_patches_draws_per_rank(rank, seed):
    """Rank 1 draws what rank 0 draws with the seed salted for rank 1 (scrambled, for a fixed seed), and not what
    rank 0 draws."""
    x_low, x_high, attention = _inputs()

    def draw(r, key_seed):
        rank(r)
        torch.manual_seed(11)
        return at.SamplePatches(6, 4, seed=key_seed)(x_low, x_high, attention)[0]

    rank0, rank1 = draw(0, seed), draw(1, seed)
    assert not torch.equal(rank0, rank1)
    if seed is not None:
        assert torch.equal(rank1, draw(0, scramble(_distributed.salted_seed(seed, 1))))
        assert rank_seed(seed, 1) == scramble(_distributed.salted_seed(seed, 1)) and rank_seed(seed, 0) == seed
    torch.manual_seed(11)
    key = F.random_key() if seed is None else None
    if seed is None:
        expected_key = _distributed.salted_seed(int(key), 1)
    else:
        expected_key = splitmix64(scramble(_distributed.salted_seed(seed, 1)))
    indices, _ = F.sample(attention, 6, key=expected_key)
    offsets = F.patch_offsets(indices, (12, 12), (48, 48), (4, 4), margin=(0, (12, 12)))
    assert torch.equal(rank1, F.extract_patches(x_high, offsets, (4, 4), channels_first=True))


def test_device_key_holds_the_salted_seed(rank):
    key = at.device_key(2**63 + 9, device="cpu")
    assert key.shape == (1,) and key.dtype == torch.int64
    assert key_value(key[0]) == 2**63 + 9  # rank 0 keeps the seed
    rank(1)
    assert key_value(at.device_key(2**63 + 9, device="cpu")[0]) == _distributed.salted_seed(2**63 + 9, 1)
    torch.manual_seed(3)
    drawn = key_value(F.random_key())
    torch.manual_seed(3)
    assert key_value(at.device_key(device="cpu")[0]) == _distributed.salted_seed(drawn, 1)
    with pytest.raises(ValueError, match="seed"):
        at.device_key(-1, device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_GPU and torch.cuda.is_available()), reason="needs CUDA for both torch and CuPy")
def test_device_keys_draw_per_rank_on_cuda(rank):
    attention = torch.rand(2, 24, 24, device="cuda") + 0.01
    draws = []
    for r in (0, 1):
        rank(r)
        key = at.device_key(40)
        draws.append(F.sample(attention, 6, key=key)[0].cpu())
        assert key_value(key.cpu()[0]) == (_distributed.salted_seed(40, r) + 1) & MASK  # advanced by one draw
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(draws[1], F.sample(attention.cpu(), 6, key=_distributed.salted_seed(40, 1))[0])


# --- two processes ------------------------------------------------------------------------------

STEPS = 3
BATCH = 4
LR = 0.1


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Run the example under torchrun with 2 CPU processes; the records of both ranks."""
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters")]), OMP_NUM_THREADS="1")
    env.pop("TF_CONFIG", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "examples.distributed.torch_ddp", "--steps", str(STEPS), "--batch", str(BATCH),
               "--optimizer", "sgd", "--lr", str(LR), "--seed", "none", "--torch-seed", "0", "--record", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.slow
def test_ranks_draw_different_patches_from_the_same_image(ddp_run):
    rank0, rank1 = ddp_run
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["probe_patches"].shape == (2, 4, 1, 8, 8)
    assert not torch.equal(rank0["probe_patches"], rank1["probe_patches"])


@pytest.mark.slow
def test_ranks_stay_in_sync(ddp_run):
    rank0, rank1 = ddp_run
    for step in range(STEPS):
        for g0, g1 in zip(rank0["grads"][step], rank1["grads"][step]):
            assert torch.equal(g0, g1)
        for p0, p1 in zip(rank0["params"][step], rank1["params"][step]):
            assert torch.equal(p0, p1)
    assert not torch.equal(rank0["params"][0][0], rank0["params"][-1][0])  # and they did train


@pytest.mark.slow
def test_gradients_are_the_mean_of_each_rank_replayed_alone(ddp_run, rank):
    """Replay both ranks in this process (rank r via ``RANK``, the same default-generator state for both, as
    torch.manual_seed(0) on every rank gives) and average their gradients by hand."""
    from examples.distributed import torch_ddp

    recorded = ddp_run[0]
    models = [torch_ddp.build(None, 0)]
    models.append(copy.deepcopy(models[0]))
    x, y = torch_ddp.toy_data(64)

    def each_rank(fn):
        """Run ``fn(r, model)`` for both ranks from the same generator state, as the two processes do."""
        state = torch.get_rng_state()
        results = []
        for r, model in enumerate(models):
            rank(r)
            torch.set_rng_state(state)
            results.append(fn(r, model))
        return results

    with torch.no_grad():
        probes = each_rank(lambda r, model: model(torch_ddp.probe_batch())[1])
    for r in (0, 1):
        assert torch.equal(probes[r], ddp_run[r]["probe_patches"])

    for step in range(STEPS):
        def local_gradients(r, model):
            xb, yb = torch_ddp.shard(x, y, r, 2, step, BATCH)
            model.zero_grad()
            nn.functional.cross_entropy(model(xb)[0], yb).backward()
            return [p.grad.clone() for p in model.parameters()]

        grads = each_rank(local_gradients)
        assert any(not torch.equal(a, b) for a, b in zip(*grads))  # the ranks computed different gradients
        mean = [(a + b) / 2 for a, b in zip(*grads)]
        for want, got in zip(mean, recorded["grads"][step]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            for model in models:
                for p, g in zip(model.parameters(), mean):
                    p -= LR * g
        for want, got in zip(models[0].parameters(), recorded["params"][step]):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    assert np.isfinite(recorded["loss"]).all()
