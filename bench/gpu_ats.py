"""ATS versus dense on CUDA (PyTorch): one training step, eager and CUDA-graph replay, time and peak memory, batch
sizes 1, 8 and 32.

Each configuration runs in a fresh subprocess (``bench.torch_ats.measure``:
one warm-up step, then the median of synchronized steps; memory is
``torch.cuda.max_memory_allocated`` above what was allocated before). Needs
torch with CUDA; skipped with a note otherwise.

    python -m bench.gpu_ats [--quick]
"""

from __future__ import annotations

import sys

from . import _gpu, torch_ats
from ._timing import Table

NAME = "gpu_ats"
SIZES = (1500,)
QUICK_SIZES = (512,)
BATCHES = torch_ats.GPU_BATCHES
QUICK_BATCHES = (1, 8)
METHODS = ("ats", "ats-graph", "dense", "dense-graph")


def cases(quick: bool):
    return torch_ats.cases(quick, "cuda", QUICK_BATCHES if quick else BATCHES, METHODS, QUICK_SIZES if quick else SIZES)


def unavailable():
    reason = _gpu.unavailable()
    if reason is None and _gpu.torch_cuda() is None:
        reason = "torch with CUDA is not installed"
    return reason


def run(quick: bool = False, progress=None) -> Table:
    table = Table(NAME, "ATS versus dense on CUDA (PyTorch), one training step",
                  ["image", "B", "method", "ms / step", "ms / sample", "peak MiB", "fastest dense / ATS time",
                   "dense / ATS memory"])
    results = {}
    for case in cases(quick):
        results[(case["size"], case["batch"], case["method"])] = torch_ats._run_case(case)
        if progress is not None:
            progress.update(1)
    for (size, batch, method), r in results.items():
        dense = [results[(size, batch, m)] for m in ("dense", "dense-graph") if (size, batch, m) in results]
        fastest = min(dense, key=lambda d: d["seconds_per_sample"], default=None)
        memory = r["peak_mib_per_sample"] * batch
        ratios = ["", ""]
        if method.startswith("ats") and fastest is not None:
            ratios = [fastest["seconds_per_sample"] / r["seconds_per_sample"],
                      min(d["peak_mib_per_sample"] for d in dense) / max(r["peak_mib_per_sample"], 1e-9)]
        table.rows.append([f"{size}²", batch, method, 1e3 * r["seconds_per_sample"] * batch,
                           1e3 * r["seconds_per_sample"], memory] + ratios)
    table.notes.append(f"ATS: {torch_ats.N_PATCHES} patches of {torch_ats.PATCH}², attention on a "
                       f"{torch_ats.LOW_SCALE}-scale view; dense: the same feature network over the whole image; "
                       "inf = out of memory")
    table.notes.append("-graph: the whole step (forward, backward, SGD) captured once with torch.cuda.graph and "
                       "replayed (ATS through a device key: fresh patches every replay); its memory is what the "
                       "capture allocated. Ratios are against the faster dense method, memory against the smaller.")
    table.notes.append("goals (issue 10): ATS step >= 10x faster than dense at B=32 and >= 5x at B=8, >= 50x less memory")
    table.raw = {f"{s}/{b}/{m}": r for (s, b, m), r in results.items()}
    return table


if __name__ == "__main__":
    _gpu.script_main(sys.modules[__name__])
