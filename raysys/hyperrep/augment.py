"""Augmentations of flat weight batches, drawn on the fly (002 §2).

- Permutation: hidden units of a chain network can be reordered without changing its function,
  if the next layer's inputs are reordered the same way. One random permutation per sample and
  hidden layer; the whole batch is permuted with one gather.
- Random erasing: with probability p, zero a contiguous span of 3-30 % of the vector.
- Noise: additive Gaussian noise.

Reconstruction targets are the clean permuted weights, so :func:`two_views` returns both.
"""
from __future__ import annotations

import torch

from raysys.architectures import Layout
from raysys.config import RaysysError


class Permuter(torch.nn.Module):
    """Function-preserving permutations of hidden units, vectorized over the batch."""

    def __init__(self, layout: Layout):
        super().__init__()
        if not layout.chain:
            raise RaysysError(
                f"architecture '{layout.arch}' is not a plain chain of layers (skip connections), so its "
                f"hidden units cannot be permuted layer by layer. Set augment.permute=false."
            )
        self.layout = layout
        # The last layer's outputs are the classes: fixed. Every other layer is hidden.
        self.hidden = list(range(len(layout.layers) - 1))

    def random_permutations(self, batch: int, generator: torch.Generator | None = None,
                            device="cpu") -> list[torch.Tensor]:
        """One [batch, units] permutation per hidden layer."""
        return [torch.argsort(torch.rand(batch, self.layout.layers[i].out_units, generator=generator), dim=1).to(device)
                for i in self.hidden]

    def index(self, perms: list[torch.Tensor]) -> torch.Tensor:
        """[B, P] gather index that applies ``perms`` (one [B, units] per hidden layer)."""
        layout, batch = self.layout, perms[0].shape[0] if perms else 1
        device = perms[0].device if perms else "cpu"
        # Per tensor: flat positions shaped like the tensor, one copy per sample.
        idx = {t.name: torch.arange(t.offset, t.offset + t.numel, device=device).view(t.shape)
               .expand(batch, *t.shape) for t in layout.tensors}
        for h, perm in zip(self.hidden, perms):
            layer, nxt = layout.layers[h], layout.layers[h + 1]
            # Outputs of layer h: rows of its weight and its bias.
            idx[layer.weight] = _gather_dim(idx[layer.weight], 1, perm)
            if layer.bias is not None:
                idx[layer.bias] = _gather_dim(idx[layer.bias], 1, perm)
            # Inputs of layer h+1; after conv -> flatten a channel spans in_block contiguous inputs.
            block = nxt.in_block
            cols = torch.arange(nxt.in_units, device=device)
            in_perm = perm[:, cols // block] * block + cols % block
            idx[nxt.weight] = _gather_dim(idx[nxt.weight], 2, in_perm)
        return torch.cat([idx[t.name].reshape(batch, -1) for t in layout.tensors], dim=1)

    def forward(self, weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        perms = self.random_permutations(weights.shape[0], generator, weights.device)
        return weights.gather(1, self.index(perms))


def _gather_dim(idx: torch.Tensor, dim: int, perm: torch.Tensor) -> torch.Tensor:
    """idx[b, ..., perm[b, j], ...] along ``dim`` (dim counts the batch dim)."""
    shape = [perm.shape[0]] + [1] * (idx.dim() - 1)
    shape[dim] = perm.shape[1]
    return idx.gather(dim, perm.view(shape).expand(*idx.shape[:dim], perm.shape[1], *idx.shape[dim + 1:]))


def random_erase(weights: torch.Tensor, p: float, low: float, high: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """With probability p per sample, zero a contiguous span of a U(low, high) fraction of the vector."""
    if p <= 0:
        return weights
    batch, n = weights.shape
    u = torch.rand(batch, 3, generator=generator).to(weights.device)
    length = ((low + (high - low) * u[:, 0]) * n).round().long().clamp(1, n)
    start = (u[:, 1] * (n - length + 1)).long()
    erase = (u[:, 2] < p)[:, None]
    pos = torch.arange(n, device=weights.device)[None]
    span = (pos >= start[:, None]) & (pos < (start + length)[:, None]) & erase
    return weights.masked_fill(span, 0.0)


def add_noise(weights: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    if std <= 0:
        return weights
    return weights + std * torch.randn(weights.shape, generator=generator).to(weights.device)


class Augmenter:
    """Draws views: (clean permuted target, augmented input) per sample."""

    def __init__(self, layout: Layout, permute: bool = True, erase_p: float = 0.5,
                 erase_low: float = 0.03, erase_high: float = 0.3, noise_std: float = 0.0):
        self.permuter = Permuter(layout) if permute else None
        self.erase = (erase_p, erase_low, erase_high)
        self.noise_std = noise_std

    @property
    def is_identity(self) -> bool:
        """True when every view is the input itself (no permutation, erasing or noise)."""
        return self.permuter is None and self.erase[0] <= 0 and self.noise_std <= 0

    def view(self, weights: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        clean = self.permuter(weights, generator) if self.permuter is not None else weights
        noisy = add_noise(random_erase(clean, *self.erase, generator=generator), self.noise_std, generator)
        return clean, noisy

    def two_views(self, weights: torch.Tensor, generator: torch.Generator | None = None):
        """Two independent views: ((clean1, aug1), (clean2, aug2))."""
        return self.view(weights, generator), self.view(weights, generator)
