"""ats in fresh processes: tf.distribute.MirroredStrategy on 2 logical CPUs, and an unsupported Keras backend."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "adapters")]), **env}
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environment, timeout=300
    )


MIRRORED = """
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    from keras import layers as L
    from ats.core import attention_sampling
    from ats.utils.layers import SampleSoftmax

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        x_high = L.Input((64, 64, 1))
        x_low = L.AveragePooling2D(4)(x_high)
        attention = keras.Sequential([L.Conv2D(1, 3, padding="same"), SampleSoftmax(squeeze_channels=True)])
        feature = keras.Sequential([L.Conv2D(4, 3, activation="relu"), L.GlobalMaxPooling2D()])
        features, _, _ = attention_sampling(attention, feature, patch_size=8, n_patches=4, seed=3)([x_low, x_high])
        model = keras.Model(x_high, L.Dense(2)(features))
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(16, 64, 64, 1)).astype("float32")
    y = rng.integers(0, 2, 16)
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    after = [w.numpy() for w in model.trainable_weights]
    assert np.isfinite(history.history["loss"]).all()
    assert all(not np.array_equal(b, a) for b, a in zip(before, after) if b.ndim > 1)
    print("MIRRORED-OK", len(history.history["loss"]))
"""


@pytest.mark.slow
def test_fit_under_mirrored_strategy_on_two_logical_cpus():
    result = run_python(MIRRORED)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MIRRORED-OK 2" in result.stdout


@pytest.mark.parametrize("keras_first", [False, True], ids=["ats-first", "keras-first"])
def test_unsupported_keras_backend_is_a_clear_import_error(keras_first):
    """ats.core and ats.keras run on tensorflow, torch and jax; Keras' numpy backend is refused by name."""
    if keras_first:
        pytest.importorskip("jax")  # Keras' numpy backend imports jax
    code = f"""
        if {keras_first}:
            import keras
        for name in ("ats.keras", "ats.core"):
            try:
                __import__(name)
            except ImportError as error:
                print("REFUSED:", error)
            else:
                print("IMPORTED")
        import ats  # the light package itself still imports
        print("torch loaded:", "torch" in __import__("sys").modules)
    """
    result = run_python(code, KERAS_BACKEND="numpy")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("the Keras backend is 'numpy'") == 2, result.stdout
    assert "('tensorflow', 'torch', 'jax')" in result.stdout
    assert "torch loaded: False" in result.stdout


def test_ats_core_does_not_import_torch_nor_touch_openmp_waiting():
    """The kernels run on TBB: ``import ats`` leaves OMP_WAIT_POLICY alone (atskern sets PASSIVE only for a
    user-selected OpenMP layer)."""
    code = (
        "import os, sys, ats.core, ats.ops, ats.utils.layers, numpy as np, atskern;"
        "atskern.sample(np.ones((2, 5)), 1);"
        "print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))"
    )
    environment = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER")}
    for layer, expected in (None, "False None"), ("omp", "False PASSIVE"):
        env = {**environment, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "adapters")])}
        if layer:
            env["NUMBA_THREADING_LAYER"] = layer
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip().endswith(expected)
