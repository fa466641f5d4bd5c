"""Fine-tuning whole populations on a pool of Ray actors.

A job is one population: its initial weights (or none, for models trained from scratch), one
:class:`~raysys.train.ModelSpec` per model (seed = data order and dropout; init only when no
weights are given), and a dataset. An actor trains the whole population as one batched
computation with :func:`raysys.batched_trainer.train_population`, evaluating at epoch 0 (the
weights as given, no training) and after every epoch up to the largest budget, so one run
yields the accuracy at every budget (0, 1, 5, 25 ...).

Actors hold a fraction of a GPU each on a cluster (``gpus_per_actor``) and cache the datasets
they have loaded, so a pool of k actors fine-tunes k populations at a time.
"""
from __future__ import annotations

import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from raysys import architectures, datasets
from raysys.config import RaysysError
from raysys.datasets import ImageData
from raysys.batched_trainer import train_population
from raysys.train import METRICS, ModelSpec


@dataclass
class Job:
    """One population to fine-tune (or train from scratch when ``weights`` is None)."""

    name: str  # method, e.g. "S_KDE30"
    setting: str  # "in_dataset" or "transfer"
    arch: str
    dataset: str
    specs: list[ModelSpec]
    epochs: int
    weights: np.ndarray | None = None  # [N, P] float32
    dataset_options: dict = field(default_factory=dict)
    keep_epochs: tuple[int, ...] = ()  # epochs whose weights come back (for novelty)

    @property
    def key(self) -> str:
        return f"{self.setting}/{self.name}"


def finetune_population(arch: str, specs: list[ModelSpec], data: ImageData, epochs: int,
                        init_weights: np.ndarray | None = None, keep_epochs=(), device: str = "cpu") -> dict:
    """Train a population for ``epochs`` epochs; return per-epoch metrics and kept weights.

    Returns ``{"metrics": {name: [epochs+1, N]}, "weights": {epoch: [N, P]}}`` (numpy).
    """
    n = len(specs)
    if init_weights is not None:
        init_weights = torch.from_numpy(np.array(init_weights, dtype=np.float32))
        P = architectures.layout_of(arch, data.in_channels, data.num_classes).num_params
        if init_weights.shape != (n, P):
            raise RaysysError(f"initial weights have shape {tuple(init_weights.shape)} but {n} {arch} models on "
                              f"{data.name} need ({n}, {P}). Decode with the zoo's architecture and dataset shape.")
    metrics = {m: np.full((epochs + 1, n), np.nan) for m in METRICS}
    kept: dict[int, np.ndarray] = {}

    def on_epoch(epoch, weights, values):
        for k in METRICS:
            metrics[k][epoch] = values[k]
        if epoch in keep_epochs:
            kept[epoch] = weights.detach().cpu().numpy().astype(np.float32)

    train_population(arch, specs, data, epochs, on_epoch, device=device, init_weights=init_weights)
    return {"metrics": metrics, "weights": kept}


class FinetuneWorker:
    """Ray actor body: fine-tunes one population per call, caching loaded datasets."""

    def __init__(self, num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._data: dict[str, ImageData] = {}

    def data(self, name: str, options: dict) -> ImageData:
        key = f"{name}:{sorted(options.items())}"
        if key not in self._data:
            self._data[key] = datasets.load(name, **options)
        return self._data[key]

    def run(self, index: int, job: Job) -> tuple[int, dict]:
        data = self.data(job.dataset, job.dataset_options)
        out = finetune_population(job.arch, job.specs, data, job.epochs, job.weights, job.keep_epochs, self.device)
        return index, out


def run_jobs(jobs: list[Job], num_actors: int = 2, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
             progress: bool = True, on_result=None, max_retries: int = 3) -> list[dict]:
    """Fine-tune every job on a pool of actors; results come back in job order.

    ``on_result(job, result)`` is called on the driver as each population finishes (for
    tracking). Ray must be initialized by the caller.
    """
    import ray
    from tqdm.auto import tqdm

    if not ray.is_initialized():
        raise RaysysError("Ray is not initialized. Call ray.init(address=...) first (address='local' on a laptop).")
    if not jobs:
        return []
    have = ray.cluster_resources()
    for name, want in (("GPU", gpus_per_actor), ("CPU", cpus_per_actor)):
        if want > have.get(name, 0):
            # Not an error: an autoscaling cluster adds GPU nodes on demand. On a laptop it would wait forever.
            warnings.warn(f"each fine-tuning actor asks for {want} {name}(s) but the Ray cluster has "
                          f"{have.get(name, 0)} right now; actors wait until an autoscaler adds nodes. On a fixed "
                          f"cluster or a laptop set finetune.{name.lower()}s_per_actor to at most that.", stacklevel=2)
    # A crashed actor (OOM kill, lost node) is restarted by Ray and its call retried; one killed for
    # good (ray.kill) is replaced here and its population requeued. Populations are deterministic, so a
    # retry gives the same result, and each population's result is delivered exactly once.
    actor_cls = ray.remote(FinetuneWorker)
    options = dict(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, max_restarts=max_retries,
                   max_task_retries=max_retries)
    pool_id = uuid.uuid4().hex[:8]
    made: list = []

    def new_actor():
        # named so an operator (or a test) can find and kill one: raysys-finetune-<pool>-<n>
        name = f"raysys-finetune-{pool_id}-{len(made)}"
        made.append(actor_cls.options(name=name, **options).remote(max(1, int(cpus_per_actor))))
        return made[-1]

    idle = [new_actor() for _ in range(max(1, min(num_actors, len(jobs))))]
    queue = list(range(len(jobs)))
    running: dict[Any, tuple] = {}
    attempts = [0] * len(jobs)
    results: list[dict | None] = [None] * len(jobs)
    try:
        with tqdm(total=len(jobs), desc="fine-tuning populations", unit="pop", disable=not progress) as bar:
            while queue or running:
                while queue and idle:
                    i, actor = queue.pop(0), idle.pop()
                    running[actor.run.remote(i, jobs[i])] = (actor, i)
                [ref], _ = ray.wait(list(running), num_returns=1)
                actor, i = running.pop(ref)
                try:
                    _, out = ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    ray.kill(actor)  # free its resources before its replacement asks for them
                    attempts[i] += 1
                    if attempts[i] > max_retries:
                        raise RaysysError(f"fine-tuning population {jobs[i].key} lost its actor {attempts[i]} times "
                                          f"(last: {str(err).splitlines()[0]}). Check the Ray workers' memory "
                                          f"(ray status) and rerun.") from None
                    idle.append(new_actor())
                    queue.insert(0, i)
                    continue
                results[i] = out
                if on_result is not None:
                    on_result(jobs[i], out)
                bar.set_postfix_str(jobs[i].key)
                bar.update()
                idle.append(actor)
    finally:
        for a in made:
            ray.kill(a)
    done = [r for r in results if r is not None]
    if len(done) != len(jobs):  # every job either returned or raised above
        raise RaysysError(f"{len(jobs) - len(done)} fine-tuning populations returned no result")
    return done
