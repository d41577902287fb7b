"""The toy task of the Keras tests (NumPy only, importable by any backend's test process)."""

from __future__ import annotations

import numpy as np


def toy_images(n, size=256, seed=0):
    """Noise plus one framed 24x24 block; the label is the orientation of the bar inside it.

    At the 8x lower resolution the two classes look the same (both give the
    same 3x3 blob), so only high-resolution patches of the block carry the label.
    """
    rng = np.random.default_rng(seed)
    x = (rng.uniform(size=(n, size, size, 1)) * 0.1).astype("float32")
    labels = rng.integers(0, 2, n)
    for i, label in enumerate(labels):
        block = np.zeros((24, 24), "float32")
        block[0, :] = block[-1, :] = block[:, 0] = block[:, -1] = 1
        if label:
            block[11:13, :] = 1
        else:
            block[:, 11:13] = 1
        r, c = rng.integers(8, size - 32, 2)
        x[i, r : r + 24, c : c + 24, 0] += block
    return x, labels


def learn_toy_task(attention_sampling, sample_softmax, regularizer=None):
    """Train the toy model (ATS over 32x32 patches of the 256x256 images, seed 1) until it is learned.

    Asserts that it is learned (loss from above 0.6 to below 0.3, test accuracy above 0.8) and returns
    ``(first, last, steps, accuracy)``: the mean loss of the first and last 10 steps, the steps taken, the
    test accuracy. ``attention_sampling`` and ``sample_softmax`` come from the import path under test
    (``ats.core``/``ats.utils.layers`` or ``ats.keras``); keras is imported here, in the caller's process.
    """
    import keras
    from keras import layers as L

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

    keras.utils.set_random_seed(0)
    x_high = L.Input((256, 256, 1))
    x_low = L.AveragePooling2D(8)(x_high)
    attention = keras.Sequential([L.Conv2D(8, 3, padding="same", activation="relu"), L.Conv2D(1, 3, padding="same"),
                                  sample_softmax(squeeze_channels=True)])
    feature = keras.Sequential([L.Conv2D(8, 3, activation="relu"), L.Conv2D(8, 3, activation="relu"),
                                L.GlobalMaxPooling2D()])
    features, _, _ = attention_sampling(attention, feature, patch_size=32, n_patches=6,
                                        attention_regularizer=regularizer, seed=1)([x_low, x_high])
    model = keras.Model(x_high, L.Dense(2, activation="softmax")(features))
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    x, labels = toy_images(256)
    stop = StopWhenLearned(target=0.25)
    model.fit(x, labels, batch_size=8, epochs=15, verbose=0, callbacks=[stop])
    first, last = np.mean(stop.losses[:10]), np.mean(stop.losses[-10:])
    # and it generalizes to new images
    x_test, y_test = toy_images(64, seed=1)
    accuracy = float(np.mean(model.predict(x_test, verbose=0).argmax(axis=1) == y_test))
    assert first > 0.6, stop.losses[:10]
    assert last < 0.3, f"loss went from {first:.3f} to {last:.3f} in {len(stop.losses)} steps"
    assert accuracy > 0.8, accuracy
    return first, last, len(stop.losses), accuracy
