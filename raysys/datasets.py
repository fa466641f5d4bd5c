"""Image datasets with fixed, seeded train/val/test splits.

Embedded (no download): ``tetris`` (synthetic 4x4 shapes, 002 §4.1) and ``digits``
(scikit-learn's 8x8 digits, scaled to [0, 1] and resized to 28x28). Every dataset comes back
as an :class:`ImageData` of float32 tensors plus a ``describe()`` record written into zoo
manifests, so a zoo says exactly which images its models saw.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

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


LOADERS: dict[str, Callable[..., ImageData]] = {
    "tetris": load_tetris,
    "digits": load_digits,
}


def load(name: str, root: str | None = None, **options) -> ImageData:
    """Load a dataset by name. ``root`` is where torchvision-format datasets live on disk."""
    if name not in LOADERS:
        raise RaysysError(f"unknown dataset '{name}'. Choose one of: {', '.join(sorted(LOADERS))}.")
    loader = LOADERS[name]
    if root is not None:
        options["root"] = root
    return loader(**options)
