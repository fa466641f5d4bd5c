"""The pipeline's own logic: config resolution, stage hashes, skip/redo/resume, output locations.

The full flow on the real stages runs in tests/test_e2e_cluster.py (as a Ray job on a real cluster,
twice: the second run must skip every stage).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from raysys import pipeline
from raysys.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pipeline" / "tiny.yaml"
DEMO = ROOT / "configs" / "pipeline" / "demo.yaml"


def tiny(overrides=None) -> pipeline.PipelineConfig:
    return pipeline.load_config(TINY, overrides)


def hashes(overrides=None) -> dict:
    cfg = tiny(overrides)
    return pipeline.stage_hashes(cfg, pipeline.stage_configs(cfg, TINY.parent))


# --- configs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [TINY, DEMO], ids=["tiny", "demo"])
def test_shipped_configs_validate(path):
    cfg = pipeline.load_config(path)
    stages = pipeline.stage_configs(cfg, path.parent)
    assert {"zoo", "hyperrep", "populations"} <= set(stages) <= {"zoo", "align", "hyperrep", "populations"}
    # the autoencoder trains on epochs the zoo stores, and populations sample from them
    first, last = stages["hyperrep"].train.epoch_window
    assert last <= stages["zoo"].epochs


def test_demo_meets_the_brief():
    """The README's main job: a digits zoo of >= 100 models and populations of >= 50 models."""
    from raysys.zoo import expand

    stages = pipeline.stage_configs(pipeline.load_config(DEMO), DEMO.parent)
    assert stages["zoo"].dataset.name == "digits"
    assert len(expand(stages["zoo"])) >= 100
    assert stages["populations"].num_models >= 50


def test_unknown_key_names_the_key_and_the_fix(tmp_path):
    data = yaml.safe_load(TINY.read_text())
    data["zoo"]["epoch"] = 3  # typo for epochs
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"(?s)pipeline key 'zoo'.*unknown key 'epoch'.*did you mean 'epochs'"):
        pipeline.stage_configs(pipeline.load_config(path), tmp_path)
    with pytest.raises(ConfigError, match="unknown key 'zoos'"):
        pipeline.load_config(TINY, ["zoos.name=x"])


def test_stage_configs_from_paths_relative_to_the_pipeline_config(tmp_path):
    data = yaml.safe_load(TINY.read_text())
    (tmp_path / "stages").mkdir()
    for key in ("zoo", "hyperrep", "populations"):
        (tmp_path / "stages" / f"{key}.yaml").write_text(yaml.safe_dump(data[key]))
        data[key] = f"stages/{key}.yaml"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    cfg = pipeline.load_config(tmp_path / "p.yaml")
    by_path = pipeline.stage_hashes(cfg, pipeline.stage_configs(cfg, tmp_path))
    assert by_path == hashes()  # same content, same hashes, however the configs are given
    data["zoo"] = "stages/missing.yaml"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="missing.yaml, which does not exist"):
        pipeline.stage_configs(pipeline.load_config(tmp_path / "p.yaml"), tmp_path)


def test_populations_inherit_the_zoo_dataset_options():
    cfg = tiny(["zoo.dataset.options={copies: 5}"])
    stages = pipeline.stage_configs(cfg, TINY.parent)
    assert stages["populations"].dataset_options == {"copies": 5}
    cfg = tiny(["zoo.dataset.options={copies: 5}", "populations.dataset_options={copies: 7}"])
    assert pipeline.stage_configs(cfg, TINY.parent)["populations"].dataset_options == {"copies": 7}


# --- hashes -----------------------------------------------------------------------------------

# (override, stages whose hash must change)
CHANGES = [
    ("zoo.epochs=4", {"zoo", "zoo_aligned", "hyperrep", "hyperrep_nolwln", "populations"}),
    ("zoo.seeds={start: 2, count: 12}", {"zoo", "zoo_aligned", "hyperrep", "hyperrep_nolwln", "populations"}),
    ("align.rounds=2", {"zoo_aligned", "hyperrep", "hyperrep_nolwln", "populations"}),
    ("hyperrep.train.lr=0.002", {"hyperrep", "hyperrep_nolwln", "populations"}),
    ("populations.num_models=4", {"populations"}),
    ("evaluate=false", {"hyperrep", "populations"}),
    ("nolwln_baseline=true", {"populations"}),
    # where and how fast, not what: nothing is redone
    ("zoo.resources.num_workers=2", set()),
    ("populations.finetune.num_actors=2", set()),
    ("tracking_uri=sqlite:////tmp/elsewhere.db", set()),
    ("name=other", set()),
]


@pytest.mark.parametrize("override,changed", CHANGES, ids=[c[0] for c in CHANGES])
def test_a_change_redoes_its_stage_and_everything_downstream(override, changed):
    before, after = hashes(), hashes([override])
    assert {k for k in before if before[k] != after[k]} == changed


def test_without_align_the_autoencoder_reads_the_zoo_itself():
    """align: null drops the zoo_aligned stage, and the autoencoder's hash then hangs on the zoo directly."""
    aligned, plain = hashes(), hashes(["align=null"])
    assert "zoo_aligned" in aligned and "zoo_aligned" not in plain
    assert aligned["zoo"] == plain["zoo"] and aligned["hyperrep"] != plain["hyperrep"]
    with pytest.raises(ConfigError, match="rounds"):
        hashes(["align={rounds: 0}"])


@settings(max_examples=25, deadline=None)
@given(lr=st.floats(1e-5, 1e-1), models=st.integers(2, 500), budget=st.integers(1, 30))
def test_hashes_are_deterministic_and_distinct(lr, models, budget):
    overrides = [f"hyperrep.train.lr={lr!r}", f"populations.num_models={models}",
                 f"populations.finetune.budgets=[0, {budget}]"]
    a, b = hashes(overrides), hashes(overrides)
    assert a == b
    assert len(set(a.values())) == len(a)  # stages never share a hash
    if lr != 1e-3:
        assert a["hyperrep"] != hashes()["hyperrep"]


CODE_CHANGES = [("zoo", {"zoo", "zoo_aligned", "hyperrep", "hyperrep_nolwln", "populations"}),
                ("zoo_aligned", {"zoo_aligned", "hyperrep", "hyperrep_nolwln", "populations"}),
                ("hyperrep", {"hyperrep", "populations"}),
                ("populations", {"populations"})]


@pytest.mark.parametrize("stage,changed", CODE_CHANGES, ids=[c[0] for c in CODE_CHANGES])
def test_a_change_of_a_stages_code_changes_its_hash_and_everything_downstream(stage, changed, monkeypatch):
    """Item 5: the stage hashes see code: another fingerprint of one stage's sources (forged here) changes that
    stage's hash and those downstream, not those upstream."""
    from raysys import provenance

    before = hashes()

    def forged(name):
        fp = provenance.code_fingerprint(name)
        return {**fp, "sources": "f" * 16} if name == stage else fp

    monkeypatch.setattr(pipeline, "code_fingerprint", forged)
    after = hashes()
    assert {k for k in before if before[k] != after[k]} == changed


def test_a_stage_whose_code_changed_is_redone_and_an_older_record_is_trusted(tmp_path, capsys):
    """Item 5: stage.json keeps the code fingerprint of the stage; a record naming other code (forged) is redone
    with a line naming both, even when its hash matches; a record written before fingerprints (no 'code', the
    hash as that raysys computed it) is trusted as before."""
    from raysys.provenance import code_fingerprint, describe

    code = code_fingerprint("hyperrep")
    d, work = tmp_path / "hyperrep", Work()
    pipeline.run_stage(d, "h1", work, code=code)
    record = json.loads((d / "stage.json").read_text())
    assert record["code"] == code
    pipeline.run_stage(d, "h1", work, code=code)
    assert work.calls == 1  # same code: skipped
    forged = {**code, "raysys_version": "0.0.1", "sources": "0123456789abcdef"}
    (d / "stage.json").write_text(json.dumps({**record, "code": forged}))
    capsys.readouterr()
    pipeline.run_stage(d, "h1", work, code=code)
    printed = capsys.readouterr().out
    assert work.calls == 2 and "hyperrep: its code changed" in printed and "redoing" in printed
    assert describe(forged) in printed and describe(code) in printed
    assert not (d / "out1.txt").exists() and json.loads((d / "stage.json").read_text())["code"] == code
    # the zoo too is redone from scratch (a resumed generate would refuse the other code's zoo), not resumed
    z = tmp_path / "zoo"
    pipeline.run_stage(z, "hz", Work(), resumable=True, code=code)
    rec = json.loads((z / "stage.json").read_text())
    (z / "stage.json").write_text(json.dumps({**rec, "code": forged}))
    (z / "shard-of-the-old-code.parquet").write_text("kept by a resume")
    zwork = Work()
    pipeline.run_stage(z, "hz", zwork, resumable=True, code=code)
    assert zwork.calls == 1 and not (z / "shard-of-the-old-code.parquet").exists()
    # a record of a raysys before code fingerprints: trusted when its hash is the old one
    old = tmp_path / "old"
    pipeline.run_stage(old, "legacy", Work())
    assert "code" not in json.loads((old / "stage.json").read_text())
    later = Work()
    pipeline.run_stage(old, "new", later, code=code, legacy_hash="legacy")
    assert later.calls == 0
    pipeline.run_stage(old, "new", later, code=code, legacy_hash="other")
    assert later.calls == 1


# --- skip / redo / resume ---------------------------------------------------------------------

class Work:
    """A stage body that records its calls and writes one output file."""

    def __init__(self, run_id="r1"):
        self.calls, self.run_id = 0, run_id

    def __call__(self, d: Path):
        self.calls += 1
        d.mkdir(parents=True, exist_ok=True)
        (d / f"out{self.calls}.txt").write_text(str(self.calls))
        return self.run_id


def test_stage_runs_once_then_skips(tmp_path):
    work = Work()
    d = tmp_path / "zoo"
    assert pipeline.run_stage(d, "h1", work) == "r1"
    record = json.loads((d / "stage.json").read_text())
    assert record["hash"] == "h1" and record["mlflow_run_id"] == "r1"
    assert pipeline.run_stage(d, "h1", Work("other")) == "r1"  # skipped: the recorded run id comes back
    assert work.calls == 1
    assert not list(d.glob(".*.tmp"))  # the record was written atomically


def test_changed_hash_removes_old_output_and_redoes(tmp_path):
    d = tmp_path / "hyperrep"
    pipeline.run_stage(d, "h1", Work())
    (d / "stale.bin").write_text("from the old config")
    work = Work("r2")
    assert pipeline.run_stage(d, "h2", work) == "r2"
    assert work.calls == 1 and not (d / "stale.bin").exists()
    assert json.loads((d / "stage.json").read_text())["hash"] == "h2"


def test_interrupted_stage_resumes_only_when_resumable(tmp_path):
    for resumable in (True, False):
        d = tmp_path / f"stage-{resumable}"
        d.mkdir()
        (d / "partial.parquet").write_text("a complete shard of an interrupted run")
        pipeline.run_stage(d, "h1", Work(), resumable=resumable)
        assert (d / "partial.parquet").exists() == resumable


def test_an_interrupted_stage_with_a_resume_check_continues_only_its_own_run(tmp_path, capsys):
    """``resumable=check``: an interrupted run (no record) is kept for ``work`` to continue when it ran with this
    hash and the check accepts it; otherwise (another hash, a refused state) it is removed and redone."""
    d = tmp_path / "hyperrep"

    def killed(stage_dir):
        (stage_dir / "resume").mkdir(parents=True)
        (stage_dir / "resume" / "state").write_text("epoch 2")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run_stage(d, "h1", killed, resumable=lambda _: True)
    assert json.loads((d / pipeline.RUNNING_FILE).read_text()) == {"hash": "h1"}
    seen = []
    pipeline.run_stage(d, "h1", lambda sd: seen.append((sd / "resume" / "state").exists()), resumable=lambda _: True)
    assert seen == [True] and not (d / pipeline.RUNNING_FILE).exists()  # continued; finished: no marker left
    assert "stage.json" in {p.name for p in d.iterdir()}
    for hash_, accepts, line in (("h2", True, "the interrupted run had another config or code (h1 -> h2)"),
                                 ("h1", False, "interrupted run, redoing")):
        shutil.rmtree(d)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_stage(d, "h1", killed, resumable=lambda _: True)
        capsys.readouterr()
        seen.clear()
        pipeline.run_stage(d, hash_, lambda sd: seen.append((sd / "resume").exists()), resumable=lambda _, ok=accepts: ok)
        assert seen == [False] and line in capsys.readouterr().out


def test_failed_stage_leaves_no_record(tmp_path):
    d = tmp_path / "populations"

    def boom(_):
        d.mkdir(parents=True, exist_ok=True)
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError):
        pipeline.run_stage(d, "h1", boom)
    assert pipeline.stage_record(d) is None
    (d / "stage.json").write_text("{not json")  # a corrupt record means "not done"
    assert pipeline.stage_record(d) is None


# --- outputs, tracking, CLI -------------------------------------------------------------------

def test_output_dir_local_paths_and_bad_uris(tmp_path):
    with pipeline.output_dir(tmp_path / "a") as out:
        assert out == (tmp_path / "a").resolve()
    with pipeline.output_dir(f"file://{tmp_path}/b") as out:
        assert out == (tmp_path / "b").resolve()
    with pytest.raises(ConfigError, match="not a storage URI"):
        with pipeline.output_dir("nosuchscheme://bucket/x"):
            pass


def test_remote_output_is_staged_and_pushed_back(tmp_path):
    """A non-local filesystem (here a pyarrow SubTreeFileSystem, as S3 would be) is pulled, then pushed."""
    import pyarrow.fs as pafs

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    remote = pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem())
    with pipeline.output_dir("runs/x", filesystem=remote) as out:
        assert bucket not in out.parents
        pipeline.run_stage(out / "zoo", "h1", Work())
    assert json.loads((bucket / "runs/x/zoo/stage.json").read_text())["hash"] == "h1"
    assert not out.exists()  # the scratch copy is gone
    work = Work()
    with pytest.raises(RuntimeError):
        with pipeline.output_dir("runs/x", filesystem=remote) as out:
            pipeline.run_stage(out / "zoo", "h1", work)  # pulled back, so up to date
            (out / "partial.txt").write_text("written before a failure")
            raise RuntimeError("a later stage failed")
    assert work.calls == 0
    assert (bucket / "runs/x/partial.txt").exists()  # pushed even after a failure: a rerun resumes from it


def test_tracking_uri_is_absolute(tmp_path, monkeypatch):
    """The default every command shares (./mlflow.db), unless a previous run into DIR recorded another."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert pipeline.tracking_uri(tiny(), out) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    (out / "mlflow.db").touch()  # a pipeline run from before the shared default: it keeps its store
    assert pipeline.tracking_uri(tiny(), out) == f"sqlite:///{out / 'mlflow.db'}"
    (out / pipeline.TRACKING_FILE).write_text('{"tracking_uri": "sqlite:////elsewhere/m.db"}')
    assert pipeline.tracking_uri(tiny(), out) == "sqlite:////elsewhere/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert pipeline.tracking_uri(tiny(), tmp_path) == "http://127.0.0.1:5999"
    assert pipeline.tracking_uri(tiny(["tracking_uri=sqlite:////x/y.db"]), tmp_path) == "sqlite:////x/y.db"


def test_cli_registers_pipeline_command():
    from raysys import cli

    args = cli.build_parser().parse_args(["pipeline", str(TINY), "--out", "/tmp/x", "--set", "zoo.epochs=2",
                                          "--address", "10.0.0.5:6379", "--no-progress"])
    assert args.func.target == "raysys.pipeline:_cmd" and args.set == ["zoo.epochs=2"]
    assert args.address == "10.0.0.5:6379" and args.no_progress


# --- jobs/ ------------------------------------------------------------------------------------

# jobs/search.py forwards to `raysys search`, whose --help imports every stage: compiled only, to stay fast
JOBS = ["pipeline", "zoo", "hyperrep", "populations", "search"]


def run_job_script(name: str, *args: str, env: dict | None = None):
    import subprocess
    import sys

    base = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / f"{name}.py"), *args], capture_output=True, text=True,
                          timeout=120, env={**base, **(env or {})}, cwd="/")


@pytest.mark.parametrize("name", JOBS)
def test_job_scripts_start_from_any_directory(name):
    """`python jobs/x.py` must import the raysys next to it (Ray runs it inside the uploaded working dir)."""
    res = run_job_script(name, "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage:" in res.stdout and "--out" in res.stdout


def test_job_outside_a_cluster_says_how_to_submit_it(tmp_path):
    res = run_job_script("pipeline", "--config", str(TINY), "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    assert "RAY_ADDRESS is not set" in res.stderr and "ray job submit" in res.stderr
    assert not (tmp_path / "out").exists()


def test_job_refuses_a_remote_uri_it_cannot_write(tmp_path):
    res = run_job_script("populations", "--config", str(TINY), "--zoo", "z", "--checkpoint", "c",
                         "--out", "s3://bucket/populations")
    assert res.returncode == 2 and "writes through the local filesystem" in res.stderr


def test_runtime_env_keeps_data_out_of_the_upload():
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    for pattern in (".git", "mlflow.db", "ray_results/", "runs/", "*.parquet", "*.safetensors"):
        assert pattern in env["excludes"]
    assert "pip" not in env  # nodes have the dependencies (cluster.yaml); a per-job pip env reinstalls torch


def test_a_second_pipeline_into_the_same_directory_is_refused(tmp_path):
    """One pipeline per output directory: a live owner's lock (here this very process's) is never taken over."""
    import os
    import socket

    from raysys.config import RaysysError

    out = tmp_path / "out"
    out.mkdir()
    (out / pipeline.LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                      "since": "2026-12-02T00:00:00Z", "command": "raysys pipeline"}))
    with pytest.raises(RaysysError, match=rf"{out} is being written by another process: raysys pipeline "
                                          rf"\(pid {os.getpid()}@"):
        pipeline.run_pipeline(tiny(), out, config_dir=TINY.parent, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [pipeline.LOCK_FILE]  # nothing else was written


def test_a_stage_is_not_skipped_when_a_file_it_wrote_or_read_changed_since(tmp_path, capsys):
    """Item 1, second half: "up to date" means the same config AND the same bytes. A real zoo (generate's
    layout, shard records with sha256) and a checkpoint-like stage after it; bytes flipped in a shard, then in
    the checkpoint, between reruns."""
    from tests.test_faults import flip_bytes, write_store

    out = tmp_path / "run"
    zoo_work = []

    def make_zoo(d: Path):
        zoo_work.append(d)
        write_store(d)  # deterministic: a rewrite gives the same bytes, as a resumed generate does
        return "zoo-run"

    hyperrep = Work("hr-run")

    def run_all():
        pipeline.run_stage(out / "zoo", "hz", make_zoo, resumable=True)
        return pipeline.run_stage(out / "hyperrep", "hh", hyperrep, inputs={"zoo": out / "zoo"})

    assert run_all() == "hr-run"
    record = pipeline.stage_record(out / "hyperrep")
    assert set(record["inputs"]["zoo"]) == {f"shards/shard-{s:05d}.parquet" for s in range(4)}
    assert record["outputs"] == {"out1.txt": pipeline.output_digests(out / "hyperrep")["out1.txt"]}
    run_all()
    assert len(zoo_work) == 1 and hyperrep.calls == 1  # nothing changed: both skipped
    capsys.readouterr()

    # a shard's bytes flipped: the zoo is resumed (not removed) and rewrites them; what read the zoo then sees
    # the bytes it read, and is skipped
    shard = out / "zoo" / "shards" / "shard-00002.parquet"
    flip_bytes(shard)
    run_all()
    printed = capsys.readouterr().out
    assert "zoo: its output shards/shard-00002.parquet changed" in printed and "resuming" in printed
    assert len(zoo_work) == 2 and (out / "zoo" / "shards" / "shard-00000.parquet").exists()
    assert "hyperrep: up to date" in printed and hyperrep.calls == 1
    # flipped again, and the stage that reads it runs first: redone on the bytes it now reads
    flip_bytes(shard)
    pipeline.run_stage(out / "hyperrep", "hh", hyperrep, inputs={"zoo": out / "zoo"})
    printed = capsys.readouterr().out
    assert "hyperrep: its input zoo/shards/shard-00002.parquet changed" in printed and "redoing" in printed
    assert hyperrep.calls == 2

    # the checkpoint's own files changed (or one went missing): redone, never silently skipped
    (out / "hyperrep" / "out2.txt").write_text("edited")
    pipeline.run_stage(out / "hyperrep", "hh", hyperrep, inputs={"zoo": out / "zoo"})
    assert hyperrep.calls == 3 and "hyperrep: its output out2.txt changed" in capsys.readouterr().out
    (out / "hyperrep" / "out3.txt").unlink()
    pipeline.run_stage(out / "hyperrep", "hh", hyperrep, inputs={"zoo": out / "zoo"})
    assert hyperrep.calls == 4 and "out3.txt is gone" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_pipeline_rerun_after_a_flipped_shard_is_not_silently_skipped(tmp_path, ray_local, mlflow_uri, capsys):
    """The real stages (configs/pipeline/tiny.yaml): a rerun skips everything; bytes flipped in a zoo shard
    make the rerun resume the zoo (the shard quarantined and retrained) instead of skipping it."""
    from raysys.integrity import verify_zoo
    from raysys.store import quarantined_files
    from tests.test_faults import flip_bytes

    cfg, out = tiny([f"tracking_uri={mlflow_uri}", "evaluate=false"]), tmp_path / "run"
    pipeline.run_pipeline(cfg, out, config_dir=TINY.parent, progress=False)
    capsys.readouterr()
    pipeline.run_pipeline(cfg, out, config_dir=TINY.parent, progress=False)
    printed = capsys.readouterr().out
    assert printed.count("up to date") == 4, printed  # zoo, zoo_aligned, hyperrep, populations

    flip_bytes(out / "zoo" / "shards" / "shard-00001.parquet")
    pipeline.run_pipeline(cfg, out, config_dir=TINY.parent, progress=False)
    printed = capsys.readouterr().out
    assert "zoo: its output shards/shard-00001.parquet changed" in printed and "resuming" in printed, printed
    assert "zoo: up to date" not in printed
    assert [p.name.split(".quarantined-")[0] for p in quarantined_files(out / "zoo")] == \
        ["shard-00001.json", "shard-00001.parquet"]
    assert verify_zoo(out / "zoo").ok
    for name in ("zoo", "zoo_aligned", "hyperrep", "populations"):  # every stage's record matches its bytes again
        record = pipeline.stage_record(out / name)
        assert record["outputs"] == pipeline.output_digests(out / name), name


# The subprocess of the test below: the pipeline, SIGKILLed by itself right after the autoencoder wrote its resume
# state of epoch KILL_AFTER (a real process death at a chosen point: a tiny epoch takes milliseconds, too little
# for a kill from outside to land reliably between two epochs).
KILLED_PIPELINE = """
import importlib, os, signal, sys
from raysys import pipeline

train_module = importlib.import_module("raysys.hyperrep.train")  # (the package exports the function train)

kill_after = int(sys.argv[3])
save = train_module.save_resume_state

def save_then_die(out_dir, state):
    save(out_dir, state)
    print(f"saved epoch {state['epoch']}", flush=True)
    if state["epoch"] == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)

train_module.save_resume_state = save_then_die
cfg = pipeline.load_config(sys.argv[1], sys.argv[4:])
pipeline.run_pipeline(cfg, sys.argv[2], config_dir=os.path.dirname(sys.argv[1]), progress=False)
"""


@pytest.mark.slow
def test_a_pipeline_killed_mid_autoencoder_resumes_it_instead_of_starting_at_epoch_1(tmp_path, ray_local, mlflow_uri,
                                                                                      capsys, monkeypatch):
    """``raysys pipeline`` SIGKILLed after the autoencoder's epoch 2 (of 4), rerun: the autoencoder continues at
    epoch 3 from DIR/hyperrep/resume/ (epochs 3, 4 trained, nothing twice), one MLflow run with each epoch logged
    once, and its history and weights equal an uninterrupted pipeline's. A resume state of another config is not
    resumed: the stage starts again from epoch 1 with a line saying why."""
    import importlib
    import subprocess
    import sys

    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from raysys.hyperrep.checkpoint import manifest_sha256

    train_module = importlib.import_module("raysys.hyperrep.train")
    overrides = [f"tracking_uri={mlflow_uri}", "evaluate=false", "populations.num_models=2",
                 "populations.finetune.budgets=[0, 1]"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    pipeline.run_pipeline(tiny(overrides), whole, config_dir=TINY.parent, progress=False)

    # the interrupted run starts from the same zoo stages (up to date, skipped): no zoo to train in the subprocess
    cut.mkdir()
    for name in ("zoo", "zoo_aligned"):
        shutil.copytree(whole / name, cut / name)
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-c", KILLED_PIPELINE, str(TINY), str(cut), "2", *overrides,
                           f"ray_address={address}"], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == -9, log  # SIGKILL
    assert "zoo: up to date" in log and "saved epoch 2" in log and "saved epoch 3" not in log, log
    assert (cut / "hyperrep" / "resume" / "state.safetensors").is_file()
    assert pipeline.stage_record(cut / "hyperrep") is None and (cut / ".lock").exists()  # died holding the lock

    epochs = []
    save = train_module.save_resume_state
    monkeypatch.setattr(train_module, "save_resume_state", lambda d, s: (epochs.append(s["epoch"]), save(d, s)))
    capsys.readouterr()
    pipeline.run_pipeline(tiny(overrides), cut, config_dir=TINY.parent, progress=False)
    printed = capsys.readouterr().out
    assert "hyperrep: interrupted after epoch 2, resuming at epoch 3" in printed, printed
    assert epochs == [3, 4]  # only the epochs left were trained
    assert not (cut / "hyperrep" / "resume").exists() and not (cut / "hyperrep" / pipeline.RUNNING_FILE).exists()

    history = json.loads((cut / "hyperrep" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history == json.loads((whole / "hyperrep" / "history.json").read_text())
    a, b = load_file(whole / "hyperrep" / "model.safetensors"), load_file(cut / "hyperrep" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    run_id = pipeline.stage_record(cut / "hyperrep")["mlflow_run_id"]
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raysys.resumed_after_epoch"] == "2"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_rec")) == [1, 2, 3, 4]

    # a resume state of another config (same stage hash forged, so only the state's check can refuse it)
    record = pipeline.stage_record(cut / "hyperrep")
    (cut / "hyperrep" / "stage.json").unlink()
    pipeline.atomic_write_json(cut / "hyperrep" / pipeline.RUNNING_FILE, {"hash": record["hash"]})
    stages = pipeline.stage_configs(tiny(overrides), TINY.parent)
    other = stages["hyperrep"].model_copy(deep=True)
    other.train.lr = 0.5
    train_module.save_resume_state(cut / "hyperrep", {
        "format": train_module.RESUME_FORMAT, "epoch": 1, "config": other.model_dump(mode="json"),
        "manifest_sha256": manifest_sha256(cut / "zoo_aligned")})
    capsys.readouterr()
    check = pipeline.autoencoder_resumable(stages["hyperrep"], cut / "zoo_aligned")
    assert not pipeline.record_free_resume(cut / "hyperrep", record["hash"], check)
    printed = capsys.readouterr().out
    assert "hyperrep: its resume state does not fit" in printed and "train.lr: 0.5 -> 0.001" in printed
    assert "starting again from epoch 1" in printed
    (cut / "hyperrep" / pipeline.RUNNING_FILE).write_text(json.dumps({"hash": "another"}))
    assert not pipeline.record_free_resume(cut / "hyperrep", record["hash"], check)
    assert "the interrupted run had another config or code" in capsys.readouterr().out


def test_an_autoencoder_on_a_gpu_node_with_a_remote_out_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """A GPU node's task cannot see the driver's local working copy of an s3:// --out: one clean error naming
    the fix, before any storage, Ray or MLflow is touched."""
    monkeypatch.chdir(tmp_path)
    config = tiny(["hyperrep_gpus=1"])
    with pytest.raises(ConfigError, match=r"hyperrep_gpus: 1.0 .*cannot see the driver's working copy of --out "
                                          r"s3://bucket/run.*shared filesystem.*hyperrep_gpus: 0"):
        pipeline.run_pipeline(config, "s3://bucket/run", config_dir=TINY.parent, progress=False)
    assert list(tmp_path.iterdir()) == []
