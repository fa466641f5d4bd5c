"""Latent samplers (000 §3.2) and the weight-noise baseline (Zeng et al. 2025)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raysys.config import ConfigError, RaysysError, validate
from raysys.populations.samplers import (KDESampler, UniformSampler, make_sampler, noise_population,
                                         top_fraction_mask)


def row_id_anchors(m: int, d: int) -> np.ndarray:
    """Anchors whose every value names its row: Z[i, j] = i."""
    return np.repeat(np.arange(m, dtype=np.float64)[:, None], d, axis=1)


def test_kde_dimensions_pick_their_own_anchor_rows():
    m, d, n = 50, 16, 400
    Z = row_id_anchors(m, d)
    samples = KDESampler(bandwidth=0.0, random_state=0).fit(Z).sample(n)
    rows_per_sample = np.array([len(np.unique(s)) for s in samples])
    # With one shared anchor (the reference bug) every sample would hold a single row id.
    assert (rows_per_sample == 1).sum() == 0
    expected = m * (1 - (1 - 1 / m) ** d)  # distinct rows among d independent uniform picks
    assert abs(rows_per_sample.mean() - expected) < 0.5
    # The joint KDE is the contrast: one row per sample, by design.
    joint = KDESampler(bandwidth=0.0, joint=True, random_state=0).fit(Z).sample(n)
    assert all(len(np.unique(s)) == 1 for s in joint)


def test_kde_breaks_cross_dimension_correlation_joint_keeps_it():
    rng = np.random.default_rng(1)
    x = rng.normal(size=300)
    Z = np.stack([x, x + 0.01 * rng.normal(size=300), rng.normal(size=300)], axis=1)  # dims 0,1 correlated
    per_dim = KDESampler(random_state=2).fit(Z).sample(20000)
    joint = KDESampler(joint=True, random_state=2).fit(Z).sample(20000)
    c = np.corrcoef(per_dim.T)
    assert np.abs(c[np.triu_indices(3, 1)]).max() < 0.05
    assert np.corrcoef(joint.T)[0, 1] > 0.7  # 1 / (1 + factor^2) with scott factor 300^(-1/7)


def test_kde_marginals_match_anchors():
    rng = np.random.default_rng(3)
    Z = rng.normal(loc=[0.0, 5.0, -2.0], scale=[1.0, 0.1, 3.0], size=(500, 3))
    s = KDESampler(bandwidth="scott", random_state=4).fit(Z)
    draws = s.sample(40000)
    np.testing.assert_allclose(draws.mean(0), Z.mean(0), atol=0.05 * Z.std(0).max())
    # A Gaussian KDE's variance is the anchors' (ddof=0) variance plus the kernel's.
    np.testing.assert_allclose(draws.var(0), Z.var(0) + s.bandwidth_ ** 2, rtol=0.05)
    silver = KDESampler(bandwidth="silverman").fit(Z).bandwidth_
    np.testing.assert_allclose(silver / s.bandwidth_, 0.75 ** -0.2)  # scipy's 1-D rules of thumb


def test_top_fraction_uses_validation_accuracy():
    m = 20
    Z = row_id_anchors(m, 4)
    rng = np.random.default_rng(5)
    val = rng.permutation(m) / m
    test = 1.0 - val  # the test ranking is the opposite: selecting by it would pick the other rows
    sampler = make_sampler("S_KDE30", bandwidth=0.0, random_state=0).fit(Z, y=val)  # y: validation accuracy
    top_val = set(np.argsort(-val)[:6])
    assert set(np.flatnonzero(sampler.selected_)) == top_val
    drawn = set(np.unique(sampler.sample(500)).astype(int))
    assert drawn <= top_val and drawn.isdisjoint(set(np.argsort(-test)[:6]))
    with pytest.raises(RaysysError, match="val_accuracy"):
        make_sampler("S_KDE30").fit(Z)


@given(acc=st.lists(st.floats(0, 1), min_size=1, max_size=60), frac=st.floats(0.01, 1.0))
@settings(max_examples=60, deadline=None)
def test_top_fraction_mask_property(acc, frac):
    mask = top_fraction_mask(acc, frac)
    acc = np.asarray(acc)
    assert mask.sum() == max(1, int(round(frac * len(acc))))
    if (~mask).any():
        assert acc[mask].min() >= acc[~mask].max()


@given(m=st.integers(1, 30), d=st.integers(1, 12), n=st.integers(1, 40), seed=st.integers(0, 2 ** 31))
@settings(max_examples=40, deadline=None)
def test_samplers_shape_support_and_reproducibility(m, d, n, seed):
    Z = np.random.default_rng(seed).normal(size=(m, d))
    a = KDESampler(bandwidth=0.0, random_state=seed).fit(Z).sample(n)
    assert a.shape == (n, d) and a.dtype == np.float32
    for j in range(d):  # zero bandwidth: every value is one of that dimension's anchors
        assert np.isin(a[:, j], Z[:, j].astype(np.float32)).all()
    b = KDESampler(bandwidth=0.0, random_state=seed).fit(Z).sample(n)
    np.testing.assert_array_equal(a, b)
    u = UniformSampler(random_state=seed).fit(Z).sample(n)
    assert u.shape == (n, d)
    assert np.all(u >= Z.min(0).astype(np.float32) - 1e-6) and np.all(u <= Z.max(0).astype(np.float32) + 1e-6)


def test_seeds_change_samples():
    Z = np.random.default_rng(0).normal(size=(40, 8))
    for name in ("S_KDE", "S_KDE_joint", "S_U"):
        a = make_sampler(name, random_state=1).fit(Z).sample(10)
        b = make_sampler(name, random_state=1).fit(Z).sample(10)
        c = make_sampler(name, random_state=2).fit(Z).sample(10)
        np.testing.assert_array_equal(a, b)
        assert not np.allclose(a, c)


def test_noise_baseline_perturbs_top_validation_models():
    rng = np.random.default_rng(6)
    W = rng.normal(size=(30, 500))
    val = rng.uniform(size=30)
    out, rows = noise_population(W, val, n=200, sigma=0.04, top_fraction=0.3, random_state=7)
    assert set(rows) <= set(np.argsort(-val)[:9])
    resid = out - W[rows]
    assert abs(resid.std() - 0.04) < 0.002 and abs(resid.mean()) < 0.002
    same, _ = noise_population(W, val, n=200, sigma=0.04, random_state=7)
    np.testing.assert_array_equal(out, same)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(RaysysError, match="bandwidth"):
        KDESampler(bandwidth="wide").fit(np.zeros((3, 2)))
    with pytest.raises(RaysysError, match="NaN"):
        KDESampler().fit(np.array([[np.nan, 1.0]]))
    with pytest.raises(RaysysError, match="fit"):
        KDESampler().sample(3)
    with pytest.raises(RaysysError, match="S_KDE30"):
        make_sampler("S_GAN")
    from raysys.populations.config import PopulationsConfig
    with pytest.raises(ConfigError, match="B_noise_<sigma>"):
        validate(PopulationsConfig, {"methods": ["S_KDE", "B_nois_0.1"]})
    with pytest.raises(ConfigError, match="transfer"):
        validate(PopulationsConfig, {"methods": ["B_F"]})
    with pytest.raises(ConfigError, match="unknown key"):
        validate(PopulationsConfig, {"sampling": {"bandwith": 0.1}})


# --- scikit-learn estimator API ---------------------------------------------------------------

def _snapshot(sampler) -> dict:
    """vars(sampler) with generators replaced by their full state, for exact comparison."""
    return {k: v.bit_generator.state if isinstance(v, np.random.Generator) else np.array(v, copy=True)
            for k, v in vars(sampler).items()}


def _assert_same_state(before: dict, after: dict):
    assert before.keys() == after.keys()
    for k in before:
        if isinstance(before[k], dict):
            assert before[k] == after[k], k
        else:
            np.testing.assert_array_equal(before[k], after[k], err_msg=k)


SAMPLERS = [KDESampler(bandwidth=0.2, top_fraction=0.5, random_state=3), KDESampler(joint=True, random_state=3),
            UniformSampler(random_state=3)]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["S_KDE30", "S_KDE_joint", "S_U"])
def test_samplers_are_sklearn_estimators(sampler):
    from sklearn.base import clone
    params = sampler.get_params()
    assert set(params) == ({"random_state"} if isinstance(sampler, UniformSampler)
                           else {"bandwidth", "top_fraction", "joint", "random_state"})
    Z = np.random.default_rng(0).normal(size=(20, 5))
    val = np.linspace(0, 1, 20)
    fitted = clone(sampler).fit(Z, val)
    twin = clone(fitted)
    assert twin.get_params() == params and not hasattr(twin, "rng_")
    np.testing.assert_array_equal(twin.fit(Z, val).sample(7), fitted.sample(7))
    assert fitted.set_params(random_state=4).fit(Z, val).random_state == 4


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["S_KDE30", "S_KDE_joint", "S_U"])
def test_sample_changes_no_state_and_is_seeded(sampler):
    from sklearn.base import clone
    Z = np.random.default_rng(1).normal(size=(30, 6))
    s = clone(sampler).fit(Z, np.linspace(0, 1, 30))
    before = _snapshot(s)
    first = s.sample(9)
    _assert_same_state(before, _snapshot(s))
    np.testing.assert_array_equal(s.sample(9), first)  # no hidden state: the same draw again
    np.testing.assert_array_equal(s.sample(9, random_state=3), first)  # the constructor's seed, given explicitly
    np.testing.assert_array_equal(s.sample(9, random_state=11), s.sample(9, random_state=11))
    assert not np.array_equal(s.sample(9, random_state=11), first)
    gen = np.random.default_rng(11)  # a caller's generator is advanced: successive draws differ
    a, b = s.sample(9, random_state=gen), s.sample(9, random_state=gen)
    np.testing.assert_array_equal(a, s.sample(9, random_state=11))
    assert not np.array_equal(a, b)
    _assert_same_state(before, _snapshot(s))


def test_a_generator_given_at_construction_is_not_advanced():
    gen = np.random.default_rng(5)
    state = gen.bit_generator.state
    s = KDESampler(random_state=gen).fit(np.random.default_rng(2).normal(size=(10, 3)))
    a = s.sample(4)
    assert gen.bit_generator.state == state and s.random_state is gen
    np.testing.assert_array_equal(a, KDESampler(random_state=5).fit(s.anchors_).sample(4))


class _PreviousKDESampler:
    """The KDE sampler before it became a BaseEstimator (sample advanced self.rng_), frozen."""

    def __init__(self, bandwidth, top_fraction, joint, random_state):
        self.bandwidth, self.top_fraction, self.joint, self.random_state = bandwidth, top_fraction, joint, random_state

    def fit(self, Z, val_accuracy=None):
        from raysys.populations.samplers import bandwidths
        Z = np.asarray(Z, np.float64)
        if self.top_fraction is not None:
            Z = Z[top_fraction_mask(val_accuracy, self.top_fraction)]
        self.anchors_ = Z
        self.bandwidth_ = bandwidths(Z, self.bandwidth, dims=Z.shape[1] if self.joint else 1)
        self.rng_ = np.random.default_rng(self.random_state)
        return self

    def sample(self, n):
        m, d = self.anchors_.shape
        if self.joint:
            rows = self.rng_.integers(0, m, size=(n, 1)).repeat(d, axis=1)
        else:
            rows = self.rng_.integers(0, m, size=(n, d))
        base = self.anchors_[rows, np.arange(d)[None, :]]
        return (base + self.rng_.standard_normal((n, d)) * self.bandwidth_[None, :]).astype(np.float32)


@pytest.mark.parametrize("name", ["S_KDE", "S_KDE30", "S_KDE_joint", "S_U"])
@pytest.mark.parametrize("bandwidth", ["scott", "silverman", 0.05])
def test_samples_are_identical_to_the_previous_implementation(name, bandwidth):
    """The populations stage and the search draw once from a freshly fitted, seeded sampler: those
    draws are bit-identical to the previous (state-advancing) implementation's."""
    rng = np.random.default_rng(8)
    Z, val = rng.normal(size=(37, 9)), rng.uniform(size=37)
    new = make_sampler(name, bandwidth, 0.3, random_state=12345).fit(Z, val).sample(25)
    if name == "S_U":
        old = np.random.default_rng(12345).uniform(Z.min(0), Z.max(0), size=(25, 9)).astype(np.float32)
    else:
        old = _PreviousKDESampler(bandwidth, 0.3 if name == "S_KDE30" else None, name == "S_KDE_joint",
                                  12345).fit(Z, val).sample(25)
    assert new.dtype == old.dtype == np.float32
    np.testing.assert_array_equal(new, old)


# --- B_noise calibrated on a target measure ----------------------------------------------------

def test_calibrated_noise_hits_the_target_and_refuses_an_unreachable_one():
    from raysys.populations.samplers import calibrate_noise
    rng = np.random.default_rng(8)
    W = rng.normal(size=(30, 400))
    val = rng.uniform(size=30)
    mean_norm = lambda X: float(np.linalg.norm(X - W[:1], axis=1).mean())  # noqa: E731  (grows with sigma)
    floor = mean_norm(noise_population(W, val, 20, 0.0, 0.3, 5)[0])
    for tol in (0.05, 0.005):
        out = calibrate_noise(W, val, 20, 1.5 * floor, mean_norm, 0.3, 5, tolerance=tol)
        assert abs(out["achieved"] - 1.5 * floor) <= tol * 1.5 * floor
        assert out["achieved"] == pytest.approx(mean_norm(out["weights"]))  # the draw it returns is the one scored
        np.testing.assert_array_equal(out["weights"], noise_population(W, val, 20, out["sigma"], 0.3, 5)[0])
        assert 0 < out["sigma"] and out["evaluations"] < 40
    with pytest.raises(RaysysError, match="unperturbed copies"):
        calibrate_noise(W, val, 20, 0.5 * floor, mean_norm, 0.3, 5)
    with pytest.raises(RaysysError, match="positive finite"):
        calibrate_noise(W, val, 20, float("nan"), mean_norm, 0.3, 5)


def test_matched_noise_config_is_validated():
    from raysys.populations.config import PopulationsConfig
    cfg = validate(PopulationsConfig, {"methods": ["S_KDE30", "B_noise_novelty", "B_noise_diversity"]})
    assert cfg.matched_noise.target == "S_KDE30" and cfg.matched_noise.tolerance == 0.02
    with pytest.raises(ConfigError, match="not in methods"):
        validate(PopulationsConfig, {"methods": ["S_KDE", "B_noise_novelty"]})
    with pytest.raises(ConfigError, match="sampled population"):
        validate(PopulationsConfig, {"methods": ["B_T", "B_noise_novelty"], "matched_noise": {"target": "B_T"}})
    with pytest.raises(ConfigError, match="tolerance"):
        validate(PopulationsConfig, {"matched_noise": {"tolerance": 0}})
