"""The main job's quick mode runs end to end and writes well-formed tables."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

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
    assert {t["name"] for t in report["tables"]} == {"sampling", "patches", "ats_dense", "gpu_sampling", "gpu_patches",
                                                     "gpu_ats"}
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
    ats_rows = [row for row in next(t for t in report["tables"] if t["name"] == "ats_dense")["rows"]]
    assert any(str(row[2]).startswith("ATS") and isinstance(row[3], float) for row in ats_rows)
    assert any(row[2] == "dense" and isinstance(row[3], float) for row in ats_rows)


BLOCK_TENSORFLOW = """
import sys
sys.modules["tensorflow"] = None  # as on the GPU machines: no TensorFlow, no Keras
sys.modules["keras"] = None
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
