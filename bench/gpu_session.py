"""One GPU session in about 7 minutes: the GPU tests, compute-sanitizer runs, the GPU benchmarks, a tuning probe.

    PYTHONPATH=.:adapters python3 -m bench.gpu_session [--machine NAME] [--budget SECONDS] [--logs DIR]

Steps, each in its own subprocess with a time limit carved from the budget
(default 420 s), so a hang or a crash costs one step, not the session:

1. at the same time (they need the CPUs more than the GPU): ``pytest -m gpu`` over the test files that hold GPU
   cases (pytest-xdist workers where it is installed), ``compute-sanitizer --tool memcheck python -m
   bench.gpu_smoke`` (gathers, scatters, samples and ``validate=False`` on bad rows with CuPy's pool off, so
   out-of-bounds accesses are caught at the byte) and ``--tool racecheck`` on the same workout (shared-memory
   hazards of the block scans, sorts and staged patch boxes);
2. one after another, alone on the GPU: the GPU benchmarks (``python -m bench --only gpu_patches`` /
   ``gpu_sampling`` / ``gpu_ats``), in quick mode when little time is left, then ``python -m bench.gpu_tuning``
   (each sampling kernel's GPU time, the two finishes compared, where a sampling call's time goes, and Nsight
   Compute on the streaming kernels where ``ncu`` is installed).

Writes ``bench/results/<machine>.md`` (default: ``gpu-`` and the device name) with the device, the versions,
the test and sanitizer summaries and the tables, rewritten after every step (a session cut short keeps what
ran); ``--logs DIR`` also keeps each step's whole output. Exits 1 when a test, the sanitizer or a benchmark
failed.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BENCHMARKS = [("gpu_sampling", 40, 20), ("gpu_patches", 40, 20), ("gpu_ats", 130, 40)]
"""(name, seconds for the full run, seconds for --quick): the estimates that decide full or quick."""
TEST_FILES = ["test_gpu_sampling.py", "test_torch_gpu.py", "test_patches.py", "test_patches_layouts.py",
              "test_sampling.py", "test_sampling_edges.py", "test_estimator.py", "test_patch_offsets_exact.py",
              "test_ats_bridge.py", "test_distributed_torch.py"]
"""The files that hold GPU cases and import neither TensorFlow nor Keras at collection (the GPU machines have
neither); ``test_gpu_session_test_files_cover_every_gpu_case`` keeps the list complete."""
TEST_SECONDS = 230
"""The GPU tests took 153 s on 10 pytest-xdist workers alone on an H100 machine (16 cores), the slowest test 83 s
(each compile option set is one NVRTC compile of sampling.cu per worker); 140 s with the sanitizers beside them
timed out there."""
SANITIZER_SECONDS = 150
TUNING_SECONDS = (140, 15)
TUNING_PARTS = ["--only", "breakdown", "--only", "cluster", "--only", "whole", "--only", "where", "--only", "ncu"]
"""The tuning step: each kernel's GPU time, the clusters of blocks a row (ROW_CLUSTER, never run on a GPU yet)
against one block and the chunked launches, where a sampling call's time goes (a validated call's steps one by one),
then Nsight Compute on the streaming kernels (skipped without ncu; in quick mode only the breakdown runs). The
finish and status parts (FUSED_FINISH, MAPPED_STATUS) ran on the H200 and chose their knobs
(``bench/results/gpu-nvidia-h200-30bbccd.md``); the configurations part ran on 05a75fa
(``bench/results/gpu-nvidia-h200-onepass.md``)."""


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
    found = [line.strip() for line in output.splitlines()
             if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line or "gpu smoke" in line]
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


def _workers() -> list[str]:
    """pytest-xdist workers and a per-test time limit, where those plugins are installed."""
    import importlib.util

    options = []
    if importlib.util.find_spec("xdist") is not None:
        options += ["-n", str(max(1, min(12, (os.cpu_count() or 2) - 4)))]
    if importlib.util.find_spec("pytest_timeout") is not None:
        options += ["--timeout", "200"]
    return options


def _status(step) -> str:
    return "timed out" if step["timed_out"] else f"exit {step['rc']}"


def _keep_log(logs: Path | None, name: str, step: dict) -> None:
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{name}.log").write_text(f"$ {step['command']}\n# {_status(step)}, {step['seconds']:.0f} s\n"
                                          + step["stdout"] + "\n--- stderr ---\n" + step["stderr"])


def test_command() -> list[str]:
    files = [str(Path("tests") / name) for name in TEST_FILES]
    return [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfE", *_workers(), *files]


def sanitizer_commands(sanitizer: str) -> dict:
    smoke = [sys.executable, "-m", "bench.gpu_smoke"]
    return {"memcheck": [sanitizer, "--tool", "memcheck", "--error-exitcode", "3", *smoke],
            "racecheck": [sanitizer, "--tool", "racecheck", "--error-exitcode", "3", *smoke]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_session", description=__doc__.splitlines()[0])
    parser.add_argument("--machine", help="results file stem (default: gpu- and the device name)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole session (default 420)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    parser.add_argument("--skip-tuning", action="store_true", help="no bench.gpu_tuning step")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"folder of the report (default {RESULTS})")
    parser.add_argument("--logs", type=Path, help="also write each step's whole output here (<step>.log)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget
    left = lambda: deadline - time.monotonic()  # noqa: E731
    device = _device_name()
    stem = args.machine or machine_stem(device)
    sections, ok, machine = [], True, {}
    bench_reserve = sum(quick for _, _, quick in BENCHMARKS) + (0 if args.skip_tuning else TUNING_SECONDS[1])
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{stem}.md"

    def write_report():
        header = "\n".join(f"- {key}: {value}" for key, value in machine.items()) or f"- gpu: {device}"
        text = (f"# atskern GPU session on {device}\n\n{header}\n\n"
                "Written by `python -m bench.gpu_session` (GPU tests, compute-sanitizer, GPU benchmarks, tuning "
                "probe).\n\n" + "\n\n".join(sections) + "\n")
        path.write_text(text)
        return text

    def add(section):
        sections.append(section)
        print(section, file=sys.stderr, flush=True)
        write_report()

    sanitizer = _sanitizer()
    parallel = {}
    if not args.skip_tests:
        parallel["tests"] = (test_command(), min(TEST_SECONDS, left() - bench_reserve))
    if sanitizer is not None:
        for name, command in sanitizer_commands(sanitizer).items():
            parallel[name] = (command, min(SANITIZER_SECONDS, left() - bench_reserve))
    with ThreadPoolExecutor(max_workers=max(1, len(parallel))) as pool:
        futures = {name: pool.submit(run_step, command, timeout) for name, (command, timeout) in parallel.items()}
        done = {name: future.result() for name, future in futures.items()}
    for name, step in done.items():
        _keep_log(args.logs, name, step)
        ok &= step["rc"] == 0
    if "tests" in done:
        step = done["tests"]
        add(f"## GPU tests (`pytest -m gpu` over {len(TEST_FILES)} files, {_status(step)}, {step['seconds']:.0f} s)"
            "\n\n" + _fence(pytest_summary(step["stdout"]) or step["stdout"][-2000:] + step["stderr"][-2000:]))
    if sanitizer is None:
        add("## compute-sanitizer memcheck and racecheck\n\n- skipped: compute-sanitizer not found")
    for name in ("memcheck", "racecheck"):
        if name in done:
            step = done[name]
            text = sanitizer_summary(step["stdout"] + step["stderr"])
            if step["rc"] not in (0, None):
                text += "\n" + (step["stdout"] + step["stderr"])[-3000:]
            smoke = "python -m bench.gpu_smoke"
            add(f"## compute-sanitizer {name} (`{smoke}`, {_status(step)}, {step['seconds']:.0f} s)\n\n"
                + _fence(text))

    tuning_reserve = 0 if args.skip_tuning else TUNING_SECONDS[1]
    for i, (name, full, quick) in enumerate(BENCHMARKS):
        later = sum(q for _, _, q in BENCHMARKS[i + 1:]) + tuning_reserve
        budget = left() - later
        if budget < quick:
            add(f"### {name}\n\n- skipped: out of session time")
            ok = False
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "tables.json"
            command = [sys.executable, "-m", "bench", "--only", name, "--no-write", "--json", str(out)]
            if budget < full:
                command.append("--quick")
            step = run_step(command, budget)
            _keep_log(args.logs, name, step)
            if step["rc"] == 0 and out.exists():
                report = json.loads(out.read_text())
                machine = report["machine"]
                from ._timing import Table

                for table in report["tables"]:
                    raw = {k: table[k] for k in ("name", "title", "columns", "rows", "notes", "raw", "skipped")}
                    add(Table(**raw).markdown() + ("\n- (quick mode: little session time left)\n"
                                                   if "--quick" in command else ""))
            else:
                ok = False
                add(f"### {name}\n\n- failed ({_status(step)}):\n\n" + _fence(step["stderr"][-3000:]))

    if not args.skip_tuning:
        full, quick = TUNING_SECONDS
        if left() < quick:
            add("## Tuning probe\n\n- skipped: out of session time")
        else:
            parts = TUNING_PARTS if left() >= full else ["--only", "breakdown", "--quick"]
            command = [sys.executable, "-m", "bench.gpu_tuning", *parts]
            step = run_step(command, left())
            _keep_log(args.logs, "tuning", step)
            ok &= step["rc"] == 0
            add(f"## Tuning probe (`python -m bench.gpu_tuning`, {_status(step)}, {step['seconds']:.0f} s)\n\n"
                + step["stdout"].strip() + ("" if step["rc"] == 0 else "\n\n" + _fence(step["stderr"][-3000:])))

    print(write_report())
    print(f"written: {path} ({args.budget - left():.0f} s)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
