"""Vectorized population trainer: many models of one architecture train as one batched computation.

PLACEHOLDER: trains models one at a time with :func:`raysys.train.train_one`; to be replaced
by the batched implementation with the same signature and semantics.
"""
from __future__ import annotations

import numpy as np
import torch

from raysys.datasets import ImageData
from raysys.train import EpochCallback, ModelSpec, train_one


def train_population(arch: str, specs: list[ModelSpec], data: ImageData, epochs: int,
                     on_epoch: EpochCallback | None = None, device: str = "cpu") -> None:
    keys = {s.population_key() for s in specs}
    if len(keys) != 1:
        raise ValueError(f"a population needs one (activation, optimizer, dropout, batch_size); got {sorted(keys)}")
    per_epoch: list[list] = [[] for _ in range(epochs + 1)]
    for spec in specs:
        train_one(arch, spec, data, epochs, lambda e, w, m: per_epoch[e].append((w, m)))
    if on_epoch is None:
        return
    for epoch, items in enumerate(per_epoch):
        weights = torch.cat([w for w, _ in items])
        metrics = {k: np.concatenate([m[k] for _, m in items]) for k in items[0][1]}
        on_epoch(epoch, weights, metrics)
