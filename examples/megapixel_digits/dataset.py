"""Megapixel digits: large images holding a few small digits among digit-like noise strokes.

Like the Megapixel MNIST benchmark of the ATS paper: each image has
``n_digits`` digits, ``n_target`` of them of the target class (the label) and
the others of distinct other classes, plus random strokes as thick as a digit's
pen. Digits come from scikit-learn's bundled 8x8 digits (no network needed),
upscaled; the first 1200 of them make the training bank, the rest the test
bank, so test images hold digits never seen in training.

Images are not stored: a dataset file keeps the digit bank and each image's
layout (positions, digits, strokes), a few hundred bytes an image, and
:func:`render` draws any image on demand.

Command line::

    python -m examples.megapixel_digits.dataset --out data/mpd --size 1500 --train 5000 --test 1000
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRAIN_BANK = 1200
STROKE_FIELDS = 5  # x0, y0, x1, y1, intensity


def digit_bank(digit_size: int):
    """scikit-learn's digits upscaled to ``digit_size`` pixels, as uint8 images, with their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for image in digits.images:
        scaled = Image.fromarray((image * (255 / 16)).astype(np.uint8)).resize((digit_size, digit_size), Image.BICUBIC)
        images.append(np.asarray(scaled))
    return np.stack(images), digits.target.astype(np.int8)


@dataclass
class Layout:
    """Where everything goes in every image of a split."""

    image_size: int
    digit_size: int
    labels: np.ndarray  # (N,) target class
    positions: np.ndarray  # (N, n_digits, 2) top-left corner (row, col)
    digits: np.ndarray  # (N, n_digits) index into the bank
    strokes: np.ndarray  # (N, n_strokes, 5) x0, y0, x1, y1, intensity
    stroke_width: float


def _place(rng, image_size, digit_size, count, tries=1000):
    """``count`` top-left corners of non-overlapping digit boxes."""
    corners = []
    limit = image_size - digit_size
    for _ in range(tries):
        if len(corners) == count:
            break
        corner = rng.integers(0, limit + 1, size=2)
        if all(np.abs(corner - other).max() >= digit_size for other in corners):
            corners.append(corner)
    if len(corners) < count:
        raise ValueError(f"cannot place {count} digits of {digit_size} px without overlap in {image_size} px")
    return np.array(corners)


def make_layout(
    n_images: int,
    bank_labels: np.ndarray,
    bank_indices: np.ndarray,
    *,
    image_size: int,
    digit_size: int,
    n_digits: int = 5,
    n_target: int = 3,
    n_strokes: int = 50,
    seed: int = 0,
    progress=None,
) -> Layout:
    """Random layouts for ``n_images`` images, drawing digits from ``bank_indices``."""
    if not 1 <= n_target <= n_digits or n_digits - n_target > 9:
        raise ValueError(f"need 1 <= n_target <= n_digits and at most 9 other digits, got {n_target}, {n_digits}")
    rng = np.random.default_rng(seed)
    by_class = [bank_indices[bank_labels[bank_indices] == c] for c in range(10)]
    labels = rng.integers(0, 10, n_images)
    positions = np.empty((n_images, n_digits, 2), np.int32)
    digits = np.empty((n_images, n_digits), np.int32)
    for i, label in enumerate(labels):
        others = rng.choice(np.delete(np.arange(10), label), n_digits - n_target, replace=False)
        classes = np.concatenate([np.full(n_target, label), others])
        digits[i] = [rng.choice(by_class[c]) for c in classes]
        positions[i] = _place(rng, image_size, digit_size, n_digits)
        if progress is not None:
            progress.update(1)
    starts = rng.uniform(0, image_size, (n_images, n_strokes, 2))
    angles = rng.uniform(0, np.pi, (n_images, n_strokes))
    lengths = rng.uniform(0.3, 0.9, (n_images, n_strokes)) * digit_size
    ends = starts + lengths[..., None] * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    intensity = rng.uniform(0.5, 1.0, (n_images, n_strokes, 1))
    strokes = np.concatenate([starts, ends, intensity], axis=-1).astype(np.float32)
    return Layout(image_size, digit_size, labels.astype(np.int8), positions, digits, strokes, digit_size / 7.0)


def _draw_stroke(image, x0, y0, x1, y1, intensity, width):
    size = image.shape[0]
    r0 = int(max(0, np.floor(min(y0, y1) - width)))
    r1 = int(min(size, np.ceil(max(y0, y1) + width) + 1))
    c0 = int(max(0, np.floor(min(x0, x1) - width)))
    c1 = int(min(size, np.ceil(max(x0, x1) + width) + 1))
    if r0 >= r1 or c0 >= c1:
        return
    rows, cols = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((cols - x0) * dx + (rows - y0) * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
    distance = np.hypot(cols - (x0 + t * dx), rows - (y0 + t * dy))
    ink = np.clip(width / 2 + 0.5 - distance, 0.0, 1.0) * intensity
    np.maximum(image[r0:r1, c0:c1], ink, out=image[r0:r1, c0:c1])


def render(layout: Layout, bank: np.ndarray, index: int) -> np.ndarray:
    """Image ``index`` of a split as float32 ``(size, size, 1)`` in [0, 1]."""
    image = np.zeros((layout.image_size, layout.image_size), np.float32)
    for x0, y0, x1, y1, intensity in layout.strokes[index]:
        _draw_stroke(image, x0, y0, x1, y1, intensity, layout.stroke_width)
    d = layout.digit_size
    for (row, col), digit in zip(layout.positions[index], layout.digits[index]):
        np.maximum(image[row : row + d, col : col + d], bank[digit] / np.float32(255), out=image[row : row + d, col : col + d])
    return image[..., None]


def save(path: Path, bank: np.ndarray, bank_labels: np.ndarray, splits: dict[str, Layout]):
    arrays = {"bank": bank, "bank_labels": bank_labels}
    for name, layout in splits.items():
        arrays.update(
            {
                f"{name}_labels": layout.labels,
                f"{name}_positions": layout.positions,
                f"{name}_digits": layout.digits,
                f"{name}_strokes": layout.strokes,
                f"{name}_meta": np.array([layout.image_size, layout.digit_size, layout.stroke_width], np.float64),
            }
        )
    np.savez_compressed(path, **arrays)


def load(path: Path):
    """``(bank, {split: Layout})`` from a file written by :func:`save`."""
    data = np.load(path)
    splits = {}
    for name in ("train", "test"):
        if f"{name}_labels" not in data:
            continue
        image_size, digit_size, stroke_width = data[f"{name}_meta"]
        splits[name] = Layout(
            int(image_size),
            int(digit_size),
            data[f"{name}_labels"],
            data[f"{name}_positions"],
            data[f"{name}_digits"],
            data[f"{name}_strokes"],
            float(stroke_width),
        )
    return data["bank"], splits


def generate(out: Path, *, size: int, digit_size: int, n_train: int, n_test: int, n_digits: int, n_target: int,
             n_strokes: int, seed: int, show_progress: bool = True) -> Path:
    """Make and save a dataset; returns the file's path."""
    from tqdm import tqdm

    bank, bank_labels = digit_bank(digit_size)
    indices = np.arange(len(bank))
    splits = {}
    with tqdm(total=n_train + n_test, desc="layouts", unit="image", disable=not show_progress) as progress:
        for offset, (name, count, pool) in enumerate(
            (("train", n_train, indices[:TRAIN_BANK]), ("test", n_test, indices[TRAIN_BANK:]))
        ):
            splits[name] = make_layout(
                count, bank_labels, pool, image_size=size, digit_size=digit_size, n_digits=n_digits, n_target=n_target,
                n_strokes=n_strokes, seed=seed + offset, progress=progress,
            )
    out = Path(out).with_suffix(".npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    save(out, bank, bank_labels, splits)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/megapixel_digits"))
    parser.add_argument("--size", type=int, default=1500, help="image side in pixels")
    parser.add_argument("--digit-size", type=int, default=28)
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--digits", type=int, default=5, help="digits per image")
    parser.add_argument("--target", type=int, default=3, help="digits of the target class per image")
    parser.add_argument("--noise", type=int, default=50, help="noise strokes per image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = generate(args.out, size=args.size, digit_size=args.digit_size, n_train=args.train, n_test=args.test,
                    n_digits=args.digits, n_target=args.target, n_strokes=args.noise, seed=args.seed)
    print(f"written: {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
