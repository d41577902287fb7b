"""End to end: the 2019 quick-start unchanged (Keras 3 imports) and a toy task that ATS must learn."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from tests.keras_toy import learn_toy_task  # noqa: E402

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


def test_toy_task_where_only_sampled_regions_carry_the_label_is_learned():
    from ats.core import attention_sampling
    from ats.utils.layers import SampleSoftmax
    from ats.utils.regularizers import multinomial_entropy

    learn_toy_task(attention_sampling, SampleSoftmax, multinomial_entropy(0.001))
