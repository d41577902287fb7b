"""ats.torch.slides: ATS on slide files (patches read on demand), pad-and-mask batches, a DataLoader recipe."""

from __future__ import annotations

import gc
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tifffile")
pytest.importorskip("imagecodecs")

from torch import nn  # noqa: E402

import atskern  # noqa: E402
from atskern import io as aio  # noqa: E402
from ats.torch import slides as ts  # noqa: E402


@pytest.fixture(scope="module")
def slide_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch-slides")
    paths = []
    for i, (size, label) in enumerate([((640, 640), 1), ((512, 896), 0), ((960, 704), 1)]):
        path = root / f"s{i}.tif"
        aio.write_synthetic_slide(path, size, label=label, seed=i, tile=128, factor=4, min_side=256,
                                  tissue_scale=0.3, motif_radius=24)
        paths.append(str(path))
    return paths


def _nets(seed=0):
    torch.manual_seed(seed)
    attention = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))
    feature = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(8, 2))
    return attention.double(), feature.double()


def test_slide_offsets_equal_patch_offsets_when_unpadded():
    rng = np.random.default_rng(0)
    for grid, low, level, patch in [((25, 25), (25, 25), (1000, 1000), (50, 50)), ((100, 7), (100, 7), (1000, 91), (50, 13)),
                                    ((16, 12), (160, 48), (4000, 1203), (64, 33))]:
        samples = np.stack([rng.integers(0, grid[0], 40), rng.integers(0, grid[1], 40)], axis=1)
        got = ts.slide_offsets(samples, grid, low, low, level, patch)
        want = atskern.patch_offsets(samples[None].astype(np.int32), grid, level, patch)[0]
        np.testing.assert_array_equal(got, want)
    # DESIGN.md's check values: G = 25, L = 1000, P = 50 gives 475 for s = 12 and -5 for s = 0
    got = ts.slide_offsets(np.array([[12, 0]]), (25, 25), (25, 25), (25, 25), (1000, 1000), (50, 50))
    np.testing.assert_array_equal(got, [[475, -5]])


def test_padded_batch_equals_each_slide_alone(slide_paths):
    attention, feature = _nets()
    model = ts.SlideAttentionSampling(attention, feature, patch_size=48, n_patches=5, mode="topk").double()
    data = ts.SlideDataset(slide_paths, [1, 0, 1], low_side=256)
    batch = ts.collate_slides([data[i] for i in range(3)])
    assert batch.x_low.shape[2:] == tuple(batch.sizes.max(0).values.tolist())
    x_low = batch.x_low.double()
    features, att, patches = model(x_low, batch.slides, batch.sizes)
    assert patches.shape == (3, 5, 3, 48, 48)
    for b in range(3):
        h, w = batch.sizes[b].tolist()
        alone_f, alone_att, alone_p = model(x_low[b:b + 1, :, :h, :w], batch.slides[b:b + 1])
        torch.testing.assert_close(patches[b:b + 1], alone_p)  # the same top-k cells, the same pixels
        torch.testing.assert_close(features[b:b + 1], alone_f, rtol=1e-2, atol=1e-6)
        # beyond the attention network's receptive field (2 px) of the padding the maps agree up to normalization
        inner, inner_alone = att[b, :h - 2, :w - 2], alone_att[0, :h - 2, :w - 2]
        torch.testing.assert_close(inner / inner.sum(), inner_alone / inner_alone.sum(), rtol=1e-9, atol=1e-15)
        assert float(att[b].detach().sum()) == pytest.approx(1.0)
        assert float(att[b, h:].detach().abs().sum() + att[b, :, w:].detach().abs().sum()) == 0.0


def test_patches_are_read_from_level0_at_the_sampled_cells(slide_paths):
    attention, feature = _nets(1)
    model = ts.SlideAttentionSampling(attention, feature, patch_size=(40, 56), n_patches=6, seed=5).double()
    data = ts.SlideDataset(slide_paths, low_side=256)
    batch = ts.collate_slides([data[i] for i in range(3)])
    torch.manual_seed(0)
    att = model.attention_map(batch.x_low.double(), batch.sizes)
    indices, _ = ts.F.sample(att, 6, key=123)
    patches = model.read_patches(indices, att.shape[1:], batch.x_low, batch.slides, batch.sizes)
    for b, path in enumerate(batch.slides):
        h, w = batch.sizes[b].tolist()
        idx = indices[b].numpy()
        assert (idx[:, 0] < h).all() and (idx[:, 1] < w).all()  # never a padding cell
        slide = aio.open_slide(path)
        H, W = slide.levels[0].shape[:2]
        pad = batch.x_low.shape[2:]
        # independent float mapping (no ties for these sizes): centre (s + 0.5) * (Hp / G) * (H / h)
        centre = (idx + 0.5) * np.array(pad) / np.array(att.shape[1:]) * np.array([H / h, W / w])
        starts = np.rint(centre - np.array([40, 56]) / 2).astype(np.int64)
        want = slide.read_patches(starts, (40, 56)).transpose(0, 3, 1, 2) / 255.0
        np.testing.assert_allclose(patches[b].numpy(), want, rtol=0, atol=1e-7)


def test_dataloader_workers_and_a_training_step(slide_paths):
    loader = torch.utils.data.DataLoader(ts.SlideDataset(slide_paths * 2, [1, 0, 1] * 2, low_side=256), batch_size=3,
                                         num_workers=2, collate_fn=ts.collate_slides,
                                         multiprocessing_context="fork")
    attention, feature = _nets(2)
    model = ts.SlideAttentionSampling(attention.float(), feature.float(), patch_size=48, n_patches=4,
                                      attention_regularizer=lambda a: 1e-3 * (a * torch.log(a + 1e-6)).sum() / len(a))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 0
    for batch in loader:
        logits, att, _ = model(batch.x_low, batch.slides, batch.sizes)
        loss = nn.functional.cross_entropy(logits, batch.labels) + model.regularization_loss
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.attention.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads)
        optimizer.step()
        steps += 1
    assert steps == 2


def test_errors(slide_paths):
    attention, feature = _nets()
    model = ts.SlideAttentionSampling(attention, feature, patch_size=16, n_patches=2).double()
    x = torch.zeros(2, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="one entry per x_low row"):
        model(x, slide_paths[:1])
    with pytest.raises(ValueError, match=r"sizes must be \(batch, 2\)"):
        model(x, slide_paths[:2], sizes=[32, 32])
    for sizes in ([[32, 32], [0, 5]], [[32, 64], [32, 32]]):  # an empty view; level-0 sizes past the padded view
        with pytest.raises(ValueError, match=r"sizes\[\d\] = .* must lie in \[1, \(32, 32\)\]"):
            model(x, slide_paths[:2], sizes=sizes)
    with pytest.raises(ValueError, match="labels must have one entry per slide"):
        ts.SlideDataset(slide_paths, [1])
    model.patch_size = (16, 16)
    model.level = 9
    with pytest.raises(ValueError, match="level 9 is out of range"):
        model(x, slide_paths[:2])


def test_attention_sampling_takes_slides_as_x_high(slide_paths):
    import ats.torch as at

    torch.manual_seed(0)
    attention = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1),
                              at.SampleSoftmax(squeeze_channels=True))
    feature = nn.Sequential(nn.Conv2d(3, 4, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = at.AttentionSampling(attention, feature, patch_size=32, n_patches=3, receptive_field=2, mode="topk")
    slide = aio.open_slide(slide_paths[0])
    low = slide.read_level(1)  # a pyramid level, never level 0
    x_low = torch.from_numpy(low.transpose(2, 0, 1).copy()).float()[None] / 255
    features, att, patches = model(x_low, [slide_paths[0]])
    features.sum().backward()
    assert patches.shape == (1, 3, 3, 32, 32) and features.shape == (1, 4)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in attention.parameters())
    cells = torch.topk(att.detach().flatten(1), 3).indices[0]
    cells = np.stack([cells // att.shape[2], cells % att.shape[2]], axis=1)
    assert low.shape[0] == low.shape[1]
    margin = 2 / 2 / low.shape[0]  # receptive_field / 2 / low size
    offsets = atskern.patch_offsets(cells[None].astype(np.int32), att.shape[1:], slide.levels[0].shape[:2], 32,
                                    margin=margin)[0]
    want = slide.read_patches(offsets, 32).transpose(0, 3, 1, 2) / np.float32(255)
    np.testing.assert_allclose(patches[0].numpy(), want, rtol=1e-6)


def test_a_slide_shorter_than_half_a_cell_reads_its_middle(tmp_path):
    """The one cell a slide shorter than half an attention cell keeps is centred on the slide (its centre lay
    outside it: a patch of fill only)."""
    from atskern.io import grid

    offsets = grid.slide_offsets([[0, 0]], (11, 11), (44, 44), (1, 1), (16, 16), (8, 8))
    assert offsets.tolist() == [[4, 4]]  # (16 - 8) / 2: the patch covers the slide's middle
    inside = grid.slide_offsets([[0, 1]], (11, 11), (44, 44), (44, 44), (704, 704), (8, 8))
    assert inside.tolist() == [[28, 92]]  # a cell inside the slide: the formula's centre, unchanged
    image = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    tiny = aio.write_pyramid(tmp_path / "tiny.tif", image, tile=16, factor=4, min_side=1, compression="none")
    patch = aio.open_slide(tiny).read_patches(offsets, 8)  # a 1 x 1 low view in a batch padded to 44 x 44
    assert np.array_equal(patch[0], image[4:12, 4:12])


def test_slide_dataset_scale(tmp_path):
    image = (np.arange(128 * 128 * 3, dtype=np.uint32).reshape(128, 128, 3) * 613 % 65536).astype(np.uint16)
    path = aio.write_pyramid(tmp_path / "u16.tif", image, tile=32, compression="zstd")
    x_low, _, _ = ts.SlideDataset([path], low_side=64, scale=1 / 65535)[0]
    level = aio.open_slide(path).read_level(aio.open_slide(path).best_level(64))
    np.testing.assert_allclose(x_low.numpy(), level.transpose(2, 0, 1) / 65535, rtol=1e-6)
    with pytest.raises(ValueError, match="scale must be a positive number"):
        ts.SlideDataset([path], scale=-1)


def test_collate_refuses_mixed_channels():
    items = [(torch.zeros(3, 8, 8), "rgb.tif", 0), (torch.zeros(1, 6, 8), "gray.tif", 1)]
    with pytest.raises(ValueError, match="same channels: rgb.tif has 3, gray.tif has 1"):
        ts.collate_slides(items)


def _open_descriptors(paths) -> int:
    targets = {os.path.realpath(p) for p in paths}
    return sum(os.path.realpath(f"/proc/self/fd/{fd}") in targets for fd in os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")
def test_open_cached_closes_the_slides_it_drops(tmp_path):
    """open_cached's LRU dropped slides without closing them, so a slide still referenced elsewhere (or kept by
    Slide <-> SlideLevel until a GC pass) kept its descriptor: a run over many slides hit "Too many open files". A
    dropped slide is closed, and still reads if used again."""
    image = np.random.default_rng(3).integers(0, 255, (64, 48, 3), dtype=np.uint8)
    first = aio.write_pyramid(tmp_path / "c0.tif", image, tile=16, compression="none")
    paths = [str(first)] + [shutil.copy(first, tmp_path / f"c{i}.tif") for i in range(1, 70)]
    gc.collect()
    gc.disable()
    try:
        opened = []  # held here, as a batch or a user would
        for path in paths:
            opened.append(ts.open_cached(path))
            np.testing.assert_array_equal(opened[-1].read_patches([[3, 4]], 8)[0], image[3:11, 4:12])
        assert _open_descriptors(paths) <= 64
        assert _open_descriptors(paths[:6]) == 0  # the least recently used, closed
        np.testing.assert_array_equal(opened[0].read_patches([[5, 6]], 8)[0], image[5:13, 6:14])
    finally:
        gc.enable()
        getattr(ts, "OPEN_SLIDES", {}).clear()
