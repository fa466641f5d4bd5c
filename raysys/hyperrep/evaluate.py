"""Evaluate a trained hyper-representation on a zoo (002 §4, 000 §3.1 and Figure 2).

Four questions, answered on the zoo's test split (models the autoencoder never saw):

1. How well are weights reconstructed?  R² = 1 − SSE/SST over the test models' flat weights,
   SST taken around each parameter's mean over those models (scikit-learn's variance-weighted
   R²), overall, per layer and per tensor.
2. Do decoded models still work?  Test accuracy of decoded vs original models on the zoo's own
   image dataset, and the fraction of decoded models near chance (the failure LWLN fixes).
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
from raysys.probes import LayerStatistics, ood_probes, probe_all, varying_targets
from raysys.integrity import check_output_dir
from raysys.store import atomic_write_bytes, atomic_write_json, jsonable, open_zoo

EVAL_BATCH = 1024
NEAR_CHANCE = 0.05  # a model is "near chance" when its accuracy is below 1/num_classes + 5 points
MAX_PROBE_ROWS = 20_000  # cap on probe rows per split, so W probes stay tractable on large zoos
EXPERIMENT = "raysys-hyperrep-eval"


# --- weights and representations ------------------------------------------------------------

def reconstruction_r2(original: np.ndarray, decoded: np.ndarray, layout: Layout) -> dict:
    """R² of decoded vs original flat weights [n, P]: overall, per layer (weight + bias), per tensor."""
    original, decoded = np.asarray(original, np.float64), np.asarray(decoded, np.float64)

    def r2(cols) -> float:
        o, d = original[:, cols], decoded[:, cols]
        sst = np.sum((o - o.mean(axis=0)) ** 2)
        return float(1.0 - np.sum((o - d) ** 2) / sst) if sst > 0 else float("nan")

    def span(name):
        t = layout.tensor(name)
        return np.arange(t.offset, t.offset + t.numel)

    per_tensor = {t.name: r2(span(t.name)) for t in layout.tensors}
    per_layer = {l.name: r2(np.concatenate([span(n) for n in (l.weight, l.bias) if n]))
                 for l in layout.layers}
    return {"overall": r2(slice(None)), "per_layer": per_layer, "per_tensor": per_tensor}


def encode(hr, weights: np.ndarray) -> np.ndarray:
    return np.asarray(hr.encode(np.asarray(weights, np.float32)), np.float32)


def decode(hr, z: np.ndarray) -> np.ndarray:
    return np.asarray(hr.decode(np.asarray(z, np.float32)), np.float32)


# --- decoded models on images ---------------------------------------------------------------

def zoo_dataset(manifest: dict, data_root: str | None = None) -> datasets.ImageData:
    """The image dataset a zoo was trained on, checked against the digests in its manifest.

    Loader options (and the data root, unless ``data_root`` is given) come from the zoo config's
    dataset section, the split seed from the dataset record, so the test images are the zoo's.
    """
    record = manifest.get("dataset") or {}
    name = record.get("name")
    if name is None:
        raise RaysysError("the zoo manifest has no dataset record ('dataset.name'); it was not written by "
                          "'raysys zoo generate'. Regenerate the zoo.")
    accepted = set(datasets.options_of(name)) if name in datasets.LOADERS else set()
    section = (manifest.get("config") or {}).get("dataset") or {}
    section = {**section, **(section.get("options") or {})} if isinstance(section, dict) else {}
    options = {k: v for k, v in section.items() if k in accepted and k not in ("root", "download")}
    seed = (record.get("preprocessing") or {}).get("split_seed")
    if seed is not None and "seed" in accepted:
        options.setdefault("seed", seed)
    data = datasets.load(name, root=data_root if data_root is not None else section.get("root"), **options)
    want = (record.get("sha256_16") or {}).get("test")
    have = data.describe()["sha256_16"]["test"]
    if want is not None and want != have:
        raise RaysysError(
            f"the '{name}' test images loaded here (options {options}) differ from the ones the zoo was "
            f"trained on (digest {have} vs {want} in the manifest). Point --data-root at the same copy of "
            f"the dataset the zoo used.")
    return data


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

def _load_rows(zoo, epochs, splits):
    w, frame = zoo.weights(epochs=epochs, splits=splits)
    keep = np.isfinite(w).all(axis=1) & ~frame["diverged"].to_numpy(bool)
    return w[keep], frame[keep].reset_index(drop=True)


def _cap(w, frame, rows=MAX_PROBE_ROWS, seed=0):
    if len(w) <= rows:
        return w, frame
    idx = np.sort(np.random.default_rng(seed).choice(len(w), rows, replace=False))
    return w[idx], frame.iloc[idx].reset_index(drop=True)


def _trained_epochs(hr, zoo) -> list[int]:
    """The zoo epochs the autoencoder was trained on (000 §4.1: 21–25) that the zoo stores."""
    first, last = hr.config.train.epoch_window
    stored = set(int(e) for e in zoo.frame(splits=["test"])["epoch"].unique())
    epochs = [e for e in range(first, last + 1) if e in stored]
    if not epochs:
        raise RaysysError(f"the checkpoint was trained on zoo epochs {first}-{last} but zoo {zoo.root} stores "
                          f"epochs {min(stored)}-{max(stored)}. Pass --epochs to pick the epochs to evaluate.")
    return epochs


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
    w_test, f_test = _load_rows(zoo, epochs, ["test"])
    if len(w_test) < 2:
        raise RaysysError(f"zoo {zoo_dir} has {len(w_test)} usable test rows at epochs {epochs}; "
                          f"evaluation needs at least 2. Use a larger zoo or other --epochs.")
    w_hat = decode(hr, encode(hr, w_test))
    recon = reconstruction_r2(w_test, w_hat, layout)

    # 2. decoded models on the zoo's images
    data = zoo_dataset(zoo.manifest, data_root)
    acc_orig = accuracies(layout, w_test, f_test["activation"], data)
    acc_dec = accuracies(layout, w_hat, f_test["activation"], data)
    chance = 1.0 / layout.num_classes

    # 3. probes on z vs W vs s(W)
    stored = sorted(int(e) for e in zoo.frame()["epoch"].unique())
    probe_epochs = list(probe_epochs) if probe_epochs else [e for e in stored if e > 0] or stored
    by_split = {s: _cap(*_load_rows(zoo, probe_epochs, [s])) for s in ("train", "val", "test")}
    features = {s: _features(hr, layout, w) for s, (w, _) in by_split.items()}
    features_by_set = {k: {s: features[s][k] for s in features} for k in ("z", "W", "s(W)")}
    frames = {s: f for s, (_, f) in by_split.items()}
    table = probe_all(features_by_set, frames)
    table.insert(0, "evaluation", "in_distribution")
    table.insert(1, "zoo", str(zoo_dir))
    if ood_zoo is not None:
        other = open_zoo(ood_zoo)
        hr.check_layout(other.layout, f"--ood-zoo {ood_zoo}")
        w_ood, f_ood = _cap(*_load_rows(other, probe_epochs, ["test"]))
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
        "reconstruction": {"split": "test", "epochs": epochs, "rows": len(w_test), "r2": recon["overall"],
                           "r2_per_layer": recon["per_layer"], "r2_per_tensor": recon["per_tensor"]},
        "accuracy": {"chance": chance, "near_chance_below": chance + NEAR_CHANCE, "rows": len(w_test),
                     "original": summarize(acc_orig, layout.num_classes),
                     "decoded": summarize(acc_dec, layout.num_classes),
                     "stored_original_mean": float(f_test["test_acc"].mean())},
        "probes": {"epochs": probe_epochs, "rows": {s: len(f) for s, f in frames.items()},
                   **_probe_summary(table)},
        "figures": {k: v.name for k, v in figures.items()},
        "tables": {"probes": "probes.csv", "accuracy": "accuracy.csv"},
    }
    atomic_write_bytes(out / "probes.csv", table.to_csv(index=False).encode())
    per_model = f_test[["model_id", "epoch", "activation", "test_acc"]].rename(columns={"test_acc": "stored_test_acc"})
    per_model = per_model.assign(original_test_acc=acc_orig, decoded_test_acc=acc_dec)
    atomic_write_bytes(out / "accuracy.csv", per_model.to_csv(index=False).encode())
    atomic_write_json(out / "eval.json", jsonable(result))  # results survive an unreachable tracking server
    result["mlflow_run_id"] = _log_mlflow(tracking_uri, hr, checkpoint_dir, zoo_dir, result, out, figures)
    atomic_write_json(out / "eval.json", jsonable(result))
    return result


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
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from raysys.tracking import experiment_id, flatten_params, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    exp_id = experiment_id(uri, EXPERIMENT)
    tags = {"raysys.stage": "hyperrep-eval", "raysys.checkpoint": str(Path(checkpoint_dir).resolve()),
            "raysys.zoo": str(Path(zoo_dir).resolve())}
    source_run = _checkpoint_run_id(hr)
    if source_run:
        tags["raysys.checkpoint_run_id"] = source_run
    run = client.create_run(exp_id, tags=tags, run_name=f"eval-{Path(checkpoint_dir).name}")
    rid = run.info.run_id
    try:
        params = flatten_params({"checkpoint": str(checkpoint_dir), "zoo": str(zoo_dir), "ood_zoo": str(result["ood_zoo"]),
                                 "epochs": result["reconstruction"]["epochs"],
                                 "probe_epochs": result["probes"]["epochs"]})
        metrics = {"recon/r2": result["reconstruction"]["r2"]}
        metrics.update({_metric_name("recon/r2", k): v for k, v in result["reconstruction"]["r2_per_tensor"].items()})
        for which in ("original", "decoded"):
            metrics.update({_metric_name("acc", which, k): v for k, v in result["accuracy"][which].items()})
        for metric in ("r2", "kendall_tau", "accuracy", "ood_r2", "ood_kendall_tau"):
            for target, by_features in result["probes"].get(metric, {}).items():
                metrics.update({_metric_name("probe", metric, target, f): v for f, v in by_features.items()})
        items = [Metric(k, float(v), 0, 0) for k, v in metrics.items() if v is not None and np.isfinite(v)]
        for i in range(0, len(items), 1000):  # MLflow's batch limit
            client.log_batch(rid, metrics=items[i:i + 1000],
                             params=[Param(k, v) for k, v in params.items()] if i == 0 else [])
        for path in [out / "probes.csv", out / "accuracy.csv", *figures.values()]:
            client.log_artifact(rid, str(path))
        client.log_dict(rid, jsonable(result), "eval.json")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    return rid


def _checkpoint_run_id(hr) -> str | None:
    """The MLflow run that trained the checkpoint, if its config.json recorded one."""
    meta = getattr(hr, "meta", None) or {}
    for key in ("mlflow_run_id", "run_id"):
        if meta.get(key):
            return str(meta[key])
    nested = meta.get("mlflow") or meta.get("tracking") or {}
    return str(nested["run_id"]) if isinstance(nested, dict) and nested.get("run_id") else None


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
    acc = result["accuracy"]
    print(f"reconstruction R² (test, epochs {result['reconstruction']['epochs']}): {result['reconstruction']['r2']:.3f}")
    print(f"test accuracy original {acc['original']['mean']:.3f} ± {acc['original']['std']:.3f}, "
          f"decoded {acc['decoded']['mean']:.3f} ± {acc['decoded']['std']:.3f} "
          f"({100 * acc['decoded']['near_chance']:.0f}% near chance)")
    for target, by_features in result["probes"].get("r2", {}).items():
        print(f"probe R² {target:>13}: " + "  ".join(f"{f}={v:.3f}" for f, v in by_features.items()))
    print(f"wrote {Path(args.out) / 'eval.json'}")
    return 0


def register_eval(hyperrep_subparsers) -> None:
    """Add ``raysys hyperrep eval`` to the ``hyperrep`` command's subparsers."""
    p = hyperrep_subparsers.add_parser("eval", help="evaluate a hyper-representation checkpoint on a zoo")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory written by 'raysys hyperrep train'")
    p.add_argument("--zoo", required=True, help="zoo directory (its test split is evaluated)")
    p.add_argument("--out", required=True, help="output directory for eval.json, probes.csv and figures")
    p.add_argument("--ood-zoo", default=None, help="second zoo of the same architecture for out-of-distribution probes")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI, e.g. sqlite:////abs/mlflow.db (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--data-root", default=None, help="where on-disk image datasets live")
    p.add_argument("--epochs", default=None, help="zoo epochs to reconstruct, e.g. 21-25 (default: the training epochs)")
    p.add_argument("--probe-epochs", default=None, help="zoo epochs to probe, e.g. 1-25 (default: all after init)")
    p.set_defaults(func=_run_eval)
