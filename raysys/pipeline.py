"""One command for the whole flow: zoo -> hyper-representation -> populations -> report.

    raysys pipeline configs/pipeline/demo.yaml --out runs/demo

Output directory::

    DIR/zoo/                 the model zoo (raysys zoo generate)            + __raysys__/stage.json
    DIR/zoo_aligned/         its weight-matched copy (raysys zoo align), when ``align`` is set
    DIR/hyperrep/            autoencoder checkpoint, eval/ (probes, figures) + stage.json
    DIR/hyperrep_nolwln/     the same without LWLN, for the B_KDE30 baseline (optional)
    DIR/populations/         sampled + baseline populations, fine-tuned   + stage.json
    DIR/report.md, DIR/report.json, DIR/*.png

(A zoo directory keeps its ``stage.json`` in ``__raysys__/``, so that the directory stays a plain
Parquet dataset.) A stage is skipped when its ``stage.json`` records the hash of the config that produced it (and of
everything upstream); a changed config redoes that stage and every stage after it. An interrupted stage
is redone, except the zoo (its complete shards are kept) and an autoencoder, which continues from its
``resume/`` state (:func:`autoencoder_resumable`). Every stage
logs to MLflow; the pipeline's own run (experiment ``raysys-pipeline``) links the stage runs, and
each stage run is tagged with its parents (``raysys.parent_zoo_run``, ``raysys.parent_hyperrep_run``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from raysys import __version__
from raysys.config import Config, ConfigError, RaysysError, apply_overrides, read_yaml, validate
from raysys.store import META, SUMMARY_PLOT, atomic_write_bytes, atomic_write_json, meta_file
from raysys.provenance import code_fingerprint, describe, same_code
from raysys.tracking import mask_uri

STAGE_FILE = "stage.json"
TRACKING_FILE = "tracking.json"  # the MLflow URI of the run into DIR (password masked), for reruns
RUNNING_FILE = ".running.json"  # the hash of the run in progress in a stage directory whose work can resume
LOCK_FILE = ".lock"  # while a pipeline runs into DIR: one pipeline per output directory (raysys.store.WriterLock)
EXPERIMENTS = {"zoo": "raysys-zoo", "hyperrep": "raysys-hyperrep", "populations": "raysys-populations",
               "pipeline": "raysys-pipeline"}


class PipelineConfig(Config):
    name: str = "pipeline"
    # Each stage config is embedded (a mapping) or a path to its YAML, relative to the pipeline config.
    zoo: dict[str, Any] | str
    hyperrep: dict[str, Any] | str
    populations: dict[str, Any] | str
    # Weight-match every zoo state onto one template (raysys zoo align) before the autoencoder: {} for the
    # defaults, or {template_epochs: 5, rounds: 3}. The autoencoder and populations then read DIR/zoo_aligned.
    align: dict[str, Any] | None = None
    evaluate: bool = True            # probes + figures of the autoencoder (DIR/hyperrep/eval)
    nolwln_baseline: bool = False    # also train the autoencoder without LWLN, for B_KDE30
    hyperrep_gpus: float = Field(0.0, ge=0)  # >0: train the autoencoder in a Ray task on a GPU node
    # None: $MLFLOW_TRACKING_URI, else the URI a previous run into DIR recorded, else sqlite:///<cwd>/mlflow.db
    tracking_uri: str | None = None
    ray_address: str | None = None   # None: $RAY_ADDRESS (set inside `ray job submit`), else a private local Ray


# --- the flow -----------------------------------------------------------------------------------

def run_pipeline(config: PipelineConfig, out_dir: str | Path, config_dir: str | Path | None = None,
                 progress: bool = True) -> dict:
    """Run (or resume) every stage into ``out_dir``; returns the report dict (also DIR/report.json)."""
    from raysys import populations, zoo

    from raysys.store import WriterLock

    stages = stage_configs(config, config_dir)
    from raysys.storage import is_remote

    if config.hyperrep_gpus > 0 and is_remote(out_dir):
        # the stages of a remote --out work in a local copy on the driver, which a GPU node's task cannot see
        raise ConfigError(f"hyperrep_gpus: {config.hyperrep_gpus} trains the autoencoder in a Ray task on a GPU "
                          f"node, which cannot see the driver's working copy of --out {out_dir}. Give --out a "
                          f"folder every node mounts (the cluster's shared filesystem), or set hyperrep_gpus: 0 "
                          f"to train it on the driver.")
    with output_storage(out_dir) as (out, remote), \
            ray_session(config.ray_address, storage=remote.uri if remote is not None else out) as start_ray, \
            WriterLock(out, "raysys pipeline", path=out / LOCK_FILE):
        uri = tracking_uri(config, out)
        out.mkdir(parents=True, exist_ok=True)
        record_tracking_uri(out, uri)
        stages["zoo"].mlflow.tracking_uri = uri
        stages["populations"].mlflow.tracking_uri = uri
        ensure_experiments(uri, [stages["zoo"].mlflow.experiment, EXPERIMENTS["hyperrep"],
                                 stages["populations"].mlflow.experiment, EXPERIMENTS["pipeline"]])
        h = stage_hashes(config, stages)
        legacy = stage_hashes(config, stages, code=False)  # what records written before code fingerprints hold
        runs: dict[str, str | None] = {}

        def stage(name: str, work: Callable[[Path], str | None], resumable: bool | Callable[[Path], bool] = False,
                  inputs: tuple[str, ...] = ()) -> str | None:
            run_id = run_stage(out / name, h[name], work, resumable, before=start_ray,  # Ray only if work is left
                               inputs={i: out / i for i in inputs}, code=code_fingerprint(name),
                               legacy_hash=legacy[name])
            if remote is not None:  # published as soon as it is complete: a crash later loses nothing of it
                remote.push(name)
            return run_id

        def zoo_work(d: Path) -> str | None:
            # on a remote --out the workers publish the zoo's shards there directly (zoo.generate's remote)
            sub = remote.sub("zoo", local=d) if remote is not None else None
            zoo.generate(stages["zoo"], d, progress=progress, remote=sub)
            return find_run(uri, stages["zoo"].mlflow.experiment, sub.uri if sub is not None else d)

        runs["zoo"] = stage("zoo", resumable=True, work=zoo_work)
        zoo_dir = out / "zoo"
        if "align" in stages:
            stage("zoo_aligned", lambda d: align_stage(stages["align"], out / "zoo", d, progress), inputs=("zoo",))
            zoo_dir = out / "zoo_aligned"
        runs["hyperrep"] = stage("hyperrep", lambda d: train_autoencoder(
            stages["hyperrep"], zoo_dir, d, uri, config.evaluate, config.hyperrep_gpus, progress),
            inputs=(zoo_dir.name,), resumable=autoencoder_resumable(stages["hyperrep"], zoo_dir))
        runs["hyperrep_eval"] = read_json(out / "hyperrep" / "eval" / "eval.json").get("mlflow_run_id")
        if config.nolwln_baseline:
            nolwln = stages["hyperrep"].model_copy(deep=True)
            nolwln.loss.lwln = False
            runs["hyperrep_nolwln"] = stage("hyperrep_nolwln", lambda d: train_autoencoder(
                nolwln, zoo_dir, d, uri, False, config.hyperrep_gpus, progress), inputs=(zoo_dir.name,),
                resumable=autoencoder_resumable(nolwln, zoo_dir))
        pop_inputs = (zoo_dir.name, "hyperrep", *(("hyperrep_nolwln",) if config.nolwln_baseline else ()))
        runs["populations"] = stage("populations", inputs=pop_inputs, work=lambda d: populations.run_populations(
            stages["populations"], zoo_dir, out / "hyperrep", d,
            out / "hyperrep_nolwln" if config.nolwln_baseline else None,
            tracking_uri=uri, progress=progress).get("mlflow_parent_run_id"))

        report = write_report(config, out, h, runs)
        report["mlflow"] = link_runs(uri, config, out, runs, report)
        atomic_write_json(out / "report.json", report)
        return report


# --- configs and hashes -------------------------------------------------------------------------

def stage_configs(config: PipelineConfig, config_dir: str | Path | None = None) -> dict[str, Any]:
    """The validated stage configs (embedded mappings, or YAML paths relative to ``config_dir``)."""
    from raysys.hyperrep.config import HyperRepConfig
    from raysys.populations import PopulationsConfig
    from raysys.zoo import ZooConfig

    out: dict[str, Any] = {}
    for key, cls in (("zoo", ZooConfig), ("hyperrep", HyperRepConfig), ("populations", PopulationsConfig)):
        value = getattr(config, key)
        if isinstance(value, str):
            path = Path(value).expanduser()
            path = path if path.is_absolute() or config_dir is None else Path(config_dir) / path
            if not path.exists():
                raise ConfigError(f"pipeline key '{key}' names {path}, which does not exist. Give a path relative "
                                  f"to the pipeline config's directory, or embed the {key} config as a mapping.")
            out[key] = validate(cls, read_yaml(path), source=f"{path} (pipeline key '{key}')")
        else:
            out[key] = validate(cls, value, source=f"pipeline key '{key}'")
    if config.align is not None:
        from raysys.align import AlignOptions
        out["align"] = validate(AlignOptions, config.align, source="pipeline key 'align'")
    # populations fine-tune on the zoo's dataset: the same loader options, unless set explicitly
    if not out["populations"].dataset_options and out["zoo"].dataset.options:
        out["populations"].dataset_options = dict(out["zoo"].dataset.options)
    return out


# Settings that change where and how fast a stage runs, not what it produces.
RUN_ONLY = {"zoo": ("resources", "ray_address", "mlflow"), "hyperrep": (),
            "populations": ("mlflow", "finetune.num_actors", "finetune.cpus_per_actor", "finetune.gpus_per_actor")}


def identity(stage: str, cfg: Config) -> dict:
    d = cfg.model_dump(mode="json")
    for key in RUN_ONLY.get(stage, ()):
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            node = node.get(p) or {}
        node.pop(leaf, None)
    return d


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def stage_hashes(config: PipelineConfig, stages: dict[str, Config], code: bool = True) -> dict[str, str]:
    """Each stage's hash covers its own config, the fingerprint of its own code
    (:func:`raysys.provenance.code_fingerprint`) and its inputs' hashes, so a change flows downstream.
    (The bytes of the inputs are checked apart, against the digests each stage record keeps.)
    ``code=False``: the hashes of a raysys before code fingerprints, to recognise its records."""
    def key(stage: str, d: dict) -> str:
        if code:
            fp = code_fingerprint(stage)
            d = {**d, "code": [fp["raysys_version"], fp["sources"]]}
        return digest(d)

    h = {"zoo": key("zoo", {"zoo": identity("zoo", stages["zoo"])})}
    upstream = h["zoo"]
    if "align" in stages:
        h["zoo_aligned"] = upstream = key("zoo_aligned", {"align": stages["align"].model_dump(mode="json"),
                                                          "zoo": h["zoo"]})
    h["hyperrep"] = key("hyperrep", {"hyperrep": identity("hyperrep", stages["hyperrep"]), "zoo": upstream,
                                     "evaluate": config.evaluate})
    h["hyperrep_nolwln"] = key("hyperrep_nolwln", {"hyperrep_nolwln": identity("hyperrep", stages["hyperrep"]),
                                                   "zoo": upstream})
    h["populations"] = key("populations", {"populations": identity("populations", stages["populations"]),
                                           "hyperrep": h["hyperrep"],
                                           "nolwln": h["hyperrep_nolwln"] if config.nolwln_baseline else None})
    return h


# --- stages -------------------------------------------------------------------------------------

def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def stage_file(stage_dir: Path) -> Path:
    """Where a stage's record is: ``__raysys__/stage.json`` in a zoo directory (or an old zoo's top level),
    ``stage.json`` elsewhere."""
    return meta_file(stage_dir, STAGE_FILE) if (stage_dir / META).is_dir() else stage_dir / STAGE_FILE


def stage_record(stage_dir: Path) -> dict | None:
    path = stage_file(stage_dir)
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        return None  # a corrupt record means "not done"


def output_digests(stage_dir: Path) -> dict[str, str]:
    """sha256 of the files that are a stage's output, by path relative to ``stage_dir``: a zoo's shard files (its
    data; the manifest is rewritten by every resume), elsewhere every file but the stage record, hidden files
    (temporary files, locks) and the quarantine."""
    from raysys.store import SHARDS, sha256_file

    stage_dir = Path(stage_dir)
    if (stage_dir / META).is_dir():
        files = sorted((stage_dir / SHARDS).glob("shard-*.parquet"))
    else:
        files = sorted(p for p in stage_dir.rglob("*") if p.is_file() and p.name != STAGE_FILE
                       and not any(part.startswith(".") for part in p.relative_to(stage_dir).parts))
    return {p.relative_to(stage_dir).as_posix(): sha256_file(p) for p in files}


def _difference(recorded: dict, now: dict) -> str | None:
    """The first file whose digest differs between two digest maps, as a phrase; None when they agree."""
    for name in sorted(set(recorded) | set(now)):
        if name not in now:
            return f"{name} is gone"
        if name not in recorded:
            return f"{name} is new"
        if recorded[name] != now[name]:
            return f"{name} changed (sha256 {str(recorded[name])[:12]}... -> {now[name][:12]}...)"
    return None


def _changed_since(stage_dir: Path, record: dict, inputs: dict[str, Path]) -> tuple[str, str] | None:
    """("outputs" or "inputs", what changed) when a file the stage wrote or read differs from the digests its
    record took when it ran; None when every one matches (or the record, older, has none)."""
    if "outputs" not in record:
        return None
    diff = _difference(record["outputs"], output_digests(stage_dir))
    if diff is not None:
        return "outputs", f"its output {diff}"
    for name, path in inputs.items():
        diff = _difference(record.get("inputs", {}).get(name, {}), output_digests(path))
        if diff is not None:
            return "inputs", f"its input {name}/{diff}"
    return None


def run_stage(stage_dir: Path, stage_hash: str, work: Callable[[Path], str | None],
              resumable: bool | Callable[[Path], bool] = False,
              before: Callable[[], None] | None = None, inputs: dict[str, Path] | None = None,
              code: dict | None = None, legacy_hash: str | None = None) -> str | None:
    """Run ``work(stage_dir)`` unless ``stage_dir`` already holds this hash's output; returns its MLflow run id.

    Output from another config is removed first. An interrupted stage (no record) is resumed when
    the stage can resume (the zoo keeps its complete shards) and redone from scratch otherwise.
    ``inputs`` ({name: directory}) are the upstream stages' outputs this stage reads: the record keeps the
    sha256 of each of their files and of the stage's own output (:func:`output_digests`), and "up to date"
    also means that none of them has changed since. A changed output of a resumable stage resumes it (the
    zoo quarantines and rewrites the damaged shard); any other change redoes the stage.
    ``code``: the fingerprint of the stage's code (kept in the record): a record that names other code is
    redone, never resumed. ``legacy_hash``: the stage's hash as a raysys without code fingerprints computed
    it; a record of such a raysys (no ``code``) with that hash is trusted as before.

    ``resumable`` may also be a check, ``resumable(stage_dir) -> bool``, for a stage whose work resumes from a
    state it keeps in its directory (the autoencoder's ``resume/``): an interrupted run (no record) is then
    continued only when the run in progress had this hash (``.running.json``, written before ``work``) and the
    check accepts the state it left; otherwise the directory is removed and the stage starts fresh, with a line.
    """
    inputs = inputs or {}
    check = resumable if callable(resumable) else None
    if check is not None:
        resumable = record_free_resume(stage_dir, stage_hash, check)
    record = stage_record(stage_dir)
    redo = None
    if record is not None and code is not None and "code" in record and not same_code(record["code"], code):
        redo = f"its code changed ({describe(record['code'])} -> {describe(code)})"
        print(f"raysys pipeline: {stage_dir.name}: {redo} since it ran, redoing", flush=True)
    elif record is not None and (record.get("hash") == stage_hash or (
            legacy_hash is not None and "code" not in record and record.get("hash") == legacy_hash)):
        changed = _changed_since(stage_dir, record, inputs)
        if changed is None:
            print(f"raysys pipeline: {stage_dir.name}: up to date ({stage_hash}), skipped", flush=True)
            return record.get("mlflow_run_id")
        kind, redo = changed
        print(f"raysys pipeline: {stage_dir.name}: {redo} since it ran, "
              f"{'resuming' if kind == 'outputs' and resumable else 'redoing'}", flush=True)
        if kind == "outputs" and resumable:
            stage_file(stage_dir).unlink(missing_ok=True)
            record = None
    if stage_dir.exists() and (record is not None or not resumable):
        if redo is None:
            why = f"config changed ({record.get('hash')} -> {stage_hash})" if record else "interrupted run"
            print(f"raysys pipeline: {stage_dir.name}: {why}, redoing", flush=True)
        shutil.rmtree(stage_dir)
    print(f"raysys pipeline: {stage_dir.name}: running", flush=True)
    if check is not None:
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(stage_dir / RUNNING_FILE, {"hash": stage_hash})
    if before is not None:
        before()
    t0 = time.time()
    input_digests = {name: output_digests(path) for name, path in inputs.items()}  # what the stage reads
    run_id = work(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    path = stage_dir / META / STAGE_FILE if (stage_dir / META).is_dir() else stage_dir / STAGE_FILE
    atomic_write_json(path, {"stage": stage_dir.name, "hash": stage_hash, "mlflow_run_id": run_id,
                             "seconds": round(time.time() - t0, 1), "raysys_version": __version__,
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "inputs": input_digests, "outputs": output_digests(stage_dir),
                             **({"code": code} if code is not None else {})})
    (stage_dir / RUNNING_FILE).unlink(missing_ok=True)
    return run_id


def record_free_resume(stage_dir: Path, stage_hash: str, check: Callable[[Path], bool]) -> bool:
    """Whether the interrupted run in ``stage_dir`` (a directory without a stage record) can be continued: it ran
    with ``stage_hash`` (same config, code, upstream) and ``check`` accepts what it left. A stage that finished
    (a record) is judged by :func:`run_stage` itself; this answers False for it and for an empty directory."""
    if stage_record(stage_dir) is not None or not stage_dir.is_dir():
        return False
    running = read_json(stage_dir / RUNNING_FILE) if (stage_dir / RUNNING_FILE).is_file() else {}
    if running.get("hash") != stage_hash:
        if running:
            print(f"raysys pipeline: {stage_dir.name}: the interrupted run had another config or code "
                  f"({running.get('hash')} -> {stage_hash}), not resuming it", flush=True)
        return False
    return check(stage_dir)


def autoencoder_resumable(cfg, zoo_dir: Path) -> Callable[[Path], bool]:
    """The check of :func:`run_stage` for an autoencoder stage: its directory holds a resume state
    (``resume/state.safetensors``) of this config and this zoo. A state that does not fit (another config or
    zoo, unreadable) is not resumed: a line names why, and the stage starts again from epoch 1."""
    def check(stage_dir: Path) -> bool:
        from raysys.config import RaysysError
        from raysys.hyperrep.checkpoint import manifest_sha256
        from raysys.hyperrep.train import RESUME_DIR, RESUME_FILE, load_resume_state

        if not (stage_dir / RESUME_DIR / RESUME_FILE).is_file():
            return False
        try:
            state = load_resume_state(stage_dir, cfg.model_dump(mode="json"), manifest_sha256(zoo_dir))
        except RaysysError as err:
            print(f"raysys pipeline: {stage_dir.name}: its resume state does not fit ({err}); "
                  f"starting again from epoch 1", flush=True)
            return False
        if state is None:
            return False
        print(f"raysys pipeline: {stage_dir.name}: interrupted after epoch {state['epoch']}, "
              f"resuming at epoch {state['epoch'] + 1}", flush=True)
        return True
    return check


def align_stage(options, zoo_dir: Path, out_dir: Path, progress: bool) -> None:
    """The weight-matched copy of the zoo (raysys zoo align); no MLflow run of its own."""
    from raysys.align import align_zoo

    summary = align_zoo(zoo_dir, out_dir, options.template_epochs, options.rounds, progress=progress)
    print(f"raysys pipeline: zoo_aligned: L2 to the template {summary['mean_l2_to_template_before']:.3f} -> "
          f"{summary['mean_l2_to_template_after']:.3f}", flush=True)


def train_autoencoder(cfg, zoo_dir: Path, out_dir: Path, uri: str, evaluate: bool, gpus: float,
                      progress: bool) -> str | None:
    """Train (and evaluate) a hyper-representation; on a GPU node when ``gpus`` > 0."""
    def work():
        from raysys.hyperrep.evaluate import evaluate as evaluate_autoencoder
        from raysys.hyperrep.train import train

        # resume=True continues from out_dir/resume/ when run_stage kept it (same stage hash, a fitting state);
        # otherwise run_stage removed the directory and this starts at epoch 1
        summary = train(cfg, zoo_dir, out_dir, tracking_uri=uri, experiment=EXPERIMENTS["hyperrep"],
                        progress=progress, resume=True)
        atomic_write_json(out_dir / "summary.json", summary)  # the report reads it when the stage is skipped
        if evaluate:
            evaluate_autoencoder(out_dir, zoo_dir, out_dir / "eval", tracking_uri=uri)
        return summary.get("mlflow_run_id")

    if gpus <= 0:
        return work()
    import ray

    # the driver of a cluster job runs on the CPU-only head; the autoencoder wants the GPU
    return ray.get(ray.remote(num_gpus=gpus, num_cpus=1)(work).remote())


# --- environment: output storage, Ray, MLflow ----------------------------------------------------

@contextmanager
def output_storage(uri: str | Path, filesystem=None):
    """Yield ``(local directory, remote)`` for the outputs of ``uri``; ``remote`` is None for a local one.

    A local path (or file://) is used directly. A remote URI (s3://, gs://, ...), resolved through pyarrow's
    filesystems (:class:`raysys.storage.Remote`), is worked on in a local scratch directory: everything published
    there is pulled first (so finished stages are skipped and an interrupted zoo resumes from its published shards);
    :func:`run_pipeline` publishes each stage as soon as it completes (the zoo's shards as they are written), and
    everything is pushed again at the end, even after a failure.
    ``filesystem``: a pyarrow filesystem to resolve ``uri`` in, instead of the one its scheme names.
    """
    import pyarrow.fs as pafs

    from raysys.storage import Remote

    text = str(uri)
    if "://" not in text and filesystem is None:
        yield Path(text).expanduser().resolve(), None
        return
    if text.startswith("file://") and filesystem is None:
        yield Path(text[len("file://"):]).expanduser().resolve(), None
        return
    scratch = Path(tempfile.mkdtemp(prefix="raysys-pipeline-"))
    try:
        remote = Remote(text, local=scratch, filesystem=filesystem)
    except Exception:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if isinstance(remote.fs, pafs.LocalFileSystem):
        shutil.rmtree(scratch, ignore_errors=True)
        yield Path(remote.path).resolve(), None
        return
    try:
        try:
            remote.pull()
        except RaysysError as err:
            raise ConfigError(str(err)) from None
        yield scratch, remote
        remote.push()
    except BaseException:
        try:
            remote.push()  # what a failed run finished is kept: a rerun resumes from it
        except Exception:  # noqa: S110 - the run's own error is the one to report
            pass
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def output_dir(uri: str | Path, filesystem=None):
    """The local directory of :func:`output_storage` alone."""
    with output_storage(uri, filesystem) as (out, _):
        yield out


@contextmanager
def ray_session(address: str | None, storage: str | Path | None = None):
    """Yield ``start()``, which joins Ray on first use, so that a run whose stages are all up to date
    needs no Ray at all. A Ray the caller started (a test, a job driver) is used as is; otherwise
    ``address``, else $RAY_ADDRESS (set inside `ray job submit`), else a private local Ray.
    ``storage``: the output every node must see (:func:`raysys.storage.check_shared_storage`, once joined)."""
    import ray

    started: list[str | None] = []  # the address joined, once
    checked: list[str | Path] = []  # the storage checked, once

    def start() -> None:
        from raysys.runtime import init_ray
        from raysys.storage import check_shared_storage

        if init_ray(address):
            started.append(address)
        if storage is not None and not checked:  # once: before the first stage with work puts anything on a node
            check_shared_storage(storage)
            checked.append(storage)

    try:
        yield start
    finally:
        if started:
            ray.shutdown()


def tracking_uri(config: PipelineConfig, out: Path) -> str:
    """The config's URI, else ``$MLFLOW_TRACKING_URI``, else the one a previous run into ``out`` recorded
    (a rerun keeps logging where it started; runs before this record used DIR/mlflow.db), else
    ``sqlite:///<cwd>/mlflow.db``: the store every raysys command uses by default."""
    from raysys import tracking

    uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        recorded = read_json(out / TRACKING_FILE).get("tracking_uri")
        # kept without its password: from $MLFLOW_TRACKING_URI or $MLFLOW_TRACKING_USERNAME/PASSWORD
        recorded = recorded and tracking.with_credentials(recorded)
        uri = recorded or (f"sqlite:///{out / 'mlflow.db'}" if (out / "mlflow.db").is_file() else None)
    return tracking.resolve_tracking_uri(uri)


def record_tracking_uri(out: Path, uri: str) -> None:
    """DIR/tracking.json: the URI a rerun logs to, without its password (:func:`tracking_uri` takes that from
    ``$MLFLOW_TRACKING_URI`` or ``$MLFLOW_TRACKING_USERNAME``/``$MLFLOW_TRACKING_PASSWORD``)."""
    atomic_write_json(out / TRACKING_FILE, {"tracking_uri": mask_uri(uri)})


def ensure_experiments(uri: str, names: list[str]) -> None:
    """Create the stage experiments up front, with artifacts beside a sqlite database."""
    from raysys import tracking

    for name in names:
        tracking.experiment_id(uri, name)


def find_run(uri: str, experiment: str, out_dir: Path) -> str | None:
    """The latest run of ``experiment`` for ``out_dir`` (the zoo stage tags its runs with raysys.out_dir)."""
    from raysys import tracking

    client = tracking.client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    where = str(out_dir) if "://" in str(out_dir) else str(Path(out_dir).resolve())
    runs = client.search_runs([exp.experiment_id], f"tags.`raysys.out_dir` = '{where}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def link_runs(uri: str, config: PipelineConfig, out: Path, runs: dict, report: dict) -> dict:
    """One pipeline run that points at the stage runs; stage runs tagged with their parents and the pipeline."""
    from raysys import tracking

    tags = {"raysys.stage": "pipeline", "raysys.pipeline": config.name, "raysys.out_dir": str(out),
            "raysys.version": __version__, **{f"raysys.{k}_run": v for k, v in runs.items() if v}}
    client, rid = tracking.new_run(uri, EXPERIMENTS["pipeline"], run_name=config.name, tags=tags,
                                   params={"hash": report.get("hashes", {})})
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric(k, v, now, 0) for k, v in flat_metrics(report).items()])
    for name in ["report.md", "report.json", *report.get("figures", [])]:
        if (out / name).exists():
            client.log_artifact(rid, str(out / name))
    parents = {"hyperrep": {"raysys.parent_zoo_run": runs.get("zoo")},
               "hyperrep_eval": {"raysys.parent_zoo_run": runs.get("zoo"),
                                 "raysys.parent_hyperrep_run": runs.get("hyperrep")},
               "hyperrep_nolwln": {"raysys.parent_zoo_run": runs.get("zoo")},
               "populations": {"raysys.parent_zoo_run": runs.get("zoo"),
                               "raysys.parent_hyperrep_run": runs.get("hyperrep")}}
    tracking.tag_runs(client, {stage_run: {"raysys.pipeline_run": rid, "raysys.pipeline": config.name,
                                           **parents.get(stage, {})} for stage, stage_run in runs.items()})
    client.set_terminated(rid, "FINISHED")
    return {"tracking_uri": mask_uri(uri), "pipeline_run": rid, **{f"{k}_run": v for k, v in runs.items()}}


# --- the report ---------------------------------------------------------------------------------

def flat_metrics(report: dict) -> dict[str, float]:
    out = {}
    z, h = report.get("zoo", {}), report.get("hyperrep", {})
    if z.get("test_acc_last"):
        out["zoo.test_acc_last_mean"] = z["test_acc_last"][0]
    for key in ("test_r2", "val_r2"):
        if isinstance(h.get(key), (int, float)):
            out[f"hyperrep.{key}"] = h[key]
    for row in report.get("populations", {}).get("accuracy", []):
        out[f"populations.{row['setting']}.{row['method']}.ep{row['epoch']}.test_acc"] = row["mean"]
    return {k: float(v) for k, v in out.items() if v == v}


def write_report(config: PipelineConfig, out: Path, hashes: dict, runs: dict) -> dict:
    """DIR/report.md + DIR/report.json + the stage figures copied into DIR."""
    from raysys import zoo as zoo_stage
    from raysys.populations import report as pop_report
    from raysys.store import open_zoo

    zoo_summary = zoo_stage.summarize(open_zoo(out / "zoo"))
    hyperrep = json.loads((out / "hyperrep" / "summary.json").read_text())
    evaluation = read_json(out / "hyperrep" / "eval" / "eval.json") or None
    results = json.loads((out / "populations" / "results.json").read_text())
    tables = pop_report.tables(results)
    accuracy = [{"setting": s, **row} for s, t in tables.items() for row in t["accuracy"]]

    figures = []
    for src, name in [(meta_file(out / "zoo", SUMMARY_PLOT), "zoo_accuracy.png"),
                      (out / "hyperrep" / "eval" / "reconstruction.png", "hyperrep_reconstruction.png"),
                      (out / "hyperrep" / "eval" / "latent_pca.png", "hyperrep_latent.png"),
                      (out / "populations" / "accuracy_curves.png", "populations_accuracy.png"),
                      (out / "populations" / "accuracy_vs_novelty.png", "populations_novelty.png")]:
        if src.exists():
            atomic_write_bytes(out / name, src.read_bytes())
            figures.append(name)

    report = {"name": config.name, "raysys_version": __version__, "out_dir": str(out), "hashes": hashes,
              "zoo": zoo_summary, "hyperrep": hyperrep,
              "hyperrep_eval": None if evaluation is None else {
                  "reconstruction_r2": evaluation["reconstruction"]["r2"],
                  "reconstruction_r2_ref": evaluation["reconstruction"].get("r2_ref"),
                  "yardsticks": _yardsticks(evaluation), "beats_pca": evaluation.get("beats_pca"),
                  "verdict": evaluation.get("verdict"), "zoo_aligned": evaluation.get("zoo_aligned"),
                  "accuracy": evaluation["accuracy"], "probes": evaluation["probes"]},
              "populations": {"num_models": results["num_models"], "budgets": results["budgets"],
                              "accuracy": accuracy, "skipped": results.get("skipped", [])},
              "figures": figures}
    atomic_write_bytes(out / "report.md", markdown(report, pop_report.markdown(results, tables)).encode())
    atomic_write_json(out / "report.json", report)
    return report


def _yardsticks(evaluation: dict) -> dict | None:
    """The headline numbers of eval.json's reconstruction yardsticks (None for an older eval.json)."""
    sticks = evaluation["reconstruction"].get("yardsticks")
    if not sticks:
        return None
    return {"pca_k": sticks["pca"]["k"], "pca_r2": sticks["pca"]["r2"], "pca_r2_ref": sticks["pca"]["r2_ref"],
            "mean_r2": sticks["mean"]["r2"], "fit_epochs": sticks["fit"]["epochs"], "fit_rows": sticks["fit"]["rows"]}


def markdown(report: dict, populations_md: str) -> str:
    z, h, e = report["zoo"], report["hyperrep"], report["hyperrep_eval"]
    pct = lambda ms: f"{100 * ms[0]:.1f} % (std {100 * ms[1]:.1f})"  # noqa: E731
    lines = [f"# raysys pipeline: {report['name']}", "",
             f"raysys {report['raysys_version']}; outputs in `{report['out_dir']}`.", "",
             "## Zoo", "",
             f"{z['models']} `{z['arch']}` models on `{z['dataset']}` ({z['num_params']} parameters), epochs "
             f"{z['epochs'][0]}..{z['epochs'][1]}, splits {z['splits']}, {z['diverged_models']} diverged. "
             f"Test accuracy at the first epoch {pct(z['test_acc_first'])}, at the last {pct(z['test_acc_last'])}.", "",
             "## Hyper-representation", ""]
    if h:
        lines.append(f"Trained on {h.get('train')} zoo states ({h.get('val')} validation, {h.get('test')} test) for "
                     f"{h.get('epochs_run')} epochs in {h.get('train_seconds', float('nan')):.0f} s; best epoch "
                     f"{h.get('best_epoch')}, validation R² {h.get('val_r2', float('nan')):.3f}, "
                     f"test R² {h.get('test_r2', float('nan')):.3f}.")
    if e:
        acc = e["accuracy"]
        num = lambda v: "n/a" if v is None or v != v else f"{v:.3f}"  # noqa: E731
        lines += ["", f"Reconstruction R² on the test split: {num(e['reconstruction_r2'])}. Decoded models reach "
                      f"{100 * acc['decoded']['mean']:.1f} % test accuracy where the originals reach "
                      f"{100 * acc['original']['mean']:.1f} % (chance {100 * acc['chance']:.0f} %)."]
        y = e.get("yardsticks")
        if y:
            k = y["pca_k"]
            lines += ["", f"Yardsticks, fit on the training split's states at epochs {y['fit_epochs'][0]}.."
                          f"{y['fit_epochs'][-1]} ({y['fit_rows']} states): PCA-{k} test R² {num(y['pca_r2'])}, "
                          f"train-mean predictor {num(y['mean_r2'])}. In the reference convention (SS_tot around "
                          f"the train mean) the autoencoder scores {num(e.get('reconstruction_r2_ref'))}, PCA-{k} "
                          f"{num(y['pca_r2_ref'])}. PCA-{k} reconstructions reach {100 * acc['pca']['mean']:.1f} % "
                          f"test accuracy, the train-mean model {100 * acc['mean_model']['mean']:.1f} % "
                          f"(zoo {'' if e.get('zoo_aligned') else 'not '}aligned).",
                      "", f"**{e['verdict'][0].upper()}{e['verdict'][1:]}.**"]
    lines += [""]
    body = populations_md.splitlines()
    body = body[1:] if body and body[0].startswith("# ") else body  # its title names the zoo directory
    lines += ["## Sampled populations"] + ["#" + line if line.startswith("#") else line for line in body]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in report["figures"]]
    return "\n".join(lines).rstrip() + "\n"


# --- CLI ----------------------------------------------------------------------------------------

def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    return validate(PipelineConfig, apply_overrides(read_yaml(path), overrides), source=str(path))


def _cmd(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    if getattr(args, "tracking_uri", None):
        config.tracking_uri = args.tracking_uri
    if getattr(args, "address", None):
        config.ray_address = args.address
    report = run_pipeline(config, args.out, config_dir=Path(args.config).parent, progress=not args.no_progress)
    print(f"raysys pipeline: done; report in {report['out_dir']}/report.md "
          f"(MLflow: {report['mlflow']['tracking_uri']}, run {report['mlflow']['pipeline_run']})")
    return 0
