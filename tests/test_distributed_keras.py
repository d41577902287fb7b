"""Keras (TensorFlow backend) under MultiWorkerMirroredStrategy: each worker draws its own patches, weights agree.

The two-worker test starts ``examples/distributed/keras_mwms.py`` twice with
``TF_CONFIG`` naming two gRPC servers on free localhost ports, and checks the
records: the workers draw different patches from the same probe image, start
and end with identical weights, and the first update is the learning rate
times the sum of the two workers' own gradients (their losses are divided by
the global batch), summed here by hand.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from ats import _distributed  # noqa: E402
from ats.core import SamplePatches  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
LR = 0.1


def tf_config(ports, index: int) -> str:
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


def test_sample_patches_seed_is_salted_with_the_worker_index(monkeypatch):
    rng = np.random.default_rng(0)
    x_high = rng.uniform(size=(2, 48, 48, 1)).astype("float32")
    x_low = x_high.reshape(2, 12, 4, 12, 4, 1).mean(axis=(2, 4))
    attention = (rng.uniform(size=(2, 12, 12)) + 0.01).astype("float32")

    def draw(index, seed):
        monkeypatch.setenv("TF_CONFIG", tf_config((1, 2), index))
        patches, _ = SamplePatches(5, 4, seed=seed)([x_low, x_high, attention], training=True)
        return np.asarray(patches)

    seed = 4321
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    alone = np.asarray(SamplePatches(5, 4, seed=seed)([x_low, x_high, attention], training=True)[0])
    np.testing.assert_array_equal(draw(0, seed), alone)  # worker 0 draws what a single process draws
    worker1 = draw(1, seed)
    assert not np.array_equal(worker1, alone)
    np.testing.assert_array_equal(worker1, draw(0, _distributed.salted_seed(seed, 1)))


def free_ports(n: int):
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_workers(out: Path, attempt: int):
    """Start both workers, wait for both (generously: the machine may be busy); (return codes, logs)."""
    ports = free_ports(2)
    base = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters")]), KERAS_BACKEND="tensorflow",
                CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    base.pop("RANK", None)
    command = [sys.executable, "-m", "examples.distributed.keras_mwms", "--steps", str(STEPS), "--optimizer", "sgd",
               "--lr", str(LR), "--global-batch", "4", "--record", str(out)]
    workers, logs = [], []
    try:
        for index in (0, 1):
            log = out / f"attempt{attempt}-worker{index}.log"
            logs.append(log)
            with open(log, "w") as sink:
                workers.append(subprocess.Popen(command, cwd=ROOT, env=dict(base, TF_CONFIG=tf_config(ports, index)),
                                                stdout=sink, stderr=subprocess.STDOUT))
        codes = [w.wait(timeout=540) for w in workers]
    finally:
        for w in workers:  # only if one of them hung: a worker whose peer died waits for it forever
            if w.poll() is None:
                w.kill()
                w.wait()
    return codes, [log.read_text(errors="replace") for log in logs]


@pytest.fixture(scope="module")
def mwms_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mwms")
    for attempt in range(2):
        codes, logs = run_workers(out, attempt)
        if codes == [0, 0]:
            break
        # a port taken between choosing it and the server binding it is worth one more try; nothing else is
        if not any("address already in use" in log.lower() or "failed to bind" in log.lower() for log in logs):
            break
    report = "\n\n".join(f"worker {i} exited {c}:\n{log[-4000:]}" for i, (c, log) in enumerate(zip(codes, logs)))
    assert codes == [0, 0], report
    records = [dict(np.load(out / f"worker{i}.npz")) for i in (0, 1)]
    n = len([k for k in records[0] if k.startswith("initial_")])
    return records, n


@pytest.mark.slow
def test_workers_draw_different_patches_from_the_same_image(mwms_run):
    (first, second), _ = mwms_run
    assert int(first["replicas"]) == int(second["replicas"]) == 2
    assert first["before"].shape == (2, 4, 8, 8, 1)
    assert not np.array_equal(first["before"], second["before"])
    assert not np.array_equal(first["after"], second["after"])


@pytest.mark.slow
def test_weights_stay_identical_and_the_update_sums_both_workers_gradients(mwms_run):
    (first, second), n = mwms_run
    assert n > 0
    for i in range(n):
        np.testing.assert_array_equal(first[f"initial_{i}"], second[f"initial_{i}"])
        np.testing.assert_array_equal(first[f"step1_{i}"], second[f"step1_{i}"])
        np.testing.assert_array_equal(first[f"final_{i}"], second[f"final_{i}"])
        want = first[f"initial_{i}"] - LR * (first[f"grad_{i}"].astype(np.float64) + second[f"grad_{i}"])
        np.testing.assert_allclose(first[f"step1_{i}"], want, rtol=1e-5, atol=1e-7)
    # the workers computed different gradients (their own data and patches), and training moved the weights
    assert any(not np.array_equal(first[f"grad_{i}"], second[f"grad_{i}"]) for i in range(n))
    assert any(not np.array_equal(first[f"initial_{i}"], first[f"final_{i}"]) for i in range(n))
    np.testing.assert_array_equal(first["loss"], second["loss"])  # the reduced (global) loss
    assert np.isfinite(first["loss"]).all()
