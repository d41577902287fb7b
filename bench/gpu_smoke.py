"""A small GPU workout for ``compute-sanitizer``: gathers, scatters and samples on CuPy arrays, checked against
the CPU kernels. CuPy's memory pool is switched off, so every array is its own ``cudaMalloc`` and the
sanitizer sees exact bounds (an access a byte past an array is an error, not a read inside the pool).

    compute-sanitizer --tool memcheck python -m bench.gpu_smoke
"""

from __future__ import annotations

import sys

import numpy as np


def _check(name, got, expected, exact=True):
    ok = np.array_equal(got, expected) if exact else np.allclose(got, expected, rtol=1e-5, atol=1e-5)
    if not ok:
        raise AssertionError(f"{name}: GPU result differs from the CPU kernel")


def patches(cupy, atskern, rng):
    """Every item size, 1-3 spatial dims, both layouts, offsets inside, across and far outside, odd sizes."""
    shapes = {1: ((2, 37), (9,)), 2: ((2, 13, 17), (5, 6)), 3: ((1, 5, 7, 9), (3, 2, 4))}
    for ndim, (spatial_batch, patch) in shapes.items():
        batch, spatial = spatial_batch[0], spatial_batch[1:]
        for channels_first in (False, True):
            for dtype in (np.uint8, np.float16, np.float32, np.float64):
                shape = (batch, 3) + spatial if channels_first else (batch,) + spatial + (3,)
                x = rng.integers(0, 200, shape).astype(dtype)
                offsets = np.stack([rng.integers(-p - 2, s + 2, (batch, 11)) for s, p in zip(spatial, patch)], -1)
                offsets[0, 0] = [s - p for s, p in zip(spatial, patch)]  # ends on the image's last element
                offsets[0, 1] = [-(10**6)] * ndim
                expected = atskern.extract_patches(x, offsets, patch, fill=3, channels_first=channels_first)
                got = atskern.extract_patches(cupy.asarray(x), cupy.asarray(offsets.astype(np.int32)), patch, fill=3,
                                              channels_first=channels_first)
                _check(f"gather {dtype.__name__} {ndim}-D", got.get(), expected)
                if dtype in (np.float32, np.float64):
                    grad = rng.standard_normal(expected.shape).astype(dtype)
                    back = atskern.scatter_patches(grad, offsets, spatial, channels_first=channels_first)
                    for deterministic in (True, False):
                        got = atskern.scatter_patches(cupy.asarray(grad), cupy.asarray(offsets), spatial,
                                                      channels_first=channels_first, deterministic=deterministic)
                        _check(f"scatter {dtype.__name__} {ndim}-D", got.get(), back, exact=deterministic)
    # an unaligned uint8 image view whose last byte is the allocation's last byte
    raw = cupy.asarray(rng.integers(0, 256, 3 + 2 * 29 * 31 * 3).astype(np.uint8))
    x = raw[3:].reshape(2, 29, 31, 3)
    offsets = np.array([[[0, 0], [28, 30], [27, 14], [5, 7]], [[0, 1], [26, 29], [28, 0], [1, 22]]])
    expected = atskern.extract_patches(x.get(), offsets, (3, 9), fill=1)
    _check("gather unaligned", atskern.extract_patches(x, cupy.asarray(offsets), (3, 9), fill=1).get(), expected)
    # float32 image, offsets, gradients and outputs one byte past an aligned address (atskern.gpu._alignment: byte
    # copies in, the outputs written through their bytes; a typed access of them would fault)
    image = rng.random((2, 29, 31, 3)).astype(np.float32)
    grad = rng.standard_normal((2, 4, 3, 9, 3)).astype(np.float32)
    x, offsets_dev, grad_dev = (bytes_off(cupy, a) for a in (image, offsets, grad))
    out = bytes_off(cupy, np.zeros((2, 4, 3, 9, 3), np.float32))
    atskern.extract_patches(x, offsets_dev, (3, 9), fill=1, out=out)
    _check("gather misaligned", host_bytes(cupy, out),
           host_bytes(np, atskern.extract_patches(image, offsets, (3, 9), fill=1)))
    back = bytes_off(cupy, np.zeros(image.shape, np.float32))
    atskern.scatter_patches(grad_dev, offsets_dev, (29, 31), out=back)
    _check("scatter misaligned", host_bytes(cupy, back),
           host_bytes(np, atskern.scatter_patches(grad, offsets, (29, 31))))


def bytes_off(cupy, array, shift=1):
    """A C-contiguous device copy of the host ``array`` ``shift`` bytes past an aligned address (made through bytes:
    for a ``shift`` that is not a multiple of the item size, a typed copy would fault)."""
    raw = cupy.zeros(array.nbytes + shift, np.uint8)
    raw[shift:] = cupy.asarray(np.ascontiguousarray(array).view(np.uint8).reshape(-1))
    return cupy.ndarray(array.shape, array.dtype, memptr=raw.data + shift)


def host_bytes(xp, array):
    """A C-contiguous array's bytes on the host (a device array's read without a typed access)."""
    if xp is np:
        return np.ascontiguousarray(array).view(np.uint8).reshape(-1)
    return xp.ndarray((array.nbytes,), np.uint8, memptr=array.data).get()


SAMPLE_CASES = [((3, 40), 7, False), ((2, 30, 20), 12, True), ((2, 30, 20), 12, False), ((1, 4, 5, 6), 9, False),
                ((2, 300, 300), 100, False), ((2, 300, 300), 100, True), ((2, 60, 60), 2048, False),
                ((1, 70, 70), 3000, False)]
"""(attention shape, n, replace) of :func:`sampling`'s calls."""


def sampling(cupy, atskern, rng, cases=SAMPLE_CASES):
    for shape, n, replace in cases:
        attention = rng.random(shape) + 0.01
        for logits in (False, True):
            given = np.log(attention) if logits else attention
            cpu = atskern.sample(given, n, replace=replace, logits=logits, seed=5)
            gpu = atskern.sample(cupy.asarray(given), n, replace=replace, logits=logits, seed=5)
            _check(f"sample {shape} n={n} replace={replace} logits={logits}", gpu[0].get(), cpu[0])
    attention = rng.random((3, 50, 41)).astype(np.float32) + 0.01  # one byte off: copied through bytes
    _check("sample misaligned", atskern.sample(bytes_off(cupy, attention), 9, seed=6)[0].get(),
           atskern.sample(attention, 9, seed=6)[0])


BAD_ROW_CASES = [(7, False), (7, True), (600, False), (2100, False)]
"""(n, replace) of :func:`unvalidated_bad_rows`' calls."""


def unvalidated_bad_rows(cupy, atskern, rng, cases=BAD_ROW_CASES):
    """``validate=False`` on rows validation refuses: in-range indices, probs 0 on the bad rows, the good rows
    drawn as the CPU draws them, and the status counts equal to the CPU's (the documented result, without
    faults)."""
    for dtype in (np.float32, np.float64):
        for n, replace in cases:
            attention = (rng.random((6, 48, 50)) + 0.01).astype(dtype)
            attention[1, 3, 4] = np.nan
            attention[2, 0, 0] = -1.0
            attention[3] = 0.0
            attention[4, 5:] = 0.0  # fewer positive cells than some n: fillers
            attention[5, 0, 1] = np.inf
            cpu = atskern.sample(attention, n, replace=replace, seed=11, validate=False, return_status=True)
            gpu = atskern.sample(cupy.asarray(attention), n, replace=replace, seed=11, validate=False,
                                 return_status=True)
            indices, probs, status = (a.get() for a in gpu)
            if not ((indices >= 0).all() and (indices < np.array([48, 50])).all()):
                raise AssertionError(f"validate=False {dtype.__name__} n={n}: index out of range")
            if not (probs[[1, 2, 3, 5]] == 0).all():
                raise AssertionError(f"validate=False {dtype.__name__} n={n}: a bad row has a nonzero prob")
            # the counts (columns 0-2, and the summary of them) are the contract; the exponent column is the
            # float64 rescaling's business and is not compared on refused rows
            _check(f"validate=False status {dtype.__name__} n={n}", status[:, :3], cpu[2][:, :3])
            _check(f"validate=False good rows {dtype.__name__} n={n}", indices[[0, 4]], cpu[0][[0, 4]])


def main(argv=None) -> int:
    import argparse

    import cupy

    import atskern

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sampling-only", action="store_true", help="only the sampling kernels (for racecheck)")
    parser.add_argument("--patches-only", action="store_true", help="only the patch kernels")
    args = parser.parse_args(argv)
    from atskern.gpu import sampling as gpu_sampling

    cupy.cuda.set_allocator(None)  # exact allocations for the sanitizer
    rng = np.random.default_rng(0)
    if not args.sampling_only:
        patches(cupy, atskern, rng)
    knobs = ("FUSED_FINISH", "WHOLE_ROWS", "WHOLE_ROWS_UNSCREENED", "ROW_CLUSTER")
    saved = [getattr(gpu_sampling, knob) for knob in knobs]
    modes = ((False, 0, False, 0), (True, 0, False, 0), (False, 1 << 30, True, 0), (False, 1 << 30, True, 4))
    try:
        # rows finished by finish_rows, by their last select_rows block, sampled whole by one sample_rows block and
        # by a cluster of four blocks (sample_cluster_rows)
        for values in () if args.patches_only else modes:
            for knob, value in zip(knobs, values):
                setattr(gpu_sampling, knob, value)
            sampling(cupy, atskern, rng)
            unvalidated_bad_rows(cupy, atskern, rng)
    finally:
        for knob, value in zip(knobs, saved):
            setattr(gpu_sampling, knob, value)
    cupy.cuda.Device().synchronize()
    print("gpu smoke: all results equal the CPU kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
