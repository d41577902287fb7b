"""GPU patch gather and scatter: atskern (CuPy arrays) against the one-liners a GPU user would write.

Gathers patches from 8 images of 2048 x 2048 x 3 (channels-last; random
offsets inside the images) with atskern, CuPy fancy indexing and torch fancy
indexing (on the same memory, through DLPack), and reports the bytes moved
(read + write of the patches) per second against a device-to-device copy
measured in the same run. The scatter (the gather's adjoint) is timed against
``torch.Tensor.index_put_(accumulate=True)`` and ``cupyx.scatter_add`` into a
zeroed image, as a user would write them. Every method is checked against
atskern before it is timed. torch columns are skipped with a note without
torch's CUDA build.

    python -m bench.gpu_patches [--quick]
"""

from __future__ import annotations

import functools
import sys
import time

import numpy as np

from . import _gpu
from ._timing import Table

NAME = "gpu_patches"
BATCH = 8
SIDE = 2048
CHANNELS = 3
CASES = [  # (dtype, patch side, patches per image)
    (np.float32, 50, 10),
    (np.float32, 32, 512),
    (np.float32, 64, 512),
    (np.uint8, 128, 64),
]


def cases(quick: bool):
    return CASES[:2] if quick else CASES


def unavailable():
    return _gpu.unavailable()


QUEUED_CALLS = 10
"""Calls timed back to back behind a spin kernel for the ``kernel ms`` column."""
_SPIN = r"""
extern "C" __global__ void spin_ns(unsigned long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
"""


@functools.lru_cache(maxsize=None)
def _spin_kernel():
    import cupy

    return cupy.RawKernel(_SPIN, "spin_ns")


def queued_device_ms(fn, host_ms: float) -> float:
    """Device milliseconds per call of ``fn`` without its host time: the stream is held by a spin kernel while
    ``QUEUED_CALLS`` calls are queued behind it, so the CUDA events around them time only the GPU work (kernels
    and the gaps between them). ``host_ms``: the host time per call, to size the spin."""
    import cupy

    spin = _spin_kernel()
    stream = cupy.cuda.get_current_stream()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    fn()
    _gpu.synchronize()
    spin_ns = int(2e6 * (QUEUED_CALLS * host_ms + 2.0))  # twice the queueing time, plus 2 ms
    spin((1,), (1,), (np.uint64(spin_ns),))
    start.record(stream)
    for _ in range(QUEUED_CALLS):
        fn()  # each result goes back to the pool at once: reused in stream order, no allocation in between
    end.record(stream)
    if end.done:  # the spin ended before the calls were queued: the host time leaked in
        raise RuntimeError("the spin kernel ended before the calls were queued")
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / QUEUED_CALLS


def _queued_timings(timed, fns):
    """Adds ``kernel`` (ms per call, host time excluded: :func:`queued_device_ms`) to each timing, NaN on failure."""
    errors = []
    for name, t in timed.items():
        try:
            t["kernel"] = min(queued_device_ms(fns[name], t["host"]) for _ in range(3))
        except Exception as error:  # noqa: BLE001 - a missing column must not lose the table
            t["kernel"] = float("nan")
            errors.append(f"{name}: {type(error).__name__}: {error}")
    return errors


def _pixel_indices(xp, offsets, patch):
    """Row and column index arrays ``(B, K, P, P)`` and the batch index, as a user computes them per call."""
    device = {"device": offsets.device} if xp.__name__ == "torch" else {}
    steps = xp.arange(patch, **device)
    rows = offsets[:, :, 0, None, None] + steps[:, None]
    cols = offsets[:, :, 1, None, None] + steps[None, :]
    batch = xp.arange(offsets.shape[0], **device)[:, None, None, None]
    return batch, rows, cols


def _methods(x, offsets, patch, torch):
    import cupy

    import atskern

    methods = {
        "atskern": lambda: atskern.extract_patches(x, offsets, patch),
        "CuPy fancy indexing": lambda: x[_pixel_indices(cupy, offsets, patch)],
    }
    if torch is not None:
        xt, ot = torch.from_dlpack(x), torch.from_dlpack(offsets).long()
        methods["torch fancy indexing"] = lambda: xt[_pixel_indices(torch, ot, patch)]
    return methods


def _scatter_methods(grad, offsets, patch, torch):
    import cupy
    import cupyx

    import atskern

    shape = (BATCH, SIDE, SIDE, CHANNELS)

    def cupy_scatter_add():
        out = cupy.zeros(shape, grad.dtype)
        cupyx.scatter_add(out, _pixel_indices(cupy, offsets, patch), grad)
        return out

    methods = {
        "atskern (deterministic)": lambda: atskern.scatter_patches(grad, offsets, (SIDE, SIDE)),
        "atskern (atomic)": lambda: atskern.scatter_patches(grad, offsets, (SIDE, SIDE), deterministic=False),
        "cupyx.scatter_add": cupy_scatter_add,
    }
    if torch is not None:
        gt, ot = torch.from_dlpack(grad), torch.from_dlpack(offsets).long()

        def index_put():
            out = torch.zeros(shape, dtype=gt.dtype, device=gt.device)
            b, r, c = _pixel_indices(torch, ot, patch)
            shape_ = (BATCH, ot.shape[1], patch, patch)
            return out.index_put_((b.expand(shape_), r.expand(shape_), c.expand(shape_)), gt, accumulate=True)

        methods["torch index_put_(accumulate=True)"] = index_put
    return methods


WARM_UP_SECONDS = 0.25


def warm_up(fns, seconds: float = WARM_UP_SECONDS) -> None:
    """Call each of ``fns`` for about ``seconds`` before anything is timed: on the H200 every method's host time
    was 1.3x to 1.9x higher in the first case timed than in the next ones (gather, CuPy fancy indexing: 262 µs
    against 157 to 183), a cost of the process's first calls, not of the case."""
    for fn in fns:
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            fn()
            _gpu.synchronize()


def run(quick: bool = False, progress=None) -> Table:
    """The GPU gather/scatter table for ``python -m bench``."""
    import cupy

    torch = _gpu.torch_cuda()
    repeats = 10 if quick else 30
    copy = _gpu.copy_bandwidth(repeats=repeats)
    table = Table(NAME, f"GPU patch gather and scatter, {BATCH} images of {SIDE}x{SIDE}x{CHANNELS} "
                        "(median ms per call, synchronized)",
                  ["op", "case", "method", "wall ms", "GPU ms", "host us", "atskern faster by", "GB/s", "% of d2d copy",
                   "kernel ms", "kernel % of d2d copy"])
    rng = np.random.default_rng(0)
    errors = []
    images = {}
    for index, (dtype, patch, count) in enumerate(cases(quick)):
        if dtype not in images:
            images[dtype] = cupy.asarray(rng.integers(0, 256, (BATCH, SIDE, SIDE, CHANNELS)).astype(dtype))
        x = images[dtype]
        offsets = cupy.asarray(rng.integers(0, SIDE - patch + 1, (BATCH, count, 2)).astype(np.int32))
        label = f"{np.dtype(dtype).name} {patch}x{patch}x{CHANNELS}, {count} per image"
        expected = None
        timed = {}
        methods = _methods(x, offsets, patch, torch)
        if index == 0:
            warm_up(list(methods.values()) + list(_scatter_methods(
                cupy.zeros((BATCH, count, patch, patch, CHANNELS), np.float32), offsets, patch, torch).values()))
        for name, fn in methods.items():
            got = cupy.asarray(fn())
            if expected is None:
                expected = got
            elif not bool(cupy.array_equal(got, expected)):
                raise AssertionError(f"{name} disagrees with atskern on {label}")
            timed[name] = _gpu.timings(fn, repeats=repeats)
        errors += _queued_timings(timed, methods)
        moved = 2 * expected.nbytes
        _rows(table, "gather", label, timed, "atskern", moved, copy)
        if dtype == np.float32:
            grad = cupy.asarray(rng.standard_normal(expected.shape).astype(np.float32))
            reference = None
            timed = {}
            methods = _scatter_methods(grad, offsets, patch, torch)
            for name, fn in methods.items():
                got = cupy.asarray(fn())
                if reference is None:
                    reference = got
                elif not bool(cupy.allclose(got, reference, rtol=1e-5, atol=1e-4)):
                    raise AssertionError(f"{name} disagrees with atskern on {label}")
                timed[name] = _gpu.timings(fn, repeats=repeats)
            errors += _queued_timings(timed, methods)
            _rows(table, "scatter", label, timed, "atskern (deterministic)", grad.nbytes + reference.nbytes, copy)
            del grad, reference
        del offsets, expected
        cupy.get_default_memory_pool().free_all_blocks()
        if progress is not None:
            progress.update(1)
    table.rows.append(["d2d copy", "1 GiB", "cudaMemcpyAsync", float("nan"), 2 * 2**30 / copy * 1e3, float("nan"),
                       float("nan"), copy / 1e9, 100.0, 2 * 2**30 / copy * 1e3, 100.0])
    if torch is None:
        table.notes.append("torch columns skipped: torch with CUDA is not installed")
    table.notes.append("bytes moved: gather = read + write of the patches; scatter = the gradient read + the image "
                       "written. d2d copy counts read + write. host us: cupyx.profiler.benchmark CPU time per call.")
    table.notes.append("GPU ms (cupyx.profiler.benchmark) runs from an event recorded before the call to one after it "
                       "on an idle stream, so it includes the host time up to the launch; kernel ms: device time per "
                       f"call with {QUEUED_CALLS} calls queued back to back behind a spin kernel (no host time)")
    table.notes += [f"kernel ms not measured for {error}" for error in errors]
    table.notes.append("goals (issue 10): host <= 30 us per call; gather >= 50% of d2d copy when it moves >= 32 MB and "
                       ">= 2x faster than torch and CuPy fancy indexing; deterministic scatter >= 3x faster than "
                       "index_put_(accumulate=True)")
    return table


def _rows(table, op, label, timed, ours, moved, copy):
    for name, t in timed.items():
        rate = moved / (t["gpu"] / 1e3)
        kernel_rate = moved / (t["kernel"] / 1e3)
        table.rows.append([op, label, name, t["wall"], t["gpu"], 1e3 * t["host"], t["wall"] / timed[ours]["wall"],
                           rate / 1e9, 100 * rate / copy, t["kernel"], 100 * kernel_rate / copy])


if __name__ == "__main__":
    _gpu.script_main(sys.modules[__name__])
