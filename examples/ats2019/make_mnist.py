#!/usr/bin/env python
"""Make the Megapixel MNIST dataset: large images holding 5 digits, 3 of them of the target class.

Ported from the 2019 attention-sampling library's ``scripts/make_mnist.py``
with the same command-line options and the same output: ``parameters.json``,
``train.npy`` and ``test.npy`` in the output directory, each sample stored
sparsely as ``((indices, values) of x_low, (indices, values) of x_high,
one-hot label)``.

Each image is black, with 5 digits at random non-overlapping positions
(3 of the target class, 2 of other classes) and, unless ``--no_noise``, 50
noise patches of digit-like strokes (two straight lines each). ``x_low`` is
the image rendered at ``--scale`` with anti-aliased downscaled digits.

Digits: MNIST cannot be downloaded here, so by default they come from
scikit-learn's bundled 8x8 digits (1797 images, no network), upscaled to
28x28; the first 1200 feed the training set, the rest the test set.
``--mnist PATH`` reads real MNIST instead: a Keras ``mnist.npz`` file or a
directory holding the four IDX files (``train-images-idx3-ubyte`` ...,
optionally ``.gz``).

Changes from 2019: the digit source (2019 called ``keras.datasets.mnist``,
which downloads), ``skimage.transform.rescale(..., channel_axis=None)``
instead of the removed ``multichannel=False``, and the samples are saved
as a NumPy object array (read it with ``np.load(..., allow_pickle=True)``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import sys

import numpy as np

DIGIT = 28
N_NOISE_PATTERNS = 50
N_NOISE = 50
N_DIGITS, N_TARGET = 5, 3
SKLEARN_TRAIN = 1200


# --- digit sources ------------------------------------------------------------------


def sklearn_digits(train):
    """scikit-learn's bundled digits as float32 28x28 images in [0, 1] and their labels."""
    from skimage.transform import resize
    from sklearn.datasets import load_digits

    digits = load_digits()
    part = slice(None, SKLEARN_TRAIN) if train else slice(SKLEARN_TRAIN, None)
    images = digits.images[part] / 16.0
    images = np.stack([resize(image, (DIGIT, DIGIT), order=1, anti_aliasing=False) for image in images])
    return np.clip(images, 0, 1).astype(np.float32), digits.target[part].astype(np.int64)


def _read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(directory, stem):
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no {stem}[.gz] in {directory}")


def mnist_files(path, train):
    """Real MNIST from a Keras ``mnist.npz`` or a directory of IDX files: float32 images in [0, 1], labels."""
    split = "train" if train else "t10k"
    if os.path.isdir(path):
        x = _read_idx(_find(path, f"{split}-images-idx3-ubyte"))
        y = _read_idx(_find(path, f"{split}-labels-idx1-ubyte"))
    else:
        with np.load(path) as data:
            x, y = (data["x_train"], data["y_train"]) if train else (data["x_test"], data["y_test"])
    if x.shape[1:] != (DIGIT, DIGIT):
        raise ValueError(f"MNIST images must be {DIGIT}x{DIGIT}, got {x.shape[1:]} from {path}")
    return x.astype(np.float32) / 255.0, y.astype(np.int64)


# --- the dataset --------------------------------------------------------------------


def _rescale(image, scale):
    from skimage.transform import rescale

    return rescale(image, scale, order=1, mode="constant", channel_axis=None, anti_aliasing=True)


def _paste(canvas, patch, row, col):
    """Write ``patch`` into ``canvas`` at (row, col), clipped to the canvas."""
    h, w = canvas.shape[:2]
    r0, c0 = max(row, 0), max(col, 0)
    r1, c1 = min(row + patch.shape[0], h), min(col + patch.shape[1], w)
    if r0 < r1 and c0 < c1:
        canvas[r0:r1, c0:c1, 0] = patch[r0 - row : r1 - row, c0 - col : c1 - col]


class MegapixelMNIST:
    """``N`` samples ``([x_low, x_high], one_hot)`` of ``H x W`` images; see the module docstring."""

    def __init__(self, N=5000, W=1500, H=1500, scale=0.12, train=True, noise=True, seed=0, source=None):
        if W < 2 * DIGIT or H < 2 * DIGIT:
            raise ValueError(f"width and height must be at least {2 * DIGIT} pixels, got {W}x{H}")
        images, labels = source(train) if source is not None else sklearn_digits(train)
        self._images, self._W, self._H, self._scale, self._noise_on = images, W, H, scale, noise
        rng = np.random.RandomState(seed + int(train))
        self._targets = rng.randint(0, 10, size=N)
        self._digits = np.stack([self._choose(rng, labels, t) for t in self._targets])
        self._positions = np.stack([self._place(rng) for _ in range(N)])
        self._patterns = self._noise_patterns(rng)
        self._noise_at = (rng.rand(N, N_NOISE, 2) * [H - 2 * DIGIT, W - 2 * DIGIT] + DIGIT).astype(int)
        self._noise_which = rng.randint(0, N_NOISE_PATTERNS, size=(N, N_NOISE))

    @staticmethod
    def _choose(rng, labels, target):
        same = np.flatnonzero(labels == target)
        other = np.flatnonzero(labels != target)
        return np.concatenate([rng.choice(same, N_TARGET), rng.choice(other, N_DIGITS - N_TARGET)])

    def _place(self, rng, tries=10000):
        """Top-left corners of ``N_DIGITS`` digit boxes that do not overlap."""
        corners = []
        for _ in range(tries):
            corner = np.round(rng.rand(2) * [self._H - DIGIT, self._W - DIGIT]).astype(int)
            if not any((np.abs(corner - c) < DIGIT).all() for c in corners):
                corners.append(corner)
                if len(corners) == N_DIGITS:
                    return np.array(corners)
        raise ValueError(f"cannot place {N_DIGITS} non-overlapping digits in a {self._H}x{self._W} image")

    @staticmethod
    def _noise_patterns(rng):
        """Digit-sized patterns of two straight strokes at random slopes, intensities 0.8 to 1."""
        patterns = np.zeros((N_NOISE_PATTERNS, DIGIT, DIGIT), np.float32)
        t = np.linspace(0, 1, 2 * DIGIT)
        for pattern in patterns:
            for _ in range(2):
                slope = np.tan(rng.rand() * np.pi / 2.5)
                end = min(DIGIT - 0.51, (DIGIT - 0.51) / slope)
                rows = np.round(t * end).astype(int)
                cols = np.round(t * end * slope).astype(int)
                if rng.rand() < 0.33:
                    cols = DIGIT - 1 - cols
                pattern[rows, cols] = 1
            pattern *= (rng.rand(DIGIT, DIGIT) * 0.2 + 0.8) * (pattern > 0)
        return patterns

    def _render(self, i, scale):
        h, w = (self._H, self._W) if scale == 1 else (int(self._H * scale), int(self._W * scale))
        canvas = np.zeros((h, w, 1), np.float32)
        items = [(self._images[d], p) for d, p in zip(self._digits[i], self._positions[i])]
        if self._noise_on:
            items += [(self._patterns[k], p) for k, p in zip(self._noise_which[i], self._noise_at[i])]
        for patch, (row, col) in items:
            if scale != 1:
                patch = _rescale(patch, scale)
            _paste(canvas, patch, int(row * scale), int(col * scale))
        return np.round(canvas * 255) / 255  # 8-bit levels, as 2019 stored uint8 images

    def __len__(self):
        return len(self._targets)

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        y = np.eye(10, dtype=np.float32)[self._targets[i]]
        return [self._render(i, self._scale), self._render(i, 1)], y


def sparsify(dataset, progress=sys.stdout):
    """Every sample as ``((indices, values) of x_low, (indices, values) of x_high, y)``."""

    def sparse(x):
        flat = x.ravel()
        indices = np.flatnonzero(flat)
        return indices, flat[indices]

    print("Sparsifying dataset", file=progress)
    data = []
    for i, ((x_low, x_high), y) in enumerate(dataset):
        print(f"\rProcessing {i + 1:5d} / {len(dataset):5d}", end="", flush=True, file=progress)
        data.append((sparse(x_low), sparse(x_high), y))
    print(file=progress)
    return data


def save(path, data):
    array = np.empty(len(data), dtype=object)
    array[:] = data
    np.save(path, array, allow_pickle=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Create the Megapixel MNIST dataset")
    parser.add_argument("--n_train", type=int, default=5000, help="How many images to create for training set")
    parser.add_argument("--n_test", type=int, default=1000, help="How many images to create for test set")
    parser.add_argument("--width", type=int, default=1500, help="Set the width for the high res image")
    parser.add_argument("--height", type=int, default=1500, help="Set the height for the high res image")
    parser.add_argument("--scale", type=float, default=0.12, help="Select the downsampled scale")
    parser.add_argument("--no_noise", action="store_false", dest="noise", help="Do not use noise in the dataset")
    parser.add_argument("--dataset_seed", type=int, default=0, help="Choose the random seed for the dataset")
    parser.add_argument("--json_only", action="store_true", help="Just store the json file")
    parser.add_argument("--mnist", metavar="PATH", default=None,
                        help="Real MNIST digits: a Keras mnist.npz or a directory of the IDX files "
                             "(default: scikit-learn's bundled digits, upscaled to 28x28)")
    parser.add_argument("output_directory", help="The directory to save the dataset into")
    args = parser.parse_args(argv)

    os.makedirs(args.output_directory, exist_ok=True)
    parameters = {"n_train": args.n_train, "n_test": args.n_test, "width": args.width, "height": args.height,
                  "scale": args.scale, "noise": args.noise, "seed": args.dataset_seed,
                  "digits": "mnist" if args.mnist else "sklearn"}
    with open(os.path.join(args.output_directory, "parameters.json"), "w") as handle:
        json.dump(parameters, handle, indent=4)
    if args.json_only:
        return
    source = None if args.mnist is None else (lambda train: mnist_files(args.mnist, train))
    for name, n, train in (("train", args.n_train, True), ("test", args.n_test, False)):
        dataset = MegapixelMNIST(N=n, W=args.width, H=args.height, scale=args.scale, train=train, noise=args.noise,
                                 seed=args.dataset_seed, source=source)
        save(os.path.join(args.output_directory, f"{name}.npy"), sparsify(dataset))


if __name__ == "__main__":
    main()
