"""End to end: the 2019 quick-start unchanged (Keras 3 imports) and a toy task that ATS must learn."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from tests.keras_toy import toy_images  # noqa: E402

pytestmark = pytest.mark.slow


def test_2019_quick_start_on_1500x1500_images():
    # The 2019 README's model with only the Keras imports updated to Keras 3
    # (AveragePooling2D's pool_size=(10,) becomes 10: Keras 3 wants one entry per axis).
    from keras.layers import AveragePooling2D, Conv2D, Dense, GlobalMaxPooling2D, Input
    from keras.models import Model, Sequential

    from ats.core import attention_sampling
    from ats.utils.layers import L2Normalize, SampleSoftmax
    from ats.utils.regularizers import multinomial_entropy

    x_high = Input(shape=(1500, 1500, 1))
    x_low = AveragePooling2D(pool_size=10)(x_high)
    attention = Sequential(
        [Conv2D(8, 3, padding="same", activation="relu"), Conv2D(1, 3, padding="same"), SampleSoftmax(squeeze_channels=True)]
    )
    feature = Sequential([Conv2D(32, 3, activation="relu"), GlobalMaxPooling2D(), L2Normalize()])
    features, attention, patches = attention_sampling(
        attention, feature, patch_size=(32, 32), n_patches=10, attention_regularizer=multinomial_entropy(0.01)
    )([x_low, x_high])
    y = Dense(10, activation="softmax")(features)
    model = Model(inputs=x_high, outputs=y)
    model.compile("adam", "sparse_categorical_crossentropy")

    assert attention.shape == (None, 150, 150)
    assert patches.shape == (None, 10, 32, 32, 1)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(4, 1500, 1500, 1)).astype("float32")
    labels = rng.integers(0, 10, 4)
    history = model.fit(x, labels, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert model.predict(x[:1], verbose=0).shape == (1, 10)


class StopWhenLearned(keras.callbacks.Callback):
    """Record the loss of every step; stop once the last 10 average below ``target``."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))
        if len(self.losses) >= 20 and np.mean(self.losses[-10:]) < self.target:
            self.model.stop_training = True


def test_toy_task_where_only_sampled_regions_carry_the_label_is_learned():
    from keras import layers as L

    from ats.core import attention_sampling
    from ats.utils.layers import SampleSoftmax
    from ats.utils.regularizers import multinomial_entropy

    keras.utils.set_random_seed(0)
    x_high = L.Input((256, 256, 1))
    x_low = L.AveragePooling2D(8)(x_high)
    attention = keras.Sequential(
        [L.Conv2D(8, 3, padding="same", activation="relu"), L.Conv2D(1, 3, padding="same"), SampleSoftmax(squeeze_channels=True)]
    )
    feature = keras.Sequential([L.Conv2D(8, 3, activation="relu"), L.Conv2D(8, 3, activation="relu"), L.GlobalMaxPooling2D()])
    features, _, _ = attention_sampling(
        attention, feature, patch_size=32, n_patches=6, attention_regularizer=multinomial_entropy(0.001), seed=1
    )([x_low, x_high])
    model = keras.Model(x_high, L.Dense(2, activation="softmax")(features))
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")

    x, labels = toy_images(256)
    stop = StopWhenLearned(target=0.25)
    model.fit(x, labels, batch_size=8, epochs=15, verbose=0, callbacks=[stop])
    first = np.mean(stop.losses[:10])
    last = np.mean(stop.losses[-10:])
    assert first > 0.6, stop.losses[:10]
    assert last < 0.3, f"loss went from {first:.3f} to {last:.3f} in {len(stop.losses)} steps"
    # and it generalizes to new images
    x_test, y_test = toy_images(64, seed=1)
    accuracy = np.mean(model.predict(x_test, verbose=0).argmax(axis=1) == y_test)
    assert accuracy > 0.8
