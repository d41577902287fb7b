"""Why attention sampling starts at chance on 1500x1500 Megapixel digits: where the first patches land.

For attention maps ``softmax(w * mean3x3(x_low))`` (``w = 0``: the uniform map
a freshly initialized attention network is close to), draws ``n_patches``
cells without replacement with ``atskern.sample`` and counts the patches that
hold at least half of a digit (and of a digit of the image's class).

    python -m examples.megapixel_digits.hit_rates --data runs/data_1500_5000_1000_50_5_3_0.npz --images 500
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def mean3x3(x: np.ndarray) -> np.ndarray:
    """3x3 local mean with edge cells averaged over the cells that exist (``count_include_pad=False``)."""
    padded = np.pad(x, 1)
    ones = np.pad(np.ones_like(x), 1)
    total = sum(padded[i : i + x.shape[0], j : j + x.shape[1]] for i in range(3) for j in range(3))
    count = sum(ones[i : i + x.shape[0], j : j + x.shape[1]] for i in range(3) for j in range(3))
    return total / count


def hit_rates(data: Path, weights, images: int, n_patches: int = 10, patch: int = 50, scale: float = 0.12, seed: int = 0):
    import atskern

    from .dataset import box_downsample, load, render_uint8
    from .paper_scale import digit_hits

    bank, splits = load(data)
    with np.load(data) as raw:
        bank_labels = raw["bank_labels"]
    layout = splits["train"]
    count = min(images, len(layout.labels))
    size = layout.image_size
    low_size = max(8, round(size * scale))
    lows = np.stack([mean3x3(box_downsample(render_uint8(layout, bank, i), low_size)) for i in range(count)])
    targets = bank_labels[layout.digits[:count]] == layout.labels[:count, None]
    rows = []
    for w in weights:
        logits = w * lows.astype(np.float64)
        attention = np.exp(logits - logits.max(axis=(1, 2), keepdims=True))
        attention /= attention.sum(axis=(1, 2), keepdims=True)
        samples, _ = atskern.sample(attention, n_patches, seed=seed)
        offsets = atskern.patch_offsets(samples, (low_size, low_size), (size, size), (patch, patch))
        hits, target_hits = digit_hits(offsets, layout.positions[:count], targets, patch, layout.digit_size)
        rows.append({"ink_prior": w, "digit_patches": float(hits.mean()), "target_patches": float(target_hits.mean()),
                     "images_without_target_patch": float((target_hits == 0).mean())})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--weights", type=float, nargs="+", default=[0, 5, 10, 15, 20, 25, 30])
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args(argv)
    rows = hit_rates(args.data, args.weights, args.images)
    print(f"{'ink prior w':>12} {'digit patches':>14} {'target patches':>15} {'no target patch':>16}")
    for r in rows:
        print(f"{r['ink_prior']:>12g} {r['digit_patches']:>14.3f} {r['target_patches']:>15.3f} "
              f"{r['images_without_target_patch']:>16.1%}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
