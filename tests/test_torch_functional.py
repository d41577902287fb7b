"""ats.torch functional API: sampling, estimator and patch ops against atskern, exact gradients, zero-copy bridge."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import atskern  # noqa: E402
from ats.torch import _bridge, _ops  # noqa: E402
from ats.torch import functional as F  # noqa: E402

from .enumeration import all_draws, expect_at  # noqa: E402

needs_patches = pytest.mark.skipif(not hasattr(atskern, "extract_patches"), reason="atskern without the patch kernels")


def _key(seed: int) -> torch.Tensor:
    return torch.tensor(seed, dtype=torch.int64)


# --- sampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("grid", [(7,), (5, 6), (3, 4, 2)])
def test_sample_draws_what_the_kernel_draws(replace, grid):
    attention = torch.rand((3, *grid), dtype=torch.float64) + 0.01
    indices, sampled = F.sample(attention, 4, replace=replace, key=_key(1234))
    want_indices, want_probs = atskern.sample(attention.numpy(), 4, replace=replace, seed=1234)
    assert indices.dtype == torch.int64 and indices.shape == (3, 4, len(grid))
    np.testing.assert_array_equal(indices.numpy(), want_indices)
    np.testing.assert_allclose(sampled.detach().numpy(), want_probs, rtol=1e-12)


def test_sampled_attention_is_a_differentiable_gather():
    attention = (torch.rand(2, 4, 5, dtype=torch.float64) + 0.1).requires_grad_()
    indices, sampled = F.sample(attention, 3, key=_key(7))
    weights = torch.randn(2, 3, dtype=torch.float64)
    (sampled * weights).sum().backward()
    a = attention.detach()
    expected = torch.zeros_like(a)
    for b in range(2):
        total = a[b].sum()
        for k in range(3):
            i, j = indices[b, k].tolist()
            assert sampled[b, k].item() == pytest.approx((a[b, i, j] / total).item(), rel=1e-14)
            expected[b, i, j] += weights[b, k] / total
        expected[b] -= (weights[b] * sampled[b].detach()).sum() / total
    torch.testing.assert_close(attention.grad, expected, rtol=1e-12, atol=1e-12)


def test_sample_is_reproducible_from_torch_manual_seed():
    attention = torch.rand(2, 30)
    torch.manual_seed(3)
    first = F.sample(attention, 5)[0]
    torch.manual_seed(3)
    again = F.sample(attention, 5)[0]
    other = F.sample(attention, 5)[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    big = 2**64 - 5  # ints and int64 tensors name the same 64-bit key
    assert torch.equal(F.sample(attention, 5, key=big)[0], F.sample(attention, 5, key=torch.tensor(-5))[0])
    with pytest.raises(TypeError, match="key must be an int"):
        F.sample(attention, 5, key=-1)


def test_sample_casts_half_precision_attention():
    attention = (torch.rand(2, 6, 6) + 0.1).to(torch.bfloat16)
    indices, sampled = F.sample(attention, 3, key=_key(5))
    assert sampled.dtype == torch.bfloat16 and indices.shape == (2, 3, 2)


def test_topk_takes_the_largest_first():
    attention = torch.tensor([[[0.1, 0.5], [0.3, 0.1]], [[0.05, 0.05], [0.2, 0.7]]])
    indices, sampled = F.sample(attention, 3, deterministic=True)
    assert indices.tolist() == [[[0, 1], [1, 0], [0, 0]], [[1, 1], [1, 0], [0, 0]]]
    torch.testing.assert_close(sampled[1], torch.tensor([0.7, 0.2, 0.05]))


def test_topk_breaks_ties_to_the_lower_position():
    """As ``tf.math.top_k`` and ``lax.top_k`` (a Keras model's top-k predicts the same on every backend):
    against NumPy's stable sort, on rows of few distinct values, uniform rows and rows tied across the n-th."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        rows, size = rng.integers(1, 4), rng.integers(1, 70)
        n = int(rng.integers(1, size + 1))
        attention = rng.integers(1, rng.integers(2, 6), (rows, size)).astype(np.float32)
        want = np.argsort(-attention, axis=1, kind="stable")[:, :n]
        indices, _ = F.sample(torch.from_numpy(attention), n, deterministic=True)
        assert np.array_equal(indices[..., 0].numpy(), want), (attention, n)
    assert F.top_indices(torch.empty((2, 50), device="meta"), 5).shape == (2, 5)  # Keras' shape inference


def test_sample_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"attention must be \(batch, \*grid\)"):
        F.sample(torch.rand(5), 2)
    with pytest.raises(ValueError, match=r"attention must be \(batch, \*grid\)"):
        F.sample(torch.rand(1, 2, 2, 2, 2), 2)
    with pytest.raises(ValueError, match="n_samples=7 is larger than the 6 positions"):
        F.sample(torch.rand(2, 2, 3), 7)
    with pytest.raises(ValueError, match="n_samples=7 is larger than the 6 positions"):
        F.sample(torch.rand(2, 2, 3), 7, replace=True, deterministic=True)
    assert F.sample(torch.rand(2, 2, 3), 7, replace=True)[0].shape == (2, 7, 2)
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        F.sample(torch.rand(2, 6), 0)
    with pytest.raises(TypeError, match="attention must be a torch.Tensor"):
        F.sample(np.ones((2, 6)), 2)
    with pytest.raises(TypeError, match="attention must be a floating tensor"):
        F.sample(torch.ones(2, 6, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="attention row 1 has no positive weight"):
        F.sample(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), 1, key=_key(0))


# --- the estimator ----------------------------------------------------------------------------


def _estimator_inputs(rows, n, feature_shape, seed=0):
    rng = np.random.default_rng(seed)
    raw = rng.random((rows, n + 3)) + 0.05
    probs = (raw / raw.sum(axis=1, keepdims=True))[:, :n]
    return rng.normal(size=(rows, n, *feature_shape)), probs, rng.normal(size=(rows, *feature_shape))


def _torch_grads(features, probs, grad, replace):
    f = torch.from_numpy(features).requires_grad_()
    p = torch.from_numpy(probs).requires_grad_()
    value = F.expectation(f, p, replace=replace)
    value.backward(torch.from_numpy(grad))
    return value.detach().numpy(), p.grad.numpy(), f.grad.numpy()


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("feature_shape", [(), (5,), (2, 3)])
def test_expectation_equals_atskern(replace, feature_shape):
    features, probs, grad = _estimator_inputs(4, 6, feature_shape)
    value, grad_probs, grad_features = _torch_grads(features, probs, grad, replace)
    want_gp, want_gf = atskern.expectation_grad(grad, features, probs, replace=replace)
    np.testing.assert_allclose(value, atskern.expectation(features, probs, replace=replace), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_probs, want_gp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_features, want_gf, rtol=1e-12, atol=1e-12)


def test_expectation_float32_and_partial_gradients():
    features, probs, grad = _estimator_inputs(3, 4, (5,), seed=2)
    f = torch.from_numpy(features).float().requires_grad_()
    p = torch.from_numpy(probs).float()
    value = F.expectation(f, p)
    value.backward(torch.from_numpy(grad).float())
    assert value.dtype == torch.float32 and p.grad is None
    np.testing.assert_allclose(f.grad.numpy(), atskern.expectation_grad(grad, features, probs)[1], rtol=1e-5)


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("K", [2, 4, 6])
def test_estimator_gradients_are_unbiased_by_enumeration(K, replace):
    rng = np.random.default_rng(K + 10 * replace)
    for n in range(1, K + 1):
        if replace and K**n > 50_000:
            continue
        a = rng.random(K) + 0.1
        a /= a.sum()
        f, g = rng.normal(size=(K, 3)), rng.normal(size=3)
        seqs, weight = all_draws(a, n, replace)
        value, grad_probs, grad_features = _torch_grads(f[seqs], a[seqs], np.tile(g, (len(seqs), 1)), replace)
        estimate = [math.fsum(weight * value[:, c]) for c in range(3)]
        np.testing.assert_allclose(estimate, a @ f, rtol=0, atol=1e-12)
        np.testing.assert_allclose(expect_at(seqs, weight[:, None] * grad_probs, K), f @ g, rtol=0, atol=1e-12)
        np.testing.assert_allclose(
            expect_at(seqs, weight[:, None, None] * grad_features, K), a[:, None] * g, rtol=0, atol=1e-12
        )


def test_expectation_errors_name_the_argument():
    f, p = torch.rand(2, 3, 4), torch.rand(2, 3)
    with pytest.raises(ValueError, match=r"probs must be \(batch, n\)"):
        F.expectation(f, p[0])
    with pytest.raises(ValueError, match=r"features must be \(batch, n, \.\.\.\)"):
        F.expectation(f[:, :2], p)
    with pytest.raises(TypeError, match="features and probs must be floating"):
        F.expectation(f.long(), p)
    with pytest.raises(TypeError, match="replace must be True or False"):
        F.expectation(f, p, replace=1)


# --- patches ----------------------------------------------------------------------------------


def _slice_patches(x, offsets, size, fill, channels_first):
    """Patches by plain slicing of a padded copy (the obvious oracle)."""
    if not channels_first:
        x = torch.movedim(x, -1, 1)
    pad = max(size) + int(offsets.abs().max())
    padded = torch.nn.functional.pad(x.double(), (pad,) * (2 * len(size)), value=float(fill)).to(x.dtype)
    out = []
    for b in range(x.shape[0]):
        row = []
        for k in range(offsets.shape[1]):
            region = tuple(slice(int(o) + pad, int(o) + pad + s) for o, s in zip(offsets[b, k], size))
            row.append(padded[(b, slice(None)) + region])
        out.append(torch.stack(row))
    out = torch.stack(out)
    return out if channels_first else torch.movedim(out, 2, -1)


@needs_patches
@pytest.mark.parametrize("channels_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.int64])
def test_extract_equals_slicing(dtype, channels_first):
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 3, 9, 11, generator=gen) * 100).to(dtype)
    if not channels_first:
        x = torch.movedim(x, 1, -1).contiguous()
    offsets = torch.randint(-4, 10, (2, 5, 2), generator=gen, dtype=torch.int32)
    got = F.extract_patches(x, offsets, (4, 3), fill=7, channels_first=channels_first)
    assert got.dtype == dtype
    assert torch.equal(got, _slice_patches(x, offsets, (4, 3), 7, channels_first))


@needs_patches
@pytest.mark.parametrize(
    "spatial, size, channels_first",
    [((9,), (4,), True), ((5, 4), (3, 2), True), ((5, 4), (3, 2), False), ((3, 4, 3), (2, 3, 2), True)],
)
def test_extract_gradcheck_float64(spatial, size, channels_first):
    # small: the numerical Jacobian calls the kernels twice per input element
    gen = torch.Generator().manual_seed(1)
    shape = (2, 2, *spatial) if channels_first else (2, *spatial, 2)
    if len(spatial) == 3:
        shape = (1, 2, *spatial)
    x = torch.rand(shape, dtype=torch.float64, generator=gen).requires_grad_()
    high = torch.tensor(spatial)
    offsets = (torch.rand(shape[0], 3, len(spatial), generator=gen) * (high + 2) - 2).to(torch.int32)
    offsets[0, 1] = offsets[0, 0]  # an exact overlap
    fn = lambda x: F.extract_patches(x, offsets, size, channels_first=channels_first)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


@needs_patches
def test_extract_backward_skips_the_scatter_when_the_image_needs_no_gradient(monkeypatch):
    calls = []
    real = _ops.scatter_as
    monkeypatch.setattr(_ops, "scatter_as", lambda *args: calls.append(1) or real(*args))
    x = torch.rand(1, 2, 8, 8)
    offsets = torch.zeros(1, 2, 2, dtype=torch.int32)
    weight = torch.ones(1, requires_grad=True)
    (F.extract_patches(x, offsets, 3) * weight).sum().backward()
    assert calls == [] and weight.grad is not None
    x.requires_grad_()
    F.extract_patches(x, offsets, 3).sum().backward()
    assert calls == [1]
    assert x.grad[0, :, :3, :3].eq(2).all() and x.grad.sum() == 2 * 2 * 9


@needs_patches
def test_half_precision_gradient_accumulates_in_float32():
    x = torch.zeros(1, 1, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    offsets = torch.zeros(1, 300, 2, dtype=torch.int32)  # 300 overlapping patches: 300 is not a bfloat16 sum of ones
    F.extract_patches(x, offsets, 2).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad[0, 0, 0, 0].item() == 300


@needs_patches
def test_patch_offsets_equal_atskern():
    samples = torch.tensor([[[12, 0], [0, 24], [5, 7]]], dtype=torch.int32)
    got = F.patch_offsets(samples, (25, 25), (1000, 1000), 50)
    assert got[0, 0].tolist() == [475, -5]
    want = atskern.patch_offsets(samples.numpy(), (25, 25), (1000, 1000), (50, 50))
    np.testing.assert_array_equal(got.numpy(), want)
    rng = np.random.default_rng(0)
    cells = rng.integers(0, [17, 23], size=(3, 40, 2)).astype(np.int32)
    for margin in (0.0, 0.03125, 0.1):
        got = F.patch_offsets(torch.from_numpy(cells), (17, 23), (999, 1500), (37, 64), margin=margin)
        want = atskern.patch_offsets(cells, (17, 23), (999, 1500), (37, 64), margin=margin)
        np.testing.assert_array_equal(got.numpy(), want)


@needs_patches
def test_extract_multiscale_equals_atskern_and_scatters_into_each_level():
    gen = torch.Generator().manual_seed(4)
    levels = [torch.rand(2, 3, 40, 40, generator=gen, dtype=torch.float64).requires_grad_(),
              torch.rand(2, 3, 20, 20, generator=gen, dtype=torch.float64).requires_grad_()]
    samples = torch.randint(0, 10, (2, 4, 2), generator=gen, dtype=torch.int32)
    patches = F.extract_multiscale(levels, samples, (10, 10), [8, (4, 6)], margin=0.05)
    want = atskern.extract_multiscale([x.detach().numpy() for x in levels], samples.numpy(), (10, 10), [8, (4, 6)],
                                      margin=0.05, channels_first=True)
    for got, expected in zip(patches, want):
        np.testing.assert_array_equal(got.detach().numpy(), expected)
    grads = [torch.rand_like(p) for p in patches]
    torch.autograd.backward(patches, grads)
    want_grads = atskern.scatter_multiscale([g.numpy() for g in grads], samples.numpy(), (10, 10), [(40, 40), (20, 20)],
                                            [8, (4, 6)], margin=0.05, channels_first=True)
    for x, expected in zip(levels, want_grads):
        np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-15)


@needs_patches
def test_extract_errors_name_the_argument():
    x = torch.rand(1, 2, 8, 8)
    offsets = torch.zeros(1, 3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"x must be \(batch, channels, \*spatial\)"):
        F.extract_patches(x[0, 0], offsets, 2)
    with pytest.raises(ValueError, match=r"offsets must be \(batch, K, 2\)"):
        F.extract_patches(x, offsets[..., :1], 2)
    with pytest.raises(TypeError, match="offsets must be an integer tensor"):
        F.extract_patches(x, offsets.float(), 2)
    with pytest.raises(ValueError, match="patch_size must have 2 entries"):
        F.extract_patches(x, offsets, (2, 2, 2))
    with pytest.raises(ValueError, match=r"patch_size must be > 0 in every dim, got \(2, 0\)"):
        F.extract_patches(x, offsets, (2, 0))
    with pytest.raises(ValueError, match="patch_sizes must hold one patch size per level"):
        F.extract_multiscale([x, x], offsets, (4, 4), [2])
    with pytest.raises(ValueError, match="levels must hold at least one level"):
        F.extract_multiscale([], offsets, (4, 4), [])
    for bad in (None, 0, "no"):  # None and 0 once read x as channels-last, "no" as channels-first
        with pytest.raises(TypeError, match="channels_first must be True or False"):
            F.extract_patches(x, offsets, 2, channels_first=bad)
        with pytest.raises(TypeError, match="channels_first must be True or False"):
            F.extract_multiscale([x], offsets, (4, 4), [2], channels_first=bad)
    for huge in ((2**40, 2**40), (2**17, 2**17)):  # torch's own errors once came from allocating the output
        with pytest.raises(ValueError, match=r"x's batch, the offsets and patch_size give an output of shape"):
            F.extract_patches(x, offsets, huge)


def test_unsigned_cells_past_int64_lie_outside_every_level():
    """uint64 cells of 2**63 and more clamp as atskern's do (a cast to int64 wrapped them to negative cells, whose
    patches held pixels of the image instead of ``fill``)."""
    cells = torch.tensor([[[2**64 - 1], [2**63], [5]]], dtype=torch.uint64)
    got = F.patch_offsets(cells, (25,), (1000,), 50)
    np.testing.assert_array_equal(got.numpy(), atskern.patch_offsets(cells.numpy(), (25,), (1000,), 50))
    assert got[0, :2, 0].tolist() == [2**31 - 1] * 2


# --- the zero-copy bridge ---------------------------------------------------------------------


def test_cpu_bridge_shares_memory_both_ways():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    array = _bridge.to_kernel(t)
    assert isinstance(array, np.ndarray) and array.ctypes.data == t.data_ptr()
    back = _bridge.from_kernel(array)
    assert back.data_ptr() == t.data_ptr()
    bf = torch.ones(4, dtype=torch.bfloat16)
    assert _bridge.to_kernel(_bridge.byte_twin(bf)).dtype == np.int16


@needs_patches
def test_extract_kernel_writes_into_the_returned_tensor(monkeypatch):
    seen = {}
    real = atskern.extract_patches

    def spy(*args, **kwargs):
        seen["out"] = kwargs["out"]
        return real(*args, **kwargs)

    monkeypatch.setattr(atskern, "extract_patches", spy)
    patches = F.extract_patches(torch.rand(1, 1, 6, 6), torch.zeros(1, 1, 2, dtype=torch.int32), 2)
    assert patches.data_ptr() == seen["out"].ctypes.data


@pytest.mark.parametrize("replace", [False, True])
def test_estimator_on_kernel_draws_equals_atskern_expectation_grad(replace):
    """Sample with the kernel, estimate in torch, backpropagate: the same gradients as atskern on those draws."""
    rng = np.random.default_rng(9)
    attention = torch.from_numpy(rng.random((3, 4, 5)) + 0.05).requires_grad_()
    indices, sampled = F.sample(attention, 6, replace=replace, key=_key(21))
    _, probs = atskern.sample(attention.detach().numpy(), 6, replace=replace, seed=21)
    features = torch.from_numpy(rng.normal(size=(3, 6, 2))).requires_grad_()
    grad = rng.normal(size=(3, 2))
    sampled.retain_grad()
    F.expectation(features, sampled, replace=replace).backward(torch.from_numpy(grad))
    want_gp, want_gf = atskern.expectation_grad(grad, features.detach().numpy(), probs, replace=replace)
    np.testing.assert_allclose(sampled.grad.numpy(), want_gp, rtol=1e-10)
    np.testing.assert_allclose(features.grad.numpy(), want_gf, rtol=1e-12)


# --- the custom ops' registrations --------------------------------------------------------------


@needs_patches
@pytest.mark.parametrize("channels_first", [True, False])
def test_patch_ops_pass_opcheck(channels_first):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the patch ops."""
    x = torch.rand((2, 3, 9, 8) if channels_first else (2, 9, 8, 3), dtype=torch.float64, requires_grad=True)
    offsets = torch.randint(-2, 8, (2, 4, 2), dtype=torch.int32)
    torch.library.opcheck(_ops.extract, (x, offsets, [3, 4], 0.0, channels_first))
    grad = torch.rand((2, 4, 3, 3, 4) if channels_first else (2, 4, 3, 4, 3), dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(_ops.scatter, (grad, offsets, [9, 8], channels_first))


@needs_patches
def test_eager_functions_equal_the_custom_ops():
    """Eager calls skip the custom ops' dispatch (autograd Functions over the same implementations): values, first
    and second derivatives equal the custom ops', which torch.compile traces."""
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 9, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    offsets = torch.randint(-2, 8, (2, 5, 2), dtype=torch.int32, generator=gen)
    weight = torch.rand(2, 5, 3, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    outer = torch.rand(2, 3, 9, 8, dtype=torch.float64, generator=gen)

    def derivatives(extract):
        out = extract(x, offsets, [3, 4], 0.0, True)
        (grad,) = torch.autograd.grad((out * weight).sum(), x, create_graph=True)  # the scatter of weight
        (second,) = torch.autograd.grad((grad * outer).sum(), weight)  # the scatter's backward: a gather
        return out, grad, second

    for eager, op in zip(derivatives(_ops.extract_patches), derivatives(_ops.extract)):
        assert torch.equal(eager, op)
    attention = torch.rand(3, 7, 6, generator=gen)
    key = torch.tensor(11)
    assert torch.equal(_ops.sample_patches_indices(attention, key, 5, False), _ops.sample_indices(attention, key, 5, False))


@needs_patches
def test_meta_tensors_take_the_custom_ops_fake_implementations():
    """Keras builds a model by calling it on meta tensors: sampling and gathers then give shapes, not kernels."""
    attention = torch.rand(2, 6, 7, device="meta")
    indices = _ops.sample_patches_indices(attention, torch.tensor(3, device="meta"), 4, False)
    assert indices.device.type == "meta" and tuple(indices.shape) == (2, 4, 2)
    patches = _ops.extract_patches(torch.rand(2, 3, 30, 40, device="meta"), torch.zeros(2, 4, 2, dtype=torch.int32,
                                   device="meta"), [5, 6], 0.0, True)
    assert patches.device.type == "meta" and tuple(patches.shape) == (2, 4, 3, 5, 6)


def test_sample_op_passes_opcheck():
    torch.library.opcheck(_ops.sample_indices, (torch.rand(2, 5, 6), torch.tensor(3), 4, False))


@pytest.mark.parametrize("attention, dtype", [(torch.full((1, 64, 64), 20.0), torch.float16),
                                              (torch.tensor([[1e308, 1e308, 1.0]], dtype=torch.float64), torch.float64)])
def test_sampled_attention_when_the_row_sum_overflows_its_dtype(attention, dtype):
    """Unnormalized rows whose sum overflows the attention's dtype: the sampled attention is each drawn cell's
    share of the row, as atskern's probabilities (the division by an inf sum gave 0 everywhere)."""
    attention = attention.to(dtype)
    indices, sampled = F.sample(attention, 2, key=5)
    row = attention.reshape(-1).to(torch.float64).tolist()
    top = max(row)
    share = math.fsum(v / top for v in row)  # the row's sum over its largest: finite, unlike the sum
    want = torch.tensor([[row[i] / top / share for i in F._ravel(indices, tuple(attention.shape[1:]))[0].tolist()]],
                        dtype=torch.float64)
    assert sampled.dtype == dtype and torch.all(sampled > 0)
    torch.testing.assert_close(sampled.to(torch.float64), want, rtol=1e-3 if dtype == torch.float16 else 1e-12,
                               atol=0)
    _, probs = atskern.sample(attention.to(torch.float64).numpy(), 2, seed=5)
    np.testing.assert_allclose(sampled.to(torch.float64).numpy(), probs, rtol=1e-3)


def test_sampled_attention_gradient_with_the_row_scaling():
    """The row's largest weight scales the float64 sum but is detached: the gradient is that of gather / sum."""
    x = (torch.rand(3, 7, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: F.sample(x, 3, key=2)[1], (x,))
    indices, sampled = F.sample(x, 3, key=2)
    flat_index = indices[..., 0]
    (x.gather(1, flat_index) / x.sum(dim=1, keepdim=True)).sum().backward()
    want, x.grad = x.grad, None
    sampled.sum().backward()
    torch.testing.assert_close(x.grad, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("row, message", [
    ([1.0, float("nan"), 0.5], "attention row 0 contains NaN or inf"),
    ([1.0, -3.0, 0.5], "attention row 0 has 1 negative weights"),
    ([0.0, 0.0, 0.0], "attention row 0 has no positive weight"),
])
def test_top_k_mode_refuses_the_rows_sampling_refuses(row, message):
    attention = torch.tensor([[0.2, 0.3, 0.5], row])
    with pytest.raises(ValueError, match=message.replace("row 0", "row 1")):
        F.sample(attention, 2, deterministic=True)
    with pytest.raises(ValueError, match=message.replace("row 0", "row 1")):
        F.sample(attention, 2, key=1)
    F.sample(attention, 2, deterministic=True, validate=False)  # the explicit opt-out


def test_top_k_mode_strict_and_fillers():
    attention = torch.tensor([[1.0, 0.0, 0.5]])
    with pytest.raises(ValueError, match="only 2 positive weights, fewer than n=3"):
        F.sample(attention, 3, deterministic=True, strict=True)
    indices, sampled = F.sample(attention, 3, deterministic=True)
    assert indices[0, :, 0].tolist() == [0, 2, 1] and sampled[0, 2] == 0


@pytest.mark.parametrize("name", ["replace", "deterministic", "strict", "validate"])
def test_sample_flags_must_be_bools(name):
    with pytest.raises(TypeError, match=f"{name} must be True or False, got 'False'"):
        F.sample(torch.rand(1, 4, 4), 2, key=1, **{name: "False"})


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn])
def test_complex_and_float8_images_are_refused_by_name(dtype):
    x = torch.zeros(1, 2, 4, 4).to(dtype)
    with pytest.raises(TypeError, match=rf"x must be a real, integer or bool tensor, got {dtype}"):
        F.extract_patches(x, torch.zeros(1, 1, 2, dtype=torch.int64), 2)
    view = torch.zeros(1, 2, 4, 4, dtype=dtype).view(torch.uint8 if dtype.itemsize == 1 else torch.int64)
    assert F.extract_patches(view, torch.zeros(1, 1, 2, dtype=torch.int64), 2).shape == (1, 1, 2, 2, 2)


def test_probs_error_shows_a_plain_float():
    with pytest.raises(ValueError, match=r"probs row 0 has -0.5 at draw 1"):
        F.expectation(torch.ones(1, 2, 3), torch.tensor([[0.5, -0.5]]))
