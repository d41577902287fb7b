#!/usr/bin/env python3
"""The project's two entry points; each sets up everything it needs first.

    python3 dev.py bench [ARGS...]   the main job: ``python -m bench`` (kernel and ATS benchmarks)
    python3 dev.py test [ARGS...]    the whole test suite (``pytest`` on pytest-xdist workers, one per core up to
                                     4; ARGS go to pytest, ``-n 0`` runs it in one process)

Set-up: a virtual environment in ``.venv`` is created on first use and
refreshed whenever ``requirements/lock.txt`` or ``pyproject.toml`` change
(a stamp file records their hash). Only the Python running this script is
needed on the machine.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
LOCK = ROOT / "requirements" / "lock.txt"
STAMP = VENV / ".atskern-stamp"


def _venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _wanted_stamp() -> str:
    digest = hashlib.sha256()
    for path in (LOCK, ROOT / "pyproject.toml"):
        digest.update(path.read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def ensure_venv() -> Path:
    """Create or refresh ``.venv`` so that it holds exactly the pinned dependencies."""
    python = _venv_python()
    wanted = _wanted_stamp()
    if python.exists() and STAMP.exists() and STAMP.read_text() == wanted:
        return python
    if not python.exists():
        print(f"[dev] creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    print("[dev] installing pinned dependencies (requirements/lock.txt)", flush=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", "-r", str(LOCK)], check=True)
    subprocess.run([*pip, "install", "-q", "--no-deps", "-e", str(ROOT)], check=True)
    STAMP.write_text(wanted)
    return python


def _workers(rest: list[str]) -> list[str]:
    """pytest-xdist workers (one per core, at most 4; a test file stays on one worker, so its module fixtures
    run once), unless the arguments choose (``-n``, ``-p no:xdist``)."""
    chosen = any(a in ("-n", "--numprocesses", "no:xdist") or a.startswith(("-n", "--numprocesses=")) for a in rest)
    return [] if chosen else ["-n", str(max(1, min(4, os.cpu_count() or 1))), "--dist", "loadfile"]


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"], ["help"]):
        print(__doc__)
        return 0
    if not argv or argv[0] not in {"bench", "test"}:
        print(__doc__, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    python = ensure_venv()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters")]))
    if command == "bench":
        args = [str(python), "-m", "bench", *rest]
    else:
        args = [str(python), "-m", "pytest", *_workers(rest), *rest]
    return subprocess.run(args, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
