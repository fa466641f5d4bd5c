"""Training semantics shared by every trainer: what one model's config and seed determine.

:func:`train_one` is the plain per-model PyTorch loop, the ground truth that the vectorized
population trainer (:mod:`raysys.batched_trainer`) must reproduce within float tolerance.

Randomness of a model comes from three generators seeded from its seed alone:
initialization (``seed``), data order (``seed + DATA_STREAM``) and dropout masks
(``seed + DROPOUT_STREAM``), so a model is the same whether trained alone or in a population.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from raysys import architectures
from raysys.datasets import ImageData

DATA_STREAM = 1_000_003
DROPOUT_STREAM = 2_000_029
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "ggap")
EVAL_BATCH = 1024


@dataclass(frozen=True)
class ModelSpec:
    """Everything that determines one zoo model."""

    model_id: int
    seed: int
    init: str = "uniform"
    activation: str = "tanh"
    optimizer: str = "adam"
    lr: float = 3e-4
    weight_decay: float = 0.0
    dropout: float = 0.0
    batch_size: int = 10

    def population_key(self) -> tuple:
        """Models with equal keys can train together as one batched computation."""
        return (self.activation, self.optimizer, self.dropout, self.batch_size)

    def hyperparameters(self) -> dict:
        d = asdict(self)
        d.pop("model_id")
        return d


# on_epoch(epoch, weights [N, P] float32, metrics {name: float array [N]})
EpochCallback = Callable[[int, torch.Tensor, dict[str, np.ndarray]], None]


def make_generators(seed: int) -> tuple[torch.Generator, torch.Generator, torch.Generator]:
    return (torch.Generator().manual_seed(seed),
            torch.Generator().manual_seed(seed + DATA_STREAM),
            torch.Generator().manual_seed(seed + DROPOUT_STREAM))


def initial_model(arch: str, spec: ModelSpec, data: ImageData) -> torch.nn.Module:
    g_init, _, _ = make_generators(spec.seed)
    model = architectures.build(arch, spec.activation, spec.dropout, data.in_channels, data.num_classes)
    return architectures.init_model(model, spec.init, g_init)


def make_optimizer(params, spec: ModelSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer '{spec.optimizer}': choose adam or sgd")


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: ImageData) -> dict[str, float]:
    model.eval()
    out = {}
    for split in ("train", "val", "test"):
        x, y = data.split(split)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(x), EVAL_BATCH):
            logits = model(x[i:i + EVAL_BATCH])
            loss_sum += F.cross_entropy(logits, y[i:i + EVAL_BATCH], reduction="sum").item()
            correct += (logits.argmax(1) == y[i:i + EVAL_BATCH]).sum().item()
        out[f"{split}_loss"] = loss_sum / len(x)
        out[f"{split}_acc"] = correct / len(x)
    out["ggap"] = out["train_acc"] - out["test_acc"]
    return out


def train_one(arch: str, spec: ModelSpec, data: ImageData, epochs: int,
              on_epoch: EpochCallback | None = None, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """The plain loop a user would write: one model, torch.optim, shuffled mini-batches.

    Dropout masks come from the model's own dropout generator (see module docstring) via
    :func:`dropout_mask`, so the population trainer can reproduce them exactly.
    """
    _, g_data, g_drop = make_generators(spec.seed)
    model = model if model is not None else initial_model(arch, spec, data)
    opt = make_optimizer(model.parameters(), spec)
    x, y = data.x_train, data.y_train

    def report(epoch):
        if on_epoch is not None:
            m = evaluate(model, data)
            on_epoch(epoch, architectures.flatten(model)[None],
                     {k: np.array([v]) for k, v in m.items()})

    report(0)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=g_data)
        for i in range(0, len(x), spec.batch_size):
            idx = order[i:i + spec.batch_size]
            with _seeded_dropout(model, g_drop):
                loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        report(epoch)
    return model


def dropout_mask(shape, p: float, generator: torch.Generator) -> torch.Tensor:
    """Inverted-dropout mask drawn from ``generator``: keep with prob 1-p, scaled by 1/(1-p)."""
    keep = torch.rand(shape, generator=generator) >= p
    return keep.to(torch.float32) / (1.0 - p)


class _seeded_dropout:
    """Route a model's nn.Dropout calls through its own generator, in forward order."""

    def __init__(self, model: torch.nn.Module, generator: torch.Generator):
        self.model, self.generator = model, generator
        self.handles: list = []

    def __enter__(self):
        for m in self.model.modules():
            if isinstance(m, torch.nn.Dropout) and m.p > 0 and self.model.training:
                self.handles.append(m.register_forward_hook(self._hook))
                m._raysys_p, m.p = m.p, 0.0  # the hook applies the mask instead
        return self

    def _hook(self, module, inputs, output):
        return output * dropout_mask(output.shape, module._raysys_p, self.generator)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for m in self.model.modules():
            if hasattr(m, "_raysys_p"):
                m.p = m._raysys_p
                del m._raysys_p
        return False
