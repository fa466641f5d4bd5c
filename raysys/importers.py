"""Import published model zoos into a raysys store: ``raysys zoo import-modelzoos SRC --out ZOO``.

The published format (Schürholt et al., *Model Zoos*, NeurIPS 2022 datasets track; www.modelzoos.cc) is a
Ray Tune experiment directory with one trial folder per model (``NN_tune_trainable_<id>_<n>_<config>...``),
each holding

* ``params.json``: the model's configuration, keys like ``model::type``, ``model::nlin``,
  ``model::init_type``, ``model::dropout``, ``optim::optimizer``, ``optim::lr``, ``optim::wd``,
  ``training::batchsize``, ``seed``;
* ``result.json``: JSON lines, one per reported epoch, with ``training_iteration`` and the losses and
  accuracies (``train_loss``/``test_acc``/... or ``loss_train``/``acc_test``/...);
* ``checkpoint_<N>/checkpoints`` (``N`` plain or zero-padded to six digits, ``checkpoint_000000`` the
  initialization where it was saved): the model's ``state_dict`` written by ``torch.save``, keys
  ``module_list.<i>.weight`` / ``module_list.<i>.bias`` of the reference ``nn.ModuleList``.

The reference modules interleave pooling, activations, dropout and flatten modules with the weight layers,
and which index a layer has depends on whether dropout modules were added, so the weight layers are taken in
the order of their index and matched one by one onto the raysys architecture's layers (``conv1``, ``conv2``,
``conv3``, ``fc1``, ``fc2`` for CNN-s / CNN-m; ``fc1``, ``fc2`` for the TETRIS FFN), every shape checked. The
reference CNN computes conv > pool > act > dropout like raysys's, so the mapped model computes the same
function (``tests/test_importers.py`` checks the logits).

Checkpoints are read with ``torch.load(..., weights_only=True)`` only: a file that needs arbitrary
unpickling is refused, never executed. Models with a missing, unreadable or non-finite checkpoint in the
imported epochs are skipped and counted. The store is written like ``zoo generate`` writes it: the manifest
(``status: running``) first, then one shard at a time under a temporary name and a rename with its sha256
record, then the manifest says ``complete``; a rerun of the same command resumes, keeping the shards that
match their records.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raysys import __version__, architectures
from raysys.config import RaysysError

FORMAT = "modelzoos"
CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")
CHECKPOINT_FILE = "checkpoints"
STATE_KEY = re.compile(r"^module_list\.(\d+)\.(weight|bias)$")
# params.json "model::type" -> raysys architecture (CNN2, ResCNN, Resnet18, ... have no raysys counterpart)
MODEL_TYPES = {"CNN": "cnn_s", "CNN3": "cnn_m", "MLP": "tetris_ffn"}
# raysys hyperparameter column -> params.json key
PARAM_KEYS = {
    "seed": "seed", "init": "model::init_type", "activation": "model::nlin", "optimizer": "optim::optimizer",
    "lr": "optim::lr", "weight_decay": "optim::wd", "dropout": "model::dropout", "batch_size": "training::batchsize",
}
# raysys metric column -> result.json keys, in the order tried (both spellings occur in published zoos)
METRIC_KEYS = {
    "train_loss": ("train_loss", "loss_train"), "train_acc": ("train_acc", "acc_train"),
    "val_loss": ("val_loss", "loss_val"), "val_acc": ("val_acc", "acc_val"),
    "test_loss": ("test_loss", "loss_test"), "test_acc": ("test_acc", "acc_test"),
}
DATASET_HINTS = (("fmnist", "fmnist"), ("fashion", "fmnist"), ("mnist", "mnist"), ("svhn", "svhn"),
                 ("cifar100", "cifar100"), ("cifar", "cifar10"), ("stl", "stl10"), ("usps", "usps"),
                 ("tetris", "tetris"))


class ImportFormatError(RaysysError):
    """A source zoo that cannot be imported as it is: the message names the file and the key."""


class RefusedPickle(ImportFormatError):
    """A checkpoint that ``torch.load(weights_only=True)`` refuses: never skipped, always an error."""


# --- reading one trial ----------------------------------------------------------------------------

@dataclass
class Trial:
    path: Path
    params: dict
    checkpoints: dict[int, Path]  # epoch -> .../checkpoint_N/checkpoints
    results: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def read_trial(path: Path) -> Trial:
    """One trial folder: its params.json (a RaysysError naming the file when it is not a JSON object), its
    checkpoint files by epoch and its result.json lines (lines that do not parse, e.g. the last line of a
    killed run, are left out)."""
    pfile = path / "params.json"
    try:
        params = json.loads(pfile.read_text())
    except (OSError, ValueError) as err:
        raise ImportFormatError(f"{pfile} is not readable JSON ({type(err).__name__}: {err})") from None
    if not isinstance(params, dict):
        raise ImportFormatError(f"{pfile} holds a JSON {type(params).__name__}, not an object of hyperparameters")
    checkpoints: dict[int, Path] = {}
    for d in sorted(path.iterdir(), key=lambda p: p.name):
        m = CHECKPOINT_DIR.match(d.name)
        if m and d.is_dir() and (d / CHECKPOINT_FILE).is_file():
            checkpoints.setdefault(int(m.group(1)), d / CHECKPOINT_FILE)
    results = []
    rfile = path / "result.json"
    if rfile.is_file():
        for line in rfile.read_text(errors="replace").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                results.append(row)
    return Trial(path, params, checkpoints, results)


def find_trials(src: Path) -> tuple[list[Path], list[Path]]:
    """(trial folders: subfolders holding params.json, in natural name order; other subfolders)."""
    if not src.is_dir():
        raise ImportFormatError(f"{src} is not a directory. Pass the unpacked zoo directory (one folder per model, "
                           f"each with params.json, result.json and checkpoint_N/ folders).")
    subdirs = [p for p in src.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
    trials = sorted((p for p in subdirs if (p / "params.json").is_file()), key=lambda p: _natural_key(p.name))
    others = sorted(p for p in subdirs if not (p / "params.json").is_file())
    if not trials:
        nested = [p for p in others if any((q / "params.json").is_file() for q in p.iterdir() if q.is_dir())]
        hint = f" Did you mean {nested[0]}?" if nested else ""
        raise ImportFormatError(f"{src} holds no trial folders (subfolders with a params.json).{hint}")
    return trials, others


def load_state_dict(path: Path) -> dict:
    """A checkpoint file as {key: tensor}, through ``torch.load(weights_only=True)``: a pickle that needs more
    than tensors and plain containers is refused with a RaysysError. Other read failures raise OSError."""
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        if "Weights only load failed" not in text:
            # a truncated or damaged file (RuntimeError from the zip reader, EOFError, ...)
            raise OSError(f"{type(err).__name__}: {first}") from None
        raise RefusedPickle(f"{path} is not a plain weights file: torch.load(weights_only=True) refused it ({first}). "
                            f"raysys never unpickles arbitrary objects; re-save the checkpoint as a state_dict of "
                            f"tensors, or remove this model from the zoo directory.") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ImportFormatError(f"{path} holds a {type(sd).__name__}, not a state_dict of tensors "
                                f"(module_list.N.weight, ...)")
    return sd


def state_dict_shapes(sd: dict) -> list[tuple[int, str, tuple[int, ...]]]:
    """(module index, 'weight'/'bias', shape) of every entry of a reference state_dict, in module order."""
    out = []
    for key, t in sd.items():
        m = STATE_KEY.match(key)
        if m is None:
            raise ImportFormatError(f"unexpected state_dict key '{key}' (the Model Zoos format has only "
                               f"module_list.N.weight and module_list.N.bias)")
        out.append((int(m.group(1)), m.group(2), tuple(t.shape)))
    return sorted(out, key=lambda e: (e[0], e[1] != "weight"))


def reference_keys(sd: dict) -> list[tuple[str, str | None]]:
    """The reference weight layers in module order: [(weight key, bias key or None)]."""
    groups: dict[int, set[str]] = {}
    for idx, kind, _ in state_dict_shapes(sd):
        groups.setdefault(idx, set()).add(kind)
    out = []
    for idx in sorted(groups):
        if "weight" not in groups[idx]:
            raise ImportFormatError(f"module_list.{idx}.bias has no module_list.{idx}.weight")
        out.append((f"module_list.{idx}.weight", f"module_list.{idx}.bias" if "bias" in groups[idx] else None))
    return out


def key_map(sd: dict, layout: architectures.Layout, where: str) -> dict[str, str]:
    """{raysys tensor name: reference key} for state_dict ``sd``; a RaysysError naming ``where`` and the key on
    any mismatch (layer count, a bias present on one side only, a shape)."""
    try:
        ref = reference_keys(sd)
    except ImportFormatError as err:
        raise ImportFormatError(f"{where}: {err}") from None
    layers = layout.layers
    if len(ref) != len(layers):
        raise ImportFormatError(f"{where}: {len(ref)} weight layers ({', '.join(w for w, _ in ref)}) but {layout.arch} has "
                           f"{len(layers)} ({', '.join(l.name for l in layers)}): another architecture. Pass --arch, or "
                           f"import a zoo of CNN-s (model::type CNN), CNN-m (CNN3) or the TETRIS FFN (MLP).")
    out = {}
    for (wkey, bkey), layer in zip(ref, layers):
        for key, name in ((wkey, layer.weight), (bkey, layer.bias)):
            if key is None and name is None:
                continue
            if key is None or name is None:
                have = f"'{key}'" if key is not None else f"no {wkey.rsplit('.', 1)[0]}.bias"
                want = f"'{name}'" if name is not None else f"no {layer.name}.bias"
                raise ImportFormatError(f"{where}: has {have} where {layout.arch} has {want}")
            want_shape = layout.tensor(name).shape
            have_shape = tuple(sd[key].shape)
            if have_shape != want_shape:
                raise ImportFormatError(f"{where}: key '{key}' has shape {list(have_shape)} but it maps to {layout.arch}'s "
                                   f"'{name}' of shape {list(want_shape)}")
            out[name] = key
    return out


def flatten_state_dict(sd: dict, layout: architectures.Layout, where: str) -> np.ndarray:
    """A reference state_dict -> raysys's flat float32 vector (layout order, each tensor in C order)."""
    mapping = key_map(sd, layout, where)
    parts = [sd[mapping[t.name]].detach().to("cpu").float().reshape(-1).numpy() for t in layout.tensors]
    return np.concatenate(parts).astype(np.float32, copy=False)


# --- what a zoo directory holds ---------------------------------------------------------------------

def infer_arch(params: dict, sd: dict, where: str, arch: str | None = None) -> tuple[str, int, int]:
    """(raysys architecture, input channels, classes) of a trial: ``arch``, else from ``model::type``, else from
    the shapes; channels and classes from the first and last weight layers."""
    mtype = {v: k for k, v in MODEL_TYPES.items()}[arch] if arch is not None else params.get("model::type")
    if mtype is not None and mtype not in MODEL_TYPES:
        raise ImportFormatError(f"{where}: model::type '{mtype}' has no raysys architecture. Supported: "
                           + ", ".join(f"{k} ({v})" for k, v in MODEL_TYPES.items()))
    shapes = [s for _, kind, s in state_dict_shapes(sd) if kind == "weight"]
    if not shapes:
        raise ImportFormatError(f"{where}: the state_dict has no weights")
    first, last = shapes[0], shapes[-1]
    if mtype is None:  # older zoos: recognize the architecture by its first layer
        if len(first) == 4 and first[0] == 8 and first[2:] == (5, 5):
            mtype = "CNN"
        elif len(first) == 4 and first[0] == 16 and first[2:] == (3, 3):
            mtype = "CNN3"
        elif len(first) == 2:
            mtype = "MLP"
        else:
            raise ImportFormatError(f"{where}: no model::type in params.json and a first layer of shape {list(first)} "
                               f"that is none of CNN-s, CNN-m, TETRIS FFN. Pass --arch.")
    arch = MODEL_TYPES[mtype]
    if arch == "tetris_ffn":
        in_channels = max(1, first[1] // 16) if len(first) == 2 else 1
    else:
        in_channels = first[1] if len(first) == 4 else 1
    return arch, int(in_channels), int(last[0])


def guess_dataset(src: Path, params: dict) -> str:
    text = f"{params.get('dataset::dump', '')} {params.get('training::data_path', '')} {src.name}".lower()
    for hint, name in DATASET_HINTS:
        if hint in text:
            return name
    return "unknown"


def hyperparameters(params: dict, where: str) -> dict:
    """The raysys hyperparameter columns of one model from its params.json."""
    from raysys.store import HYPERPARAMETERS

    out: dict[str, float | int | str | None] = {}
    for col, key in PARAM_KEYS.items():
        v = params.get(key)
        if v is None:
            out[col] = 0.0 if col == "dropout" else None
            continue
        kind = HYPERPARAMETERS[col]
        try:
            if str(kind) == "int64":
                out[col] = int(v)
            elif str(kind) == "double":
                out[col] = float(v)
            else:
                out[col] = str(v)
        except (TypeError, ValueError):
            raise ImportFormatError(f"{where}: key '{key}' is {v!r}, not a valid {col}") from None
    if out["activation"] is None:
        raise ImportFormatError(f"{where}: key 'model::nlin' (the activation) is missing")
    if out["activation"] not in architectures.ACTIVATIONS:
        raise ImportFormatError(f"{where}: key 'model::nlin' is '{out['activation']}', which raysys's architectures do not "
                           f"have (they have {', '.join(architectures.ACTIVATIONS)})")
    return out


def epoch_metrics(trial: Trial, epoch: int, positional_offset: int) -> dict[str, float]:
    """The metrics of ``epoch`` from result.json: the line whose ``training_iteration`` is the epoch (lines
    without one: by position, line i being epoch i + offset); NaN where absent."""
    row = None
    if trial.results and all("training_iteration" in r for r in trial.results):
        for r in trial.results:
            if _as_float(r.get("training_iteration")) == epoch:
                row = r
        # no line for the initialization in some zoos: then line k (training_iteration k + 1) is epoch k + 1
    elif 0 <= epoch - positional_offset < len(trial.results):
        row = trial.results[epoch - positional_offset]
    out = {}
    for col, keys in METRIC_KEYS.items():
        v = next((row[k] for k in keys if row is not None and k in row), None)
        out[col] = _as_float(v)
    out["ggap"] = _as_float(row.get("ggap")) if row is not None and "ggap" in row else out["train_acc"] - out["test_acc"]
    return out


def _as_float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


# --- the import ---------------------------------------------------------------------------------------

@dataclass
class Plan:
    arch: str
    in_channels: int
    num_classes: int
    first_epoch: int
    last_epoch: int
    trials: list[str]  # kept trial folder names, model_id order
    skipped: dict[str, str]  # trial name -> why


def _window(trials: list[Trial], epochs: int | None) -> tuple[int, int]:
    """(first, last) imported epoch: 0 when any model has its initialization saved, else the earliest; the last
    is ``epochs`` or the last epoch most models reached."""
    have = [t for t in trials if t.checkpoints]
    if not have:
        raise ImportFormatError("no trial folder has a checkpoint_N/checkpoints file")
    first = 0 if any(0 in t.checkpoints for t in have) else min(min(t.checkpoints) for t in have)
    if epochs is None:
        counts = Counter(max(t.checkpoints) for t in have)
        last = max(counts, key=lambda e: (counts[e], e))
    else:
        last = int(epochs)
    if last < first:
        raise ImportFormatError(f"--epochs {last} is before the first saved epoch {first}")
    return first, last


def _check_model(trial: Trial, layout, first: int, last: int) -> tuple[str | None, list[np.ndarray] | None]:
    """(why the model is skipped or None, its flat states for epochs first..last)."""
    states = []
    for e in range(first, last + 1):
        path = trial.checkpoints.get(e)
        if path is None:
            return f"no checkpoint_{e:06d}/{CHECKPOINT_FILE} (epochs {first}..{last} are imported)", None
        try:
            sd = load_state_dict(path)
        except OSError as err:
            return f"unreadable {path.parent.name}/{CHECKPOINT_FILE} ({err})", None
        w = flatten_state_dict(sd, layout, str(path))
        if not np.isfinite(w).all():
            return f"non-finite weights in {path.parent.name}/{CHECKPOINT_FILE}", None
        states.append(w)
    return None, states


def make_plan(src: Path, arch: str | None, epochs: int | None, skip_mismatched: bool, progress: bool) -> Plan:
    trial_dirs, _ = find_trials(src)
    trials = []
    skipped: dict[str, str] = {}
    for d in trial_dirs:
        try:
            trials.append(read_trial(d))
        except ImportFormatError as err:
            if not skip_mismatched:
                raise
            skipped[d.name] = str(err)
    first, last = _window(trials, epochs)
    # the architecture: --arch, else the first trial with a readable checkpoint
    detected = None
    for t in trials:
        for e in sorted(t.checkpoints):
            try:
                sd = load_state_dict(t.checkpoints[e])
            except OSError:
                continue
            detected = infer_arch(t.params, sd, str(t.checkpoints[e]), arch)
            break
        if detected is not None:
            break
    if detected is None:
        raise ImportFormatError(f"no checkpoint under {src} could be read")
    arch_name, in_channels, num_classes = detected
    layout = architectures.layout_of(arch_name, in_channels, num_classes)
    kept = []
    t0 = time.time()
    for i, t in enumerate(trials):
        try:
            hyperparameters(t.params, str(t.path / "params.json"))
            why, _ = _check_model(t, layout, first, last)
        except ImportFormatError as err:
            if not skip_mismatched or isinstance(err, RefusedPickle):  # a refused pickle always stops the import
                raise
            why = str(err)
        if why is None:
            kept.append(t.name)
        else:
            skipped[t.name] = why
        if progress and (time.time() - t0 > 10 or i + 1 == len(trials)):
            print(f"raysys zoo import-modelzoos: checked {i + 1}/{len(trials)} models", flush=True)
            t0 = time.time()
    if not kept:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3])
        raise ImportFormatError(f"no model of {src} can be imported ({len(skipped)} skipped: {reasons})")
    return Plan(arch_name, in_channels, num_classes, first, last, kept, skipped)


def _identity(src: Path, trial_names: list[str], options: dict) -> dict:
    import hashlib

    names = hashlib.sha256("\n".join(trial_names).encode()).hexdigest()
    return {"format": FORMAT, "source": str(src), "source_trials": len(trial_names), "source_trials_sha256": names,
            **options}


def _manifest(plan: Plan, identity: dict, name: str | None, dataset: dict, splits: list[str], shards: list[dict],
              status: str, split_seed: int) -> dict:
    from raysys.provenance import STORE_FORMAT

    layout = architectures.layout_of(plan.arch, plan.in_channels, plan.num_classes)
    return {
        "raysys_version": __version__, "name": name, "arch": plan.arch, "status": status, "store_format": STORE_FORMAT,
        "num_models": len(plan.trials), "epochs": plan.last_epoch, "first_epoch": plan.first_epoch,
        "num_params": layout.num_params, "layout": layout.to_dict(), "dataset": dataset, "config": None,
        "split_seed": split_seed, "split_counts": {s: splits.count(s) for s in ("train", "val", "test")},
        "splits": splits, "shards": shards,
        "imported": {**identity, "trials": plan.trials, "skipped": plan.skipped,
                     "hyperparameter_keys": PARAM_KEYS, "metric_keys": {k: list(v) for k, v in METRIC_KEYS.items()}},
    }


def _existing_import(out: Path, identity: dict) -> dict | None:
    """The manifest of this very import in ``out`` (resume), None when ``out`` is new; error otherwise."""
    from raysys.store import writer_manifest

    manifest = writer_manifest(out, "imported", "'raysys zoo import-modelzoos' did not write")
    if manifest is None:
        return None
    old = manifest["imported"]
    diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in identity.items() if old.get(k) != v and k != "source_trials_sha256"]
    if old.get("source_trials_sha256") != identity["source_trials_sha256"] and not diff:
        diff = ["the source's trial folders have changed"]
    if diff:
        raise ImportFormatError(f"--out {out} holds an import of {old.get('source')} made with other options or from "
                           f"another source ({'; '.join(diff)}). Rerun with the original options to resume it, or "
                           f"choose a new --out directory.")
    return manifest


def _shard_table(src: Path, plan: Plan, layout, model_ids: list[int], splits: list[str]):
    """The rows of the models ``model_ids`` (every imported epoch), read again from the source."""
    import pyarrow as pa

    from raysys.store import rows_table

    states, metrics, hparams = [], [], []
    for mid in model_ids:
        trial = read_trial(src / plan.trials[mid])
        why, w = _check_model(trial, layout, plan.first_epoch, plan.last_epoch)
        if why is not None or w is None:
            raise ImportFormatError(f"{trial.path}: {why}, but it was importable when this import was planned: the "
                                    f"source has changed. Import it into a new --out directory.")
        hparams.append(hyperparameters(trial.params, str(trial.path / "params.json")))
        offset = 0 if 0 in trial.checkpoints else 1
        states.append(w)
        metrics.append([epoch_metrics(trial, e, offset) for e in range(plan.first_epoch, plan.last_epoch + 1)])
    tables = []
    for j, e in enumerate(range(plan.first_epoch, plan.last_epoch + 1)):
        m = {k: np.asarray([metrics[i][j][k] for i in range(len(model_ids))], np.float64) for k in metrics[0][j]}
        t = rows_table(layout.num_params, model_ids, e, [splits[mid] for mid in model_ids],
                       np.stack([states[i][j] for i in range(len(model_ids))]), m, hparams)
        # diverged: a loss result.json reports as inf/NaN, not one it leaves out (every imported state is finite)
        loss = m["train_loss"]
        t = t.set_column(t.schema.get_field_index("diverged"), "diverged", pa.array(np.isinf(loss)))
        tables.append(t)
    return pa.concat_tables(tables).sort_by([("model_id", "ascending"), ("epoch", "ascending")])


def import_modelzoos(src: str | Path, out: str | Path, arch: str | None = None, epochs: int | None = None,
                     split_seed: int = 0, models_per_shard: int = 50, name: str | None = None,
                     dataset: str | None = None, skip_mismatched: bool = False, progress: bool = True) -> dict:
    """Import the Model Zoos directory ``src`` into the raysys zoo ``out``; returns a summary
    (``models``, ``skipped`` {trial: why}, ``shards_written``, ``shards_kept``, epochs)."""
    from raysys.integrity import check_output_dir
    from raysys.store import WriterLock, ZooWriter, clean_temp_files, open_zoo, quarantine_strays, splits_for

    src = Path(src).expanduser().resolve()
    out = check_output_dir(out).resolve()
    if models_per_shard < 1:
        raise ImportFormatError(f"--models-per-shard must be >= 1, got {models_per_shard}")
    if arch is not None and arch not in MODEL_TYPES.values():
        raise ImportFormatError(f"--arch {arch}: choose one of {', '.join(sorted(MODEL_TYPES.values()))}")
    trial_dirs, _ = find_trials(src)
    options = {"arch": arch, "epochs": epochs, "split_seed": int(split_seed), "models_per_shard": int(models_per_shard),
               "skip_mismatched": bool(skip_mismatched)}
    identity = _identity(src, [d.name for d in trial_dirs], options)
    _existing_import(out, identity)
    out.mkdir(parents=True, exist_ok=True)
    with WriterLock(out, "raysys zoo import-modelzoos"):
        existing = _existing_import(out, identity)  # again, now that no other writer can change it
        if existing is not None:  # resume: the plan the first run made
            imp = existing["imported"]
            plan = Plan(existing["arch"], existing["layout"]["in_channels"], existing["layout"]["num_classes"],
                        int(existing.get("first_epoch", 0)), int(existing["epochs"]), list(imp["trials"]),
                        dict(imp.get("skipped") or {}))
            record, splits, shards = existing["dataset"], existing["splits"], existing["shards"]
            shards = [{k: v for k, v in s.items() if k not in ("sha256", "rows")} for s in shards]
            zoo_name = existing.get("name")
        else:
            plan = make_plan(src, arch, epochs, skip_mismatched, progress)
            splits = splits_for(len(plan.trials), split_seed)
            ids = list(range(len(plan.trials)))
            shards = [{"shard": k, "model_ids": ids[i:i + models_per_shard]}
                      for k, i in enumerate(range(0, len(ids), models_per_shard))]
            first_params = read_trial(src / plan.trials[0]).params
            ds = dataset or guess_dataset(src, first_params)
            layout = architectures.layout_of(plan.arch, plan.in_channels, plan.num_classes)
            record = {"name": ds, "num_classes": plan.num_classes,
                      "shape": [plan.in_channels, layout.image_size, layout.image_size],
                      "source": f"{FORMAT} (www.modelzoos.cc): trained on the zoo's own data splits, not raysys's",
                      "dump": first_params.get("dataset::dump")}
            zoo_name = name or src.name
        writer = ZooWriter(out)
        layout = architectures.layout_of(plan.arch, plan.in_channels, plan.num_classes)
        if existing is not None:
            quarantine_strays(out, [int(s["shard"]) for s in shards])
        writer.write_manifest(_manifest(plan, identity, zoo_name, record, splits, shards, "running", split_seed))
        clean_temp_files(out)
        records, written, kept = {}, 0, 0
        for i, s in enumerate(shards):
            sid = int(s["shard"])
            done = writer.is_complete(sid)
            if done:
                kept += 1
            else:
                writer.write_shard(sid, _shard_table(src, plan, layout, s["model_ids"], splits), s["model_ids"])
                written += 1
            records[sid] = json.loads(writer.record_path(sid).read_text())
            if progress:
                print(f"raysys zoo import-modelzoos: shard {i + 1}/{len(shards)} "
                      f"{'kept (already complete)' if done else 'written'}", flush=True)
        shards = [{**s, "sha256": records[int(s["shard"])]["sha256"], "rows": records[int(s["shard"])]["rows"]}
                  for s in shards]
        writer.write_manifest(_manifest(plan, identity, zoo_name, record, splits, shards, "complete", split_seed))
        open_zoo(out)  # the result must read back as a zoo
    return {"source": str(src), "out": str(out), "arch": plan.arch, "models": len(plan.trials),
            "skipped": plan.skipped, "epochs": [plan.first_epoch, plan.last_epoch], "shards_written": written,
            "shards_kept": kept}


def reason_kind(why: str) -> str:
    """The kind of a skip reason, for the counts printed at the end."""
    for prefix, kind in (("no checkpoint", "missing checkpoint"), ("unreadable", "unreadable checkpoint"),
                         ("non-finite", "non-finite weights")):
        if why.startswith(prefix):
            return kind
    return "mismatched"


def _cmd_import(args) -> int:
    from raysys.store import open_zoo
    from raysys.zoo import format_summary, summarize

    t0 = time.time()
    s = import_modelzoos(args.src, args.out, arch=args.arch, epochs=args.epochs, split_seed=args.split_seed,
                         models_per_shard=args.models_per_shard, name=args.name, dataset=args.dataset,
                         skip_mismatched=args.skip_mismatched, progress=not args.no_progress)
    print(format_summary(summarize(open_zoo(s["out"]))))
    reasons = Counter(reason_kind(why) for why in s["skipped"].values())
    print(f"imported     {s['models']} models, epochs {s['epochs'][0]}..{s['epochs'][1]} "
          f"({s['shards_written']} shards written, {s['shards_kept']} already complete)")
    print(f"skipped      {len(s['skipped'])} models" + (": " + ", ".join(f"{n} {r}" for r, n in reasons.most_common())
                                                        if reasons else ""))
    for trial, why in list(s["skipped"].items())[:5]:
        print(f"  {trial}: {why}")
    if len(s["skipped"]) > 5:
        print(f"  ... (all of them in {Path(s['out'])}/__raysys__/manifest.json, key imported.skipped)")
    print(f"wall time    {time.time() - t0:.1f} s")
    print(f"zoo written to {s['out']}")
    return 0
