"""Numba's disk cache is used where a directory is writable, and atskern still imports and runs where none is."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

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
atskern.extract_patches(np.ones((1, 8, 8, 1), np.float32), np.zeros((1, 1, 2), np.int32), 2)  # a cached kernel
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
    assert any(cache.rglob("patches*.nbi")), "the gather kernel was not cached in the per-user directory"
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


_NESTED = """
import sys
import numpy as np
from numba import prange
from atskern.cpu import _jit

@_jit.jit(parallel=True)
def parallel_sum(x):
    total = 0.0
    for i in prange(x.shape[0]):
        total += x[i]
    return total

@_jit.jit
def sum_plus_one(x):
    return parallel_sum(x) + 1.0

x = np.arange(1000.0)
print(repr((parallel_sum if sys.argv[1] == "inner" else sum_plus_one)(x)))
import numba
print(numba.threading_layer())
"""


def _nested(tmp_path, cache, step, layer=None):
    script = tmp_path / "nested.py"
    script.write_text(_NESTED)
    env = dict(os.environ, PYTHONPATH=str(ROOT), NUMBA_CACHE_DIR=str(cache), NUMBA_DEBUG_CACHE="1")
    env.pop("NUMBA_THREADING_LAYER", None)
    if layer:
        env["NUMBA_THREADING_LAYER"] = layer
    done = subprocess.run([sys.executable, "-W", "ignore", str(script), step], env=env, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    loaded = [line.rsplit("/", 1)[-1] for line in lines if line.startswith("[cache] data loaded")]
    return done.returncode, [line for line in lines if not line.startswith("[cache]")], loaded


def test_a_cached_caller_of_a_cached_parallel_kernel_runs_in_a_fresh_process(tmp_path):
    """The crash of a cache written by test runs: a process loads the parallel kernel from the cache and compiles
    a caller of it (Numba then records nothing to re-run for the caller: issue 8578). A fresh process that loads
    that caller first used to call address 0 (SIGSEGV) in the parallel region; it must start the threading layer."""
    cache = tmp_path / "cache"
    assert _nested(tmp_path, cache, "inner")[0] == 0  # the parallel kernel alone, cached
    returncode, lines, loaded = _nested(tmp_path, cache, "outer")
    assert (returncode, lines[:1]) == (0, ["499501.0"])
    assert any(name.startswith("nested.parallel_sum") for name in loaded), "the parallel kernel was not loaded"
    returncode, lines, loaded = _nested(tmp_path, cache, "outer")
    assert returncode == 0, f"the cached caller crashed (return code {returncode})"
    assert lines[:1] == ["499501.0"]
    assert [name.split(".")[1].split("-")[0] for name in loaded] == ["sum_plus_one"], loaded


def test_code_cached_under_one_threading_layer_runs_under_another(tmp_path):
    """The threading layer is called by name, not built into the code: what a ``workqueue`` process cached runs in
    a process on atskern's layer (TBB where it loads) and back."""
    cache = tmp_path / "cache"
    assert _nested(tmp_path, cache, "outer", "workqueue")[:2] == (0, ["499501.0", "workqueue"])
    returncode, lines, loaded = _nested(tmp_path, cache, "outer")
    assert (returncode, lines[:1], len(loaded)) == (0, ["499501.0"], 1)
    assert _nested(tmp_path, cache, "outer", "workqueue")[:2] == (0, ["499501.0", "workqueue"])


def test_an_index_only_names_its_own_source_versions_code(tmp_path):
    """Two versions of one module (an edit or a checkout while another process runs) share the index and data file
    names of a function at the same line with the same bytecode. Whatever order their writes land in, a version
    loads its own code or compiles, never the other version's."""
    from atskern.cpu import _jit

    entries = _jit._ENTRIES_BY_KEY
    key = (("float64",), ("x86_64", "cpu", ""), ("code", "closure"))
    old = entries(cache_path=str(tmp_path), filename_base="kernel-10.py311", source_stamp="old source")
    new = entries(cache_path=str(tmp_path), filename_base="kernel-10.py311", source_stamp="new source")
    save_data = old._save_data

    def interleaved(name, data):  # the old version's data, then all of the new version's save, then the old index
        save_data(name, data)
        new.save(key, "code of the new source")

    old._save_data = interleaved
    old.save(key, "code of the old source")
    assert old.load(key) in ("code of the old source", None)
    assert new.load(key) in ("code of the new source", None)
    new.save(key, "code of the new source")
    assert new.load(key) == "code of the new source"


def test_the_threading_symbols_cover_those_numba_registers():
    """Numba's parallel code calls these C functions by name; an entry that names one starts the layer first."""
    import inspect
    import re

    from numba.np.ufunc import parallel

    from atskern.cpu import _threading

    source = inspect.getsource(parallel._launch_threads) + inspect.getsource(parallel._load_threading_functions)
    registered = {name.encode() for name in re.findall(r"add_symbol\(\s*['\"](\w+)['\"]", source)}
    assert registered and registered <= set(_threading.PARALLEL_SYMBOLS)


def test_atskern_kernels_are_versioned_by_every_module_they_can_inline():
    """A kernel inlines code and constants from other modules (``sampling`` from ``philox``, ``_rng``,
    ``_validation``); an edit to any of them must miss the cache, not load the old generator."""
    from atskern.cpu import _jit, sampling

    names = {str(path.relative_to(_jit.PACKAGE_DIR)) for path in _jit.kernel_sources()}
    assert {"cpu/sampling.py", "cpu/philox.py", "_rng.py", "_validation.py"} <= names
    cache_file = getattr(getattr(sampling._without_replacement, "_cache", None), "_cache_file", None)
    if _jit.CACHE and cache_file is not None:
        assert cache_file._source_stamp[1] == _jit._sources_digest()


def _save_many(cache_path, worker, count, start):
    from atskern.cpu import _jit

    entries = _jit._ENTRIES_BY_KEY(cache_path=cache_path, filename_base="kernel-10.py311", source_stamp="source")
    start.wait()
    for i in range(count):
        entries.save(((f"worker {worker}", i),), f"code {worker} {i}")


def test_processes_saving_at_once_keep_every_entry(tmp_path):
    """Each save re-reads and rewrites the index; under the lock no process drops another's entries (which left
    later processes compiling afresh, whose floating-point rounding can differ from the cached code's)."""
    import multiprocessing

    from atskern.cpu import _jit

    workers, count = 4, 60
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(workers)
    processes = [context.Process(target=_save_many, args=(str(tmp_path), w, count, start)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [process.exitcode for process in processes] == [0] * workers
    entries = _jit._ENTRIES_BY_KEY(cache_path=str(tmp_path), filename_base="kernel-10.py311", source_stamp="source")
    loaded = {(w, i): entries.load(((f"worker {w}", i),)) for w in range(workers) for i in range(count)}
    missing = [k for k, v in loaded.items() if v != f"code {k[0]} {k[1]}"]
    assert not missing, f"{len(missing)} of {workers * count} entries lost"


def test_equal_keys_name_the_same_data_file(tmp_path):
    """The name is the same in every process: equal keys built from different (or shared) objects, as types and
    strings are in different processes, give one name (pickle bytes did not: a later process missed the entry and
    compiled again)."""
    from atskern.cpu import _jit

    entries = _jit._ENTRIES_BY_KEY(cache_path=str(tmp_path), filename_base="kernel-10.py311", source_stamp="source")
    name = "".join(["float", "64"])
    shared = ((name, "2d"), (name, "2d"))
    copies = (("".join(["float", "64"]), "2d"), ("".join(["float", "64"]), "2d"))
    assert shared == copies and shared[0][0] is shared[1][0] and copies[0][0] is not copies[1][0]
    assert entries._data_name_for(shared) == entries._data_name_for(copies)


_CHOICE = """
import os, tempfile
deny = os.environ.get("DENY")
if deny:  # the folder cannot be written (root writes through file modes, so the test refuses it here)
    for name in ("NamedTemporaryFile", "TemporaryFile", "mkstemp"):
        real = getattr(tempfile, name)
        def refuse(*args, _real=real, dir=None, **kwargs):
            if dir is not None and str(dir).startswith(deny):
                raise PermissionError(13, "read-only for this test", str(dir))
            return _real(*args, dir=dir, **kwargs)
        setattr(tempfile, name, refuse)
if os.environ.get("NOHOME"):  # a uid without a passwd entry and no HOME: Path.home() raises
    from pathlib import Path
    def no_home(cls):
        raise RuntimeError("Could not determine home directory.")
    Path.home = classmethod(no_home)
from atskern.cpu import _jit
print("CHOICE", _jit.CACHE_DIR)
import numpy as np, atskern
atskern.extract_patches(np.ones((1, 8, 8, 1), np.float32), np.zeros((1, 1, 2), np.int32), 2)  # a cached kernel
# compiles and loads (the gather: 3 s cold, against 20 s for the sampling kernels)
print("RAN")
"""


def _choice(tmp_path, env_extra, drop=()):
    script = tmp_path / "choice.py"
    script.write_text(_CHOICE)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path / "tmp"))
    for name in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", *drop):
        env.pop(name, None)
    env.update(env_extra)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "RAN"
    return lines[-2].split(" ", 1)[1]


def test_an_unwritable_numba_cache_dir_falls_back_instead_of_failing(tmp_path):
    """NUMBA_CACHE_DIR set to a folder that cannot be written: atskern caches in its own folder (Numba's locator for
    NUMBA_CACHE_DIR failed the first kernel with "no locator available")."""
    locked = tmp_path / "locked"
    locked.mkdir()
    home = tmp_path / "home"
    chosen = _choice(tmp_path, {"NUMBA_CACHE_DIR": str(locked), "DENY": str(locked), "HOME": str(home)})
    assert chosen == str(home / ".cache" / "atskern" / "numba")
    assert any((home / ".cache" / "atskern" / "numba").rglob("*.nbi")) and not any(locked.iterdir())


def test_no_home_directory_uses_the_private_temporary_folder(tmp_path):
    """Without HOME (a uid with no passwd entry) the first kernel ran into Path.home()'s RuntimeError."""
    chosen = _choice(tmp_path, {"NOHOME": "1"}, drop=("HOME",))
    assert chosen == str(tmp_path / "tmp" / f"atskern-numba-{os.getuid()}")


def test_a_temporary_cache_folder_others_can_write_is_refused(tmp_path):
    """The shared temporary folder is used only if it is this user's and private: one that another user made first
    (here: writable by everyone) would have its pickled index files loaded, their code run in this process."""
    shared = tmp_path / "tmp" / f"atskern-numba-{os.getuid()}"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    chosen = _choice(tmp_path, {"HOME": str(tmp_path / "nohome"), "XDG_CACHE_HOME": "/proc/forbidden"})
    assert chosen == "None"
    shared.chmod(0o700)
    assert _choice(tmp_path, {"HOME": str(tmp_path / "nohome"), "XDG_CACHE_HOME": "/proc/forbidden"}) == str(shared)


def test_a_cache_dir_whose_kernels_folder_another_user_made_is_passed_over(monkeypatch, tmp_path):
    """In a shared ``NUMBA_CACHE_DIR`` the folder Numba keeps the kernels in may belong to another user (its first
    writer): Numba's locator would then fail ("no locator available"), so the next candidate is taken."""
    import numba
    from numba.core import caching

    from atskern.cpu import _jit, sampling

    shared = tmp_path / "shared"
    kernels = _jit._kernels_folder(shared)
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(shared))
    kernel = sampling._chunk_pass_serial.py_func
    numba_folder = caching.UserProvidedCacheLocator.from_function(kernel, kernel.__code__.co_filename).get_cache_path()
    assert Path(numba_folder) == kernels  # the folder Numba's own locator would write the kernels to

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(shared))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _jit._choose_cache_dir() == shared
    writable = _jit._writable
    monkeypatch.setattr(_jit, "_writable", lambda path: path != kernels and writable(path))
    assert _jit._choose_cache_dir() == tmp_path / "xdg" / "atskern" / "numba"


def test_a_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    from atskern.cpu import _jit

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.setenv("HOME", str(tmp_path))
    candidates = _jit.cache_candidates()
    assert candidates[0] == tmp_path / ".cache" / "atskern" / "numba"
    assert all(path.is_absolute() for path in candidates)


def test_the_sources_digest_is_computed_by_one_thread_at_a_time(monkeypatch):
    """The first imports of two kernel modules can run on two threads at once (TensorFlow runs independent ops'
    first calls concurrently), and CPython 3.11's ``ast.parse`` failed when two threads parsed at once ("AST
    constructor recursion depth mismatch")."""
    import threading
    import time

    from atskern.cpu import _jit

    sources = _jit.kernel_sources()
    want = _jit._sources_digest()
    inside, most, runs = [0], [0], [0]
    counter = threading.Lock()

    def slow_sources():
        with counter:
            inside[0] += 1
            runs[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.2)
        with counter:
            inside[0] -= 1
        return sources

    monkeypatch.setattr(_jit, "kernel_sources", slow_sources)
    _jit._digest_of_sources.cache_clear()
    digests = []
    threads = [threading.Thread(target=lambda: digests.append(_jit._sources_digest())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1 and runs[0] == 1 and digests == [want] * 3


def test_a_cache_entry_that_cannot_be_written_warns_and_the_call_goes_on(tmp_path, monkeypatch):
    """In a shared sticky folder (mode 1777, as /tmp) the index file belongs to its first writer and replacing it
    fails for every other user: every call raised PermissionError. The kernel was compiled; only keeping it fails."""
    from atskern.cpu import _jit

    entries = _jit._ENTRIES_BY_KEY(cache_path=str(tmp_path), filename_base="kernel-10.py311", source_stamp="source")

    def refused(overloads):
        raise PermissionError(1, "Operation not permitted", entries._index_path)

    monkeypatch.setattr(entries, "_save_index", refused)
    monkeypatch.setattr(_jit, "_UNSAVED_FOLDERS", set())
    with pytest.warns(RuntimeWarning, match="could not write compiled kernels to the cache folder"):
        entries.save(("key",), "code")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entries.save(("other key",), "code")  # once per folder
    assert entries.load(("key",)) is None  # not kept: compiled again next time
