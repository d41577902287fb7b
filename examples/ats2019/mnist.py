#!/usr/bin/env python
"""Train attention sampling on a Megapixel MNIST dataset made by ``make_mnist.py``.

Ported from the 2019 attention-sampling library's ``scripts/mnist.py`` with
the same command-line options and model. Keras 3 changes: the ``keras.Input``
first layers instead of ``input_shape=`` (the feature network's on the patch
shape: Keras 3 refuses patches on a model declared for the full image); ``learning_rate=`` instead of
``lr=``; ``model.fit``/``model.evaluate`` instead of
``fit_generator``/``evaluate_generator``; weight checkpoints named
``weights.{epoch:02d}.weights.h5`` (Keras 3 wants that suffix with
``save_weights_only``); ``np.load(..., allow_pickle=True)`` for the sparse
samples; and ``--clipnorm 0`` turns clipping off. Outputs in the output
directory: ``image.png``, per epoch ``attention_EEE.png``/``.npy`` and
``patches_EEE_PPP.png`` of the first training image, the weight checkpoints
and ``results.json`` (test loss and error).
"""

from __future__ import annotations

import argparse
import json
import os
from os import path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from keras.callbacks import Callback, ModelCheckpoint  # noqa: E402
from keras.layers import Conv2D, Dense, GlobalMaxPooling2D, Input  # noqa: E402
from keras.models import Model, Sequential  # noqa: E402
from keras.optimizers import SGD, Adam  # noqa: E402
from keras.utils import PyDataset  # noqa: E402

from ats.core import attention_sampling  # noqa: E402
from ats.utils.layers import L2Normalize, SampleSoftmax  # noqa: E402
from ats.utils.regularizers import multinomial_entropy  # noqa: E402
from ats.utils.training import Batcher  # noqa: E402


class MNIST(PyDataset):
    """Load a Megapixel MNIST dataset. See make_mnist.py."""

    def __init__(self, dataset_dir, train=True):
        super().__init__()
        with open(path.join(dataset_dir, "parameters.json")) as f:
            self.parameters = json.load(f)
        W, H, scale = self.parameters["width"], self.parameters["height"], self.parameters["scale"]
        self._high_shape = (H, W, 1)
        self._low_shape = (int(scale * H), int(scale * W), 1)
        self._data = np.load(path.join(dataset_dir, "train.npy" if train else "test.npy"), allow_pickle=True)

    def __len__(self):
        return len(self._data)

    def __getitem__(self, i):
        if i >= len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        (low_idx, low_val), (high_idx, high_val), y = self._data[i]
        x_low = np.zeros(int(np.prod(self._low_shape)), np.float32)
        x_high = np.zeros(int(np.prod(self._high_shape)), np.float32)
        x_low[low_idx] = low_val
        x_high[high_idx] = high_val
        return [x_low.reshape(self._low_shape), x_high.reshape(self._high_shape)], y


class AttentionSaver(Callback):
    """Save the attention map and the sampled patches of the first training image after every epoch."""

    def __init__(self, output, att_model, data):
        super().__init__()
        self._att_path = path.join(output, "attention_{:03d}.png")
        self._patches_path = path.join(output, "patches_{:03d}_{:03d}.png")
        self._att_model = att_model
        (self._x, self._x_high), self._y = data[0]
        self._imsave(path.join(output, "image.png"), self._x[0, :, :, 0])

    def on_epoch_end(self, e, logs=None):
        att, patches = self._att_model.predict([self._x, self._x_high], verbose=0)
        self._imsave(self._att_path.format(e), att[0])
        np.save(self._att_path.format(e)[:-4], att[0])
        for i, p in enumerate(patches[0]):
            self._imsave(self._patches_path.format(e, i), p[:, :, 0])

    def _imsave(self, filepath, x):
        from skimage.io import imsave

        x = (np.clip(x, 0, 1) * 65535).astype(np.uint16)
        imsave(filepath, x, check_contrast=False)


def get_model(outputs, width, height, scale, n_patches, patch_size, reg):
    # Define the shapes
    shape_high = (height, width, 1)
    shape_low = (int(height * scale), int(width * scale), 1)

    # Make the attention and feature models
    attention = Sequential([
        Input(shape_low),
        Conv2D(8, kernel_size=3, activation="tanh", padding="same"),
        Conv2D(8, kernel_size=3, activation="tanh", padding="same"),
        Conv2D(1, kernel_size=3, padding="same"),
        SampleSoftmax(squeeze_channels=True, smooth=1e-5),
    ])
    feature = Sequential([
        Input((*patch_size, 1)),
        Conv2D(32, kernel_size=7, activation="relu"),
        Conv2D(32, kernel_size=3, activation="relu"),
        Conv2D(32, kernel_size=3, activation="relu"),
        Conv2D(32, kernel_size=3, activation="relu"),
        GlobalMaxPooling2D(),
        L2Normalize(),
    ])

    # Let's build the attention sampling network
    x_low = Input(shape=shape_low)
    x_high = Input(shape=shape_high)
    features, attention, patches = attention_sampling(
        attention, feature, patch_size, n_patches, replace=False, attention_regularizer=multinomial_entropy(reg)
    )([x_low, x_high])
    y = Dense(outputs, activation="softmax")(features)

    return (
        Model(inputs=[x_low, x_high], outputs=[y]),
        Model(inputs=[x_low, x_high], outputs=[attention, patches]),
    )


def get_optimizer(args):
    clip = {"clipnorm": args.clipnorm} if args.clipnorm > 0 else {}
    if args.optimizer == "sgd":
        return SGD(learning_rate=args.lr, momentum=args.momentum, **clip)
    if args.optimizer == "adam":
        return Adam(learning_rate=args.lr, **clip)
    raise ValueError(f"Invalid optimizer {args.optimizer}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a model with attention sampling on the artificial mnist dataset")
    parser.add_argument("dataset", help="The directory that contains the dataset (see make_mnist.py)")
    parser.add_argument("output", help="An output directory")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="adam", help="Choose the optimizer for Q1")
    parser.add_argument("--lr", type=float, default=0.001, help="Set the optimizer's learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="Choose the momentum for the optimizer")
    parser.add_argument("--clipnorm", type=float, default=1,
                        help="Clip the gradient norm to avoid exploding gradients towards the end of convergence")
    parser.add_argument("--patch_size", type=lambda x: tuple(int(xi) for xi in x.split("x")), default="50x50",
                        help="Choose the size of the patch to extract from the high resolution")
    parser.add_argument("--n_patches", type=int, default=10, help="How many patches to sample")
    parser.add_argument("--regularizer_strength", type=float, default=0.0001,
                        help="How strong should the regularization be for the attention")
    parser.add_argument("--batch_size", type=int, default=128, help="Choose the batch size for SGD")
    parser.add_argument("--epochs", type=int, default=500, help="How many epochs to train for")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)

    # Load the data
    training_dataset = MNIST(args.dataset)
    test_dataset = MNIST(args.dataset, train=False)
    training_batched = Batcher(training_dataset, args.batch_size)
    test_batched = Batcher(test_dataset, args.batch_size)
    print("Loaded dataset with the following parameters")
    print(json.dumps(training_dataset.parameters, indent=4))

    model, att_model = get_model(
        outputs=10,
        width=training_dataset.parameters["width"],
        height=training_dataset.parameters["height"],
        scale=training_dataset.parameters["scale"],
        n_patches=args.n_patches,
        patch_size=args.patch_size,
        reg=args.regularizer_strength,
    )
    model.compile(loss="categorical_crossentropy", optimizer=get_optimizer(args),
                  metrics=["accuracy", "categorical_crossentropy"])
    model.summary()

    callbacks = [
        AttentionSaver(args.output, att_model, training_batched),
        ModelCheckpoint(path.join(args.output, "weights.{epoch:02d}.weights.h5"), save_weights_only=True),
    ]
    model.fit(training_batched, validation_data=test_batched, epochs=args.epochs, callbacks=callbacks)
    loss, accuracy, ce = model.evaluate(test_batched, verbose=1)
    print(f"Test loss: {ce}")
    print(f"Test error: {1 - accuracy}")
    with open(path.join(args.output, "results.json"), "w") as f:
        json.dump({"test_loss": float(ce), "test_error": float(1 - accuracy), "epochs": args.epochs}, f, indent=4)


if __name__ == "__main__":
    main()
