"""Samplers over hyper-representation latents, and the weight-space noise baseline.

scikit-learn estimators (``BaseEstimator``: parameters in ``__init__``, ``clone``/``get_params``):
``fit(Z, y=None)`` (``y``: each anchor's validation accuracy, used by ``top_fraction``) then
``sample(n, random_state=None) -> [n, D]``. ``sample`` changes no state: it draws from a copy of
the generator ``fit`` seeded from the constructor's ``random_state`` (so repeated calls repeat the
draw), or from ``random_state`` when given (an int, or a ``np.random.Generator`` that it advances).

* S_KDE (000 §3.2): a Gaussian KDE per latent dimension, each dimension drawn **independently**.
  Drawing from a 1-D Gaussian KDE is "pick an anchor, add kernel noise"; every dimension must
  pick its own anchor. The published reference seeded each dimension's draw identically, so all
  dimensions picked the same anchor row and the "samples" were near-copies of training
  embeddings. Here the anchor index is an ``[n, D]`` array, one draw per (sample, dimension).
* S_KDE30: the same over the top 30 % of anchors ranked by *validation* accuracy (never test).
* S_KDE_joint: a KDE over the whole vector (product kernel): one anchor per sample, so the
  sample keeps that anchor's cross-dimension structure. A diagnostic for the independence
  assumption, and closer to the noise baseline by construction.
* S_U: uniform within each dimension's anchor range.
* B_noise (Zeng et al. 2025): top-30 % training *weights* plus Gaussian noise of std sigma.
"""
from __future__ import annotations

import copy

import numpy as np
from sklearn.base import BaseEstimator

from raysys.config import RaysysError

SAMPLER_NAMES = ("S_KDE", "S_KDE30", "S_KDE_joint", "S_U")


def _as_matrix(Z, what: str = "Z") -> np.ndarray:
    Z = np.asarray(Z.detach().cpu().numpy() if hasattr(Z, "detach") else Z, dtype=np.float64)
    if Z.ndim != 2 or Z.shape[0] < 1:
        raise RaysysError(f"{what} must be a 2-D array [num_anchors, dims] with at least one row; got shape {Z.shape}. "
                          f"Pass the embeddings of the training-split models.")
    if not np.isfinite(Z).all():
        raise RaysysError(f"{what} contains NaN or inf values. Drop diverged models before fitting a sampler.")
    return Z


def top_fraction_mask(val_accuracy, fraction: float) -> np.ndarray:
    """Boolean mask of the best ``fraction`` of rows by validation accuracy (at least one row).

    Ties at the cut are broken by row order (stable sort), so the selection is deterministic.
    """
    acc = np.asarray(val_accuracy, dtype=np.float64)
    if not 0.0 < fraction <= 1.0:
        raise RaysysError(f"top_fraction must be in (0, 1]; got {fraction}. Use e.g. 0.3 for the top 30 %.")
    if not np.isfinite(acc).all():
        raise RaysysError("val_accuracy contains NaN; drop diverged models before selecting the top fraction.")
    k = max(1, int(round(fraction * len(acc))))
    order = np.argsort(-acc, kind="stable")
    mask = np.zeros(len(acc), bool)
    mask[order[:k]] = True
    return mask


def bandwidths(Z: np.ndarray, bandwidth, dims: int = 1) -> np.ndarray:
    """Per-dimension kernel std. Rules of thumb use each dimension's spread; ``dims`` is the KDE's
    dimensionality (1 for per-dimension KDEs, D for the joint one) as in scipy's gaussian_kde."""
    m = Z.shape[0]
    std = Z.std(axis=0, ddof=1) if m > 1 else np.zeros(Z.shape[1])
    if bandwidth == "scott":
        factor = m ** (-1.0 / (dims + 4))
    elif bandwidth == "silverman":
        factor = (m * (dims + 2) / 4.0) ** (-1.0 / (dims + 4))
    elif isinstance(bandwidth, (int, float)) and not isinstance(bandwidth, bool) and bandwidth >= 0:
        return np.full(Z.shape[1], float(bandwidth))
    else:
        raise RaysysError(f"bandwidth must be 'scott', 'silverman' or a non-negative number; got {bandwidth!r}.")
    return factor * std


def _fitted_rng(random_state) -> np.random.Generator:
    """The generator ``fit`` keeps: seeded from ``random_state``, never the caller's own object."""
    return np.random.default_rng(copy.deepcopy(random_state))


def _draw_rng(sampler, random_state) -> np.random.Generator:
    """The generator one ``sample`` call draws from; the sampler's own ``rng_`` is never advanced."""
    return copy.deepcopy(sampler.rng_) if random_state is None else np.random.default_rng(random_state)


class KDESampler(BaseEstimator):
    """Gaussian KDE sampler over latent vectors (S_KDE, S_KDE30, S_KDE_joint)."""

    def __init__(self, bandwidth: float | str = "scott", top_fraction: float | None = None,
                 joint: bool = False, random_state: int | None = None):
        self.bandwidth = bandwidth
        self.top_fraction = top_fraction
        self.joint = joint
        self.random_state = random_state

    def fit(self, Z, y=None) -> "KDESampler":
        """``y``: the validation accuracy of each anchor (required with ``top_fraction``)."""
        Z, val_accuracy = _as_matrix(Z), y
        if self.top_fraction is not None:
            if val_accuracy is None:
                raise RaysysError("top_fraction is set but no val_accuracy was given. Pass the validation accuracy "
                                  "of each anchor model (the zoo's val_acc column), not its test accuracy.")
            if len(val_accuracy) != len(Z):
                raise RaysysError(f"val_accuracy has {len(val_accuracy)} entries for {len(Z)} anchors; "
                                  f"pass one accuracy per row of Z.")
            self.selected_ = top_fraction_mask(val_accuracy, self.top_fraction)
            Z = Z[self.selected_]
        else:
            self.selected_ = np.ones(len(Z), bool)
        self.anchors_ = Z
        self.bandwidth_ = bandwidths(Z, self.bandwidth, dims=Z.shape[1] if self.joint else 1)
        self.rng_ = _fitted_rng(self.random_state)
        return self

    def sample(self, n: int, random_state=None) -> np.ndarray:
        if not hasattr(self, "anchors_"):
            raise RaysysError("call fit(Z) before sample(n).")
        rng = _draw_rng(self, random_state)
        m, d = self.anchors_.shape
        if self.joint:
            rows = rng.integers(0, m, size=(n, 1)).repeat(d, axis=1)
        else:
            # One anchor per (sample, dimension): the independence of 000 §3.2.
            rows = rng.integers(0, m, size=(n, d))
        base = self.anchors_[rows, np.arange(d)[None, :]]
        return (base + rng.standard_normal((n, d)) * self.bandwidth_[None, :]).astype(np.float32)


class UniformSampler(BaseEstimator):
    """S_U: uniform within the per-dimension [min, max] of the anchors."""

    def __init__(self, random_state: int | None = None):
        self.random_state = random_state

    def fit(self, Z, y=None) -> "UniformSampler":
        Z = _as_matrix(Z)
        self.low_, self.high_ = Z.min(axis=0), Z.max(axis=0)
        self.rng_ = _fitted_rng(self.random_state)
        return self

    def sample(self, n: int, random_state=None) -> np.ndarray:
        if not hasattr(self, "low_"):
            raise RaysysError("call fit(Z) before sample(n).")
        rng = _draw_rng(self, random_state)
        return rng.uniform(self.low_, self.high_, size=(n, len(self.low_))).astype(np.float32)


def make_sampler(name: str, bandwidth: float | str = "scott", top_fraction: float = 0.3,
                 random_state: int | None = None):
    """The sampler behind a method name of 000 (S_KDE, S_KDE30, S_KDE_joint, S_U)."""
    if name == "S_KDE":
        return KDESampler(bandwidth, None, False, random_state)
    if name == "S_KDE30":
        return KDESampler(bandwidth, top_fraction, False, random_state)
    if name == "S_KDE_joint":
        return KDESampler(bandwidth, None, True, random_state)
    if name == "S_U":
        return UniformSampler(random_state)
    raise RaysysError(f"unknown sampler '{name}'. Choose one of: {', '.join(SAMPLER_NAMES)}.")


def noise_population(weights, val_accuracy, n: int, sigma: float, top_fraction: float = 0.3,
                     random_state: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """B_noise: ``n`` models, each a random top-``top_fraction`` training model (by validation
    accuracy) plus N(0, sigma^2) on every weight. Returns (weights [n, P] float32, anchor rows)."""
    W = _as_matrix(weights, "weights")
    if len(val_accuracy) != len(W):
        raise RaysysError(f"val_accuracy has {len(val_accuracy)} entries for {len(W)} models; pass one per row.")
    if sigma < 0:
        raise RaysysError(f"noise sigma must be >= 0; got {sigma}.")
    pool = np.flatnonzero(top_fraction_mask(val_accuracy, top_fraction))
    rng = np.random.default_rng(random_state)
    rows = pool[rng.integers(0, len(pool), size=n)]
    out = W[rows] + sigma * rng.standard_normal((n, W.shape[1]))
    return out.astype(np.float32), rows


def calibrate_noise(weights, val_accuracy, n: int, target: float, measure, top_fraction: float = 0.3,
                    random_state: int | None = None, tolerance: float = 0.02, max_iter: int = 40) -> dict:
    """The B_noise sigma whose population scores ``target`` on ``measure`` (e.g. novelty or diversity).

    ``measure(W [n, P]) -> float`` is evaluated on :func:`noise_population` draws that share one
    seed, so every sigma perturbs the same anchors along the same directions (common random
    numbers): the measure is then a smooth, increasing function of sigma, and Brent's method
    (bisection safeguarded, :func:`scipy.optimize.brentq`) finds its root without any fine-tuning.
    ``tolerance`` is relative: the result satisfies ``|measure - target| <= tolerance * target``.

    Returns ``{"sigma", "achieved", "target", "evaluations", "weights", "rows"}``; raises when the
    target is below what unperturbed copies of the anchors already score (sigma = 0), naming both.
    """
    from scipy.optimize import brentq

    if not (np.isfinite(target) and target > 0):
        raise RaysysError(f"the calibration target must be a positive finite number; got {target}. "
                          f"Check that the population it comes from has finite weights.")
    if not 0 < tolerance < 1:
        raise RaysysError(f"tolerance is relative and must be in (0, 1); got {tolerance}. Use e.g. 0.02 for 2 %.")
    W = _as_matrix(weights, "weights")
    cache: dict[float, float] = {}

    def score(sigma: float) -> float:
        if sigma not in cache:
            cache[sigma] = float(measure(noise_population(W, val_accuracy, n, sigma, top_fraction, random_state)[0]))
        return cache[sigma]

    def result(sigma: float) -> dict:
        pop, rows = noise_population(W, val_accuracy, n, sigma, top_fraction, random_state)
        return {"sigma": float(sigma), "achieved": score(sigma), "target": float(target),
                "evaluations": len(cache), "weights": pop, "rows": rows}

    floor = score(0.0)
    if floor >= target * (1 - tolerance):
        if floor <= target * (1 + tolerance):
            return result(0.0)
        raise RaysysError(f"no noise level reaches {target:.4g}: unperturbed copies of the top-{top_fraction:.0%} "
                          f"training models already score {floor:.4g}. The target population is more concentrated "
                          f"than the training models it was sampled from.")
    # Start near the scale where sigma * sqrt(P) (the length of the noise vector) equals the target.
    hi = max(target / np.sqrt(W.shape[1]), 1e-8)
    for _ in range(60):
        if score(hi) >= target:
            break
        hi *= 2.0
    else:
        raise RaysysError(f"no noise level up to sigma {hi:.3g} reaches {target:.4g} (it scores {score(hi):.4g}).")
    lo = max((s for s, v in cache.items() if v < target), default=0.0)
    # Brent's root on sigma; rtol on sigma bounds the relative error of a measure ~ proportional to sigma
    sigma = brentq(lambda s: score(s) - target, lo, hi, rtol=tolerance / 8, maxiter=max_iter)
    if abs(score(sigma) - target) > tolerance * target:
        raise RaysysError(f"calibration stopped at sigma {sigma:.4g} scoring {score(sigma):.4g}, not within "
                          f"{tolerance:.0%} of {target:.4g}; raise the tolerance or the number of models.")
    return result(sigma)
