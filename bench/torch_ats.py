"""PyTorch: one training step of attention sampling versus the alternatives, time and peak memory per sample.

Methods (the same feature network in all three: conv 7x7x32 / 2, three conv
3x3x32 / 2, ReLUs, global max pool, linear; channels-first images):

- ``ats``: ``ats.torch.AttentionSampling`` -- attention network on a
  ``LOW_SCALE`` view, ``N_PATCHES`` patches of ``PATCH``^2 gathered by atskern's
  kernels;
- ``ats-loop``: the same model, but the gather is a per-patch Python loop of
  tensor slices (padded at the borders), the way one writes it by hand; its
  gradient is torch's slice backward, one image-sized gradient per patch;
- ``dense``: the feature network run fully convolutionally over the whole image;
- ``ats+grad`` and ``ats-loop+grad``: as ``ats`` and ``ats-loop`` when the
  image itself needs a gradient (a learned pre-processing, an adversarial
  input), so the gather's backward runs: ``scatter_patches`` for the kernels,
  one image-sized slice gradient per patch for the loop.

Every configuration runs in a fresh subprocess and takes one warm-up step
(JIT compilation) before it is measured. Peak memory is the peak resident
memory during the timed steps above the resident memory before them (CPU,
sampled every millisecond), or ``torch.cuda.max_memory_allocated`` above what
was allocated before (CUDA). On the CPU the subprocess runs with a fixed
glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``), so that freed tensors leave
the resident set and the peak follows the live memory.
Time is the median over the timed steps (synchronized on CUDA).

``python -m bench.torch_ats [--quick] [--device cuda] [--batch 8 --batch 32] [--methods ats,dense]`` prints a
markdown table (the main job's CUDA table is ``bench.gpu_ats``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1500, 4096)
QUICK_SIZES = (256, 512)
METHODS = ("ats", "ats-loop", "dense", "ats+grad", "ats-loop+grad")
"""``+grad``: the image itself needs a gradient (e.g. a learned pre-processing), so the gather's backward runs."""
GRAPH_METHODS = ("ats-graph", "dense-graph")
"""CUDA only: the whole training step (forward, backward, SGD step) captured once with ``torch.cuda.graph`` and
replayed; ATS draws through a device key, so every replay samples fresh patches."""
BATCH = 1
GPU_BATCHES = (1, 8, 32)
N_PATCHES = 10
PATCH = 50
LOW_SCALE = 0.12


def cases(quick: bool, device: str = "cpu", batches=(BATCH,), methods=METHODS, sizes=None):
    sizes = sizes or (QUICK_SIZES if quick else SIZES)
    steps = (2 if quick else 3) if device == "cpu" else (5 if quick else 10)
    return [{"method": m, "size": s, "batch": b, "device": device, "steps": steps}
            for s in sizes for b in batches for m in methods]


# --- the models ---------------------------------------------------------------------------------


def _feature_network(torch):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 32, 7, stride=2), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def _loop_extract(torch, x, offsets, size):
    """Patches by slicing, one patch at a time (zero outside the image)."""
    height, width = x.shape[2:]
    batches = []
    for b in range(x.shape[0]):
        patches = []
        for i, j in offsets[b].tolist():
            top, left = max(i, 0), max(j, 0)
            bottom, right = min(i + size, height), min(j + size, width)
            part = x[b, :, top:bottom, left:right]
            pad = (left - j, j + size - right, top - i, i + size - bottom)
            patches.append(torch.nn.functional.pad(part, pad) if any(pad) else part)
        batches.append(torch.stack(patches))
    return torch.stack(batches)


def _model(torch, method: str):
    import ats.torch as at
    from ats.torch import functional as F

    nn = torch.nn
    method = method.removesuffix("+grad").removesuffix("-graph")
    feature = _feature_network(torch)
    if method == "dense":
        return lambda low, x: feature(x), feature
    attention = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1),
                              at.SampleSoftmax(squeeze_channels=True))
    model = at.AttentionSampling(attention, feature, patch_size=PATCH, n_patches=N_PATCHES)
    if method == "ats-loop":
        def loop_extract(x, offsets, patch_size, *, fill=0, channels_first=True):
            return _loop_extract(torch, x, offsets, patch_size[0])

        # the module resolves F.extract_patches at call time: swap in the loop for this process
        F.extract_patches = loop_extract
    return model_forward(model), model


def model_forward(model):
    def forward(low, x):
        return model(low, x)[0]

    return forward


# --- one configuration, in its own process ------------------------------------------------------


class _PeakRSS:
    """Samples this process's resident memory (``/proc/self/statm``) every millisecond in a thread."""

    def __init__(self):
        import threading

        self._page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.current()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def current(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.current())
            time.sleep(0.001)

    def reset(self) -> int:
        self.peak = self.current()
        return self.peak

    def stop(self) -> int:
        self._stop = True
        self._thread.join()
        return max(self.peak, self.current())


def measure(case: dict) -> dict:
    """Time and peak memory of one training step of ``case`` (run it in a fresh process)."""
    import torch

    torch.manual_seed(0)
    device = torch.device(case["device"])
    size, batch = case["size"], case["batch"]
    graphed = case["method"].endswith("-graph")
    forward, module = _model(torch, case["method"])
    module.to(device)
    if graphed and hasattr(module, "sample_patches"):
        import ats.torch as at

        module.sample_patches.set_device_key(at.device_key(0, device))
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)
    x = torch.rand(batch, 1, size, size, device=device, requires_grad=case["method"].endswith("+grad"))
    low = torch.nn.functional.interpolate(x.detach(), scale_factor=LOW_SCALE, mode="area")
    y = torch.randint(0, 10, (batch,), device=device)
    cuda = device.type == "cuda"

    def step():
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        loss = torch.nn.functional.cross_entropy(forward(low, x), y)
        loss.backward()
        optimizer.step()

    if graphed:
        step = _captured(torch, step, optimizer)
    else:
        step()  # warm-up: JIT compilation, allocator pools
    optimizer.zero_grad(set_to_none=True)
    x.grad = None  # the warm-up's gradients are not part of the baseline
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        rss = _PeakRSS()
        base = rss.reset()
    times = []
    for _ in range(case["steps"]):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if cuda else rss.stop()) - base
    if graphed:
        peak = step.peak
    return {**case, "seconds_per_sample": statistics.median(times) / batch,
            "peak_mib_per_sample": max(peak, 0) / batch / 2**20, "threads": torch.get_num_threads()}


def _captured(torch, step, optimizer):
    """``step`` captured in a CUDA graph (after warm-up steps on a side stream, as torch's documentation does):
    a callable that replays it, with ``.peak``, the bytes the capture allocated above what was live before
    (the graph's private pool: every activation and gradient of the step).

    The capture runs on the warm-up's stream: the per-stream workspaces libraries keep (cuBLAS makes one per
    handle and stream) then exist before it, as they exist before the eager step's measurement, and neither
    counts them. Captured on another stream (torch's default capture stream), the step made new ones inside the
    capture: a fixed 65 MiB on the H200, at every batch size and for the dense network alike
    (``bench/results/gpu-nvidia-h200-30bbccd.md``)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        step()
    torch.cuda.synchronize()

    def replay():
        graph.replay()

    replay.peak = torch.cuda.max_memory_allocated() - before
    return replay


def _run_case(case: dict) -> dict:
    # a fixed mmap threshold: glibc returns every large block to the OS when it is freed, so resident
    # memory follows the live tensors instead of the heap's high-water mark
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "adapters"), os.environ.get("PYTHONPATH", "")])}
    code = f"import json, bench.torch_ats as b; print(json.dumps(b.measure({json.dumps(case)!s})))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        out_of_memory = "out of memory" in result.stderr.lower() or result.returncode in (-9, 137)
        if out_of_memory:
            return {**case, "seconds_per_sample": float("inf"), "peak_mib_per_sample": float("inf")}
        raise RuntimeError(f"{case} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(quick: bool, device: str = "cpu", batches=(BATCH,), methods=METHODS, sizes=None) -> list[dict]:
    """Measure every configuration (each in a fresh subprocess); one dict per configuration."""
    return [_run_case(case) for case in cases(quick, device, batches, methods, sizes)]


def markdown(rows: list[dict]) -> str:
    """A table per image size, with each method's time and memory relative to ATS with the kernels."""
    lines = ["| image | batch | method | s / sample | x ats | peak MiB / sample | x ats |", "|---|---|---|---|---|---|---|"]
    for size, batch in sorted({(r["size"], r["batch"]) for r in rows}):
        group = [r for r in rows if r["size"] == size and r["batch"] == batch]
        ats = next((r for r in group if r["method"] == "ats"), group[0])
        for r in group:
            lines.append(
                f"| {size}^2 | {batch} | {r['method']} | {r['seconds_per_sample']:.3g} | "
                f"{r['seconds_per_sample'] / ats['seconds_per_sample']:.2g} | {r['peak_mib_per_sample']:.4g} | "
                f"{r['peak_mib_per_sample'] / max(ats['peak_mib_per_sample'], 1e-9):.2g} |"
            )
    first = rows[0]
    lines.append("")
    lines.append(f"- device {first['device']}, {N_PATCHES} patches of {PATCH}^2, "
                 f"attention on a {LOW_SCALE} view, torch threads {first.get('threads')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.torch_ats", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"images of {QUICK_SIZES} instead of {SIZES}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, action="append", help=f"batch size (repeatable; default {BATCH})")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {METHODS + GRAPH_METHODS} (the -graph ones on CUDA only)")
    args = parser.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = set(methods) - set(METHODS + GRAPH_METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS + GRAPH_METHODS}")
    print(markdown(run(args.quick, args.device, tuple(args.batch or (BATCH,)), methods)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
