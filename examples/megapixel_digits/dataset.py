"""Megapixel digits: large images holding a few small digits among digit-like noise strokes.

Like the Megapixel MNIST benchmark of the ATS paper: each image has
``n_digits`` digits, ``n_target`` of them of the target class (the label) and
the others of distinct other classes, plus random strokes as thick as a digit's
pen. Digits come from scikit-learn's bundled 8x8 digits (no network needed),
upscaled; the first 1200 of them make the training bank, the rest the test
bank, so test images hold digits never seen in training. With ``--mnist PATH``
(``mnist.npz`` as Keras saves it, or a folder of the four idx files, gzipped
or not) the digits are real MNIST: its training digits for the training
images, its test digits for the test images.

Images are not stored: a dataset file keeps the digit bank and each image's
layout (positions, digits, strokes), a few hundred bytes an image, and
:func:`render` draws any image on demand (:func:`render_uint8` as uint8
pixels, :func:`box_downsample` gives the low-resolution view of a rendered
image, so no image is rendered twice).

Command line (the paper's settings are the defaults)::

    python -m examples.megapixel_digits.dataset --out data/mpd --size 1500 --train 5000 --test 1000
    python -m examples.megapixel_digits.dataset --out data/mpd_mnist --mnist ~/data/mnist.npz
"""

from __future__ import annotations

import argparse
import gzip
import math
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


def _read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte array (MNIST's own format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\0\0" or data[2] != 8:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"no {stem}[.gz] in {folder}")


def mnist_bank(path, digit_size: int = 28):
    """Real MNIST digits from ``path``: ``(bank, labels, n_train)``, training digits first.

    ``path`` is ``mnist.npz`` (keys ``x_train``, ``y_train``, ``x_test``,
    ``y_test``, as ``keras.datasets.mnist`` saves it) or a folder holding
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (optionally ``.gz``).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        x_train = _read_idx(_find(path, "train-images-idx3-ubyte"))
        y_train = _read_idx(_find(path, "train-labels-idx1-ubyte"))
        x_test = _read_idx(_find(path, "t10k-images-idx3-ubyte"))
        y_test = _read_idx(_find(path, "t10k-labels-idx1-ubyte"))
    elif path.exists():
        with np.load(path) as data:
            x_train, y_train, x_test, y_test = (data[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    else:
        raise FileNotFoundError(f"mnist path {path} does not exist (give mnist.npz or a folder of idx files)")
    images = np.concatenate([x_train, x_test]).astype(np.uint8)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"MNIST images must be (N, 28, 28), got {images.shape}")
    if digit_size != 28:
        from PIL import Image

        images = np.stack([np.asarray(Image.fromarray(im).resize((digit_size, digit_size), Image.BICUBIC)) for im in images])
    return images, np.concatenate([y_train, y_test]).astype(np.int8), len(x_train)


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


def _draw_stroke(image, x0, y0, x1, y1, intensity, width, scale=1.0):
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
    ink = np.clip(width / 2 + 0.5 - distance, 0.0, 1.0) * (intensity * scale)
    if image.dtype == np.uint8:
        ink = (ink + 0.5).astype(np.uint8)
    np.maximum(image[r0:r1, c0:c1], ink, out=image[r0:r1, c0:c1])


def render_uint8(layout: Layout, bank: np.ndarray, index: int) -> np.ndarray:
    """Image ``index`` of a split as uint8 ``(size, size)`` (0 to 255): a quarter of float32's bytes."""
    image = np.zeros((layout.image_size, layout.image_size), np.uint8)
    for x0, y0, x1, y1, intensity in layout.strokes[index]:
        _draw_stroke(image, x0, y0, x1, y1, intensity, layout.stroke_width, scale=255.0)
    d = layout.digit_size
    for (row, col), digit in zip(layout.positions[index], layout.digits[index]):
        np.maximum(image[row : row + d, col : col + d], bank[digit], out=image[row : row + d, col : col + d])
    return image


def render(layout: Layout, bank: np.ndarray, index: int) -> np.ndarray:
    """Image ``index`` of a split as float32 ``(size, size, 1)`` in [0, 1]."""
    image = np.zeros((layout.image_size, layout.image_size), np.float32)
    for x0, y0, x1, y1, intensity in layout.strokes[index]:
        _draw_stroke(image, x0, y0, x1, y1, intensity, layout.stroke_width)
    d = layout.digit_size
    for (row, col), digit in zip(layout.positions[index], layout.digits[index]):
        np.maximum(image[row : row + d, col : col + d], bank[digit] / np.float32(255), out=image[row : row + d, col : col + d])
    return image[..., None]


def box_weights(size: int, low_size: int) -> np.ndarray:
    """The ``(p, q)`` area-averaging block of a ``size`` to ``low_size`` box filter.

    With ``g = gcd(size, low_size)``, every ``q = size / g`` input pixels map
    to ``p = low_size / g`` output pixels the same way, so the whole filter is
    ``g`` copies of this block along the diagonal. Entry ``(i, j)`` is the
    fraction of output pixel ``i`` covered by input pixel ``j`` (rows sum to 1).
    """
    if not 1 <= low_size <= size:
        raise ValueError(f"low_size must be in [1, size={size}], got {low_size}")
    g = math.gcd(size, low_size)
    p, q = low_size // g, size // g
    # output pixel i covers input [i q / p, (i + 1) q / p); work in units of 1/p input pixels (integers)
    weights = np.zeros((p, q), np.float64)
    for i in range(p):
        start, stop = i * q, (i + 1) * q  # in 1/p pixels
        for j in range(start // p, -(-stop // p)):
            overlap = min(stop, (j + 1) * p) - max(start, j * p)
            weights[i, j] = overlap / q
    return weights


def box_downsample(image: np.ndarray, low_size: int, scale: float = 1 / 255) -> np.ndarray:
    """Exact area-average of a square ``(size, size)`` image to ``(low_size, low_size)`` float32, times ``scale``.

    The block structure of :func:`box_weights` makes it two small batched
    products (``size**2 * p`` multiply-adds, p = 3 for 1500 to 180), about a
    millisecond at 1500x1500, where a dense ``A @ X @ A.T`` would cost
    ``size**2 * low_size``.
    """
    size = image.shape[0]
    if image.ndim != 2 or image.shape[1] != size:
        raise ValueError(f"image must be square (size, size), got {image.shape}")
    w = box_weights(size, low_size).astype(np.float32)
    p, q = w.shape
    g = size // q
    rows = np.matmul(w * np.float32(scale), image.reshape(g, q, size).astype(np.float32))  # (g, p, size): rows filtered
    return np.matmul(rows.reshape(g * p, g, q), w.T).reshape(g * p, g * p)  # (low, g, p): columns filtered


def save(path: Path, bank: np.ndarray, bank_labels: np.ndarray, splits: dict[str, Layout], bank_split: int = TRAIN_BANK,
         source: str = "sklearn-digits"):
    arrays = {"bank": bank, "bank_labels": bank_labels, "bank_split": np.array(bank_split), "source": np.array(source)}
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
             n_strokes: int, seed: int, show_progress: bool = True, mnist=None) -> Path:
    """Make and save a dataset; returns the file's path. ``mnist``: a path to real MNIST (see :func:`mnist_bank`)."""
    from tqdm import tqdm

    if mnist is not None:
        bank, bank_labels, split = mnist_bank(mnist, digit_size)
        source = "mnist"
    else:
        (bank, bank_labels), split, source = digit_bank(digit_size), TRAIN_BANK, "sklearn-digits"
    indices = np.arange(len(bank))
    splits = {}
    with tqdm(total=n_train + n_test, desc="layouts", unit="image", disable=not show_progress) as progress:
        for offset, (name, count, pool) in enumerate(
            (("train", n_train, indices[:split]), ("test", n_test, indices[split:]))
        ):
            splits[name] = make_layout(
                count, bank_labels, pool, image_size=size, digit_size=digit_size, n_digits=n_digits, n_target=n_target,
                n_strokes=n_strokes, seed=seed + offset, progress=progress,
            )
    out = Path(out).with_suffix(".npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    save(out, bank, bank_labels, splits, split, source)
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
    parser.add_argument("--mnist", type=Path, help="real MNIST (mnist.npz or a folder of idx files) instead of scikit-learn's digits")
    args = parser.parse_args(argv)
    path = generate(args.out, size=args.size, digit_size=args.digit_size, n_train=args.train, n_test=args.test,
                    n_digits=args.digits, n_target=args.target, n_strokes=args.noise, seed=args.seed, mnist=args.mnist)
    print(f"written: {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
