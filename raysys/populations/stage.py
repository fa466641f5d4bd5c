"""The populations stage: sample -> decode -> baselines -> fine-tune on actors -> novelty -> report.

``run_populations(config, zoo_dir, checkpoint_dir, out_dir)`` does all of it:

1. Encode the zoo's training-split models (states at ``zoo_epochs``, the epochs the
   autoencoder trained on) into anchors; their validation accuracies rank the top 30 %.
2. Draw latents with each sampler (S_KDE, S_KDE30, S_KDE_joint, S_U), decode them to weights;
   B_KDE30 does the same through the autoencoder trained without LWLN; B_noise perturbs the top
   30 % training weights; B_noise_novelty / B_noise_diversity do the same with the sigma at which
   the population's novelty / diversity equals that of a sampled population (``matched_noise``);
   B_T starts from fresh initializations of the zoo's scheme; B_F (transfer) takes trained zoo models.
3. Fine-tune every population for max(budgets) epochs on Ray actors, evaluating after each,
   in-dataset and (optionally) on a transfer dataset of the same input shape.
4. Novelty of every population against the training models, at epoch 0 and after the last epoch.
5. ``results.json``, ``report.md``/``report.json``, plots; one MLflow child run per population.

All populations share fine-tuning seeds (data order, dropout) model by model, so methods are
compared on the same mini-batch sequences.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from raysys import datasets, tracking
from raysys.config import RaysysError
from raysys.populations import codec, finetune, novelty, report, samplers
from raysys.populations.config import MATCHED, NOISE, PopulationsConfig
from raysys.store import atomic_write_bytes, atomic_write_json, open_zoo
from raysys.train import ModelSpec

# --- the zoo side ---------------------------------------------------------------------------

class ZooView:
    """What the stage needs from a zoo: training anchors, their accuracies, the training recipe."""

    def __init__(self, zoo_dir, zoo_epochs: list[int], dataset_options: dict):
        self.zoo = open_zoo(zoo_dir)
        self.layout = self.zoo.layout
        self.arch = self.zoo.manifest.get("arch", self.layout.arch)
        self.dataset_name = self.zoo.manifest["dataset"]["name"]
        frame = self.zoo.frame(splits=["train"])
        have = sorted(int(e) for e in frame["epoch"].unique())
        missing = [e for e in zoo_epochs if e not in have]
        if missing:
            raise RaysysError(f"zoo {zoo_dir} has no epoch(s) {missing} (it has {have[0]}..{have[-1]}). Set "
                              f"zoo_epochs to the epochs the autoencoder was trained on, e.g. --set zoo_epochs=[{have[-1]}].")
        self.hparams = frame.drop_duplicates("model_id")
        if not dataset_options:  # default: the loader options the zoo itself was generated with
            zoo_data = (self.zoo.manifest.get("config") or {}).get("dataset") or {}
            dataset_options = dict(zoo_data.get("options") or {})
            if zoo_data.get("root"):
                dataset_options["root"] = zoo_data["root"]
        self.dataset_options = dataset_options
        self.data = datasets.load(self.dataset_name, **dataset_options)
        want = self.zoo.manifest["dataset"].get("sha256_16")
        if want and want != self.data.describe()["sha256_16"]:
            raise RaysysError(f"datasets.load('{self.dataset_name}', **{dataset_options}) does not give the images this "
                              f"zoo was trained on (checksums differ). Set dataset_options to the zoo's dataset options.")

    def states(self, epochs: list[int]):
        """Training-split weights [rows, P] at ``epochs`` and their metadata, diverged rows dropped."""
        W, meta = self.zoo.weights(epochs=epochs, splits=["train"])
        ok = np.isfinite(W).all(axis=1) & ~meta["diverged"].to_numpy(bool) & np.isfinite(meta["val_acc"].to_numpy())
        if not ok.any():
            raise RaysysError("every training-split model in the zoo diverged; regenerate the zoo.")
        return W[ok], meta[ok].reset_index(drop=True)

    def recipe(self, column: str, override=None):
        if override is not None:
            return override
        values = self.hparams[column].unique()
        if len(values) != 1:
            raise RaysysError(f"the zoo's models use several {column} values ({sorted(values)[:5]}...); fine-tuning "
                              f"needs one. Set finetune.{column} in the config.")
        v = values[0]
        return v.item() if hasattr(v, "item") else v


def _specs(view: ZooView, cfg: PopulationsConfig) -> list[ModelSpec]:
    ft = cfg.finetune
    zoo_seeds = set(int(s) for s in view.hparams["seed"])
    specs: list[ModelSpec] = []
    seed = ft.seed
    while len(specs) < cfg.num_models:
        if seed not in zoo_seeds:  # B_T must be new models, not re-runs of zoo members
            specs.append(ModelSpec(
                model_id=len(specs), seed=seed, init=view.recipe("init"), activation=view.recipe("activation"),
                optimizer=view.recipe("optimizer", ft.optimizer), lr=float(view.recipe("lr", ft.lr)),
                weight_decay=float(view.recipe("weight_decay", ft.weight_decay)),
                dropout=float(view.recipe("dropout")), batch_size=int(view.recipe("batch_size", ft.batch_size))))
        seed += 1
    return specs


# --- generating the initial populations -----------------------------------------------------

def initial_weights(method: str, cfg: PopulationsConfig, anchors: dict, autoencoders: dict, view: ZooView,
                    source_epoch: int, rng_seed: int) -> np.ndarray | None:
    """The [N, P] starting weights of one method (None for B_T: fresh initializations)."""
    n, s = cfg.num_models, cfg.sampling
    if method == "B_T":
        return None
    if method in MATCHED:  # the target drawn exactly as the stage draws it, references = the anchors
        target = initial_weights(cfg.matched_noise.target, cfg, anchors, autoencoders, view, source_epoch,
                                 _method_seed(cfg, "generate", cfg.matched_noise.target))
        if target is None:
            raise RaysysError(f"matched_noise.target={cfg.matched_noise.target} is not a sampled population")
        return calibrated_noise(method, cfg, anchors, target, novelty_references(cfg, view, anchors), view.layout,
                                rng_seed)["weights"]
    if method in samplers.SAMPLER_NAMES or method == "B_KDE30":
        which = "nolwln" if method == "B_KDE30" else "lwln"
        sampler = samplers.make_sampler("S_KDE30" if method == "B_KDE30" else method, s.bandwidth, s.top_fraction,
                                        random_state=rng_seed)
        Z = sampler.fit(anchors[which], anchors["val_acc"]).sample(n)
        return codec.decode(autoencoders[which], Z, view.layout, s.batch_size)
    if (sigma := _noise_sigma(method)) is not None:
        W, _ = samplers.noise_population(anchors["weights"], anchors["val_acc"], n, sigma, s.top_fraction, rng_seed)
        return W
    if method == "B_F":
        W, meta = view.states([source_epoch])
        rng = np.random.default_rng(rng_seed)
        rows = rng.choice(len(W), size=n, replace=len(W) < n)
        return W[rows]
    raise RaysysError(f"unknown method '{method}'")


def novelty_references(cfg: PopulationsConfig, view: ZooView, anchors: dict) -> np.ndarray:
    """The training-model states novelty is measured against: ``novelty.reference_epochs``, else the anchors."""
    epochs = cfg.novelty.reference_epochs or cfg.anchor_epochs
    return anchors["weights"] if epochs == cfg.anchor_epochs else view.states(epochs)[0]


def calibrated_noise(method: str, cfg: PopulationsConfig, anchors: dict, target_weights: np.ndarray,
                     references: np.ndarray, layout, rng_seed: int) -> dict:
    """B_noise_novelty / B_noise_diversity: the noise population whose novelty / diversity (as the
    report measures it, against ``references``) equals the target population's, within
    ``matched_noise.tolerance``. Returns :func:`samplers.calibrate_noise`'s dict plus what was matched."""
    kind, m = MATCHED[method], cfg.matched_noise
    align = cfg.novelty.align
    key, goal = novelty.measure(kind, target_weights, references, layout, align)
    if not np.isfinite(goal) or goal <= 0:
        raise RaysysError(f"{m.target}'s {kind} is {goal}; there is nothing to match {method} to.")
    out = samplers.calibrate_noise(anchors["weights"], anchors["val_acc"], cfg.num_models, goal,
                                   lambda W: novelty.measure(kind, W, references, layout, align)[1],
                                   cfg.sampling.top_fraction, rng_seed, m.tolerance, m.max_iter)
    out.update(method=method, matched=kind, on=m.target, measure=key, tolerance=m.tolerance)
    return out


def yardsticks(anchors: dict, top_fraction: float) -> dict:
    """Test accuracy of the training models the samplers start from: all anchors (the training split
    at zoo_epochs) and the top ``top_fraction`` by validation accuracy (S_KDE30's anchors)."""
    top = samplers.top_fraction_mask(anchors["val_acc"], top_fraction)
    acc = anchors["test_acc"]
    return {"train_test_acc": float(np.mean(acc)), "top_fraction": float(top_fraction),
            "top_test_acc": float(np.mean(acc[top])), "top_test_acc_std": float(np.std(acc[top], ddof=1))
            if top.sum() > 1 else 0.0, "num_anchors": int(len(acc)), "num_top": int(top.sum())}


def _noise_sigma(method: str) -> float | None:
    m = NOISE.match(method)
    return float(m.group(1)) if m else None


def _method_seed(cfg: PopulationsConfig, setting: str, method: str) -> int:
    # Stable per (seed, setting, method), independent of the order methods are listed in.
    digest = hashlib.sha256(f"{cfg.seed}/{setting}/{method}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


# --- tracking -------------------------------------------------------------------------------

def _tracking_uri(cfg: PopulationsConfig, out_dir: Path, override: str | None) -> str:
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db, the store every command defaults to
    return tracking.resolve_tracking_uri(override or cfg.mlflow.tracking_uri)


class _Tracker:
    """One parent run for the stage, one child run per population (MlflowClient, driver side only)."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str | None, params: dict, budgets=()):
        self.uri, self.client = uri, tracking.client(uri)
        self.budgets = list(budgets)
        self.run_ids: dict[str, str] = {}
        self.calibration: dict[str, dict] = {}  # method -> the sigma and what it matched, logged with its runs
        if parent_run_id is not None:
            self.parent = parent_run_id
            self.experiment_id = self.client.get_run(parent_run_id).info.experiment_id
            self.own_parent = False
        else:
            self.experiment_id = tracking.experiment_id(uri, experiment)
            _, self.parent = tracking.new_run(uri, run_name="populations", exp_id=self.experiment_id, params=params)
            self.own_parent = True

    def child(self, job: finetune.Job, curve: np.ndarray) -> None:
        from mlflow.entities import Metric, Param

        _, run_id = tracking.new_run(self.uri, run_name=job.key, exp_id=self.experiment_id, parent=self.parent,
                                     tags={"raysys.stage": "populations"})
        now = int(time.time() * 1000)
        metrics = [Metric("test_acc_mean", float(np.nanmean(curve[e])), now, e) for e in range(len(curve))]
        metrics += [Metric("test_acc_std", float(np.nanstd(curve[e])), now, e) for e in range(len(curve))]
        params = [Param("method", job.name), Param("setting", job.setting), Param("dataset", job.dataset),
                  Param("num_models", str(len(job.specs))), Param("epochs", str(job.epochs))]
        if job.name in self.calibration:
            c = self.calibration[job.name]
            params += [Param("sigma", f"{c['sigma']:.6g}"), Param("matched", f"{c['matched']} of {c['on']}")]
            metrics += [Metric(f"calibration_{k}", float(c[k]), now, 0) for k in ("sigma", "target", "achieved")]
        # the headline figures: accuracy of the sampled population at each fine-tuning budget, on the child
        # ("acc_ep5_mean") and on the parent ("in_dataset/B_T30/acc_ep5_mean"), so one table compares methods
        headline = {}
        for b in self.budgets:
            if b < len(curve) and np.isfinite(curve[b]).any():
                headline[f"acc_ep{b}_mean"] = float(np.nanmean(curve[b]))
                headline[f"acc_ep{b}_std"] = float(np.nanstd(curve[b]))
        metrics += [Metric(k, v, now, 0) for k, v in headline.items()]
        self.client.log_batch(run_id, metrics=metrics, params=params)
        if headline:
            self.client.log_batch(self.parent, metrics=[Metric(f"{job.setting}/{job.name}/{k}", v, now, 0)
                                                        for k, v in headline.items()])
        self.run_ids[job.key] = run_id

    def novelty(self, key: str, when: str, summary: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_ids[key], metrics=[
            Metric(f"{when}_{k}", float(v), now, 0) for k, v in summary.items() if np.isfinite(v)])

    def finish(self, out_dir: Path) -> None:
        for name in ("report.md", "report.json", "accuracy_curves.png", "accuracy_vs_novelty.png"):
            if (out_dir / name).exists():
                self.client.log_artifact(self.parent, str(out_dir / name))
        for run_id in self.run_ids.values():
            self.client.set_terminated(run_id)
        if self.own_parent:
            self.client.set_terminated(self.parent)


def _metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


def load_autoencoders(checkpoint_dir, nolwln_checkpoint_dir=None, autoencoder=None, nolwln_autoencoder=None) -> dict:
    aes = {"lwln": autoencoder if autoencoder is not None else codec.load_autoencoder(checkpoint_dir)}
    if nolwln_autoencoder is not None or nolwln_checkpoint_dir is not None:
        aes["nolwln"] = nolwln_autoencoder if nolwln_autoencoder is not None \
            else codec.load_autoencoder(nolwln_checkpoint_dir)
    return aes


def prepare(config: PopulationsConfig, zoo_dir, autoencoders: dict) -> tuple[PopulationsConfig, ZooView, dict]:
    """Resolve zoo_epochs, open the zoo, and embed its training-split states (the KDE anchors).

    Returns (config with zoo_epochs set, zoo view, anchors) where anchors holds ``weights``
    [M, P], ``val_acc`` [M] and one latent matrix per autoencoder (``lwln``, ``nolwln``).
    """
    if config.zoo_epochs is None:
        window = codec.epoch_window(autoencoders["lwln"])
        if window is None:
            raise RaysysError("zoo_epochs is not set and the autoencoder does not say which zoo epochs it was trained "
                              "on. Set zoo_epochs in the config, e.g. --set zoo_epochs=[21,22,23,24,25].")
        config = config.model_copy(update={"zoo_epochs": window})
    view = ZooView(zoo_dir, config.anchor_epochs, config.dataset_options)
    W, meta = view.states(config.anchor_epochs)
    anchors = {"weights": W, "val_acc": meta["val_acc"].to_numpy(np.float64),
               "test_acc": meta["test_acc"].to_numpy(np.float64)}
    for which, ae in autoencoders.items():
        anchors[which] = codec.encode(ae, W, view.layout, config.sampling.batch_size)
    return config, view, anchors


# --- the stage ------------------------------------------------------------------------------

def _save_population(path: Path, weights: np.ndarray) -> None:
    from safetensors.numpy import save

    atomic_write_bytes(path, save({"weights": np.ascontiguousarray(weights, dtype=np.float32)}))


def _novelty_all(jobs, results_raw, cfg, W_ref, layout, activation, budgets, epochs, test_x, tracker, progress):
    """Per population: accuracies at the budgets and novelty at epoch 0 and after the last epoch."""
    from tqdm.auto import tqdm

    populations = []
    for job, res in tqdm(list(zip(jobs, results_raw)), desc="novelty", disable=not progress):
        data_key = json.dumps([job.dataset, job.dataset_options], sort_keys=True)
        if data_key not in test_x:
            test_x[data_key] = datasets.load(job.dataset, **job.dataset_options).x_test
        curve = res["metrics"]["test_acc"]
        pop = {"name": job.name, "setting": job.setting, "dataset": job.dataset, "num_models": len(job.specs),
               "test_acc": {str(b): curve[b].tolist() for b in budgets},
               "val_acc": {str(b): res["metrics"]["val_acc"][b].tolist() for b in budgets},
               "test_acc_curve": curve.tolist(), "novelty": {}, "novelty_per_model": {}}
        for e in (0, epochs):
            nov = novelty.novelty(res["weights"][e], W_ref, layout, test_x[data_key], activation,
                                  align=cfg.novelty.align)
            pop["novelty"][f"epoch_{e}"] = nov["summary"]
            pop["novelty_per_model"][f"epoch_{e}"] = nov["per_model"]
            if tracker is not None:
                tracker.novelty(f"{job.setting}/{job.name}", f"epoch_{e}", nov["summary"])
        populations.append(pop)
    return populations


def run_populations(config: PopulationsConfig, zoo_dir, checkpoint_dir, out_dir, nolwln_checkpoint_dir=None,
                    *, autoencoder=None, nolwln_autoencoder=None, tracking_uri: str | None = None,
                    parent_run_id: str | None = None, progress: bool = True) -> dict:
    """Run the whole populations stage; returns the results dict (also written to OUT/results.json).

    ``autoencoder`` / ``nolwln_autoencoder`` may be passed instead of checkpoint directories (any
    object with ``encode``/``decode``). Without a no-LWLN autoencoder, B_KDE30 is skipped and the
    report says so. Ray must be initialized by the caller.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir).resolve()
    (out / "populations").mkdir(parents=True, exist_ok=True)
    autoencoders = load_autoencoders(checkpoint_dir, nolwln_checkpoint_dir, autoencoder, nolwln_autoencoder)
    cfg, view, anchors = prepare(config, zoo_dir, autoencoders)
    layout, arch = view.layout, view.arch
    budgets, epochs = cfg.finetune.budgets, max(cfg.finetune.budgets)
    specs = _specs(view, cfg)
    activation = specs[0].activation
    W_anchor = anchors["weights"]
    W_ref = novelty_references(cfg, view, anchors)

    settings = [("in_dataset", view.dataset_name, view.dataset_options, cfg.methods)]
    if cfg.transfer is not None:
        target = datasets.load(cfg.transfer.dataset, **cfg.transfer.dataset_options)
        if (target.in_channels, target.image_size, target.num_classes) != \
                (layout.in_channels, layout.image_size, layout.num_classes):
            raise RaysysError(f"transfer dataset {target.name} has {target.in_channels}x{target.image_size}^2 inputs "
                              f"and {target.num_classes} classes, but the zoo's {arch} expects "
                              f"{layout.in_channels}x{layout.image_size}^2 and {layout.num_classes}. Pick a target "
                              f"dataset of the same shape.")
        settings.append(("transfer", cfg.transfer.dataset, cfg.transfer.dataset_options, cfg.transfer.methods))

    jobs, skipped, generated, calibration = [], [], {}, {}
    failed: dict[str, RaysysError] = {}

    def generate_once(key: str, method: str):
        if key in failed:
            raise failed[key]
        if key not in generated:
            if method in MATCHED:  # sigma calibrated on the target population as the stage draws it
                target = generate_once(cfg.matched_noise.target, cfg.matched_noise.target)
                try:
                    info = calibrated_noise(method, cfg, anchors, target, W_ref, layout,
                                            _method_seed(cfg, "generate", method))
                except RaysysError as err:
                    failed[key] = err
                    raise
                generated[key] = info.pop("weights")
                info.pop("rows")
                calibration[method] = info
            else:
                generated[key] = initial_weights(method, cfg, anchors, autoencoders, view, max(cfg.anchor_epochs),
                                                 _method_seed(cfg, "generate", method))
        return generated[key]

    todo = [(s, d, o, m) for s, d, o, methods in settings for m in methods]
    for setting, dataset, options, method in tqdm(todo, desc="generating populations", disable=not progress):
        if method == "B_KDE30" and "nolwln" not in autoencoders:
            skipped.append({"setting": setting, "name": method,
                            "reason": "no autoencoder trained without LWLN was given (pass --nolwln-checkpoint)"})
            continue
        if method in MATCHED and cfg.matched_noise.target == "B_KDE30" and "nolwln" not in autoencoders:
            skipped.append({"setting": setting, "name": method, "reason": "its target B_KDE30 was skipped"})
            continue
        # Transfer reuses the in-dataset samples of a method: the same generated models, another target.
        key = method if method != "B_F" else f"B_F@{setting}"
        try:
            W0 = generate_once(key, method)
        except RaysysError as err:
            if method not in MATCHED:
                raise
            # e.g. a target more concentrated than the training models themselves: no sigma matches it
            skipped.append({"setting": setting, "name": method, "reason": str(err)})
            continue
        if W0 is not None:
            _save_population(out / "populations" / f"{setting}_{method}.safetensors", W0)
        jobs.append(finetune.Job(name=method, setting=setting, arch=arch, dataset=dataset, specs=specs, epochs=epochs,
                                 weights=W0, dataset_options=dict(options), keep_epochs=(0, epochs)))

    tracker = None
    if cfg.mlflow.enabled:
        tracker = _Tracker(_tracking_uri(cfg, out, tracking_uri), cfg.mlflow.experiment, parent_run_id,
                           {"zoo": str(zoo_dir), "arch": arch, "num_models": cfg.num_models, "budgets": budgets,
                            "methods": cfg.methods, "transfer": cfg.transfer.methods if cfg.transfer else []},
                           budgets)

    if tracker is not None:
        tracker.calibration = calibration
        for method, c in calibration.items():
            tracker.client.log_batch(tracker.parent, metrics=[_metric(f"calibration/{method}/{k}", c[k])
                                                              for k in ("sigma", "target", "achieved")])
        y = yardsticks(anchors, cfg.sampling.top_fraction)
        tracker.client.log_batch(tracker.parent, metrics=[_metric(f"yardstick/{k}", y[k])
                                                          for k in ("train_test_acc", "top_test_acc")])

    def on_result(job: finetune.Job, res: dict) -> None:
        if tracker is not None:
            tracker.child(job, res["metrics"]["test_acc"])

    results_raw = finetune.run_jobs(jobs, cfg.finetune.num_actors, cfg.finetune.cpus_per_actor,
                                    cfg.finetune.gpus_per_actor, progress=progress, on_result=on_result)

    # Novelty against the training models, as generated and after the full budget.
    test_x: dict[str, torch.Tensor] = {}
    threads = torch.get_num_threads()
    # Novelty is thousands of tiny ops; extra intra-op threads only contend (6-14x slower measured
    # on a busy 2-core machine), so the driver computes it single-threaded.
    torch.set_num_threads(1)
    try:
        populations = _novelty_all(jobs, results_raw, cfg, W_ref, layout, activation, budgets, epochs, test_x,
                                   tracker, progress)
    finally:
        torch.set_num_threads(threads)

    results = {"zoo": str(Path(zoo_dir).resolve()), "zoo_name": Path(zoo_dir).name, "arch": arch,
               "dataset": view.dataset_name, "num_models": cfg.num_models, "budgets": budgets,
               "reference_epochs": cfg.novelty.reference_epochs or cfg.anchor_epochs, "num_anchors": int(len(W_anchor)),
               "yardsticks": yardsticks(anchors, cfg.sampling.top_fraction), "calibration": calibration,
               "config": tracking.mask_secrets(cfg.model_dump(mode="json")), "populations": populations, "skipped": skipped}
    atomic_write_json(out / "results.json", results)
    results["report_files"] = report.write_report(results, out)
    if tracker is not None:
        tracker.finish(out)
        results["mlflow_parent_run_id"] = tracker.parent
    return results


def load_results(out_dir) -> dict:
    path = Path(out_dir) / "results.json"
    if not path.exists():
        raise RaysysError(f"{path} does not exist. Run 'raysys populations run CONFIG --zoo ZOO --checkpoint CKPT "
                          f"--out {out_dir}' first.")
    return json.loads(path.read_text())
