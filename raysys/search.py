"""Hyperparameter search over the hyper-representation autoencoder and its KDE sampler.

Ray Tune runs the trials, Optuna proposes them through a *define-by-run* space (so conditional
parameters, like attention heads that must divide the sampled ``d_model``, are drawn only from
valid values), ASHA stops weak single-objective trials early, and MLflow records one parent run
per search with one child run per trial.

Every objective is measured on the zoo's VALIDATION split (validation models, validation
images); the test split is never read here, so the search cannot select on test:

* ``recon_r2``   reconstruction R² of the validation models' weights (epoch window).
* ``probe_r2``   R² of a linear probe for the models' test accuracy: fitted on train-split
                 latents, scored on validation-split latents (the probe's ridge α is also picked
                 there, so this is a selection score, slightly optimistic, never a test number).
* ``sample_acc`` mean accuracy on the dataset's validation images of a population sampled with
                 the trial's KDE bandwidth / top fraction, decoded, at epoch 0 (no fine-tuning).

Layout of ``--out``::

    search_config.yaml   the resolved search config (a resume checks it is unchanged)
    state.json           MLflow parent run, tracking URI, zoo
    tune/search/         the Ray Tune experiment (trial checkpoints, searcher state)
    progress.json        live counts and best-so-far, rewritten as trials finish
    results.csv          one row per trial: parameters, objectives, status
    best_hyperrep.yaml   the best trial's autoencoder config (``raysys hyperrep train`` accepts it)
    best_sampler.yaml    the best trial's sampler settings
    best_model/          the best trial's trained autoencoder (its last checkpoint)
    pareto.csv           the Pareto-optimal trials (multi-objective searches)
    search.png           objective over trials, parameter importances, Pareto front
"""
from __future__ import annotations

import difflib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
import yaml
from pydantic import Field, model_validator

from raysys.config import Config, ConfigError, RaysysError, apply_overrides, read_yaml, validate
from raysys.hyperrep.config import HyperRepConfig
from raysys.store import atomic_write_bytes, atomic_write_json, jsonable, open_zoo

# --- the search space -------------------------------------------------------------------------

# Short names for the HyperRepConfig fields people search over; any dotted path into
# HyperRepConfig (e.g. "augment.erase_high") works too.
ALIASES = {
    "d_model": "model.d_model", "heads": "model.heads", "layers": "model.layers", "ff": "model.ff",
    "latent_dim": "model.latent_dim", "dropout": "model.dropout",
    "lr": "train.lr", "weight_decay": "train.weight_decay", "batch_size": "train.batch_size",
    "beta": "loss.beta", "temperature": "loss.temperature", "contrastive": "loss.contrastive",
    "lwln": "loss.lwln", "erase_p": "augment.erase_p", "noise_std": "augment.noise_std",
    "permute": "augment.permute",
}
SAMPLER_PARAMS = ("bandwidth", "top_fraction")
# Every objective is maximized.
OBJECTIVES = {"recon_r2": "val_recon_r2", "probe_r2": "val_probe_r2", "sample_acc": "val_sample_acc"}


class FloatRange(Config):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high}); swap them")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low}); set log: false or a positive low")
        return self

    def suggest(self, trial, name):
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def values(self):
        return None  # continuous

    def distribution(self):
        import optuna
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)


class IntRange(Config):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high}); swap them")
        if self.log and (self.low <= 0 or self.step != 1):
            raise ValueError("a log int range needs low > 0 and step 1; set log: false or fix low/step")
        return self

    def suggest(self, trial, name):
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def values(self):
        return list(range(self.low, self.high + 1, self.step))

    def distribution(self):
        import optuna
        return optuna.distributions.IntDistribution(self.low, self.high, log=self.log, step=self.step)


class Categorical(Config):
    type: Literal["categorical"]
    choices: list[Union[bool, int, float, str]] = Field(min_length=1)

    def suggest(self, trial, name):
        return trial.suggest_categorical(name, self.choices)

    def values(self):
        return list(self.choices)

    def distribution(self):
        import optuna
        return optuna.distributions.CategoricalDistribution(self.choices)


Param = Annotated[Union[FloatRange, IntRange, Categorical], Field(discriminator="type")]


class Resources(Config):
    cpu: float = Field(1.0, gt=0, description="CPUs per trial (also the torch thread count)")
    gpu: float = Field(0.0, ge=0, description="GPUs per trial; fractions share one GPU between trials")
    max_failures: int = Field(2, ge=0, description="restarts of a trial whose worker dies (a preempted node); "
                                                   "the trial resumes from its last checkpoint")


class Asha(Config):
    enabled: bool = Field(True, description="early stopping; single-objective searches only")
    grace_period: int = Field(1, gt=0, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0)


class SamplerDefaults(Config):
    """Sampler settings used when the space does not search them."""

    bandwidth: Union[float, Literal["scott", "silverman"]] = "scott"
    top_fraction: float = Field(0.3, gt=0.0, le=1.0)
    num_models: int = Field(16, gt=0, description="models sampled per evaluation of sample_acc")


class MlflowSettings(Config):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    experiment: str = "raysys-search"


class SearchConfig(Config):
    base_config: str | None = Field(None, description="a hyperrep YAML the trials start from (relative to this file)")
    base: dict[str, Any] = Field(default_factory=dict, description="HyperRepConfig overrides on top of base_config")
    space: dict[str, Param] = Field(min_length=1)
    sampler: SamplerDefaults = SamplerDefaults()
    objectives: list[str] = Field(["recon_r2"], min_length=1)
    num_samples: int = Field(8, gt=0, description="number of trials")
    max_concurrent: int = Field(2, gt=0)
    resources: Resources = Resources()
    asha: Asha = Asha()
    eval_every: int = Field(1, gt=0, description="epochs between objective evaluations (the last epoch always counts)")
    data_root: str | None = Field(None, description="where on-disk image datasets live (mnist, cifar10, ...), for sample_acc")
    seed: int = Field(0, ge=0)
    mlflow: MlflowSettings = MlflowSettings()

    @model_validator(mode="after")
    def _check(self):
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown:
            raise ValueError(f"unknown objective(s) {unknown}; choose from {list(OBJECTIVES)}")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives {self.objectives} repeat a name; list each once")
        for name in self.space:
            if name in SAMPLER_PARAMS:
                continue
            try:
                hyperrep_path(name)
            except KeyError as err:
                raise ValueError(str(err.args[0])) from None
        if "top_fraction" in self.space:
            spec = self.space["top_fraction"]
            vals = [spec.low, spec.high] if isinstance(spec, FloatRange) else spec.values()
            if any(not isinstance(v, (int, float)) or not 0 < v <= 1 for v in vals):
                raise ValueError("space.top_fraction must stay within (0, 1]")
        if "bandwidth" in self.space and isinstance(self.space["bandwidth"], FloatRange) and self.space["bandwidth"].low < 0:
            raise ValueError("space.bandwidth must be >= 0")
        return self

    @property
    def metrics(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

    @property
    def primary(self) -> str:
        return self.metrics[0]


def hyperrep_path(name: str) -> str:
    """The dotted HyperRepConfig path of a space key; KeyError with a suggestion when unknown."""
    path = ALIASES.get(name, name)
    node: Any = HyperRepConfig
    for part in path.split("."):
        fields = getattr(node, "model_fields", None)
        if fields is None or part not in fields:
            known = sorted([*ALIASES, *SAMPLER_PARAMS])
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" — did you mean '{close[0]}'?" if close else ""
            raise KeyError(f"unknown search parameter '{name}'{hint} Use one of {', '.join(known)}, "
                           f"or a dotted HyperRepConfig path such as 'augment.erase_high'")
        node = fields[part].annotation
    if isinstance(node, type) and hasattr(node, "model_fields"):
        raise KeyError(f"search parameter '{name}' names a whole section ({path}); name one of its fields")
    return path


def space_key(search: SearchConfig, path: str) -> str | None:
    """The space key that searches HyperRepConfig field ``path`` (alias or dotted path), if any."""
    return next((k for k in search.space if k not in SAMPLER_PARAMS and hyperrep_path(k) == path), None)


def set_path(data: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


class DefineByRun:
    """Optuna define-by-run space: ``space(trial) -> {"hyperrep": {...}, "sampler": {...}}``.

    ``heads`` is drawn after ``d_model`` among the choices that divide it, under a parameter
    name per d_model (``heads|d_model=64``): Optuna forbids one name with changing choices.
    A plain picklable object, because Tune saves the searcher (and so this) with the experiment.
    """

    def __init__(self, search: SearchConfig, base: HyperRepConfig):
        self.space = dict(search.space)
        self.d_key, self.h_key = space_key(search, "model.d_model"), space_key(search, "model.heads")
        self.base_d, self.base_h = base.model.d_model, base.model.heads
        self.heads_values = self.space[self.h_key].values() if self.h_key else [self.base_h]
        self.d_values = self.space[self.d_key].values() if self.d_key else [self.base_d]
        order = [k for k in self.space if k != self.h_key]
        self.order = order + ([self.h_key] if self.h_key else [])

    def check(self) -> None:
        if self.d_key and self.d_values is None:
            raise ConfigError(f"space.{self.d_key} must be an int range or categorical (it is a width), not a float range.")
        if self.h_key and self.heads_values is None:
            raise ConfigError(f"space.{self.h_key} must be an int range or categorical, not a float range.")
        for key, values in ((self.d_key, self.d_values), (self.h_key, self.heads_values)):
            wrong = [v for v in values or [] if not isinstance(v, int) or isinstance(v, bool) or v < 1] if key else []
            if wrong:
                raise ConfigError(f"space.{key} must hold positive integers (it is a width or a head count), "
                                  f"got {', '.join(map(repr, wrong))}. Fix its choices (or low/high).")
        bad = [d for d in self.d_values if not self.valid_heads(d)]
        if bad:
            shown = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
            heads = ", ".join(map(str, self.heads_values))
            raise ConfigError(
                f"no heads choice ({heads}) divides d_model value(s) {shown}. Attention heads must divide d_model: "
                f"make d_model a categorical of multiples of the heads (e.g. choices [32, 64, 128]) or give an int "
                f"range a step that is a multiple of them, or add 1 to the heads choices.")

    def valid_heads(self, d_model: int) -> list:
        return [h for h in self.heads_values
                if isinstance(h, int) and not isinstance(h, bool) and h > 0 and d_model % h == 0]

    def __call__(self, trial) -> dict:
        hyperrep, sampler = {}, {}
        d_model = self.base_d
        for key in self.order:
            if key == self.h_key:
                valid = self.valid_heads(d_model)
                name = key if not self.d_key else f"{key}|d_model={d_model}"
                value = trial.suggest_categorical(name, valid)
            else:
                value = self.space[key].suggest(trial, key)
            if key == self.d_key:
                d_model = value
            if key in SAMPLER_PARAMS:
                sampler[key] = value
            else:
                hyperrep[key] = value
        return {"hyperrep": hyperrep, "sampler": sampler}

    def distributions(self) -> dict:
        """One distribution per space key (heads over all its choices), to rebuild a study."""
        import optuna
        out = {k: spec.distribution() for k, spec in self.space.items()}
        if self.h_key:
            out[self.h_key] = optuna.distributions.CategoricalDistribution(self.heads_values)
        return out


def base_hyperrep(search: SearchConfig, config_dir: Path | None = None) -> HyperRepConfig:
    """The fixed HyperRepConfig every trial starts from: ``base_config`` file, then ``base``."""
    data: dict = {}
    if search.base_config:
        path = Path(search.base_config)
        if not path.is_absolute() and config_dir is not None and (config_dir / path).exists():
            path = config_dir / path  # relative to the search config, like an include
        data = read_yaml(path)
    data = _merge(data, search.base)
    return validate(HyperRepConfig, data, source=f"search base ({search.base_config or 'inline'})")


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def trial_hyperrep(base: HyperRepConfig, params: dict) -> HyperRepConfig:
    data = base.model_dump(mode="json")
    for key, value in params.items():
        set_path(data, hyperrep_path(key), value)
    return validate(HyperRepConfig, data, source="trial parameters")


def trial_sampler(search: SearchConfig, params: dict) -> dict:
    return {"bandwidth": params.get("bandwidth", search.sampler.bandwidth),
            "top_fraction": params.get("top_fraction", search.sampler.top_fraction),
            "num_models": search.sampler.num_models}


def load_search(path: str | Path, overrides: list[str] | None = None) -> tuple[SearchConfig, HyperRepConfig]:
    """Read and fully validate a search config, including the space against its base."""
    path = Path(path)
    search = validate(SearchConfig, apply_overrides(read_yaml(path), overrides), source=str(path))
    return search, check_search(search, path.parent)


def check_search(search: SearchConfig, config_dir: Path | None = None) -> HyperRepConfig:
    """Check the space against the base config; every range end and choice must make a valid trial."""
    base = base_hyperrep(search, config_dir)
    space = DefineByRun(search, base)
    space.check()
    for key, spec in search.space.items():
        if key in SAMPLER_PARAMS or key in (space.d_key, space.h_key):
            continue
        for value in ([spec.low, spec.high] if isinstance(spec, (FloatRange, IntRange)) else spec.values()):
            try:
                trial_hyperrep(base, {key: value})
            except ConfigError as err:
                raise ConfigError(f"space.{key} allows {value!r}, which the autoencoder config rejects:\n{err}\n"
                                  f"Narrow the range of space.{key}.") from None
    for d in space.d_values:
        for h in space.valid_heads(d)[:1]:
            trial_hyperrep(base, {k: v for k, v in ((space.d_key, d), (space.h_key, h)) if k})
    return base


def resolved(search: SearchConfig, base: HyperRepConfig) -> SearchConfig:
    """The search with its base config inlined: self-contained, so a resume needs no other file."""
    return search.model_copy(update={"base_config": None, "base": base.model_dump(mode="json")})


# --- objectives (validation split only) -------------------------------------------------------

R2_FLOOR = -1.0  # R² below this (or undefined) is reported as this: finite values keep Optuna's TPE well-behaved


class Objectives:
    """The validation objectives of an autoencoder on one zoo; the zoo rows are read once per trial.

    Rows are the zoo states inside the autoencoder's epoch window (its training data), as in 000 §4.1.
    """

    def __init__(self, zoo_dir: str | Path, hyperrep: HyperRepConfig, sampler: dict, objectives: list[str],
                 seed: int = 0, data_root: str | None = None):
        from raysys.hyperrep.data import usable_states

        zoo = open_zoo(zoo_dir)
        self.layout, self.objectives, self.sampler, self.seed = zoo.layout, objectives, sampler, seed
        self.epochs = window_epochs(zoo, hyperrep)
        self.w_val, f_val = usable_states(zoo, self.epochs, ["val"])
        if len(self.w_val) == 0:
            raise RaysysError(f"zoo {zoo_dir} has no usable validation-split models at epochs {self.epochs}; "
                              f"the search scores on the validation split. Use a zoo with more models.")
        self.y_val = f_val["test_acc"].to_numpy()
        if {"probe_r2", "sample_acc"} & set(objectives):
            self.w_train, f_train = usable_states(zoo, self.epochs, ["train"])
            self.y_train = f_train["test_acc"].to_numpy()
            self.val_acc_train = f_train["val_acc"].to_numpy()  # the sampler's top fraction ranks by validation accuracy
            self.activation = f_train["activation"].mode().iloc[0]
        if "sample_acc" in objectives:
            import dataclasses
            from raysys.store import zoo_dataset
            data = zoo_dataset(zoo.manifest, data_root)
            # accuracies() scores the "test" images of the data it gets: hand it the validation images.
            self.val_images = dataclasses.replace(data, x_test=data.x_val, y_test=data.y_val)

    def __call__(self, hr) -> dict[str, float]:
        from raysys.hyperrep.evaluate import accuracies, decode, encode, reconstruction_r2
        from raysys.populations.samplers import KDESampler
        from raysys.probes import LinearProbe

        out = {}
        if "recon_r2" in self.objectives:
            w_hat = decode(hr, encode(hr, self.w_val))
            out["val_recon_r2"] = _floor(reconstruction_r2(self.w_val, w_hat, self.layout)["overall"])
        if "probe_r2" in self.objectives or "sample_acc" in self.objectives:
            z_train = encode(hr, self.w_train)
        if "probe_r2" in self.objectives:
            z_val = encode(hr, self.w_val)
            probe = LinearProbe(validation_data=(z_val, self.y_val)).fit(z_train, self.y_train)
            out["val_probe_r2"] = _floor(probe.score(z_val, self.y_val))
        if "sample_acc" in self.objectives:
            kde = KDESampler(self.sampler["bandwidth"], self.sampler["top_fraction"], random_state=self.seed)
            z = kde.fit(z_train, self.val_acc_train).sample(self.sampler["num_models"])
            weights = decode(hr, z)
            acc = accuracies(self.layout, weights, [self.activation] * len(weights), self.val_images)
            out["val_sample_acc"] = float(np.mean(acc))
        return out


def window_epochs(zoo, hyperrep: HyperRepConfig) -> list[int]:
    from raysys.hyperrep.data import window_epochs as stored_window

    return stored_window(zoo, hyperrep.train.epoch_window, "val",
                         "Set base.train.epoch_window to epochs it stores, e.g. --set 'base.train.epoch_window=[E,E]' "
                         "with E its last epoch ('raysys zoo info ZOO' lists them).")


def _floor(value: float) -> float:
    return R2_FLOOR if not np.isfinite(value) else max(float(value), R2_FLOOR)


# --- one trial (runs in a Ray worker) ---------------------------------------------------------

STATE = "trial_state.json"  # in every trial checkpoint: epoch, objectives, whether training finished


def run_trial(config: dict, search: dict | SearchConfig, zoo_dir: str, tracking: dict) -> None:
    """Train one autoencoder, report objectives to Tune each evaluation epoch with a checkpoint.

    ``config`` is what :class:`DefineByRun` returned (plus Optuna's raw parameter names, ignored).
    The trial's MLflow child run is hyperrep.train's own run: created here under the search's
    parent and handed to train (``mlflow_run_id``), so it holds the full autoencoder params,
    learning curves and checkpoint, plus the objectives logged below. A trial restored by Tune
    (``Tuner.restore``) continues from its last checkpoint: ``train(..., resume=True)`` picks up the
    resume state in it, so the same MLflow run gets each epoch once.
    """
    import mlflow
    import ray.tune
    import torch

    from raysys.hyperrep.model import HyperRepresentation
    from raysys.hyperrep.train import last_logged_step, train

    search = SearchConfig.model_validate(search)
    torch.set_num_threads(max(1, int(search.resources.cpu)))
    hyperrep = trial_hyperrep(HyperRepConfig.model_validate(search.base), config["hyperrep"])
    if search.resources.gpu > 0 and hyperrep.train.device == "auto":
        hyperrep = hyperrep.model_copy(update={"train": hyperrep.train.model_copy(update={"device": "cuda"})})
    sampler = trial_sampler(search, config["sampler"])
    trial_id = ray.tune.get_context().get_trial_id()
    run_id = child_run(tracking, trial_id, sampler)
    if run_id is None:  # child_run(create=True) always finds or creates one
        raise RaysysError(f"no MLflow run for trial {trial_id}")
    objectives = Objectives(zoo_dir, hyperrep, sampler, search.objectives, seed=search.seed, data_root=search.data_root)

    work = Path(tempfile.mkdtemp(prefix="raysys-search-")) / f"trial-{trial_id}"
    try:
        restored, state = ray.tune.get_checkpoint(), None
        if restored is not None:
            with restored.as_directory() as d:
                state = json.loads((Path(d) / STATE).read_text())
                if state.get("completed"):  # interrupted after training ended: report the result again
                    ray.tune.report(state["result"], checkpoint=restored)
                    return
                # Cut off mid-training: the checkpoint holds train's resume state (written before every
                # report), so training continues after the checkpoint's epoch instead of from epoch 1.
                shutil.copytree(d, work, dirs_exist_ok=True)

        last: dict[str, Any] = {"ckpt_epoch": None, "values": {}, "result": None if state is None else state["result"]}
        # Tune registers a trial's checkpoint a moment after its result, so an interruption in between
        # restores an epoch older than the last one reported; train redoes the epochs after it (to the
        # same state, on the CPU). Those were reported and logged already (train logs val_rec to the
        # trial's run before each report): not again.
        # Also without a checkpoint: a trial cut off before its first checkpoint was registered starts again at
        # epoch 1, and its run may already hold epoch 1.
        seen = last_logged_step(tracking["tracking_uri"], run_id, "val_rec")

        def evaluate(epoch: int) -> dict:
            if not (work / "config.json").exists():  # no checkpoint yet (validation loss never finite)
                return {}
            hr = HyperRepresentation.load(work)  # the best-so-far checkpoint (train keeps the best by val rec)
            if hr.meta.get("epoch") != last["ckpt_epoch"]:
                last["values"], last["ckpt_epoch"] = objectives(hr), hr.meta.get("epoch")
            return last["values"]

        def report(epoch: int, metrics: dict) -> None:
            result = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            result.update(epoch=epoch, completed=0)
            if epoch <= seen:
                last["result"] = result
                return
            if epoch % search.eval_every == 0 or epoch == hyperrep.train.epochs:
                values = evaluate(epoch)
                result.update(values)
                mlflow.log_metrics({k: v for k, v in values.items() if math.isfinite(v)}, step=epoch)
            _report(result, work)
            last["result"] = result

        train(hyperrep, zoo_dir, work, tracking_uri=tracking["tracking_uri"], experiment=tracking["experiment"],
              report=report, progress=False, resume=restored is not None, mlflow_run_id=run_id)
        final = dict(last["result"], completed=1)
        final.update(evaluate(final["epoch"]))  # early stop (patience) may end between evaluations
        _report(final, work)
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)


def child_run(tracking: dict, trial_id: str, sampler: dict | None = None, create: bool = True) -> str | None:
    """The MLflow child run of a trial under the search's parent run: found by tag (a resumed
    trial keeps its run), else created with the sampler settings as params."""
    from raysys.tracking import PARENT_TAG, client as mlflow_client, new_run

    uri = live_uri(tracking["tracking_uri"])
    found = mlflow_client(uri).search_runs([tracking["experiment_id"]], filter_string=(
        f"tags.raysys_trial_id = '{trial_id}' and tags.`{PARENT_TAG}` = '{tracking['parent_run_id']}'"))
    if found or not create:
        return found[0].info.run_id if found else None
    _, run_id = new_run(uri, run_name=f"trial-{trial_id}", exp_id=tracking["experiment_id"],
                        parent=tracking["parent_run_id"],
                        tags={"raysys_trial_id": trial_id, "raysys.stage": "search-trial"},
                        params={f"sampler.{k}": str(v) for k, v in (sampler or {}).items()})
    return run_id


def _report(result: dict, work: Path) -> None:
    import ray.tune

    atomic_write_json(work / STATE, {"completed": bool(result.get("completed")), "result": result})
    ray.tune.report(result, checkpoint=ray.tune.Checkpoint.from_directory(str(work)))


# --- driver side: Tune callbacks for progress and MLflow ----------------------------------------

def _trial_status(trial, max_epochs: int) -> str:
    """pending / running / completed / pruned (stopped early by ASHA) / errored."""
    from ray.tune.experiment import Trial

    if trial.status == Trial.ERROR:
        return "errored"
    if trial.status == Trial.TERMINATED:
        return _finished_status(trial, max_epochs)
    if trial.status == Trial.RUNNING:
        return "running"
    return "pending"


def _finished_status(trial, max_epochs: int) -> str:
    """completed (trained to the end) or pruned (stopped early by the scheduler), for a trial that
    ended. ASHA also stops trials that reach max_t, before their final report: those completed."""
    last = trial.last_result or {}
    return "completed" if last.get("completed") or last.get("epoch", 0) >= max_epochs else "pruned"


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"  # Tune's default repeats every parameter and outgrows path limits


_PROGRESS = {"show": True}


def _show_progress() -> bool:
    """Read at each trial event, so a resumed search (whose callbacks Tune restores) follows --no-progress too."""
    return _PROGRESS["show"]


def _make_callbacks(out: str, search: SearchConfig, max_epochs: int, tracking: dict):
    from ray.tune import Callback

    class Progress(Callback):
        """One compact line per trial event, and ``progress.json`` for tools that poll."""

        def __init__(self):
            self.best: tuple[float, str] | None = None
            self.started = time.time()

        def setup(self, **info):
            self.started = time.time()  # also on resume: elapsed time of this run

        def _update(self, trials, trial, event: str, final: str | None = None):
            # Tune calls on_trial_complete/error before it updates the trial's status: pass it in.
            counts = {s: 0 for s in ("completed", "pruned", "running", "pending", "errored")}
            for t in trials:
                counts[final if final and t is trial else _trial_status(t, max_epochs)] += 1
            # Best latest value: what the results table will say, not a value a trial reported and lost.
            reported = [((t.last_result or {}).get(search.primary), t.trial_id) for t in trials]
            latest = [(float(v), tid) for v, tid in reported if v is not None and np.isfinite(v)]
            self.best = max(latest) if latest else None
            done = counts["completed"] + counts["pruned"] + counts["errored"]
            best = f"best {search.primary}={self.best[0]:.4f} ({self.best[1]})" if self.best else "best -"
            if _show_progress():
                print(f"[search] {time.time() - self.started:6.0f}s {event:<9} {trial.trial_id}  done {done}/"
                      f"{search.num_samples} (pruned {counts['pruned']}, errored {counts['errored']}), "
                      f"running {counts['running']} | {best}", flush=True)
            atomic_write_json(Path(out) / "progress.json",
                              {**counts, "done": done, "num_samples": search.num_samples, "metric": search.primary,
                               "best": None if self.best is None else {"value": self.best[0], "trial_id": self.best[1]},
                               "time": time.time()})

        def on_trial_start(self, iteration, trials, trial, **info):
            self._update(trials, trial, "started", "running")

        def on_trial_complete(self, iteration, trials, trial, **info):
            status = _finished_status(trial, max_epochs)
            self._update(trials, trial, status, status)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._update(trials, trial, "errored", "errored")

    class MlflowStatus(Callback):
        """Ends each trial's child run with its outcome. The trial logs everything else; the run's
        ``raysys.status`` tag (completed / pruned / errored) is the outcome as the driver saw it."""

        def _finish(self, trial, status: str, run_status: str):
            from raysys.tracking import client as mlflow_client

            run_id = child_run(tracking, trial.trial_id, create=False)
            if run_id is None:  # the trial failed before it could create its run
                return
            c = mlflow_client(live_uri(tracking["tracking_uri"]))
            c.set_tag(run_id, "raysys.status", status)
            c.set_terminated(run_id, run_status)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._finish(trial, _finished_status(trial, max_epochs), "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._finish(trial, "errored", "FAILED")

    return [Progress(), MlflowStatus()]


def _optuna_searcher(search: SearchConfig, space: DefineByRun):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    class Searcher(OptunaSearch):
        # Intermediate results between evaluation epochs carry no objective; Optuna only sees the rest.
        def on_trial_result(self, trial_id, result):
            if isinstance(self.metric, str) and self.metric not in result:
                return
            super().on_trial_result(trial_id, result)

    multi = len(search.metrics) > 1
    searcher = Searcher(space=space, metric=search.metrics if multi else search.primary,
                        mode=["max"] * len(search.metrics) if multi else "max", seed=search.seed)
    return ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent)


def _scheduler(search: SearchConfig, max_epochs: int):
    """ASHA on the single objective; multi-objective searches run every trial to the end (ASHA
    ranks trials on one number, which a Pareto front does not give)."""
    if len(search.metrics) > 1 or not search.asha.enabled:
        return None
    from ray.tune.schedulers import ASHAScheduler
    return ASHAScheduler(time_attr="epoch", metric=search.primary, mode="max", max_t=max_epochs,
                         grace_period=min(search.asha.grace_period, max_epochs),
                         reduction_factor=search.asha.reduction_factor)


def _max_epochs(search: SearchConfig, base: HyperRepConfig) -> int:
    """The longest a trial can train: ASHA's max_t."""
    key = space_key(search, "train.epochs")
    return base.train.epochs if key is None else int(max(search.space[key].values()))


def _ensure_ray(search: SearchConfig, address: str | None = None) -> None:
    import ray

    from raysys.runtime import init_ray

    init_ray(address, log_to_driver=False)  # a Ray this process already joined is used as is
    have = ray.cluster_resources()
    if search.resources.gpu > 0 and have.get("GPU", 0) < search.resources.gpu:
        raise RaysysError(f"resources.gpu={search.resources.gpu} per trial but the Ray cluster has "
                          f"{have.get('GPU', 0)} GPUs, so no trial could start. Use --set resources.gpu=0 here.")
    if have.get("CPU", 0) < search.resources.cpu:
        raise RaysysError(f"resources.cpu={search.resources.cpu} per trial but the Ray cluster has "
                          f"{have.get('CPU', 0)} CPUs. Use e.g. --set resources.cpu=1.")


# masked URI -> the URI with its password, in this (the driver's) process only: never written to disk
_LIVE_URIS: dict[str, str] = {}


def live_uri(uri: str) -> str:
    """The URI to talk to for one that may be masked (a callback's, restored from tuner.pkl)."""
    from raysys.tracking import with_credentials

    return _LIVE_URIS.get(uri) or with_credentials(uri)


def write_state(out: Path, state: dict) -> None:
    """``OUT/state.json``: the search's MLflow parent run, its tracking URI without the password (a resume takes
    it from the URI passed again or from $MLFLOW_TRACKING_USERNAME/PASSWORD, :func:`raysys.tracking.with_credentials`)."""
    from raysys.tracking import mask_secrets

    atomic_write_json(out / "state.json", mask_secrets(state))


def _start_parent(search: SearchConfig, tracking_uri: str, out: Path, zoo_dir: str) -> dict:
    from raysys.tracking import experiment_id, new_run

    exp_id = experiment_id(tracking_uri, search.mlflow.experiment)
    c, run_id = new_run(tracking_uri, run_name=f"search-{out.name}", exp_id=exp_id,
                        tags={"raysys.stage": "search", "raysys.out": str(out), "raysys.zoo": zoo_dir},
                        params={"search": search.model_dump(mode="json", exclude={"base"}), "zoo": zoo_dir})
    c.log_dict(run_id, search.base, "base_hyperrep.json")
    return {"tracking_uri": tracking_uri, "experiment_id": exp_id, "parent_run_id": run_id, "zoo": zoo_dir}


# --- the search ---------------------------------------------------------------------------------

def run_search(search: SearchConfig, zoo_dir: str | Path, out_dir: str | Path, resume: bool = False,
               tracking_uri: str | None = None, config_dir: Path | None = None, address: str | None = None,
               progress: bool = True) -> dict:
    """Run (or resume) a search; write the outputs listed in the module docstring; return a summary.

    ``tracking_uri``: the config's ``mlflow.tracking_uri``, else :func:`raysys.tracking.resolve_tracking_uri`'s
    default (``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``); a resume keeps the search's own.
    ``address``: the Ray to run on (:func:`raysys.runtime.init_ray`). ``progress`` False: no line per trial event.
    """
    from ray import tune

    from raysys.tracking import client as mlflow_client, mask_secrets, mask_uri, resolve_tracking_uri, with_credentials

    if "://" in str(out_dir):
        raise RaysysError(f"--out {out_dir}: the search writes through the filesystem. Use a local path, or on a "
                          f"cluster a path on storage every node mounts (e.g. /mnt/shared/search/NAME).")
    out, zoo_dir = Path(out_dir).resolve(), str(Path(zoo_dir).resolve())
    exp_path = out / "tune" / "search"
    base = check_search(search, config_dir)
    search = resolved(search, base)
    saved = out / "search_config.yaml"
    if resume:
        if not (tune.Tuner.can_restore(str(exp_path)) and (out / "state.json").exists()):
            raise RaysysError(f"--resume: no search to resume in {out}. Run without --resume to start one.")
        previous = validate(SearchConfig, read_yaml(saved), source=str(saved))
        masked = validate(SearchConfig, mask_secrets(search.model_dump(mode="json")))  # as saved
        if previous != masked:
            changed = sorted(k for k in type(search).model_fields if getattr(previous, k) != getattr(masked, k))
            raise RaysysError(f"--resume: the search config differs from the one {out} was started with "
                              f"(changed: {', '.join(changed)}). Resume with the original config ({saved}), "
                              f"or start a new search with another --out.")
        state = json.loads((out / "state.json").read_text())
        # stored without its password: from the URI passed again, or $MLFLOW_TRACKING_USERNAME/PASSWORD
        state["tracking_uri"] = with_credentials(state["tracking_uri"], tracking_uri or search.mlflow.tracking_uri)
        write_state(out, state)  # a state.json of a raysys that kept the password: masked from now on
        if state["zoo"] != zoo_dir:
            raise RaysysError(f"--resume: this search ran on zoo {state['zoo']}, not {zoo_dir}. Pass --zoo {state['zoo']}.")
    else:
        if exp_path.exists():
            raise RaysysError(f"{out} already holds a search. Add --resume to continue it, or choose a new --out.")
        window_epochs(open_zoo(zoo_dir), base)  # a wrong window fails here, not in every trial
        uri = resolve_tracking_uri(tracking_uri or search.mlflow.tracking_uri)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(saved, yaml.safe_dump(mask_secrets(search.model_dump(mode="json")), sort_keys=False).encode())
        state = _start_parent(search, uri, out, zoo_dir)
        write_state(out, state)

    _ensure_ray(search, address)
    _PROGRESS["show"] = progress
    space = DefineByRun(search, base)
    max_epochs = _max_epochs(search, base)
    tracking = {**{k: state[k] for k in ("tracking_uri", "experiment_id", "parent_run_id")},
                "experiment": search.mlflow.experiment}
    _LIVE_URIS[mask_uri(state["tracking_uri"])] = state["tracking_uri"]
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, search=search.model_dump(mode="json"), zoo_dir=zoo_dir, tracking=tracking),
        {"cpu": search.resources.cpu, "gpu": search.resources.gpu})
    client = mlflow_client(state["tracking_uri"])
    client.update_run(state["parent_run_id"], "RUNNING")
    # A checkpoint per evaluation forces an experiment snapshot (num_to_keep=1): intended, not a warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started = time.time()
    if resume:
        print(f"[search] resuming {exp_path}", flush=True)
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=_optuna_searcher(search, space), scheduler=_scheduler(search, max_epochs),
                                        num_samples=search.num_samples, trial_dirname_creator=_trial_dirname,
                                        reuse_actors=True),  # no process start + imports per trial
            run_config=tune.RunConfig(
                name=exp_path.name, storage_path=str(exp_path.parent), verbose=0,
                # the callbacks are pickled into the experiment's tuner.pkl: they hold the masked URI
                callbacks=_make_callbacks(str(out), search, max_epochs,
                                          {**tracking, "tracking_uri": mask_uri(tracking["tracking_uri"])}),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=search.resources.max_failures)))
    try:
        tuner.fit()  # results are read back from the experiment state, which holds earlier runs' trials too
    except BaseException:
        client.set_terminated(state["parent_run_id"], "FAILED")
        raise
    summary = summarize(search, base, space, out, max_epochs)
    summary["wall_seconds_this_run"] = time.time() - started
    _finish_parent(client, state, summary, out)
    return summary


# --- results, exports, plot ---------------------------------------------------------------------

def summarize(search: SearchConfig, base: HyperRepConfig, space: DefineByRun, out: Path, max_epochs: int) -> dict:
    """Results table, best trial, Pareto front, exported configs and the plot, from the Tune experiment."""
    import pandas as pd
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(out / "tune" / "search")).trials
    rows = []
    for index, trial in enumerate(trials):
        last = trial.last_result or {}
        config = trial.config or {}
        rows.append({"trial": index, "trial_id": trial.trial_id, "status": _trial_status(trial, max_epochs),
                     "epochs": last.get("epoch"),
                     **{k: v for k, v in (config.get("hyperrep") or {}).items()},
                     **{k: v for k, v in (config.get("sampler") or {}).items()},
                     **{m: last.get(m) for m in search.metrics}})
    frame = pd.DataFrame(rows)
    atomic_write_bytes(out / "results.csv", frame.to_csv(index=False).encode())

    finished = frame[frame["status"].isin(["completed", "pruned"])].dropna(subset=search.metrics) if len(frame) else frame
    pool = finished[finished["status"] == "completed"] if (finished["status"] == "completed").any() else finished
    summary: dict[str, Any] = {"trials": len(frame), "num_samples": search.num_samples,
                               "status": frame["status"].value_counts().to_dict() if len(frame) else {},
                               "objectives": search.metrics, "interrupted": bool(len(frame) < search.num_samples or
                                                                                 frame["status"].isin(["running", "pending"]).any())}
    front = pareto_front(pool[search.metrics].to_numpy(float)) if len(pool) else np.zeros(0, int)
    if len(front):
        front_rows = pool.iloc[front]
        atomic_write_bytes(out / "pareto.csv", front_rows.to_csv(index=False).encode())
        best = front_rows.sort_values(search.metrics, ascending=False).iloc[0]
        params = {k: _plain(best[k]) for k in search.space}
        best_cfg = trial_hyperrep(base, {k: v for k, v in params.items() if k not in SAMPLER_PARAMS})
        best_sampler = trial_sampler(search, {k: v for k, v in params.items() if k in SAMPLER_PARAMS})
        atomic_write_bytes(out / "best_hyperrep.yaml",
                           yaml.safe_dump(best_cfg.model_dump(mode="json"), sort_keys=False).encode())
        # The "sampling" section of a populations config (configs/populations/*.yaml).
        atomic_write_bytes(out / "best_sampler.yaml", yaml.safe_dump({"sampling": {
            k: _plain(best_sampler[k]) for k in SAMPLER_PARAMS}}, sort_keys=False).encode())
        best_trial = next(t for t in trials if t.trial_id == best["trial_id"])
        if best_trial.checkpoint is not None:
            target = out / "best_model"
            shutil.rmtree(target, ignore_errors=True)
            best_trial.checkpoint.to_directory(str(target))
            shutil.rmtree(target / "resume", ignore_errors=True)  # a trial stopped by ASHA keeps train's resume state
        summary.update(best={"trial_id": best["trial_id"], "params": params,
                             **{m: float(best[m]) for m in search.metrics}},
                       pareto=[{"trial_id": r["trial_id"], **{m: float(r[m]) for m in search.metrics}}
                               for _, r in front_rows.iterrows()])
    importances = param_importances(finished, search, space)
    summary["importances"] = importances
    plot_search(frame, search, importances, front_rows if len(front) else None, out / "search.png")
    atomic_write_json(out / "summary.json", jsonable(summary))
    return summary


def pareto_front(values: np.ndarray) -> np.ndarray:
    """Indices of the rows no other row dominates (every objective maximized)."""
    keep = []
    for i, v in enumerate(values):
        dominated = np.any(np.all(values >= v, axis=1) & np.any(values > v, axis=1))
        if not dominated:
            keep.append(i)
    return np.asarray(keep, int)


def param_importances(finished, search: SearchConfig, space: DefineByRun) -> dict[str, dict[str, float]]:
    """fANOVA importances per objective, from an Optuna study rebuilt from the finished trials."""
    import optuna

    varying = [k for k in search.space if k in finished and finished[k].nunique() > 1]
    if len(finished) < 3 or not varying:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = space.distributions()
    study = optuna.create_study(directions=["maximize"] * len(search.metrics))
    for _, row in finished.iterrows():
        study.add_trial(optuna.trial.create_trial(
            params={k: _plain(row[k]) for k in search.space}, distributions=dists,
            values=[float(row[m]) for m in search.metrics]))
    out = {}
    for i, metric in enumerate(search.metrics):
        try:
            imp = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=search.seed),
                params=varying, target=lambda t, i=i: t.values[i])
            out[metric] = {k: float(v) for k, v in imp.items()}
        except (RuntimeError, ValueError):  # e.g. a constant objective: nothing to attribute
            out[metric] = {}
    return out


def plot_search(frame, search: SearchConfig, importances: dict, front, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    multi = len(search.metrics) > 1
    fig, axes = plt.subplots(1, 3 if multi else 2, figsize=(15 if multi else 10, 4))
    ax = axes[0]
    colours = {"completed": "C0", "pruned": "C1", "errored": "C3", "running": "C7", "pending": "C7"}
    for metric, marker in zip(search.metrics, "os^"):
        if metric not in frame or frame[metric].isna().all():
            continue
        ax.scatter(frame["trial"], frame[metric], c=[colours[s] for s in frame["status"]], marker=marker,
                   label=metric)
    primary = frame[search.primary].astype(float) if search.primary in frame else None
    if primary is not None and primary.notna().any():
        ax.plot(frame["trial"], primary.cummax(), "k-", lw=1, label=f"best {search.primary}")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation objective")
    ax.set_title("objectives over trials (orange: pruned)")
    if ax.get_legend_handles_labels()[0]:  # nothing to label when no trial has reported yet
        ax.legend(fontsize=8)
    ax = axes[1]
    imp = importances.get(search.primary, {})
    if imp:
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names])
        ax.set_title(f"parameter importance for {search.primary} (fANOVA)")
    else:
        ax.text(0.5, 0.5, f"no importances for {search.primary}:\nthey need >= 3 finished trials, varying\n"
                          "parameters and an objective that varies", ha="center", va="center")
        ax.set_axis_off()
    if multi:
        ax = axes[2]
        x, y = search.metrics[:2]
        ax.scatter(frame[x], frame[y], c="C7", label="trials")
        if front is not None:
            f = front.sort_values(x)
            ax.plot(f[x], f[y], "C3o-", label="Pareto front")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title("Pareto front")
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _finish_parent(client, state: dict, summary: dict, out: Path) -> None:
    from mlflow.entities import Metric

    run_id = state["parent_run_id"]
    now = int(time.time() * 1000)
    metrics = [Metric(f"best_{m}", v, now, 0) for m, v in (summary.get("best") or {}).items()
               if m in OBJECTIVES.values()]
    metrics += [Metric("trials", float(summary["trials"]), now, 0)]
    client.log_batch(run_id, metrics=metrics)
    for name in ("best_hyperrep.yaml", "best_sampler.yaml", "results.csv", "pareto.csv", "search.png", "summary.json"):
        if (out / name).exists():
            client.log_artifact(run_id, str(out / name))
    client.set_terminated(run_id, "KILLED" if summary["interrupted"] else "FINISHED")


def _plain(value):
    """numpy/pandas scalars -> Python ones (YAML, Optuna and JSON want plain types)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


# --- CLI --------------------------------------------------------------------------------------

def _run(args) -> int:
    search, _ = load_search(args.config, args.set)
    summary = run_search(search, args.zoo, args.out, resume=args.resume, tracking_uri=args.tracking_uri,
                         config_dir=Path(args.config).resolve().parent, address=getattr(args, "address", None),
                         progress=not getattr(args, "no_progress", False))
    out = Path(args.out)
    print(f"[search] {summary['trials']}/{summary['num_samples']} trials: "
          + ", ".join(f"{k} {v}" for k, v in summary["status"].items()), flush=True)
    if summary.get("best"):
        best = summary["best"]
        print("[search] best " + ", ".join(f"{m}={best[m]:.4f}" for m in summary["objectives"])
              + f" (trial {best['trial_id']}): " + ", ".join(f"{k}={v}" for k, v in best["params"].items()))
        print(f"[search] wrote {out / 'best_hyperrep.yaml'} (raysys hyperrep train accepts it), "
              f"{out / 'best_sampler.yaml'}, {out / 'search.png'}")
    if summary["interrupted"]:
        print("[search] interrupted; continue with the same command plus --resume", file=sys.stderr)
        return 130
    return 0
