"""Numba decorators shared by the CPU kernels, with an on-disk cache in a per-user directory.

Compiled kernels are cached (``cache=True``) in, by priority:

1. ``NUMBA_CACHE_DIR`` if it is set and writable, with the folder Numba makes in it for the kernels' source
   folder (Numba's own rule, for every cached function);
2. ``$XDG_CACHE_HOME/atskern/numba`` (default ``~/.cache/atskern/numba``, also for a relative
   ``XDG_CACHE_HOME``; skipped without a home);
3. ``<temporary folder>/atskern-numba-<uid>``, made private (mode 0700) and used only if it is this user's
   and no one else can write to it (Numba unpickles its index files: a folder another user made there
   first would run their code in this process);

never the package's own ``__pycache__`` (a site-packages folder is often read-only or shared).
Each compiled signature goes to a data file named by a hash of its index key and of the source
file's stamp (Numba numbers them 1, 2, ... in the order one process compiled them: two processes
that compile different signatures on a cold cache at the same time, e.g. data-loader workers or DDP
ranks, wrote different code under one name, and a third loaded one signature's machine code for
another and crashed; an index only loads the file of its own name, so no interleaving of writers
can pair an index with another signature's or another source version's code).
For atskern's kernels that stamp also covers every module they can inline (:func:`kernel_sources`).
Code that calls the threading layer (a parallel kernel, or any kernel that calls one) is loaded
only after the layer has started (:func:`atskern.cpu._threading.launch`): Numba's own loader
skips that for a cached kernel whose parallel callee was itself loaded from the cache, and the
loaded code then calls address 0. The layer is not part of the code (it is called by name), so
code compiled under one layer runs under another.
Inside that directory Numba keys each cache file by the source file's absolute folder, so
several installs of atskern never overwrite each other's entries. Only atskern's functions
are redirected (a cache locator of our own); other libraries' Numba caches are left where
Numba puts them. Caching is turned off only if no directory is writable.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import os
import pickle
import stat
import tempfile
import threading
import warnings
from pathlib import Path

import numba

from . import _threading  # chooses the threading layer before any kernel is compiled

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def _private(path: Path) -> bool:
    """``path`` exists or is made with mode 0700, belongs to this user and is writable by no one else."""
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()
    except OSError:
        return False
    if not hasattr(os, "getuid"):  # Windows: per-user temporary folders
        return True
    # lstat: a symbolic link is not a directory here
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def _shared_temp_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"atskern-numba-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def cache_candidates() -> list[Path]:
    """Where the cache may live, in order of preference (see the module docstring)."""
    configured = os.environ.get("NUMBA_CACHE_DIR")
    candidates = [Path(configured)] if configured else []
    user_cache = os.environ.get("XDG_CACHE_HOME")
    if not user_cache or not os.path.isabs(user_cache):  # the XDG rule: a relative value is ignored
        try:
            user_cache = Path.home() / ".cache"
        except (RuntimeError, KeyError):  # no home directory (a uid without a passwd entry, HOME unset)
            user_cache = None
    if user_cache:
        candidates.append(Path(user_cache) / "atskern" / "numba")
    candidates.append(_shared_temp_dir())
    return candidates


def _kernels_folder(candidate: Path) -> Path:
    """The folder inside ``candidate`` where Numba writes the kernels' files (one per source folder): another user
    may have made it in a shared ``NUMBA_CACHE_DIR``, unwritable to this one."""
    try:
        from numba.core import caching

        return candidate / caching._CacheLocator.get_suitable_cache_subpath(__file__)  # the path as Numba sees it
    except AttributeError:  # Numba's API moved: the folder itself decides
        return candidate


def _choose_cache_dir() -> Path | None:
    shared = _shared_temp_dir()
    for candidate in cache_candidates():
        if candidate == shared and not _private(candidate):
            continue
        if _writable(candidate) and _writable(_kernels_folder(candidate)):
            return candidate
    return None


CACHE_DIR = _choose_cache_dir()
CACHE = CACHE_DIR is not None


def _install_locator(cache_dir: Path, first: bool = False) -> bool:
    """Make Numba cache atskern's functions (only) under ``cache_dir`` (``first``: ahead of every Numba locator);
    False if Numba's API moved."""
    try:
        from numba.core import caching

        base = (caching._SourceFileBackedLocatorMixin, caching._CacheLocator)
        impl = caching.CacheImpl
    except AttributeError:
        return False

    class AtskernCacheLocator(*base):
        def __init__(self, py_func, py_file):
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = os.path.join(str(cache_dir), self.get_suitable_cache_subpath(py_file))

        def get_cache_path(self):
            return self._cache_path

        @classmethod
        def from_function(cls, py_func, py_file):
            try:
                Path(py_file).resolve().relative_to(PACKAGE_DIR)
            except (ValueError, OSError):
                return None
            return super().from_function(py_func, py_file)

    classes = impl._locator_classes
    if not any(c.__name__ == AtskernCacheLocator.__name__ for c in classes):
        # after Numba's NUMBA_CACHE_DIR locator, before its in-tree (__pycache__) one
        names = [c.__name__ for c in classes]
        at = 0
        if not first and "UserProvidedCacheLocator" in names:
            at = names.index("UserProvidedCacheLocator") + 1
        classes.insert(at, AtskernCacheLocator)
    return True


_CONFIGURED = os.environ.get("NUMBA_CACHE_DIR")
if CACHE_DIR is not None and not (_CONFIGURED and CACHE_DIR == Path(_CONFIGURED)):
    # our own directory: NUMBA_CACHE_DIR unset, or set but not writable (then ahead of Numba's locator for it,
    # which would fail: "no locator available")
    if not _install_locator(CACHE_DIR, first=bool(_CONFIGURED)):
        numba.config.CACHE_DIR = str(CACHE_DIR)


@contextlib.contextmanager
def _index_lock(index_path: str):
    """An exclusive lock on ``index_path`` across processes, for one read-modify-write of the index (best effort:
    none where ``fcntl`` or the lock file is unavailable)."""
    try:
        import fcntl

        handle = open(index_path + ".lock", "a+b")  # noqa: SIM115 - closed below
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass  # e.g. a file system without locks: the write below is still atomic
        yield
    finally:
        handle.close()  # releases the lock


_UNSAVED_FOLDERS: set[str] = set()


def _unsaved(folder: str, error: OSError) -> None:
    """Warn once per folder that a compiled kernel could not be written to the cache (a shared folder whose
    index file another user owns, a full disk): the call goes on with the code it compiled."""
    if folder not in _UNSAVED_FOLDERS:
        _UNSAVED_FOLDERS.add(folder)
        warnings.warn(f"atskern could not write compiled kernels to the cache folder {folder} ({error}); they are "
                      "compiled again in each process (set NUMBA_CACHE_DIR to a folder of your own)",
                      RuntimeWarning, stacklevel=2)


def _entries_by_key():
    """``numba.core.caching.IndexDataCacheFile`` with one data file per index key and source version, which starts
    the threading layer before handing Numba code that calls it (see the module docstring), or None if Numba's API
    moved."""
    try:
        from numba.core.caching import IndexDataCacheFile, _cache_log
    except ImportError:
        return None

    class EntriesByKey(IndexDataCacheFile):
        def _data_name_for(self, key):
            # the source stamp too: the key hashes only the function's own bytecode, so two versions of the module
            # (an edit or a checkout while another process runs) would otherwise write different code under one
            # name, and an index of one version could name the other's code
            # (repr, not pickle: equal keys pickle to different bytes when one repeats an object another has as
            # two equal copies, so a name from pickle bytes changed from process to process)
            digest = hashlib.sha256(repr((key, self._source_stamp)).encode()).hexdigest()[:24]
            return self._index_name[: -len(".nbi")] + f".{digest}.nbc"

        def save(self, key, data):
            try:
                self._save_entry(key, data)
            except OSError as error:  # the compiled code runs all the same; it is only not kept
                _unsaved(self._cache_path, error)

        def _save_entry(self, key, data):
            data_name = self._data_name_for(key)
            self._save_data(data_name, data)  # before the index names it (a reader skips a missing file anyway)
            with _index_lock(self._index_path):  # two processes adding entries at once would each drop the other's
                overloads = self._load_index()
                if overloads.get(key) != data_name:
                    overloads[key] = data_name
                    self._save_index(overloads)

        def load(self, key):
            data_name = self._load_index().get(key)
            if data_name != self._data_name_for(key):
                return None  # an entry of another version or naming: compile (and replace it)
            try:
                with open(self._data_path(data_name), "rb") as f:
                    raw = f.read()
            except OSError:
                return None  # removed while the index still names it
            if any(symbol in raw for symbol in _threading.PARALLEL_SYMBOLS):
                try:
                    _threading.launch()  # before Numba links the code (see _threading.launch)
                except Exception:  # no layer can start here: compiling raises the real error
                    return None
            _cache_log("[cache] data loaded from %r", self._data_path(data_name))
            return pickle.loads(raw)

    return EntriesByKey


_ENTRIES_BY_KEY = _entries_by_key()


def kernel_sources(start: Path = Path(__file__).parent) -> list[Path]:
    """The package's source files compiled kernels can take code or constants from: every module of ``start``
    (this folder) and the atskern modules they import, transitively (relative imports only)."""
    pending = sorted(start.glob("*.py"))
    found: set[Path] = set()
    while pending:
        path = pending.pop()
        if path in found or not path.is_file():
            continue
        found.add(path)
        for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                parts = node.module.split(".") if node.module else []
                target = base.joinpath(*parts)
                pending += [target.with_suffix(".py"), target / "__init__.py"]
                pending += [target / f"{alias.name}.py" for alias in node.names]
    return sorted(p for p in found if PACKAGE_DIR in p.parents)


_DIGEST_LOCK = threading.Lock()


def _sources_digest() -> str:
    """The digest of :func:`kernel_sources`, computed once, by one thread: the first imports of two kernel modules
    can run on two threads at once (TensorFlow runs independent ops' first calls concurrently), and CPython 3.11's
    ``ast.parse`` is not safe to run concurrently (its recursion-depth check is shared state: "SystemError: AST
    constructor recursion depth mismatch"); a thread that waited takes the first one's digest."""
    with _DIGEST_LOCK:
        return _digest_of_sources()


@functools.lru_cache(maxsize=None)
def _digest_of_sources() -> str:
    digest = hashlib.sha256()
    for path in kernel_sources():
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _keyed_entries(dispatcher):
    """``dispatcher`` with its disk cache (if any) writing one data file per key and source version, where the
    version of one of atskern's kernels covers every module it can inline (:func:`kernel_sources`; Numba's own
    stamp covers only the file of the function, and its key only the function's own bytecode, so an edit to
    ``philox.py`` alone would leave ``sampling.py``'s cached kernels running the old generator)."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if _ENTRIES_BY_KEY is not None and cache_file is not None and isinstance(cache_file, _ENTRIES_BY_KEY.__base__):
        cache_file.__class__ = _ENTRIES_BY_KEY
        try:
            inside = PACKAGE_DIR in Path(dispatcher.py_func.__code__.co_filename).resolve().parents
        except OSError:
            inside = False
        if inside:
            cache_file._source_stamp = (cache_file._source_stamp, _sources_digest())
    return dispatcher


def jit(*args, **kwargs):
    """``numba.njit`` with nogil, and the disk cache (one file per compiled signature) when a cache directory is
    writable."""
    kwargs.setdefault("cache", CACHE)
    kwargs.setdefault("nogil", True)
    if len(args) == 1 and callable(args[0]):
        return _keyed_entries(numba.njit(**kwargs)(args[0]))
    decorate = numba.njit(*args, **kwargs)
    return lambda function: _keyed_entries(decorate(function))
