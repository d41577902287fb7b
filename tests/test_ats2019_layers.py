"""The 2019 layers and training helpers: image transforms, Batcher & co., attention_sampling's 2019 test, save/load."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from ats.core import Expectation, SamplePatches, attention_sampling  # noqa: E402
from ats.core.builder import ATSBuilder  # noqa: E402
from ats.utils.layers import (  # noqa: E402
    ImageLinearTransform,
    ImagePan,
    L2Normalize,
    ResizeImages,
    SampleSoftmax,
    TotalReshape,
)
from ats.utils.regularizers import multinomial_entropy  # noqa: E402
from ats.utils.training import Batcher, DataTransform, LambdaTransform, compose_sequences  # noqa: E402

L = keras.layers


def _np(x):
    return keras.ops.convert_to_numpy(x)


# --- image transforms (2019 tests/utils/test_image_transforms.py) -------------------------


@pytest.mark.parametrize("transform", [ImageLinearTransform, ImagePan])
def test_identity_in_inference_changed_in_training(transform):
    img = np.random.default_rng(0).uniform(size=(1, 32, 64, 3)).astype(np.float32)
    model = keras.Sequential([L.Input((32, 64, 3)), transform(p=1, seed=1)])
    np.testing.assert_array_equal(model.predict(img, verbose=0), img)
    model.compile(loss="mse", optimizer="sgd")
    assert float(model.train_on_batch(img, img)) > 0


@pytest.mark.parametrize("transform", [ImageLinearTransform, ImagePan])
def test_transform_applies_with_probability_p(transform):
    n = 2000
    out = _np(transform(p=0.5, seed=2)(np.ones((n, 10, 10, 3), np.float32), training=True))
    unchanged = np.mean(out.reshape(n, -1).sum(axis=-1) == 300)
    assert abs(unchanged - 0.5) < 4 * np.sqrt(0.25 / n)


def test_pan_directions():
    ones = np.ones((5, 60, 60, 3), np.float32)
    y = _np(ImagePan(pixels=20, p=1, horizontally=True, vertically=False, seed=3)(ones, training=True))
    assert np.all((y[:, :, 0] == 0) | (y[:, :, -1] == 0))  # an edge column is shifted in
    assert (y == y[:, :1]).all()  # every row the same: no vertical shift
    y = _np(ImagePan(pixels=20, p=1, horizontally=False, vertically=True, seed=3)(ones, training=True))
    assert np.all((y[:, 0] == 0) | (y[:, -1] == 0))
    assert (y == y[:, :, :1]).all()
    # the shift is at most `pixels`: at least 60 - 20 - 1 columns stay ones
    y = _np(ImagePan(pixels=20, p=1, seed=4)(ones, training=True))
    assert (y[:, 0, :, 0].sum(axis=1) >= 39).all()


def test_pan_moves_content_by_whole_pixels():
    x = np.zeros((1, 9, 9, 1), np.float32)
    x[0, 4, 4] = 1
    y = _np(ImagePan(pixels=3, p=1, horizontally=True, vertically=True, seed=5)(x, training=True))
    (r, c), = np.argwhere(y[0, ..., 0] == 1)
    assert abs(r - 4) <= 3 and abs(c - 4) <= 3 and y.sum() == 1


def test_linear_transform_parameters():
    ones = np.ones((5, 20, 20, 3), np.float32)
    y = _np(ImageLinearTransform(p=1, a=(0.8, 0.8), b=(0.1, 0.1))(ones, training=True))
    np.testing.assert_allclose(y, 0.9, rtol=1e-6)
    y = _np(ImageLinearTransform(p=1, a=(0.8, 0.9), b=(0, 0.1), seed=6)(ones, training=True))
    assert (y >= 0.8 - 1e-6).all() and (y <= 1.0 + 1e-6).all()
    assert np.allclose(y, y[:, :1, :1, :1])  # one (a, b) per image
    with pytest.raises(ValueError, match="p must be a probability"):
        ImageLinearTransform(p=2)
    with pytest.raises(ValueError, match="a must have low <= high"):
        ImageLinearTransform(a=(1.2, 0.8))
    with pytest.raises(ValueError, match="mode must be 'NEAREST' or 'BILINEAR'"):
        ImagePan(mode="cubic")


def test_resize_images_of_blocks():
    blocks = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    x = np.kron(blocks, np.ones((3, 3), np.float32))[None, :, :, None]  # 6x6 of 3x3 blocks
    for mode in ("bilinear", "bicubic"):
        y = _np(ResizeImages((2, 2), mode=mode)(x))
        np.testing.assert_allclose(y[0, ..., 0], blocks, rtol=1e-5)  # pixel centres sit in the block centres
    assert ResizeImages((4, 5)).compute_output_shape((None, 6, 6, 3)) == (None, 4, 5, 3)
    with pytest.raises(ValueError, match="Unsupported resize mode"):
        ResizeImages((2, 2), mode="fancy")


# --- training helpers ------------------------------------------------------------------


class Items:
    """A sequence of ([x_low, x_high], y) samples, counting epoch ends."""

    def __init__(self, n):
        self.n = n
        self.epochs = 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return [np.full((2,), i, np.float32), np.full((3, 3), i, np.float32)], np.float32(i)

    def on_epoch_end(self):
        self.epochs += 1


def test_batcher_batches_and_shuffles():
    items = Items(10)
    batcher = Batcher(items, 4)
    assert len(batcher) == 3
    (low, high), y = batcher[0]
    assert isinstance(low, np.ndarray) and low.shape == (4, 2) and high.shape == (4, 3, 3)
    assert y.tolist() == [0, 1, 2, 3]
    assert batcher[2][1].tolist() == [8, 9]  # the remainder
    with pytest.raises(IndexError, match="out of range"):
        batcher[3]
    np.random.seed(0)
    batcher.on_epoch_end()
    order = np.concatenate([batcher[i][1] for i in range(3)])
    assert sorted(order.tolist()) == list(range(10)) and order.tolist() != list(range(10))
    assert items.epochs == 1
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        Batcher(items, 0)


def test_transforms_and_composition():
    items = Items(5)
    doubled = LambdaTransform(items, lambda x: [2 * x[0], x[1]])
    assert doubled[3][0][0].tolist() == [6, 6] and doubled[3][1] == 3
    composed = compose_sequences(items, [(Batcher, 2), (LambdaTransform, lambda x: x[1])])
    assert isinstance(composed, LambdaTransform) and len(composed) == 3
    x, y = composed[1]
    assert x.shape == (2, 3, 3) and y.tolist() == [2, 3]
    composed.on_epoch_end()
    assert items.epochs == 1
    with pytest.raises(NotImplementedError, match="must define _transform"):
        DataTransform(items)[0]


def test_fit_on_a_batcher():
    class Pairs:
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return np.full((3,), i / 12, np.float32), np.float32(i / 12)

    model = keras.Sequential([L.Input((3,)), L.Dense(1)])
    model.compile("sgd", "mse")
    history = model.fit(Batcher(Pairs(), 5), epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()


# --- attention_sampling (2019 tests/core/test_ats_layer.py) --------------------------------


SMALL, LARGE = (15, 15, 3), (100, 100, 3)
CONV = dict(kernel_size=3, padding="same", activation="relu")


def _attention():
    return keras.Sequential([L.Input(SMALL), L.Conv2D(8, **CONV), L.MaxPooling2D(), L.Conv2D(8, **CONV),
                             L.Conv2D(1, 3, padding="same"), SampleSoftmax(squeeze_channels=True)])


def _feature(shape=SMALL):
    return keras.Sequential([L.Input(shape), L.Conv2D(8, **CONV), L.MaxPooling2D(), L.Conv2D(16, **CONV),
                             L.MaxPooling2D(), L.Flatten(), L.Dense(64, activation="relu")])


def test_attention_sampling_2019_model_trains():
    x_full, x_small = L.Input(LARGE), L.Input(SMALL)
    attention, feature = _attention(), _feature()
    features, att, patches = attention_sampling(attention, feature, (15, 15),
                                                attention_regularizer=lambda x: keras.ops.sum(x))([x_small, x_full])
    model = keras.Model(inputs=[x_small, x_full], outputs=[features])
    rng = np.random.default_rng(7)
    data = [rng.uniform(size=(4, *SMALL)), rng.uniform(size=(4, *LARGE))]
    assert model.predict(data, verbose=0).shape == (4, 64)
    model.compile("sgd", "mse")
    model.fit(data, rng.uniform(size=(4, 64)), verbose=0)
    assert len(model.trainable_weights) == len(attention.trainable_weights) + len(feature.trainable_weights)


def test_patch_size_none_takes_the_feature_input_shape():
    x_full, x_small = L.Input(LARGE), L.Input(SMALL)
    features, _, patches = attention_sampling(_attention(), _feature((12, 9, 3)), None, n_patches=4)([x_small, x_full])
    assert tuple(patches.shape) == (None, 4, 12, 9, 3)
    # a feature callable without an input shape: x_low's spatial shape (2019's docs)
    plain = keras.Sequential([L.Conv2D(4, 3), L.GlobalMaxPooling2D()])
    _, _, patches = attention_sampling(_attention(), plain, None, n_patches=4)([x_small, x_full])
    assert tuple(patches.shape) == (None, 4, 15, 15, 3)


# --- every 2019 layer through model.save / keras.models.load_model ------------------------------


def test_every_2019_layer_survives_save_and_load(tmp_path):
    x_in = L.Input((64, 64, 1))
    x_high = ImageLinearTransform(seed=1)(x_in)
    x_high = ImagePan(pixels=5, horizontally=True, vertically=True, seed=2)(x_high)
    x_low = ResizeImages((16, 16))(x_high)
    attention = keras.Sequential([L.Conv2D(4, 3, padding="same", activation="relu"), L.Conv2D(1, 3, padding="same"),
                                  SampleSoftmax(squeeze_channels=True, smooth=1e-4)])
    feature = keras.Sequential([L.Conv2D(4, 3, activation="relu"), L.GlobalMaxPooling2D(), L.Dense(6), L2Normalize()])
    features, att, patches = attention_sampling(attention, feature, (12, 12), n_patches=4, seed=7,
                                                attention_regularizer=multinomial_entropy(0.01))([x_low, x_high])
    flat = TotalReshape((-1, 16 * 16))(att)
    y = L.Dense(3)(L2Normalize()(features))
    model = keras.Model(x_in, [y, flat, patches])
    names = {type(layer).__name__ for layer in model._flatten_layers()}
    for name in ("ImageLinearTransform", "ImagePan", "ResizeImages", "SampleSoftmax", "SamplePatches", "Expectation",
                 "ActivityRegularizer", "TotalReshape", "L2Normalize"):
        assert name in names, name
    x = np.random.default_rng(8).uniform(size=(2, 64, 64, 1)).astype(np.float32)
    before = model.predict(x, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(before, loaded.predict(x, verbose=0)):
        np.testing.assert_array_equal(a, b)
    by_type = {type(layer).__name__: layer for layer in loaded._flatten_layers()}
    assert by_type["ImagePan"].pixels == 5 and by_type["ImagePan"].vertically
    assert by_type["ResizeImages"].size == (16, 16)
    assert by_type["SamplePatches"].seed == 7 and isinstance(by_type["Expectation"], Expectation)


def test_builder_model_survives_save_and_load(tmp_path):
    x_small, x_full = L.Input(SMALL), L.Input(LARGE)
    result = (ATSBuilder().from_tensors([x_small, x_full], None).attention(_attention()).feature(_feature())
              .patch_size((15, 15)).n_patches(3).get())
    model = keras.Model([x_small, x_full], result.outputs)
    path = tmp_path / "b.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    rng = np.random.default_rng(9)
    out = loaded.predict([rng.uniform(size=(2, *SMALL)), rng.uniform(size=(2, *LARGE))], verbose=0)
    assert out.shape == (2, 64) and np.isfinite(out).all()
    assert {type(layer).__name__ for layer in loaded.layers} >= {"Sample", "LevelPatches", "Expected"}


def test_sample_patches_from_config_roundtrip():
    layer = SamplePatches(5, (8, 6), receptive_field=3, replace=True, use_logits=True)
    again = SamplePatches.from_config(layer.get_config())
    assert (again.n_patches, again.patch_size, again.receptive_field, again.replace, again.use_logits) == (
        5, (8, 6), 3, True, True)


@pytest.mark.slow
def test_2019_quick_start_survives_save_and_load(tmp_path):
    # the 2019 README's model, Keras imports updated; saved and loaded, then compared in top-k mode
    x_high = L.Input(shape=(1500, 1500, 1))
    x_low = L.AveragePooling2D(pool_size=10)(x_high)
    attention = keras.Sequential([L.Conv2D(8, 3, padding="same", activation="relu"), L.Conv2D(1, 3, padding="same"),
                                  SampleSoftmax(squeeze_channels=True)])
    feature = keras.Sequential([L.Conv2D(32, 3, activation="relu"), L.GlobalMaxPooling2D(), L2Normalize()])
    features, attention, patches = attention_sampling(attention, feature, patch_size=(32, 32), n_patches=10,
                                                      attention_regularizer=multinomial_entropy(0.01))([x_low, x_high])
    y = L.Dense(10, activation="softmax")(features)
    model = keras.Model(inputs=x_high, outputs=y)
    path = tmp_path / "quick.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(10).uniform(size=(1, 1500, 1500, 1)).astype(np.float32)
    assert loaded.predict(x, verbose=0).shape == (1, 10)
    for m in (model, loaded):
        next(layer for layer in m.layers if isinstance(layer, SamplePatches)).mode = "topk"
    np.testing.assert_array_equal(model(x).numpy(), loaded(x).numpy())


def test_2019_forms_the_port_kept():
    """Forms 2019 accepted that an earlier port refused: L2Normalize over several axes or all of them, a NumPy
    patch_size, and SamplePatches.compute_output_shape (2019 had it; Keras' default raises)."""
    x = np.random.default_rng(0).random((2, 4, 5, 3)).astype("float32")
    for axis in ([1, 2], (1, 2), None):
        got = np.asarray(L2Normalize(axis=axis)(x))
        over = tuple(range(x.ndim)) if axis is None else tuple(axis)
        want = x / np.sqrt(np.maximum((x.astype(np.float64) ** 2).sum(axis=over, keepdims=True), 1e-12))
        np.testing.assert_allclose(got, want, rtol=1e-5)
    assert L2Normalize.from_config(L2Normalize(axis=(1, 2)).get_config()).axis == (1, 2)
    layer = SamplePatches(3, np.array([3, 3]))
    assert layer.compute_output_shape([(None, 5, 6, 1), (None, 20, 24, 1), (None, 5, 6)]) == [
        (None, 3, 3, 3, 1), (None, 3)]
    x_low, x_high = np.random.rand(2, 5, 6, 1).astype("float32"), np.random.rand(2, 20, 24, 1).astype("float32")
    attention = np.full((2, 5, 6), 1 / 30, "float32")
    patches, sampled = layer([x_low, x_high, attention])
    assert tuple(patches.shape) == (2, 3, 3, 3, 1) and tuple(sampled.shape) == (2, 3)
