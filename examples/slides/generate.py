"""Write a synthetic whole-slide data set: pyramidal, tiled JPEG TIFFs whose label is decided by small lesions.

Each slide has a few tissue regions; label 1 slides hold 6-10 *lesions*
(ringed motifs of 128 px), every slide holds 3-6 *decoys* (disks of the same
size and mean colour). At the low-resolution level the attention network
reads, lesions and decoys are the same dark dot; only level 0 tells them
apart. Slide sizes vary (pad-and-mask batches); background tiles are stored
empty, so even 100,000² slides cost little disk.

    python -m examples.slides.generate --out data/slides                       # 160 train + 48 test, 1.5-2k²
    python -m examples.slides.generate --out data/big --train 2 --test 0 --min-size 100000 --max-size 100000

Writes the slides and ``labels.csv`` (file, label, split).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def generate(out, *, n_train=160, n_test=48, min_size=1536, max_size=2048, seed=0, layout="tiff", quality=80,
             tissue_scale=0.45, lesions=(6, 10), decoys=(3, 6), motif_radius=64, show_progress=True):
    """Write the data set to ``out``; returns the rows of ``labels.csv``."""
    from atskern.io import write_synthetic_slide

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    total = n_train + n_test
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="slides", unit="slide")
    for i in range(total):
        split = "train" if i < n_train else "test"
        label = i % 2
        size = (int(rng.integers(min_size, max_size + 1)), int(rng.integers(min_size, max_size + 1)))
        name = f"{split}-{i:04d}.tif"
        write_synthetic_slide(out / name, size, label=label, seed=seed * 100003 + i, layout=layout, quality=quality,
                              tissue_scale=tissue_scale, min_side=128, lesions=tuple(lesions), decoys=tuple(decoys),
                              motif_radius=motif_radius)
        rows.append({"file": name, "label": label, "split": split, "height": size[0], "width": size[1]})
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def load(out):
    """``{"train": (paths, labels), "test": (paths, labels)}`` from ``labels.csv``."""
    out = Path(out)
    splits = {"train": ([], []), "test": ([], [])}
    with open(out / "labels.csv") as f:
        for row in csv.DictReader(f):
            splits[row["split"]][0].append(str(out / row["file"]))
            splits[row["split"]][1].append(int(row["label"]))
    return splits


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m examples.slides.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/slides")
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--test", type=int, default=48)
    parser.add_argument("--min-size", type=int, default=1536)
    parser.add_argument("--max-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", default="tiff", choices=["tiff", "bigtiff", "ome", "subifds", "svs"])
    parser.add_argument("--tissue-scale", type=float, default=0.45)
    parser.add_argument("--lesions", type=int, nargs=2, default=(6, 10), help="min and max lesions per positive slide")
    parser.add_argument("--decoys", type=int, nargs=2, default=(3, 6), help="min and max decoys per slide")
    parser.add_argument("--motif-radius", type=int, default=64)
    args = parser.parse_args(argv)
    if args.train < 1 or args.test < 0:
        parser.error("--train must be >= 1 and --test >= 0")
    if not 512 <= args.min_size <= args.max_size:
        parser.error("--min-size must be at least 512 (a pyramid of several levels) and at most --max-size")
    for name, (low, high) in (("--lesions", args.lesions), ("--decoys", args.decoys)):
        if not 0 <= low <= high:
            parser.error(f"{name} takes MIN MAX with 0 <= MIN <= MAX, got {low} {high}")
    rows = generate(args.out, n_train=args.train, n_test=args.test, min_size=args.min_size, max_size=args.max_size,
                    seed=args.seed, layout=args.layout, tissue_scale=args.tissue_scale, lesions=args.lesions,
                    decoys=args.decoys, motif_radius=args.motif_radius)
    size = sum((Path(args.out) / r["file"]).stat().st_size for r in rows)
    print(f"{len(rows)} slides, {size / 2**20:.1f} MiB on disk, in {args.out}")


if __name__ == "__main__":
    main()
