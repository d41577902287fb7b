"""Numba's disk cache is used where a directory is writable, and atskern still imports and runs where none is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PRELUDE = """
import os, tempfile
from pathlib import Path
_real = tempfile.NamedTemporaryFile
def _refuse(*args, dir=None, **kwargs):
    if dir is not None and not str(dir).startswith(os.environ.get("ALLOW", "//nothing")):
        raise PermissionError(13, "read-only for this test", str(dir))
    return _real(*args, dir=dir, **kwargs)
tempfile.NamedTemporaryFile = _refuse
import atskern
from atskern.cpu import _jit

@_jit.jit
def plus_one(x):
    return x + 1

assert plus_one(1) == 2
print("CACHE", _jit.CACHE, _jit.CACHE_DIR)
"""


def _run(tmp_path, env_extra):
    script = tmp_path / "script.py"
    script.write_text(_PRELUDE)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("NUMBA_CACHE_DIR", None)
    env.update(env_extra)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_import_and_run_without_any_writable_cache_directory(tmp_path):
    assert _run(tmp_path, {}) == "CACHE False None"


def test_falls_back_to_a_writable_directory(tmp_path):
    cache = tmp_path / "numba-cache"
    line = _run(tmp_path, {"NUMBA_CACHE_DIR": str(cache), "ALLOW": str(cache)})
    assert line == f"CACHE True {cache}"
    assert any(cache.rglob("*.nbi")), "no Numba index file was written to the cache directory"


_DEFAULT_DIR = """
import atskern
from atskern.cpu import _jit
import numpy as np
atskern.sample(np.ones((1, 4), np.float32), 2, seed=0)
print("CACHE", _jit.CACHE, _jit.CACHE_DIR)
"""


def test_default_cache_is_per_user_not_the_package(tmp_path):
    """Without NUMBA_CACHE_DIR the kernels are cached under $XDG_CACHE_HOME/atskern/numba,
    and nothing is written into the package's own __pycache__."""
    script = tmp_path / "default.py"
    script.write_text(_DEFAULT_DIR)
    package_cache = ROOT / "atskern" / "cpu" / "__pycache__"
    before = {p.name for p in package_cache.glob("*.nbi")} if package_cache.exists() else set()
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop("NUMBA_CACHE_DIR", None)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    cache = tmp_path / "xdg" / "atskern" / "numba"
    assert out.stdout.strip().splitlines()[-1] == f"CACHE True {cache}"
    assert any(cache.rglob("sampling*.nbi")), "the sampling kernels were not cached in the per-user directory"
    after = {p.name for p in package_cache.glob("*.nbi")} if package_cache.exists() else set()
    assert after == before, "a kernel was cached inside the package"


_TWICE = """
import sys
from atskern.cpu import _jit
if sys.argv[2] == "numbered":  # Numba's own naming, to show the race this guards against
    _jit._ENTRIES_BY_KEY = None

@_jit.jit
def twice_plus_one(x):
    return x * 2 + 1

value = {"int": 20, "float": 0.25}[sys.argv[1]]
print(repr(twice_plus_one(value)))
"""


def _race(tmp_path, naming):
    """Two processes compile different signatures of one function into empty caches at the same time: A ends up
    with its index and B's data files (the last writes of a concurrent cold start). A third process then loads A's
    signature from that cache."""
    script = tmp_path / "twice.py"
    script.write_text(_TWICE)
    caches = {name: tmp_path / f"cache-{naming}-{name}" for name in ("a", "b")}

    def run(cache, argument):
        env = dict(os.environ, PYTHONPATH=str(ROOT), NUMBA_CACHE_DIR=str(cache))
        done = subprocess.run([sys.executable, str(script), argument, naming], env=env, capture_output=True, text=True)
        return done.returncode, done.stdout.strip().splitlines()[-1:] if done.stdout.strip() else []

    assert run(caches["a"], "int") == (0, ["41"])
    assert run(caches["b"], "float") == (0, ["1.5"])
    for data in caches["b"].rglob("*.nbc"):
        target = caches["a"] / data.relative_to(caches["b"])
        target.write_bytes(data.read_bytes())
    return run(caches["a"], "int")


def test_concurrent_cold_starts_never_load_another_signatures_code(tmp_path):
    """Each signature's code lives under a name derived from its key, so B's data never replaces A's: A's
    signature loads its own code (Numba's numbering, shown second, would hand it B's float code)."""
    assert _race(tmp_path, "keyed") == (0, ["41"])
    assert _race(tmp_path, "numbered") != (0, ["41"])
