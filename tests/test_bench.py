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
    assert {t["name"] for t in report["tables"]} == {"sampling", "patches", "ats_dense"}
    assert report["machine"]["numpy"] and report["machine"]["cores"] >= 1
    for table in report["tables"]:
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
