#!/usr/bin/env python
"""Download the Swedish Traffic Signs dataset, filter the Speed Limits subset and train attention sampling on it.

Ported from the 2019 attention-sampling library's ``scripts/speed_limits.py``
with the same command-line options, download-and-parse code and model. The
dataset (https://www.cvl.isy.liu.se/research/datasets/traffic-signs-dataset/)
is fetched into ``dataset`` on first use (``Set1`` and ``Set2``: the images
of ``SetNPart0.zip`` and ``annotations.txt``, checked against their MD5 sums).
An image's class is ``EMPTY`` when it has no sign, otherwise the most visible
(then largest) speed-limit sign, ``50_SIGN``, ``70_SIGN`` or ``80_SIGN``;
images whose signs are not speed limits, or whose best speed limit is not
``VISIBLE``, are left out.

Keras 3 changes: ``learning_rate=`` instead of ``lr=``, ``model.fit``
instead of ``fit_generator``, ``class_weight`` as a dict (a class absent
from the training set gets weight 0 where 2019 divided by zero), weight
checkpoints named ``weights.{epoch:02d}.weights.h5``, ``plot_model`` only
where pydot is installed, and ``--clipnorm 0`` turns clipping off.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.request
import zipfile
from collections import namedtuple
from functools import partial
from os import path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from cv2 import imread, imwrite  # noqa: E402
from keras.callbacks import Callback, LearningRateScheduler, ModelCheckpoint  # noqa: E402
from keras.layers import (  # noqa: E402
    Activation,
    BatchNormalization,
    Conv2D,
    Dense,
    GlobalAveragePooling2D,
    Input,
    MaxPooling2D,
    add,
)
from keras.models import Model  # noqa: E402
from keras.optimizers import SGD, Adam  # noqa: E402
from keras.regularizers import l2  # noqa: E402
from keras.utils import PyDataset  # noqa: E402

from ats.core import attention_sampling  # noqa: E402
from ats.utils.layers import ImageLinearTransform, ImagePan, L2Normalize, ResizeImages, SampleSoftmax  # noqa: E402
from ats.utils.regularizers import multinomial_entropy  # noqa: E402
from ats.utils.training import Batcher  # noqa: E402

_BASE = "http://www.isy.liu.se/cvl/research/trafficSigns/swedishSignsSummer"
# set name -> (images zip, annotations, MD5 of the annotations)
SOURCES = {
    "Set1": (f"{_BASE}/Set1/Set1Part0.zip", f"{_BASE}/Set1/annotations.txt", "9106a905a86209c95dc9b51d12f520d6"),
    "Set2": (f"{_BASE}/Set2/Set2Part0.zip", f"{_BASE}/Set2/annotations.txt", "09debbc67f6cd89c1e2a2688ad1d03ca"),
}


def check_file(filepath, md5sum):
    """True if ``filepath`` exists and its MD5 is ``md5sum``."""
    try:
        md5 = hashlib.md5()
        with open(filepath, "rb") as f:
            for chunk in iter(partial(f.read, 1 << 16), b""):
                md5.update(chunk)
    except FileNotFoundError:
        return False
    return md5.hexdigest() == md5sum


def download_file(url, destination, progress_file=sys.stderr):
    """Download ``url`` to ``destination``, printing the bytes received."""
    with urllib.request.urlopen(url) as response:
        total = response.headers.get("Content-Length") or 0
        received = 0
        with open(destination, "wb") as dst:
            while True:
                print(f"\rReceived {received} / {total}", file=progress_file, end="", flush=True)
                data = response.read(1 << 16)
                if not data:
                    break
                dst.write(data)
                received += len(data)
    print(file=progress_file)


def ensure_dataset_exists(directory, tries=1, progress_file=sys.stderr):
    """Download and extract both sets unless their annotations are already there with the right MD5."""
    for attempt in range(tries + 1):
        if all(check_file(path.join(directory, name, "annotations.txt"), md5) for name, (_, _, md5) in SOURCES.items()):
            return
        if attempt == tries:
            break
        os.makedirs(directory, exist_ok=True)
        for name, (images_url, annotations_url, _) in SOURCES.items():
            archive_path = path.join(directory, f"{name}.zip")
            print(f"Downloading {name}", file=progress_file)
            download_file(images_url, archive_path, progress_file=progress_file)
            print("Extracting...", file=progress_file)
            with zipfile.ZipFile(archive_path) as archive:
                archive.extractall(path.join(directory, name))
            print("Getting annotation file", file=progress_file)
            download_file(annotations_url, path.join(directory, name, "annotations.txt"), progress_file=progress_file)
    raise RuntimeError(f"Cannot download the dataset into {directory}, or the download is corrupted")


class Sign(namedtuple("Sign", ["visibility", "bbox", "type", "name"])):
    """One annotated sign; ``bbox`` is (x_max, y_max, x_min, y_min) as in the annotation files."""

    VISIBILITIES = ("VISIBLE", "BLURRED", "SIDE_ROAD", "OCCLUDED")

    @property
    def x_min(self):
        return self.bbox[2]

    @property
    def x_max(self):
        return self.bbox[0]

    @property
    def y_min(self):
        return self.bbox[3]

    @property
    def y_max(self):
        return self.bbox[1]

    @property
    def area(self):
        return (self.x_max - self.x_min) * (self.y_max - self.y_min)

    @property
    def center(self):
        return [(self.y_min + self.y_max) / 2, (self.x_min + self.x_max) / 2]

    @property
    def visibility_index(self):
        return self.VISIBILITIES.index(self.visibility)

    def pixels(self, scale, size):
        """Row and column indices of the sign's box at ``scale`` in an image of ``size`` (clipped)."""
        rows = range(round(self.y_min * scale), round(self.y_max * scale) + 1)
        cols = range(round(self.x_min * scale), round(self.x_max * scale) + 1)
        limit = (round(size[0] * scale), round(size[1] * scale))
        return zip(*((i, j) for i in rows for j in cols if i < limit[0] and j < limit[1]))

    def __lt__(self, other):
        """More visible first, then larger first."""
        if not isinstance(other, Sign):
            raise ValueError("Signs can only be compared to signs")
        if self.visibility_index != other.visibility_index:
            return self.visibility_index < other.visibility_index
        return self.area > other.area


def _number(text):
    """A float, ignoring trailing junk the annotation files sometimes carry (``'12.5l'``)."""
    for end in range(len(text), 0, -1):
        try:
            return float(text[:end])
        except ValueError:
            continue
    raise ValueError(f"not a number: {text!r}")


class STS:
    """The images of one set of the Swedish Traffic Signs dataset with their :class:`Sign` lists."""

    def __init__(self, directory, train=True, seed=0):
        ensure_dataset_exists(directory)
        self._directory = directory
        self._inner = f"Set{1 + (seed + 1 + int(train)) % 2}"
        self._data = self._load_signs(directory, self._inner)

    @staticmethod
    def _parse_sign(text):
        parts = [p.strip() for p in text.split(",")]
        if not parts[0] or parts[0] == "MISC_SIGNS":
            return None
        return Sign(visibility=parts[0], bbox=[_number(p) for p in parts[1:5]], type=parts[5], name=parts[6])

    def _load_signs(self, directory, inner):
        data = []
        with open(path.join(directory, inner, "annotations.txt")) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                image, signs = line.split(":", 1)
                parsed = [self._parse_sign(s) for s in signs.split(";") if s.strip()]
                data.append((path.join(directory, inner, image), [s for s in parsed if s is not None]))
        return data

    def __len__(self):
        return len(self._data)

    def __getitem__(self, i):
        return self._data[i]


class SpeedLimits(PyDataset):
    """The Speed Limits subset of STS: ``(image float32 (H, W, 3) in [0, 1], one-hot class)``."""

    LIMITS = ["50_SIGN", "70_SIGN", "80_SIGN"]
    CLASSES = ["EMPTY", *LIMITS]

    def __init__(self, directory, train=True, seed=0):
        super().__init__()
        self._data = self._filter(STS(directory, train, seed))

    def _filter(self, data):
        kept = []
        for image, signs in data:
            signs, acceptable = self._acceptable(signs)
            if acceptable:
                kept.append((image, self.CLASSES.index(signs[0].name) if signs else 0))
        return kept

    def _acceptable(self, signs):
        if not signs:
            return signs, True
        limits = sorted(s for s in signs if s.name in self.LIMITS)
        if not limits or limits[0].visibility != "VISIBLE":
            return None, False
        return limits, True

    def __len__(self):
        return len(self._data)

    def __getitem__(self, i):
        image, category = self._data[i]
        data = imread(image)
        if data is None:
            raise OSError(f"cannot read image {image}")
        label = np.eye(len(self.CLASSES), dtype=np.float32)[category]
        return data.astype(np.float32) / np.float32(255.0), label

    @property
    def image_size(self):
        return self[0][0].shape[:2]

    @property
    def class_frequencies(self):
        freqs = np.zeros(len(self.CLASSES), dtype=np.float32)
        for _, category in self._data:
            freqs[category] += 1
        return freqs / len(self._data)

    def strided(self, N):
        """Indices of ``N`` images taking the classes in turn (as far as the classes present allow)."""
        order = np.arange(len(self._data))
        np.random.shuffle(order)
        present = sorted({c for _, c in self._data})
        idxs, turn = [], 0
        while len(idxs) < N:
            for i in order:
                if self._data[i][1] == present[turn]:
                    idxs.append(int(i))
                    turn = (turn + 1) % len(present)
                if len(idxs) >= N:
                    break
        return idxs


class AttentionSaver(Callback):
    """Save the low-resolution views once and the attention maps of 10 training images after every epoch."""

    def __init__(self, output_directory, att_model, training_set):
        super().__init__()
        self._dir = path.join(output_directory, "attention")
        os.makedirs(self._dir, exist_ok=True)
        self._att_model = att_model
        idxs = training_set.strided(10)
        data = [training_set[i] for i in idxs]
        self._X = np.array([d[0] for d in data])
        self._Y = np.array([d[1] for d in data]).argmax(axis=1)
        np.savetxt(path.join(self._dir, "points.txt"), np.array([[i, y] for i, y in zip(idxs, self._Y)]), fmt="%d")

    def on_train_begin(self, logs=None):
        _, _, x_low = self._att_model.predict(self._X, verbose=0)
        for i, xi in enumerate(x_low):
            self._imsave(path.join(self._dir, f"{i}.jpg"), xi)

    def on_epoch_end(self, e, logs=None):
        att, _, _ = self._att_model.predict(self._X, verbose=0)
        for i, att_i in enumerate(att):
            np.save(path.join(self._dir, f"att_{e}_{i}.npy"), att_i)

    def _imsave(self, filepath, x):
        imwrite(filepath, (np.clip(x, 0, 1) * 255).astype(np.uint8))


def resnet(x, strides=(1, 2, 2, 2), filters=(32, 32, 32, 32)):
    """A small pre-activation ResNet ending in L2-normalized average-pooled features."""

    def conv(x, filters, kernel, strides):
        return Conv2D(filters, kernel_size=kernel, strides=strides, padding="same", use_bias=False)(x)

    def bn_relu(x):
        return Activation("relu")(BatchNormalization()(x))

    def block(x, filters, strides, project):
        x = bn_relu(x)
        shortcut = conv(x, filters, 1, strides) if project else x
        x = conv(x, filters, 3, strides)
        x = conv(bn_relu(x), filters, 3, 1)
        return add([x, shortcut])

    strides, filters = list(strides), list(filters)
    y = conv(x, filters[0], 3, strides[0])
    previous = filters[0]
    for s, f in zip(strides[1:], filters[1:]):
        y = block(y, f, s, s != 1 or f != previous)
        previous = f
    y = GlobalAveragePooling2D()(bn_relu(y))
    return L2Normalize()(y)


def attention(x):
    params = dict(activation="relu", padding="valid", kernel_regularizer=l2(1e-5))
    x = Conv2D(8, kernel_size=3, **params)(x)
    x = Conv2D(16, kernel_size=3, **params)(x)
    x = Conv2D(32, kernel_size=3, **params)(x)
    x = Conv2D(1, kernel_size=3)(x)
    x = MaxPooling2D(pool_size=8)(x)
    return SampleSoftmax(squeeze_channels=True, smooth=1e-4)(x)


def get_model(outputs, width, height, scale, n_patches, patch_size, reg):
    x_in = Input(shape=(height, width, 3))
    x_high = ImageLinearTransform()(x_in)
    x_high = ImagePan(horizontally=True, vertically=True)(x_high)
    x_low = ResizeImages((int(height * scale), int(width * scale)))(x_high)

    features, att, patches = attention_sampling(
        attention, resnet, patch_size, n_patches, replace=False,
        attention_regularizer=multinomial_entropy(reg), receptive_field=9,
    )([x_low, x_high])
    y = Dense(outputs, activation="softmax")(features)

    return Model(inputs=x_in, outputs=[y]), Model(inputs=x_in, outputs=[att, patches, x_low])


def get_optimizer(args):
    clip = {"clipnorm": args.clipnorm} if args.clipnorm > 0 else {}
    if args.optimizer == "sgd":
        return SGD(learning_rate=args.lr, momentum=args.momentum, **clip)
    if args.optimizer == "adam":
        return Adam(learning_rate=args.lr, **clip)
    raise ValueError(f"Invalid optimizer {args.optimizer}")


def get_lr_schedule(args):
    def get_lr(epoch, lr=None):
        return args.lr if epoch < args.decrease_lr_at else args.lr * 0.1

    return get_lr


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Fetch the Sweidish Traffic Signs dataset and parse it into the Speed Limits dataset subset"
    )
    parser.add_argument("dataset", help="The location to download the dataset to")
    parser.add_argument("output", help="An output directory")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="adam", help="Choose the optimizer for Q1")
    parser.add_argument("--lr", type=float, default=0.001, help="Set the optimizer's learning rate")
    parser.add_argument("--clipnorm", type=float, default=1,
                        help="Clip the norm of the gradient to avoid exploding gradients")
    parser.add_argument("--momentum", type=float, default=0.9, help="Choose the momentum for the optimizer")
    parser.add_argument("--decrease_lr_at", type=float, default=250, help="Decrease the learning rate in this epoch")
    parser.add_argument("--scale", type=float, default=0.3,
                        help="How much to downscale the image for computing the attention")
    parser.add_argument("--patch_size", type=lambda x: tuple(int(xi) for xi in x.split("x")), default="100x100",
                        help="Choose the size of the patch to extract from the high resolution")
    parser.add_argument("--n_patches", type=int, default=5, help="How many patches to sample")
    parser.add_argument("--regularizer_strength", type=float, default=0.0001,
                        help="How strong should the regularization be for the attention")
    parser.add_argument("--batch_size", type=int, default=32, help="Choose the batch size for SGD")
    parser.add_argument("--epochs", type=int, default=500, help="How many epochs to train for")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)

    # Load the data
    training_set = SpeedLimits(args.dataset, train=True)
    test_set = SpeedLimits(args.dataset, train=False)
    training_batched = Batcher(training_set, args.batch_size)
    test_batched = Batcher(test_set, args.batch_size)

    # Create the models
    H, W = training_set.image_size
    frequencies = training_set.class_frequencies
    class_weights = {i: (1.0 / len(frequencies)) / f if f > 0 else 0.0 for i, f in enumerate(frequencies)}
    model, att_model = get_model(len(frequencies), W, H, args.scale, args.n_patches, args.patch_size,
                                 args.regularizer_strength)
    model.compile(loss="categorical_crossentropy", optimizer=get_optimizer(args),
                  metrics=["accuracy", "categorical_crossentropy"])
    try:
        from keras.utils import plot_model

        plot_model(model, to_file=path.join(args.output, "model.png"))
    except (ImportError, OSError) as error:  # pydot / graphviz are optional
        print(f"Not plotting the model: {error}", file=sys.stderr)

    callbacks = [
        AttentionSaver(args.output, att_model, training_set),
        ModelCheckpoint(path.join(args.output, "weights.{epoch:02d}.weights.h5"), save_weights_only=True),
        LearningRateScheduler(get_lr_schedule(args)),
    ]
    return model.fit(training_batched, validation_data=test_batched, epochs=args.epochs,
                     class_weight=class_weights, callbacks=callbacks)


if __name__ == "__main__":
    main()
