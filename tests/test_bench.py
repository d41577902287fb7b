"""The main job's quick mode runs end to end and writes well-formed tables."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_quick_is_well_formed(tmp_path):
    pytest.importorskip("tensorflow")
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters")]))
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--no-write", "--json", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "### Sampling without replacement" in result.stdout
    report = json.loads(out.read_text())
    assert {t["name"] for t in report["tables"]} == {"sampling", "sampling_fixed_cost", "patches", "ats_dense",
                                                     "host_path", "gpu_sampling", "gpu_patches", "gpu_ats"}
    assert report["machine"]["numpy"] and report["machine"]["cores"] >= 1
    for table in report["tables"]:
        if table["skipped"]:
            assert table["name"].startswith("gpu_") and not table["rows"]
            continue
        assert table["rows"], f"{table['name']} has no rows"
        for row in table["rows"]:
            assert len(row) == len(table["columns"]), (table["name"], row)
            assert "error" not in [str(cell) for cell in row], (table["name"], row)
    sampling = next(t for t in report["tables"] if t["name"] == "sampling")
    for row in sampling["rows"]:
        assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in row[3:])
    host = next(t for t in report["tables"] if t["name"] == "host_path")
    assert [row[0] for row in host["rows"]] == ["atskern.sample", "atskern.extract_patches", "atskern.scatter_patches"]
    columns = {"atskern.sample": (2, 3, 4, 6), "atskern.extract_patches": (2, 5, 6), "atskern.scatter_patches": (2, 5, 6)}
    for row in host["rows"]:
        assert all(isinstance(row[i], float) and row[i] > 0 for i in columns[row[0]]), row
        assert all(row[i] == "" for i in range(2, len(row)) if i not in columns[row[0]]), row
    ats_rows = [row for row in next(t for t in report["tables"] if t["name"] == "ats_dense")["rows"]]
    assert any(str(row[2]).startswith("ATS") and isinstance(row[3], float) for row in ats_rows)
    assert any(row[2] == "dense" and isinstance(row[3], float) for row in ats_rows)


BLOCK_TENSORFLOW = """
import sys
sys.modules["tensorflow"] = None  # as on the GPU machines: no TensorFlow, no Keras
sys.modules["keras"] = None
sys.modules["tqdm"] = None  # nor tqdm
from bench.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_bench_without_tensorflow_degrades_cleanly(tmp_path):
    """No TensorFlow (and here no GPU): TF columns become n/a with a note, Keras-only and GPU tables are skipped."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters")]))
    args = ["--quick", "--no-write", "--json", str(out), "--only", "sampling", "--only", "ats_dense", "--only", "gpu_patches"]
    result = subprocess.run([sys.executable, "-c", BLOCK_TENSORFLOW] + args, cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    tables = {t["name"]: t for t in json.loads(out.read_text())["tables"]}
    sampling = tables["sampling"]
    assert sampling["rows"] and not sampling["skipped"]
    assert all(row[sampling["columns"].index("TF Gumbel-top-k")] == "n/a" for row in sampling["rows"])
    assert any("TensorFlow is not installed" in note for note in sampling["notes"])
    assert "TensorFlow/Keras is not installed" in tables["ats_dense"]["skipped"]
    if tables["gpu_patches"]["skipped"]:
        assert "skipped:" in result.stdout


def test_gpu_session_helpers():
    from bench import gpu_session as gs

    assert gs.machine_stem("NVIDIA H100 80GB HBM3") == "gpu-nvidia-h100-80gb-hbm3"
    output = "..F.\nFAILED tests/test_x.py::test_y - AssertionError\n1 failed, 3 passed, 2 skipped in 4.20s\n"
    assert gs.pytest_summary(output) == "FAILED tests/test_x.py::test_y - AssertionError\n1 failed, 3 passed, 2 skipped in 4.20s"
    assert gs.sanitizer_summary("gpu smoke: all results equal\n========= ERROR SUMMARY: 0 errors\n").endswith("0 errors")
    racecheck = "gpu smoke: ok\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
    assert gs.sanitizer_summary(racecheck).endswith("(0 errors, 0 warnings)")
    step = gs.run_step([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"], 2)
    assert step["timed_out"] and step["rc"] is None and step["seconds"] < 20


def test_gpu_session_test_files_cover_every_gpu_case():
    """The session's pytest runs an explicit file list (the GPU machines have no TensorFlow/Keras, whose test files
    would not import there): every other file with GPU cases must be on it."""
    import re

    from bench import gpu_session as gs

    marked = re.compile(r"mark\.gpu|HAS_GPU|def test_\w*\(.*\bbackend\b")
    with_gpu = {p.name for p in (ROOT / "tests").glob("test_*.py") if marked.search(p.read_text())} - {"test_bench.py"}
    assert with_gpu - set(gs.TEST_FILES) == {"test_keras_backends.py", "test_keras_slides_backends.py"}
    assert all((ROOT / "tests" / name).exists() for name in gs.TEST_FILES)


@pytest.mark.slow
def test_gpu_session_runs_without_a_gpu(tmp_path):
    """Here (no GPU): the session still completes, reports what it skipped and writes its file."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters")]))
    result = subprocess.run([sys.executable, "-m", "bench.gpu_session", "--machine", "here", "--results", str(tmp_path),
                             "--budget", "300", "--skip-tests"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    report = (tmp_path / "here.md").read_text()
    assert "compute-sanitizer memcheck" in report and "GPU patch gather and scatter" in report
    assert "skipped" in report
    assert result.returncode in (0, 1), result.stderr[-3000:]


def test_ncu_profile_command_and_skip(tmp_path, monkeypatch):
    """``bench.gpu_tuning --only ncu``: skipped without Nsight Compute; with it, the streaming kernels of one call
    are profiled in the sections that say how near the bandwidth they are (a stand-in ncu echoes its arguments)."""
    from bench import gpu_tuning

    monkeypatch.setattr(gpu_tuning, "_ncu", lambda: None)
    assert "skipped" in gpu_tuning.ncu_profile()
    fake = tmp_path / "ncu"
    fake.write_text(f"#!{sys.executable}\nimport sys\nprint('==PROF== connected')\nprint(' '.join(sys.argv[1:]))\n")
    fake.chmod(0o755)
    monkeypatch.setattr(gpu_tuning, "_ncu", lambda: str(fake))
    report = gpu_tuning.ncu_profile()
    assert "exit 0" in report and "==PROF==" not in report
    for part in ("chunk_stats|chunk_topn|finish_rows", "--launch-skip 6", "SpeedOfLight", "WarpStateStats",
                 "atskern.sample(x, 100"):
        assert part in report, part


def test_host_path_stand_in_runs_the_gpu_calls_and_is_put_back():
    """``bench.host_path``'s stand-in CuPy runs the GPU front ends end to end (shapes and dtypes of the results),
    and whatever CuPy module and kernel handles were there before come back after the block."""
    import numpy as np

    import atskern
    from atskern import _backend
    from atskern.gpu import patches, sampling
    from bench import _stand_in_cupy

    before = (_backend._cupy, sampling._handle, sampling._multiprocessors, patches._handle)
    with _stand_in_cupy.installed() as cp:
        attention = cp.ndarray((2, 16, 16), np.float32)
        indices, probs = atskern.sample(attention, 3, seed=1)
        assert (indices.shape, indices.dtype, probs.shape, probs.dtype) == ((2, 3, 2), np.int32, (2, 3), np.float32)
        assert _backend.is_cupy_array(indices)
        out = atskern.extract_patches(cp.ndarray((2, 64, 64, 3), np.uint8), cp.ndarray((2, 5, 2), np.int32), 8)
        assert (out.shape, out.dtype) == ((2, 5, 8, 8, 3), np.uint8)
    assert (_backend._cupy, sampling._handle, sampling._multiprocessors, patches._handle) == before


def test_knob_timings_alternate_the_knob():
    """The tuning tables time a knob's two settings in turn (drift hits both), each measure under its setting."""
    import types

    from bench import gpu_tuning

    module = types.SimpleNamespace(KNOB=None)
    seen = []
    timed = gpu_tuning._alternating(module, "KNOB", lambda: seen.append(module.KNOB) or len(seen), 3)
    assert seen == [False, True] * 3 and timed == {False: [1, 3, 5], True: [2, 4, 6]}
    seen.clear()
    timed = gpu_tuning._alternating(module, "KNOB", lambda: seen.append(module.KNOB) or len(seen), 2, (0, 9))
    assert seen == [0, 9, 0, 9] and timed == {0: [1, 3], 9: [2, 4]}


def test_knob_cells_check_the_draws_then_take_medians_per_setting(monkeypatch):
    """The knob tables' cells: the draws compared across the settings first, then each setting's median GPU and
    wall time over alternating rounds, each call timed under its own setting."""
    import types

    from bench import _gpu, gpu_tuning

    module = types.SimpleNamespace(KNOB=None)
    checked, timed = [], iter([1.0, 10.0, 3.0, 30.0, 2.0, 20.0, 5.0, 50.0])
    monkeypatch.setattr(gpu_tuning, "_same_draws_both_ways", lambda *args: checked.append(args[1:]))
    monkeypatch.setattr(_gpu, "timings", lambda fn, repeats: (lambda t: {"gpu": t, "wall": t + module.KNOB})(
        next(timed)))
    cells = gpu_tuning._knob_cells(module, "KNOB", "attention", 7, "differ", quick=False, values=(0, 100))
    assert checked == [("KNOB", "attention", 7, "differ", (0, 100))]
    assert cells == {0: (2.5, 2.5), 100: (25.0, 125.0)}  # medians of 1, 3, 2, 5 and of 10, 30, 20, 50


def test_whole_rows_limit_is_below_the_first_slower_size():
    """The WHOLE_ROWS the tuning table supports: every case of a row size up to it faster whole."""
    from bench.gpu_tuning import whole_rows_limit

    assert whole_rows_limit([(100, 2.0), (400, 1.5), (400, 1.1), (900, 0.9), (1600, 1.2)]) == (400, [900])
    assert whole_rows_limit([(400, 1.5), (100, 1.0)]) == (0, [100])
    assert whole_rows_limit([(100, 1.3), (400, 1.2)]) == (400, [])
    assert whole_rows_limit([]) == (0, [])


def test_knob_tables_compare_draws_exactly_and_probabilities_to_8_ulp():
    """The tuning tables' check that two plans drew the same: indices exactly, probabilities within 8 units in the
    last place (float64 rows summed in another order differ by a few), for float32 and float64 alike."""
    from bench.gpu_tuning import _draws_equal

    for dtype in (np.float32, np.float64):
        indices = np.arange(12).reshape(2, 3, 2)
        probs = np.array([[0.3, 0.2, 0.1], [0.25, 0.25, 1e-5]], dtype)
        eps = np.finfo(dtype).eps
        assert _draws_equal((indices, probs), (indices.copy(), probs * (1 + 3 * eps)))
        assert not _draws_equal((indices, probs), (indices, probs * (1 + 40 * eps)))
        moved = indices.copy()
        moved[1, 2, 0] += 1
        assert not _draws_equal((indices, probs), (moved, probs))


def test_plan_knob_times_plans_of_several_knobs(monkeypatch):
    """The cluster table's plans (several knobs each) go through the one-knob helpers: setting the PlanKnob's PLAN
    sets the plan's knobs, each call is timed under its own plan, and only PLAN can be set."""
    import types

    from bench import _gpu, gpu_tuning

    module = types.SimpleNamespace(A=0, B=0)
    plans = {"first": {"A": 1, "B": 2}, "second": {"A": 3, "B": 0}, "third": {"A": 0, "B": 5}}
    knob = gpu_tuning.PlanKnob(module, plans)
    knob.PLAN = "second"
    assert (module.A, module.B, knob.PLAN) == (3, 0, "second")
    with pytest.raises(AttributeError, match="no knob"):
        knob.A = 1
    with pytest.raises(ValueError, match="same knobs"):
        gpu_tuning.PlanKnob(module, {"first": {"A": 1, "B": 2}, "second": {"A": 3}})
    checked, times = [], iter(range(1, 13))
    monkeypatch.setattr(gpu_tuning, "_same_draws_both_ways", lambda *args: checked.append(args[1:]))
    monkeypatch.setattr(_gpu, "timings", lambda fn, repeats: (lambda t: {"gpu": t, "wall": 10 * module.A + module.B})(
        next(times)))
    cells = gpu_tuning._knob_cells(knob, "PLAN", "attention", 7, "differ", quick=False, values=tuple(plans))
    assert checked == [("PLAN", "attention", 7, "differ", ("first", "second", "third"))]
    # rounds of first, second, third: GPU times 1..12 in turn, wall from the knobs each plan set
    assert cells == {"first": (5.5, 12.0), "second": (6.5, 30.0), "third": (7.5, 5.0)}
