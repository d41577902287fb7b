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

import sys

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


def run(quick: bool = False, progress=None) -> Table:
    """The GPU gather/scatter table for ``python -m bench``."""
    import cupy

    torch = _gpu.torch_cuda()
    repeats = 10 if quick else 30
    copy = _gpu.copy_bandwidth(repeats=repeats)
    table = Table(NAME, f"GPU patch gather and scatter, {BATCH} images of {SIDE}x{SIDE}x{CHANNELS} "
                        "(median ms per call, synchronized)",
                  ["op", "case", "method", "wall ms", "GPU ms", "host us", "atskern faster by", "GB/s", "% of d2d copy"])
    rng = np.random.default_rng(0)
    images = {}
    for dtype, patch, count in cases(quick):
        if dtype not in images:
            images[dtype] = cupy.asarray(rng.integers(0, 256, (BATCH, SIDE, SIDE, CHANNELS)).astype(dtype))
        x = images[dtype]
        offsets = cupy.asarray(rng.integers(0, SIDE - patch + 1, (BATCH, count, 2)).astype(np.int32))
        label = f"{np.dtype(dtype).name} {patch}x{patch}x{CHANNELS}, {count} per image"
        expected = None
        timed = {}
        for name, fn in _methods(x, offsets, patch, torch).items():
            got = cupy.asarray(fn())
            if expected is None:
                expected = got
            elif not bool(cupy.array_equal(got, expected)):
                raise AssertionError(f"{name} disagrees with atskern on {label}")
            timed[name] = _gpu.timings(fn, repeats=repeats)
        moved = 2 * expected.nbytes
        _rows(table, "gather", label, timed, "atskern", moved, copy)
        if dtype == np.float32:
            grad = cupy.asarray(rng.standard_normal(expected.shape).astype(np.float32))
            reference = None
            timed = {}
            for name, fn in _scatter_methods(grad, offsets, patch, torch).items():
                got = cupy.asarray(fn())
                if reference is None:
                    reference = got
                elif not bool(cupy.allclose(got, reference, rtol=1e-5, atol=1e-4)):
                    raise AssertionError(f"{name} disagrees with atskern on {label}")
                timed[name] = _gpu.timings(fn, repeats=repeats)
            _rows(table, "scatter", label, timed, "atskern (deterministic)", grad.nbytes + reference.nbytes, copy)
            del grad, reference
        del offsets, expected
        cupy.get_default_memory_pool().free_all_blocks()
        if progress is not None:
            progress.update(1)
    table.rows.append(["d2d copy", "1 GiB", "cudaMemcpyAsync", float("nan"), 2 * 2**30 / copy * 1e3, float("nan"),
                       float("nan"), copy / 1e9, 100.0])
    if torch is None:
        table.notes.append("torch columns skipped: torch with CUDA is not installed")
    table.notes.append("bytes moved: gather = read + write of the patches; scatter = the gradient read + the image "
                       "written. d2d copy counts read + write. host us: cupyx.profiler.benchmark CPU time per call.")
    table.notes.append("goals (issue 10): host <= 30 us per call; gather >= 50% of d2d copy when it moves >= 32 MB and "
                       ">= 2x faster than torch and CuPy fancy indexing; deterministic scatter >= 3x faster than "
                       "index_put_(accumulate=True)")
    return table


def _rows(table, op, label, timed, ours, moved, copy):
    for name, t in timed.items():
        rate = moved / (t["gpu"] / 1e3)
        table.rows.append([op, label, name, t["wall"], t["gpu"], 1e3 * t["host"], t["wall"] / timed[ours]["wall"],
                           rate / 1e9, 100 * rate / copy])


if __name__ == "__main__":
    _gpu.script_main(sys.modules[__name__])
