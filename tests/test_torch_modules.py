"""ats.torch modules: shapes and modes, seeds, errors, import isolation, torch.compile, and a toy task learned."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import atskern  # noqa: E402
import ats.torch as at  # noqa: E402
from ats.torch import functional as F  # noqa: E402

needs_patches = pytest.mark.skipif(not hasattr(atskern, "extract_patches"), reason="atskern without the patch kernels")
ROOT = Path(__file__).resolve().parents[1]


def _tiny_model(n_patches=3, patch_size=8, **kwargs):
    attention = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), at.SampleSoftmax(squeeze_channels=True))
    feature = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveMaxPool2d(1), nn.Flatten())
    return at.AttentionSampling(attention, feature, patch_size=patch_size, n_patches=n_patches, **kwargs)


# --- modules ----------------------------------------------------------------------------------


@needs_patches
def test_attention_sampling_shapes_and_patches():
    torch.manual_seed(0)
    model = _tiny_model(n_patches=5, patch_size=(8, 6), replace=True)
    x = torch.rand(2, 1, 64, 48)
    low = nn.functional.avg_pool2d(x, 4)
    features, attention, patches = model(low, x)
    assert features.shape == (2, 4) and attention.shape == (2, 16, 12) and patches.shape == (2, 5, 1, 8, 6)
    torch.testing.assert_close(attention.sum(dim=(1, 2)), torch.ones(2))
    # every patch is a window of x (zero outside it)
    windows = nn.functional.pad(x, (6, 6, 8, 8)).unfold(2, 8, 1).unfold(3, 6, 1)
    for b in range(2):
        for k in range(5):
            match = (windows[b, 0] == patches[b, k, 0]).flatten(2).all(-1)
            assert match.any()


@needs_patches
def test_sample_patches_maps_cells_to_high_resolution_with_the_receptive_field():
    layer = at.SamplePatches(1, 4, receptive_field=8, mode="topk")
    x_high = torch.arange(100 * 100, dtype=torch.float64).reshape(1, 1, 100, 100)
    x_low = torch.zeros(1, 1, 20, 20)
    attention = torch.full((1, 12, 12), 0.01)
    attention[0, 3, 9] = 1.0
    patches, sampled = layer(x_low, x_high, attention)
    offsets = F.patch_offsets(torch.tensor([[[3, 9]]]), (12, 12), (100, 100), 4, margin=8 / 2 / 20)
    i, j = offsets[0, 0].tolist()
    assert torch.equal(patches[0, 0, 0], x_high[0, 0, i:i + 4, j:j + 4])
    assert sampled[0, 0].item() == pytest.approx(1.0 / attention.sum().item())


@needs_patches
def test_modes_and_seeds():
    x = torch.rand(2, 1, 32, 32)
    low = nn.functional.avg_pool2d(x, 4)
    attention = torch.rand(2, 8, 8) + 0.01
    first, second = at.SamplePatches(4, 4, seed=11), at.SamplePatches(4, 4, seed=11)
    draws = [first(low, x, attention)[0] for _ in range(2)]
    assert torch.equal(draws[0], second(low, x, attention)[0])  # same seed, same stream
    assert not torch.equal(draws[0], draws[1])  # a fresh key per call
    auto = at.SamplePatches(4, 4, mode="auto").eval()
    top = at.SamplePatches(4, 4, mode="topk")
    assert torch.equal(auto(low, x, attention)[0], auto(low, x, attention)[0])
    assert torch.equal(auto(low, x, attention)[1], top(low, x, attention)[1])
    assert auto.train().deterministic() is False


def test_sample_softmax_and_entropy():
    x = torch.randn(3, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    p = at.SampleSoftmax(squeeze_channels=True)(x)
    assert p.shape == (3, 4, 5)
    torch.testing.assert_close(p.sum(dim=(1, 2)), torch.ones(3, dtype=torch.float64))
    smooth = at.SampleSoftmax(smooth=0.5)(x)
    assert smooth.min() >= 0.5 / 20
    penalty = at.multinomial_entropy(0.5)(p)
    entropy = -(p * torch.log(p + 1e-6)).sum(dim=(1, 2)).mean()
    torch.testing.assert_close(penalty, -0.5 * entropy)
    penalty.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    uniform = torch.full((1, 10), 0.1)
    assert at.MultinomialEntropy(1.0)(uniform).item() < at.MultinomialEntropy(1.0)(torch.eye(10)[:1]).item()
    with pytest.raises(ValueError, match="needs 1 channel"):
        at.SampleSoftmax(squeeze_channels=True)(torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="smooth must be in"):
        at.SampleSoftmax(smooth=1.0)


@needs_patches
def test_regularizer_value_is_kept():
    model = _tiny_model(attention_regularizer=at.MultinomialEntropy(0.1))
    x = torch.rand(1, 1, 32, 32)
    _, attention, _ = model(nn.functional.avg_pool2d(x, 4), x)
    torch.testing.assert_close(model.regularization_loss, F.multinomial_entropy(attention, 0.1))


def test_module_errors_name_the_argument():
    layer = at.SamplePatches(4, 8)
    x = torch.rand(2, 1, 32, 32)
    low = torch.rand(2, 1, 8, 8)
    att = torch.rand(2, 8, 8)
    with pytest.raises(ValueError, match=r"x_high must be \(batch, channels, \*spatial\)"):
        layer(low, x[0, 0], att)
    with pytest.raises(ValueError, match="x_low must have x_high's rank 4"):
        layer(low[0], x, att)
    with pytest.raises(ValueError, match=r"attention must be \(batch, \*grid\) with rank 3"):
        layer(low, x, att[:, None])
    with pytest.raises(ValueError, match="must share the batch size"):
        layer(low, x, att[:1])
    with pytest.raises(ValueError, match=r"patch_size \(8, 8\) is larger than x_high's spatial shape \(32, 6\)"):
        layer(low, x[..., :6], att)
    with pytest.raises(ValueError, match="n_samples=70 is larger than the 64 positions"):
        at.SamplePatches(70, 2)(low, x, att)
    with pytest.raises(ValueError, match="n_patches must be a positive integer"):
        at.SamplePatches(0, 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        at.SamplePatches(2, 2, mode="best")
    with pytest.raises(ValueError, match="seed must be None or an int"):
        at.SamplePatches(2, 2, seed=-1)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="receptive_field must be a finite number >= 0"):
            at.SamplePatches(2, 2, receptive_field=bad)
    with pytest.raises(TypeError, match="x_high must be a torch.Tensor"):
        layer(low, np.zeros((2, 1, 32, 32)), att)


# --- import isolation -------------------------------------------------------------------------


def test_import_ats_torch_needs_no_tensorflow():
    code = (
        "import sys, ats, ats.torch\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'))\n"
        "assert not bad, bad\n"
    )
    light = "import sys, ats\nassert 'torch' not in sys.modules and 'tensorflow' not in sys.modules\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "adapters")])}
    for snippet in (code, light):
        result = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr


# --- torch.compile ----------------------------------------------------------------------------


@needs_patches
@pytest.mark.slow
def test_torch_compile_forward_backward_matches_eager():
    """The custom ops trace into one graph (fullgraph) when the key is an input; the module compiles too."""
    torch.manual_seed(0)
    weight = torch.randn(4, 1, 3, 3, requires_grad=True)

    def pipeline(low_logits, x, key):
        attention = F.sample_softmax(low_logits)
        indices, sampled = F.sample(attention, 3, key=key)
        offsets = F.patch_offsets(indices, attention.shape[1:], x.shape[2:], 8)
        patches = F.extract_patches(x, offsets, 8)
        features = nn.functional.conv2d(patches.flatten(0, 1), weight, padding=1).amax(dim=(2, 3))
        return F.expectation(features.unflatten(0, (x.shape[0], 3)), sampled)

    low = torch.randn(2, 16, 16, requires_grad=True)
    x = torch.rand(2, 1, 64, 64, requires_grad=True)
    key = torch.tensor(42)
    results = []
    for fn in (pipeline, torch.compile(pipeline, fullgraph=True)):
        out = fn(low, x, key)
        grads = torch.autograd.grad(out.square().sum(), (low, x, weight))
        results.append((out, *grads))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)

    # the modules compile too (one graph break where SamplePatches draws its key), with the same draws
    model = _tiny_model()
    low = nn.functional.avg_pool2d(x.detach(), 4)
    results = []
    for fn in (model, torch.compile(model)):
        torch.manual_seed(1)
        features, _, patches = fn(low, x)
        grads = torch.autograd.grad(features.square().sum() + patches.sum(), (x, *model.parameters()))
        results.append((features, patches, *grads))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@needs_patches
@pytest.mark.parametrize("dynamic", [None, True])
def test_a_compiled_model_takes_images_of_new_sizes(dynamic):
    """With a receptive field, the margin's exact fractions once met the sizes that torch.compile makes symbolic
    (the second or third image size, or the first with dynamic=True) and the forward failed; compiled and eager
    copies of one model now draw the same patches at every size."""
    import copy

    torch.manual_seed(0)
    eager = _tiny_model(receptive_field=3, seed=7)
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager", dynamic=dynamic)
    for side in (48, 64, 80):
        x = torch.rand(2, 1, side, side)
        low = nn.functional.avg_pool2d(x, 4)
        want, got = eager(low, x), compiled(low, x)
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# --- a toy task -------------------------------------------------------------------------------


def _striped_squares(gen, batch, size=256, square=16):
    """Noise images with one striped square; the label is the stripes' direction (invisible at low resolution)."""
    x = torch.rand(batch, 1, size, size, generator=gen) * 0.1
    y = torch.randint(0, 2, (batch,), generator=gen)
    pos = torch.randint(0, size - square, (batch, 2), generator=gen)
    stripes = torch.zeros(2, square, square)
    stripes[0, :, ::2] = 1.0
    stripes[1, ::2, :] = 1.0
    for b in range(batch):
        i, j = pos[b].tolist()
        x[b, 0, i:i + square, j:j + square] = stripes[y[b]]
    return x, y, pos


@pytest.fixture
def one_torch_thread():
    """Small convolutions gain nothing from threads, and lose much to them on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_patches
def test_toy_task_is_learned(one_torch_thread):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    attention = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1),
                              at.SampleSoftmax(squeeze_channels=True))
    feature = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                            nn.Linear(8, 2))
    model = at.AttentionSampling(attention, feature, patch_size=32, n_patches=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(120):
        x, y, _ = _striped_squares(gen, 16)
        logits, _, _ = model(nn.functional.avg_pool2d(x, 8), x)
        loss = nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[:10]) > 0.6
    assert np.mean(losses[-10:]) < 0.2, losses[::10]
    # the attention learned where the label is: most of its mass is on the square's cells
    x, y, pos = _striped_squares(gen, 16)
    model.eval()
    with torch.no_grad():
        logits, attention, _ = model(nn.functional.avg_pool2d(x, 8), x)
    mass = [attention[b, p // 8: (p + 16) // 8 + 1, q // 8: (q + 16) // 8 + 1].sum().item() for b, (p, q) in
            enumerate(pos.tolist())]
    assert np.mean(mass) > 0.5
    assert (logits.argmax(1) == y).float().mean() > 0.9


@needs_patches
@pytest.mark.parametrize("spatial, low, grid", [((40,), (10,), (10,)), ((12, 16, 20), (6, 8, 10), (6, 8, 10))])
def test_sample_patches_in_1d_and_3d(spatial, low, grid):
    layer = at.SamplePatches(4, 3, use_logits=True)
    x = torch.rand(2, 2, *spatial, requires_grad=True)
    logits = torch.randn(2, *grid, requires_grad=True)
    patches, sampled = layer(torch.rand(2, 2, *low), x, logits)
    assert patches.shape == (2, 4, 2) + (3,) * len(spatial) and sampled.shape == (2, 4)
    (patches.sum() + sampled.sum()).backward()
    # x is positive everywhere and the fill is 0: every nonzero patch pixel sends a gradient of 1 home
    assert x.grad.sum().item() == (patches != 0).sum().item()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_sample_patches_device_key_must_be_a_cuda_int64_scalar():
    layer = at.SamplePatches(3, 4)
    with pytest.raises(TypeError, match="one-element int64 CUDA tensor"):
        layer.set_device_key(torch.tensor([1]))
    layer.set_device_key(None)
    assert layer.validate is True


def test_deepcopy_and_averaged_model_after_a_regularized_step():
    """The regularizer's last value is a tensor of the training graph; copies hold it detached (deepcopy refused
    the non-leaf tensor, and with it AveragedModel and best-model copies)."""
    import copy

    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    model = _tiny_model(attention_regularizer=at.MultinomialEntropy(1e-3))
    features, _, _ = model(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 32, 32))
    (features.sum() + model.regularization_loss).backward()
    clone = copy.deepcopy(model)
    assert clone.regularization_loss.grad_fn is None and model.regularization_loss.grad_fn is not None
    assert torch.equal(clone.regularization_loss, model.regularization_loss.detach())
    for a, b in zip(clone.parameters(), model.parameters()):
        assert torch.equal(a, b) and a is not b
    AveragedModel(model)


@pytest.mark.parametrize("make", [lambda: at.SamplePatches(3, 4, replace="False"),
                                  lambda: at.SamplePatches(3, 4, use_logits=1),
                                  lambda: at.Expectation(replace="False"),
                                  lambda: at.SampleSoftmax(squeeze_channels="yes")])
def test_module_flags_must_be_bools(make):
    with pytest.raises(TypeError, match="must be True or False"):
        make()


def test_seeded_key_streams_of_ranks_never_line_up(monkeypatch):
    """A fixed seed's key stream on rank r > 0 shares no key with rank 0's or another rank's over many calls (the
    xor salt equalled adding r steps for seeds like 0 and 42: rank r replayed rank 0's stream r calls ahead); rank
    0 keeps the single-process stream."""
    from ats.torch.modules import _KeyStream

    def stream(seed, rank, calls=64):
        monkeypatch.setenv("RANK", str(rank))
        keys = _KeyStream(seed)
        return [int(keys.next()) for _ in range(calls)]

    for seed in (0, 1, 42, 2**63):
        streams = [stream(seed, rank) for rank in range(4)]
        for a in range(4):
            for b in range(a + 1, 4):
                assert not set(streams[a]) & set(streams[b]), (seed, a, b)
    monkeypatch.setenv("RANK", "0")
    single = _KeyStream(42)
    golden, mask = 0x9E3779B97F4A7C15, 2**64 - 1
    z = (42 + golden) & mask  # the first key of seed 42 on rank 0: splitmix64 of seed + step
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    assert int(single.next()) % 2**64 == z ^ (z >> 31)


def test_state_dict_keeps_the_key_stream_position():
    """A seeded module resumed from its state_dict continues its key stream (it replayed it from the start); a
    state_dict saved without the position still loads, strictly."""
    x_high = torch.rand(1, 1, 32, 32)
    x_low, attention = x_high[:, :, ::4, ::4], torch.softmax(torch.randn(1, 64), 1).reshape(1, 8, 8)
    trained = at.SamplePatches(3, 4, seed=7)
    for _ in range(3):
        trained(x_low, x_high, attention)
    resumed = at.SamplePatches(3, 4, seed=7)
    resumed.load_state_dict(trained.state_dict())
    assert torch.equal(resumed(x_low, x_high, attention)[0], trained(x_low, x_high, attention)[0])
    fresh = at.SamplePatches(3, 4, seed=7)
    fresh.load_state_dict({})  # an older checkpoint: no position
    assert fresh._keys.calls == 0
    model = _tiny_model(seed=5)
    model.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")})
