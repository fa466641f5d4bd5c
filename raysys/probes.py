"""Linear probes: how much of a model's characteristics can be read linearly off a representation.

Three feature sets are compared (002 §4): the hyper-representation ``z``, the raw flat weights
``W`` and the layer-wise statistics ``s(W)`` of Unterthiner et al. 2020. Continuous targets
(test accuracy, generalization gap, epoch, lr, weight decay, dropout, ...) get a ridge probe,
categorical ones (init, activation, optimizer) a logistic-regression probe.

Model selection uses the validation split only: the regularization strength is the one with the
best validation score, and the probe that is scored on test is the one fitted on the train split
with that strength (no refit on train + validation, so the validation score that picked the
probe stays an honest selection score and test data never influences any choice).

Everything here follows scikit-learn's estimator API: ``BaseEstimator`` subclasses whose
parameters are the ``__init__`` arguments (so ``clone``/``get_params`` work), fitted state ending
in ``_``, ``fit(X, y)`` returning ``self``, ``predict``/``transform`` on ``[n, features]`` arrays
and a float ``score`` (R², accuracy). The validation split that picks α or C is a constructor
parameter, ``validation_data=(X_val, y_val)``; ``scores`` returns every metric as a dict.
Rows are (model, epoch) states; the split of a row is its model's split.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.stats import kendalltau
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import r2_score
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from raysys.architectures import Layout
from raysys.config import RaysysError

QUANTILES = (0.01, 0.25, 0.50, 0.75, 0.99)
# 002 §4.2 searches α in [1e-5, 1e3]. With thousands of standardized raw-weight features, 1e3 still
# under-regularizes (on a 100-model cnn_s zoo validation picked the grid's edge for W), so the
# grid reaches 1e5, where a useless feature set correctly falls back to R² ≈ 0.
ALPHAS = tuple(float(a) for a in np.logspace(-5, 5, 21))
CS = tuple(float(c) for c in np.logspace(-3, 2, 6))
SPLITS = ("train", "val", "test")

# Targets probed when they vary in the zoo. Seed and model id are identities, not characteristics.
REGRESSION_TARGETS = ("test_acc", "ggap", "epoch", "lr", "weight_decay", "dropout", "batch_size")
CLASSIFICATION_TARGETS = ("init", "activation", "optimizer")


class ProbeError(RaysysError):
    pass


# --- s(W) -----------------------------------------------------------------------------------

class LayerStatistics(BaseEstimator, TransformerMixin):
    """s(W): for every tensor of the layout (each layer's weight and its bias separately), the
    mean, variance and the 1/25/50/75/99 % quantiles over the tensor's entries.

    ``layout`` is a :class:`~raysys.architectures.Layout` or its ``to_dict()`` (as in a zoo manifest).
    Stateless apart from checking the width; ``fit`` exists for pipelines.
    """

    def __init__(self, layout, quantiles=QUANTILES):
        self.layout = layout
        self.quantiles = quantiles

    def _layout(self) -> Layout:
        return self.layout if isinstance(self.layout, Layout) else Layout.from_dict(self.layout)

    def fit(self, X, y=None):
        layout = self._layout()
        self._check(X, layout)
        self.feature_names_ = [
            f"{t.name}:{stat}" for t in layout.tensors
            for stat in ("mean", "var", *(f"q{round(100 * q):02d}" for q in self.quantiles))
        ]
        self.n_features_in_ = layout.num_params
        return self

    def transform(self, X) -> np.ndarray:
        layout = self._layout()
        X = self._check(X, layout)
        out = []
        for t in layout.tensors:
            block = X[:, t.offset:t.offset + t.numel].astype(np.float64)
            out += [block.mean(axis=1, keepdims=True), block.var(axis=1, keepdims=True),
                    np.quantile(block, self.quantiles, axis=1).T]
        return np.concatenate(out, axis=1).astype(np.float32)

    def get_feature_names_out(self, input_features=None):
        return np.asarray(self.feature_names_, dtype=object)

    @staticmethod
    def _check(X, layout: Layout) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != layout.num_params:
            raise ProbeError(
                f"s(W) needs flat weight vectors of shape [n, {layout.num_params}] for {layout.arch}, "
                f"got {X.shape}. Pass the zoo's weights with the zoo's own layout.")
        return X


# --- probes ---------------------------------------------------------------------------------

def _standardize(X_train) -> StandardScaler:
    # Constant columns (e.g. a bias that never moved) get scale 1 from StandardScaler and become 0.
    return StandardScaler().fit(np.asarray(X_train, dtype=np.float64))


def r2(y_true, y_pred) -> float:
    """R² = 1 − SSE/SST, SST around each column's own mean over these rows: scikit-learn's ``r2_score(y_true,
    y_pred)`` (variance-weighted over the columns of 2-D targets, e.g. flat weights [n, P]), in float64. NaN when
    every column of ``y_true`` is constant (R² is undefined there; scikit-learn would say 1.0 or 0.0).
    The one R² of raysys: probes, reconstruction and the autoencoder's training history all use it."""
    y_true = np.asarray(y_true, np.float64)
    if y_true.size == 0 or not np.any(np.ptp(y_true, axis=0) > 0):
        return float("nan")
    return float(r2_score(y_true, np.asarray(y_pred, np.float64), multioutput="variance_weighted"))


def kendall_tau(y_true, y_pred) -> float:
    if np.ptp(np.asarray(y_true)) == 0 or np.ptp(np.asarray(y_pred)) == 0:
        return float("nan")
    return float(kendalltau(y_true, y_pred).statistic)


def _validation(probe) -> tuple:
    if probe.validation_data is None:
        raise ProbeError(f"{type(probe).__name__} picks its regularization on a validation split: construct it "
                         f"with validation_data=(X_val, y_val), e.g. {type(probe).__name__}(validation_data="
                         f"(X_val, y_val)).fit(X_train, y_train).")
    try:
        X_val, y_val = probe.validation_data
    except (TypeError, ValueError):
        raise ProbeError("validation_data must be a pair (X_val, y_val).") from None
    return X_val, y_val


class LinearProbe(RegressorMixin, BaseEstimator):
    """Ridge regression on standardized features; α picked by validation R² on a grid.

    ``LinearProbe(alphas, validation_data=(X_val, y_val)).fit(X_train, y_train)``: the probe is
    fitted on ``(X_train, y_train)`` only, and α is the grid value with the best R² on
    ``validation_data``. ``score`` is R² (a float, as for any scikit-learn regressor); ``scores``
    adds Kendall's τ.

    The ridge solutions for every α come from one SVD of the standardized train features:
    w(α) = V diag(s / (s² + α)) Uᵀ (y − ȳ), the minimizer of ‖y − ȳ − Xw‖² + α‖w‖²
    (scikit-learn's ``Ridge`` objective). Ties go to the larger α.
    """

    def __init__(self, alphas=ALPHAS, validation_data=None):
        self.alphas = alphas
        self.validation_data = validation_data

    def fit(self, X, y) -> "LinearProbe":
        X_train, y_train = X, np.asarray(y, np.float64)
        X_val, y_val = _validation(self)
        y_val = np.asarray(y_val, np.float64)
        if len(y_train) < 2 or len(y_val) < 1:
            raise ProbeError(f"a probe needs at least 2 train and 1 validation rows, got "
                             f"{len(y_train)} and {len(y_val)}. Use a larger zoo.")
        self.scaler_ = _standardize(X_train)
        Xt = self.scaler_.transform(np.asarray(X_train, np.float64))
        Xv = self.scaler_.transform(np.asarray(X_val, np.float64))
        self.n_features_in_ = Xt.shape[1]
        self.intercept_ = float(y_train.mean())
        U, s, Vt = np.linalg.svd(Xt, full_matrices=False)
        uty = U.T @ (y_train - self.intercept_)
        alphas = sorted(self.alphas)
        coefs = [Vt.T @ (s / (s ** 2 + a) * uty) for a in alphas]
        scores = [r2(y_val, Xv @ c + self.intercept_) for c in coefs]
        self.val_scores_ = dict(zip(alphas, scores))
        # Last maximum over ascending α: ties go to the stronger regularization; NaN never wins.
        ranked = np.nan_to_num(np.asarray(scores), nan=-np.inf)
        best = len(alphas) - 1 - int(np.argmax(ranked[::-1]))
        self.alpha_, self.coef_, self.val_r2_ = alphas[best], coefs[best], scores[best]
        return self

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.scaler_.transform(np.asarray(X, np.float64)) @ self.coef_ + self.intercept_

    def score(self, X, y, sample_weight=None) -> float:
        """R² of the predictions on (X, y) (NaN for a constant target)."""
        if sample_weight is not None:
            raise ProbeError("LinearProbe.score does not take sample weights.")
        return r2(y, self.predict(X))

    def scores(self, X, y) -> dict[str, float]:
        """R² and Kendall's τ of the predictions on (X, y), usually the test split."""
        pred = self.predict(X)
        return {"r2": r2(y, pred), "kendall_tau": kendall_tau(y, pred)}


class LinearClassifierProbe(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression on standardized features; C picked by validation accuracy
    on a grid (ties go to the smaller C, i.e. the stronger regularization).

    ``LinearClassifierProbe(Cs, max_iter, validation_data=(X_val, y_val)).fit(X_train, y_train)``;
    ``score`` is the accuracy."""

    def __init__(self, Cs=CS, max_iter: int = 300, validation_data=None):
        self.Cs = Cs
        self.max_iter = max_iter
        self.validation_data = validation_data

    def fit(self, X, y) -> "LinearClassifierProbe":
        X_train, y_train = X, np.asarray(y)
        X_val, y_val = _validation(self)
        y_val = np.asarray(y_val)
        if len(np.unique(y_train)) < 2:
            raise ProbeError("a classifier probe needs at least two classes in the train split; "
                             "this target does not vary in the zoo — leave it out.")
        self.scaler_ = _standardize(X_train)
        Xt = self.scaler_.transform(np.asarray(X_train, np.float64))
        Xv = self.scaler_.transform(np.asarray(X_val, np.float64))
        self.val_scores_ = {}
        best: tuple[float, float, LogisticRegression] | None = None
        for C in sorted(self.Cs):
            with warnings.catch_warnings():
                # A probe at the iteration cap is still a valid (regularized) linear read-out.
                warnings.simplefilter("ignore", ConvergenceWarning)
                model = LogisticRegression(C=C, max_iter=self.max_iter).fit(Xt, y_train)
            acc = float(np.mean(model.predict(Xv) == y_val))
            self.val_scores_[C] = acc
            if best is None or acc > best[0]:
                best = (acc, C, model)
        if best is None:
            raise ProbeError("Cs is empty: give LinearClassifierProbe at least one C (the default is probes.CS).")
        self.val_accuracy_, self.C_, self.model_ = best
        self.classes_ = self.model_.classes_
        self.n_features_in_ = Xt.shape[1]
        return self

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.model_.predict(self.scaler_.transform(np.asarray(X, np.float64)))

    def score(self, X, y, sample_weight=None) -> float:
        """Accuracy of the predictions on (X, y)."""
        if sample_weight is not None:
            raise ProbeError("LinearClassifierProbe.score does not take sample weights.")
        return float(np.mean(self.predict(X) == np.asarray(y)))

    def scores(self, X, y) -> dict[str, float]:
        return {"accuracy": self.score(X, y)}


# --- probing a zoo --------------------------------------------------------------------------

def varying_targets(frame: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(regression targets, classification targets) that take more than one value in ``frame``."""
    reg = [t for t in REGRESSION_TARGETS if t in frame and frame[t].nunique(dropna=True) > 1]
    cls = [t for t in CLASSIFICATION_TARGETS if t in frame and frame[t].nunique(dropna=True) > 1]
    return reg, cls


def _rows(X, frame: pd.DataFrame, target: str):
    """Rows with finite features and a known target (diverged models have NaN weights/metrics)."""
    X = np.asarray(X)
    y = frame[target].to_numpy()
    keep = np.isfinite(X).all(axis=1) & pd.notna(y)
    return X[keep], y[keep]


def _check_aligned(features_by_split, frame_by_split):
    for name, by_split in features_by_split.items():
        for split in SPLITS:
            if split not in by_split or split not in frame_by_split:
                raise ProbeError(f"feature set '{name}' or the frames lack the '{split}' split; "
                                 f"pass train, val and test for every feature set.")
            if len(by_split[split]) != len(frame_by_split[split]):
                raise ProbeError(f"feature set '{name}' has {len(by_split[split])} {split} rows but the frame "
                                 f"has {len(frame_by_split[split])}: features and frame must be row-aligned.")


def probe_all(features_by_split: dict[str, dict[str, np.ndarray]],
              frame_by_split: dict[str, pd.DataFrame],
              targets: list[str] | None = None) -> pd.DataFrame:
    """Probe every target with every feature set.

    ``features_by_split``: ``{feature set name: {"train"|"val"|"test": X [rows, d]}}``, e.g. keys
    ``"z"``, ``"W"``, ``"s(W)"``. ``frame_by_split``: ``{split: DataFrame}`` row-aligned with the
    features (the zoo frame: metrics and hyperparameters). ``targets``: defaults to every probe-able
    target that varies in the train frame.

    Returns a tidy table with columns target, task (regression/classification), features,
    metric (r2, kendall_tau, accuracy on test; val_r2/val_accuracy; alpha/C chosen), value.
    """
    _check_aligned(features_by_split, frame_by_split)
    reg, cls = varying_targets(frame_by_split["train"])
    if targets is not None:
        unknown = [t for t in targets if t not in REGRESSION_TARGETS + CLASSIFICATION_TARGETS]
        if unknown:
            raise ProbeError(f"unknown probe targets {unknown}. Choose from "
                             f"{', '.join(REGRESSION_TARGETS + CLASSIFICATION_TARGETS)}.")
        reg, cls = [t for t in reg if t in targets], [t for t in cls if t in targets]
    records = []
    for name, X in features_by_split.items():
        for target in reg + cls:
            data = {s: _rows(X[s], frame_by_split[s], target) for s in SPLITS}
            if target in reg:
                (xt, yt), (xv, yv), (xs, ys) = (data[s] for s in SPLITS)
                probe = LinearProbe(validation_data=(xv, yv.astype(np.float64))).fit(xt, yt.astype(np.float64))
                metrics = {**probe.scores(xs, ys.astype(np.float64)),
                           "val_r2": probe.val_r2_, "alpha": probe.alpha_}
                task = "regression"
            else:
                probe = LinearClassifierProbe(validation_data=data["val"]).fit(*data["train"])
                metrics = {**probe.scores(*data["test"]), "val_accuracy": probe.val_accuracy_, "C": probe.C_}
                task = "classification"
            records += [{"target": target, "task": task, "features": name, "metric": k, "value": float(v)}
                        for k, v in metrics.items()]
    return pd.DataFrame.from_records(records, columns=["target", "task", "features", "metric", "value"])


def ood_probes(features_by_split: dict[str, dict[str, np.ndarray]],
               frame_by_split: dict[str, pd.DataFrame],
               ood_features: dict[str, np.ndarray], ood_frame: pd.DataFrame,
               targets: list[str] | None = None) -> pd.DataFrame:
    """Out-of-distribution probes (002 §4.3, Table 7): fit ridge probes on one zoo's train split
    (α on its validation split) and score them on another zoo's rows.

    ``ood_features``: ``{feature set name: X_ood}``, computed with the same maps (the same
    autoencoder for ``z``) as the in-distribution features. Continuous targets that vary in both
    zoos are probed; returns the tidy table of :func:`probe_all` with metrics kendall_tau and r2
    (Kendall's τ is the headline: probes keep the order of models across zoos but not the offset).
    """
    _check_aligned(features_by_split, frame_by_split)
    reg, _ = varying_targets(frame_by_split["train"])
    reg_ood, _ = varying_targets(ood_frame)
    reg = [t for t in reg if t in reg_ood and (targets is None or t in targets)]
    records = []
    for name, X in features_by_split.items():
        if name not in ood_features:
            continue
        for target in reg:
            (xt, yt), (xv, yv) = (_rows(X[s], frame_by_split[s], target) for s in ("train", "val"))
            xo, yo = _rows(ood_features[name], ood_frame, target)
            probe = LinearProbe(validation_data=(xv, yv.astype(np.float64))).fit(xt, yt.astype(np.float64))
            records += [{"target": target, "task": "regression", "features": name, "metric": k, "value": float(v)}
                        for k, v in probe.scores(xo, yo.astype(np.float64)).items()]
    return pd.DataFrame.from_records(records, columns=["target", "task", "features", "metric", "value"])
