"""One GPU session in under 6 minutes: the GPU tests, a compute-sanitizer memcheck run, the GPU benchmarks.

    PYTHONPATH=.:adapters python3 -m bench.gpu_session [--machine NAME] [--budget SECONDS]

Steps, each in its own subprocess with a time limit carved from the budget
(default 330 s), so a hang or a crash costs one step, not the session:

1. ``pytest -m gpu`` (every CUDA test: kernels against the CPU, ats.torch on CUDA);
2. ``compute-sanitizer --tool memcheck python -m bench.gpu_smoke`` (gathers, scatters, samples with CuPy's pool
   off, so out-of-bounds accesses are caught at the byte);
3. the GPU benchmarks (``python -m bench --only gpu_patches`` / ``gpu_sampling`` / ``gpu_ats``), in quick mode
   when little time is left.

Writes ``bench/results/<machine>.md`` (default: ``gpu-`` and the device name) with the device, the versions,
the test and sanitizer summaries and the tables; exits 1 when a test, the sanitizer or a benchmark failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BENCHMARKS = [("gpu_patches", 60, 25), ("gpu_sampling", 50, 20), ("gpu_ats", 80, 35)]
"""(name, seconds for the full run, seconds for --quick): the estimates that decide full or quick."""
TEST_SECONDS = 150
SANITIZER_SECONDS = 70


def _env() -> dict:
    paths = [str(ROOT), str(ROOT / "adapters"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), OMP_WAIT_POLICY="PASSIVE")


def run_step(command: list[str], timeout: float) -> dict:
    """Run ``command`` with a time limit; its exit status, seconds, and output (partial when it timed out)."""
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=max(1.0, timeout))
        rc, out, err, timed_out = done.returncode, done.stdout, done.stderr, False
    except subprocess.TimeoutExpired as expired:
        decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        rc, out, err, timed_out = None, decode(expired.stdout), decode(expired.stderr), True
    return {"command": " ".join(command), "rc": rc, "stdout": out, "stderr": err, "timed_out": timed_out,
            "seconds": time.monotonic() - start}


def pytest_summary(output: str) -> str:
    """The final ``N passed, M failed ...`` line of a pytest run, and its FAILED/ERROR lines."""
    lines = output.strip().splitlines()
    summary = [line.strip(" =") for line in lines
               if re.search(r"\b\d+ (passed|failed|errors?|skipped|deselected)\b|no tests ran", line)]
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return "\n".join(failures + summary[-1:])


def sanitizer_summary(output: str) -> str:
    found = [line.strip() for line in output.splitlines() if "ERROR SUMMARY" in line or "gpu smoke" in line]
    return "\n".join(found) or "(no summary line)"


def _device_name() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown-gpu"
    done = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return (done.stdout.strip().splitlines() or ["unknown-gpu"])[0]


def machine_stem(device: str) -> str:
    """``gpu-nvidia-h100-80gb-hbm3`` from a device name: lower case, runs of other characters as one dash."""
    return "gpu-" + re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def _sanitizer() -> str | None:
    return shutil.which("compute-sanitizer") or next(
        (str(p) for p in sorted(Path("/usr/local").glob("cuda*/bin/compute-sanitizer")) if p.exists()), None)


def _fence(text: str, limit: int = 4000) -> str:
    text = text.strip()
    return "```\n" + (text[-limit:] if len(text) > limit else text) + "\n```"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_session", description=__doc__.splitlines()[0])
    parser.add_argument("--machine", help="results file stem (default: gpu- and the device name)")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for the whole session (default 330)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"folder of the report (default {RESULTS})")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget
    left = lambda: deadline - time.monotonic()  # noqa: E731
    device = _device_name()
    stem = args.machine or machine_stem(device)
    sections, ok = [], True
    bench_reserve = sum(quick for _, _, quick in BENCHMARKS)

    if not args.skip_tests:
        step = run_step([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfE"],
                        min(TEST_SECONDS, left() - SANITIZER_SECONDS - bench_reserve))
        ok &= step["rc"] == 0
        status = "timed out" if step["timed_out"] else f"exit {step['rc']}"
        sections.append(f"## GPU tests (`pytest -m gpu`, {status}, {step['seconds']:.0f} s)\n\n"
                        + _fence(pytest_summary(step["stdout"]) or step["stdout"][-2000:] + step["stderr"][-2000:]))
        print(sections[-1], file=sys.stderr)

    sanitizer = _sanitizer()
    if sanitizer is None:
        sections.append("## compute-sanitizer memcheck\n\n- skipped: compute-sanitizer not found")
    else:
        step = run_step([sanitizer, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-m", "bench.gpu_smoke"],
                        min(SANITIZER_SECONDS, left() - bench_reserve))
        ok &= step["rc"] == 0
        status = "timed out" if step["timed_out"] else f"exit {step['rc']}"
        text = sanitizer_summary(step["stdout"] + step["stderr"])
        if step["rc"] not in (0, None):
            text += "\n" + (step["stdout"] + step["stderr"])[-3000:]
        sections.append(f"## compute-sanitizer memcheck (`python -m bench.gpu_smoke`, {status}, "
                        f"{step['seconds']:.0f} s)\n\n" + _fence(text))
        print(sections[-1], file=sys.stderr)

    machine = {}
    for i, (name, full, quick) in enumerate(BENCHMARKS):
        later = sum(q for _, _, q in BENCHMARKS[i + 1:])
        budget = left() - later
        if budget < quick:
            sections.append(f"### {name}\n\n- skipped: out of session time")
            ok = False
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "tables.json"
            command = [sys.executable, "-m", "bench", "--only", name, "--no-write", "--json", str(out)]
            if budget < full:
                command.append("--quick")
            step = run_step(command, budget)
            if step["rc"] == 0 and out.exists():
                report = json.loads(out.read_text())
                machine = report["machine"]
                from ._timing import Table

                for table in report["tables"]:
                    raw = {k: table[k] for k in ("name", "title", "columns", "rows", "notes", "raw", "skipped")}
                    sections.append(Table(**raw).markdown() + ("\n- (quick mode: little session time left)\n"
                                                               if "--quick" in command else ""))
            else:
                ok = False
                status = "timed out" if step["timed_out"] else f"exit {step['rc']}"
                sections.append(f"### {name}\n\n- failed ({status}):\n\n" + _fence(step["stderr"][-3000:]))
        print(sections[-1], file=sys.stderr)

    header = "\n".join(f"- {key}: {value}" for key, value in machine.items()) or f"- gpu: {device}"
    report = (f"# atskern GPU session on {device}\n\n{header}\n\n"
              "Written by `python -m bench.gpu_session` (GPU tests, compute-sanitizer memcheck, GPU benchmarks).\n\n"
              + "\n\n".join(sections) + "\n")
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{stem}.md"
    path.write_text(report)
    print(report)
    print(f"written: {path} ({args.budget - left():.0f} s)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
