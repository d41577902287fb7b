"""The CPU kernels under fork, data-loader workers and concurrent Python threads (issue 11, item 7).

Each case runs in a fresh interpreter, because Numba picks its threading layer once per process. The
parent always runs the kernels before it forks (the case GNU OpenMP kills) and the children must produce
the parent's draws.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from .test_patches import ROOT

COMMON = """
import os, sys, threading
import numpy as np
import atskern
rng = np.random.default_rng(0)
attention = rng.random((16, 40, 30))
images = rng.random((16, 60, 50, 3)).astype(np.float32)
def work(seed):
    indices, probs = atskern.sample(attention, 6, seed=seed)
    offsets = atskern.patch_offsets(indices, (40, 30), (60, 50), (8, 8))
    patches = atskern.extract_patches(images, offsets, (8, 8))
    back = atskern.scatter_patches(patches, offsets, (60, 50))
    return indices.tobytes() + probs.tobytes() + patches.tobytes() + back.tobytes()
"""


def run_script(body: str, env_extra: dict | None = None, timeout: int = 180, prepend_common: bool = True) -> str:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'adapters'}")
    env.pop("NUMBA_THREADING_LAYER", None)
    env.update(env_extra or {})
    code = (textwrap.dedent(COMMON) if prepend_common else "") + textwrap.dedent(body)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert run.returncode == 0, f"exit {run.returncode}\nstdout: {run.stdout}\nstderr: {run.stderr[-3000:]}"
    return run.stdout


FORK = """
import multiprocessing
expected = work(7)
with multiprocessing.get_context("fork").Pool(2) as pool:
    results = pool.map(work, [7, 7, 7, 7])
assert all(r == expected for r in results), "a forked worker drew differently"
pid = os.fork()
if pid == 0:
    os._exit(0 if work(7) == expected else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
import numba
print("layer", numba.threading_layer())
"""


def test_fork_pool_after_kernels_ran():
    assert "layer tbb" in run_script(FORK)


DATALOADER = """
import torch
from torch.utils.data import DataLoader, Dataset
torch.set_num_threads(1)
class Patches(Dataset):
    def __len__(self):
        return 6
    def __getitem__(self, i):
        return torch.from_numpy(np.frombuffer(work(i), dtype=np.uint8).copy())
expected = [Patches()[i] for i in range(6)]
loader = DataLoader(Patches(), batch_size=None, num_workers=2, multiprocessing_context="fork")
got = list(loader)
assert all(torch.equal(a, b) for a, b in zip(got, expected)), "a DataLoader worker drew differently"
print("ok", len(got))
"""


def test_torch_dataloader_workers_call_kernels():
    pytest.importorskip("torch")
    assert "ok 6" in run_script(DATALOADER)


FORK_WHILE_A_THREAD_CALLS = """
import os, signal, threading, time
import numpy as np
import atskern
images = np.random.default_rng(0).random((16, 60, 50, 3)).astype(np.float32)
offsets = np.arange(16 * 6 * 2).reshape(16, 6, 2) % 40
def gather():
    return atskern.extract_patches(images, offsets, (8, 8))
stop = False
def loop():
    while not stop:
        gather()
caller = threading.Thread(target=loop)
caller.start()  # the gather loads, and Numba's thread pool starts, in this thread: the forks below are its worry
hung = 0
for trial in range(4):
    pid = os.fork()
    if pid == 0:
        os._exit(0 if gather().shape == (16, 6, 8, 8, 3) and gather().shape == (16, 6, 8, 8, 3) else 3)
    deadline = time.monotonic() + 40
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0, status
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            hung += 1
            break
        time.sleep(0.01)
stop = True
caller.join()
print("hung", hung)
"""


def test_forks_while_another_thread_calls_the_kernels():
    """A thread loads and calls a kernel while the main thread forks (a data-loader worker started while a
    training thread samples, or after TensorFlow's threads ran the kernels): the child's kernels finish (1 to 2 of
    4 such children hung inside a parallel kernel, the forks having split Numba's TBB pool), and no lock of
    logging's fork hooks is released unacquired."""
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(FORK_WHILE_A_THREAD_CALLS)], capture_output=True,
                         text=True, timeout=400,
                         env=dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'adapters'}", NUMBA_NUM_THREADS="2"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "hung 0" in run.stdout, run.stdout
    assert "un-acquired" not in run.stderr, run.stderr[-3000:]


THREADS = """
from concurrent.futures import ThreadPoolExecutor
expected = {seed: work(seed) for seed in range(4)}
with ThreadPoolExecutor(max_workers=6) as pool:
    got = list(pool.map(work, [s % 4 for s in range(48)]))
assert all(g == expected[s % 4] for s, g in enumerate(got)), "concurrent calls changed a result"
import numba
print("layer", numba.threading_layer())
"""


@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_concurrent_threads(layer):
    env = {} if layer == "default" else {"NUMBA_THREADING_LAYER": layer}
    out = run_script(THREADS, env)
    assert f"layer {'tbb' if layer == 'default' else layer}" in out




def test_without_tbb_falls_back_to_workqueue_with_a_warning():
    hide_tbb = textwrap.dedent("""
    import importlib.metadata
    _files = importlib.metadata.files
    def _no_tbb(name):
        if name == "tbb":
            raise importlib.metadata.PackageNotFoundError(name)
        return _files(name)
    importlib.metadata.files = _no_tbb
    """)
    first_call = textwrap.dedent("""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        work(0)  # the kernels (and the threading layer) load at the first call
    assert any("TBB could not be loaded" in str(w.message) and "pip install tbb" in str(w.message)
               for w in caught), [str(w.message) for w in caught]
    """)
    env = {"LD_LIBRARY_PATH": ""}
    out = run_script(hide_tbb + textwrap.dedent(COMMON) + first_call + textwrap.dedent(FORK) + textwrap.dedent(THREADS),
                     env, prepend_common=False)
    assert out.count("layer workqueue") == 2


DRAWS = """
import hashlib
parts = [work(s) for s in range(3)]
weights = np.random.default_rng(1).random((300, 70))
for replace in (False, True):
    for n in (1, 5):
        parts.append(atskern.sample(weights, n, replace=replace, seed=11)[0].tobytes())
import numba
print(numba.threading_layer(), numba.get_num_threads(), hashlib.sha256(b"".join(parts)).hexdigest())
"""


def test_draws_identical_across_layers_and_thread_counts():
    digests = set()
    for layer, threads in [("", "1"), ("", "2"), ("workqueue", "2"), ("omp", "2")]:
        env = {"NUMBA_NUM_THREADS": threads}
        if layer:
            env["NUMBA_THREADING_LAYER"] = layer
        name, count, digest = run_script(DRAWS, env).split()
        assert (name, count) == (layer or "tbb", threads)
        digests.add(digest)
    assert len(digests) == 1


def test_public_calls_pickle_by_reference():
    """The calls behind the launch lock pickle as themselves (pools and spawned workers send them by name); a
    pickled partial runs and gives the direct call's result."""
    import functools
    import pickle

    import numpy as np

    import atskern

    for name in ("sample", "extract_patches", "scatter_patches", "extract_multiscale", "scatter_multiscale"):
        function = getattr(atskern, name)
        assert pickle.loads(pickle.dumps(function)) is function, name
    call = pickle.loads(pickle.dumps(functools.partial(atskern.sample, n=3, seed=4)))
    attention = np.random.default_rng(0).random((2, 6, 6))
    assert np.array_equal(call(attention)[0], atskern.sample(attention, 3, seed=4)[0])


@pytest.mark.parametrize("layer", ["safe", "threadsafe"])
def test_numba_layer_settings_that_take_tbb_find_the_wheel(layer):
    """Numba's 'safe' (TBB only) and 'threadsafe' settings: Numba finds the tbb wheel's library only once atskern
    has loaded it, which it did only for 'tbb' ('safe' failed with "install tbb", 'threadsafe' ran on OpenMP)."""
    out = run_script("""
    big = np.random.default_rng(1).random((4, 400, 400))
    indices, _ = atskern.sample(big, 5, seed=3)  # 640000 positions: the parallel kernel
    import atskern.reference
    assert (indices == atskern.reference.sample(big, 5, seed=3)[0]).all()
    import numba
    print("layer", numba.threading_layer())
    """, {"NUMBA_THREADING_LAYER": layer, "NUMBA_NUM_THREADS": "2"})
    assert "layer tbb" in out
