"""Linear probes and s(W): model selection on validation only, statistics against numpy, and
probes that find signal where there is some and none where there is none."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from raysys.architectures import Layer, Layout, Tensor, layout_of
from raysys.probes import (ALPHAS, LayerStatistics, LinearClassifierProbe, LinearProbe, ProbeError,
                           ood_probes, probe_all, r2)


def tiny_layout() -> Layout:
    """fc: 3 -> 2 with bias: weight (2, 3) at offset 0, bias (2,) at offset 6."""
    return Layout("hand", 1, 1, 2, (Tensor("fc.weight", (2, 3), 0), Tensor("fc.bias", (2,), 6)),
                  (Layer("fc", "linear", "fc.weight", "fc.bias", 2, 3, ()),))


# --- s(W) -----------------------------------------------------------------------------------

def test_layer_statistics_hand_example():
    w = np.array([[1, 2, 3, 4, 5, 6, 10, 20]], np.float32)
    s = LayerStatistics(tiny_layout()).fit(w)
    got = s.transform(w)[0]
    # weights 1..6: mean 3.5, population variance 35/12, linear-interpolated quantiles
    # q = 1 + 5p: 1.05, 2.25, 3.5, 4.75, 5.95; bias {10, 20}: mean 15, var 25, q = 10 + 10p.
    expected = [3.5, 35 / 12, 1.05, 2.25, 3.5, 4.75, 5.95,
                15.0, 25.0, 10.1, 12.5, 15.0, 17.5, 19.9]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert list(s.get_feature_names_out()[:2]) == ["fc.weight:mean", "fc.weight:var"]
    assert s.get_feature_names_out()[-1] == "fc.bias:q99"


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_layer_statistics_matches_numpy_per_tensor(n, seed):
    layout = layout_of("tetris_ffn", num_classes=4)
    w = np.random.default_rng(seed).normal(size=(n, layout.num_params)).astype(np.float32)
    feats = LayerStatistics(layout.to_dict()).fit(w).transform(w)  # a manifest's dict works too
    assert feats.shape == (n, 7 * len(layout.tensors))
    for k, t in enumerate(layout.tensors):
        block = w[:, t.offset:t.offset + t.numel].astype(np.float64)
        want = np.c_[block.mean(1), block.var(1), np.quantile(block, [0.01, 0.25, 0.5, 0.75, 0.99], axis=1).T]
        np.testing.assert_allclose(feats[:, 7 * k:7 * (k + 1)], want, rtol=1e-5, atol=1e-6)


def test_layer_statistics_rejects_wrong_width():
    with pytest.raises(ProbeError, match=r"\[n, 8\]"):
        LayerStatistics(tiny_layout()).fit(np.zeros((2, 9)))


# --- ridge probe ----------------------------------------------------------------------------

def test_ridge_probe_equals_sklearn_ridge_on_standardized_features():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(120, 15)) * rng.uniform(0.1, 10, 15), rng.normal(size=120)
    probe = LinearProbe(alphas=[2.5]).fit(X[:80], y[:80], X[80:100], y[80:100])
    scaler = StandardScaler().fit(X[:80])
    ref = Ridge(alpha=2.5).fit(scaler.transform(X[:80]), y[:80])
    np.testing.assert_allclose(probe.predict(X[100:]), ref.predict(scaler.transform(X[100:])), atol=1e-9)


def _selection_data(seed=0):
    """Validation targets follow a shrunken relation (favours a large α), test targets the true
    one (favours a small α), so the two splits disagree on the best α."""
    rng = np.random.default_rng(seed)
    d = 30
    w = rng.normal(size=d)
    X = {s: rng.normal(size=(n, d)) for s, n in (("train", 40), ("val", 200), ("test", 200))}
    y = {"train": X["train"] @ w + 0.5 * rng.normal(size=40),
         "val": 0.3 * X["val"] @ w, "test": X["test"] @ w}
    return X, y


def test_alpha_is_chosen_on_validation_not_test():
    X, y = _selection_data()
    probe = LinearProbe().fit(X["train"], y["train"], X["val"], y["val"])  # no test data given at all
    # Independently: score every α on val and on test with sklearn's Ridge.
    scaler = StandardScaler().fit(X["train"])
    scores = {s: [] for s in ("val", "test")}
    for a in sorted(ALPHAS):
        m = Ridge(alpha=a).fit(scaler.transform(X["train"]), y["train"])
        for s in scores:
            scores[s].append(r2(y[s], m.predict(scaler.transform(X[s]))))
    val_best = sorted(ALPHAS)[int(np.argmax(scores["val"]))]
    test_best = sorted(ALPHAS)[int(np.argmax(scores["test"]))]
    assert val_best != test_best, "the construction must make validation and test disagree"
    assert probe.alpha_ == val_best
    assert probe.val_r2_ == pytest.approx(max(scores["val"]), abs=1e-9)
    # The probe scored on test is the train-fitted one at validation's α, not a test-tuned one.
    assert probe.score(X["test"], y["test"])["r2"] < max(scores["test"])


def test_probe_all_never_uses_test_for_selection():
    """Replacing the test split (features and targets) changes test scores but no choice."""
    rng = np.random.default_rng(1)
    frames, feats = {}, {}
    for s, n in (("train", 90), ("val", 30), ("test", 30)):
        X = rng.normal(size=(n, 6))
        frames[s] = pd.DataFrame({"test_acc": X[:, 0] + 0.1 * rng.normal(size=n), "ggap": rng.normal(size=n),
                                  "lr": 0.01, "activation": np.where(X[:, 1] > 0, "relu", "tanh")})
        feats[s] = X
    base = probe_all({"X": feats}, frames)
    feats2 = {**feats, "test": rng.normal(size=(30, 6))}
    frames2 = {**frames, "test": frames["test"].sample(frac=1.0, random_state=0).reset_index(drop=True)}
    other = probe_all({"X": feats2}, frames2)
    pick = lambda t, m: t[t.metric.isin(m)].set_index(["target", "metric"])["value"]
    pd.testing.assert_series_equal(pick(base, ["alpha", "C", "val_r2", "val_accuracy"]),
                                   pick(other, ["alpha", "C", "val_r2", "val_accuracy"]))
    assert not np.allclose(pick(base, ["r2"]).to_numpy(), pick(other, ["r2"]).to_numpy())
    # lr is constant in this zoo: not a probe target.
    assert set(base.target) == {"test_acc", "ggap", "activation"}


def test_probe_finds_linear_signal_and_no_signal_in_noise():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(600, 40))
    signal = X @ rng.normal(size=40) + 0.3 * rng.normal(size=600)
    noise = rng.normal(size=600)
    tr, va, te = slice(0, 400), slice(400, 500), slice(500, 600)
    good = LinearProbe().fit(X[tr], signal[tr], X[va], signal[va]).score(X[te], signal[te])
    assert good["r2"] > 0.95 and good["kendall_tau"] > 0.85
    bad = LinearProbe().fit(X[tr], noise[tr], X[va], noise[va]).score(X[te], noise[te])
    assert abs(bad["r2"]) < 0.1


def test_classifier_probe_accuracy():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(450, 10))
    logits = X[:, :3] @ rng.normal(size=(3, 3)) * 4
    labels = np.array(["kaiming", "normal", "uniform"])[logits.argmax(1)]
    tr, va, te = slice(0, 300), slice(300, 375), slice(375, 450)
    probe = LinearClassifierProbe().fit(X[tr], labels[tr], X[va], labels[va])
    assert probe.score(X[te], labels[te])["accuracy"] > 0.85
    assert probe.val_accuracy_ == max(probe.val_scores_.values())
    shuffled = rng.permutation(labels)
    chance = LinearClassifierProbe().fit(X[tr], shuffled[tr], X[va], shuffled[va]).score(X[te], shuffled[te])
    assert chance["accuracy"] < 0.55
    with pytest.raises(ProbeError, match="two classes"):
        LinearClassifierProbe().fit(X[tr], np.zeros(300), X[va], labels[va])


def test_ood_probe_keeps_order_under_an_offset():
    """A zoo whose targets are shifted: the probe ranks models right (τ high) but misses the
    offset (R² low): the reason OOD probes report Kendall's τ."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=8)
    X = {s: rng.normal(size=(n, 8)) for s, n in (("train", 150), ("val", 50), ("test", 50))}
    frames = {s: pd.DataFrame({"test_acc": X[s] @ w + 0.1 * rng.normal(size=len(X[s]))}) for s in X}
    X_ood = rng.normal(size=(100, 8))
    f_ood = pd.DataFrame({"test_acc": X_ood @ w + 5.0})
    table = ood_probes({"X": X}, frames, {"X": X_ood}, f_ood).set_index("metric")["value"]
    assert table["kendall_tau"] > 0.85
    assert table["r2"] < 0.0


def test_probe_all_rejects_misaligned_frames():
    X = {s: np.zeros((5, 2)) for s in ("train", "val", "test")}
    frames = {s: pd.DataFrame({"test_acc": np.arange(4.0)}) for s in X}
    with pytest.raises(ProbeError, match="row-aligned"):
        probe_all({"X": X}, frames)
