"""ats.keras on Keras' tensorflow, torch and jax backends, each in a fresh process (Keras fixes its backend
at import). The checks themselves are in tests/keras_backend_checks.py; every check reports by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("tensorflow", "torch", "jax")
NEEDS = {"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}
MAIN_CHECKS = (
    "draws_equal_atskern",
    "seeded_draws_under_jit_equal_atskern",
    "unseeded_draws_are_fresh",
    "expectation_gradients_equal_atskern",
    "weighted_estimator_keeps_a_tiny_last_draw",
    "expected_layer_keeps_dtypes",
    "bad_input_gets_value_errors",
    "config_of_a_fraction_receptive_field",
    "sample_softmax_takes_16_bit_maps_in_float32",
    "logits_keys_and_mixed_precision",
    "quick_start_fits_and_predicts",
    "jitted_training",
    "files_of_the_tf_only_release_load",
    "save",
)


def available(backend: str) -> bool:
    import importlib.util

    return importlib.util.find_spec("keras") is not None and importlib.util.find_spec(NEEDS[backend]) is not None


def run_checks(backend: str, command: str, directory: Path) -> dict:
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "adapters")]),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    result = subprocess.run(
        [sys.executable, "-m", "tests.keras_backend_checks", command, str(directory)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, f"{backend} {command} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One process per backend runs the main checks (and saves a model for the cross-backend loads)."""
    directory = tmp_path_factory.mktemp("keras_backends")
    results = {b: run_checks(b, "main", directory) for b in BACKENDS if available(b)}
    return directory, results


@pytest.mark.parametrize("check", MAIN_CHECKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_on_every_backend(saved, backend, check):
    if not available(backend):
        pytest.skip(f"{NEEDS[backend]} is not installed")
    _, results = saved
    outcome = results[backend][check]
    assert outcome.startswith("ok"), f"{check} on {backend}:\n{outcome}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_keras_file_saved_on_one_backend_loads_and_predicts_the_same_on_the_others(saved, backend):
    directory, results = saved
    if not available(backend):
        pytest.skip(f"{NEEDS[backend]} is not installed")
    sources = [b for b in results if b != backend and results[b]["save"] == "ok"]
    if not sources:
        pytest.skip("no other backend saved a model")
    loaded = run_checks(backend, "load", directory)
    assert sorted(loaded) == sorted(f"load_{s}" for s in sources)
    for name, outcome in loaded.items():
        assert outcome == "ok", f"{name} on {backend}:\n{outcome}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_toy_task_is_learned_on_every_backend(backend, tmp_path):
    """tests/test_ats_training.py's toy task (only the high-resolution patches carry the label), with the
    TensorFlow version's criteria: loss from above 0.6 to below 0.3, test accuracy above 0.8. (On
    TensorFlow it is test_ats_training.py's own test; ``python -m tests.keras_backend_checks toy DIR``
    runs this one on any backend.)"""
    if not available(backend):
        pytest.skip(f"{NEEDS[backend]} is not installed")
    outcome = run_checks(backend, "toy", tmp_path)["toy_task"]
    assert outcome == "ok", outcome


MIRRORED_REPLICAS = """
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from ats.keras import SamplePatches

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    layer = SamplePatches(6, 2)
att = tf.fill((1, 8, 8), 1 / 64)
x = tf.reshape(tf.range(256, dtype=tf.float32), (1, 16, 16, 1))
step = tf.function(lambda: strategy.run(lambda: layer([x[:, ::2, ::2], x, att])[0]))
first, second = (v.numpy() for v in strategy.experimental_local_results(step()))
print("REPLICAS-DIFFER", not np.array_equal(first, second))
"""


@pytest.mark.slow
def test_unseeded_replicas_of_a_mirrored_strategy_draw_their_own_patches():
    """All replicas read one mirrored seed generator state; the replica index is mixed into the key, so two
    replicas given the same image draw different patches."""
    if not available("tensorflow"):
        pytest.skip("tensorflow is not installed")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "adapters")])}
    result = subprocess.run([sys.executable, "-c", MIRRORED_REPLICAS], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REPLICAS-DIFFER True" in result.stdout
