"""Train a hyper-representation on a zoo: ``train(config, zoo_dir, out_dir) -> summary dict``.

Data: every model state in the epoch window (000 §4.1: epochs 21-25), split by model as the zoo
store assigned it. Each step draws two augmented views per sample; the loss is
beta * LWLN-reconstruction of the clean permuted weights + (1 - beta) * contrastive loss of the
two views. The checkpoint with the lowest validation reconstruction loss is kept in ``out_dir``
(never selected on the test split); test R^2 is computed once, at the end, for that checkpoint.

Resume: after every epoch the whole training state (current weights, optimizer, scheduler, both
random generators, epoch, best-so-far, patience counter, history, config and zoo manifest sha256,
MLflow run id) is written atomically to ``out_dir/resume/state.safetensors``. ``train(..., resume=True)``
continues from it and ends with the same weights and history as an uninterrupted run; a training
that finishes removes ``out_dir/resume/``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
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
from raysys.hyperrep.config import HyperRepConfig, LossConfig
from raysys.hyperrep.data import load_window
from raysys.hyperrep.losses import CONTRASTIVE, layer_statistics, reconstruction_loss
from raysys.hyperrep.model import HyperRepresentation
from raysys.integrity import check_output_dir
from raysys.probes import r2
from raysys.store import atomic_write_bytes, atomic_write_json, open_zoo

Report = Callable[[int, dict], None]
RESUME_DIR, RESUME_FILE, RESUME_FORMAT = "resume", "state.safetensors", 2
# Config keys that do not change what is trained, so a resume may change them.
RESUME_FREE = {"train.threads"}


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
            "r2": r2(weights.numpy(), recon.numpy())}


def train(config: HyperRepConfig | dict, zoo_dir: str | Path, out_dir: str | Path,
          tracking_uri: str | None = None, report: Report | None = None,
          experiment: str = "hyperrep", progress: bool = True, resume: bool = False,
          mlflow_run_id: str | None = None) -> dict:
    """Train, keep the best checkpoint (by validation reconstruction) in ``out_dir``, return a summary.

    ``report(epoch, metrics)`` is called after every epoch (e.g. ``ray.tune.report`` in a trial),
    after the epoch's resume state is written. ``tracking_uri`` None means ``$MLFLOW_TRACKING_URI``
    or ``sqlite:///<cwd>/mlflow.db`` (:func:`raysys.tracking.resolve_tracking_uri`); one MLflow run
    per training.

    ``resume=True`` continues from ``out_dir/resume/state.safetensors`` (written after every epoch) when it
    exists and starts fresh when it does not, so rerunning the same command is always safe. The
    state must come from the same config (``train.threads`` aside) and zoo manifest, else a
    :class:`RaysysError` says so. The MLflow run continues too: ``mlflow_run_id`` (a search trial's run) or
    ``$MLFLOW_RUN_ID`` if set, else the run id recorded in the state (a new run, with a warning, if the tracking
    store no longer has it); epochs a joined run already holds are not logged again.
    """
    cfg = config if isinstance(config, HyperRepConfig) else validate(HyperRepConfig, config)
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _train(cfg, Path(zoo_dir), Path(out_dir), tracking_uri, report, experiment, progress, resume,
                      mlflow_run_id)
    finally:
        torch.set_num_threads(threads)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel: one pass over all parameters instead of one op per tensor
    (on 2 CPU cores the optimizer step went from 7.5 to 1.4 ms for the digits config)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def train_step(model: HyperRepresentation, opt: torch.optim.Optimizer, augment: Augmenter, weights: torch.Tensor,
               gen: torch.Generator, loss: LossConfig, inv_var: torch.Tensor | None,
               precision: str = "fp32") -> torch.Tensor:
    """One optimizer step on a batch of model states [B, P]; returns (loss, reconstruction, contrastive), detached.

    Two augmented views per state; beta * LWLN reconstruction of the clean targets + (1 - beta) * contrastive
    loss between the views. When the views cannot differ (no augmentation, no dropout) and beta = 1, the
    second view would repeat the first exactly, so one view is computed (the same step up to float rounding,
    half the work) and the contrastive term is reported as NaN. ``precision="bf16"`` runs the forward pass
    under bfloat16 autocast (CUDA, or CPUs with AVX512-BF16/AMX); the losses are computed in float32."""
    batch = len(weights)
    single = loss.beta == 1.0 and augment.is_identity and not (model.training and model.config.model.dropout > 0)
    amp = torch.autocast(weights.device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with amp:
        if single:
            clean, view = augment.view(weights, gen)
            rec = reconstruction_loss(model.decode_weights(model.encode_weights(view)).float(), clean, inv_var)
            con = torch.full((), float("nan"), device=weights.device)
            total = rec
        else:
            (clean1, view1), (clean2, view2) = augment.two_views(weights, gen)
            _, recon, proj = model(torch.cat([view1, view2]))
            rec = reconstruction_loss(recon.float(), torch.cat([clean1, clean2]), inv_var)
            proj = proj.float()
            con = CONTRASTIVE[loss.contrastive](proj[:batch], proj[batch:], loss.temperature)
            total = loss.beta * rec + (1 - loss.beta) * con
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return torch.stack([total, rec, con]).detach().cpu()


def _flat(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        return {k: v for key, val in data.items() for k, v in _flat(val, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


def load_resume_state(out_dir: Path, config: dict, manifest_sha: str) -> dict | None:
    """The resume state in ``out_dir`` (None when there is none), checked against this config and zoo."""
    path = out_dir / RESUME_DIR / RESUME_FILE
    if not path.exists():
        return None
    try:
        state = _read_state(path)
    except Exception as err:
        raise RaysysError(f"the resume state {path} cannot be read ({type(err).__name__}: {err}). Delete "
                          f"{path.parent} to train again from epoch 1, or pass a new --out.") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise RaysysError(f"{path} is not a resume state this raysys writes (format "
                          f"{state.get('format') if isinstance(state, dict) else '?'}, expected {RESUME_FORMAT}). "
                          f"Delete {path.parent} to train again from epoch 1, or pass a new --out.")
    if state["manifest_sha256"] != manifest_sha:
        raise RaysysError(f"the checkpoint in {out_dir} was trained on a different zoo (manifest sha256 "
                          f"{state['manifest_sha256'][:12]}..., this zoo's is {manifest_sha[:12]}...). "
                          f"Pass the zoo it was trained on, a new --out, or drop --resume.")
    old, new = _flat(state["config"]), _flat(config)
    changed = sorted(k for k in old.keys() | new.keys() if k not in RESUME_FREE and old.get(k) != new.get(k))
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
        raise RaysysError(f"the checkpoint in {out_dir} was trained with a different config ({diff}"
                          f"{', ...' if len(changed) > 5 else ''}). Resume with the config it was started "
                          f"with, or pass a new --out, or drop --resume to train again from epoch 1.")
    return state


def save_resume_state(out_dir: Path, state: dict) -> None:
    """Write the resume state atomically: a reader sees the previous epoch's state or this one.

    One safetensors file (no pickle): the tensors by path, and the nested structure around them
    (optimizer and scheduler state, history, ...) as JSON in the file's metadata."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_pack(state, tensors, "state"), allow_nan=True)
    (out_dir / RESUME_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / RESUME_DIR / RESUME_FILE, save(tensors, metadata={"structure": structure}))


def _read_state(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        structure = json.loads(f.metadata()["structure"])
    return _unpack(structure, tensors)


def _pack(obj, tensors: dict, path: str):
    """Nested dicts / lists / tuples / tensors / JSON scalars -> JSON, with tensors moved into ``tensors``.
    Dict keys keep their type (optimizer state is keyed by int), tuples stay tuples."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _pack(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_pack(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a resume state")


def _unpack(obj, tensors: dict):
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_unpack(v, tensors) for v in obj["__tuple__"])
        return {k: _unpack(v, tensors) for k, v in obj["__dict__"]}
    return obj


def _train(cfg: HyperRepConfig, zoo_dir: Path, out_dir: Path, tracking_uri, report, experiment, progress,
           resume: bool = False, mlflow_run_id: str | None = None) -> dict:
    tc = cfg.train
    check_output_dir(out_dir)
    zoo = open_zoo(zoo_dir)
    if cfg.model.latent_dim > zoo.num_params:
        raise RaysysError(f"model.latent_dim {cfg.model.latent_dim} is larger than the {zoo.num_params} parameters of "
                          f"the zoo's {zoo.layout.arch} models: the 'compression' would expand them. "
                          f"Set model.latent_dim below {zoo.num_params} (e.g. --set model.latent_dim={max(1, zoo.num_params // 4)}).")
    config_json = cfg.model_dump(mode="json")
    zoo_sha = manifest_sha256(zoo_dir)
    state = load_resume_state(out_dir, config_json, zoo_sha) if resume else None
    data = load_window(zoo, tc.epoch_window)
    device = resolve_device(tc.device)

    torch.manual_seed(tc.seed)
    model = HyperRepresentation(cfg, zoo.layout)
    model.set_layer_statistics(*layer_statistics(data["train"], model.tokenizer.param_group, model.tokenizer.num_groups))
    if cfg.model.linear_path:
        model.init_linear_path(data["train"])
    model.to(device)
    augment = Augmenter(zoo.layout, cfg.augment.permute, cfg.augment.erase_p, cfg.augment.erase_low,
                        cfg.augment.erase_high, cfg.augment.noise_std)
    inv_var = model.loss_weights()
    if tc.precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("raysys: warning: train.precision=bf16 on a CPU without bf16 matrix units (AVX512-BF16 or AMX); "
              "it runs several times slower than fp32 here (benchmarks/hyperrep_throughput.py measures it). "
              "Use train.precision=fp32 on this machine.", file=sys.stderr)

    opt = make_optimizer(model, tc.lr, tc.weight_decay)
    if tc.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tc.epochs)
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, tc.patience // 3))
    gen = torch.Generator().manual_seed(tc.seed)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # dropout draws from the global generator
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)

    meta = {"zoo": {"path": str(Path(zoo_dir).resolve()), "manifest_sha256": zoo_sha,
                    "arch": zoo.manifest.get("arch", zoo.layout.arch), "dataset": zoo.manifest.get("dataset")},
            "data": {s: int(len(v)) for s, v in data.items()}}
    params = {**config_json, "zoo": {k: meta["zoo"][k] for k in ("path", "manifest_sha256", "arch")},
              "data": meta["data"]}
    # The run to join: a search trial's own (mlflow_run_id), else $MLFLOW_RUN_ID (MLflow's variable) if set; it
    # wins over the run an interrupted training recorded in its resume state.
    joined = mlflow_run_id or os.environ.get("MLFLOW_RUN_ID") or None
    run_id = joined
    if state is not None and not joined:
        run_id = _existing_run(tracking_uri, state.get("mlflow_run_id"))
    resumed_run = state is not None and run_id is not None
    # A joined run (a search trial's) may hold epochs from before an interruption even when no checkpoint was
    # registered yet: those are redone (same seed) without being logged twice.
    joined_run = resumed_run or joined is not None
    tags = {"raysys.stage": "hyperrep"}
    if state is not None:
        tags["raysys.resumed_after_epoch"] = str(state["epoch"])
    with tracking.start_run(tracking_uri, experiment, run_name=f"hyperrep-{out_dir.name}", tags=tags,
                            params=None if resumed_run else params, run_id=run_id) as run:
        meta["mlflow_run_id"] = run.info.run_id  # lets evaluation link back to the training run
        train_w, n = data["train"], len(data["train"])
        best = {"val_rec": math.inf, "epoch": -1}
        best_state, history, stale, t0, spent, start = None, [], 0, time.time(), 0.0, 1
        # Epochs this run already logged: a resume from an older state than the interruption (a Tune
        # trial restores its last *registered* checkpoint) redoes them without logging them twice.
        logged = last_logged_step(tracking_uri, run.info.run_id, "val_rec") if joined_run else 0
        if state is not None:
            best, history, stale, spent = state["best"], state["history"], state["stale"], state["seconds"]
            best_state = state["best_state"]
            start = state["epoch"] + 1 if stale < tc.patience else tc.epochs + 1  # early-stopped: nothing left
        bar = tqdm(range(start, tc.epochs + 1), desc="hyperrep", unit="epoch", disable=not progress,
                   initial=start - 1, total=tc.epochs)
        for epoch in bar:
            model.train()
            order = torch.randperm(n, generator=gen)
            sums, steps = np.zeros(3), 0
            for i in range(0, n, tc.batch_size):
                idx = order[i:i + tc.batch_size]
                if len(idx) < 2:  # a contrastive batch needs two models
                    continue
                sums += train_step(model, opt, augment, train_w[idx].to(device), gen, cfg.loss, inv_var,
                                   tc.precision).tolist()
                steps += 1
            val = evaluate(model, data["val"])
            sched.step(val["rec"]) if tc.schedule == "plateau" else sched.step()
            metrics = {"train_loss": sums[0] / max(steps, 1), "train_rec": sums[1] / max(steps, 1),
                       "train_con": sums[2] / max(steps, 1), "val_rec": val["rec"], "val_mse": val["mse"],
                       "val_r2": val["r2"], "lr": opt.param_groups[0]["lr"]}
            if not math.isfinite(metrics["train_loss"]):
                raise RaysysError(f"training diverged at epoch {epoch} (loss {metrics['train_loss']}). "
                                  f"Lower train.lr (now {tc.lr}) and run again.")
            if val["rec"] < best["val_rec"] or tc.keep == "last":
                best = {"val_rec": val["rec"], "val_r2": val["r2"], "val_mse": val["mse"], "epoch": epoch}
                best_state = copy.deepcopy(model.state_dict())
                model.save(out_dir, {**meta, "epoch": epoch, "metrics": best})
                stale = 0
            else:
                stale += 1
            metrics["best_val_rec"] = best["val_rec"]
            history.append({"epoch": epoch, **metrics})
            if epoch > logged:
                mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=epoch)
            save_resume_state(out_dir, {
                "format": RESUME_FORMAT, "epoch": epoch, "config": config_json, "manifest_sha256": zoo_sha,
                "mlflow_run_id": run.info.run_id, "best": best, "stale": stale, "history": history,
                "seconds": spent + time.time() - t0, "model": model.state_dict(),
                "best_state": best_state,  # _pack copies every tensor to the CPU
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})
            bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", val_r2=f"{val['r2']:.3f}")
            if report is not None:
                report(epoch, dict(metrics, epoch=epoch))
            if stale >= tc.patience:
                break
        bar.close()
        if best_state is None:
            raise RaysysError(f"validation reconstruction was never finite in {len(history)} epochs. "
                              f"Lower train.lr (now {tc.lr}) or check the zoo for diverged models.")
        model.load_state_dict(best_state)  # (a resumed best_state is on the CPU; load copies it over)
        test, fit = evaluate(model, data["test"]), evaluate(model, data["train"])
        summary = {"best_epoch": best["epoch"], "epochs_run": len(history), "train_r2": fit["r2"],
                   "val_rec": best["val_rec"], "val_r2": best["val_r2"],
                   "test_rec": test["rec"], "test_mse": test["mse"], "test_r2": test["r2"],
                   "train_seconds": spent + time.time() - t0, **meta["data"]}
        numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        model.save(out_dir, {**meta, "epoch": best["epoch"], "metrics": numbers})
        atomic_write_json(out_dir / "history.json", history)
        mlflow.log_metrics({f"final_{k}": v for k, v in numbers.items()})
        for item in sorted(out_dir.iterdir()):  # the checkpoint, not the resume state
            if item.name == RESUME_DIR:
                continue
            if item.is_dir():
                mlflow.log_artifacts(str(item), f"checkpoint/{item.name}")
            else:
                mlflow.log_artifact(str(item), "checkpoint")
        summary.update(checkpoint=str(out_dir.resolve()), mlflow_run_id=run.info.run_id)
    # Only once the run is closed: a crash in the final logging above still leaves a state to resume from.
    shutil.rmtree(out_dir / RESUME_DIR, ignore_errors=True)
    return summary


def _existing_run(tracking_uri, run_id: str | None) -> str | None:
    """``run_id`` when the tracking store still has it, else None (the resumed training gets a new run)."""
    if not run_id:
        return None
    tracking.check_tracking_uri(tracking_uri)  # an unreachable server fails fast here, not after MLflow's retries
    try:
        tracking.client(tracking_uri).get_run(run_id)
        return run_id
    except Exception:
        print(f"raysys: warning: MLflow run {run_id} of the interrupted training is not in this tracking store; "
              f"the resumed epochs go to a new run", file=sys.stderr)
        return None


def last_logged_step(tracking_uri, run_id: str, key: str) -> int:
    """The highest step at which MLflow run ``run_id`` has metric ``key`` (0 if none)."""
    return max((m.step for m in tracking.client(tracking_uri).get_metric_history(run_id, key)), default=0)
