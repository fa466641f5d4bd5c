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
from raysys.probes import (ALPHAS, CS, LayerStatistics, LinearClassifierProbe, LinearProbe, ProbeError,
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
    probe = LinearProbe(alphas=[2.5], validation_data=(X[80:100], y[80:100])).fit(X[:80], y[:80])
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
    probe = LinearProbe(validation_data=(X["val"], y["val"])).fit(X["train"], y["train"])  # no test data at all
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
    assert probe.score(X["test"], y["test"]) < max(scores["test"])


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
    good = LinearProbe(validation_data=(X[va], signal[va])).fit(X[tr], signal[tr]).scores(X[te], signal[te])
    assert good["r2"] > 0.95 and good["kendall_tau"] > 0.85
    bad = LinearProbe(validation_data=(X[va], noise[va])).fit(X[tr], noise[tr]).scores(X[te], noise[te])
    assert abs(bad["r2"]) < 0.1


def test_classifier_probe_accuracy():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(450, 10))
    logits = X[:, :3] @ rng.normal(size=(3, 3)) * 4
    labels = np.array(["kaiming", "normal", "uniform"])[logits.argmax(1)]
    tr, va, te = slice(0, 300), slice(300, 375), slice(375, 450)
    probe = LinearClassifierProbe(validation_data=(X[va], labels[va])).fit(X[tr], labels[tr])
    assert probe.score(X[te], labels[te]) > 0.85
    assert probe.val_accuracy_ == max(probe.val_scores_.values())
    shuffled = rng.permutation(labels)
    chance = LinearClassifierProbe(validation_data=(X[va], shuffled[va])).fit(X[tr], shuffled[tr])
    assert chance.score(X[te], shuffled[te]) < 0.55
    with pytest.raises(ProbeError, match="two classes"):
        LinearClassifierProbe(validation_data=(X[va], labels[va])).fit(X[tr], np.zeros(300))


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


# --- scikit-learn estimator API ---------------------------------------------------------------

def test_probes_follow_the_sklearn_estimator_api():
    from sklearn.base import clone, is_classifier, is_regressor
    from sklearn.exceptions import NotFittedError
    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(90, 6)), rng.normal(size=90)
    labels = np.where(X[:, 0] + 0.3 * rng.normal(size=90) > 0, "relu", "tanh")
    alphas, val = [0.1, 10.0], (X[60:], y[60:])
    ridge = LinearProbe(alphas=alphas, validation_data=val)
    assert ridge.get_params() == {"alphas": alphas, "validation_data": val}
    assert ridge.get_params()["alphas"] is alphas  # parameters are stored unchanged
    assert set(LinearClassifierProbe().get_params()) == {"Cs", "max_iter", "validation_data"}
    assert is_regressor(ridge) and is_classifier(LinearClassifierProbe())
    with pytest.raises(NotFittedError):
        ridge.predict(X)
    assert ridge.fit(X[:60], y[:60]) is ridge
    for fitted, target in ((ridge, y), (LinearClassifierProbe(validation_data=(X[60:], labels[60:])), labels)):
        fitted.fit(X[:60], target[:60])
        twin = clone(fitted)  # unfitted, same parameters
        assert not hasattr(twin, "scaler_") and twin.get_params().keys() == fitted.get_params().keys()
        np.testing.assert_array_equal(twin.fit(X[:60], target[:60]).predict(X), fitted.predict(X))
        assert isinstance(fitted.score(X, target), float)
    assert ridge.score(X, y) == ridge.scores(X, y)["r2"]
    with pytest.raises(ProbeError, match="validation_data"):
        LinearProbe().fit(X, y)


def _reference_ridge(Xt, yt, Xv, yv, alphas):
    """The probe of the previous (``fit(X_train, y_train, X_val, y_val)``) implementation, frozen."""
    scaler = StandardScaler().fit(np.asarray(Xt, np.float64))
    A, B = scaler.transform(np.asarray(Xt, np.float64)), scaler.transform(np.asarray(Xv, np.float64))
    yt, yv = np.asarray(yt, np.float64), np.asarray(yv, np.float64)
    icpt = float(yt.mean())
    U, s, Vt = np.linalg.svd(A, full_matrices=False)
    uty = U.T @ (yt - icpt)
    alphas = sorted(alphas)
    coefs = [Vt.T @ (s / (s ** 2 + a) * uty) for a in alphas]
    scores = [r2(yv, B @ c + icpt) for c in coefs]
    best = len(alphas) - 1 - int(np.argmax(np.nan_to_num(np.asarray(scores), nan=-np.inf)[::-1]))
    return scaler, alphas[best], coefs[best], icpt, scores[best]


def test_probes_are_identical_to_the_previous_implementation():
    import warnings
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(6)
    X = rng.normal(size=(160, 12)).astype(np.float32)
    y = X[:, :3] @ rng.normal(size=3) + 0.5 * rng.normal(size=160)
    tr, va, te = slice(0, 100), slice(100, 130), slice(130, 160)
    probe = LinearProbe(validation_data=(X[va], y[va])).fit(X[tr], y[tr])
    scaler, alpha, coef, icpt, val_r2 = _reference_ridge(X[tr], y[tr], X[va], y[va], ALPHAS)
    assert (probe.alpha_, probe.intercept_, probe.val_r2_) == (alpha, icpt, val_r2)
    np.testing.assert_array_equal(probe.coef_, coef)
    np.testing.assert_array_equal(probe.predict(X[te]), scaler.transform(X[te].astype(np.float64)) @ coef + icpt)
    labels = np.array(["a", "b", "c"])[(X[:, :3] @ rng.normal(size=(3, 3))).argmax(1)]
    clf = LinearClassifierProbe(validation_data=(X[va], labels[va])).fit(X[tr], labels[tr])
    scaler = StandardScaler().fit(X[tr].astype(np.float64))
    best = None
    for C in sorted(CS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            m = LogisticRegression(C=C, max_iter=300).fit(scaler.transform(X[tr].astype(np.float64)), labels[tr])
        acc = float(np.mean(m.predict(scaler.transform(X[va].astype(np.float64))) == labels[va]))
        if best is None or acc > best[0]:
            best = (acc, C, m)
    assert (clf.val_accuracy_, clf.C_) == best[:2]
    np.testing.assert_array_equal(clf.predict(X[te]), best[2].predict(scaler.transform(X[te].astype(np.float64))))
