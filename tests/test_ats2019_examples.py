"""The three 2019 scripts ported under examples/ats2019, end to end on tiny data (in-process: no second TF import)."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import zipfile

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("skimage")
cv2 = pytest.importorskip("cv2")

from examples.ats2019 import make_mnist  # noqa: E402


# --- make_mnist.py -------------------------------------------------------------------


def _load(directory, name):
    return np.load(directory / f"{name}.npy", allow_pickle=True)


def test_make_mnist_writes_the_2019_layout(tmp_path):
    make_mnist.main(["--n_train", "4", "--n_test", "2", "--width", "120", "--height", "90", "--scale", "0.25",
                     "--dataset_seed", "3", str(tmp_path)])
    parameters = json.loads((tmp_path / "parameters.json").read_text())
    assert parameters == {"n_train": 4, "n_test": 2, "width": 120, "height": 90, "scale": 0.25, "noise": True,
                          "seed": 3, "digits": "sklearn"}
    train, test = _load(tmp_path, "train"), _load(tmp_path, "test")
    assert len(train) == 4 and len(test) == 2
    (low_idx, low_val), (high_idx, high_val), y = train[0]
    assert low_idx.max() < 22 * 30 and high_idx.max() < 90 * 120
    assert (high_val > 0).all() and high_val.max() <= 1 and y.shape == (10,) and y.sum() == 1
    make_mnist.main(["--json_only", "--n_train", "1", str(tmp_path / "json")])
    assert sorted(p.name for p in (tmp_path / "json").iterdir()) == ["parameters.json"]


def test_megapixel_mnist_places_three_target_digits_without_overlap():
    images, labels = make_mnist.sklearn_digits(train=True)
    assert images.shape[1:] == (28, 28) and len(images) == make_mnist.SKLEARN_TRAIN
    data = make_mnist.MegapixelMNIST(N=6, W=140, H=120, scale=0.5, noise=False, seed=1)
    for i in range(len(data)):
        (x_low, x_high), y = data[i]
        assert x_high.shape == (120, 140, 1) and x_low.shape == (60, 70, 1)
        digits, corners = data._digits[i], data._positions[i]
        assert (labels[digits] == y.argmax()).sum() == 3
        mask = np.zeros((120, 140), bool)
        for d, (r, c) in zip(digits, corners):
            assert not mask[r : r + 28, c : c + 28].any()  # no overlap
            mask[r : r + 28, c : c + 28] = True
            np.testing.assert_allclose(x_high[r : r + 28, c : c + 28, 0], images[d], atol=0.5 / 255)
        assert (x_high[~mask] == 0).all()  # nothing but digits without noise
    noisy = make_mnist.MegapixelMNIST(N=6, W=140, H=120, scale=0.5, noise=True, seed=1)
    np.testing.assert_array_equal(noisy._positions, data._positions)  # same layout, plus strokes
    assert noisy[5][0][1][~mask].sum() > 0


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_make_mnist_reads_real_mnist_files(tmp_path):
    rng = np.random.default_rng(0)
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    for split, n in (("train", 30), ("t10k", 20)):
        _write_idx(mnist / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28)))
        _write_idx(mnist / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    x, y = make_mnist.mnist_files(str(mnist), train=False)
    assert x.shape == (20, 28, 28) and x.dtype == np.float32 and y.tolist() == (np.arange(20) % 10).tolist()
    np.savez(tmp_path / "mnist.npz", x_train=(x * 255).astype(np.uint8), y_train=y, x_test=(x * 255).astype(np.uint8),
             y_test=y)
    np.testing.assert_allclose(make_mnist.mnist_files(str(tmp_path / "mnist.npz"), train=True)[0], x)
    out = tmp_path / "out"
    make_mnist.main(["--n_train", "2", "--n_test", "1", "--width", "100", "--height", "100", "--mnist", str(mnist),
                     str(out)])
    assert json.loads((out / "parameters.json").read_text())["digits"] == "mnist"
    assert len(_load(out, "test")) == 1


# --- mnist.py ----------------------------------------------------------------------------


@pytest.mark.slow
def test_mnist_script_trains_one_epoch(tmp_path):
    from examples.ats2019 import mnist

    data, out = tmp_path / "data", tmp_path / "out"
    make_mnist.main(["--n_train", "4", "--n_test", "2", "--width", "100", "--height", "100", "--scale", "0.2",
                     "--no_noise", str(data)])
    mnist.main([str(data), str(out), "--patch_size", "16x16", "--n_patches", "2", "--batch_size", "2", "--epochs", "1",
                "--optimizer", "sgd", "--lr", "0.01"])
    results = json.loads((out / "results.json").read_text())
    assert np.isfinite(results["test_loss"]) and 0 <= results["test_error"] <= 1
    names = {p.name for p in out.iterdir()}
    assert {"image.png", "attention_000.png", "attention_000.npy", "patches_000_001.png", "weights.01.weights.h5"} <= names
    assert np.load(out / "attention_000.npy").shape == (20, 20)  # the 0.2 x 100 low view


# --- speed_limits.py -----------------------------------------------------------------------

# (file, annotation) per image: EMPTY, the three limits, an occluded limit (dropped), other signs only (dropped)
ANNOTATIONS = [
    ("a.jpg", ""),
    ("b.jpg", "VISIBLE, 40.0, 30.0, 30.0, 20.0, PROHIBITORY, 50_SIGN;"),
    ("c.jpg", "VISIBLE, 60.5, 40.25, 50.5, 30.25, PROHIBITORY, 70_SIGN;MISC_SIGNS;"),
    ("d.jpg", "BLURRED, 20, 20, 10, 10, PROHIBITORY, 50_SIGN;VISIBLE, 80, 50, 60, 30l, PROHIBITORY, 80_SIGN;"),
    ("e.jpg", "OCCLUDED, 40, 30, 30, 20, PROHIBITORY, 70_SIGN;"),
    ("f.jpg", "VISIBLE, 40, 30, 30, 20, MANDATORY, PASS_RIGHT_SIDE;"),
    ("g.jpg", ""),
    ("h.jpg", "VISIBLE, 30, 30, 10, 10, PROHIBITORY, 70_SIGN;VISIBLE, 90, 60, 40, 20, PROHIBITORY, 50_SIGN;"),
]
EXPECTED_CLASSES = {"a.jpg": 0, "b.jpg": 1, "c.jpg": 2, "d.jpg": 3, "g.jpg": 0, "h.jpg": 1}


def _synthetic_sts(server):
    """Set1/Set2 as the dataset's server lays them out: SetNPart0.zip of JPEGs and annotations.txt."""
    sources = {}
    rng = np.random.default_rng(0)
    for name in ("Set1", "Set2"):
        folder = server / name
        folder.mkdir(parents=True)
        with zipfile.ZipFile(folder / f"{name}Part0.zip", "w") as archive:
            for image, _ in ANNOTATIONS:
                ok, encoded = cv2.imencode(".jpg", rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8))
                assert ok
                archive.writestr(image, encoded.tobytes())
        text = "".join(f"{image}:{signs}\n" for image, signs in ANNOTATIONS)
        (folder / "annotations.txt").write_text(text)
        md5 = hashlib.md5(text.encode()).hexdigest()
        sources[name] = ((folder / f"{name}Part0.zip").as_uri(), (folder / "annotations.txt").as_uri(), md5)
    return sources


class _NoArchive:
    """Stands in for zipfile.ZipFile where the download is faked: extracts nothing."""

    def __init__(self, *args):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def extractall(self, *args):
        pass


@pytest.fixture
def speed_limits(tmp_path, monkeypatch):
    from examples.ats2019 import speed_limits

    monkeypatch.setattr(speed_limits, "SOURCES", _synthetic_sts(tmp_path / "server"))
    return speed_limits


def test_speed_limits_downloads_checks_and_parses(speed_limits, tmp_path, monkeypatch):
    dataset = tmp_path / "sts"
    data = speed_limits.SpeedLimits(str(dataset), train=True)  # downloads Set1 and Set2 through urllib
    assert (dataset / "Set1" / "b.jpg").exists() and (dataset / "Set2" / "annotations.txt").exists()
    got = {p.split("/")[-1]: c for p, c in data._data}
    assert got == EXPECTED_CLASSES
    image, label = data[1]
    assert image.shape == (64, 96, 3) and image.dtype == np.float32 and label.tolist() == [0, 1, 0, 0]
    np.testing.assert_allclose(data.class_frequencies, [2 / 6, 2 / 6, 1 / 6, 1 / 6])
    sign = speed_limits.STS(str(dataset))[3][1][1]
    assert sign.name == "80_SIGN" and sign.bbox == [80.0, 50.0, 60.0, 30.0] and sign.center == [40.0, 70.0]
    idxs = data.strided(8)
    assert [data._data[i][1] for i in idxs[:4]] == [0, 1, 2, 3]
    # intact annotations: nothing is downloaded again
    monkeypatch.setattr(speed_limits, "download_file", lambda *a, **k: pytest.fail("downloaded again"))
    speed_limits.SpeedLimits(str(dataset), train=False)
    # a corrupted annotation file triggers one new download, then an error if it stays corrupted
    (dataset / "Set2" / "annotations.txt").write_text("junk")
    with pytest.raises(pytest.fail.Exception, match="downloaded again"):
        speed_limits.ensure_dataset_exists(str(dataset))
    monkeypatch.setattr(speed_limits, "download_file", lambda *a, **k: None)
    monkeypatch.setattr(speed_limits.zipfile, "ZipFile", _NoArchive)
    with pytest.raises(RuntimeError, match="corrupted"):
        speed_limits.ensure_dataset_exists(str(dataset))


@pytest.mark.slow
def test_speed_limits_script_trains_one_epoch(speed_limits, tmp_path):
    out = tmp_path / "out"
    history = speed_limits.main([str(tmp_path / "sts"), str(out), "--scale", "0.5", "--patch_size", "16x16",
                                 "--n_patches", "2", "--batch_size", "3", "--epochs", "1"])
    assert len(history.history["loss"]) == 1 and np.isfinite(history.history["loss"][0])
    assert (out / "weights.01.weights.h5").exists()
    attention = out / "attention"
    assert (attention / "0.jpg").exists() and np.load(attention / "att_0_0.npy").shape == (3, 5)
    assert len(np.loadtxt(attention / "points.txt")) == 10
