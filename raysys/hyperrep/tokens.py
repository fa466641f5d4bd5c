"""Tokenize flat weight vectors: one token per neuron or conv kernel (002 §3, "AttN").

A token holds one unit's incoming weights, flattened, followed by its bias; tokens are
zero-padded to the widest token. Parameters that belong to no conv/linear layer (BatchNorm
scale and shift in ResNets) form their own token groups, one token per channel, so every
parameter lands in exactly one token entry and :meth:`Tokenizer.detokenize` is an exact
inverse for every architecture.

Both directions are a single gather with index tensors built once from the layout: no Python
loop over tokens runs per batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raysys.architectures import Layout


@dataclass(frozen=True)
class TokenGroup:
    """A contiguous run of tokens that share one embedding: a layer (or a parameter-only module)."""

    name: str
    start: int  # first token index
    count: int  # number of tokens (units)
    width: int  # real entries per token (the rest is padding)


class Tokenizer(torch.nn.Module):
    """[B, P] flat weights <-> [B, T, D] tokens, with a [T, D] mask of real entries.

    Index tensors are buffers, so they follow ``.to(device)`` with the model that owns them.
    """

    def __init__(self, layout: Layout):
        super().__init__()
        self.layout = layout
        per_group = _unit_indices(layout)  # [(name, [count, width] flat-position table)]
        self.num_params = layout.num_params
        self.token_dim = max(idx.shape[1] for _, idx in per_group)
        self.num_tokens = sum(idx.shape[0] for _, idx in per_group)
        pad = self.num_params  # gathers from an appended zero column

        groups, rows, layer_of_token, start = [], [], [], 0
        for g, (name, idx) in enumerate(per_group):
            count, width = idx.shape
            groups.append(TokenGroup(name, start, count, width))
            rows.append(torch.nn.functional.pad(idx, (0, self.token_dim - width), value=pad))
            layer_of_token.append(torch.full((count,), g, dtype=torch.long))
            start += count
        self.groups: tuple[TokenGroup, ...] = tuple(groups)
        gather = torch.cat(rows)  # [T, D]
        mask = gather != pad
        # Every parameter is in exactly one token slot: that slot, in flat token order, is the inverse.
        flat = gather.reshape(-1)
        inverse = torch.empty(self.num_params, dtype=torch.long)
        slots = torch.nonzero(mask.reshape(-1)).squeeze(1)
        inverse[flat[slots]] = slots
        assert torch.equal(torch.sort(flat[slots]).values, torch.arange(self.num_params)), \
            "layout tensors overlap or leave gaps"

        self.register_buffer("gather_index", gather.reshape(-1), persistent=False)
        self.register_buffer("inverse_index", inverse, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("layer_index", torch.cat(layer_of_token), persistent=False)
        self.register_buffer("position", torch.arange(self.num_tokens), persistent=False)
        # The group of every parameter, in flat order: what LWLN needs.
        param_group = torch.empty(self.num_params, dtype=torch.long)
        param_group[flat[slots]] = self.layer_index.repeat_interleave(self.token_dim)[slots]
        self.register_buffer("param_group", param_group, persistent=False)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def tokenize(self, weights: torch.Tensor) -> torch.Tensor:
        """[B, P] -> [B, T, D]; padding entries are exactly zero."""
        padded = torch.nn.functional.pad(weights, (0, 1))
        return padded[:, self.gather_index].view(weights.shape[0], self.num_tokens, self.token_dim)

    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, P]; padding entries are ignored."""
        return tokens.reshape(tokens.shape[0], -1)[:, self.inverse_index]


def _unit_indices(layout: Layout) -> list[tuple[str, torch.Tensor]]:
    """Per token group, a [units, width] table of flat positions in token-entry order."""
    def positions(tensor_name):
        t = layout.tensor(tensor_name)
        return torch.arange(t.offset, t.offset + t.numel).view(t.shape[0], -1)

    covered, groups = set(), []
    for layer in layout.layers:
        parts = [positions(layer.weight)]
        covered.add(layer.weight)
        if layer.bias is not None:
            parts.append(positions(layer.bias))
            covered.add(layer.bias)
        groups.append((layout.tensor(layer.weight).offset, layer.name, torch.cat(parts, dim=1)))
    # Leftover tensors (BatchNorm affine parameters): group by module, one token per channel.
    leftovers: dict[str, list] = {}
    for t in layout.tensors:
        if t.name not in covered:
            leftovers.setdefault(t.name.rsplit(".", 1)[0], []).append(t)
    for module, tensors in leftovers.items():
        if len({t.shape[0] for t in tensors}) == 1:
            groups.append((tensors[0].offset, module, torch.cat([positions(t.name) for t in tensors], dim=1)))
        else:
            groups += [(t.offset, t.name, positions(t.name)) for t in tensors]
    groups.sort(key=lambda g: g[0])  # tokens follow the flat (state_dict) order
    return [(name, idx) for _, name, idx in groups]
