"""GPU timing helpers: device detection, synchronized timings, device-to-device copy bandwidth.

Everything here imports CuPy (and torch) lazily, so ``python -m bench`` on a
machine without a GPU only sees :func:`unavailable` say why.
"""

from __future__ import annotations

import importlib
import importlib.util
import statistics
import time


def unavailable() -> str | None:
    """Why GPU benchmarks cannot run here (None when CuPy sees a CUDA device)."""
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed"
    try:
        cupy = importlib.import_module("cupy")
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as error:  # noqa: BLE001 - any CUDA/driver failure means no usable GPU
        return f"no usable CUDA device ({type(error).__name__}: {error})"
    return None


def torch_cuda():
    """``torch`` when it is installed with CUDA and sees a device, else None (its columns are skipped)."""
    if importlib.util.find_spec("torch") is None:
        return None
    torch = importlib.import_module("torch")
    return torch if torch.cuda.is_available() else None


def synchronize():
    importlib.import_module("cupy").cuda.Device().synchronize()


def median_wall(fn, wait=None, *, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` followed by ``wait()`` (default: the CuPy device's synchronize)."""
    wait = wait or synchronize
    for _ in range(warmup):
        fn()
    wait()
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        wait()
        walls.append(time.perf_counter() - start)
    return statistics.median(walls)


def timings(fn, *, repeats: int = 20, warmup: int = 3) -> dict:
    """Median milliseconds of ``fn()``: ``wall`` (each call synchronized, as a user waiting for the result sees
    it), and from ``cupyx.profiler.benchmark`` the host time (``host``) and the GPU time (``gpu``, CUDA events on
    the current stream, which torch's default stream shares)."""
    from cupyx.profiler import benchmark

    wall = median_wall(fn, repeats=repeats, warmup=warmup)
    result = benchmark(fn, n_repeat=repeats, n_warmup=1)
    return {
        "wall": 1e3 * wall,
        "host": 1e3 * float(statistics.median(result.cpu_times.tolist())),
        "gpu": 1e3 * float(statistics.median(result.gpu_times[0].tolist())),
    }


def torch_gumbel_top_k(scores, n: int):
    """The one-line torch alternative to ``atskern.sample`` without replacement that the benchmarks time: Gumbel
    keys of the ``(B, N)`` weights ``scores`` (``rand``, ``log``) and each row's ``n`` largest (``topk``)."""
    import torch

    keys = torch.log(scores) - torch.log(-torch.log(torch.rand_like(scores)))
    return torch.topk(keys, n, dim=1).indices


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes per second moved by a device-to-device copy of ``nbytes``, counting read and write (2 * nbytes)."""
    cupy = importlib.import_module("cupy")
    src = cupy.ones(nbytes, cupy.uint8)
    dst = cupy.empty_like(src)
    seconds = timings(lambda: dst.data.copy_from_device_async(src.data, nbytes), repeats=repeats)["gpu"] / 1e3
    del src, dst
    cupy.get_default_memory_pool().free_all_blocks()
    return 2 * nbytes / seconds


def device_description() -> dict:
    """The GPU's name, memory and the CUDA-side versions, for the report's header."""
    cupy = importlib.import_module("cupy")
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    info = {
        "gpu": name,
        "gpu_memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
        "cupy": cupy.__version__,
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
    }
    torch = torch_cuda()
    if torch is not None:
        info["torch"] = torch.__version__
    return info


def cell(value):
    """A table cell: the number, or ``'n/a'`` for a skipped method (None)."""
    return "n/a" if value is None else value


def ratio(numerator, denominator):
    return None if numerator is None or denominator is None else numerator / denominator


def script_main(module) -> None:
    """``python -m bench.<gpu benchmark> [--quick]`` for ``module``: print its table, or why it cannot run here."""
    import argparse

    parser = argparse.ArgumentParser(description=module.__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reason = module.unavailable()
    print(f"skipped: {reason}" if reason else module.run(args.quick).markdown())
