"""Evaluate a trained hyper-representation on a zoo (002 §4, 000 §3.1 and Figure 2).

Four questions, answered on the zoo's test split (models the autoencoder never saw):

1. How well are weights reconstructed?  R² = 1 − SSE/SST over the test models' flat weights,
   SST taken around each parameter's mean over those models (scikit-learn's variance-weighted
   R²), overall, per layer and per tensor; also R²_ref, the reference codebase's convention
   (SST around the *training* split's mean). Beside them, honest yardsticks fit on the training
   split's states in the autoencoder's epoch window: the train-mean predictor and PCA with
   k = latent_dim components, scored the same ways, and a verdict whether the autoencoder beats PCA-k.
2. Do decoded models still work?  Test accuracy of decoded vs original models on the zoo's own
   image dataset, and the fraction of decoded models near chance (the failure LWLN fixes), beside
   PCA-k reconstructions and the "train-mean model" (the training states' mean weight vector).
3. What does z know?  Linear probes on z vs raw weights W vs layer statistics s(W)
   (:mod:`raysys.probes`), plus out-of-distribution probes on a second zoo when given.
4. What does the latent space look like?  PCA of z coloured by accuracy and hyperparameters.

Outputs in ``out_dir``: ``eval.json``, ``probes.csv`` (tidy: target x feature set x metric),
``accuracy.csv`` (per decoded test model), all written atomically, and PNG figures;
everything is also logged to MLflow as one run tagged with the checkpoint it evaluates.
"""
from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from raysys import architectures, datasets
from raysys.architectures import Layout
from raysys.config import RaysysError
from raysys.hyperrep.data import usable_states, window_epochs
from raysys.probes import LayerStatistics, ood_probes, probe_all, r2, varying_targets
from raysys.integrity import check_output_dir
from raysys.store import atomic_write_bytes, atomic_write_json, jsonable, open_zoo, zoo_dataset

EVAL_BATCH = 1024
NEAR_CHANCE = 0.05  # a model is "near chance" when its accuracy is below 1/num_classes + 5 points
MAX_PROBE_ROWS = 20_000  # cap on probe rows per split, so W probes stay tractable on large zoos
EXPERIMENT = "raysys-hyperrep-eval"


# --- weights and representations ------------------------------------------------------------

def r2_ref(original: np.ndarray, decoded: np.ndarray, train_mean: np.ndarray) -> float:
    """The reference codebase's R²: 1 − MSE(decoded) / MSE of predicting ``train_mean`` for every row,
    i.e. SS_tot around the *training* split's mean, not around these rows' own mean."""
    from sklearn.metrics import mean_squared_error

    original = np.asarray(original, np.float64)
    base = mean_squared_error(original, np.broadcast_to(np.asarray(train_mean, np.float64), original.shape))
    if not base > 0:
        return float("nan")
    return float(1.0 - mean_squared_error(original, np.asarray(decoded, np.float64)) / base)


def _spans(layout: Layout) -> tuple[dict, dict]:
    """({tensor: columns}, {layer: columns (weight + bias)}) of the flat weight vector."""
    tensors = {t.name: np.arange(t.offset, t.offset + t.numel) for t in layout.tensors}
    layers = {l.name: np.concatenate([tensors[n] for n in (l.weight, l.bias) if n]) for l in layout.layers}
    return tensors, layers


def reconstruction_r2(original: np.ndarray, decoded: np.ndarray, layout: Layout, train_mean=None) -> dict:
    """R² of decoded vs original flat weights [n, P]: overall, per layer (weight + bias), per tensor.

    Without ``train_mean``: :func:`raysys.probes.r2` (scikit-learn's, split-own mean). With it: :func:`r2_ref` around that mean."""
    original, decoded = np.asarray(original, np.float64), np.asarray(decoded, np.float64)
    mu = None if train_mean is None else np.asarray(train_mean, np.float64)

    def block(c):
        o, d = original[:, c], decoded[:, c]
        return r2(o, d) if mu is None else r2_ref(o, d, mu[c])

    per_tensor, per_layer = _spans(layout)
    return {"overall": block(slice(None)), "per_layer": {k: block(c) for k, c in per_layer.items()},
            "per_tensor": {k: block(c) for k, c in per_tensor.items()}}


def yardsticks(w_train: np.ndarray, w_test: np.ndarray, layout: Layout, k: int, seed: int = 0) -> tuple[dict, dict]:
    """Reconstruction baselines an autoencoder has to beat, fit on ``w_train`` and scored on ``w_test``.

    * the mean predictor: the training split's mean vector for every test model;
    * PCA-k: scikit-learn's PCA with ``k`` components (capped at the rank the training rows allow),
      fit on the training rows, test rows projected and reconstructed.

    Both get :func:`reconstruction_r2` (split-own mean) and the reference convention :func:`r2_ref`
    (SS_tot around the training mean). Returns (numbers, {"mean": mean vector, "pca": reconstructions}).
    """
    from sklearn.decomposition import PCA

    w_train, w_test = np.asarray(w_train, np.float64), np.asarray(w_test, np.float64)
    mu = w_train.mean(axis=0)
    k_used = int(min(k, len(w_train), w_train.shape[1]))
    pca = PCA(n_components=k_used, random_state=seed).fit(w_train)
    w_pca = pca.inverse_transform(pca.transform(w_test))
    mean_pred = np.broadcast_to(mu, w_test.shape)
    numbers = {"mean": {}, "pca": {"k": k_used, "k_requested": int(k),
                                   "explained_variance_train": float(np.sum(pca.explained_variance_ratio_))}}
    for name, pred in (("mean", mean_pred), ("pca", w_pca)):
        own, ref = reconstruction_r2(w_test, pred, layout), reconstruction_r2(w_test, pred, layout, train_mean=mu)
        numbers[name].update(r2=own["overall"], r2_per_layer=own["per_layer"], r2_ref=ref["overall"],
                             r2_ref_per_layer=ref["per_layer"])
        if name == "pca":
            numbers[name]["r2_per_tensor"] = own["per_tensor"]
    return numbers, {"mean": mu, "pca": w_pca}


def twonn_dimension(x: np.ndarray, discard: float = 0.1) -> float:
    """Intrinsic dimension of the rows of ``x`` by TwoNN (Facco et al. 2017): with r1, r2 each row's distances
    to its two nearest other rows, μ = r2/r1 is Pareto(d)-distributed on a d-dimensional manifold, so
    d = n / Σ log μ (the largest ``discard`` share of μ dropped, as the paper does). It underestimates in
    high dimension at small n, so compare it only with :func:`gaussian_ceiling`'s surrogate of the same size."""
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(x, np.float64)
    dist, _ = NearestNeighbors(n_neighbors=3).fit(x).kneighbors(x)
    mu = dist[:, 2] / np.maximum(dist[:, 1], np.finfo(np.float64).tiny)
    mu = np.sort(mu[np.isfinite(mu) & (mu > 1)])[: int((1 - discard) * len(mu))]
    if len(mu) < 10:
        raise RaysysError(f"TwoNN needs at least 10 distinct rows, got {len(mu)}: use a zoo with more models.")
    return float(len(mu) / np.log(mu).sum())


def gaussian_ceiling(x: np.ndarray, draws: int = 5, seed: int = 0) -> dict:
    """Is there structure beyond a Gaussian for an autoencoder to find? TwoNN dimension of ``x`` (one state per
    model) beside that of ``draws`` Gaussian samples with ``x``'s mean and covariance and as many rows.

    For Gaussian data PCA-k is the mean-squared-error-optimal k-dimensional code, so an autoencoder cannot beat
    it by more than what the data's departure from a Gaussian allows: a zoo whose dimension is close to its
    surrogate's is a measured ceiling at PCA-k; a much lower one (a low-dimensional curved set, such as
    trajectories or permutation orbits) leaves room for a nonlinear code."""
    x = np.asarray(x, np.float64)
    rng = np.random.default_rng(seed)
    cov = np.cov(x.T)
    surrogate = [twonn_dimension(rng.multivariate_normal(x.mean(0), cov, size=len(x), method="eigh"))
                 for _ in range(draws)]
    return {"rows": len(x), "twonn": twonn_dimension(x), "twonn_gaussian": float(np.mean(surrogate)),
            "twonn_gaussian_sd": float(np.std(surrogate))}


def baselines(zoo_dir, ks=(8, 16, 32, 64), window: tuple[int, int] = (21, 25)) -> dict:
    """What an autoencoder with a k-dim latent has to beat on a zoo, before training one.

    Fit on the training split's states in ``window`` (the autoencoder's ``train.epoch_window``) and scored on
    the test split's: the train-mean predictor, PCA-k for every k, and the nearest training state (the test
    state's closest training row in L2: what a generator that only memorizes could reach). R² as in
    :func:`reconstruction_r2` (split-own mean) and :func:`r2_ref` (SS_tot around the training mean).
    """
    from raysys.hyperrep.data import load_window

    zoo = open_zoo(zoo_dir)
    data = load_window(zoo, window)
    train, test = data["train"].double().numpy(), data["test"].double().numpy()
    if len(test) == 0:
        raise RaysysError(f"zoo {zoo_dir} has no test-split states in epochs {window[0]}-{window[1]}: "
                          f"pick a --window the zoo has.")
    mu = train.mean(axis=0)
    rows = []
    for k in ks:
        numbers, _ = yardsticks(train, test, zoo.layout, k)
        rows.append({"baseline": f"PCA-{numbers['pca']['k']}", "k": numbers["pca"]["k"],
                     "r2": numbers["pca"]["r2"], "r2_ref": numbers["pca"]["r2_ref"],
                     "explained_variance_train": numbers["pca"]["explained_variance_train"]})
    mean = numbers["mean"]
    rows.insert(0, {"baseline": "train-mean predictor", "k": 0, "r2": mean["r2"], "r2_ref": mean["r2_ref"]})
    nearest = np.empty_like(test)
    for i in range(0, len(test), 256):  # blocks keep the distance matrix small
        d = ((test[i:i + 256, None, :] - train[None]) ** 2).sum(-1)
        nearest[i:i + 256] = train[d.argmin(1)]
    rows.append({"baseline": "nearest training state", "k": None, "r2": r2(test, nearest),
                 "r2_ref": r2_ref(test, nearest, mu)})
    last, _ = zoo.weights(epochs=[window[1]], splits=["train"])  # one state per model: epochs of a model are neighbours
    return {"zoo": str(Path(zoo_dir).resolve()), "window": list(window), "rows_train": len(train),
            "rows_test": len(test), "num_params": zoo.num_params,
            "aligned": bool(zoo.manifest.get("aligned")), "baselines": rows,
            "intrinsic_dimension": gaussian_ceiling(last) if len(last) >= 12 else None}


def encode(hr, weights: np.ndarray) -> np.ndarray:
    return np.asarray(hr.encode(np.asarray(weights, np.float32)), np.float32)


def decode(hr, z: np.ndarray) -> np.ndarray:
    return np.asarray(hr.decode(np.asarray(z, np.float32)), np.float32)


# --- decoded models on images ---------------------------------------------------------------

@torch.no_grad()
def accuracies(layout: Layout, weights: np.ndarray, activations, data: datasets.ImageData) -> np.ndarray:
    """Test accuracy of every flat weight vector, loaded into the zoo's architecture."""
    x, y = data.x_test, data.y_test
    models: dict[str, torch.nn.Module] = {}
    out = np.empty(len(weights))
    for i, (w, act) in enumerate(zip(weights, activations)):
        if act not in models:
            models[act] = architectures.build(layout.arch, act, 0.0, layout.in_channels, layout.num_classes).eval()
        model = architectures.unflatten(torch.as_tensor(w), models[act])
        correct = sum((model(x[j:j + EVAL_BATCH]).argmax(1) == y[j:j + EVAL_BATCH]).sum().item()
                      for j in range(0, len(x), EVAL_BATCH))
        out[i] = correct / len(x)
    return out


def summarize(acc: np.ndarray, num_classes: int) -> dict:
    chance = 1.0 / num_classes
    return {"mean": float(np.mean(acc)), "std": float(np.std(acc)), "min": float(np.min(acc)),
            "max": float(np.max(acc)), "near_chance": float(np.mean(acc < chance + NEAR_CHANCE))}


# --- figures --------------------------------------------------------------------------------

def plot_reconstruction(original, decoded, acc_orig, acc_dec, layout: Layout, chance: float, path: Path):
    """000 Figure 2: one panel per layer (original vs reconstructed weights), plus accuracies."""
    panels = len(layout.layers) + 1
    cols = min(panels, 4)
    rows = math.ceil(panels / cols)
    fig = _figure(4 * cols, 3 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    axes = axes.ravel()
    for ax, layer in zip(axes, layout.layers):
        cols_ = np.concatenate([np.arange(layout.tensor(n).offset, layout.tensor(n).offset + layout.tensor(n).numel)
                                for n in (layer.weight, layer.bias) if n])
        o, d = original[:, cols_].ravel(), decoded[:, cols_].ravel()
        lo, hi = np.nanpercentile(np.concatenate([o, d]), [0.5, 99.5])
        bins = np.linspace(lo, hi, 60) if hi > lo else 60
        ax.hist(o, bins=bins, alpha=0.6, density=True, label="original")
        ax.hist(d, bins=bins, alpha=0.6, density=True, label="reconstructed")
        ax.set_title(layer.name)
    ax = axes[len(layout.layers)]
    bins = np.linspace(0, 1, 41)
    ax.hist(acc_orig, bins=bins, alpha=0.6, label="original")
    ax.hist(acc_dec, bins=bins, alpha=0.6, label="decoded")
    ax.axvline(chance, color="k", ls="--", lw=1, label="chance")
    ax.set_title("test accuracy")
    ax.legend(fontsize=8)
    for ax in axes[panels:]:
        ax.axis("off")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_latent(z: np.ndarray, frame: pd.DataFrame, path: Path):
    """z in 2-D (PCA), one panel per colouring: test accuracy and each varying hyperparameter."""
    from sklearn.decomposition import PCA

    reg, cls = varying_targets(frame)
    keys = ["test_acc"] + [k for k in reg + cls if k not in ("test_acc", "ggap")]
    xy = PCA(n_components=2).fit_transform(z) if z.shape[1] >= 2 else np.c_[z, np.zeros(len(z))]
    cols = min(len(keys), 3)
    rows = math.ceil(len(keys) / cols)
    fig = _figure(4.6 * cols, 3.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes, keys):
        values = frame[key]
        if key in cls:
            for level in sorted(values.unique()):
                m = (values == level).to_numpy()
                ax.scatter(xy[m, 0], xy[m, 1], s=6, label=str(level))
            ax.legend(fontsize=7, markerscale=2)
        else:
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=values.to_numpy(np.float64), s=6, cmap="viridis")
            fig.colorbar(sc, ax=ax)
        ax.set_title(f"z (PCA) by {key}")
    fig.tight_layout()
    _save(fig, path)


def _figure(width: float, height: float):
    # The object-oriented API renders with Agg and never touches pyplot's global backend or state;
    # imported here so that building the CLI parser does not pay for matplotlib.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(fig, path: Path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


# --- the evaluation -------------------------------------------------------------------------

def _cap(w, frame, rows=MAX_PROBE_ROWS, seed=0):
    if len(w) <= rows:
        return w, frame
    idx = np.sort(np.random.default_rng(seed).choice(len(w), rows, replace=False))
    return w[idx], frame.iloc[idx].reset_index(drop=True)


def _trained_epochs(hr, zoo) -> list[int]:
    """The zoo epochs the autoencoder was trained on (000 §4.1: 21–25) that the zoo stores."""
    return window_epochs(zoo, hr.config.train.epoch_window, "test", "Pass --epochs to pick the epochs to evaluate.")


def _features(hr, layout, w):
    return {"z": encode(hr, w), "W": w, "s(W)": LayerStatistics(layout).fit(w).transform(w)}


def evaluate(checkpoint_dir, zoo_dir, out_dir, data_root=None, tracking_uri=None, ood_zoo=None,
             epochs: list[int] | None = None, probe_epochs: list[int] | None = None) -> dict:
    """Evaluate the hyper-representation in ``checkpoint_dir`` on the zoo in ``zoo_dir``.

    ``epochs``: zoo epochs for reconstruction and decoded accuracy (default: the epochs the
    autoencoder trained on). ``probe_epochs``: zoo epochs whose states are probed (default: every
    stored epoch after initialization, so the epoch itself is a probe target, as in 002).
    ``tracking_uri``: MLflow tracking URI, resolved by :func:`raysys.tracking.resolve_tracking_uri`
    (default ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``).
    Returns the dict written to ``out_dir/eval.json``.
    """
    from raysys.hyperrep.model import HyperRepresentation

    out = check_output_dir(out_dir)
    hr = HyperRepresentation.load(checkpoint_dir)
    zoo = open_zoo(zoo_dir)
    layout = zoo.layout
    hr.check_layout(layout, f"zoo {zoo_dir}")
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to fit: no empty output on error

    # 1. reconstruction of the test split
    epochs = list(epochs) if epochs else _trained_epochs(hr, zoo)
    w_test, f_test = usable_states(zoo, epochs, ["test"])
    if len(w_test) < 2:
        raise RaysysError(f"zoo {zoo_dir} has {len(w_test)} usable test rows at epochs {epochs}; "
                          f"evaluation needs at least 2. Use a larger zoo or other --epochs.")
    w_hat = decode(hr, encode(hr, w_test))
    recon = reconstruction_r2(w_test, w_hat, layout)

    # 1b. yardsticks: the train-split mean and PCA-k (k = latent_dim), fit on the states the autoencoder trained on
    fit = _fit_rows(hr, zoo, epochs)
    sticks, preds = yardsticks(fit.pop("weights"), w_test, layout, hr.config.model.latent_dim)
    recon_ref = reconstruction_r2(w_test, w_hat, layout, train_mean=preds["mean"])
    verdict = _verdict(recon["overall"], sticks)

    # 2. decoded models on the zoo's images
    data = zoo_dataset(zoo.manifest, data_root)
    acts = f_test["activation"]
    acc_orig = accuracies(layout, w_test, acts, data)
    acc_dec = accuracies(layout, w_hat, acts, data)
    acc_pca = accuracies(layout, preds["pca"].astype(np.float32), acts, data)
    levels = sorted(set(acts))  # the mean model once per activation function, then per test row
    by_act = dict(zip(levels, accuracies(layout, np.tile(preds["mean"].astype(np.float32), (len(levels), 1)),
                                         levels, data)))
    acc_mean = np.array([by_act[a] for a in acts])
    chance = 1.0 / layout.num_classes
    aligned = zoo.manifest.get("aligned")

    # 3. probes on z vs W vs s(W)
    stored = sorted(int(e) for e in zoo.frame()["epoch"].unique())
    probe_epochs = list(probe_epochs) if probe_epochs else [e for e in stored if e > 0] or stored
    by_split = {s: _cap(*usable_states(zoo, probe_epochs, [s])) for s in ("train", "val", "test")}
    features = {s: _features(hr, layout, w) for s, (w, _) in by_split.items()}
    features_by_set = {k: {s: features[s][k] for s in features} for k in ("z", "W", "s(W)")}
    frames = {s: f for s, (_, f) in by_split.items()}
    table = probe_all(features_by_set, frames)
    table.insert(0, "evaluation", "in_distribution")
    table.insert(1, "zoo", str(zoo_dir))
    if ood_zoo is not None:
        other = open_zoo(ood_zoo)
        hr.check_layout(other.layout, f"--ood-zoo {ood_zoo}")
        w_ood, f_ood = _cap(*usable_states(other, probe_epochs, ["test"]))
        if len(w_ood) < 2:
            raise RaysysError(f"--ood-zoo {ood_zoo} has {len(w_ood)} usable test rows at epochs {probe_epochs}; "
                              f"pass --probe-epochs that both zoos store.")
        ood = ood_probes(features_by_set, frames, _features(hr, layout, w_ood), f_ood)
        ood.insert(0, "evaluation", "out_of_distribution")
        ood.insert(1, "zoo", str(ood_zoo))
        table = pd.concat([table, ood], ignore_index=True)

    # 4. figures
    figures = {"reconstruction": out / "reconstruction.png", "latent": out / "latent_pca.png"}
    plot_reconstruction(w_test, w_hat, acc_orig, acc_dec, layout, chance, figures["reconstruction"])
    z_all = np.concatenate([features[s]["z"] for s in features])
    plot_latent(z_all, pd.concat([frames[s] for s in frames], ignore_index=True), figures["latent"])

    result = {
        "checkpoint": str(checkpoint_dir), "zoo": str(zoo_dir), "ood_zoo": None if ood_zoo is None else str(ood_zoo),
        "arch": layout.arch, "dataset": zoo.manifest["dataset"]["name"],
        "zoo_aligned": aligned is not None,
        "alignment": None if aligned is None else {k: aligned.get(k) for k in ("source", "template_epochs", "rounds")},
        "reconstruction": {"split": "test", "epochs": epochs, "rows": len(w_test), "r2": recon["overall"],
                           "r2_per_layer": recon["per_layer"], "r2_per_tensor": recon["per_tensor"],
                           "r2_ref": recon_ref["overall"], "r2_ref_per_layer": recon_ref["per_layer"],
                           "yardsticks": {"fit": fit, **sticks}},
        **verdict,
        "accuracy": {"chance": chance, "near_chance_below": chance + NEAR_CHANCE, "rows": len(w_test),
                     "original": summarize(acc_orig, layout.num_classes),
                     "decoded": summarize(acc_dec, layout.num_classes),
                     "pca": summarize(acc_pca, layout.num_classes),
                     "mean_model": {**summarize(acc_mean, layout.num_classes), "per_activation": by_act,
                                    "zoo_aligned": aligned is not None},
                     "stored_original_mean": float(f_test["test_acc"].mean())},
        "probes": {"epochs": probe_epochs, "rows": {s: len(f) for s, f in frames.items()},
                   **_probe_summary(table)},
        "figures": {k: v.name for k, v in figures.items()},
        "tables": {"probes": "probes.csv", "accuracy": "accuracy.csv"},
    }
    atomic_write_bytes(out / "probes.csv", table.to_csv(index=False).encode())
    per_model = f_test[["model_id", "epoch", "activation", "test_acc"]].rename(columns={"test_acc": "stored_test_acc"})
    per_model = per_model.assign(original_test_acc=acc_orig, decoded_test_acc=acc_dec, pca_test_acc=acc_pca,
                                 mean_model_test_acc=acc_mean)
    atomic_write_bytes(out / "accuracy.csv", per_model.to_csv(index=False).encode())
    atomic_write_json(out / "eval.json", jsonable(result))  # results survive an unreachable tracking server
    result["mlflow_run_id"] = _log_mlflow(tracking_uri, hr, checkpoint_dir, zoo_dir, result, out, figures)
    atomic_write_json(out / "eval.json", jsonable(result))
    return result


def _fit_rows(hr, zoo, epochs) -> dict:
    """The zoo's training-split states the yardsticks are fit on: the autoencoder's own training data
    (``train.epoch_window``, finite and not diverged, as :func:`raysys.hyperrep.data.load_window`
    selects them), or the training split at the evaluated epochs when the zoo lacks that window."""
    first, last = hr.config.train.epoch_window
    window = list(range(first, last + 1))
    w, frame = usable_states(zoo, window, ["train"])
    source = "train.epoch_window"
    if len(w) < 2:
        w, frame = usable_states(zoo, epochs, ["train"])
        window, source = list(epochs), "evaluated epochs (the zoo lacks train.epoch_window)"
    if len(w) < 2:
        raise RaysysError(f"zoo {zoo.root} has {len(w)} usable training-split states at epochs {window}; the PCA and "
                          f"mean-predictor yardsticks need at least 2. Evaluate on a zoo with a training split.")
    return {"split": "train", "epochs": sorted(set(int(e) for e in frame["epoch"])), "rows": len(w),
            "source": source, "weights": w}


def _verdict(ae_r2: float, sticks: dict) -> dict:
    """Does the autoencoder beat PCA-k (and the mean predictor) on test R²? A boolean and one sentence."""
    k, pca_r2, mean_r2 = sticks["pca"]["k"], sticks["pca"]["r2"], sticks["mean"]["r2"]
    finite = np.isfinite(ae_r2)
    beats = bool(ae_r2 > pca_r2) if finite and np.isfinite(pca_r2) else None
    beats_mean = bool(ae_r2 > mean_r2) if finite and np.isfinite(mean_r2) else None
    where = {True: "above", False: "below" if ae_r2 < pca_r2 else "equal to", None: "not comparable with"}[beats]
    text = f"autoencoder test R² {ae_r2:.3f} is {where} PCA-{k}'s {pca_r2:.3f}"
    if beats_mean is not True:
        text += f", and not above the train-mean predictor's {mean_r2:.3f}"
    return {"beats_pca": beats, "beats_mean": beats_mean, "verdict": text}


def _probe_summary(table: pd.DataFrame) -> dict:
    """{"r2": {target: {features: value}}, ...} for the headline test metrics."""
    summary = {}
    for (evaluation, metric), group in table.groupby(["evaluation", "metric"]):
        if metric in ("r2", "kendall_tau", "accuracy"):
            key = metric if evaluation == "in_distribution" else f"ood_{metric}"
            summary[key] = {t: dict(zip(g["features"], g["value"])) for t, g in group.groupby("target")}
    return summary


def _metric_name(*parts) -> str:
    # MLflow metric keys allow alphanumerics, _ - . / and spaces: "s(W)" becomes "sW".
    return "/".join(re.sub(r"[^0-9A-Za-z_\-. ]", "", str(p)) for p in parts)


def _log_mlflow(tracking_uri, hr, checkpoint_dir, zoo_dir, result, out: Path, figures) -> str:
    """One MLflow run per evaluation, through an explicit client (no global state, safe in Tune)."""
    from mlflow.entities import Metric

    from raysys.tracking import log_params, new_run

    tags = {"raysys.stage": "hyperrep-eval", "raysys.checkpoint": str(Path(checkpoint_dir).resolve()),
            "raysys.zoo": str(Path(zoo_dir).resolve()), "raysys.verdict": result["verdict"]}
    source_run = (getattr(hr, "meta", None) or {}).get("mlflow_run_id")  # the run that trained the checkpoint
    if source_run:
        tags["raysys.checkpoint_run_id"] = str(source_run)
    client, rid = new_run(tracking_uri, EXPERIMENT, run_name=f"eval-{Path(checkpoint_dir).name}", tags=tags)
    try:
        log_params(client, rid, {"checkpoint": str(checkpoint_dir), "zoo": str(zoo_dir), "ood_zoo": str(result["ood_zoo"]),
                                 "epochs": result["reconstruction"]["epochs"], "zoo_aligned": result["zoo_aligned"],
                                 "yardstick_fit_epochs": result["reconstruction"]["yardsticks"]["fit"]["epochs"],
                                 "probe_epochs": result["probes"]["epochs"]})
        rec, sticks = result["reconstruction"], result["reconstruction"]["yardsticks"]
        metrics = {"recon/r2": rec["r2"], "recon/r2_ref": rec["r2_ref"],
                   "recon/mean/r2": sticks["mean"]["r2"], "recon/mean/r2_ref": sticks["mean"]["r2_ref"],
                   "recon/pca/r2": sticks["pca"]["r2"], "recon/pca/r2_ref": sticks["pca"]["r2_ref"],
                   "recon/pca/k": sticks["pca"]["k"], "recon/pca/explained_variance_train":
                   sticks["pca"]["explained_variance_train"]}
        if result["beats_pca"] is not None:
            metrics["recon/beats_pca"] = float(result["beats_pca"])
        for prefix, numbers in (("", rec), ("pca", sticks["pca"]), ("mean", sticks["mean"])):
            for key, level in (("r2", "r2_per_tensor"), ("r2_layer", "r2_per_layer")):
                metrics.update({_metric_name("recon", *([prefix] if prefix else []), key, name): v
                                for name, v in numbers.get(level, {}).items()})
        for which in ("original", "decoded", "pca", "mean_model"):
            metrics.update({_metric_name("acc", which, k): v for k, v in result["accuracy"][which].items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for metric in ("r2", "kendall_tau", "accuracy", "ood_r2", "ood_kendall_tau"):
            for target, by_features in result["probes"].get(metric, {}).items():
                metrics.update({_metric_name("probe", metric, target, f): v for f, v in by_features.items()})
        items = [Metric(k, float(v), 0, 0) for k, v in metrics.items() if v is not None and np.isfinite(v)]
        for i in range(0, len(items), 1000):  # MLflow's batch limit
            client.log_batch(rid, metrics=items[i:i + 1000])
        for path in [out / "probes.csv", out / "accuracy.csv", *figures.values()]:
            client.log_artifact(rid, str(path))
        client.log_dict(rid, jsonable(result), "eval.json")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    return rid


# --- CLI ------------------------------------------------------------------------------------

def _epochs_arg(text: str) -> list[int]:
    """'21-25' or '1,5,10' -> list of ints."""
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        try:
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
        except ValueError:
            raise RaysysError(f"cannot read epochs '{text}'. Write them as 21-25 or 1,5,10.") from None
    return out


def _run_eval(args) -> int:
    result = evaluate(args.checkpoint, args.zoo, args.out, data_root=args.data_root,
                      tracking_uri=args.tracking_uri, ood_zoo=args.ood_zoo,
                      epochs=_epochs_arg(args.epochs) if args.epochs else None,
                      probe_epochs=_epochs_arg(args.probe_epochs) if args.probe_epochs else None)
    acc, rec = result["accuracy"], result["reconstruction"]
    sticks, k = rec["yardsticks"], rec["yardsticks"]["pca"]["k"]
    print(f"reconstruction R² (test, epochs {rec['epochs']}): {_num(rec['r2'])} "
          f"[PCA-{k} {_num(sticks['pca']['r2'])}, train-mean predictor {_num(sticks['mean']['r2'])}]; "
          f"R²_ref (SS_tot around the train mean): {_num(rec['r2_ref'])} [PCA-{k} {_num(sticks['pca']['r2_ref'])}]")
    print(result["verdict"])
    print(f"test accuracy original {acc['original']['mean']:.3f} ± {acc['original']['std']:.3f}, "
          f"decoded {acc['decoded']['mean']:.3f} ± {acc['decoded']['std']:.3f} "
          f"({100 * acc['decoded']['near_chance']:.0f}% near chance), "
          f"PCA-{k} reconstructions {acc['pca']['mean']:.3f}, train-mean model {acc['mean_model']['mean']:.3f} "
          f"(zoo {'' if result['zoo_aligned'] else 'not '}aligned)")
    for target, by_features in result["probes"].get("r2", {}).items():
        print(f"probe R² {target:>13}: " + "  ".join(f"{f}={v:.3f}" for f, v in by_features.items()))
    print(f"wrote {Path(args.out) / 'eval.json'}")
    return 0


def _num(value) -> str:
    return "nan" if value is None or not np.isfinite(value) else f"{value:.3f}"


def _run_baselines(args) -> int:
    result = baselines(args.zoo, tuple(args.k), tuple(args.window))
    print(f"zoo {result['zoo']}: {result['rows_train']} training / {result['rows_test']} test states of "
          f"{result['num_params']} parameters, epochs {result['window'][0]}-{result['window'][1]}"
          f"{', aligned' if result['aligned'] else ''}")
    print(f"{'baseline':<24} {'test R²':>8} {'R²_ref':>8}")
    for row in result["baselines"]:
        print(f"{row['baseline']:<24} {_num(row['r2']):>8} {_num(row['r2_ref']):>8}")
    dim = result["intrinsic_dimension"]
    if dim:
        print(f"intrinsic dimension (TwoNN, {dim['rows']} training models at epoch {result['window'][1]}): "
              f"{dim['twonn']:.1f}; a Gaussian of the same covariance: {dim['twonn_gaussian']:.1f} "
              f"± {dim['twonn_gaussian_sd']:.1f}")
        if dim["twonn"] > 0.8 * dim["twonn_gaussian"]:
            print("  near-Gaussian: PCA-k is close to the best any k-dim code can do on this zoo")
    if args.out:
        atomic_write_json(Path(args.out), jsonable(result))
        print(f"wrote {args.out}")
    return 0
