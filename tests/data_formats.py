"""Write tiny datasets in the real on-disk formats torchvision uses, for loader tests.

Each ``write_*`` function creates the files under ``root`` exactly where torchvision would put
them and returns the ground truth it wrote: ``{"train": (x, y), "test": (x, y)}`` with images as
uint8 (or float for USPS) arrays [n, C, H, W] and labels already mapped to 0..K-1, so a test can
compare what a loader reads against what was written. Other test files may import these.
"""
from __future__ import annotations

import bz2
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def _images(rng, n, c, h, w):
    return rng.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def write_idx(path: str | Path, array: np.ndarray, compress: bool = False) -> Path:
    """IDX (MNIST) file: 0, 0, dtype code 0x08 (uint8), ndim, big-endian int32 dims, raw data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_mnist_like(root: str | Path, folder: str = "MNIST", n_train: int = 40, n_test: int = 12,
                     compress: bool = False, seed: int = 0) -> dict:
    """``<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (MNIST, FashionMNIST)."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / folder / "raw"
    truth = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = _images(rng, n, 1, 28, 28)
        y = rng.integers(0, 10, size=n).astype(np.int64)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x[:, 0], compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y, compress)
        truth[split] = (x, y)
    return truth


def write_usps(root: str | Path, n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict:
    """``<root>/usps.bz2``, ``<root>/usps.t.bz2``: libsvm lines ``label i:v`` with labels 1..10,
    256 values in [-1, 1] (16x16). Zeros are left out, as libsvm's sparse format allows."""
    rng = np.random.default_rng(seed)
    truth = {}
    for split, name, n in (("train", "usps.bz2", n_train), ("test", "usps.t.bz2", n_test)):
        v = np.round(rng.uniform(-1.0, 1.0, size=(n, 256)), 6)
        v[:, :8] = 0.0  # sparse entries must read back as 0 (mid-grey)
        y = rng.integers(0, 10, size=n).astype(np.int64)
        lines = [f"{label + 1} " + " ".join(f"{i + 1}:{val:.6f}" for i, val in enumerate(row) if val != 0.0)
                 for row, label in zip(v, y)]
        with bz2.open(Path(root) / name, "wt") as f:
            f.write("\n".join(lines) + "\n")
        truth[split] = (((v + 1.0) / 2.0).reshape(n, 1, 16, 16).astype(np.float32), y)
    return truth


def write_svhn(root: str | Path, n_train: int = 20, n_test: int = 8, seed: int = 0) -> dict:
    """``<root>/{train,test}_32x32.mat``: X [32, 32, 3, n] uint8, y [n, 1] with 10 meaning digit 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    truth = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = _images(rng, n, 3, 32, 32)
        y = np.arange(n) % 10  # every class, 0 included
        savemat(Path(root) / f"{split}_32x32.mat",
                {"X": x.transpose(2, 3, 1, 0), "y": np.where(y == 0, 10, y).astype(np.uint8)[:, None]})
        truth[split] = (x, y.astype(np.int64))
    return truth


def _dump_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the real files are Python 2 protocol-2 pickles


def write_cifar10(root: str | Path, n_per_batch: int = 6, n_test: int = 8, seed: int = 0) -> dict:
    """``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}``: pickled dicts with b'data'
    (uint8 [n, 3072], R then G then B planes), b'labels', b'batch_label', b'filenames'."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    xs, ys = [], []
    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        x = _images(rng, n, 3, 32, 32)
        y = rng.integers(0, 10, size=n)
        _dump_pickle(folder / name, {b"batch_label": name.encode(), b"labels": [int(v) for v in y],
                                     b"data": x.reshape(n, 3072), b"filenames": [b"img%d.png" % i for i in range(n)]})
        xs.append(x)
        ys.append(y.astype(np.int64))
    return {"train": (np.concatenate(xs[:5]), np.concatenate(ys[:5])), "test": (xs[5], ys[5])}


def write_cifar100(root: str | Path, n_train: int = 20, n_test: int = 8, seed: int = 0) -> dict:
    """``<root>/cifar-100-python/{train,test}``: b'data', b'fine_labels' (0..99), b'coarse_labels' (0..19)."""
    rng = np.random.default_rng(seed)
    truth = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = _images(rng, n, 3, 32, 32)
        fine = rng.integers(0, 100, size=n)
        coarse = fine // 5
        _dump_pickle(Path(root) / "cifar-100-python" / split,
                     {b"filenames": [b"img%d.png" % i for i in range(n)], b"batch_label": split.encode(),
                      b"fine_labels": [int(v) for v in fine], b"coarse_labels": [int(v) for v in coarse],
                      b"data": x.reshape(n, 3072)})
        truth[split] = (x, fine.astype(np.int64))
        truth[f"{split}_coarse"] = coarse.astype(np.int64)
    return truth


def write_stl10(root: str | Path, n_train: int = 6, n_test: int = 4, seed: int = 0) -> dict:
    """``<root>/stl10_binary/{train,test}_{X,y}.bin``: uint8 images column-major per channel
    (each channel stored as [W, H]), labels uint8 1..10.

    Image 0 of each split gets one marked pixel, channel 0, row 0, column 5 = 255 and its
    transpose (row 5, column 0) = 0, so a test can check the orientation on a known pixel.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = _images(rng, n, 3, 96, 96)
        x[0, 0, 0, 5], x[0, 0, 5, 0] = 255, 0
        y = rng.integers(0, 10, size=n).astype(np.int64)
        (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes())
        (folder / f"{split}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())
        truth[split] = (x, y)
    return truth


class _Payload:
    """Unpickling this would call ``func(*args)``: the classic pickle code-execution attack."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def write_malicious_cifar(root: str | Path, marker: str | Path) -> Path:
    """A ``cifar-10-batches-py/data_batch_1`` whose unpickling would create ``marker`` via os.system."""
    import os

    path = Path(root) / "cifar-10-batches-py" / "data_batch_1"
    _dump_pickle(path, {b"data": _Payload(os.system, f"touch {marker}"), b"labels": [0]})
    return path


def write_pickle(path: str | Path, obj) -> Path:
    """Any object as a protocol-2 pickle (for refusal tests with other globals)."""
    path = Path(path)
    _dump_pickle(path, obj)
    return path
