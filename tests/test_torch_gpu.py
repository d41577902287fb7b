"""ats.torch on CUDA tensors: the same results as on the CPU, on torch's current stream (skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import atskern  # noqa: E402
import ats.torch as at  # noqa: E402
from ats.torch import functional as F  # noqa: E402

from .conftest import HAS_GPU  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (HAS_GPU and torch.cuda.is_available()), reason="needs CUDA for both torch and CuPy"),
]
needs_patches = pytest.mark.skipif(not hasattr(atskern, "extract_patches"), reason="atskern without the patch kernels")


@pytest.mark.parametrize("replace", [False, True])
def test_sample_on_cuda_equals_cpu(replace):
    attention = torch.rand(4, 30, 20, dtype=torch.float64) + 0.01
    key = torch.tensor(99)
    cpu = F.sample(attention, 12, replace=replace, key=key)
    gpu = F.sample(attention.cuda(), 12, replace=replace, key=key)
    assert gpu[0].is_cuda and gpu[1].is_cuda
    assert torch.equal(gpu[0].cpu(), cpu[0])
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=1e-12, atol=0)


@needs_patches
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_extract_and_scatter_on_cuda_equal_cpu(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 3, 50, 40, generator=gen) * 100).to(dtype)
    offsets = torch.randint(-8, 45, (2, 7, 2), generator=gen, dtype=torch.int32)
    cpu = F.extract_patches(x, offsets, (9, 8), fill=3)
    gpu = F.extract_patches(x.cuda(), offsets.cuda(), (9, 8), fill=3)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    if dtype.is_floating_point:
        xs = [x.clone().requires_grad_(), x.cuda().requires_grad_()]
        grad = torch.rand(cpu.shape, generator=gen).to(dtype)
        for image in xs:
            F.extract_patches(image, offsets.to(image.device), (9, 8)).backward(grad.to(image.device))
        torch.testing.assert_close(xs[1].grad.cpu(), xs[0].grad, rtol=1e-3 if dtype.itemsize == 2 else 1e-6, atol=1e-3)


def test_expectation_on_cuda_equals_cpu():
    rng = np.random.default_rng(0)
    probs = torch.from_numpy(rng.random((3, 5)) / 6 + 0.01)
    features = torch.from_numpy(rng.normal(size=(3, 5, 4)))
    grad = torch.from_numpy(rng.normal(size=(3, 4)))
    results = []
    for device in ("cpu", "cuda"):
        # fresh leaves on each device: ``features.to("cpu")`` is ``features`` itself, so without the detach the
        # CPU pass would make it require grad and ``.to("cuda")`` would then return a non-leaf (no ``.grad``)
        f, p = features.to(device).detach().requires_grad_(), probs.to(device).detach().requires_grad_()
        value = F.expectation(f, p)
        value.backward(grad.to(device))
        results.append([value.detach().cpu(), f.grad.cpu(), p.grad.cpu()])
    for cpu, gpu in zip(*results):
        torch.testing.assert_close(gpu, cpu, rtol=1e-12, atol=1e-12)


@needs_patches
def test_kernels_follow_torch_current_stream():
    x = torch.rand(4, 3, 512, 512, device="cuda")
    offsets = torch.randint(0, 400, (4, 64, 2), dtype=torch.int32, device="cuda")
    want = F.extract_patches(x, offsets, 64)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = x * 2  # queued on the side stream; the gather must see it without a synchronize
        got = F.extract_patches(y, offsets, 64)
        got_sum = got.sum()
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, 2 * want)
    assert got_sum.item() == pytest.approx(2 * want.sum().item(), rel=1e-5)


@needs_patches
def test_training_step_on_cuda():
    torch.manual_seed(0)
    attention = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1),
                              at.SampleSoftmax(squeeze_channels=True))
    feature = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    model = at.AttentionSampling(attention, feature, patch_size=32, n_patches=6).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(4, 1, 256, 256, device="cuda", requires_grad=True)
    y = torch.tensor([0, 1, 0, 1], device="cuda")
    before = [p.detach().clone() for p in model.parameters()]
    logits, att, patches = model(nn.functional.avg_pool2d(x.detach(), 8), x)
    loss = nn.functional.cross_entropy(logits, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert logits.is_cuda and att.is_cuda and patches.shape == (4, 6, 1, 32, 32)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # The logit layer's bias (attention.2.bias) adds one constant to every logit, which the softmax cancels:
    # its gradient is 0 up to rounding (~1e-8), so one SGD step leaves it unchanged. Every other parameter moves.
    names = [name for name, _ in model.named_parameters()]
    logit_bias = names.index("attention.2.bias")
    grads = [p.grad for p in model.parameters()]
    assert grads[logit_bias].abs().max() < 1e-5 * max(g.abs().max() for g in grads)
    unchanged = [n for n, b, p in zip(names, before, model.parameters()) if torch.equal(b, p)]
    assert unchanged in ([], ["attention.2.bias"]), unchanged


@needs_patches
def test_patch_and_estimator_steps_make_no_host_round_trip():
    """extract -> features -> expectation, forward and backward, on CUDA: no host synchronization (torch's sync
    debug mode raises on any, and the whole step is queued behind a device sleep without waiting for it), and no
    memory from CuPy's pool (the kernels write into torch-allocated tensors and need no temporaries)."""
    import cupy

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(2, 3, 64, 64, device="cuda", generator=gen, requires_grad=True)
    offsets = torch.randint(-5, 60, (2, 7, 2), device="cuda", dtype=torch.int32, generator=gen)
    probs = (torch.rand(2, 7, device="cuda", dtype=torch.float64, generator=gen) / 10 + 0.01).requires_grad_()

    def step():
        patches = F.extract_patches(x, offsets, 9)
        features = patches.flatten(2).to(torch.float64)
        F.expectation(features, probs).square().sum().backward()

    step()  # compiles the kernels, loads the modules
    torch.cuda.synchronize()
    pool = cupy.get_default_memory_pool()
    used = pool.used_bytes()
    done = torch.cuda.Event()
    torch.cuda._sleep(2_000_000_000)  # about a second of device time queued ahead of the step
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        done.record()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not done.query(), "the step waited for the device"
    torch.cuda.synchronize()
    assert pool.used_bytes() == used
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 and torch.isfinite(probs.grad).all()


# --- sampling without host synchronization (issue 10 item 4) ------------------------------


def _cuda_attention(rows=4, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.rand(rows, 24, 24, device="cuda", generator=gen) + 0.01


def test_device_key_draws_like_the_host_key_and_advances():
    attention = _cuda_attention()
    key = torch.tensor([77], dtype=torch.int64, device="cuda")
    got, _ = F.sample(attention, 6, key=key)
    want, _ = F.sample(attention.cpu(), 6, key=77)
    assert torch.equal(got.cpu(), want)
    assert int(key.item()) == 78
    again, _ = F.sample(attention, 6, key=key)
    assert torch.equal(again.cpu(), F.sample(attention.cpu(), 6, key=78)[0])


def test_device_key_step_makes_no_host_round_trip():
    attention = _cuda_attention()
    key = torch.tensor([5], dtype=torch.int64, device="cuda")
    F.sample(attention, 6, key=key)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        F.sample(attention, 6, key=key)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


ASYNC_FAILURE = """
import sys, torch
from ats.torch import functional as F
attention = torch.rand(4, 24, 24, device="cuda") + 0.01
key = torch.tensor([5], dtype=torch.int64, device="cuda")
attention[2, 3, 3] = float("nan")  # (setting an element from the host synchronizes: before the check below)
probs = torch.full((2, 6), 0.3, dtype=torch.float64, device="cuda")  # rows sum to 1.8 > 1
features = torch.rand(2, 6, 3, device="cuda")
torch.cuda.set_sync_debug_mode("error")  # the failing call itself must not wait for the device
if sys.argv[1] == "rows":
    F.sample(attention, 6, key=key)
else:
    F.expectation(features, probs)
torch.cuda.set_sync_debug_mode("default")
torch.cuda.synchronize()
print("not raised", flush=True)
"""
ASYNC_MESSAGES = {"rows": "atskern.sample: an attention row has NaN/inf", "probs": "ats.torch.expectation: probs must be"}


@pytest.mark.parametrize("what", ["rows", "probs"])
def test_async_validation_raises_at_synchronization(what):
    """A bad attention row or bad probs on CUDA: a device-side assert with the check's message, raised by a later
    CUDA call (the sticky error), never by a host round trip in the call. In a subprocess: the assert leaves the
    process's CUDA context unusable."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "adapters"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", ASYNC_FAILURE, what], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode != 0 and "not raised" not in done.stdout
    assert ASYNC_MESSAGES[what] in done.stderr, done.stderr[-3000:]
    assert "called a synchronizing CUDA operation" not in done.stderr, done.stderr[-3000:]


def test_validate_false_on_bad_rows_gives_in_range_indices():
    attention = _cuda_attention()
    attention[1] = 0.0
    attention[2, 0, 0] = float("nan")
    key = torch.tensor([9], dtype=torch.int64, device="cuda")
    indices, _ = F.sample(attention, 6, key=key, validate=False)
    torch.cuda.synchronize()
    assert ((indices >= 0) & (indices < 24)).all()


@needs_patches
def test_cuda_graph_step_equals_eager_and_replays_draw_anew():
    """sample -> extract -> features -> expectation, forward and backward, captured with torch.cuda.CUDAGraph:
    a replay equals the eager step for the same key, and two replays draw different patches."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    image = torch.rand(2, 3, 96, 96, device="cuda", generator=gen)
    logits = torch.randn(2, 12, 12, device="cuda", generator=gen, requires_grad=True)
    key = torch.tensor([123], dtype=torch.int64, device="cuda")

    def step():
        attention = torch.softmax(logits.flatten(1), dim=1).view_as(logits)
        indices, sampled = F.sample(attention, 5, key=key)
        offsets = (indices * 8 - 4).to(torch.int32)
        patches = F.extract_patches(image, offsets, 16)
        features = patches.flatten(2).mean(-1)
        loss = F.expectation(features, sampled).square().sum()
        loss.backward()
        return indices, loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up (compiles kernels) outside the capture
            logits.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    key.fill_(123)
    logits.grad = None
    eager_indices, eager_loss = step()
    eager_grad = logits.grad.clone()

    graph = torch.cuda.CUDAGraph()
    logits.grad = None
    key.fill_(0)
    with torch.cuda.graph(graph):
        graph_indices, graph_loss = step()
    key.fill_(123)
    logits.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_indices, eager_indices)
    torch.testing.assert_close(graph_loss, eager_loss)
    torch.testing.assert_close(logits.grad, eager_grad)
    first = graph_indices.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(graph_indices, first)
    assert int(key.item()) == 125


def test_sample_patches_with_a_device_key_advances_it():
    layer = at.SamplePatches(4, 8)
    key = torch.tensor([40], dtype=torch.int64, device="cuda")
    layer.set_device_key(key)
    x_low = torch.rand(2, 3, 24, 24, device="cuda")
    x_high = torch.rand(2, 3, 96, 96, device="cuda")
    attention = torch.rand(2, 24, 24, device="cuda") + 0.01
    first, _ = layer(x_low, x_high, attention)
    second, _ = layer(x_low, x_high, attention)
    assert int(key.item()) == 42 and not torch.equal(first, second)
