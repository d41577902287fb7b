"""Megapixel digits at the ATS paper's scale, trained with PyTorch (``ats.torch``), resumable.

The paper's setting (Katharopoulos & Fleuret 2019, Megapixel MNIST): 1500x1500
images, 5 digits of which 3 are of the class, about 50 noise strokes, a 0.12
low-resolution view (180x180) for the attention, 10 patches of 50x50, 5000
training and 1000 test images. Images are rendered on demand as uint8 by
:mod:`.dataset` (once per visit: the low-resolution view is an exact box
filter of the rendered image, not a second rendering).

    python -m examples.megapixel_digits.paper_scale --out runs/paper_scale            # ATS, 30 epochs
    python -m examples.megapixel_digits.paper_scale --out runs/paper_scale --resume   # go on after a stop
    python -m examples.megapixel_digits.paper_scale --model lowres --out runs/lowres  # baselines
    python -m examples.megapixel_digits.paper_scale --model dense --out runs/dense --max-steps 20

Every epoch writes ``checkpoint.pt`` (model, optimizer, history) and
``history.json`` (test error per epoch, seconds, memory, digit-hit rate of
the sampled patches) in ``--out``; ``--resume`` continues from the last
finished epoch with the same data order and sampling keys as an unbroken run.
Rendering runs in ``--workers`` spawn-context worker processes (0: in the
main process); spawn, not fork, so the workers never inherit the parent's
kernel thread pools.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

MASK64 = 2**64 - 1


def mix(*values: int) -> int:
    """A 64-bit key from integers (splitmix64 chain): sampling keys per (seed, epoch, step)."""
    z = 0
    for v in values:
        z = (z + (int(v) & MASK64) + 0x9E3779B97F4A7C15) & MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
    return z


class Views:
    """Torch-style dataset over a split: ``(x_low float32 (1, L, L), x_high uint8 (1, S, S), label, index)``."""

    def __init__(self, bank, layout, low_size: int, high: bool = True):
        self.bank, self.layout, self.low_size, self.high = bank, layout, low_size, high

    def __len__(self):
        return len(self.layout.labels)

    def __getitem__(self, index):
        import torch

        from .dataset import box_downsample, render_uint8

        image = render_uint8(self.layout, self.bank, index)
        low = torch.from_numpy(box_downsample(image, self.low_size))[None]
        high = torch.from_numpy(image)[None] if self.high else torch.empty(0, dtype=torch.uint8)
        return low, high, int(self.layout.labels[index]), index


def digit_hits(offsets: np.ndarray, positions: np.ndarray, is_target: np.ndarray, patch: int, digit: int):
    """Per image: how many sampled patches hold at least half of some digit's box, and of a target digit.

    ``offsets`` ``(B, K, 2)`` patch first pixels, ``positions`` ``(B, n_digits, 2)``
    digit top-left corners, ``is_target`` ``(B, n_digits)`` bool.
    """
    lo = np.maximum(offsets[:, :, None, :], positions[:, None, :, :])
    hi = np.minimum(offsets[:, :, None, :] + patch, positions[:, None, :, :] + digit)
    area = np.prod(np.clip(hi - lo, 0, None), axis=-1)  # (B, K, n_digits)
    covered = area >= 0.5 * digit * digit
    return covered.any(-1).sum(-1), (covered & is_target[:, None, :]).any(-1).sum(-1)


class PeakMemory:
    """Peak resident memory of this process above a baseline, sampled every 10 ms in a thread."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.reset()
        self.running = True
        threading.Thread(target=self._watch, daemon=True).start()

    def reset(self):
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    @property
    def above_mib(self) -> float:
        return (self.peak - self.baseline) / 2**20


def build_model(args, low_size):
    from .networks import AttentionSamplingNet, DenseCNN, LowResolutionCNN

    if args.model == "ats":
        return AttentionSamplingNet(args.net, args.n_patches, args.patch, ink_prior=args.ink_prior, replace=args.replace)
    if args.model == "lowres":
        return LowResolutionCNN()
    return DenseCNN()


def to_device(torch, args, low, high, labels):
    """Batch tensors on the device; the low view channels-last (faster convolutions on the CPU)."""
    low = low.to(args.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return low, high.to(args.device, non_blocking=True), labels.to(args.device, non_blocking=True)


def run_batch(model, args, low, high, key, deterministic=False):
    if args.model == "ats":
        logits, attention, offsets = model(low, high, key=key, deterministic=deterministic)
        return logits, attention, offsets
    return model(low if args.model == "lowres" else high), None, None


class EpochOrder:
    """Sampler: a permutation fixed by ``(seed, epoch)`` (set ``epoch`` before iterating), so a resumed run sees
    the same order as an unbroken one; the identity order when ``shuffle`` is False."""

    def __init__(self, count: int, seed: int, shuffle: bool):
        self.count, self.seed, self.shuffle, self.epoch = count, seed, shuffle, 0

    def __len__(self):
        return self.count

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.count))
        return iter(np.random.default_rng(mix(self.seed, 1, self.epoch)).permutation(self.count).tolist())


def loader(torch, views, args, shuffle):
    """A DataLoader whose ``sampler.epoch`` picks the order; rendering in spawn-context workers (kept across epochs)."""
    kwargs = dict(batch_size=args.batch, sampler=EpochOrder(len(views), args.seed, shuffle), drop_last=shuffle,
                  num_workers=args.workers, pin_memory=args.device.startswith("cuda"))
    if args.workers:
        kwargs.update(multiprocessing_context="spawn", persistent_workers=True, prefetch_factor=2)
    return torch.utils.data.DataLoader(views, **kwargs)


def evaluate(torch, model, args, batches, layout, is_target_all):
    """Test loss, error, and patch-hit statistics (sampling with fixed keys, or top-k with ``--eval-topk``)."""
    model.eval()
    total = correct = 0
    loss_sum = 0.0
    hits = target_hits = 0
    with torch.no_grad():
        for step, (low, high, labels, ids) in enumerate(batches):
            if args.max_test_steps and step >= args.max_test_steps:
                break
            low, high, labels = to_device(torch, args, low, high, labels)
            logits, _, offsets = run_batch(model, args, low, high, mix(args.seed, 2, step), deterministic=args.eval_topk)
            loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
            total += len(labels)
            if offsets is not None:
                ids = ids.numpy()
                h, t = digit_hits(offsets.cpu().numpy(), layout.positions[ids], is_target_all[ids], args.patch,
                                  layout.digit_size)
                hits += int(h.sum())
                target_hits += int(t.sum())
    model.train()
    result = {"test_loss": loss_sum / total, "test_error": round(1 - correct / total, 9)}
    if args.model == "ats":
        result["test_digit_patches"] = hits / total  # patches (of n_patches) that hold a digit, per image
        result["test_target_patches"] = target_hits / total
    return result


def save_checkpoint(torch, path: Path, state: dict):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def device_name(torch, device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="dataset file (made with the options below if missing)")
    parser.add_argument("--mnist", type=Path, help="real MNIST (mnist.npz or idx folder) instead of scikit-learn's digits")
    parser.add_argument("--model", choices=("ats", "lowres", "dense"), default="ats")
    parser.add_argument("--net", choices=("fast", "2019"), default="fast", help="ATS networks (see networks.py)")
    parser.add_argument("--size", type=int, default=1500)
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--noise", type=int, default=50)
    parser.add_argument("--digits", type=int, default=5)
    parser.add_argument("--target", type=int, default=3)
    parser.add_argument("--scale", type=float, default=0.12, help="low-resolution view relative to the image")
    parser.add_argument("--n-patches", type=int, default=10)
    parser.add_argument("--patch", type=int, default=50)
    parser.add_argument("--replace", action="store_true", help="sample with replacement")
    parser.add_argument("--ink-prior", type=float, default=10.0, help="initial weight of the ink prior (0: none)")
    parser.add_argument("--entropy", type=float, default=1e-4, help="attention entropy regularizer (2019: 1e-4)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clipnorm", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: all)")
    parser.add_argument("--max-test-steps", type=int, default=0, help="test on this many batches only (0: all)")
    parser.add_argument("--eval-topk", action="store_true", help="test on the top-k cells instead of sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--workers", type=int, default=1, help="spawn-context rendering workers (0: main process)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/paper_scale"))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    import torch
    from tqdm import tqdm

    from .dataset import generate, load

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or args.out.parent / (
        f"data_{args.size}_{args.train}_{args.test}_{args.noise}_{args.digits}_{args.target}_{args.seed}"
        f"{'_mnist' if args.mnist else ''}.npz")
    if not Path(data).exists():
        data = generate(data, size=args.size, digit_size=28, n_train=args.train, n_test=args.test, n_digits=args.digits,
                        n_target=args.target, n_strokes=args.noise, seed=args.seed, mnist=args.mnist,
                        show_progress=not args.no_progress)
    bank, splits = load(data)
    with np.load(data) as raw:
        bank_labels = raw["bank_labels"]
        source = str(raw["source"]) if "source" in raw else "sklearn-digits"
    train, test = splits["train"], splits["test"]
    size = train.image_size
    low_size = max(8, round(size * args.scale))
    targets = {name: bank_labels[s.digits] == s.labels[:, None] for name, s in splits.items()}

    memory = PeakMemory()
    model = build_model(args, low_size).to(args.device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    history, start_epoch = [], 0
    checkpoint_path = args.out / "checkpoint.pt"
    if args.resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=args.device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, start_epoch = state["history"], state["epoch"]
        print(f"resumed from {checkpoint_path} after epoch {start_epoch}", flush=True)
    memory.reset()  # baseline: the model (and optimizer) built

    train_batches = loader(torch, Views(bank, train, low_size, high=args.model != "lowres"), args, True)
    test_batches = loader(torch, Views(bank, test, low_size, high=args.model != "lowres"), args, False)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    interactive = sys.stderr.isatty()
    for epoch in range(start_epoch, args.epochs):
        model.train()
        batches = train_batches
        batches.sampler.epoch = epoch
        steps = min(len(batches), args.max_steps) if args.max_steps else len(batches)
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step", disable=args.no_progress,
                   mininterval=0.5 if interactive else 30, dynamic_ncols=interactive)
        seen = correct = 0
        loss_sum = hits = target_hits = 0.0
        started = time.perf_counter()
        compute = 0.0
        for step, (low, high, labels, ids) in enumerate(batches):
            if step >= steps:
                break
            tick = time.perf_counter()
            low, high, labels = to_device(torch, args, low, high, labels)
            logits, attention, offsets = run_batch(model, args, low, high, mix(args.seed, 3, epoch, step))
            loss = torch.nn.functional.cross_entropy(logits, labels)
            objective = loss
            if attention is not None and args.entropy:
                objective = loss + args.entropy * torch.sum(attention * torch.log(attention + 1e-6)) / attention.shape[0]
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if args.clipnorm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clipnorm)
            optimizer.step()
            compute += time.perf_counter() - tick
            n = len(labels)
            seen += n
            loss_sum += loss.item() * n
            correct += int((logits.argmax(1) == labels).sum())
            postfix = {"loss": f"{loss_sum / seen:.3f}", "acc": f"{correct / seen:.3f}"}
            if offsets is not None:
                idx = ids.numpy()
                h, t = digit_hits(offsets.cpu().numpy(), train.positions[idx], targets["train"][idx], args.patch,
                                  train.digit_size)
                hits += h.sum()
                target_hits += t.sum()
                postfix["digit_patches"] = f"{hits / seen:.2f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
        bar.close()
        train_seconds = time.perf_counter() - started
        tick = time.perf_counter()
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_error": 1 - correct / seen,
                  "train_seconds": train_seconds, "train_compute_seconds": compute, "steps": steps}
        if args.model == "ats":
            record["train_digit_patches"] = hits / seen
            record["train_target_patches"] = target_hits / seen
            record["ink_prior"] = model.ink.item() if model.ink is not None else 0.0
        record.update(evaluate(torch, model, args, test_batches, test, targets["test"]))
        record["test_seconds"] = time.perf_counter() - tick
        record["peak_memory_mib"] = memory.above_mib
        if args.device.startswith("cuda"):
            record["peak_cuda_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        history.append(record)
        print(json.dumps(record), flush=True)
        save_checkpoint(torch, checkpoint_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                 "history": history, "epoch": epoch + 1, "config": config})
        summary = {
            "image_size": size,
            "low_size": low_size,
            "n_patches": args.n_patches if args.model == "ats" else None,
            "patch_size": args.patch if args.model == "ats" else None,
            "epochs": len(history),
            "test_error": [r["test_error"] for r in history],
            "seconds_per_epoch": [r["train_seconds"] for r in history],
            "seconds_per_step": [r["train_seconds"] / r["steps"] for r in history],
            "peak_memory_mib": max(r["peak_memory_mib"] for r in history),
            "device": device_name(torch, args.device),
            "framework": f"PyTorch {torch.__version__} (ats.torch)",
            "model": args.model,
            "data": {"file": str(data), "source": source,
                     "train": len(train.labels), "test": len(test.labels), "noise_strokes": int(train.strokes.shape[1]),
                     "digits": int(train.positions.shape[1]), "scale": args.scale},
            "config": config,
            "history": history,
        }
        (args.out / "history.json").write_text(json.dumps(summary, indent=1))
    memory.running = False


if __name__ == "__main__":
    main()
