"""Dataset loaders: embedded datasets, and torchvision-format files written by data_formats.py."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import data_formats as fmt
from raysys import architectures, datasets
from raysys.config import RaysysError


def _u8(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float32) / 255.0


def _assert_train_val_is_train_file(data, x_true: torch.Tensor, y_true: np.ndarray):
    """train + val must be exactly the train file's images (each once), with their labels."""
    x = torch.cat([data.x_train, data.x_val])
    y = torch.cat([data.y_train, data.y_val]).numpy()
    assert len(x) == len(x_true)
    # Match every loaded image to its nearest source row (random images are far apart); the
    # direct (non-matmul) distance is exact enough to demand ~0.
    dist = torch.cdist(x.reshape(len(x), -1).double(), x_true.reshape(len(x_true), -1).double(),
                       compute_mode="donot_use_mm_for_euclid_dist")
    nearest, idx = dist.min(dim=1)
    assert float(nearest.max()) < 1e-4, "an image in train/val is not in the train file"
    idx = idx.numpy()
    assert sorted(idx.tolist()) == list(range(len(x_true)))
    np.testing.assert_array_equal(y, y_true[idx])


# --- embedded datasets -----------------------------------------------------------------------

def test_digits_shape_range_size_and_cnn_s_forward(digits):
    assert digits.image_size == 28 and digits.in_channels == 1
    total = sum(digits.describe()["sizes"].values())
    assert total == 1797
    for split in ("train", "val", "test"):
        x, y = digits.split(split)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    model = architectures.build("cnn_s", in_channels=1, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 2464
    out = model(digits.x_test[:7])
    assert out.shape == (7, 10) and torch.isfinite(out).all()


def test_tetris_has_every_shape_at_every_position():
    x, y = datasets.tetris_patterns()
    assert set(y.tolist()) == {0, 1, 2, 3}
    patterns = {(int(label), tuple(img.ravel().astype(int))) for img, label in zip(x[:, 0], y)}
    assert len(patterns) == len(x)  # no duplicates
    assert all(sum(p) == 4 for _, p in patterns)  # every tetromino has four cells
    for label, p in patterns:
        grid = np.array(p).reshape(4, 4)
        # Closed under translation: every one-cell shift that stays on the grid is present ...
        for axis in (0, 1):
            for step, edge in ((-1, 0), (1, 3)):
                if not np.take(grid, edge, axis=axis).any():
                    assert (label, tuple(np.roll(grid, step, axis=axis).ravel())) in patterns
        # ... and under rotation (moved back to the top-left corner).
        rot = np.rot90(grid)
        rows, cols = np.nonzero(rot)
        rot = np.roll(rot, (-rows.min(), -cols.min()), axis=(0, 1))
        assert (label, tuple(rot.ravel())) in patterns
    counts = np.bincount(y)
    assert counts.tolist() == [24, 24, 12, 9]  # L, T: 4 rotations x 6; S: 2 x 6; O: 1 x 9


def test_fontdigits_deterministic_balanced_and_seeded():
    a = datasets.load("fontdigits", seed=3, per_class=20)
    datasets._render_fontdigits.cache_clear()  # regenerate from scratch, not from the cache
    b = datasets.load("fontdigits", seed=3, per_class=20)
    c = datasets.load("fontdigits", seed=4, per_class=20)
    for split in ("train", "val", "test"):
        assert torch.equal(a.split(split)[0], b.split(split)[0])
        assert torch.equal(a.split(split)[1], b.split(split)[1])
    assert not torch.equal(a.x_train, c.x_train)
    y = torch.cat([a.y_train, a.y_val, a.y_test])
    assert torch.bincount(y, minlength=10).tolist() == [20] * 10
    assert a.x_train.shape[1:] == (1, 28, 28)
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0
    prep = a.describe()["preprocessing"]
    assert prep["generation_seed"] == 3 and prep["per_class"] == 20 and len(prep["fonts"]) == 12
    # Loaded arrays are copies: mutating one must not corrupt the per-process cache.
    a.x_train.zero_()
    assert torch.equal(datasets.load("fontdigits", seed=3, per_class=20).x_train, b.x_train)


def test_fontdigits_is_a_shifted_domain_of_digits(digits):
    """A classifier trained on digits does clearly worse on fontdigits than on digits' own test
    split, while fontdigits itself is learnable: a real, measurable domain shift."""
    from sklearn.neighbors import KNeighborsClassifier

    font = datasets.load("fontdigits", per_class=150)

    def features(x):  # 14x14 average-pooled pixels: cheap, and enough to separate digits
        return torch.nn.functional.avg_pool2d(x, 2).reshape(len(x), -1).numpy()

    on_digits = KNeighborsClassifier(3).fit(features(digits.x_train), digits.y_train.numpy())
    acc_digits = on_digits.score(features(digits.x_test), digits.y_test.numpy())
    acc_transfer = on_digits.score(features(font.x_test), font.y_test.numpy())
    on_font = KNeighborsClassifier(3).fit(features(font.x_train), font.y_train.numpy())
    acc_font = on_font.score(features(font.x_test), font.y_test.numpy())
    print(f"digits->digits {acc_digits:.3f}  digits->fontdigits {acc_transfer:.3f}  "
          f"fontdigits->fontdigits {acc_font:.3f}")
    assert acc_digits > 0.9
    assert acc_transfer < acc_digits - 0.3  # the shift
    assert acc_font > acc_transfer + 0.3  # fontdigits is learnable: the drop is the shift, not noise
    # A simple statistic differs too: typeset strokes are crisper (more near-black/near-white pixels).
    def crisp(x):
        return float(((x < 0.1) | (x > 0.9)).float().mean())
    assert crisp(font.x_test) > crisp(digits.x_test) + 0.05


# --- torchvision-format files ----------------------------------------------------------------

@pytest.mark.parametrize("name,folder,compress", [("mnist", "MNIST", True), ("fmnist", "FashionMNIST", False)])
def test_idx_loaders_read_files_exactly(tmp_path, name, folder, compress):
    truth = fmt.write_mnist_like(tmp_path, folder, n_train=40, n_test=12, compress=compress)
    data = datasets.load(name, root=str(tmp_path), seed=1)
    assert data.x_train.shape[1:] == (1, 28, 28) and data.num_classes == 10
    assert len(data.x_val) == round(0.15 * 40) and len(data.x_train) == 40 - len(data.x_val)
    assert torch.equal(data.x_test, _u8(truth["test"][0]))  # test file, in file order
    np.testing.assert_array_equal(data.y_test.numpy(), truth["test"][1])
    _assert_train_val_is_train_file(data, _u8(truth["train"][0]), truth["train"][1])
    suffix = ".gz" if compress else ""
    assert data.preprocessing["files"][0] == f"{folder}/raw/train-images-idx3-ubyte{suffix}"


def test_usps_libsvm_values_and_labels(tmp_path):
    truth = fmt.write_usps(tmp_path, n_train=30, n_test=10)
    data = datasets.load("usps", root=tmp_path, seed=0)
    assert data.x_test.shape == (10, 1, 16, 16)
    assert torch.allclose(data.x_test, torch.as_tensor(truth["test"][0]), atol=1e-6)
    assert float(data.x_test[:, 0, 0, 0].min()) == pytest.approx(0.5)  # absent sparse entries are 0 -> 0.5
    np.testing.assert_array_equal(data.y_test.numpy(), truth["test"][1])  # 1..10 -> 0..9
    _assert_train_val_is_train_file(data, torch.as_tensor(truth["train"][0]), truth["train"][1])
    big = datasets.load("usps", root=tmp_path, image_size=28)
    assert big.x_train.shape[1:] == (1, 28, 28)
    assert 0.0 <= float(big.x_train.min()) and float(big.x_train.max()) <= 1.0


def test_svhn_mat_orientation_and_label_10_is_0(tmp_path):
    truth = fmt.write_svhn(tmp_path, n_train=20, n_test=10)
    data = datasets.load("svhn", root=tmp_path)
    assert data.x_test.shape == (10, 3, 32, 32)
    assert torch.equal(data.x_test, _u8(truth["test"][0]))
    np.testing.assert_array_equal(data.y_test.numpy(), np.arange(10))  # the file stores 10 for digit 0
    assert int(data.y_test.min()) == 0 and int(data.y_test.max()) == 9
    _assert_train_val_is_train_file(data, _u8(truth["train"][0]), truth["train"][1])


def test_cifar10_pickles_and_cnn_s_at_28px_with_3_channels(tmp_path):
    truth = fmt.write_cifar10(tmp_path, n_per_batch=6, n_test=8)
    data = datasets.load("cifar10", root=tmp_path)
    assert data.x_test.shape == (8, 3, 32, 32)
    assert torch.equal(data.x_test, _u8(truth["test"][0]))
    np.testing.assert_array_equal(data.y_test.numpy(), truth["test"][1])
    _assert_train_val_is_train_file(data, _u8(truth["train"][0]), truth["train"][1])

    small = datasets.load("cifar10", root=tmp_path, image_size=28)
    assert small.x_train.shape[1:] == (3, 28, 28) and "28x28" in small.preprocessing["resize"]
    model = architectures.build("cnn_s", in_channels=3, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 2864
    assert model(small.x_test).shape == (8, 10)


def test_cifar100_fine_and_coarse_labels(tmp_path):
    truth = fmt.write_cifar100(tmp_path, n_train=20, n_test=8)
    fine = datasets.load("cifar100", root=tmp_path)
    assert fine.num_classes == 100 and torch.equal(fine.x_test, _u8(truth["test"][0]))
    np.testing.assert_array_equal(fine.y_test.numpy(), truth["test"][1])
    coarse = datasets.load("cifar100", root=tmp_path, labels="coarse")
    assert coarse.num_classes == 20
    np.testing.assert_array_equal(coarse.y_test.numpy(), truth["test_coarse"])
    with pytest.raises(RaysysError, match="fine.*coarse"):
        datasets.load("cifar100", root=tmp_path, labels="medium")


def test_stl10_column_major_orientation_and_labels(tmp_path):
    truth = fmt.write_stl10(tmp_path, n_train=6, n_test=4)
    data = datasets.load("stl10", root=tmp_path)
    assert data.x_test.shape == (4, 3, 96, 96)
    assert float(data.x_test[0, 0, 0, 5]) == 1.0 and float(data.x_test[0, 0, 5, 0]) == 0.0  # the marked pixel
    assert torch.equal(data.x_test, _u8(truth["test"][0]))
    np.testing.assert_array_equal(data.y_test.numpy(), truth["test"][1])  # 1..10 -> 0..9
    assert set(data.y_test.tolist()) <= set(range(10))
    small = datasets.load("stl10", root=tmp_path, image_size=28, grayscale=True)
    assert small.x_test.shape == (4, 1, 28, 28)


def test_grayscale_rgb_and_normalization_recorded(tmp_path):
    truth = fmt.write_svhn(tmp_path, n_train=40, n_test=8)
    gray = datasets.load("svhn", root=tmp_path, grayscale=True)
    x = _u8(truth["test"][0])
    expected = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(gray.x_test[:, 0], expected, atol=1e-6)

    norm = datasets.load("svhn", root=tmp_path, normalize=True)
    mean = norm.x_train.mean(dim=(0, 2, 3))
    std = norm.x_train.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-5) and torch.allclose(std, torch.ones(3), atol=1e-4)
    rec = norm.describe()["preprocessing"]["normalization"]
    assert rec["computed_on"] == "train" and len(rec["mean"]) == 3
    # The recorded statistics invert the normalization back to the file's pixels.
    restored = norm.x_test * torch.tensor(rec["std"])[:, None, None] + torch.tensor(rec["mean"])[:, None, None]
    assert torch.allclose(restored, x, atol=1e-5)

    fmt.write_mnist_like(tmp_path, "MNIST", n_train=10, n_test=4)
    rgb = datasets.load("mnist", root=tmp_path, rgb=True, image_size=32)
    assert rgb.x_train.shape[1:] == (3, 32, 32)
    assert torch.equal(rgb.x_train[:, 0], rgb.x_train[:, 2])
    with pytest.raises(RaysysError, match="exclusive"):
        datasets.load("mnist", root=tmp_path, rgb=True, grayscale=True)


def test_splits_are_seeded_and_limit_subsamples(tmp_path):
    fmt.write_mnist_like(tmp_path, "MNIST", n_train=60, n_test=20)
    a = datasets.load("mnist", root=tmp_path, seed=5)
    b = datasets.load("mnist", root=tmp_path, seed=5)
    c = datasets.load("mnist", root=tmp_path, seed=6)
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.x_val, c.x_val)
    assert a.describe()["sha256_16"] == b.describe()["sha256_16"] != c.describe()["sha256_16"]
    assert a.preprocessing["split_seed"] == 5 and a.preprocessing["sizes"] == {"train": 51, "val": 9, "test": 20}

    lim = datasets.load("mnist", root=tmp_path, seed=5, limit=20, val_fraction=0.25)
    assert lim.preprocessing["sizes"] == {"train": 15, "val": 5, "test": 20}
    assert lim.preprocessing["limit"] == 20
    lim2 = datasets.load("mnist", root=tmp_path, seed=5, limit=20, val_fraction=0.25)
    assert torch.equal(lim.x_train, lim2.x_train)


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
    ("fmnist", "FashionMNIST/raw/t10k-labels-idx1-ubyte"),
    ("usps", "usps.t.bz2"),
    ("svhn", "train_32x32.mat"),
    ("cifar10", "cifar-10-batches-py/data_batch_3"),
    ("cifar100", "cifar-100-python/train"),
    ("stl10", "stl10_binary/test_X.bin"),
])
def test_missing_files_name_the_path_and_the_fix(tmp_path, name, expected):
    with pytest.raises(RaysysError) as err:
        datasets.load(name, root=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / expected) in msg
    assert "download=True" in msg and "torchvision.datasets." in msg


def test_missing_root_and_unknown_options(monkeypatch):
    monkeypatch.delenv("RAYSYS_DATA", raising=False)
    with pytest.raises(RaysysError, match="root"):
        datasets.load("cifar10")
    with pytest.raises(RaysysError, match="image_size"):  # lists the valid options
        datasets.load("mnist", root="/nonexistent", imagesize=28)
    with pytest.raises(RaysysError, match="unknown dataset"):
        datasets.load("imagenet")
    # Embedded datasets need no files: a root (e.g. a config default) is ignored, not an error.
    assert datasets.load("tetris", root="/nonexistent", copies=1).num_classes == 4


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    fmt.write_malicious_cifar(tmp_path, marker)
    with pytest.raises(RaysysError, match=r"refusing to unpickle global '(posix|os|nt)\.system'"):
        datasets.read_cifar_batch(tmp_path / "cifar-10-batches-py" / "data_batch_1")
    assert not marker.exists()

    evil = fmt.write_pickle(tmp_path / "evil", fmt._Payload(eval, "1+1"))
    with pytest.raises(RaysysError, match=r"(__builtin__|builtins)\.eval"):
        datasets.read_cifar_batch(evil)
    # A pickle of the right globals but the wrong content is refused too.
    wrong = fmt.write_pickle(tmp_path / "wrong", {b"data": np.zeros((2, 5), np.float64)})
    with pytest.raises(RaysysError, match="uint8"):
        datasets.read_cifar_batch(wrong)
    # Through the loader, the same refusal surfaces as a RaysysError, not as code execution.
    fmt.write_cifar10(tmp_path / "c", n_per_batch=2, n_test=2)
    fmt.write_malicious_cifar(tmp_path / "c", marker)
    with pytest.raises(RaysysError, match="not a genuine CIFAR batch"):
        datasets.load("cifar10", root=tmp_path / "c")
    assert not marker.exists()


def test_corrupt_files_are_clear_errors(tmp_path):
    fmt.write_mnist_like(tmp_path, "MNIST", n_train=10, n_test=4)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(RaysysError, match="truncated"):
        datasets.load("mnist", root=tmp_path)

    fmt.write_mnist_like(tmp_path, "FashionMNIST", n_train=10, n_test=4, compress=True)
    gz = tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:15])
    with pytest.raises(RaysysError, match="t10k-labels-idx1-ubyte.gz could not be read"):
        datasets.load("fmnist", root=tmp_path)

    fmt.write_mnist_like(tmp_path / "m", "MNIST", n_train=10, n_test=4)
    fmt.write_idx(tmp_path / "m" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(RaysysError, match="4 images but 3 labels"):
        datasets.load("mnist", root=tmp_path / "m")


def test_root_from_environment(tmp_path, monkeypatch):
    fmt.write_mnist_like(tmp_path, "MNIST", n_train=10, n_test=4)
    monkeypatch.setenv("RAYSYS_DATA", str(tmp_path))
    assert len(datasets.load("mnist").x_test) == 4
    assert os.environ["RAYSYS_DATA"] == str(tmp_path)


def test_download_fetches_verifies_and_extracts(tmp_path, monkeypatch):
    """download=True end to end through urllib, from a file:// URL (no internet here)."""
    import hashlib
    import tarfile

    src = tmp_path / "src"
    truth = fmt.write_cifar10(src, n_per_batch=2, n_test=3)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    url = archive.as_uri()

    root = tmp_path / "root"
    monkeypatch.setitem(datasets._SOURCES["cifar10"], "downloads", [(url, "cifar-10-python.tar.gz", "0" * 32)])
    with pytest.raises(RaysysError, match="md5"):
        datasets.load("cifar10", root=root, download=True)
    assert not list(root.glob("*.part"))  # a failed download leaves nothing half-written

    monkeypatch.setitem(datasets._SOURCES["cifar10"], "downloads", [(url, "cifar-10-python.tar.gz", md5)])
    data = datasets.load("cifar10", root=root, download=True)
    assert torch.equal(data.x_test, _u8(truth["test"][0]))
    assert (root / "cifar-10-batches-py" / "test_batch").exists()
