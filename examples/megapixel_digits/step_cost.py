"""Training-step time of ATS, the low-resolution CNN and the dense CNN side by side, in one process.

The per-epoch times of the training runs depend on what else the machine was
doing at the time; this measures the three models' steps interleaved on the
same batch (forward, backward, Adam step), ``--repeats`` rounds, and reports
medians (rendering excluded), so their ratios hold even on a loaded machine.

    python -m examples.megapixel_digits.step_cost --data runs/data_1500_5000_1000_50_5_3_0.npz --batch 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=["ats", "ats-2019", "lowres", "dense"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import torch

    from .dataset import load
    from .networks import AttentionSamplingNet, DenseCNN, LowResolutionCNN
    from .paper_scale import Views, device_name

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bank, splits = load(args.data)
    layout = splits["train"]
    low_size = round(layout.image_size * 0.12)
    views = Views(bank, layout, low_size)
    items = [views[i] for i in range(args.batch)]
    low = torch.stack([x[0] for x in items]).contiguous(memory_format=torch.channels_last)
    high = torch.stack([x[1] for x in items])
    labels = torch.tensor([x[2] for x in items])
    builders = {
        "ats": lambda: AttentionSamplingNet("fast", ink_prior=25.0),
        "ats-2019": lambda: AttentionSamplingNet("2019", ink_prior=25.0),
        "lowres": LowResolutionCNN,
        "dense": DenseCNN,
    }
    models = {name: builders[name]().to(memory_format=torch.channels_last) for name in args.models}
    optimizers = {name: torch.optim.Adam(m.parameters(), 1e-3) for name, m in models.items()}

    def step(name, key):
        model = models[name]
        if name.startswith("ats"):
            logits = model(low, high, key=key)[0]
        else:
            logits = model(low if name == "lowres" else high)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizers[name].zero_grad()
        loss.backward()
        optimizers[name].step()

    times = {name: [] for name in models}
    for r in range(args.repeats + 1):  # round 0 warms up
        for name in models:
            tick = time.perf_counter()
            step(name, r)
            if r:
                times[name].append(time.perf_counter() - tick)
    result = {"batch": args.batch, "image_size": layout.image_size, "device": device_name(torch, "cpu"),
              "seconds_per_step": {n: float(np.median(t)) for n, t in times.items()},
              "all_seconds": times}
    base = result["seconds_per_step"].get("ats")
    for name, seconds in result["seconds_per_step"].items():
        ratio = f"  ({seconds / base:.1f}x ATS)" if base else ""
        print(f"{name:>9}: {seconds:.3f} s per step of {args.batch}{ratio}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
