"""Train attention sampling on synthetic whole-slide images, patches read from the slide files on demand.

The attention network reads a low-resolution pyramid level of each slide
(at most ``--low-side`` pixels a side; ``--attention-downscale`` stride-2
convolutions make the attention grid coarser), ``--patches`` patches of ``--patch`` pixels are
sampled from it and read from level 0 of the TIFF inside the step
(``ats.torch.slides.SlideAttentionSampling``), a small CNN embeds each patch
and the unbiased estimator averages the embeddings; a linear layer
classifies. Slides of different sizes share a batch (pad and mask). A
DataLoader with ``--workers`` processes reads the low-resolution views.

    python -m examples.slides.generate --out data/slides
    python -m examples.slides.train --data data/slides --out runs/slides

Prints a progress bar per epoch, writes ``metrics.json`` (accuracy per epoch,
seconds per step, peak resident memory) and attention overlays
(``attention_*.png``: the attention over the low-resolution level, the
sampled patches boxed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _centre_module():
    from torch import nn

    class Centre(nn.Module):
        """Pixels in [0, 1] to [-1, 1]."""

        def forward(self, x):
            return x * 2.0 - 1.0

    return Centre


def build(args):
    import torch
    from torch import nn

    import ats.torch as at
    from ats.torch.slides import SlideAttentionSampling

    Centre = _centre_module()
    torch.manual_seed(args.seed)
    layers, channels = [Centre()], 3
    for _ in range(args.attention_downscale):  # stride-2 convolutions: a coarser attention grid
        layers += [nn.Conv2d(channels, 8, 3, stride=2, padding=1), nn.LeakyReLU(0.1)]
        channels = 8
    attention = nn.Sequential(*layers, nn.Conv2d(channels, 8, 3, padding=1), nn.LeakyReLU(0.1),
                              nn.Conv2d(8, 1, 3, padding=1))
    # leaky units on centred pixels: plain ReLUs on [0, 1] inputs can all die early and leave constant features
    feature = nn.Sequential(Centre(), nn.Conv2d(3, 16, 5, stride=2), nn.LeakyReLU(0.1),
                            nn.Conv2d(16, 32, 3, stride=2), nn.LeakyReLU(0.1), nn.Conv2d(32, 32, 3, stride=2),
                            nn.LeakyReLU(0.1), nn.AdaptiveMaxPool2d(1), nn.Flatten())
    ats_model = SlideAttentionSampling(attention, feature, patch_size=args.patch, n_patches=args.patches,
                                       attention_regularizer=at.MultinomialEntropy(args.entropy), mode="auto",
                                       threads=2)
    head = nn.Linear(32, 2)
    return ats_model, head


def overlay(path, x_low, size, attention, cells, patch_px, label, prediction):
    """Save the low view with the attention on top and the sampled patches boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    h, w = size
    image = x_low[:, :h, :w].permute(1, 2, 0).numpy()
    grid = attention.shape
    fig, axes = plt.subplots(1, 2, figsize=(10, 5 * h / w + 0.6))
    axes[0].imshow(image)
    axes[0].set_title(f"low-resolution level ({h}x{w}), label {label}")
    axes[1].imshow(image)
    cell = (x_low.shape[1] / grid[0], x_low.shape[2] / grid[1])
    axes[1].imshow(attention[: int(np.ceil(h / cell[0])), : int(np.ceil(w / cell[1]))].numpy(), cmap="magma",
                   alpha=0.6, extent=(0, np.ceil(w / cell[1]) * cell[1], np.ceil(h / cell[0]) * cell[0], 0))
    for r, c in cells:
        cy, cx = (r + 0.5) * cell[0], (c + 0.5) * cell[1]
        axes[1].add_patch(Rectangle((cx - patch_px[1] / 2, cy - patch_px[0] / 2), patch_px[1], patch_px[0],
                                    fill=False, edgecolor="lime", linewidth=1.2))
    axes[1].set_title(f"attention and sampled patches; predicted {prediction}")
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the configuration of the run in ``results/`` (and the README)."""
    parser = argparse.ArgumentParser(prog="python -m examples.slides.train", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/slides")
    parser.add_argument("--out", default="runs/slides")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patches", type=int, default=12)
    parser.add_argument("--patch", type=int, default=160)
    parser.add_argument("--low-side", type=int, default=128)
    parser.add_argument("--attention-downscale", type=int, default=3,
                        help="stride-2 convolutions in the attention network (grid = low view / 2**this)")
    parser.add_argument("--entropy", type=float, default=1e-4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--overlays", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("epochs", "batch", "patches", "patch", "low_side", "attention_downscale"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (Path(args.data) / "labels.csv").is_file():
        parser.error(f"--data {args.data}: no labels.csv there (make the data with python -m examples.slides.generate)")

    import torch
    from torch import nn
    from tqdm import tqdm

    from ats.torch.slides import SlideDataset, collate_slides

    from .generate import load

    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = load(args.data)
    loaders = {
        name: torch.utils.data.DataLoader(SlideDataset(paths, labels, low_side=args.low_side), batch_size=args.batch,
                                          shuffle=name == "train", num_workers=args.workers,
                                          collate_fn=collate_slides, persistent_workers=args.workers > 0)
        for name, (paths, labels) in splits.items() if paths
    }
    model, head = build(args)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr)
    history, step_times = [], []
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        losses, correct, seen = [], 0, 0
        bar = tqdm(loaders["train"], desc=f"epoch {epoch + 1}/{args.epochs}", unit="step")
        for batch in bar:
            t = time.perf_counter()
            features, _, _ = model(batch.x_low, batch.slides, batch.sizes)
            logits = head(features)
            loss = nn.functional.cross_entropy(logits, batch.labels) + model.regularization_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step_times.append(time.perf_counter() - t)
            losses.append(loss.item())
            correct += int((logits.argmax(1) == batch.labels).sum())
            seen += len(batch.labels)
            bar.set_postfix(loss=f"{np.mean(losses):.3f}", acc=f"{correct / seen:.2f}")
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "train_accuracy": correct / seen}
        if "test" in loaders:
            row["test_accuracy"] = evaluate(model, head, loaders["test"])
        history.append(row)
        tqdm.write(json.dumps(row))
    metrics = {
        "args": vars(args),
        "history": history,
        "seconds_per_step": float(np.median(step_times)),
        "wall_seconds": time.time() - start,
        "peak_rss_mib_main_process": peak_rss_mib(),
        "slides": {name: len(paths) for name, (paths, _) in splits.items()},
    }
    if "test" in loaders and args.overlays:
        save_overlays(model, head, loaders["test"], out, args)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"median {metrics['seconds_per_step']:.2f} s per step (batch {args.batch}), "
          f"peak RSS of the main process {metrics['peak_rss_mib_main_process']:.0f} MiB, "
          f"wall {metrics['wall_seconds']:.0f} s; metrics in {out / 'metrics.json'}")
    return metrics


def evaluate(model, head, loader):
    import torch

    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for batch in loader:
            features, _, _ = model(batch.x_low, batch.slides, batch.sizes)
            correct += int((head(features).argmax(1) == batch.labels).sum())
            seen += len(batch.labels)
    return correct / seen


def save_overlays(model, head, loader, out, args):
    import torch

    from ats.torch import functional as F

    model.eval()
    saved = 0
    with torch.no_grad():
        for batch in loader:
            attention = model.attention_map(batch.x_low, batch.sizes)
            indices, _ = F.sample(attention, args.patches, deterministic=True)
            features, _, _ = model(batch.x_low, batch.slides, batch.sizes)
            predictions = head(features).argmax(1)
            for b in range(len(batch.slides)):
                if saved >= args.overlays:
                    return
                h, w = batch.sizes[b].tolist()
                from atskern.io import open_slide

                level0 = open_slide(batch.slides[b]).levels[0].shape
                patch_px = (args.patch * h / level0[0], args.patch * w / level0[1])
                overlay(out / f"attention_{saved}_label{int(batch.labels[b])}.png", batch.x_low[b], (h, w),
                        attention[b], indices[b].tolist(), patch_px, int(batch.labels[b]), int(predictions[b]))
                saved += 1


if __name__ == "__main__":
    main()
