"""The paper-scale Megapixel digits pipeline: rendering, the low-resolution view, MNIST input, diagnostics, and
a resumable torch training run on a handful of tiny images (seconds)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from examples.megapixel_digits import dataset


def _supersampled_box(image, low):
    """Independent area average: repeat every pixel ``low`` times (size * low = low * size), then block means."""
    size = image.shape[0]
    up = np.repeat(np.repeat(image.astype(np.float64), low, 0), low, 1)
    return up.reshape(low, size, low, size).mean(axis=(1, 3))


@pytest.mark.parametrize("size, low", [(300, 36), (200, 24), (97, 13), (7, 3), (10, 10), (64, 1), (150, 18)])
def test_box_downsample_is_the_exact_area_average(size, low):
    image = np.random.default_rng(size + low).integers(0, 256, (size, size)).astype(np.uint8)
    expected = _supersampled_box(image, low) / 255
    np.testing.assert_allclose(dataset.box_downsample(image, low), expected, atol=2e-6)
    weights = dataset.box_weights(size, low)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)


def test_box_downsample_refuses_bad_shapes():
    with pytest.raises(ValueError, match="square"):
        dataset.box_downsample(np.zeros((10, 12), np.uint8), 5)
    with pytest.raises(ValueError, match="low_size"):
        dataset.box_downsample(np.zeros((10, 10), np.uint8), 11)


def test_uint8_render_matches_the_float_render():
    bank, labels = dataset.digit_bank(28)
    layout = dataset.make_layout(3, labels, np.arange(1200), image_size=240, digit_size=28, n_strokes=20, seed=5)
    for i in range(3):
        u = dataset.render_uint8(layout, bank, i)
        f = dataset.render(layout, bank, i)[..., 0]
        assert u.dtype == np.uint8 and u.shape == (240, 240)
        np.testing.assert_allclose(u / 255, f, atol=0.5 / 255 + 1e-6)


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_bank_reads_npz_and_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    x_train, x_test = rng.integers(0, 256, (30, 28, 28)), rng.integers(0, 256, (20, 28, 28))
    y_train, y_test = np.arange(30) % 10, (np.arange(20) * 3) % 10
    np.savez(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    folder = tmp_path / "idx"
    folder.mkdir()
    for name, array in (("train-images-idx3-ubyte", x_train), ("train-labels-idx1-ubyte", y_train),
                        ("t10k-images-idx3-ubyte", x_test), ("t10k-labels-idx1-ubyte", y_test)):
        _write_idx(folder / f"{name}.gz", array)
    for source in (tmp_path / "mnist.npz", folder):
        bank, labels, split = dataset.mnist_bank(source)
        assert split == 30 and bank.dtype == np.uint8
        np.testing.assert_array_equal(bank, np.concatenate([x_train, x_test]))
        np.testing.assert_array_equal(labels, np.concatenate([y_train, y_test]))
    path = dataset.generate(tmp_path / "data", size=120, digit_size=28, n_train=4, n_test=3, n_digits=3, n_target=2,
                            n_strokes=2, seed=1, show_progress=False, mnist=folder)
    bank, splits = dataset.load(path)
    assert (splits["train"].digits < 30).all() and (splits["test"].digits >= 30).all()
    with np.load(path) as raw:
        assert str(raw["source"]) == "mnist" and int(raw["bank_split"]) == 30
    with pytest.raises(FileNotFoundError, match="mnist path"):
        dataset.mnist_bank(tmp_path / "missing.npz")


def test_digit_hits_counts_patches_covering_half_a_digit():
    from examples.megapixel_digits.paper_scale import digit_hits

    positions = np.array([[[100, 100], [500, 500]]])
    is_target = np.array([[True, False]])
    offsets = np.array([[[90, 90],      # holds digit 0 whole
                         [114, 100],    # rows 114..149 hold 14 of digit 0's 28 rows: exactly half
                         [115, 100],    # 13 rows: less than half
                         [480, 480],    # digit 1 (not a target)
                         [0, 0]]])      # nothing
    hits, target_hits = digit_hits(offsets, positions, is_target, patch=50, digit=28)
    assert hits.tolist() == [3] and target_hits.tolist() == [2]


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    from examples.megapixel_digits.paper_scale import EpochOrder

    order = EpochOrder(50, seed=4, shuffle=True)
    first = list(order)
    assert sorted(first) == list(range(50))
    assert list(order) == first
    order.epoch = 1
    assert list(order) != first and sorted(order) == list(range(50))
    assert list(EpochOrder(5, 4, False)) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_paper_scale_pipeline_smoke_and_resume(tmp_path):
    pytest.importorskip("torch")
    import torch

    from examples.megapixel_digits import figures, paper_scale

    torch.set_num_threads(1)
    common = ["--size", "200", "--train", "8", "--test", "4", "--noise", "5", "--batch", "4", "--n-patches", "3",
              "--patch", "32", "--workers", "0", "--no-progress"]
    out = tmp_path / "ats"
    paper_scale.main(common + ["--epochs", "1", "--out", str(out)])
    paper_scale.main(common + ["--epochs", "2", "--out", str(out), "--resume"])
    run = json.loads((out / "history.json").read_text())
    assert run["epochs"] == 2 and len(run["test_error"]) == 2 and run["image_size"] == 200
    assert all(0 <= e <= 1 for e in run["test_error"]) and run["n_patches"] == 3 and run["patch_size"] == 32
    assert [r["epoch"] for r in run["history"]] == [1, 2]
    assert all(0 <= r["test_digit_patches"] <= 3 for r in run["history"])
    for model in ("lowres", "dense"):
        paper_scale.main(common + ["--epochs", "1", "--model", model, "--out", str(tmp_path / model)])
    results = tmp_path / "results"
    figures.main(["--ats", str(out), "--lowres", str(tmp_path / "lowres"), "--dense", str(tmp_path / "dense"),
                  "--uniform", str(tmp_path / "lowres"), "--overlays", "1", "--out", str(results)])
    assert json.loads((results / "paper_scale_uniform_start.json").read_text())["epochs"] == 1
    summary = json.loads((results / "paper_scale.json").read_text())
    assert list(summary)[: len(figures.KEYS)] == list(figures.KEYS)
    from PIL import Image

    with Image.open(results / "paper_scale_attention_0.png") as picture:
        assert picture.size == (200, 200)
    for name in ("paper_scale_test_error.png", "paper_scale_baselines.png", "paper_scale_baselines.json"):
        assert (results / name).stat().st_size > 0
    from examples.megapixel_digits import step_cost

    step_cost.main(["--data", run["data"]["file"], "--batch", "2", "--repeats", "1", "--models", "ats", "dense",
                    "--out", str(results / "cost.json")])
    cost = json.loads((results / "cost.json").read_text())
    assert set(cost["seconds_per_step"]) == {"ats", "dense"} and all(v > 0 for v in cost["seconds_per_step"].values())


def test_mean3x3_matches_a_direct_neighbourhood_mean():
    from examples.megapixel_digits.hit_rates import mean3x3

    x = np.random.default_rng(1).random((5, 7))
    got = mean3x3(x)
    for i in range(5):
        for j in range(7):
            assert got[i, j] == pytest.approx(x[max(0, i - 1) : i + 2, max(0, j - 1) : j + 2].mean())


def test_hit_rates_grow_with_the_ink_prior(tmp_path):
    from examples.megapixel_digits.hit_rates import hit_rates

    path = dataset.generate(tmp_path / "d", size=400, digit_size=28, n_train=12, n_test=1, n_digits=5, n_target=3,
                            n_strokes=5, seed=2, show_progress=False)
    uniform, inked = hit_rates(path, [0, 60], images=12, n_patches=4, patch=40)
    for row in (uniform, inked):
        assert 0 <= row["target_patches"] <= row["digit_patches"] <= 4
    assert inked["digit_patches"] > uniform["digit_patches"] + 1
