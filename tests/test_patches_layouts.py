"""Every array layout through every public patch function (issue 11, item 6) and ``out=`` overlap (item 4).

Each view (strided, reversed, broadcast, transposed, Fortran-ordered, channel-strided, at an address that is not a
multiple of the item size) holds the same values as a contiguous ``base``; the kernels must give what the reference
gives on ``base`` and what direct slicing of a padded copy gives, without copying the view whole.
"""

from __future__ import annotations

import importlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import atskern
from atskern import reference

from .conftest import HAS_GPU
from .memmap_probe import run_next_to_big_memmap
from .test_patches import images_shape, random_images

KINDS = ("contiguous", "strided", "every_axis_strided", "reversed", "broadcast", "transposed", "fortran",
         "channel_strided", "misaligned")
DTYPES = [np.uint8, np.int16, np.float16, ml_dtypes.bfloat16, np.float32, np.float64, np.dtype(">f4")]


def view_of(base, kind, channel_axis):
    """A view with ``base``'s values in ``kind``'s layout (``broadcast`` needs a base constant along axis 0); ``base``
    a NumPy or CuPy array, the view of the same library."""
    xp = np if isinstance(base, np.ndarray) else importlib.import_module(type(base).__module__.split(".")[0])
    if kind == "contiguous":
        return base
    if kind == "strided":
        big = xp.zeros((base.shape[0], 2 * base.shape[1]) + base.shape[2:], base.dtype)
        big[:, 1::2] = base
        return big[:, 1::2]
    if kind == "every_axis_strided":
        big = xp.zeros(tuple(2 * s for s in base.shape), base.dtype)
        index = tuple(slice(None, None, 2) for _ in base.shape)
        big[index] = base
        return big[index]
    if kind == "reversed":
        flipped = xp.ascontiguousarray(base[::-1, ..., ::-1])
        return flipped[::-1, ..., ::-1]
    if kind == "broadcast":
        return xp.broadcast_to(base[:1], base.shape)
    if kind == "transposed":
        other = xp.ascontiguousarray(xp.moveaxis(base, channel_axis, 1 if channel_axis == -1 else -1))
        return xp.moveaxis(other, 1 if channel_axis == -1 else -1, channel_axis)
    if kind == "fortran":
        return xp.asfortranarray(base)
    if kind == "misaligned":  # one byte past an aligned address: no element at a multiple of its size
        raw = xp.zeros(base.nbytes + 1, xp.uint8)
        raw[1:] = xp.ascontiguousarray(base).view(xp.uint8).reshape(-1)
        return raw[1:].view(base.dtype).reshape(base.shape)
    if kind == "channel_strided":
        shape = list(base.shape)
        shape[channel_axis] *= 3
        big = xp.zeros(shape, base.dtype)
        index = [slice(None)] * base.ndim
        index[channel_axis] = slice(1, None, 3)
        big[tuple(index)] = base
        return big[tuple(index)]
    raise AssertionError(kind)


def base_for(kind, base):
    return np.ascontiguousarray(np.broadcast_to(base[:1], base.shape)) if kind == "broadcast" else base


def sliced_patches(x, offsets, patch, fill, channels_first):
    """Direct slicing of a padded copy (independent of the reference's index arithmetic)."""
    if channels_first:
        x = np.moveaxis(x, 1, -1)
    ndim = len(patch)
    pad = max(patch) + int(np.abs(offsets).max()) + 1
    padded = np.pad(x, [(0, 0)] + [(pad, pad)] * ndim + [(0, 0)], constant_values=fill)
    out = np.empty((x.shape[0], offsets.shape[1]) + tuple(patch) + (x.shape[-1],), x.dtype)
    for b in range(x.shape[0]):
        for k in range(offsets.shape[1]):
            index = tuple(slice(int(o) + pad, int(o) + pad + p) for o, p in zip(offsets[b, k], patch))
            out[b, k] = padded[(b,) + index]
    return np.moveaxis(out, -1, 2) if channels_first else out


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    return np.array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}"))


def draw_geometry(data):
    """One drawn case: channels_first, spatial and patch shapes (1-3 dims), batch, count, channels, a seeded rng."""
    ndim = data.draw(st.integers(1, 3), label="ndim")
    channels_first = data.draw(st.booleans(), label="channels_first")
    spatial = tuple(data.draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim), label="spatial"))
    patch = tuple(data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim), label="patch"))
    batch, count, channels = (data.draw(st.integers(1, 3), label=n) for n in ("batch", "count", "channels"))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    return channels_first, spatial, patch, batch, count, channels, rng


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_extract_any_layout(data):
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    dtype = np.dtype(data.draw(st.sampled_from(DTYPES), label="dtype"))
    channels_first, spatial, patch, batch, count, channels, rng = draw_geometry(data)
    base = base_for(kind, random_images(rng, images_shape(batch, spatial, channels, channels_first), dtype))
    x = view_of(base, kind, 1 if channels_first else -1)
    assert np.array_equal(x.view(f"u{dtype.itemsize}"), base.view(f"u{dtype.itemsize}"))
    offsets = np.stack([rng.integers(-p - 1, s + 1, size=(batch, count)) for s, p in zip(spatial, patch)], -1)
    offsets_kind = data.draw(st.sampled_from(["contiguous", "reversed", "fortran", "misaligned"]), label="offsets_kind")
    offsets_view = view_of(offsets, offsets_kind, -1)
    got = atskern.extract_patches(x, offsets_view, patch, fill=3, channels_first=channels_first)
    assert same_bits(got, reference.extract_patches(base, offsets, patch, fill=3, channels_first=channels_first))
    assert same_bits(got, sliced_patches(base, offsets, patch, np.asarray(3).astype(dtype), channels_first))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_scatter_any_layout(data):
    """Non-contiguous ``grad`` and ``offsets``: the reference's result on contiguous copies, and the adjoint."""
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    channels_first, spatial, patch, batch, count, channels, rng = draw_geometry(data)
    offsets = np.stack([rng.integers(-p - 1, s + 1, size=(batch, count)) for s, p in zip(spatial, patch)], -1)
    shape = (batch, count, channels) + patch if channels_first else (batch, count) + patch + (channels,)
    base = base_for(kind, rng.standard_normal(shape))
    grad = view_of(base, kind, 2 if channels_first else -1)
    got = atskern.scatter_patches(grad, view_of(offsets, "reversed", -1), spatial, channels_first=channels_first)
    expected = reference.scatter_patches(base, offsets, spatial, channels_first=channels_first)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    x = rng.standard_normal(images_shape(batch, spatial, channels, channels_first))
    forward = atskern.extract_patches(x, offsets, patch, channels_first=channels_first)
    assert np.isclose(np.vdot(forward, base), np.vdot(x, got), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels_first", [False, True], ids=["last", "first"])
def test_multiscale_and_offsets_any_layout(kind, channels_first):
    rng = np.random.default_rng(11)
    grid, shapes, patches = (4, 5), [(12, 15), (24, 30)], [(3, 3), (5, 4)]
    samples = np.stack([rng.integers(0, g, size=(2, 6)) for g in grid], -1).astype(np.int32)
    samples_view = view_of(samples, "reversed", -1)
    caxis = 1 if channels_first else -1
    bases = [base_for(kind, rng.standard_normal(images_shape(2, s, 3, channels_first))) for s in shapes]
    levels = [view_of(b, kind, caxis) for b in bases]
    got = atskern.extract_multiscale(levels, samples_view, grid, patches, margin=0.125, fill=-2.0,
                                     channels_first=channels_first)
    grads = []
    for base, shape, patch, result in zip(bases, shapes, patches, got):
        offsets = atskern.patch_offsets(samples_view, grid, shape, patch, margin=0.125)
        assert np.array_equal(offsets, reference.patch_offsets(samples, grid, shape, patch, margin=0.125))
        assert np.array_equal(result, reference.extract_patches(base, offsets, patch, fill=-2.0,
                                                                channels_first=channels_first))
        assert np.array_equal(result, sliced_patches(base, offsets, patch, -2.0, channels_first))
        grads.append(rng.standard_normal(result.shape))
    grad_views = [view_of(base_for(kind, g), kind, 2 if channels_first else -1) for g in grads]
    back = atskern.scatter_multiscale(grad_views, samples_view, grid, shapes, patches, margin=0.125,
                                      channels_first=channels_first)
    for g, shape, patch, result in zip(grad_views, shapes, patches, back):
        offsets = reference.patch_offsets(samples, grid, shape, patch, margin=0.125)
        expected = reference.scatter_patches(np.ascontiguousarray(g), offsets, shape, channels_first=channels_first)
        np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-12)


def test_issue_reproductions_layouts():
    """The views of the issue's item 6, verbatim."""
    rng = np.random.default_rng(1)
    x = rng.random((2, 20, 22, 3)).astype(np.float32)
    offsets = rng.integers(-3, 20, size=(2, 5, 2)).astype(np.int32)
    for view, cf in [(x[:, ::2], False), (x[::-1], False), (np.broadcast_to(x[:1], x.shape), False),
                     (x.transpose(0, 3, 1, 2), True)]:
        got = atskern.extract_patches(view, offsets, 4, channels_first=cf)
        assert np.array_equal(got, reference.extract_patches(np.ascontiguousarray(view), offsets, 4, channels_first=cf))


def test_strided_memmap_view_is_not_copied(tmp_path):
    """Strided views of a 4 GiB sparse memmap (channel-strided too): only the patches' pages are read."""
    report = run_next_to_big_memmap(
        tmp_path,
        """
        mm[0, 100:110, 200:210, :] = np.arange(400, dtype=np.uint8).reshape(10, 10, 4)
        rng = np.random.default_rng(0)
        views = [mm[:, ::2, ::3], mm[:, ::-1, :, ::2], mm.transpose(0, 3, 1, 2)]
        small = np.zeros((1, 16, 16, 4), np.uint8)
        twins = [small[:, ::2, ::3], small[:, ::-1, :, ::2], small.transpose(0, 3, 1, 2)]
        for twin, cf in zip(twins, (False, False, True)):  # compile each layout on a small twin first
            atskern.extract_patches(twin, np.zeros((1, 1, 2), np.int32), 2, channels_first=cf)
        before = peak_kib()
        results = []
        for v, cf in zip(views, (False, False, True)):
            spatial = v.shape[2:] if cf else v.shape[1:3]
            offsets = np.stack([rng.integers(0, s - 64, size=(1, 32)) for s in spatial], -1).astype(np.int32)
            offsets[0, 0] = (50, 200 // 3)  # over the written block in the first view
            patches = atskern.extract_patches(v, offsets, (64, 64), channels_first=cf)
            index = tuple(slice(int(o), int(o) + 64) for o in offsets[0, 0])
            direct = v[(0, slice(None)) + index] if cf else v[(0,) + index]
            results.append(bool(np.array_equal(patches[0, 0], direct)))
        after = peak_kib()
        print(json.dumps({"grew_kib": after - before, "file_bytes": mm.nbytes, "ok": results}))
        """,
    )
    assert report["ok"] == [True, True, True]
    assert report["grew_kib"] * 1024 < report["file_bytes"] / 8, report


# --- out= overlapping an input (item 4) ----------------------------------------------------------


def test_extract_out_overlapping_x_is_refused():
    x = np.zeros((2, 8, 8, 3), np.float32)
    offsets = np.zeros((2, 2, 2), np.int32)
    buffer = np.zeros(2 * 8 * 8 * 3 + 64, np.float32)
    x_in_buffer = buffer[: x.size].reshape(x.shape)
    out = buffer[40 : 40 + 2 * 2 * 3 * 3 * 3].reshape(2, 2, 3, 3, 3)
    with pytest.raises(ValueError, match=r"out shares memory with x"):
        atskern.extract_patches(x_in_buffer, offsets, 3, out=out)
    words = np.zeros(2 * 2 * 3 * 3 * 3 * 2, np.int32)
    with pytest.raises(ValueError, match=r"out shares memory with offsets"):
        atskern.extract_patches(x, words[:8].reshape(2, 2, 2), 3, out=words.view(np.float32)[:108].reshape(2, 2, 3, 3, 3))
    # interleaved but disjoint: accepted
    pair = np.zeros((2 * 108,), np.float32)
    result = atskern.extract_patches(x, offsets, 3, out=pair[:108].reshape(2, 2, 3, 3, 3))
    assert result.shape == (2, 2, 3, 3, 3)


def test_scatter_out_overlapping_grad_is_refused():
    grad = np.ones((1, 2, 2, 2, 1), np.float64)
    offsets = np.zeros((1, 2, 2), np.int64)
    buffer = np.zeros(64, np.float64)
    with pytest.raises(ValueError, match=r"out shares memory with grad"):
        atskern.scatter_patches(buffer[:8].reshape(grad.shape), offsets, (4, 4), out=buffer[4:20].reshape(1, 4, 4, 1))
    with pytest.raises(ValueError, match=r"out shares memory with offsets"):
        atskern.scatter_patches(grad, buffer[:4].view(np.int64).reshape(1, 2, 2), (4, 4),
                                out=buffer[:16].reshape(1, 4, 4, 1))
    disjoint = buffer[16:32].reshape(1, 4, 4, 1)
    assert atskern.scatter_patches(grad, offsets, (4, 4), out=disjoint) is disjoint


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "broadcast"] + ["broadcast"])
def test_gpu_any_layout_and_overlap(kind):
    """CuPy views (copied to contiguous images before the CUDA kernels) and CuPy ``out=`` overlap."""
    import cupy

    rng = np.random.default_rng(5)
    for channels_first in (False, True):
        base = base_for(kind, random_images(rng, images_shape(2, (9, 11), 3, channels_first), np.float32))
        view = view_of(cupy.asarray(base), kind, 1 if channels_first else -1) if kind != "broadcast" else \
            cupy.broadcast_to(cupy.asarray(base)[:1], base.shape)
        offsets = np.stack([rng.integers(-3, s + 1, size=(2, 4)) for s in (9, 11)], -1).astype(np.int32)
        got = atskern.extract_patches(view, cupy.asarray(offsets), (3, 4), channels_first=channels_first)
        want = reference.extract_patches(base, offsets, (3, 4), channels_first=channels_first)
        assert np.array_equal(cupy.asnumpy(got), want)
    buffer = cupy.zeros(4096, cupy.float32)
    x = buffer[:2 * 9 * 11 * 3].reshape(2, 9, 11, 3)
    out = buffer[100:100 + 2 * 4 * 3 * 4 * 3].reshape(2, 4, 3, 4, 3)
    with pytest.raises(ValueError, match=r"out shares memory with x"):
        atskern.extract_patches(x, cupy.zeros((2, 4, 2), cupy.int32), (3, 4), out=out)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_offsets_and_multiscale_any_layout(data):
    """patch_offsets and the multi-scale pair on views of samples, levels and grads (hypothesis)."""
    ndim = data.draw(st.integers(1, 3), label="ndim")
    channels_first = data.draw(st.booleans(), label="channels_first")
    grid = tuple(data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim), label="grid"))
    kinds = [data.draw(st.sampled_from(KINDS), label=f"kind{i}") for i in range(2)]
    samples_kind = data.draw(st.sampled_from(["contiguous", "reversed", "fortran", "strided"]), label="samples_kind")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    samples = np.stack([rng.integers(0, g, size=(2, 3)) for g in grid], -1)
    samples_view = view_of(samples, samples_kind, -1)
    shapes = [tuple(g * f for g in grid) for f in (2, 3)]
    patches = [tuple(int(v) for v in rng.integers(1, 4, size=ndim)) for _ in shapes]
    caxis = 1 if channels_first else -1
    bases = [base_for(k, rng.standard_normal(images_shape(2, s, 2, channels_first))) for k, s in zip(kinds, shapes)]
    levels = [view_of(b, k, caxis) for b, k in zip(bases, kinds)]
    margin = (1, tuple(2 * g + 1 for g in grid))
    got = atskern.extract_multiscale(levels, samples_view, grid, patches, margin=margin, channels_first=channels_first)
    grads = []
    for base, kind, shape, patch, result in zip(bases, kinds, shapes, patches, got):
        offsets = atskern.patch_offsets(samples_view, grid, shape, patch, margin=margin)
        assert np.array_equal(offsets, reference.patch_offsets(samples, grid, shape, patch, margin=margin))
        assert np.array_equal(result, sliced_patches(base, offsets, patch, 0.0, channels_first))
        grads.append(view_of(base_for(kind, rng.standard_normal(result.shape)), kind, 2 if channels_first else -1))
    back = atskern.scatter_multiscale(grads, samples_view, grid, shapes, patches, margin=margin,
                                      channels_first=channels_first)
    for g, shape, patch, result in zip(grads, shapes, patches, back):
        offsets = reference.patch_offsets(samples, grid, shape, patch, margin=margin)
        expected = reference.scatter_patches(np.ascontiguousarray(g), offsets, shape, channels_first=channels_first)
        np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", ["<", ">"])
def test_byte_swapped_float64_gradients_keep_float64_in_kernel_and_reference(order):
    """A big-endian float64 gradient accumulates in float64 in the kernel and in the reference alike (the
    reference once compared the dtype with float64 and summed byte-swapped ones in float32)."""
    grad = (np.arange(12.0).reshape(1, 2, 3, 2) / 3).astype(f"{order}f8")
    offsets = np.array([[[0], [2]]])
    got = atskern.scatter_patches(grad, offsets, (6,))
    want = reference.scatter_patches(grad, offsets, (6,))
    assert got.dtype == want.dtype == np.float64
    by_hand = np.zeros((1, 6, 2))
    for k, start in enumerate((0, 2)):
        by_hand[0, start:start + 3] += grad[0, k].astype(np.float64)
    assert np.array_equal(got, by_hand) and np.array_equal(want, by_hand)


def test_numpy_before_2_1_without_reshape_copy_gathers_and_scatters_the_same(monkeypatch):
    """NumPy 1.26 (the declared minimum) has no ``np.reshape(..., copy=False)``: the channels-last gather and
    scatter fall back to a reshape kept only where it is a view."""
    original = np.reshape

    def reshape_without_copy(array, shape, **kwargs):
        if "copy" in kwargs:
            raise TypeError("reshape() got an unexpected keyword argument 'copy'")
        return original(array, shape, **kwargs)

    monkeypatch.setattr(np, "reshape", reshape_without_copy)
    rng = np.random.default_rng(5)
    image = rng.random((2, 9, 11, 3)).astype(np.float32)
    offsets = rng.integers(-4, 12, size=(2, 5, 2))
    for x in (image, image[:, ::2], image.transpose(0, 2, 1, 3), image[..., ::-1]):
        np.testing.assert_array_equal(atskern.extract_patches(x, offsets, (4, 5)),
                                      reference.extract_patches(x, offsets, (4, 5)))
    grad = rng.random((2, 5, 4, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(atskern.scatter_patches(grad, offsets, (9, 11)),
                               reference.scatter_patches(grad, offsets, (9, 11)), rtol=1e-6)
