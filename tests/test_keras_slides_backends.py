"""ats.slides (Keras) on the torch and JAX backends: a fresh process each (Keras fixes its backend at import).

The TensorFlow backend is tests/test_ats_slides.py. Here: the top-k patches
equal independent reads of the slide files, padding cells are never drawn,
the model fits (jitted on JAX) and survives ``.keras`` save/load.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("tifffile")
pytest.importorskip("imagecodecs")
pytest.importorskip("keras")

from tests.keras_slides import write_slides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
    import sys
    import numpy as np
    import keras
    from keras import layers as L
    from ats import slides as ks
    from ats.keras.functions import Expected  # ats.core.Expectation once ats.core runs on every backend
    from atskern import io as aio
    from atskern.io import grid

    paths = sys.argv[1:]
    data = ks.SlideSequence(paths, [0, 1, 0], batch_size=3, low_side=256)
    (x_low, ids, sizes), labels = data[0]

    def build(mode):
        x = L.Input(shape=x_low.shape[1:])
        i = L.Input(shape=(), dtype="int32")
        s = L.Input(shape=(2,), dtype="int32")
        # a grid coarser than x_low (Keras' torch trainer once ran the layer on all-ones sizes: every cell masked)
        logits = L.Conv2D(1, 3, strides=2, padding="same")(L.Conv2D(4, 3, padding="same", activation="relu")(x))
        logits = L.Reshape(logits.shape[1:3])(logits)
        patches, sampled = ks.SlidePatches(paths, n_patches=4, patch_size=32, use_logits=True, mode=mode,
                                           seed=3)([x, logits, i, s])
        feature = keras.Sequential([L.Conv2D(4, 5, strides=2, activation="relu"), L.GlobalAveragePooling2D()])
        features = Expected()([sampled, L.TimeDistributed(feature)(patches)])
        out = L.Dense(2, activation="softmax")(features)
        return keras.Model([x, i, s], [out, patches, sampled, logits])

    def check_topk(patches, sampled, logits):
        mask = grid.valid_cells(logits.shape[1:], x_low.shape[1:3], sizes)
        for b in range(3):
            masked = np.where(mask[b], logits[b], -np.inf).ravel()
            top = np.argsort(-masked, kind="stable")[:4]  # ties to the lower cell, as tf.math.top_k
            cells = np.stack([top // logits.shape[2], top % logits.shape[2]], axis=1)
            assert mask[b][cells[:, 0], cells[:, 1]].all()
            slide = aio.open_slide(paths[ids[b]])
            offsets = grid.slide_offsets(cells, logits.shape[1:], x_low.shape[1:3], sizes[b],
                                         slide.levels[0].shape[:2], (32, 32))
            want = slide.read_patches(offsets, 32) / np.float32(255)
            np.testing.assert_allclose(patches[b], want, rtol=1e-6)
            assert abs(sampled[b].sum() - np.sort(np.exp(masked - masked.max()))[::-1][:4].sum()
                       / np.exp(masked - masked.max()).sum()) < 1e-5

    keras.utils.set_random_seed(0)
    model = build("topk")
    _, patches, sampled, logits = (keras.ops.convert_to_numpy(t) for t in model([x_low, ids, sizes]))
    check_topk(patches, sampled, logits)
    # seven cells tied above the rest (torch.topk took them in another order than TF and JAX)
    tied = np.full((3, 64, 64), -1, np.float32)
    for r, c in ((16, 16), (20, 40), (28, 28), (32, 12), (36, 48), (44, 24), (48, 40)):
        tied[:, r, c] = 0
    layer = ks.SlidePatches(paths, n_patches=4, patch_size=32, use_logits=True, mode="topk")
    patches, sampled = (keras.ops.convert_to_numpy(t) for t in layer([x_low, tied, ids, sizes]))
    check_topk(patches, sampled, tied)
    print("TOPK-OK")

    for bad in (np.zeros_like(sizes), sizes + x_low.shape[1]):  # empty views; views past the padded x_low
        try:
            layer([x_low, tied, ids, bad])
        except ValueError as error:  # checked before the host callback, which JAX would wrap in its own error
            assert "must lie in [1, " in str(error), error
        else:
            raise AssertionError(f"sizes {bad.tolist()} were accepted")
    print("SIZES-OK")

    sampler = build("sample")
    for layer in sampler.layers:
        if isinstance(layer, ks.SlidePatches):
            layer.seed = None  # fresh draws from the layer's seed generator
    train = keras.Model(sampler.inputs, sampler.outputs[0])
    train.compile("adam", "sparse_categorical_crossentropy")
    history = train.fit(ks.SlideSequence(paths, [0, 1, 0], batch_size=3, low_side=256), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    _, patches, sampled, logits = (keras.ops.convert_to_numpy(t) for t in sampler([x_low, ids, sizes]))
    assert np.isfinite(sampled).all() and (sampled > 0).all()  # no padding cell (probability 0) was drawn
    print("FIT-OK", getattr(train, "jit_compile", None))

    path = sys.argv[1] + ".keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(model.predict([x_low, ids, sizes], verbose=0), loaded.predict([x_low, ids, sizes], verbose=0)):
        np.testing.assert_array_equal(a, b)
    print("SAVE-OK")
"""


@pytest.fixture(scope="module")
def slide_paths(tmp_path_factory):
    return write_slides(tmp_path_factory.mktemp("keras-slides-backends"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_slide_patches_on_backend(backend, slide_paths):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "adapters")])}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), *slide_paths], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "TOPK-OK" in done.stdout and "SIZES-OK" in done.stdout and "SAVE-OK" in done.stdout
    if backend == "jax":
        assert "FIT-OK True" in done.stdout  # SlidePatches ran inside the jitted training step
    else:
        assert "FIT-OK" in done.stdout
