"""Losses of the hyper-representation: L = beta * reconstruction + (1 - beta) * contrastive.

Reconstruction uses layer-wise loss normalization (LWLN, 000 §3.1): each layer's squared error
is divided by sigma_l^2, the variance of that layer's weights over the training split, so
small-magnitude layers are not traded away for large ones. With sigma_l = 1 it is plain MSE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_statistics(weights: torch.Tensor, param_group: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of all weights of each layer (token group) over the rows of ``weights`` [N, P].

    Computed in float64: a zoo has millions of values per layer. A constant layer gets std 1 (no
    scaling) instead of a division by zero.
    """
    w = weights.double()
    count = torch.bincount(param_group, minlength=num_groups).double() * w.shape[0]
    total = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, param_group, w.sum(0))
    mean = total / count
    centered = (w - mean[param_group]) ** 2
    var = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, param_group, centered.sum(0)) / count
    std = var.sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean.float(), std.float()


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, inv_var: torch.Tensor | None = None) -> torch.Tensor:
    """(1 / (M N)) sum_i sum_l ||w_hat_i^l - w_i^l||^2 / sigma_l^2 — eq. (2) of 000; ``inv_var`` is [P]."""
    sq = (pred - target) ** 2
    if inv_var is not None:
        sq = sq * inv_var
    return sq.mean()


def ntxent(p1: torch.Tensor, p2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR): each view must pick its partner out of the other 2B - 1 projections."""
    batch = p1.shape[0]
    p = F.normalize(torch.cat([p1, p2]), dim=1)
    sim = p @ p.T / temperature
    sim = sim.masked_fill(torch.eye(2 * batch, dtype=torch.bool, device=p.device), float("-inf"))
    partner = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(p.device)
    return F.cross_entropy(sim, partner)


def positive_only(p1: torch.Tensor, p2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Positive pairs only (Ec+D, 002 eq. 3): minimize (1 - cos) / T, i.e. MAXIMIZE view similarity.

    (The reference code minimized (cos / T)^2, which drives views towards orthogonality.)
    """
    return ((1.0 - F.cosine_similarity(p1, p2, dim=1)) / temperature).mean()


CONTRASTIVE = {"ntxent": ntxent, "positive": positive_only}
