"""Zoo generation: a config grid -> model specs -> shards trained on Ray Train workers -> the zoo store.

Reading order: the config (:class:`ZooConfig`), its expansion into :class:`~raysys.train.ModelSpec`
(:func:`expand`), the shard plan (:func:`plan_shards`), training one shard (:func:`train_shard`,
plain PyTorch through :func:`raysys.batched_trainer.train_population`), the Ray Train worker loop,
the driver (:func:`generate`: manifest, resume, MLflow, progress) and the CLI.

Determinism: a model is fully determined by its spec (see :mod:`raysys.train`), and model ids,
splits and shards are pure functions of the config, so a rerun of the same command skips the
shards already complete and redoes the rest, ending with the same zoo as an uninterrupted run.
"""
from __future__ import annotations

import itertools
import math
import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
from pydantic import Field, field_validator, model_validator

from raysys import __version__, architectures
from raysys.config import Config, ConfigError, RaysysError, apply_overrides, read_yaml, validate
from raysys.provenance import STORE_FORMAT, check_same_code, code_fingerprint
from raysys.store import (META, SUMMARY_PLOT, WriterLock, ZooWriter, atomic_write_bytes, clean_temp_files,
                          manifest_path, manifest_problem, only_writer_files, open_zoo, quarantine, quarantine_strays,
                          read_plan, rows_table, shard_record, splits_for)
from raysys.train import ModelSpec

# --- config ---------------------------------------------------------------------------------


class DatasetConfig(Config):
    name: str
    root: str | None = None  # where torchvision-format datasets live on disk
    options: dict[str, Any] = Field(default_factory=dict)  # passed to the dataset loader


def _as_list(value):
    # "lr: 3e-4" is as natural in a grid as "lr: [3e-4]"
    return value if isinstance(value, (list, tuple)) else [value]


class GridConfig(Config):
    """Every combination of these values is one grid point (001, Table 1)."""

    init: list[str] = ["uniform"]
    activation: list[str] = ["tanh"]
    optimizer: list[Literal["adam", "sgd"]] = ["adam"]
    lr: list[float] = [3e-4]
    weight_decay: list[float] = [0.0]
    dropout: list[float] = [0.0]
    batch_size: list[int] = [10]

    @field_validator("*", mode="before")
    @classmethod
    def _wrap(cls, v):
        return _as_list(v)

    @model_validator(mode="after")
    def _check(self):
        for name in type(self).model_fields:
            values = getattr(self, name)
            if not values:
                raise ValueError(f"grid.{name} is empty; give at least one value")
            if len(set(values)) != len(values):
                raise ValueError(f"grid.{name} lists a value twice ({values}); list each value once")
        for v in self.init:
            if v not in architectures.INITS:
                raise ValueError(f"grid.init: unknown init '{v}'; choose from {', '.join(architectures.INITS)}")
        for v in self.activation:
            if v not in architectures.ACTIVATIONS:
                raise ValueError(f"grid.activation: unknown activation '{v}'; "
                                 f"choose from {', '.join(architectures.ACTIVATIONS)}")
        if any(v <= 0 or not math.isfinite(v) for v in self.lr):
            raise ValueError(f"grid.lr must be positive and finite, got {self.lr}")
        if any(v < 0 or not math.isfinite(v) for v in self.weight_decay):
            raise ValueError(f"grid.weight_decay must be >= 0, got {self.weight_decay}")
        if any(not 0 <= v < 1 for v in self.dropout):
            raise ValueError(f"grid.dropout must be in [0, 1), got {self.dropout}")
        if any(v < 1 for v in self.batch_size):
            raise ValueError(f"grid.batch_size must be >= 1, got {self.batch_size}")
        return self

    def points(self) -> list[dict]:
        names = list(type(self).model_fields)
        return [dict(zip(names, combo)) for combo in itertools.product(*(getattr(self, n) for n in names))]


class SeedRange(Config):
    """Seeds start, start+1, ..., the same for every grid point (``Seed``: 1-1000, ``Hyp-10-fix``: 1-10)."""

    start: int = Field(1, ge=0)
    count: int = Field(ge=1)


class RandomSeeds(Config):
    """``random`` seeds per grid point drawn from an RNG seeded by ``seed`` (``Hyp-10-rand``)."""

    random: int = Field(ge=1)
    seed: int = Field(0, ge=0)  # numpy refuses negative seeds


class ResourcesConfig(Config):
    # None: as many workers as the Ray has CPUs (GPUs with use_gpu) for cpus_per_worker each, at least 1
    num_workers: int | None = Field(None, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=0)  # Ray Train restarts of the worker group after a crash
    # The memory one shard may take while it trains and is written (see zoo.SHARD_MEMORY_COPIES), in GiB.
    # None: this machine's available memory (psutil, else /proc/meminfo, else os.sysconf). See check_memory.
    shard_memory_gb: float | None = Field(None, gt=0)
    # Who trains the shards (see choose_runner): "auto" trains them in this process when the run is local and one
    # worker would do all the work anyway, else on Ray Train; "ray_train" and "in_process" force one.
    runner: Literal["auto", "ray_train", "in_process"] = "auto"


class MlflowConfig(Config):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    experiment: str = "raysys-zoo"


class ZooConfig(Config):
    name: str
    dataset: DatasetConfig
    arch: architectures.ArchName
    grid: GridConfig = Field(default_factory=GridConfig)
    seeds: Union[list[int], SeedRange, RandomSeeds]
    models: int | None = Field(None, ge=1)  # keep only the first N models of the grid (--models)
    epochs: int = Field(ge=1)
    split_seed: int = Field(0, ge=0)
    models_per_shard: int = Field(50, ge=1)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local Ray started by raysys (raysys.runtime)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("seeds is an empty list; list at least one seed or write {start: 1, count: N}")
            if len(set(v)) != len(v):
                raise ValueError("seeds lists a seed twice; each seed once")
            if min(v) < 0:
                raise ValueError("seeds must be >= 0")
        return v


# Settings that say where and how fast a zoo is made, not what it contains: a resumed run may change them.
RUN_ONLY_KEYS = ("resources", "ray_address", "mlflow")


def identity(config: ZooConfig) -> dict:
    """The part of a config that determines the zoo's contents."""
    d = config.model_dump(mode="json")
    for k in RUN_ONLY_KEYS:
        d.pop(k, None)
    return d


def load_config(path: str | Path, overrides: list[str] | None = None) -> ZooConfig:
    data = read_yaml(path)
    if not isinstance(data, dict):  # before apply_overrides, which needs a mapping
        return validate(ZooConfig, data, str(path))
    return validate(ZooConfig, apply_overrides(data, overrides), str(path))


# --- expansion --------------------------------------------------------------------------------

# A config without a ``models`` cap whose grid x seeds is larger than this is refused: its specs, splits and
# manifest alone would fill the driver's memory (a ModelSpec is ~0.5 kB; 10**6 models ~ 0.5 GB of specs).
MAX_MODELS = 1_000_000


def seeds_per_grid_point(config: ZooConfig) -> int:
    s = config.seeds
    return len(s) if isinstance(s, list) else s.count if isinstance(s, SeedRange) else s.random


def grid_size(config: ZooConfig) -> int:
    """How many models the grid and the seeds define (before ``models`` cuts them), without expanding them."""
    return math.prod(len(getattr(config.grid, n)) for n in type(config.grid).model_fields) * seeds_per_grid_point(config)


def _seed_streams(config: ZooConfig, num_points: int):
    """``next_seed(p)``: the next seed of grid point ``p`` (its k-th call gives the point's k-th seed), lazily."""
    s = config.seeds
    if isinstance(s, list):
        counters = [0] * num_points

        def from_list(p):
            counters[p] += 1
            return int(s[counters[p] - 1])
        return from_list
    if isinstance(s, SeedRange):
        counters = [0] * num_points

        def from_range(p):
            counters[p] += 1
            return s.start + counters[p] - 1
        return from_range
    # One RNG per grid point, drawn one seed at a time, so the first k seeds of a point do not
    # depend on how many are drawn (adding seeds keeps every existing model).
    rngs: dict[int, tuple] = {}

    def random(p):
        rng, seen = rngs.setdefault(p, (np.random.default_rng([s.seed, p]), set()))
        while True:
            v = int(rng.integers(1, 2**31))
            if v not in seen:
                seen.add(v)
                return v
    return random


def iter_specs(config: ZooConfig):
    """The zoo's models in model_id order, one at a time (no list of the whole grid x seeds product).

    Seed-major (all grid points with their first seed, then with their second, ...): a prefix
    (``models: N``) covers the grid evenly, and a model's id does not change when seeds are added.
    """
    names = list(type(config.grid).model_fields)
    points = [dict(zip(names, combo)) for combo in itertools.product(*(getattr(config.grid, n) for n in names))]
    next_seed = _seed_streams(config, len(points))
    model_id = 0
    for _ in range(seeds_per_grid_point(config)):
        for p, point in enumerate(points):
            yield ModelSpec(model_id=model_id, seed=next_seed(p), **point)
            model_id += 1


def expand(config: ZooConfig) -> list[ModelSpec]:
    """The zoo's models in model_id order: the first ``models`` of :func:`iter_specs` (all of them without a cap).

    Only the models kept are built, so ``seeds: {count: 10**12}`` with ``models: 4`` costs four specs. Without a
    cap, a grid x seeds product above :data:`MAX_MODELS` is refused with its size."""
    total = grid_size(config)
    if config.models is not None:
        if config.models > total:
            raise ConfigError(f"models: {config.models} but the grid and seeds define only {total} models. "
                              f"Lower --models or add seeds.")
        n = config.models
    elif total > MAX_MODELS:
        raise ConfigError(f"the grid ({total // seeds_per_grid_point(config)} points) x seeds "
                          f"({seeds_per_grid_point(config)} per point) define {total:,} models, more than the "
                          f"{MAX_MODELS:,} one zoo can plan. Set models: N (--models N) to keep the first N, or list "
                          f"fewer seeds.")
    else:
        n = total
    return list(itertools.islice(iter_specs(config), n))


@dataclass(frozen=True)
class Shard:
    shard: int
    model_ids: tuple[int, ...]
    population: tuple  # ModelSpec.population_key(): models that train as one batched computation


def plan_shards(specs: list[ModelSpec], models_per_shard: int) -> list[Shard]:
    """Group models into populations (equal population_key), then cut each into shards."""
    populations: dict[tuple, list[int]] = {}
    for s in specs:
        populations.setdefault(s.population_key(), []).append(s.model_id)
    shards: list[Shard] = []
    for key, ids in populations.items():
        for i in range(0, len(ids), models_per_shard):
            shards.append(Shard(len(shards), tuple(ids[i:i + models_per_shard]), key))
    return shards


# --- size and memory ----------------------------------------------------------------------------

# What one shard holds in memory while it trains and is written, in copies of its models' float32 weights: the
# trainer's weights, gradients and two optimizer moments (Adam's; SGD keeps fewer), and the epoch being written
# (the rows, their Arrow column and the Parquet row group). The shard is streamed a row group per epoch, so the
# number of epochs does not enter.
SHARD_MEMORY_COPIES = 7


def size_estimate(config: ZooConfig, num_params: int, shards: list[Shard]) -> dict:
    """Bytes of float32 weights the zoo holds (every model, epochs 0..E), and the memory one shard takes while it
    trains and is written: ``SHARD_MEMORY_COPIES`` copies of the largest shard's weights (models x num_params x
    4), whatever the number of epochs (its epochs are streamed to the file one at a time)."""
    from raysys.batched_trainer import CHAINS

    models = sum(len(s.model_ids) for s in shards)
    per_model = (config.epochs + 1) * num_params * 4
    largest = max((len(s.model_ids) for s in shards), default=0)
    together = largest if config.arch in CHAINS else min(largest, 1)  # the others train one model at a time
    return {"models": models, "epochs": config.epochs, "num_params": num_params, "zoo_bytes": models * per_model,
            "shard_models": largest, "models_in_memory": together, "shard_epoch_bytes": together * num_params * 4,
            "shard_bytes": SHARD_MEMORY_COPIES * together * num_params * 4}


def available_memory() -> int | None:
    """Bytes of memory available on this machine: psutil when installed, else Linux's MemAvailable, else
    os.sysconf's free pages; None when none of them answers."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: int | float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**27 else f"{n / 2**20:.3g} MiB"


def check_memory(config: ZooConfig, num_params: int, shards: list[Shard], budget: int | None = None) -> dict:
    """The size estimate, printed; a :class:`RaysysError` naming the numbers and the fix when one shard needs
    more memory than the budget (``budget`` bytes, else ``resources.shard_memory_gb``, else
    :func:`available_memory`). Nothing is written; generate calls it before it takes the directory."""
    est = size_estimate(config, num_params, shards)
    source = "given"
    if budget is None and config.resources.shard_memory_gb is not None:
        budget, source = int(config.resources.shard_memory_gb * 2**30), "resources.shard_memory_gb"
    elif budget is None:
        budget, source = available_memory(), "available on this machine"
    est.update(budget_bytes=budget, budget_source=source)
    print(f"raysys zoo: {est['models']:,} models x {config.epochs + 1} epochs (0..{config.epochs}) x "
          f"{num_params:,} parameters = {_gb(est['zoo_bytes'])} of float32 weights (less on disk: zstd); a shard of "
          f"{est['shard_models']} models needs {_gb(est['shard_bytes'])} while it trains (epochs streamed to disk"
          + ("" if est["models_in_memory"] == est["shard_models"] else ", one model at a time") + ")"
          + (f" (budget {_gb(budget)}, {source})" if budget is not None else ""), flush=True)
    if budget is not None and est["shard_bytes"] > budget and est["models_in_memory"] < est["shard_models"]:
        raise RaysysError(
            f"one {config.arch} model of {num_params:,} parameters needs {_gb(est['shard_bytes'])} of memory while "
            f"it trains and is written ({SHARD_MEMORY_COPIES} copies of its weights), more than the {_gb(budget)} "
            f"{source}; {config.arch} shards train one model at a time, so models_per_shard does not change this. "
            f"Run it on machines with more memory (and set resources.shard_memory_gb to what they have).")
    if budget is not None and est["shard_bytes"] > budget:
        fit = max(1, budget // (SHARD_MEMORY_COPIES * num_params * 4))
        raise RaysysError(
            f"one shard of {est['shard_models']} models x {num_params:,} parameters needs {_gb(est['shard_bytes'])} "
            f"of memory while it trains and is written ({SHARD_MEMORY_COPIES} copies of its weights: the trainer's "
            f"weights, gradients and optimizer state, and the epoch being written), more than the {_gb(budget)} "
            f"{source}. Lower models_per_shard (now {config.models_per_shard}; at most {fit} fit: --set "
            f"models_per_shard={fit}), or raise resources.shard_memory_gb if the workers' machines have the memory.")
    return est


# --- training one shard -----------------------------------------------------------------------

def train_shard(arch: str, shard: Shard, specs: list[ModelSpec], data, epochs: int, splits: list[str],
                writer: ZooWriter, device: str = "cpu", on_progress=None) -> dict:
    """Train the models of one shard and stream each epoch's rows into its Parquet file as a row group (memory
    holds one epoch of the shard, never all of them); return the shard's record once the file is in place."""
    from raysys.batched_trainer import CHAINS, train_population

    by_id = {s.model_id: s for s in specs}
    num_params = architectures.layout_of(arch, data.in_channels, data.num_classes).num_params
    # a batched architecture trains the shard as one population, a row group per epoch; the others (BatchNorm:
    # trained one model at a time anyway) one model after the other, a row group per model and epoch
    groups = [list(shard.model_ids)] if arch in CHAINS else [[m] for m in shard.model_ids]
    with writer.stream_shard(shard.shard, shard.model_ids) as stream:
        for ids in groups:
            members = [by_id[m] for m in ids]
            hparams = [s.hyperparameters() for s in members]
            seen: list[int] = []

            def on_epoch(epoch, weights, metrics, ids=ids, hparams=hparams, seen=seen):
                stream.append(rows_table(num_params, ids, epoch, [splits[m] for m in ids],
                                         weights.detach().cpu().numpy(), metrics, hparams))
                seen.append(epoch)
                if on_progress is not None and epoch > 0:
                    on_progress(len(ids))

            train_population(arch, members, data, epochs, on_epoch=on_epoch, device=device)
            if seen != list(range(epochs + 1)):
                raise RuntimeError(f"shard {shard.shard}: the trainer reported epochs {seen} for models {ids}, "
                                   f"expected 0..{epochs}")
        return stream.close()


# --- Ray Train ----------------------------------------------------------------------------------

def _worker_loop(cfg: dict) -> None:
    """Runs on every Ray Train worker: train the pending shards whose index is this worker's rank mod world size.

    Arguments are plain data (config dict, paths, shard lists) plus the progress actor's handle,
    because workers live in other processes, possibly on other nodes.
    """
    import ray.train

    from raysys import datasets

    config = ZooConfig.model_validate(cfg["config"])
    import torch

    # what Ray's OMP_NUM_THREADS means, said to torch directly (and what the in-process runner sets): one thread
    # per CPU of the worker, so workers never oversubscribe the cores and both runners compute the same bits
    torch.set_num_threads(max(1, int(config.resources.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = "cpu"
    if config.resources.use_gpu:
        import ray.train.torch

        device = str(ray.train.torch.get_device())
    remote = cfg.get("remote")
    staging = None
    if remote is not None:  # a zoo on a pyarrow filesystem: each shard is staged here, then published by this worker
        import tempfile

        staging = Path(tempfile.mkdtemp(prefix="raysys-shards-"))
        remote = remote.at(staging)
    writer = ZooWriter(cfg["out_dir"] if staging is None else staging, remote)
    specs = expand(config)
    shards = [Shard(s["shard"], tuple(s["model_ids"]), tuple(s["population"])) for s in cfg["pending"]]
    mine = shards[rank::world]
    data = datasets.load(config.dataset.name, config.dataset.root, **config.dataset.options)
    progress = cfg.get("progress")
    report = (lambda n: progress.add.remote(n)) if progress is not None else None
    try:
        for shard in mine:
            if writer.is_complete(shard.shard):
                continue  # finished before Ray Train restarted this worker group
            train_shard(config.arch, shard, specs, data, config.epochs, cfg["splits"], writer, device, report)
            if staging is not None:  # published: the driver fetches it from the remote store
                writer.shard_path(shard.shard).unlink(missing_ok=True)
                writer.record_path(shard.shard).unlink(missing_ok=True)
            if progress is not None:
                progress.shard_done.remote()
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _progress_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        """Counts model-epochs and shards finished; workers add, the driver polls."""

        def __init__(self):
            self.model_epochs, self.shards = 0, 0

        def add(self, n: int):
            self.model_epochs += n

        def shard_done(self):
            self.shards += 1

        def get(self) -> tuple[int, int]:
            return self.model_epochs, self.shards

    return Progress.remote()


class _Progress:
    """The in-process runner's progress counter: what the Ray actor counts, without Ray."""

    def __init__(self):
        self.model_epochs, self.shards = 0, 0

    def add(self, n: int):
        self.model_epochs += n

    def shard_done(self):
        self.shards += 1

    def get(self) -> tuple[int, int]:
        return self.model_epochs, self.shards


def _run_in_process(config: ZooConfig, out_dir: Path, data, specs, pending: list[Shard], splits: list[str],
                    progress: _Progress, remote=None) -> None:
    """Train the pending shards one after the other in this process (:func:`choose_runner`): what one Ray Train
    worker does in :func:`_worker_loop`, with torch at the worker's thread count (Ray gives a worker of
    ``cpus_per_worker`` CPUs as many threads), so the shards come out the same."""
    import torch

    writer, threads = ZooWriter(out_dir, remote), torch.get_num_threads()
    torch.set_num_threads(max(1, int(config.resources.cpus_per_worker)))
    try:
        for shard in pending:
            try:
                train_shard(config.arch, shard, specs, data, config.epochs, splits, writer, "cpu", progress.add)
            except (RaysysError, KeyboardInterrupt):
                raise
            except Exception as err:
                raise RaysysError(f"zoo generation failed in shard {shard.shard}: {type(err).__name__}: {err}\n"
                                  f"Completed shards are kept in {out_dir}; fix the cause and rerun the same command "
                                  f"to resume.") from err
            progress.shard_done()
    finally:
        torch.set_num_threads(threads)


def _run_trainer(config: ZooConfig, out_dir: Path, pending: list[Shard], splits: list[str], progress,
                 remote=None) -> None:
    import ray.train

    from raysys import runtime

    r = config.resources
    trainer = runtime.torch_trainer(
        _worker_loop,
        train_loop_config={
            "config": config.model_dump(mode="json"), "out_dir": str(out_dir), "splits": splits,
            "pending": [{"shard": s.shard, "model_ids": list(s.model_ids), "population": list(s.population)}
                        for s in pending],
            "progress": progress,
            "remote": remote,  # a raysys.storage.Remote: workers publish their shards there themselves
        },
        scaling_config=ray.train.ScalingConfig(num_workers=min(r.num_workers or 1, len(pending)), use_gpu=r.use_gpu,
                                               resources_per_worker={"CPU": r.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=f"zoo-{config.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            # Ray Train's own run records live beside the zoo; on a multi-node cluster the --out
            # directory has to be on storage every node mounts anyway, since workers write shards there.
            storage_path=str(out_dir / ".ray_train"),
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            logging_config=runtime.train_logging_config(),
        ),
    )
    try:
        result = trainer.fit()
        error = getattr(result, "error", None)
    except Exception as err:  # Train V2 raises TrainingFailedError once retries are spent
        error = err
    if error is not None:
        raise RaysysError(f"zoo generation failed after {r.max_failures} worker-group restarts: {_root_cause(error)}\n"
                          f"Completed shards are kept in {out_dir}; fix the cause and rerun the same command to resume.")


def _root_cause(err: BaseException) -> str:
    seen = set()
    while err.__cause__ is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"


# --- the driver -----------------------------------------------------------------------------------

def _manifest(config: ZooConfig, data, shards: list[Shard], splits: list[str], status: str,
              records: dict[int, dict] | None = None) -> dict:
    layout = architectures.layout_of(config.arch, data.in_channels, data.num_classes, data.image_size)
    return {
        "raysys_version": __version__,
        "store_format": STORE_FORMAT,
        "code": code_fingerprint("zoo"),  # the trainer's: a resume by other code is refused (_check_resume)
        "name": config.name,
        "arch": config.arch,
        "status": status,
        "num_models": len(splits),
        "epochs": config.epochs,
        "num_params": layout.num_params,
        "layout": layout.to_dict(),
        "dataset": data.describe(),
        # The tracking URI may carry a password, and it is a run-only setting anyway (RUN_ONLY_KEYS).
        "config": config.model_dump(mode="json", exclude={"mlflow": {"tracking_uri"}}),
        "split_seed": config.split_seed,
        "split_counts": {s: splits.count(s) for s in ("train", "val", "test")},
        "splits": splits,
        "shards": [{"shard": s.shard, "model_ids": list(s.model_ids), "population": list(s.population),
                    **({"sha256": records[s.shard]["sha256"], "rows": records[s.shard]["rows"]}
                       if records and s.shard in records else {})}
                   for s in shards],
    }


def _check_resume(out_dir: Path, config: ZooConfig) -> bool:
    """True when out_dir already holds this zoo (resume); error when it holds another one."""
    path = manifest_path(out_dir)
    lost = not path.exists() and read_plan(out_dir) is not None  # a zoo that lost its manifest: plan.json remains
    if not path.exists() and not lost:
        if out_dir.exists() and not only_writer_files(out_dir):
            raise RaysysError(f"{out_dir} exists, is not empty and holds no zoo manifest. "
                              f"Choose a new --out directory (or an empty one).")
        return False
    damaged = "it is missing" if lost else manifest_problem(out_dir)
    try:
        # a damaged manifest is rebuilt from this config (generate() quarantines it): the plan.json beside it,
        # when there is one, still says which config the zoo was made with
        manifest = read_plan(out_dir) if damaged else json.loads(path.read_text())
        if manifest is None:
            return True
        old = ZooConfig.model_validate(manifest["config"])
    except Exception:
        raise RaysysError(f"{path} is not a manifest written by this raysys version. "
                          f"Choose a new --out directory.") from None
    if manifest.get("aligned"):  # its config is its source's; regenerating would mix in unaligned shards
        raise RaysysError(f"{out_dir} holds an aligned copy of {manifest['aligned'].get('source')} made by "
                          f"'raysys zoo align', not a generated zoo. Choose a new --out directory.")
    before, now = identity(old), identity(config)
    if before != now:
        diff = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
                         if before.get(k) != now.get(k))
        raise RaysysError(f"{out_dir} holds zoo '{old.name}' generated with a different config ({diff}). "
                          f"Rerun with the original config to resume it, or choose a new --out directory.")
    check_same_code(out_dir, manifest, "raysys zoo generate CONFIG")
    return True


def _clean_partial_files(out_dir: Path) -> int:
    """Remove temporary files left by a killed run (complete shards are never temporary): only those whose
    owner is dead (:func:`raysys.store.clean_temp_files`)."""
    return len(clean_temp_files(out_dir))


def _pending(out_dir: Path, shards: list[Shard], resuming: bool) -> tuple[list[Shard], dict[int, str]]:
    """(shards to train, {shard: why} of those 'zoo verify' flags, even when their bytes match their record).
    Reads only."""
    bad: dict[int, str] = {}
    if resuming:  # a shard whose rows are wrong is redone even when its bytes match its record
        from raysys.integrity import verify_zoo

        for p in verify_zoo(out_dir, checksums=False).problems:
            if p.shard is not None:
                bad.setdefault(p.shard, f"{p.kind}: {p.detail}")
    writer = ZooWriter(out_dir)
    return [s for s in shards if s.shard in bad or not writer.is_complete(s.shard)], bad


def generate(config: ZooConfig | str | Path, out_dir: str | Path, overrides: list[str] | None = None,
             progress: bool = True, remote=None) -> dict:
    """Generate (or resume) a zoo in ``out_dir``; returns the final manifest.

    ``out_dir`` may be a pyarrow filesystem URI (``s3://bucket/prefix``, :mod:`raysys.storage`): the driver works
    on a local copy of it (``remote``, a :class:`~raysys.storage.Remote`, names both sides explicitly), made equal
    to the remote one first; the workers publish each shard there as soon as it is written (Parquet object, then
    its record), and the manifest is published before training and once complete.

    Everything that can be checked is checked before anything is written: the output directory,
    the Ray address, the MLflow URI, the dataset, the resources, and that an existing zoo in
    ``out_dir`` has the same config. One MLflow run per call: params are the flattened config,
    metrics the progress, artifacts the manifest and a plot of accuracy over epochs.
    """
    from raysys import runtime
    from raysys.integrity import check_output_dir, check_ray_address, check_tracking_uri

    if isinstance(config, (str, Path)):
        config = load_config(config, overrides)
    elif overrides:
        config = validate(ZooConfig, apply_overrides(config.model_dump(mode="json"), overrides), "overrides")
    from raysys.storage import Remote, is_remote

    if remote is None and is_remote(out_dir):
        remote = Remote(str(out_dir))
    if remote is not None:
        out_dir = check_output_dir(remote.local, flag="the working copy of --out").resolve()
    else:
        out_dir = check_output_dir(out_dir).resolve()  # absolute: workers run in other directories
    if not _ray_initialized():
        check_ray_address(runtime.resolve_address(config.ray_address))
    tracking_uri = check_tracking_uri(config.mlflow.tracking_uri)
    tracker = runtime.TrackingProcess(tracking_uri)  # imports MLflow on another core while this one works
    try:
        return _generate_locked(config, out_dir, tracking_uri, tracker, progress, remote)
    finally:
        tracker.close()


def _generate_locked(config: ZooConfig, out_dir: Path, tracking_uri: str, tracker, progress: bool,
                     remote=None) -> dict:
    from raysys import datasets, runtime
    from raysys.storage import check_shared_storage

    if remote is not None:  # the working copy becomes the remote zoo: what is there decides resume and shards
        remote.pull()

    specs = expand(config)
    shards = plan_shards(specs, config.models_per_shard)
    splits = splits_for(len(specs), config.split_seed)
    resuming = _check_resume(out_dir, config)
    data = datasets.load(config.dataset.name, config.dataset.root, **config.dataset.options)
    check_memory(config, architectures.layout_of(config.arch, data.in_channels, data.num_classes,
                                                 data.image_size).num_params, shards)
    started_ray = False
    try:
        with WriterLock(out_dir, "raysys zoo generate"):
            # again, now that no other writer can change the directory under us
            resuming = _check_resume(out_dir, config)
            damaged = manifest_problem(out_dir) or (resuming and not manifest_path(out_dir).exists())
            if damaged:  # rebuilt from this config; the records and the rows decide which shards are kept
                if manifest_path(out_dir).exists():
                    quarantine(out_dir, manifest_path(out_dir), f"a damaged manifest ({damaged}); rebuilt from the config")
                ZooWriter(out_dir).write_manifest(_manifest(config, data, shards, splits, "running"))
            pending, bad = _pending(out_dir, shards, resuming)
            if resuming:  # strays and shards that do not match their records go to the quarantine, not into the zoo
                quarantine_strays(out_dir, [s.shard for s in shards], bad)
            runner = choose_runner(config, len(pending))
            if pending and runner == "ray_train":
                started_ray = runtime.init_ray(config.ray_address)
                config = _resolve_workers(config)
                _check_resources(config, local=started_ray and runtime.resolve_address(config.ray_address) == runtime.LOCAL)
                # every node writes shards to --out as it resolves it: a node that does not see the driver's files
                # would scatter the zoo (one node: nothing to check)
                check_shared_storage(remote.uri if remote is not None else out_dir)
            ZooWriter(out_dir).write_manifest(_manifest(config, data, shards, splits, "running"))
            _clean_partial_files(out_dir)
            if remote is not None:  # the running manifest (and any quarantine moves) before the first shard
                remote.push()
            return _generate(config, out_dir, data, specs, shards, splits, pending, resuming, tracker, progress,
                             runner, remote)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _ray_initialized() -> bool:
    """Whether this process has joined a Ray, without importing Ray when nothing did."""
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def local_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and taskset narrow), at least 1:
    what a new local Ray would count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def choose_runner(config: ZooConfig, pending: int) -> str:
    """``"in_process"`` or ``"ray_train"``: who trains the ``pending`` shards.

    ``resources.runner`` decides when it is not ``"auto"``. Under ``"auto"`` the shards train in this process,
    with no Ray at all, exactly when all of these hold: this process has not joined a Ray (``ray.init`` by a
    script, a test, a Ray job), the address resolves to a new local Ray (no ``--address``, ``ray_address`` or
    ``$RAY_ADDRESS``), ``resources.use_gpu`` is false, and one worker would do all the work: ``--workers`` /
    ``resources.num_workers`` is 1, or the plan has at most one pending shard (a new local Ray would give one
    worker per ``cpus_per_worker`` CPUs, but never more workers than pending shards). Everything else (a cluster,
    GPUs, several workers) runs on Ray Train. Both paths run :func:`train_shard` on the same shards with the same
    single-thread-per-CPU torch setting, so they write the same bytes (``test_both_runners_write_the_same_zoo``).
    """
    r = config.resources
    if r.runner != "auto":
        return r.runner
    from raysys import runtime

    if _ray_initialized() or runtime.resolve_address(config.ray_address) != runtime.LOCAL or r.use_gpu:
        return "ray_train"
    workers = r.num_workers if r.num_workers is not None else max(1, int(local_cpus() / r.cpus_per_worker))
    return "in_process" if min(workers, pending) <= 1 else "ray_train"


def _resolve_workers(config: ZooConfig) -> ZooConfig:
    """A copy with ``resources.num_workers`` set: the config's, else what the Ray's CPUs (GPUs) allow."""
    import ray

    r = config.resources
    if r.num_workers is not None:
        return config
    have = ray.cluster_resources()
    n = have.get("GPU", 0) if r.use_gpu else have.get("CPU", 0) / r.cpus_per_worker
    config = config.model_copy(deep=True)
    config.resources.num_workers = max(1, int(n))
    return config


def _check_resources(config: ZooConfig, local: bool) -> None:
    """Ray Train waits forever for resources a cluster does not have; say so instead."""
    import ray

    r, have = config.resources, ray.cluster_resources()
    need_cpu = (r.num_workers or 1) * r.cpus_per_worker  # resolved by _resolve_workers before this
    if r.use_gpu and have.get("GPU", 0) < 1 and local:
        raise RaysysError("resources.use_gpu is true but this machine's Ray has no GPU. "
                          "Set resources.use_gpu=false (--set resources.use_gpu=false) or pass --address of a GPU cluster.")
    if local and need_cpu > have.get("CPU", 0):
        raise RaysysError(f"{r.num_workers} workers x {r.cpus_per_worker} CPUs need {need_cpu:g} CPUs but the local Ray "
                          f"has {have.get('CPU', 0):g}. Lower --workers or resources.cpus_per_worker.")


def _generate(config, out_dir, data, specs, shards, splits, pending, resuming, tracker, progress,
              runner="ray_train", remote=None) -> dict:
    writer = ZooWriter(out_dir)
    total = len(specs) * config.epochs
    done_model_epochs = sum(len(s.model_ids) for s in shards if s not in pending) * config.epochs
    from raysys.runtime import cluster_tags

    tags = {"raysys.stage": "zoo", "raysys.zoo": config.name,
            "raysys.out_dir": remote.uri if remote is not None else str(out_dir),
            "raysys.version": __version__, "raysys.resumed": str(resuming).lower(), "raysys.runner": runner,
            **(cluster_tags() if _ray_initialized() else {})}
    with tracker.run(config.mlflow.experiment, config.name, tags, config.model_dump(mode="json")) as run:
        run.log_metrics({"models": len(specs), "shards_planned": len(shards),
                            "shards_skipped": len(shards) - len(pending)})
        t0 = time.time()
        if pending and runner == "in_process":
            counter = _Progress()
            with _ProgressWatcher(counter.get, total, done_model_epochs, len(shards) - len(pending), len(shards),
                                  tracker.log_metrics, progress):
                _run_in_process(config, out_dir, data, specs, pending, splits, counter, remote)
        elif pending:
            actor = _progress_actor()
            with _ProgressWatcher(_actor_poll(actor), total, done_model_epochs, len(shards) - len(pending),
                                  len(shards), tracker.log_metrics, progress):
                _run_trainer(config, out_dir, pending, splits, actor, remote)
        wall = time.time() - t0
        if remote is not None:  # the shards the workers published
            remote.pull()
        missing = [s.shard for s in shards if not writer.is_complete(s.shard)]
        if missing:
            raise RaysysError(f"shards {missing} of {out_dir} are incomplete after training. "
                              f"Rerun the same command to resume.")
        records = {s.shard: shard_record(out_dir, s.shard)[1] or {} for s in shards}
        manifest = _manifest(config, data, shards, splits, "complete", records)
        writer.write_manifest(manifest)
        zoo = open_zoo(out_dir)
        summary = summarize(zoo)
        plot = out_dir / META / SUMMARY_PLOT
        plot_accuracy(zoo, plot)
        if remote is not None:
            remote.push()  # records, then the complete manifest, last
        run.log_metrics({"model_epochs_done": total, "wall_s": wall,
                            "test_acc_last_mean": summary["test_acc_last"][0],
                            "test_acc_last_std": summary["test_acc_last"][1],
                            "diverged_models": summary["diverged_models"]})
        run.log_artifact(str(manifest_path(out_dir)))
        run.log_artifact(str(plot))
    shutil.rmtree(out_dir / ".ray_train", ignore_errors=True)  # Ray Train's run records; the zoo is complete
    return manifest


def _actor_poll(actor):
    """``() -> (model_epochs, shards)`` of the Ray progress actor."""
    def poll():
        import ray

        return ray.get(actor.get.remote(), timeout=10)
    return poll


class _ProgressWatcher:
    """Polls the progress counter (``poll() -> (model_epochs, shards)``) from a thread: tqdm bar (models x epochs,
    rate, ETA) and MLflow metrics."""

    def __init__(self, poll, total, done, shards_done, shards_total, log_metrics, show, interval=0.5):
        from tqdm import tqdm

        self.log_metrics = log_metrics  # (metrics, step): the run's, thread-safe
        self.poll, self.done, self.shards_done, self.interval = poll, done, shards_done, interval
        self.shards_total = shards_total
        self.bar = tqdm(total=total, initial=done, unit="model-epoch", desc="zoo", disable=not show,
                        dynamic_ncols=True, smoothing=0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.last_logged, self.last_value = 0.0, None

    def _poll(self, force=False):
        try:
            model_epochs, shards = self.poll()
        except Exception:
            return
        # a worker group restarted mid-shard counts that shard's epochs again: clamp to the plan
        now = min(self.done + model_epochs, self.bar.total)
        if now != self.bar.n:  # redraw on progress only, so logs of non-interactive runs stay short
            self.bar.set_postfix(shards=f"{self.shards_done + shards}/{self.shards_total}", refresh=False)
            self.bar.update(now - self.bar.n)
        if force or (now != self.last_value and time.time() - self.last_logged > 5):
            self.last_logged, self.last_value = time.time(), now
            try:
                self.log_metrics({"model_epochs_done": now, "shards_done": self.shards_done + shards}, step=now)
            except Exception:  # noqa: S110 - progress metrics must never break a generation
                pass

    def _loop(self):
        while not self.stop.wait(self.interval):
            self._poll()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._poll(force=True)
        self.bar.close()
        return False


# --- summaries -------------------------------------------------------------------------------------

def summarize(zoo) -> dict:
    """Counts and accuracy statistics of a zoo (what ``raysys zoo info`` prints)."""
    df = zoo.frame()
    epochs = sorted(df["epoch"].unique())
    first, last = df[df.epoch == epochs[0]], df[df.epoch == epochs[-1]]
    models = df.drop_duplicates("model_id")
    diverged = df.groupby("model_id")["diverged"].any()

    def stat(col):
        v = col.to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        return (float(v.mean()), float(v.std())) if len(v) else (float("nan"), float("nan"))

    return {
        "name": zoo.manifest.get("name"), "arch": zoo.manifest.get("arch"), "status": zoo.manifest.get("status"),
        "dataset": zoo.manifest.get("dataset", {}).get("name"), "num_params": zoo.num_params,
        "models": int(models.shape[0]), "planned_models": zoo.manifest.get("num_models"),
        "epochs": [int(epochs[0]), int(epochs[-1])], "rows": int(len(df)),
        "splits": {k: int(v) for k, v in models["split"].value_counts().sort_index().items()},
        "diverged_models": int(diverged.sum()),
        "test_acc_first": stat(first["test_acc"]), "test_acc_last": stat(last["test_acc"]),
        "shards": len(zoo.shard_files()), "planned_shards": len(zoo.manifest.get("shards", [])),
    }


def plot_accuracy(zoo, path: Path) -> None:
    """Mean ± std of train and test accuracy over epochs (diverged rows left out)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no GUI backend, a second less to import

    df = zoo.frame()
    df = df[~df["diverged"]]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for col, label in (("train_acc", "train"), ("test_acc", "test")):
        g = df.groupby("epoch")[col]
        mean, std = g.mean(), g.std().fillna(0.0)
        ax.plot(mean.index, mean.values, label=f"{label} accuracy")
        ax.fill_between(mean.index, (mean - std).values, (mean + std).values, alpha=0.25)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{zoo.manifest.get('name')}: {df.model_id.nunique()} models (mean ± std)")
    ax.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(Path(path), buf.getvalue())


def format_summary(s: dict) -> str:
    def pm(t):
        return f"{t[0]:.4f} ± {t[1]:.4f}"

    splits = ", ".join(f"{k} {v}" for k, v in s["splits"].items())
    return "\n".join([
        f"zoo          {s['name']} ({s['status']})",
        f"dataset      {s['dataset']}",
        f"arch         {s['arch']} ({s['num_params']} parameters)",
        f"models       {s['models']} of {s['planned_models']} planned ({s['shards']}/{s['planned_shards']} shards)",
        f"epochs       {s['epochs'][0]}..{s['epochs'][1]}",
        f"splits       {splits}",
        f"rows         {s['rows']}",
        f"diverged     {s['diverged_models']} models",
        f"test acc     epoch {s['epochs'][0]}: {pm(s['test_acc_first'])}   epoch {s['epochs'][1]}: {pm(s['test_acc_last'])}",
    ])


# --- CLI --------------------------------------------------------------------------------------------

def _cmd_generate(args) -> int:
    overrides = list(args.set or [])
    if args.models is not None:
        overrides.append(f"models={args.models}")
    if args.epochs is not None:
        overrides.append(f"epochs={args.epochs}")
    if args.address is not None:
        overrides.append(f"ray_address={args.address}")
    if args.tracking_uri is not None:
        overrides.append(f"mlflow.tracking_uri={args.tracking_uri}")
    if args.workers is not None:
        overrides.append(f"resources.num_workers={args.workers}")
    config = load_config(args.config, overrides)
    t0 = time.time()
    generate(config, args.out, progress=not args.no_progress)
    print(format_summary(summarize(open_zoo(args.out))))
    print(f"wall time    {time.time() - t0:.1f} s")
    from raysys.storage import is_remote

    print(f"zoo written to {args.out if is_remote(args.out) else Path(args.out).resolve()}")
    return 0


def _cmd_info(args) -> int:
    summary = summarize(open_zoo(args.dir, partial=True))  # info also describes a zoo being written
    if getattr(args, "json", False):  # plain JSON: (mean, std) pairs as objects, NaN as null
        from raysys.store import jsonable

        pairs = {k: {"mean": v[0], "std": v[1]} for k, v in summary.items() if k.startswith("test_acc")}
        from raysys.storage import is_remote

        where = str(args.dir) if is_remote(args.dir) else str(Path(args.dir).resolve())
        print(json.dumps(jsonable({"dir": where, **summary, **pairs}), indent=2))
    else:
        print(format_summary(summary))
    return 0
