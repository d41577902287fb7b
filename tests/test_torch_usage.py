"""ats.torch under the ways users run models: torch.compile with symbolic scalars, strided images, CPU autocast,
activation checkpointing."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import atskern  # noqa: E402
import ats.torch as at  # noqa: E402
from ats.torch import functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402


def test_patch_offsets_compile_fullgraph_with_dynamic_shapes():
    """dynamic=True makes the default margin 0.0 a symbolic float: the margin check must not break the graph."""
    cells = torch.randint(0, 6, (2, 4, 2), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(lambda s: F.patch_offsets(s, (6, 6), (30, 30), (5, 5)), fullgraph=True, dynamic=True)
    want = atskern.patch_offsets(cells.numpy(), (6, 6), (30, 30), (5, 5))
    np.testing.assert_array_equal(compiled(cells).numpy(), want)


def test_extract_patches_compiles_fullgraph_with_fill_an_argument():
    """The second distinct fill makes dynamo trace it as a symbolic number: the fill check must trace."""
    offsets = torch.tensor([[[0, 0], [7, 6]]])
    x = torch.randn(1, 3, 10, 11, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, fill: F.extract_patches(x, offsets, 4, fill=fill), fullgraph=True)
    for fill in (0, 7, 9, 0.5, 2.5):
        got = compiled(x, fill)
        assert got[0, 1, :, 3, :].eq(fill).all()  # row 10 of a 10-row image
        np.testing.assert_array_equal(got[0, 1, :, :3, :].numpy(), x[0, :, 7:, 6:10].numpy())


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "expanded"])
def test_a_strided_image_is_read_in_place_not_copied(layout, monkeypatch):
    """A channels_last, sliced or expanded CPU image goes to the kernel as a view of its own memory (a contiguous
    copy cost the whole image per call), and the patches equal plain slicing."""
    base = torch.arange(2 * 3 * 20 * 24, dtype=torch.float32).reshape(2, 3, 20, 24)
    x = {"channels_last": base.to(memory_format=torch.channels_last),
         "sliced": base[:, :, ::2, 1::2],
         "expanded": base[:1].expand(2, 3, 20, 24)}[layout]
    assert not x.is_contiguous()
    seen = []
    kernel = atskern.extract_patches

    def spy(image, *args, **kwargs):
        seen.append(image)
        return kernel(image, *args, **kwargs)

    monkeypatch.setattr(atskern, "extract_patches", spy)
    offsets = torch.tensor([[[1, 2], [-2, 5]], [[3, 0], [4, 4]]])
    got = F.extract_patches(x, offsets, (3, 4))
    (image,) = seen
    assert image.__array_interface__["data"][0] == x.data_ptr() and not image.flags.c_contiguous
    padded = torch.nn.functional.pad(x, (2, 4, 2, 3))
    for b in range(2):
        for k in range(2):
            r, c = (int(v) for v in offsets[b, k])
            np.testing.assert_array_equal(got[b, k].numpy(), padded[b, :, r + 2:r + 5, c + 2:c + 6].numpy())


def test_sample_softmax_under_cpu_autocast_runs_in_float32():
    """CPU autocast leaves softmax in float16 (CUDA's runs it in float32): the sampled attention's gradient on a
    256² map then overflowed float16 and every attention-network gradient was NaN."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, 3, padding=1)
    with torch.autocast("cpu", dtype=torch.float16):
        logits = conv(torch.rand(1, 1, 256, 256))
        assert logits.dtype == torch.float16
        attention = at.SampleSoftmax(squeeze_channels=True)(logits)
        assert attention.dtype == torch.float32
        sampled = F.sample(attention, 5, key=torch.tensor(3))[1]
        features = torch.full((1, 5, 4), 100.0, dtype=torch.float16)
        loss = F.expectation(features, sampled).float().sum()
    loss.backward()
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0
    np.testing.assert_allclose(attention.sum().item(), 1.0, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert at.SampleSoftmax()(torch.rand(2, 4, 4, dtype=torch.bfloat16)).dtype == torch.float32
    assert at.SampleSoftmax()(torch.rand(2, 4, 4, dtype=torch.float16)).dtype == torch.float16  # no autocast


def _model(seed):
    torch.manual_seed(0)
    attention = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), at.SampleSoftmax(squeeze_channels=True))
    feature = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    return at.AttentionSampling(attention, feature, patch_size=6, n_patches=3, seed=seed)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_a_seeded_module_is_refused(use_reentrant):
    """Checkpoint's recomputation drew a second key from the module's own stream: other patches, so gradients
    that belong to neither draw (max difference 0.74). It is refused; with seed=None (torch's generator, which
    checkpoint restores) the checkpointed gradients equal the plain ones."""
    x_low = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
    x_high = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    seeded = _model(5)
    out = checkpoint(lambda a, b: seeded(a, b)[0], x_low, x_high, use_reentrant=use_reentrant)
    with pytest.raises(RuntimeError, match="seed=5 is being run inside a backward pass"):
        out.sum().backward()

    plain, checkpointed = _model(None), _model(None)
    torch.manual_seed(123)
    plain(x_low, x_high)[0].sum().backward()
    torch.manual_seed(123)
    checkpoint(lambda a, b: checkpointed(a, b)[0], x_low, x_high, use_reentrant=use_reentrant).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_torch_func_transforms_of_the_kernels_get_a_clear_error():
    """The kernels read the tensors' data, which torch.func's wrappers do not hold: torch's own message
    ("Cannot access data pointer", "must override the setup_context") named neither the call nor a way out."""
    from torch.func import grad, vmap

    x = torch.rand(2, 1, 8, 8)
    offsets = torch.zeros(2, 3, 2, dtype=torch.int64)
    with pytest.raises(NotImplementedError, match="extract_patches does not run under torch.func transforms"):
        grad(lambda x: F.extract_patches(x, offsets, 3).sum())(x)
    with pytest.raises(NotImplementedError, match="extract_patches does not run under torch.func transforms"):
        vmap(lambda x: F.extract_patches(x, offsets, 3))(x[None].expand(2, -1, -1, -1, -1))
    attention = torch.full((2, 4, 4), 1 / 16)
    with pytest.raises(NotImplementedError, match="sample does not run under torch.func transforms"):
        grad(lambda a: F.sample(a, 2, key=torch.tensor(1))[1].sum())(attention)


def _trace(function, *args):
    with pytest.warns(Warning):  # torch's TracerWarnings and jit.trace's deprecation notice
        return torch.jit.trace(function, args, check_trace=False)


def test_jit_trace_draws_fresh_and_checks_at_every_call():
    """torch.jit.trace recorded a direct kernel call's result as a constant: the trace returned the cells drawn
    while tracing for every map and key (cells of weight 0 for a new map). The kernels are ops of the trace now,
    and the checks too (a check in Python ran once, at trace time: the trace took probs summing to 2.7)."""
    gen = torch.Generator().manual_seed(3)
    traced = _trace(lambda a, k: F.sample(a, 3, key=k), torch.rand(2, 6, 6, generator=gen), torch.tensor(5))
    new = torch.rand(2, 6, 6, generator=gen) * (torch.rand(2, 6, 6, generator=gen) < 0.4)
    draws = []
    for key in (9, 10):
        got, want = traced(new, torch.tensor(key)), F.sample(new, 3, key=key)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        draws.append(got[0])
    assert not torch.equal(draws[0][0], draws[1][0])
    top_k = _trace(lambda a: F.sample(a, 3, deterministic=True), torch.rand(2, 6, 6, generator=gen))
    torch.testing.assert_close(top_k(new), F.sample(new, 3, deterministic=True), rtol=0, atol=0)

    probs = torch.tensor([[0.2, 0.3, 0.1]], dtype=torch.float64, requires_grad=True)
    features = torch.randn(1, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    estimate = _trace(lambda f, p: F.expectation(f, p), features, probs)
    traced_grads = torch.autograd.grad(estimate(features, probs).sum(), (features, probs))
    for got, want in zip(traced_grads, torch.autograd.grad(F.expectation(features, probs).sum(), (features, probs))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="ValueError: probs row 0 sums to 2.7"):
        estimate(features, torch.full((1, 3), 0.9, dtype=torch.float64))
    nan_row = new.clone()
    nan_row[1, 2, 2] = float("nan")
    for function in (top_k, lambda a: traced(a, torch.tensor(1))):
        with pytest.raises(RuntimeError, match="(?s)ValueError: .*row 1"):
            function(nan_row)


def test_jit_trace_of_a_module_draws_from_torch_generator_or_is_refused():
    """A SamplePatches trace failed on the tensors a traced shape holds (grid_shape 'got tensor(8)'); with
    seed=None its key is a traced torch.randint (fresh patches per call, as eager under the same torch seed); a
    seeded stream's key would be a constant of the trace and is refused."""
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 1, 32, 32, generator=gen)
    low = nn.functional.avg_pool2d(x, 4)
    attention = torch.softmax(torch.randn(2, 64, generator=gen), 1).reshape(2, 8, 8)
    layer = at.SamplePatches(3, 8)
    traced = _trace(layer, low, x, attention)
    torch.manual_seed(11)
    first = traced(low, x, attention)
    torch.manual_seed(11)
    eager = layer(low, x, attention)
    for got, want in zip(first, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(traced(low, x, attention)[0], first[0])
    with pytest.raises(RuntimeError, match=r"torch.jit.trace would record this module's sampling key \(seed=3"):
        _trace(at.SamplePatches(3, 8, seed=3), low, x, attention)


@pytest.mark.parametrize("feature_shape", [(), (5,), (2, 3)])
def test_expectation_gradients_of_an_empty_batch(feature_shape):
    """An empty batch (a replica's share of a short last batch) passed the forward and failed in the backward
    ('cannot reshape tensor of 0 elements into shape [0, 3, -1]'); its gradients are empty, as on TF and JAX."""
    probs = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    features = torch.zeros(0, 3, *feature_shape, dtype=torch.float64, requires_grad=True)
    F.expectation(features, probs).sum().backward()
    assert probs.grad.shape == (0, 3) and features.grad.shape == features.shape
