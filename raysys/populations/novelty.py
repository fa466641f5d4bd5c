"""Novelty of generated models: are they new, or copies of training checkpoints?

Zeng et al. 2025 found that weight generators mostly reproduce their training models, so every
accuracy we report sits beside:

* the L2 distance from each generated model to its nearest training model, raw and after
  aligning hidden units by permutation (a model with permuted hidden units computes the same
  function, so the raw distance overstates novelty);
* the prediction agreement with that nearest model on test inputs;
* the diversity of the population: mean and spread of pairwise distances.

Alignment is weight matching (Ainsworth et al. 2023) done greedily forward through the chain:
for each hidden layer, after the previous layer's permutation is applied to this layer's inputs,
match units by the squared distance of their incoming weights and bias, solved exactly with
``scipy.optimize.linear_sum_assignment``. A conv->flatten->fc boundary moves whole blocks of fc
columns (``Layer.in_block``). The output layer is never permuted (its units are the classes).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from raysys import architectures
from raysys.architectures import Layout
from raysys.config import RaysysError


def _split(W: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    return architectures.split_vector(W, layout)


def _expand_cols(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Channel permutation [M, C] -> column permutation [M, C*block] of a flattened conv output."""
    if block == 1:
        return perm
    ar = torch.arange(block, device=perm.device)
    return (perm[..., :, None] * block + ar).reshape(*perm.shape[:-1], -1)


def _permute_inputs(w: torch.Tensor, perm: torch.Tensor, block: int) -> torch.Tensor:
    """Reorder dim 2 (the inputs) of batched weights [M, out, in, *k] by perm [M, in//block]."""
    cols = _expand_cols(perm, block)
    idx = cols[:, None, :].expand(w.shape[0], w.shape[1], cols.shape[1])
    idx = idx.reshape(*idx.shape, *([1] * (w.dim() - 3))).expand(w.shape)
    return torch.gather(w, 2, idx)


def _permute_outputs(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    idx = perm.reshape(*perm.shape, *([1] * (t.dim() - 2))).expand(t.shape)
    return torch.gather(t, 1, idx)


def permute_units(W, layout: Layout, perms: list) -> torch.Tensor:
    """Apply hidden-unit permutations (one per hidden layer) to flat weights [N, P] or [P].

    ``perms[l][i]`` is the old index of new unit i. The result computes the same function.
    """
    _check_chain(layout)
    W = torch.as_tensor(W, dtype=torch.float32)
    single = W.dim() == 1
    W = W[None] if single else W
    parts = {k: v.clone() for k, v in _split(W, layout).items()}
    prev = None
    for l, layer in enumerate(layout.layers):
        w = parts[layer.weight]
        if prev is not None:
            w = _permute_inputs(w, prev.expand(w.shape[0], -1), layer.in_block)
        if l < len(layout.layers) - 1:
            p = torch.as_tensor(np.asarray(perms[l]), dtype=torch.long)[None].expand(w.shape[0], -1)
            w = _permute_outputs(w, p)
            if layer.bias is not None:
                parts[layer.bias] = _permute_outputs(parts[layer.bias], p)
            prev = p[:1]
        parts[layer.weight] = w
    out = architectures.join_tensors(parts, layout)
    return out[0] if single else out


def _check_chain(layout: Layout) -> None:
    if not layout.chain:
        raise RaysysError(f"permutation alignment needs a plain chain of layers; {layout.arch} is not one. "
                          f"Use raw distances (align=False) for this architecture.")


def align_to(w, references, layout: Layout) -> torch.Tensor:
    """Permute the hidden units of one model ``w`` [P] to best match each of ``references`` [M, P].

    Returns [M, P]: row m is ``w`` aligned to reference m (same function as ``w``).
    """
    R = torch.as_tensor(references, dtype=torch.float32)
    parts, _ = _align(torch.as_tensor(w, dtype=torch.float32), _split(R, layout), layout)
    return architectures.join_tensors(parts, layout)


def aligned_distances(w, ref_parts: dict[str, torch.Tensor], layout: Layout) -> np.ndarray:
    """L2 distance [M] between ``w`` aligned to each reference and that reference.

    ``ref_parts`` is ``split_vector(references, layout)``, split once for many calls.
    """
    _, sq = _align(torch.as_tensor(w, dtype=torch.float32), ref_parts, layout)
    return np.sqrt(np.maximum(sq, 0.0))


def _align(w: torch.Tensor, r_parts: dict[str, torch.Tensor], layout: Layout):
    _check_chain(layout)
    M = next(iter(r_parts.values())).shape[0]
    a_parts = _split(w[None], layout)
    out, sq = {}, np.zeros(M)

    def add(name, t):
        out[name] = t
        sq[:] += (t - r_parts[name]).pow(2).reshape(M, -1).sum(1).double().numpy()

    prev = None
    last = len(layout.layers) - 1
    for l, layer in enumerate(layout.layers):
        wa = a_parts[layer.weight].expand(M, *a_parts[layer.weight].shape[1:])
        ba = a_parts[layer.bias].expand(M, -1) if layer.bias is not None else None
        if prev is not None:
            wa = _permute_inputs(wa, prev, layer.in_block)
        if l < last:
            # cost[m, i, j]: squared distance between reference unit i and our unit j.
            cost = torch.cdist(r_parts[layer.weight].reshape(M, layer.out_units, -1),
                               wa.reshape(M, layer.out_units, -1)).pow(2)
            if ba is not None:
                cost += (r_parts[layer.bias][:, :, None] - ba[:, None, :]).pow(2)
            cost = cost.numpy()
            perm = np.empty((M, layer.out_units), dtype=np.int64)
            for m in range(M):
                _, perm[m] = linear_sum_assignment(cost[m])
            prev = torch.from_numpy(perm)
            wa = _permute_outputs(wa, prev)
            ba = _permute_outputs(ba, prev) if ba is not None else None
        add(layer.weight, wa)
        if ba is not None:
            add(layer.bias, ba)
    return out, sq


def nearest(W, references, layout: Layout | None = None, align: bool = True) -> dict[str, np.ndarray]:
    """For each model in ``W`` [N, P]: its nearest reference (training) model, raw and aligned.

    Returns arrays of length N: ``raw`` / ``raw_index`` and, when ``align``, ``aligned`` /
    ``aligned_index`` (the aligned search covers every reference, not only the raw-nearest).
    """
    W = torch.from_numpy(np.array(W, dtype=np.float32))
    R = torch.from_numpy(np.array(references, dtype=np.float32))
    if W.shape[1] != R.shape[1]:
        raise RaysysError(f"generated models have {W.shape[1]} parameters but the training models have {R.shape[1]}: "
                          f"they are not the same architecture.")
    d = torch.cdist(W.double(), R.double())
    out = {"raw": d.min(1).values.numpy(), "raw_index": d.argmin(1).numpy()}
    if align:
        aligned, idx = np.empty(len(W)), np.empty(len(W), np.int64)
        r_parts = _split(R, layout)
        for i in range(len(W)):
            dist = aligned_distances(W[i], r_parts, layout)
            idx[i] = int(dist.argmin())
            aligned[i] = float(dist[idx[i]])
        out["aligned"], out["aligned_index"] = aligned, idx
    return out


def pairwise(W, layout: Layout | None = None, align: bool = False) -> np.ndarray:
    """Distances between all pairs (i < j) of a population [N, P]; aligned when asked."""
    W = torch.from_numpy(np.array(W, dtype=np.float32))
    if len(W) < 2:
        return np.zeros(0)
    if not align:
        return torch.pdist(W.double()).numpy()
    parts = []
    for i in range(len(W) - 1):
        parts.append(aligned_distances(W[i], _split(W[i + 1:], layout), layout))
    return np.concatenate(parts)


@torch.no_grad()
def predict(arch: str, weights, x: torch.Tensor, activation: str, num_classes: int,
            batch_size: int = 1024) -> np.ndarray:
    """Predicted labels [N, len(x)] of each flat weight vector loaded into ``arch``."""
    W = torch.from_numpy(np.array(weights, dtype=np.float32))
    model = architectures.build(arch, activation, 0.0, x.shape[1], num_classes).eval()
    preds = np.empty((len(W), len(x)), np.int64)
    for i in range(len(W)):
        architectures.unflatten(W[i], model)
        preds[i] = torch.cat([model(x[j:j + batch_size]).argmax(1) for j in range(0, len(x), batch_size)]).numpy()
    return preds


def novelty(generated, training, layout: Layout, x_test: torch.Tensor, activation: str,
            align: bool = True) -> dict:
    """Per-model novelty of ``generated`` [N, P] against ``training`` [M, P], plus diversity.

    Diverged models (non-finite weights) get NaN distances and agreement, index -1, and are
    counted in ``summary["non_finite_models"]`` rather than poisoning the means.
    """
    align = align and layout.chain
    generated = np.asarray(generated, dtype=np.float32)
    training = np.asarray(training, dtype=np.float32)
    n = len(generated)
    finite = np.isfinite(generated).all(axis=1)
    per = {"nearest_raw": np.full(n, np.nan), "nearest_raw_index": np.full(n, -1),
           "nearest_aligned": np.full(n, np.nan), "nearest_aligned_index": np.full(n, -1),
           "agreement": np.full(n, np.nan)}
    ok = generated[finite]
    div_raw, div_aligned = np.zeros(0), np.zeros(0)
    if len(ok):
        near = nearest(ok, training, layout, align)
        per["nearest_raw"][finite], per["nearest_raw_index"][finite] = near["raw"], near["raw_index"]
        idx = near["aligned_index"] if align else near["raw_index"]
        if align:
            per["nearest_aligned"][finite], per["nearest_aligned_index"][finite] = near["aligned"], idx
        gen_preds = predict(layout.arch, ok, x_test, activation, layout.num_classes)
        ref_preds = predict(layout.arch, training[idx], x_test, activation, layout.num_classes)
        per["agreement"][finite] = (gen_preds == ref_preds).mean(axis=1)
        div_raw = pairwise(ok)
        div_aligned = pairwise(ok, layout, align=True) if align else None
    return {
        "per_model": {k: v.tolist() for k, v in per.items()},
        "summary": summarize(per["nearest_raw"], per["nearest_aligned"] if align else None, per["agreement"],
                             div_raw, div_aligned, int((~finite).sum())),
    }


def finite_mean_std(x) -> tuple[float, float]:
    """Mean and sample std over the finite values (diverged models are counted apart, not averaged in)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def summarize(raw, aligned, agreement, div_raw, div_aligned, non_finite: int = 0) -> dict:
    out = {}
    for key, values in [("nearest_raw", raw), ("nearest_aligned", aligned), ("agreement", agreement),
                        ("diversity_raw", div_raw), ("diversity_aligned", div_aligned)]:
        m, s = finite_mean_std(values) if values is not None else (float("nan"), float("nan"))
        out[f"{key}_mean"], out[f"{key}_std"] = m, s
    out["non_finite_models"] = non_finite
    return out
