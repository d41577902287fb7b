"""The main job: ``python -m bench [--quick] [--gpu] [--only NAME ...] [--json PATH] [--no-write]``.

Runs each benchmark side by side in one process, prints markdown tables and
writes ``bench/results/<machine>.md`` (unless ``--quick`` or ``--no-write``).
The GPU tables (``gpu_*``) run where CuPy sees a CUDA device; a benchmark
whose dependencies are missing (no GPU, no TensorFlow) is listed as skipped,
with the reason, and TensorFlow columns of the CPU tables become ``n/a``.
"""

from __future__ import annotations

import os

# Numba's OpenMP workers spin-waiting next to TensorFlow's threads cost milliseconds a call on 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import importlib
import json
import sys
from pathlib import Path

from ._timing import Table, machine_description

CPU_BENCHMARKS = ["sampling", "patches", "ats_dense", "host_path"]
GPU_BENCHMARKS = ["gpu_sampling", "gpu_patches", "gpu_ats"]
BENCHMARKS = CPU_BENCHMARKS + GPU_BENCHMARKS
OPTIONAL = ["xla", "slides"]  # run only when named with --only: xla (kernel vs ats.jax / ats.tf.xla); slides (needs atskern[slides,openslide,slides-bench] and torch)
RESULTS = Path(__file__).resolve().parent / "results"


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (under a minute)")
    parser.add_argument("--only", action="append", choices=BENCHMARKS + OPTIONAL, help="run only this benchmark (repeatable)")
    parser.add_argument("--gpu", action="store_true", help=f"run only the GPU benchmarks {GPU_BENCHMARKS}")
    parser.add_argument("--json", type=Path, help="also write all tables as JSON here")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/<machine>.md")
    parser.add_argument("--machine", help="name for the results file (default: the host name)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    tqdm = _progress_bar()

    names = args.only or (GPU_BENCHMARKS if args.gpu else BENCHMARKS)
    modules = [importlib.import_module(f"bench.{name}") for name in names]
    reasons = {module.NAME: _unavailable(module) for module in modules}
    total = sum(len(module.cases(args.quick)) for module in modules if reasons[module.NAME] is None)
    machine = machine_description(tensorflow=any(name in CPU_BENCHMARKS for name in names))
    if any(name in GPU_BENCHMARKS and reasons[name] is None for name in names):
        from ._gpu import device_description

        machine.update(device_description())
    tables = []
    with tqdm(total=total, desc="bench", unit="case", file=sys.stderr) as progress:
        for module in modules:
            if reasons[module.NAME] is not None:
                tables.append(Table(module.NAME, module.__doc__.splitlines()[0].rstrip("."), [],
                                    skipped=reasons[module.NAME]))
                continue
            progress.set_postfix_str(module.NAME)
            result = module.run(quick=args.quick, progress=progress)
            tables.extend(result if isinstance(result, (list, tuple)) else [result])
    header = "\n".join(f"- {key}: {value}" for key, value in machine.items())
    report = f"# atskern benchmarks{' (quick)' if args.quick else ''}\n\n{header}\n\n" + "\n".join(t.markdown() for t in tables)
    print(report)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "tables": [t.as_dict() for t in tables]}, indent=1))
    if not (args.quick or args.no_write):
        RESULTS.mkdir(exist_ok=True)
        stem = args.machine or machine["machine"]
        if set(names) <= set(OPTIONAL):  # optional benchmarks get their own file, not the main table's
            stem += "-" + "-".join(names)
        path = RESULTS / f"{stem}.md"
        for table in tables:
            if table.name == "ats_dense" and table.raw:
                from .plot import plot_ats_dense

                plot = plot_ats_dense(table.raw, RESULTS / f"{stem}-ats-vs-dense.png")
                report += f"\n![ATS versus dense]({plot.name})\n"
        path.write_text(report)
        print(f"written: {path}", file=sys.stderr)
    return 0


def _progress_bar():
    """tqdm, or a silent stand-in where it is not installed (the GPU machines have no tqdm)."""
    try:
        from tqdm import tqdm

        return tqdm
    except ImportError:
        class Silent:
            def __init__(self, *args, **kwargs):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def update(self, n=1):
                pass

            def set_postfix_str(self, text):
                pass

        return Silent


def _unavailable(module) -> str | None:
    """Why ``module`` cannot run here (its ``unavailable()``), or None."""
    check = getattr(module, "unavailable", None)
    return check() if check is not None else None


if __name__ == "__main__":
    sys.exit(main())
