"""Train a hyper-representation on a zoo: ``train(config, zoo_dir, out_dir) -> summary dict``.

Data: every model state in the epoch window (000 §4.1: epochs 21-25), split by model as the zoo
store assigned it. Each step draws two augmented views per sample; the loss is
beta * LWLN-reconstruction of the clean permuted weights + (1 - beta) * contrastive loss of the
two views. The checkpoint with the lowest validation reconstruction loss is kept in ``out_dir``
(never selected on the test split); test R^2 is computed once, at the end, for that checkpoint.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import torch
from tqdm.auto import tqdm

from raysys import tracking
from raysys.config import RaysysError, validate
from raysys.hyperrep.augment import Augmenter
from raysys.hyperrep.checkpoint import manifest_sha256
from raysys.hyperrep.config import HyperRepConfig
from raysys.hyperrep.losses import CONTRASTIVE, layer_statistics, r2_score, reconstruction_loss
from raysys.hyperrep.model import HyperRepresentation
from raysys.integrity import check_output_dir
from raysys.store import atomic_write_json, open_zoo

SPLITS = ("train", "val", "test")
Report = Callable[[int, dict], None]


def load_window(zoo, window: tuple[int, int]) -> dict[str, torch.Tensor]:
    """{split: weights [rows, P]} of the model states in the epoch window; diverged rows dropped."""
    epochs = list(range(window[0], window[1] + 1))
    out = {}
    for split in SPLITS:
        w, meta = zoo.weights(epochs=epochs, splits=[split])
        keep = np.isfinite(w).all(axis=1) & ~meta["diverged"].to_numpy(dtype=bool) if len(w) else np.zeros(0, bool)
        out[split] = torch.from_numpy(np.ascontiguousarray(w[keep])).float() if len(w) else torch.zeros(0, zoo.num_params)
    if len(out["train"]) < 2 or len(out["val"]) < 1:
        have = sorted(zoo.frame()["epoch"].unique().tolist())
        raise RaysysError(
            f"zoo {zoo.root} has {len(out['train'])} training and {len(out['val'])} validation model states in "
            f"epochs {window[0]}-{window[1]} (the zoo has epochs {have[0]}-{have[-1]}). Set train.epoch_window "
            f"to epochs the zoo has, e.g. --set 'train.epoch_window=[{max(have[0], have[-1] - 4)},{have[-1]}]'.")
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RaysysError(f"train.device={name} but no CUDA device is available here. Use --set train.device=cpu.")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: HyperRepresentation, weights: torch.Tensor, batch_size: int = 512) -> dict[str, float]:
    """Reconstruction of clean (un-augmented) weights: training criterion, plain MSE and R^2."""
    if len(weights) == 0:
        return {"rec": float("nan"), "mse": float("nan"), "r2": float("nan")}
    recon = torch.from_numpy(model.decode(model.encode(weights.numpy(), batch_size), batch_size))
    inv_var = model.loss_weights()
    return {"rec": float(reconstruction_loss(recon, weights, None if inv_var is None else inv_var.cpu())),
            "mse": float(reconstruction_loss(recon, weights)),
            "r2": r2_score(recon, weights)}


def train(config: HyperRepConfig | dict, zoo_dir: str | Path, out_dir: str | Path,
          tracking_uri: str | None = None, report: Report | None = None,
          experiment: str = "hyperrep", progress: bool = True) -> dict:
    """Train, keep the best checkpoint (by validation reconstruction) in ``out_dir``, return a summary.

    ``report(epoch, metrics)`` is called after every epoch (e.g. ``ray.tune.report`` in a trial).
    ``tracking_uri`` None means ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db``
    (:func:`raysys.tracking.resolve_tracking_uri`); one MLflow run per call.
    """
    cfg = config if isinstance(config, HyperRepConfig) else validate(HyperRepConfig, config)
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _train(cfg, Path(zoo_dir), Path(out_dir), tracking_uri, report, experiment, progress)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: HyperRepConfig, zoo_dir: Path, out_dir: Path, tracking_uri, report, experiment, progress) -> dict:
    tc = cfg.train
    check_output_dir(out_dir)
    zoo = open_zoo(zoo_dir)
    if cfg.model.latent_dim > zoo.num_params:
        raise RaysysError(f"model.latent_dim {cfg.model.latent_dim} is larger than the {zoo.num_params} parameters of "
                          f"the zoo's {zoo.layout.arch} models: the 'compression' would expand them. "
                          f"Set model.latent_dim below {zoo.num_params} (e.g. --set model.latent_dim={max(1, zoo.num_params // 4)}).")
    data = load_window(zoo, tc.epoch_window)
    device = resolve_device(tc.device)

    torch.manual_seed(tc.seed)
    model = HyperRepresentation(cfg, zoo.layout)
    model.set_layer_statistics(*layer_statistics(data["train"], model.tokenizer.param_group, model.tokenizer.num_groups))
    model.to(device)
    augment = Augmenter(zoo.layout, cfg.augment.permute, cfg.augment.erase_p, cfg.augment.erase_low,
                        cfg.augment.erase_high, cfg.augment.noise_std)
    contrastive = CONTRASTIVE[cfg.loss.contrastive]
    beta, tau = cfg.loss.beta, cfg.loss.temperature
    inv_var = model.loss_weights()

    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    if tc.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tc.epochs)
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, tc.patience // 3))
    gen = torch.Generator().manual_seed(tc.seed)

    meta = {"zoo": {"path": str(Path(zoo_dir).resolve()), "manifest_sha256": manifest_sha256(zoo_dir),
                    "arch": zoo.manifest.get("arch", zoo.layout.arch), "dataset": zoo.manifest.get("dataset")},
            "data": {s: int(len(v)) for s, v in data.items()}}
    params = {**cfg.model_dump(mode="json"), "zoo": {k: meta["zoo"][k] for k in ("path", "manifest_sha256", "arch")},
              "data": meta["data"]}
    with tracking.start_run(tracking_uri, experiment, run_name=f"hyperrep-{out_dir.name}",
                            tags={"raysys.stage": "hyperrep"}, params=params) as run:
        meta["mlflow_run_id"] = run.info.run_id  # lets evaluation link back to the training run
        train_w, n = data["train"], len(data["train"])
        best = {"val_rec": math.inf, "epoch": -1}
        best_state, history, stale, t0 = None, [], 0, time.time()
        bar = tqdm(range(1, tc.epochs + 1), desc="hyperrep", unit="epoch", disable=not progress)
        for epoch in bar:
            model.train()
            order = torch.randperm(n, generator=gen)
            sums, steps = np.zeros(3), 0
            for i in range(0, n, tc.batch_size):
                idx = order[i:i + tc.batch_size]
                if len(idx) < 2:  # a contrastive batch needs two models
                    continue
                w = train_w[idx].to(device)
                (clean1, view1), (clean2, view2) = augment.two_views(w, gen)
                _, recon, proj = model(torch.cat([view1, view2]))
                rec = reconstruction_loss(recon, torch.cat([clean1, clean2]), inv_var)
                con = contrastive(proj[:len(idx)], proj[len(idx):], tau)
                loss = beta * rec + (1 - beta) * con
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums += [loss.item(), rec.item(), con.item()]
                steps += 1
            val = evaluate(model, data["val"])
            sched.step(val["rec"]) if tc.schedule == "plateau" else sched.step()
            metrics = {"train_loss": sums[0] / max(steps, 1), "train_rec": sums[1] / max(steps, 1),
                       "train_con": sums[2] / max(steps, 1), "val_rec": val["rec"], "val_mse": val["mse"],
                       "val_r2": val["r2"], "lr": opt.param_groups[0]["lr"]}
            if not math.isfinite(metrics["train_loss"]):
                raise RaysysError(f"training diverged at epoch {epoch} (loss {metrics['train_loss']}). "
                                  f"Lower train.lr (now {tc.lr}) and run again.")
            if val["rec"] < best["val_rec"]:
                best = {"val_rec": val["rec"], "val_r2": val["r2"], "val_mse": val["mse"], "epoch": epoch}
                best_state = copy.deepcopy(model.state_dict())
                model.save(out_dir, {**meta, "epoch": epoch, "metrics": best})
                stale = 0
            else:
                stale += 1
            metrics["best_val_rec"] = best["val_rec"]
            history.append({"epoch": epoch, **metrics})
            mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=epoch)
            bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", val_r2=f"{val['r2']:.3f}")
            if report is not None:
                report(epoch, dict(metrics, epoch=epoch))
            if stale >= tc.patience:
                break
        bar.close()
        if best_state is None:
            raise RaysysError(f"validation reconstruction was never finite in {len(history)} epochs. "
                              f"Lower train.lr (now {tc.lr}) or check the zoo for diverged models.")
        model.load_state_dict(best_state)
        test = evaluate(model, data["test"])
        summary = {"best_epoch": best["epoch"], "epochs_run": len(history), "val_rec": best["val_rec"],
                   "val_r2": best["val_r2"], "test_rec": test["rec"], "test_mse": test["mse"], "test_r2": test["r2"],
                   "train_seconds": time.time() - t0, **meta["data"]}
        numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        model.save(out_dir, {**meta, "epoch": best["epoch"], "metrics": numbers})
        atomic_write_json(out_dir / "history.json", history)
        mlflow.log_metrics({f"final_{k}": v for k, v in numbers.items()})
        mlflow.log_artifacts(str(out_dir), "checkpoint")
        summary.update(checkpoint=str(out_dir.resolve()), mlflow_run_id=run.info.run_id)
    return summary
