"""Figures and the results file of the paper-scale run (from the run folders of :mod:`.paper_scale`).

    python -m examples.megapixel_digits.figures --ats runs/paper_scale --lowres runs/lowres --dense runs/dense \\
        --uniform runs/paper_scale_uniform

writes into ``examples/megapixel_digits/results/``: ``paper_scale.json``,
``paper_scale_test_error.png`` (our test error per epoch beside the 2019
curve), ``paper_scale_attention_*.png`` (attention and sampled patches on
1500x1500 test images), ``paper_scale_baselines.json`` and
``paper_scale_baselines.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

# The 2019 library's Megapixel MNIST test error (docs/img/mnist-test-error.png of
# idiap/attention-sampling, 1500x1500, 10 patches), read off the figure by eye:
# at chance (0.9) until about epoch 210, about 0.2 from about epoch 250 to 500.
REFERENCE_2019 = [(1, 0.9), (210, 0.9), (250, 0.2), (500, 0.2)]

SOURCES = {"sklearn-digits": "scikit-learn digits upscaled", "mnist": "MNIST digits"}

KEYS = ("image_size", "n_patches", "patch_size", "epochs", "test_error", "seconds_per_epoch", "peak_memory_mib",
        "device", "framework")


def read_run(folder: Path) -> dict:
    return json.loads((Path(folder) / "history.json").read_text())


def results_json(run: dict) -> dict:
    """The issue's keys first, then the details (per-epoch history, configuration, data)."""
    out = {k: run[k] for k in KEYS}
    out["test_error"] = [round(e, 6) for e in out["test_error"]]  # counts over 1000 images: exact to 1e-3
    out.update({k: v for k, v in run.items() if k not in KEYS})
    return out


def plot_test_error(run: dict, path: Path, uniform: dict | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(run["test_error"]) + 1)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ref_x, ref_y = zip(*REFERENCE_2019)
    ax.plot(ref_x, ref_y, "--", color="gray", label="2019 library (TF1 Keras, MNIST digits; read off its docs)")
    source = SOURCES.get(run["data"]["source"], run["data"]["source"])
    ax.plot(epochs, run["test_error"], "o-", color="C3", ms=3,
            label=f"atskern + ats.torch ({source}, '{run['config']['net']}' networks, ink prior)")
    if uniform is not None:
        ax.plot(np.arange(1, len(uniform["test_error"]) + 1), uniform["test_error"], "s-", color="C0", ms=3,
                label="the same without the ink prior (uniform start)")
    ax.axhline(0.1, color="C2", lw=0.8, ls=":", label="goal: 10% within 30 epochs")
    ax.set_xscale("log")
    ax.set_xlim(0.9, 550)
    ax.set_ylim(0, 1)
    ax.set_xlabel("epoch (log scale)")
    ax.set_ylabel("test error")
    ax.set_title(f"Megapixel digits {run['image_size']}x{run['image_size']}, {run['n_patches']} patches of "
                 f"{run['patch_size']}x{run['patch_size']}: same settings, not the same pixels", fontsize=9)
    ax.legend(fontsize=8, loc="center", bbox_to_anchor=(0.55, 0.5))
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attention_overlays(run_folder: Path, data: Path, out: Path, count: int = 3, seed: int = 0):
    """PNG per test image at full resolution: the image, the attention map in red, the sampled patches in green."""
    import torch
    from PIL import Image, ImageDraw, ImageFont

    from .dataset import box_downsample, load, render_uint8
    from .paper_scale import parse

    state = torch.load(Path(run_folder) / "checkpoint.pt", map_location="cpu", weights_only=False)
    config = state["config"]
    args = parse(["--out", str(run_folder), "--net", config["net"], "--n-patches", str(config["n_patches"]),
                  "--patch", str(config["patch"]), "--ink-prior", str(config["ink_prior"] or 0)])
    from .paper_scale import build_model

    bank, splits = load(data)
    test = splits["test"]
    size = test.image_size
    low_size = max(8, round(size * config["scale"]))
    model = build_model(args, low_size)
    model.load_state_dict(state["model"])
    model.eval()
    paths = []
    for i in range(count):
        image = render_uint8(test, bank, i)
        low = torch.from_numpy(box_downsample(image, low_size))[None, None]
        with torch.no_grad():
            logits, attention, offsets = model(low, torch.from_numpy(image)[None, None], key=seed + i)
        attention = attention[0].numpy()
        heat = (attention / attention.max() * 255).astype(np.uint8)
        heat = np.asarray(Image.fromarray(heat).resize((size, size), Image.NEAREST))
        rgb = np.stack([np.maximum(image, heat), image, image // 2 + heat // 2], axis=-1)
        picture = Image.fromarray(rgb)
        draw = ImageDraw.Draw(picture)
        patch = config["patch"]
        for row, col in offsets[0].tolist():
            draw.rectangle([col, row, col + patch, row + patch], outline=(0, 255, 0), width=4)
        for (row, col) in test.positions[i].tolist():
            d = test.digit_size
            draw.rectangle([col - 2, row - 2, col + d + 2, row + d + 2], outline=(80, 160, 255), width=2)
        predicted = int(logits.argmax(1))
        try:
            font = ImageFont.load_default(size=max(12, size // 40))
        except TypeError:  # Pillow < 10.1
            font = ImageFont.load_default()
        draw.text((10, 10), f"test image {i}: class {int(test.labels[i])}, predicted {predicted} "
                  f"(after epoch {state['epoch']})", fill=(255, 255, 255), font=font)
        path = out / f"paper_scale_attention_{i}.png"
        picture.save(path, optimize=True)
        paths.append(path)
    return paths


def plot_baselines(runs: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    best = [min(runs[n]["test_error"]) for n in names]
    step = [np.median(runs[n]["seconds_per_step"]) / runs[n]["config"]["batch"] for n in names]
    memory = [runs[n]["peak_memory_mib"] for n in names]
    labels = [f"{n}\n({runs[n]['epochs']} ep)" for n in names]
    for ax, values, title in zip(axes, (best, step, memory),
                                 ("best test error", "training seconds per image", "peak RSS above model (MiB)")):
        ax.bar(labels, values, color=["C3", "C0", "C1"][: len(names)])
        ax.set_title(title, fontsize=9)
        if values is not best:
            ax.set_yscale("log")
        for x, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle("1500x1500 Megapixel digits on this 2-core CPU (shared, nice 19)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(runs: dict) -> str:
    """The README tables: the ATS run per epoch, then every model side by side."""
    ats = runs["ATS"]
    lines = ["| epoch | test error | train error | digit patches (test, of 10) | train s | test s |", "|---|---|---|---|---|---|"]
    for r in ats["history"]:
        lines.append(f"| {r['epoch']} | {r['test_error']:.1%} | {r['train_error']:.1%} | {r['test_digit_patches']:.2f} | "
                     f"{r['train_seconds']:.0f} | {r['test_seconds']:.0f} |")
    lines += ["", "| model | epochs (steps) | best test error | s per training step (batch) | s per image | "
              "peak RSS above the built model |", "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        steps = sum(h["steps"] for h in r["history"])
        per_step = float(np.median(r["seconds_per_step"]))
        batch = r["config"]["batch"]
        lines.append(f"| {name} | {r['epochs']} ({steps}) | {min(r['test_error']):.1%} | {per_step:.2f} ({batch}) | "
                     f"{per_step / batch:.3f} | {r['peak_memory_mib']:.0f} MiB |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ats", type=Path, default=Path("runs/paper_scale"))
    parser.add_argument("--lowres", type=Path)
    parser.add_argument("--dense", type=Path)
    parser.add_argument("--uniform", type=Path, help="an ATS run without the ink prior (the control)")
    parser.add_argument("--data", type=Path, help="the dataset file (default: the one the ATS run used)")
    parser.add_argument("--overlays", type=int, default=3)
    parser.add_argument("--device", help="describe the machine (overrides the run's own description)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    run = read_run(args.ats)
    if args.device:
        run["device"] = args.device
    (args.out / "paper_scale.json").write_text(json.dumps(results_json(run), indent=1))
    uniform = read_run(args.uniform) if args.uniform and (args.uniform / "history.json").exists() else None
    plot_test_error(run, args.out / "paper_scale_test_error.png", uniform)
    if uniform is not None:
        (args.out / "paper_scale_uniform_start.json").write_text(json.dumps(results_json(uniform), indent=1))
    data = args.data or Path(run["data"].get("file") or Path(run["config"]["out"]).parent / "missing.npz")
    if args.overlays:
        attention_overlays(args.ats, data, args.out, args.overlays)
    runs = {"ATS": run}
    for name, folder in (("low-res CNN", args.lowres), ("dense CNN", args.dense)):
        if folder is not None and (folder / "history.json").exists():
            runs[name] = read_run(folder)
    if len(runs) > 1:
        summary = {name: {k: r[k] for k in ("epochs", "test_error", "seconds_per_epoch", "seconds_per_step",
                                              "peak_memory_mib", "device", "framework")} | {"batch": r["config"]["batch"]}
                   for name, r in runs.items()}
        (args.out / "paper_scale_baselines.json").write_text(json.dumps(summary, indent=1))
        plot_baselines(runs, args.out / "paper_scale_baselines.png")
    print(markdown(runs))


if __name__ == "__main__":
    main()
