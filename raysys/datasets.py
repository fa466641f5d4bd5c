"""Image datasets with fixed, seeded train/val/test splits.

Embedded (no download): ``tetris`` (synthetic 4x4 shapes, 002 §4.1), ``digits``
(scikit-learn's 8x8 digits, scaled to [0, 1] and resized to 28x28) and ``fontdigits``
(typeset digits rendered from matplotlib's DejaVu fonts: the same ten classes as ``digits`` in
a different domain, for digits -> fontdigits transfer).

From disk, in torchvision's on-disk layout (parsed here; torchvision is not needed): ``mnist``,
``fmnist``, ``usps``, ``svhn``, ``cifar10``, ``cifar100``, ``stl10``. Their train/test sets come
from the files, validation is carved from train with a seeded split.

Every dataset comes back as an :class:`ImageData` of float32 tensors plus a ``describe()``
record written into zoo manifests, so a zoo says exactly which images its models saw.
"""
from __future__ import annotations

import bz2
import contextlib
import functools
import gzip
import hashlib
import inspect
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from raysys.config import RaysysError


@dataclass
class ImageData:
    name: str
    x_train: torch.Tensor  # [n, C, H, W] float32
    y_train: torch.Tensor  # [n] int64
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    preprocessing: dict = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[-1]

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"x_{which}"), getattr(self, f"y_{which}")

    def describe(self) -> dict:
        def digest(*ts):
            h = hashlib.sha256()
            for t in ts:
                h.update(t.contiguous().numpy().tobytes())
            return h.hexdigest()[:16]

        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "shape": list(self.x_train.shape[1:]),
            "sizes": {s: int(self.split(s)[0].shape[0]) for s in ("train", "val", "test")},
            "sha256_16": {s: digest(*self.split(s)) for s in ("train", "val", "test")},
            "preprocessing": self.preprocessing,
        }


def seeded_split(n: int, seed: int, fractions=(0.70, 0.15, 0.15)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]


def _from_arrays(name, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int, preprocessing: dict) -> ImageData:
    tr, va, te = seeded_split(len(x), seed)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    return ImageData(name, xt[tr], yt[tr], xt[va], yt[va], xt[te], yt[te], num_classes,
                     {**preprocessing, "split_seed": seed, "split_fractions": [0.70, 0.15, 0.15]})


# --- tetris ---------------------------------------------------------------------------------

_TETRIS_SHAPES = {
    "L": [(0, 0), (1, 0), (2, 0), (2, 1)],
    "T": [(0, 0), (0, 1), (0, 2), (1, 1)],
    "S": [(0, 1), (0, 2), (1, 0), (1, 1)],
    "O": [(0, 0), (0, 1), (1, 0), (1, 1)],
}


def _rotate(cells, k):
    for _ in range(k):
        cells = [(c, -r) for r, c in cells]
    r0, c0 = min(r for r, _ in cells), min(c for _, c in cells)
    return sorted((r - r0, c - c0) for r, c in cells)


def tetris_patterns() -> tuple[np.ndarray, np.ndarray]:
    """Every distinct placement (rotation x position) of the four shapes on a 4x4 grid."""
    images, labels = [], []
    for label, cells in enumerate(_TETRIS_SHAPES.values()):
        seen = set()
        for k in range(4):
            rot = tuple(_rotate(cells, k))
            h, w = 1 + max(r for r, _ in rot), 1 + max(c for _, c in rot)
            for dr in range(5 - h):
                for dc in range(5 - w):
                    key = tuple((r + dr, c + dc) for r, c in rot)
                    if key in seen:
                        continue
                    seen.add(key)
                    img = np.zeros((4, 4), np.float32)
                    for r, c in key:
                        img[r, c] = 1.0
                    images.append(img)
                    labels.append(label)
    return np.stack(images)[:, None], np.array(labels)


def load_tetris(seed: int = 0, copies: int = 20, noise: float = 0.1) -> ImageData:
    """``copies`` noisy copies of every placement; noise is N(0, noise²), seeded."""
    x, y = tetris_patterns()
    rng = np.random.default_rng(seed)
    x = np.concatenate([x] * copies)
    y = np.concatenate([y] * copies)
    if noise > 0:
        x = x + rng.normal(0.0, noise, size=x.shape).astype(np.float32)
    return _from_arrays("tetris", x, y, 4, seed,
                        {"copies": copies, "noise_std": noise, "patterns": len(tetris_patterns()[0])})


# --- digits ---------------------------------------------------------------------------------

def load_digits(seed: int = 0, size: int = 28) -> ImageData:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return _from_arrays("digits", x.numpy(), d.target, 10, seed,
                        {"source": "sklearn.datasets.load_digits", "scale": "x/16", "resize": f"bilinear {size}x{size}",
                         "normalization": None})



# --- fontdigits -----------------------------------------------------------------------------
# Typeset digits: crisp strokes, the glyph shapes of twelve font faces, varied size, slant and
# position. A model trained on the blurry, frame-filling handwritten ``digits`` sees a real
# domain shift (measured in tests/test_datasets.py), yet the classes are the same.

FONTDIGITS_FONTS = (
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
    "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
    "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique",
)
FONTDIGITS_PARAMS: dict[str, Any] = {
    "canvas": 28,
    "font_px": [18, 28],  # inclusive range of font sizes in pixels
    "rotation_deg": [-15.0, 15.0],
    "shift_px": [-2.5, 2.5],  # centre offset, per axis
    "stroke_px": [0, 1],
}


@functools.lru_cache(maxsize=None)
def _truetype(path: str, px: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, px)


@functools.lru_cache(maxsize=4)
def _render_fontdigits(seed: int, per_class: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """[10 * per_class, 1, 28, 28] float32 images in [0, 1] (read-only: cached) and labels 0..9."""
    import matplotlib
    from PIL import Image, ImageDraw

    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = [font_dir / f"{name}.ttf" for name in FONTDIGITS_FONTS]
    missing = [str(f) for f in fonts if not f.exists()]
    if missing:
        raise RaysysError(f"fontdigits needs matplotlib's bundled DejaVu fonts, missing: {missing}. "
                          "Reinstall matplotlib (pip install --force-reinstall matplotlib).")
    p = FONTDIGITS_PARAMS
    canvas, centre = p["canvas"], p["canvas"] / 2
    rng = np.random.default_rng(seed)
    n = 10 * per_class
    labels = np.tile(np.arange(10), per_class)
    font_idx = rng.integers(len(fonts), size=n)
    font_px = rng.integers(p["font_px"][0], p["font_px"][1] + 1, size=n)
    angle = rng.uniform(p["rotation_deg"][0], p["rotation_deg"][1], size=n)
    shift = rng.uniform(p["shift_px"][0], p["shift_px"][1], size=(n, 2))
    stroke = rng.integers(p["stroke_px"][0], p["stroke_px"][1] + 1, size=n)

    images = np.empty((n, canvas, canvas), np.float32)
    for k in range(n):
        img = Image.new("L", (canvas, canvas), 0)
        ImageDraw.Draw(img).text((centre + shift[k, 0], centre + shift[k, 1]), str(labels[k]), fill=255,
                                 font=_truetype(str(fonts[font_idx[k]]), int(font_px[k])), anchor="mm",
                                 stroke_width=int(stroke[k]), stroke_fill=255)
        img = img.rotate(angle[k], resample=Image.Resampling.BILINEAR, center=(centre, centre))
        images[k] = np.asarray(img, np.float32)
    x = images[:, None] / 255.0
    if noise > 0:
        x = x + rng.normal(0.0, noise, size=x.shape).astype(np.float32)
    x = np.clip(x, 0.0, 1.0)
    x.flags.writeable = False  # cached: callers get copies
    return x, labels


def load_fontdigits(seed: int = 0, per_class: int = 300, noise: float = 0.05, size: int = 28) -> ImageData:
    """Digits 0-9 typeset in 12 DejaVu faces with seeded size, rotation, shift, stroke and noise.

    Deterministic given ``seed`` (which also fixes the 70/15/15 split); cached per process.
    """
    if per_class < 1:
        raise RaysysError(f"fontdigits per_class must be >= 1, got {per_class}.")
    x, y = _render_fontdigits(int(seed), int(per_class), float(noise))
    x = x.copy()
    resize = "none"
    if size != x.shape[-1]:
        resize = f"bilinear {x.shape[-1]}x{x.shape[-1]} -> {size}x{size}"
        x = F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < x.shape[-1]).clamp(0.0, 1.0).numpy()
    return _from_arrays("fontdigits", x, y, 10, seed,
                        {"source": "rendered with Pillow from matplotlib's DejaVu fonts",
                         "fonts": list(FONTDIGITS_FONTS), **FONTDIGITS_PARAMS, "per_class": per_class,
                         "noise_std": noise, "generation_seed": seed, "scale": "x/255, clipped to [0, 1]",
                         "resize": resize, "normalization": None})


# --- torchvision on-disk formats ------------------------------------------------------------
# Each reader returns uint8 (or [0, 1] float) arrays [n, C, H, W] and int64 labels 0..K-1.

@contextlib.contextmanager
def _reading(path):
    """A corrupt or truncated file is a user-fixable problem, not a traceback."""
    try:
        yield
    except RaysysError:
        raise
    except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError) as err:
        raise RaysysError(f"{path} could not be read ({type(err).__name__}: {err}): the file is corrupt or "
                          "not in the expected format. Delete it and download it again.") from err


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST format), optionally gzipped: magic 0 0 <dtype> <ndim>, big-endian dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with _reading(path), opener(path, "rb") as f:
        raw = f.read()
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in dtypes:
        raise RaysysError(f"{path} is not an IDX file (bad magic number). Re-download it.")
    ndim = raw[3]
    with _reading(path):
        dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
        data = np.frombuffer(raw, dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise RaysysError(f"{path} is truncated: header says {dims}, found {data.size} values. Re-download it.")
    return data.reshape(dims).astype(data.dtype.newbyteorder("="))


def read_libsvm(path: str | Path, num_features: int) -> tuple[np.ndarray, np.ndarray]:
    """A libsvm text file (``label idx:value ...``, 1-based indices), optionally bz2-compressed."""
    path = Path(path)
    opener = bz2.open if path.suffix == ".bz2" else open
    rows, labels = [], []
    with _reading(path), opener(path, "rt") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            row = np.zeros(num_features, np.float32)  # libsvm's sparse format: absent means 0
            for item in parts[1:]:
                idx, value = item.split(":")
                row[int(idx) - 1] = float(value)
            rows.append(row)
            labels.append(int(float(parts[0])))
    return np.stack(rows), np.array(labels, np.int64)


class RestrictedUnpickler(pickle.Unpickler):
    """Reads the CIFAR python batches, which are pickles, without executing arbitrary code.

    Only the globals those files need to rebuild numpy arrays are resolved; any other global
    (os.system, builtins.eval, ...) is refused before it can be called.
    """

    source = "a pickle"  # the file's path, for the error message

    def find_class(self, module: str, name: str):
        allowed = _PICKLE_ALLOWED.get((module, name))
        if allowed is None:
            raise RaysysError(
                f"refusing to unpickle global '{module}.{name}' from {self.source}: "
                "CIFAR batches only contain numpy arrays, lists and strings, so this file is not a genuine "
                "CIFAR batch. Delete it and re-download the dataset from the official URL.")
        return allowed()


def _numpy_global(*candidates: tuple[str, str]):
    def resolve():
        import importlib

        for module, name in candidates:
            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                continue
        raise RaysysError(f"numpy has none of {candidates}; install numpy>=1.24.")
    return resolve


def _latin1_encode(text, encoding="latin1"):
    # Python 3 protocol-2 pickles store bytes as _codecs.encode(str, 'latin1'); allow only that.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise RaysysError("refusing _codecs.encode with anything but a latin1 string in a CIFAR pickle.")
    return text.encode("latin1")


_PICKLE_ALLOWED: dict[tuple[str, str], Callable[[], object]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    **{(m, "_reconstruct"): _numpy_global(("numpy._core.multiarray", "_reconstruct"),
                                          ("numpy.core.multiarray", "_reconstruct"))
       for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _numpy_global(("numpy._core.numeric", "_frombuffer"),
                                         ("numpy.core.numeric", "_frombuffer"))
       for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("_codecs", "encode"): lambda: _latin1_encode,
}


def read_cifar_batch(path: str | Path) -> dict:
    """One CIFAR python batch as a dict with str keys ('data', 'labels' / 'fine_labels', ...)."""
    path = Path(path)
    with open(path, "rb") as f:
        unpickler = RestrictedUnpickler(f, encoding="latin1")  # the files are Python 2 pickles
        unpickler.source = str(path)
        try:
            batch = unpickler.load()
        except RaysysError:
            raise
        except Exception as err:
            raise RaysysError(f"{path} is not a readable CIFAR batch ({type(err).__name__}: {err}). "
                              "Re-download the dataset.") from err
    if not isinstance(batch, dict):
        raise RaysysError(f"{path} is not a CIFAR batch (expected a dict, got {type(batch).__name__}).")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise RaysysError(f"{path}: 'data' must be a uint8 array [n, 3072]. Re-download the dataset.")
    return batch


def read_stl10(x_path: str | Path, y_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """STL-10 binaries: uint8 images stored column-major per channel, labels 1..10 -> 0..9."""
    with _reading(x_path):
        x = np.fromfile(x_path, np.uint8)
    if x.size % (3 * 96 * 96):
        raise RaysysError(f"{x_path} size is not a multiple of 3x96x96. Re-download it.")
    x = x.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)  # stored [C, W, H]
    with _reading(y_path):
        y = np.fromfile(y_path, np.uint8).astype(np.int64) - 1
    if len(y) != len(x):
        raise RaysysError(f"{x_path} holds {len(x)} images but {y_path} {len(y)} labels. Re-download the dataset.")
    return np.ascontiguousarray(x), y


def read_svhn_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN cropped digits: X [32, 32, 3, n] uint8, y [n, 1] with 10 meaning digit 0."""
    from scipy.io import loadmat

    with _reading(path):
        mat = loadmat(path)
        x = np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1))
        y = mat["y"].astype(np.int64).ravel()
    y[y == 10] = 0
    return x, y


# Where torchvision puts the files, how to get them, and the official URLs / md5s for download=True.
_SOURCES: dict[str, dict] = {
    "mnist": {"torchvision": "MNIST", "num_classes": 10, "downloads": [
        (f"https://ossci-datasets.s3.amazonaws.com/mnist/{f}", f"MNIST/raw/{f}", md5) for f, md5 in [
            ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")]]},
    "fmnist": {"torchvision": "FashionMNIST", "num_classes": 10, "downloads": [
        (f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{f}", f"FashionMNIST/raw/{f}", md5)
        for f, md5 in [
            ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310")]]},
    "usps": {"torchvision": "USPS", "num_classes": 10, "downloads": [
        (f"https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/{f}", f, md5) for f, md5 in [
            ("usps.bz2", "ec16c51db3855ca6c91edd34d0e9b197"),
            ("usps.t.bz2", "8ea070ee2aca1ac39742fdd1ef5ed118")]]},
    "svhn": {"torchvision": "SVHN", "num_classes": 10, "downloads": [
        (f"http://ufldl.stanford.edu/housenumbers/{f}", f, md5) for f, md5 in [
            ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
            ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3")]]},
    "cifar10": {"torchvision": "CIFAR10", "num_classes": 10, "downloads": [
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
         "c58f30108f718f92721af3b95e74349a")]},
    "cifar100": {"torchvision": "CIFAR100", "num_classes": 100, "downloads": [
        ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
         "eb9058c3a382ffc7106e4002c42a8d85")]},
    "stl10": {"torchvision": "STL10", "num_classes": 10, "downloads": [
        ("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "stl10_binary.tar.gz",
         "91f7769df0f17e558f3565bffb0c7dfb")]},
}


def _resolve_root(name: str, root: str | Path | None) -> Path:
    root = root if root is not None else os.environ.get("RAYSYS_DATA")
    if root is None:
        raise RaysysError(f"dataset '{name}' is read from files on disk but no root was given: pass "
                          f"root='/path/to/data' (config: dataset.root) or set the RAYSYS_DATA environment variable.")
    return Path(root).expanduser()


def _require(name: str, root: Path, files: list[Path]) -> None:
    """Every path must exist; otherwise say which, where, and how to get them."""
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        tv = _SOURCES[name]["torchvision"]
        split = "split='train' and split='test'" if name in ("svhn", "stl10") else "train=True and train=False"
        raise RaysysError(
            f"dataset '{name}': missing file(s) {', '.join(missing)} (torchvision layout under root {root}). "
            f"Get them with torchvision.datasets.{tv}('{root}', {split}, download=True) on a machine with "
            f"internet and copy the folder here, or pass download=True (zoo config: dataset.options.download: true).")


def _idx_file(folder: Path, stem: str) -> Path:
    # torchvision keeps both the .gz and the extracted file; either will do.
    plain = folder / stem
    return plain if plain.exists() or not (folder / f"{stem}.gz").exists() else folder / f"{stem}.gz"


def fetch(name: str, root: str | Path) -> None:
    """Fetch a dataset from its official URL into ``root`` in torchvision's layout (needs internet)."""
    if name not in _SOURCES:
        raise RaysysError(f"dataset '{name}' has no download; downloadable: {', '.join(_SOURCES)}.")
    root = Path(root).expanduser()
    for url, rel, md5 in _SOURCES[name]["downloads"]:
        dest = root / rel
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        try:
            urllib.request.urlretrieve(url, tmp)  # noqa: S310 - a fixed https/http URL from _SOURCES
        except OSError as err:
            raise RaysysError(f"downloading {url} failed ({err}). Check the internet connection, or fetch "
                              f"the file by hand into {dest}.") from err
        md5sum = hashlib.md5(usedforsecurity=False)
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                md5sum.update(block)
        digest = md5sum.hexdigest()
        if digest != md5:
            tmp.unlink()
            raise RaysysError(f"{url} has md5 {digest}, expected {md5}: corrupted download, try again.")
        tmp.rename(dest)
        if dest.name.endswith(".tar.gz"):
            try:
                with tarfile.open(dest) as tar:
                    tar.extractall(root, filter="data")  # "data" refuses absolute paths and links out of root
            except (tarfile.TarError, OSError) as err:
                raise RaysysError(f"extracting {dest} failed ({err}). Delete it and download again.") from err


# --- shared post-processing for file datasets ------------------------------------------------

def _to_float(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


def _resize(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    down = size < x.shape[-1]
    parts = [F.interpolate(x[i:i + chunk], size=(size, size), mode="bilinear", align_corners=False, antialias=down)
             for i in range(0, len(x), chunk)]
    return torch.cat(parts).clamp_(0.0, 1.0)


_LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601-2, as PIL / torchvision Grayscale


def _file_dataset(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                  num_classes: int, files: list[Path], root: Path, *, seed: int = 0, val_fraction: float = 0.15,
                  image_size: int | None = None, grayscale: bool = False, rgb: bool = False,
                  normalize: bool = False, limit: int | None = None, extra: dict | None = None) -> ImageData:
    """Subsample, scale to [0, 1], convert colour, resize, carve val from train, normalize."""
    if not 0.0 < val_fraction < 1.0:
        raise RaysysError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    if grayscale and rgb:
        raise RaysysError("grayscale and rgb are exclusive: pick one (or neither to keep the native channels).")
    if limit is not None and limit < 2:
        raise RaysysError(f"limit must be >= 2 images (one for train, one for val), got {limit}.")
    (x_tr, y_tr), (x_te, y_te) = train, test
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        if len(x) != len(y):
            raise RaysysError(f"dataset '{name}': the {split} files hold {len(x)} images but {len(y)} labels. "
                              "Re-download the dataset.")
    native = list(x_tr.shape[1:])
    rng = np.random.default_rng(seed)
    if limit is not None:
        # Sorted, so a subsample keeps the files' order; drawn before any conversion to save memory.
        keep_tr = np.sort(rng.choice(len(x_tr), min(limit, len(x_tr)), replace=False))
        keep_te = np.sort(rng.choice(len(x_te), min(limit, len(x_te)), replace=False))
        x_tr, y_tr, x_te, y_te = x_tr[keep_tr], y_tr[keep_tr], x_te[keep_te], y_te[keep_te]

    xs = [_to_float(x_tr), _to_float(x_te)]
    colour = "native"
    if grayscale and xs[0].shape[1] == 3:
        xs = [torch.einsum("nchw,c->nhw", x, _LUMA)[:, None] for x in xs]
        colour = "grayscale ITU-R 601-2 luma"
    elif rgb and xs[0].shape[1] == 1:
        xs = [x.expand(-1, 3, -1, -1).contiguous() for x in xs]
        colour = "gray replicated to 3 channels"
    resize = "none"
    if image_size is not None and image_size != xs[0].shape[-1]:
        resize = f"bilinear{' antialiased' if image_size < xs[0].shape[-1] else ''} " \
                 f"{xs[0].shape[-1]}x{xs[0].shape[-2]} -> {image_size}x{image_size}"
        xs = [_resize(x, image_size) for x in xs]
    x_tr, x_te = xs

    perm = rng.permutation(len(x_tr))
    n_val = max(1, int(round(val_fraction * len(x_tr))))
    val_idx, tr_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    y_tr_t, y_te_t = torch.as_tensor(y_tr, dtype=torch.int64), torch.as_tensor(y_te, dtype=torch.int64)
    x_va, y_va = x_tr[val_idx], y_tr_t[val_idx]
    x_tr, y_tr_t = x_tr[tr_idx], y_tr_t[tr_idx]

    normalization = None
    if normalize:
        # Statistics of the training split only, so val/test stay unseen; recorded for reuse.
        mean = x_tr.mean(dim=(0, 2, 3))
        std = x_tr.std(dim=(0, 2, 3)).clamp_min(1e-8)
        x_tr, x_va, x_te = ((x - mean[:, None, None]) / std[:, None, None] for x in (x_tr, x_va, x_te))
        normalization = {"per_channel": True, "computed_on": "train", "mean": mean.tolist(), "std": std.tolist()}

    return ImageData(name, x_tr, y_tr_t, x_va, y_va, x_te, y_te_t, num_classes, {
        "source": f"torchvision on-disk format ({_SOURCES[name]['torchvision']})",
        "files": [str(f.relative_to(root)) for f in files],
        "native_shape": native, "scale": "x/255" if name != "usps" else "(x+1)/2",
        "colour": colour, "resize": resize, "normalization": normalization,
        "limit": limit, "split_seed": seed, "val_fraction": val_fraction,
        "val_from": "train file", "test_from": "test file",
        "sizes": {"train": len(x_tr), "val": len(x_va), "test": len(x_te)},
        **(extra or {}),
    })


# --- file dataset loaders ---------------------------------------------------------------------
# Shared options (passed through to _file_dataset): seed, val_fraction, image_size, grayscale,
# rgb, normalize, limit.

def _ensure(name: str, root: Path, files: list[Path], download: bool) -> None:
    if download and not all(f.exists() for f in files):
        fetch(name, root)
    _require(name, root, files)


def _load_idx_dataset(name: str, folder: str, root, download: bool, options: dict) -> ImageData:
    root = _resolve_root(name, root)
    raw = root / folder / "raw"
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if download and not all(_idx_file(raw, s).exists() for s in stems):
        fetch(name, root)
    files = [_idx_file(raw, s) for s in stems]
    _require(name, root, files)
    xtr, ytr, xte, yte = (read_idx(f) for f in files)
    return _file_dataset(name, (xtr[:, None], ytr.astype(np.int64)), (xte[:, None], yte.astype(np.int64)),
                         10, files, root, **options)


def load_mnist(root: str | Path | None = None, download: bool = False, **options) -> ImageData:
    return _load_idx_dataset("mnist", "MNIST", root, download, options)


def load_fmnist(root: str | Path | None = None, download: bool = False, **options) -> ImageData:
    return _load_idx_dataset("fmnist", "FashionMNIST", root, download, options)


def load_usps(root: str | Path | None = None, download: bool = False, **options) -> ImageData:
    root = _resolve_root("usps", root)
    files = [root / "usps.bz2", root / "usps.t.bz2"]
    _ensure("usps", root, files, download)
    (xtr, ytr), (xte, yte) = (read_libsvm(f, 256) for f in files)
    to_image = lambda x: np.clip((x.reshape(-1, 1, 16, 16) + 1.0) / 2.0, 0.0, 1.0)  # values are in [-1, 1]
    return _file_dataset("usps", (to_image(xtr), ytr - 1), (to_image(xte), yte - 1), 10, files, root,
                         extra={"label_map": "file label 1..10 -> 0..9"}, **options)


def load_svhn(root: str | Path | None = None, download: bool = False, **options) -> ImageData:
    root = _resolve_root("svhn", root)
    files = [root / "train_32x32.mat", root / "test_32x32.mat"]
    _ensure("svhn", root, files, download)
    return _file_dataset("svhn", read_svhn_mat(files[0]), read_svhn_mat(files[1]), 10, files, root,
                         extra={"label_map": "file label 10 -> 0"}, **options)


def _cifar_arrays(batches: list[dict], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)  # rows are R, G, B planes
    y = np.concatenate([np.asarray(b[label_key], np.int64) for b in batches])
    return x, y


def load_cifar10(root: str | Path | None = None, download: bool = False, **options) -> ImageData:
    root = _resolve_root("cifar10", root)
    folder = root / "cifar-10-batches-py"
    files = [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]
    _ensure("cifar10", root, files, download)
    batches = [read_cifar_batch(f) for f in files]
    return _file_dataset("cifar10", _cifar_arrays(batches[:5], "labels"), _cifar_arrays(batches[5:], "labels"),
                         10, files, root, **options)


def load_cifar100(root: str | Path | None = None, download: bool = False, labels: str = "fine",
                  **options) -> ImageData:
    if labels not in ("fine", "coarse"):
        raise RaysysError(f"cifar100 labels must be 'fine' (100 classes) or 'coarse' (20 superclasses), got '{labels}'.")
    root = _resolve_root("cifar100", root)
    files = [root / "cifar-100-python" / "train", root / "cifar-100-python" / "test"]
    _ensure("cifar100", root, files, download)
    tr, te = (read_cifar_batch(f) for f in files)
    key = f"{labels}_labels"
    return _file_dataset("cifar100", _cifar_arrays([tr], key), _cifar_arrays([te], key),
                         100 if labels == "fine" else 20, files, root, extra={"labels": labels}, **options)


def load_stl10(root: str | Path | None = None, download: bool = False, **options) -> ImageData:
    root = _resolve_root("stl10", root)
    folder = root / "stl10_binary"
    files = [folder / "train_X.bin", folder / "train_y.bin", folder / "test_X.bin", folder / "test_y.bin"]
    _ensure("stl10", root, files, download)
    return _file_dataset("stl10", read_stl10(files[0], files[1]), read_stl10(files[2], files[3]), 10, files, root,
                         extra={"label_map": "file label 1..10 -> 0..9", "layout": "column-major per channel"},
                         **options)


LOADERS: dict[str, Callable[..., ImageData]] = {
    "tetris": load_tetris,
    "digits": load_digits,
    "fontdigits": load_fontdigits,
    "mnist": load_mnist,
    "fmnist": load_fmnist,
    "usps": load_usps,
    "svhn": load_svhn,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "stl10": load_stl10,
}
EMBEDDED = ("tetris", "digits", "fontdigits")


def options_of(name: str) -> list[str]:
    """The keyword options ``load(name, ...)`` accepts."""
    params = inspect.signature(LOADERS[name]).parameters
    names = [p for p, v in params.items() if v.kind != inspect.Parameter.VAR_KEYWORD]
    if any(v.kind == inspect.Parameter.VAR_KEYWORD for v in params.values()):
        names += [p for p, v in inspect.signature(_file_dataset).parameters.items()
                  if v.kind == inspect.Parameter.KEYWORD_ONLY and p != "extra"]
    return names


def load(name: str, root: str | None = None, **options) -> ImageData:
    """Load a dataset by name. ``root`` is where torchvision-format datasets live on disk
    (ignored by the embedded datasets, which need no files)."""
    if name not in LOADERS:
        raise RaysysError(f"unknown dataset '{name}'. Choose one of: {', '.join(sorted(LOADERS))}.")
    if root is not None and name not in EMBEDDED:
        options["root"] = root
    allowed = options_of(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise RaysysError(f"dataset '{name}' has no option(s) {unknown}. Its options are: {', '.join(allowed)}.")
    return LOADERS[name](**options)
