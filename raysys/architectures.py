"""The zoo architectures and their canonical flat weight layout.

The flat layout of a model is its parameters in ``state_dict`` order, each tensor in C order:
exactly what ``torch.nn.utils.parameters_to_vector(model.parameters())`` gives. The layout
(names, shapes, offsets, and the layer chain used for permutation symmetry) is written into
every zoo manifest, so a store can be read without this module.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

from raysys.config import RaysysError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
}
INITS = ("uniform", "normal", "kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal")
ArchName = Literal["tetris_ffn", "cnn_s", "cnn_m", "resnet18"]


@dataclass(frozen=True)
class Tensor:
    name: str  # state_dict key, e.g. "conv1.weight"
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layer:
    """One weight-bearing layer: its outputs are the units (neurons / conv kernels) that tokenize."""

    name: str  # module name, e.g. "conv1"
    kind: Literal["conv", "linear"]
    weight: str
    bias: str | None
    out_units: int
    in_units: int  # incoming channels / features per unit
    kernel: tuple[int, ...]  # () for linear
    # For a linear layer after a flatten of conv output: how many inputs each input channel spans.
    in_block: int = 1


@dataclass(frozen=True)
class Layout:
    arch: str
    in_channels: int
    image_size: int
    num_classes: int
    tensors: tuple[Tensor, ...]
    layers: tuple[Layer, ...]
    # True when layers form a plain chain (layer i's outputs are layer i+1's inputs), so hidden
    # units can be permuted; ResNets are not chains.
    chain: bool = True
    num_params: int = field(default=0)

    def __post_init__(self):
        object.__setattr__(self, "num_params", sum(t.numel for t in self.tensors))

    def tensor(self, name: str) -> Tensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        tensors = tuple(Tensor(t["name"], tuple(t["shape"]), t["offset"]) for t in d["tensors"])
        layers = tuple(Layer(**{**l, "kernel": tuple(l["kernel"])}) for l in d["layers"])
        return cls(d["arch"], d["in_channels"], d["image_size"], d["num_classes"], tensors, layers, d.get("chain", True))


class TetrisFFN(nn.Module):
    """16 -> 5 -> 4, no biases: 100 parameters (002 §4.1)."""

    def __init__(self, activation: str = "tanh", dropout: float = 0.0, in_channels: int = 1, num_classes: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(16 * in_channels, 5, bias=False)
        self.act = ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(5, num_classes, bias=False)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x.flatten(1)))))


class CNNs(nn.Module):
    """conv(8,5) > pool > act > conv(6,5) > pool > act > conv(4,2) > act > fc(36,20) > act > fc(20,10).

    2,464 parameters at 1 input channel, 2,864 at 3 (28x28 inputs). Dropout follows each hidden activation.
    """

    def __init__(self, activation: str = "tanh", dropout: float = 0.0, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 5)
        self.conv2 = nn.Conv2d(8, 6, 5)
        self.conv3 = nn.Conv2d(6, 4, 2)
        self.fc1 = nn.Linear(36, 20)
        self.fc2 = nn.Linear(20, num_classes)
        self.act = ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        x = self.drop(self.act(self.pool(self.conv1(x))))
        x = self.drop(self.act(self.pool(self.conv2(x))))
        x = self.drop(self.act(self.conv3(x)))
        x = self.drop(self.act(self.fc1(x.flatten(1))))
        return self.fc2(x)


class CNNm(nn.Module):
    """conv(16,3) > pool > act > conv(32,3) > pool > act > conv(15,3) > pool > act > fc(60,20) > act > fc(20,10).

    10,853 parameters at 3 input channels, 32x32 inputs (001 Table 1, CNN (m)).
    """

    def __init__(self, activation: str = "gelu", dropout: float = 0.0, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3)
        self.conv2 = nn.Conv2d(16, 32, 3)
        self.conv3 = nn.Conv2d(32, 15, 3)
        self.fc1 = nn.Linear(60, 20)
        self.fc2 = nn.Linear(20, num_classes)
        self.act = ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        x = self.drop(self.act(self.pool(self.conv1(x))))
        x = self.drop(self.act(self.pool(self.conv2(x))))
        x = self.drop(self.act(self.pool(self.conv3(x))))
        x = self.drop(self.act(self.fc1(x.flatten(1))))
        return self.fc2(x)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = ACTIVATIONS[activation]()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool). BatchNorm running
    statistics are buffers, not parameters, and are not part of the flat vector."""

    def __init__(self, activation: str = "relu", dropout: float = 0.0, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act = ACTIVATIONS[activation]()
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
            blocks.append(_BasicBlock(cin, cout, stride, activation))
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layers(self.act(self.bn1(self.conv1(x))))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.drop(x))


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "tetris_ffn": TetrisFFN,
    "cnn_s": CNNs,
    "cnn_m": CNNm,
    "resnet18": ResNet18,
}
DEFAULT_IMAGE_SIZE = {"tetris_ffn": 4, "cnn_s": 28, "cnn_m": 32, "resnet18": 32}


def build(arch: str, activation: str = "tanh", dropout: float = 0.0, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise RaysysError(f"unknown architecture '{arch}'. Choose one of: {', '.join(ARCHITECTURES)}.")
    if activation not in ACTIVATIONS:
        raise RaysysError(f"unknown activation '{activation}'. Choose one of: {', '.join(ACTIVATIONS)}.")
    return ARCHITECTURES[arch](activation=activation, dropout=dropout, in_channels=in_channels, num_classes=num_classes)


def layout_of(arch: str, in_channels: int = 1, num_classes: int = 10, image_size: int | None = None) -> Layout:
    model = build(arch, in_channels=in_channels, num_classes=num_classes)
    tensors, offset = [], 0
    for name, p in model.named_parameters():
        tensors.append(Tensor(name, tuple(p.shape), offset))
        offset += p.numel()
    params = dict(model.named_parameters())
    layers: list[Layer] = []
    prev_out = None
    modules = dict(model.named_modules())
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        w = module.weight
        kind: Literal["conv", "linear"] = "conv" if isinstance(module, nn.Conv2d) else "linear"
        in_units = w.shape[1]
        in_block = 1
        if kind == "linear" and prev_out is not None and prev_out[0] == "conv":
            # conv -> flatten -> fc: each conv channel feeds a contiguous block of fc inputs.
            in_block = in_units // prev_out[1]
        layers.append(Layer(
            name=name, kind=kind, weight=f"{name}.weight",
            bias=f"{name}.bias" if module.bias is not None else None,
            out_units=w.shape[0], in_units=in_units, kernel=tuple(w.shape[2:]), in_block=in_block,
        ))
        prev_out = (kind, w.shape[0])
    del params, modules
    return Layout(
        arch=arch, in_channels=in_channels,
        image_size=image_size or DEFAULT_IMAGE_SIZE[arch], num_classes=num_classes,
        tensors=tuple(tensors), layers=tuple(layers), chain=arch != "resnet18",
    )


def init_model(model: nn.Module, scheme: str, generator: torch.Generator, bias: float = 0.01) -> nn.Module:
    """Initialize every conv/linear weight by ``scheme`` (torch's defaults for each) and biases to ``bias``.

    "uniform" is U(0, 1) and "normal" N(0, 1), as in the model-zoo reference code: a deliberately
    wide range that makes zoos diverse.
    """
    if scheme not in INITS:
        raise RaysysError(f"unknown init '{scheme}'. Choose one of: {', '.join(INITS)}.")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                w = module.weight
                if scheme == "uniform":
                    w.uniform_(0.0, 1.0, generator=generator)
                elif scheme == "normal":
                    w.normal_(0.0, 1.0, generator=generator)
                elif scheme == "kaiming_uniform":
                    nn.init.kaiming_uniform_(w, generator=generator)
                elif scheme == "kaiming_normal":
                    nn.init.kaiming_normal_(w, generator=generator)
                elif scheme == "xavier_uniform":
                    nn.init.xavier_uniform_(w, generator=generator)
                else:
                    nn.init.xavier_normal_(w, generator=generator)
                if module.bias is not None:
                    module.bias.fill_(bias)
    return model


def flatten(model: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def unflatten(vector: torch.Tensor, model: nn.Module) -> nn.Module:
    """Load a flat vector (canonical layout) into ``model`` in place and return it."""
    n = sum(p.numel() for p in model.parameters())
    if vector.numel() != n:
        raise RaysysError(
            f"flat vector has {vector.numel()} values but the model has {n} parameters: "
            f"the weights come from a different architecture or input shape."
        )
    torch.nn.utils.vector_to_parameters(vector.to(next(model.parameters()).dtype), model.parameters())
    return model


def split_vector(vectors: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """[..., num_params] -> {name: [..., *shape]} views, in layout order."""
    return {t.name: vectors[..., t.offset:t.offset + t.numel].reshape(*vectors.shape[:-1], *t.shape) for t in layout.tensors}


def join_tensors(tensors: dict[str, torch.Tensor], layout: Layout) -> torch.Tensor:
    """Inverse of :func:`split_vector`."""
    first = tensors[layout.tensors[0].name]
    lead = first.shape[: first.dim() - len(layout.tensors[0].shape)]
    return torch.cat([tensors[t.name].reshape(*lead, t.numel) for t in layout.tensors], dim=-1)
