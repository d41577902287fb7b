"""Run code next to a 4 GiB sparse memmap in a fresh process and read back its JSON report.

The process starts with ``mm``, a ``(1, 32768, 32768, 4)`` uint8 ``np.memmap``
created in ``tmp_path`` (sparse: nothing is paged in), ``peak_kib()`` (the
process's peak resident memory, ``VmHWM``), ``json``, ``np`` and ``atskern``.
The code's last line of output must be one JSON object: the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = """
import json
import numpy as np
import atskern
def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
mm = np.memmap({path!r}, dtype=np.uint8, mode="w+", shape=(1, 32768, 32768, 4))
"""


def run_next_to_big_memmap(tmp_path, code: str) -> dict:
    """Run ``code`` (indented freely) after :data:`PRELUDE` in a fresh Python; its JSON report as a dict."""
    script = PRELUDE.format(path=str(tmp_path / "big.u8")) + textwrap.dedent(code)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'adapters'}")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])
