"""Novelty of generated models: are they new, or copies of training checkpoints?

Zeng et al. 2025 found that weight generators mostly reproduce their training models, so every
accuracy we report sits beside:

* the L2 distance from each generated model to its nearest training model, raw and after
  aligning hidden units by permutation (a model with permuted hidden units computes the same
  function, so the raw distance overstates novelty);
* the prediction agreement with that nearest model on test inputs;
* the diversity of the population: mean and spread of pairwise distances.

Alignment is weight matching of hidden units (:mod:`raysys.align`, shared with ``raysys zoo align``).
"""
from __future__ import annotations

import numpy as np
import torch

from raysys import architectures
from raysys.align import aligned_distances
from raysys.architectures import Layout
from raysys.config import RaysysError


def _needs_layout(layout: Layout | None) -> Layout:
    if layout is None:
        raise RaysysError("aligned distances need the architecture's layout: pass layout=architectures.layout_of(arch) "
                          "(or align=False)")
    return layout


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
        layout = _needs_layout(layout)
        aligned, idx = np.empty(len(W)), np.empty(len(W), np.int64)
        r_parts = architectures.split_vector(R, layout)
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
    layout = _needs_layout(layout)
    parts = []
    for i in range(len(W) - 1):
        parts.append(aligned_distances(W[i], architectures.split_vector(W[i + 1:], layout), layout))
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
    div_raw = np.zeros(0)
    div_aligned: np.ndarray | None = np.zeros(0)
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


def measure(kind: str, W, references, layout: Layout, align: bool = True) -> tuple[str, float]:
    """One population-level number the report shows, for calibrating baselines against it.

    ``kind`` "novelty": mean distance to the nearest training model (``nearest_aligned`` when
    aligned, else ``nearest_raw``); "diversity": mean pairwise distance within the population
    (``diversity_aligned`` / ``diversity_raw``). The same computation as :func:`novelty`'s summary
    (diverged models left out), without the predictions. Returns (summary key, value).
    """
    align = bool(align and layout.chain)
    W = np.asarray(W, dtype=np.float32)
    W = W[np.isfinite(W).all(axis=1)]
    flavour = "aligned" if align else "raw"
    if kind == "novelty":
        return f"nearest_{flavour}_mean", finite_mean_std(nearest(W, references, layout, align)[flavour] if len(W)
                                                           else np.zeros(0))[0]
    if kind == "diversity":
        return f"diversity_{flavour}_mean", finite_mean_std(pairwise(W, layout, align))[0]
    raise RaysysError(f"unknown measure '{kind}'; use 'novelty' or 'diversity'.")
