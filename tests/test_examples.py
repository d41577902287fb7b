"""examples/megapixel_digits: the dataset is what it claims, and the whole pipeline runs on a tiny configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from examples.megapixel_digits import dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("mpd") / "tiny"
    path = dataset.generate(path, size=200, digit_size=28, n_train=40, n_test=10, n_digits=5, n_target=3, n_strokes=10,
                            seed=3, show_progress=False)
    return dataset.load(path)


def test_layouts_hold_three_target_digits_and_distinct_others(tiny):
    bank, splits = tiny
    bank_labels = dataset.digit_bank(28)[1]
    for name, layout in splits.items():
        classes = bank_labels[layout.digits]
        for label, row in zip(layout.labels, classes):
            assert (row == label).sum() == 3
            others = row[row != label]
            assert len(set(others.tolist())) == len(others) == 2
        pool = layout.digits < dataset.TRAIN_BANK
        assert pool.all() if name == "train" else (~pool).all(), "train and test banks overlap"


def test_digits_do_not_overlap_and_render_in_place(tiny):
    bank, splits = tiny
    layout = splits["train"]
    d = layout.digit_size
    for i in range(len(layout.labels)):
        corners = layout.positions[i]
        gaps = np.abs(corners[:, None] - corners[None]).max(axis=-1) + np.eye(len(corners), dtype=int) * d
        assert (gaps >= d).all()
        image = dataset.render(layout, bank, i)
        assert image.shape == (200, 200, 1) and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        for (row, col), digit in zip(corners, layout.digits[i]):
            assert (image[row : row + d, col : col + d, 0] >= bank[digit] / 255 - 1e-6).all()


def test_generation_is_reproducible(tmp_path):
    a = dataset.generate(tmp_path / "a", size=120, digit_size=16, n_train=5, n_test=2, n_digits=3, n_target=2, n_strokes=3,
                         seed=9, show_progress=False)
    b = dataset.generate(tmp_path / "b", size=120, digit_size=16, n_train=5, n_test=2, n_digits=3, n_target=2, n_strokes=3,
                         seed=9, show_progress=False)
    with np.load(a) as first, np.load(b) as second:
        assert sorted(first.files) == sorted(second.files)
        for key in first.files:
            np.testing.assert_array_equal(first[key], second[key])


def test_impossible_layout_is_refused():
    with pytest.raises(ValueError, match="cannot place 5 digits of 28 px"):
        dataset.make_layout(1, np.arange(20) % 10, np.arange(20), image_size=40, digit_size=28)


@pytest.mark.slow
def test_training_pipeline_smoke(tmp_path):
    pytest.importorskip("tensorflow")
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters")]), TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-m", "examples.megapixel_digits.train", "--size", "200", "--train", "32", "--test", "16",
               "--noise", "5", "--epochs", "1", "--batch", "8", "--n-patches", "4", "--patch", "32", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "ats" and metrics["epochs"] == 1 and metrics["image_size"] == 200
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["seconds_per_step"] > 0
    assert len(metrics["history"]["loss"]) == 1 and np.isfinite(metrics["history"]["loss"][0])
    from PIL import Image

    assert metrics["overlays"]
    for name in metrics["overlays"]:
        with Image.open(out / name) as picture:
            assert picture.size == (200, 200) and picture.mode == "RGB"
    dense = subprocess.run(command[:3] + ["--model", "dense"] + command[3:-1] + [str(tmp_path / "dense")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert dense.returncode == 0, dense.stderr[-3000:]
    assert json.loads((tmp_path / "dense" / "metrics.json").read_text())["model"] == "dense"
