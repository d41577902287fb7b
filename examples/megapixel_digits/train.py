"""Train attention sampling (or a dense CNN baseline) on Megapixel digits.

ATS: an attention network reads a 0.12-scale view of the image, 10 patches of
50x50 are sampled from its attention and read at full resolution, a small CNN
embeds each patch, and the expectation estimator averages the embeddings
(``ats.core.attention_sampling``, with an entropy regularizer on the
attention). Dense: the same kind of CNN over the whole image.

    python -m examples.megapixel_digits.train --out runs/ats               # the small configuration
    python -m examples.megapixel_digits.train --model dense --out runs/dense

Prints per-epoch metrics, writes ``metrics.json`` and, for ATS, PNG overlays
of the attention map and the sampled patches on test images.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def low_resolution(image: np.ndarray, low_size: int) -> np.ndarray:
    """Box-filtered ``(low_size, low_size, 1)`` view of a ``(size, size, 1)`` image."""
    from PIL import Image

    small = Image.fromarray(image[..., 0], mode="F").resize((low_size, low_size), Image.BOX)
    return np.asarray(small, dtype=np.float32)[..., None]


def make_sequence(keras, bank, layout, batch_size, low_size, shuffle, seed, with_low=True):
    from .dataset import render

    class MegapixelDigits(keras.utils.PyDataset):
        """Batches rendered on the fly: ``([x_low, x_high], y)`` (or ``(x_high, y)``)."""

        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.order = np.arange(len(layout.labels))
            self.rng = np.random.default_rng(seed)
            self.on_epoch_end()

        def __len__(self):
            return len(self.order) // batch_size

        def on_epoch_end(self):
            if shuffle:
                self.rng.shuffle(self.order)

        def __getitem__(self, index):
            ids = self.order[index * batch_size : (index + 1) * batch_size]
            high = np.stack([render(layout, bank, i) for i in ids])
            labels = layout.labels[ids].astype(np.int32)
            if not with_low:
                return high, labels
            low = np.stack([low_resolution(h, low_size) for h in high])
            return (low, high), labels

    return MegapixelDigits()


def patch_network(keras, name):
    layers = keras.layers
    return keras.Sequential(
        [
            layers.Conv2D(32, 5, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.GlobalMaxPooling2D(),
        ],
        name=name,
    )


def build_ats(keras, size, low_size, n_patches, patch, entropy, seed):
    from ats.core import attention_sampling
    from ats.utils.layers import SampleSoftmax
    from ats.utils.regularizers import multinomial_entropy

    layers = keras.layers
    x_low = keras.Input((low_size, low_size, 1), name="x_low")
    x_high = keras.Input((size, size, 1), name="x_high")
    attention = keras.Sequential(
        [
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.Conv2D(1, 3, padding="same"),
            SampleSoftmax(squeeze_channels=True, smooth=1e-5),
        ],
        name="attention",
    )
    features, attention_map, _ = attention_sampling(
        attention,
        patch_network(keras, "features"),
        patch_size=(patch, patch),
        n_patches=n_patches,
        attention_regularizer=multinomial_entropy(entropy),
        mode="auto",
        seed=seed,
    )([x_low, x_high])
    outputs = layers.Dense(10, activation="softmax")(features)
    model = keras.Model([x_low, x_high], outputs)
    attention_model = keras.Model(x_low, attention_map)
    return model, attention_model


def build_dense(keras, size):
    layers = keras.layers
    x_high = keras.Input((size, size, 1), name="x_high")
    hidden = layers.Conv2D(32, 7, strides=2, activation="relu")(x_high)
    hidden = layers.Conv2D(32, 3, strides=2, activation="relu")(hidden)
    hidden = layers.Conv2D(32, 3, strides=2, activation="relu")(hidden)
    hidden = layers.Conv2D(64, 3, strides=2, activation="relu")(hidden)
    features = layers.GlobalMaxPooling2D()(hidden)
    return keras.Model(x_high, layers.Dense(10, activation="softmax")(features))


class StepStats:
    """Time per training step and peak resident memory while training (sampled every 5 ms)."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self.running = True
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)


def save_overlays(out: Path, bank, layout, attention_model, low_size, n_patches, patch, count=4):
    """PNG per test image: the image, the attention map over it, and the sampled patches as boxes."""
    import atskern
    from PIL import Image, ImageDraw

    from .dataset import render

    paths = []
    size = layout.image_size
    for i in range(min(count, len(layout.labels))):
        high = render(layout, bank, i)
        low = low_resolution(high, low_size)
        attention = np.asarray(attention_model(low[None]), dtype=np.float64)[0]
        samples, _ = atskern.sample(attention[None], n_patches, seed=i)
        offsets = atskern.patch_offsets(samples, attention.shape, (size, size), (patch, patch))[0]
        gray = (np.clip(high[..., 0], 0, 1) * 255).astype(np.uint8)
        heat = np.asarray(Image.fromarray((attention / attention.max() * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR))
        rgb = np.stack([np.maximum(gray, heat), gray, gray // 2 + heat // 2], axis=-1).astype(np.uint8)
        picture = Image.fromarray(rgb)
        draw = ImageDraw.Draw(picture)
        for row, col in offsets:
            draw.rectangle([int(col), int(row), int(col) + patch, int(row) + patch], outline=(0, 255, 0), width=3)
        path = out / f"attention_{i}_label{int(layout.labels[i])}.png"
        picture.save(path)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="dataset file (made with the options below if missing)")
    parser.add_argument("--model", choices=("ats", "dense"), default="ats")
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--noise", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--n-patches", type=int, default=10)
    parser.add_argument("--patch", type=int, default=50)
    parser.add_argument("--scale", type=float, default=0.12, help="size of the attention view relative to the image")
    parser.add_argument("--entropy", type=float, default=0.01, help="weight of the attention entropy regularizer")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/megapixel_digits"))
    args = parser.parse_args(argv)

    from .dataset import generate, load

    data = args.data or args.out / f"data_{args.size}_{args.train}_{args.test}_{args.noise}_{args.seed}.npz"
    if not Path(data).exists():
        data = generate(data, size=args.size, digit_size=28, n_train=args.train, n_test=args.test, n_digits=5,
                        n_target=3, n_strokes=args.noise, seed=args.seed)
    bank, splits = load(data)
    train, test = splits["train"], splits["test"]
    size = train.image_size

    import keras

    keras.utils.set_random_seed(args.seed)
    low_size = max(8, round(size * args.scale))
    with_low = args.model == "ats"
    if with_low:
        model, attention_model = build_ats(keras, size, low_size, args.n_patches, args.patch, args.entropy, args.seed)
    else:
        model, attention_model = build_dense(keras, size), None
    model.compile(optimizer=keras.optimizers.Adam(args.lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=False)
    train_data = make_sequence(keras, bank, train, args.batch, low_size, True, args.seed, with_low)
    test_data = make_sequence(keras, bank, test, args.batch, low_size, False, args.seed, with_low)

    args.out.mkdir(parents=True, exist_ok=True)
    stats = StepStats()
    start = time.perf_counter()
    history = model.fit(train_data, validation_data=test_data, epochs=args.epochs, verbose=2)
    seconds = time.perf_counter() - start
    stats.running = False
    steps = args.epochs * len(train_data)
    metrics = {
        "model": args.model,
        "image_size": size,
        "train_images": len(train.labels),
        "test_images": len(test.labels),
        "epochs": args.epochs,
        "train_seconds": seconds,
        "seconds_per_step": seconds / steps,
        "peak_rss_above_start_mib": (stats.peak - stats.baseline) / 2**20,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "test_accuracy": float(history.history["val_accuracy"][-1]),
    }
    if attention_model is not None:
        metrics["overlays"] = [p.name for p in save_overlays(args.out, bank, test, attention_model, low_size, args.n_patches, args.patch)]
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=1))


if __name__ == "__main__":
    main()
