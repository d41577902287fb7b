"""Cold-start compile time of the sampling kernels: what a first GPU call compiles, per module variant.

CuPy compiles ``atskern/gpu/sampling.cu`` at a call's first use of a compile-option set (then caches the binary on
disk). A call compiles only the module of its kernels' group (``atskern.gpu.sampling.kernel_group``: one dtype's
kernels, ``select_rows`` apart), not every kernel of the file. This times ``nvcc -cubin -arch=sm_90`` (front end,
NVVM and ptxas: the work NVRTC does for CuPy) for the whole file and for each group, with the default options;
it needs nvcc, not a GPU.

    python -m bench.compile_time [--repeats N]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GROUPS = [(0, "every kernel (the file as a whole)"), (1, "float32 (group 1)"), (2, "float64 (group 2)"),
          (3, "select_rows_f32 (group 3, FUSED_FINISH only)"), (4, "select_rows_f64 (group 4, FUSED_FINISH only)"),
          (5, "sample_rows_f32 (group 5, whole rows)"), (6, "sample_rows_f64 (group 6, whole rows)"),
          (7, "sample_cluster_rows_f32 (group 7, ROW_CLUSTER only)"),
          (8, "sample_cluster_rows_f64 (group 8, ROW_CLUSTER only)")]


def compile_seconds(source: Path, options: tuple[str, ...], group: int, out: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "--std=c++17", "-ftz=true", *options,
                             f"-DATS_GROUP={group}", str(source), "-o", str(out)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return time.perf_counter() - start


def table(repeats: int = 1) -> str:
    from atskern.gpu import sampling
    from atskern.gpu._module import source

    options = sampling.compile_options(256)
    lines = ["| module | nvcc -cubin seconds (median) | / whole file |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        inlined = Path(tmp) / "sampling.cu"
        inlined.write_text(source(sampling.SOURCE))
        seconds = {}
        for group, label in GROUPS:
            runs = sorted(compile_seconds(inlined, options, group, Path(tmp) / f"g{group}.cubin")
                          for _ in range(repeats))
            seconds[group] = runs[len(runs) // 2]
            lines.append(f"| {label} | {seconds[group]:.1f} | {seconds[group] / seconds[0]:.2f} |")
    lines.append("")
    lines.append(f"- options: {' '.join(options)} -ftz=true (CuPy's); a float32 call without replacement compiles "
                 "group 1 only")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_time", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    if shutil.which("nvcc") is None:
        print("skipped: nvcc not on PATH")
        return 0
    print("### Compile time of sampling.cu per module (nvcc, sm_90)\n\n" + table(args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
