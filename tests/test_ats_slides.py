"""ats.slides (Keras): patches read from slide files inside the model, pad-and-mask batches, fit and save."""

from __future__ import annotations

import gc
import os
import shutil

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("tifffile")
pytest.importorskip("imagecodecs")

from ats import slides as ks  # noqa: E402
from ats.core import Expectation  # noqa: E402
from atskern import io as aio  # noqa: E402
from atskern.io import grid  # noqa: E402
from tests.keras_slides import write_slides  # noqa: E402

L = keras.layers


@pytest.fixture(scope="module")
def slide_paths(tmp_path_factory):
    return write_slides(tmp_path_factory.mktemp("keras-slides"))


def _model(paths, mode="sample"):
    x_low = L.Input(shape=(None, None, 3))
    ids = L.Input(shape=(), dtype="int32")
    sizes = L.Input(shape=(2,), dtype="int64")
    logits = L.Conv2D(1, 3, padding="same")(L.Conv2D(4, 3, padding="same", activation="relu")(x_low))
    logits = L.Reshape((-1,))(logits) if False else L.Lambda(lambda t: t[..., 0], output_shape=lambda s: s[:-1])(logits)
    patches, sampled = ks.SlidePatches(paths, n_patches=4, patch_size=32, use_logits=True, mode=mode,
                                       seed=3)([x_low, logits, ids, sizes])
    feature = keras.Sequential([L.Conv2D(4, 5, strides=2, activation="relu"), L.GlobalAveragePooling2D()])
    per_patch = L.TimeDistributed(feature)(patches)
    features = Expectation()([per_patch, sampled])
    out = L.Dense(2, activation="softmax")(features)
    return keras.Model([x_low, ids, sizes], [out, patches, sampled])


def test_patches_equal_slide_reads_and_skip_padding(slide_paths):
    data = ks.SlideSequence(slide_paths, [0, 1, 0], batch_size=3, low_side=256)
    (x_low, ids, sizes), labels = data[0]
    model = _model(slide_paths, mode="topk")
    _, patches, sampled = model([x_low, ids, sizes])
    layer = next(layer for layer in model.layers if isinstance(layer, ks.SlidePatches))
    assert patches.shape == (3, 4, 32, 32, 3)
    # recompute the top-k cells of the masked map and read the same patches independently
    inner = keras.Model(model.inputs, model.get_layer(index=3).output)
    logits = inner([x_low, ids, sizes]).numpy()
    mask = grid.valid_cells(logits.shape[1:], x_low.shape[1:3], sizes)
    for b in range(3):
        masked = np.where(mask[b], logits[b], -np.inf).ravel()
        top = np.argsort(-masked, kind="stable")[:4]
        cells = np.stack([top // logits.shape[2], top % logits.shape[2]], axis=1)
        assert (cells[:, 0] < sizes[b, 0]).all() and (cells[:, 1] < sizes[b, 1]).all()
        slide = aio.open_slide(slide_paths[ids[b]])
        offsets = grid.slide_offsets(cells, logits.shape[1:], x_low.shape[1:3], sizes[b], slide.levels[0].shape[:2],
                                     (32, 32))
        want = slide.read_patches(offsets, 32) / np.float32(255)
        np.testing.assert_allclose(patches[b].numpy(), want, rtol=1e-6)
    assert np.all(np.isfinite(sampled.numpy()))
    assert layer.get_config()["slides"] == slide_paths


def test_fit_and_save(slide_paths, tmp_path):
    data = ks.SlideSequence(slide_paths, [0, 1, 0], batch_size=2, low_side=256)
    model = _model(slide_paths)
    train = keras.Model(model.inputs, model.outputs[0])
    train.compile("adam", "sparse_categorical_crossentropy")
    history = train.fit(data, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    path = tmp_path / "m.keras"
    train.save(path)
    loaded = keras.models.load_model(path, safe_mode=False)
    layer = next(layer for layer in loaded.layers if isinstance(layer, ks.SlidePatches))
    assert layer.slides == slide_paths and layer.patch_size == (32, 32)


def test_errors(slide_paths):
    with pytest.raises(ValueError, match="mode"):
        ks.SlidePatches(slide_paths, 2, 8, mode="best")
    with pytest.raises(ValueError, match="slides must name"):
        ks.SlidePatches([], 2, 8)
    with pytest.raises(ValueError, match="labels must have one entry"):
        ks.SlideSequence(slide_paths, [1])
    layer = ks.SlidePatches(slide_paths, 2, 8, use_logits=True)
    x = np.zeros((1, 16, 16, 3), np.float32)
    with pytest.raises(Exception, match="not an index into the layer's 3 slides"):
        layer([x, np.zeros((1, 16, 16), np.float32), np.array([7], np.int32), np.array([[16, 16]])])


def test_slide_sequence_scales_the_low_views(tmp_path):
    """SlideSequence multiplies the low views by ``scale`` (1/255 by default, as SlidePatches' patches; a uint16
    slide takes 1/65535): it always divided by 255 before."""
    image = (np.arange(256 * 256, dtype=np.uint32).reshape(256, 256) * 997 % 65536).astype(np.uint16)
    path = aio.write_pyramid(tmp_path / "u16.tif", image, tile=64, compression="zstd")
    slide = aio.open_slide(path)
    view = slide.read_level(slide.best_level(80))
    (x_low, _, sizes), _ = ks.SlideSequence([path], [0], batch_size=1, low_side=80, scale=1 / 65535)[0]
    np.testing.assert_allclose(x_low[0, ..., 0], view[..., 0] / 65535, rtol=1e-6)
    assert x_low.max() <= 1.0 and tuple(sizes[0]) == view.shape[:2]
    (default, _, _), _ = ks.SlideSequence([path], [0], batch_size=1, low_side=80)[0]
    np.testing.assert_allclose(default, x_low * (65535 / 255), rtol=1e-6)
    with pytest.raises(ValueError, match="scale must be a positive number"):
        ks.SlideSequence([path], [0], scale=0)


def test_sizes_outside_the_padded_view_are_refused(slide_paths):
    """sizes of 0 or below gave NaN attention and garbage patches; sizes past the padded x_low mapped the cells to
    the wrong slide pixels. Refused as ats.torch.slides refuses them."""
    layer = ks.SlidePatches(slide_paths, 2, 8, use_logits=True, mode="topk")
    x = np.zeros((2, 16, 16, 3), np.float32)
    attention = np.zeros((2, 4, 4), np.float32)
    ids = np.array([0, 1], np.int32)
    for sizes in ([[16, 16], [0, 0]], [[16, 16], [-5, 10]], [[16, 16], [17, 16]], [[1000, 1000], [16, 16]]):
        with pytest.raises(ValueError, match=r"sizes\[\d\] = .* must lie in \[1, \(16, 16\)\]"):
            layer([x, attention, ids, np.array(sizes, np.int64)])


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")
def test_opened_slides_are_bounded_and_closed(tmp_path):
    """ats.slides kept every slide it ever opened (a descriptor each): a layer over more slides than the
    descriptor limit failed with "Too many open files". At most 64 stay open; the others are closed."""
    image = np.random.default_rng(3).integers(0, 255, (64, 48, 3), dtype=np.uint8)
    first = aio.write_pyramid(tmp_path / "c0.tif", image, tile=16, compression="none")
    paths = [str(first)] + [shutil.copy(first, tmp_path / f"c{i}.tif") for i in range(1, 70)]
    targets = {os.path.realpath(p) for p in paths}

    def open_descriptors():
        return sum(os.path.realpath(f"/proc/self/fd/{fd}") in targets for fd in os.listdir("/proc/self/fd"))

    gc.collect()
    gc.disable()
    try:
        for path in paths:
            np.testing.assert_array_equal(ks._slide(path, None, 1 << 20).read_patches([[3, 4]], 8)[0],
                                          image[3:11, 4:12])
        assert open_descriptors() <= 64
    finally:
        gc.enable()
        ks._SLIDES.clear()
