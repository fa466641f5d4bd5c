"""Faults survived, on a real local Ray: damaged stores are found and repaired, killed processes
cost a retry, never a row.

* ``raysys zoo verify`` finds truncated, corrupted, missing, unrecorded and unplanned shards and
  duplicated, foreign and absent rows; readers refuse a manifest that disagrees with the data.
* A Ray Train worker SIGKILLed mid-zoo: the worker group restarts, skips finished shards, and the
  zoo equals an uninterrupted one. Then one shard's bytes are corrupted: ``zoo verify`` names it,
  a rerun of ``zoo generate`` rewrites exactly that shard (the others keep their mtime).
* Fine-tuning actors killed mid-population, once by SIGKILL (Ray restarts it, retries the call) and
  once by ``ray.kill`` (the pool replaces it, requeues the population): every model's per-epoch
  accuracies arrive exactly once and equal an uninterrupted run.
* A Tune trial SIGKILLed mid-search: the trial errors, ``--resume`` reruns it; every trial ends
  completed exactly once, with one MLflow child run each.

The SIGKILL driver test (``raysys zoo generate`` killed, rerun resumes to the uninterrupted zoo)
is tests/test_zoo.py::test_generate_killed_midway_resumes_to_the_uninterrupted_zoo.

Processes are found among this test process's own descendants (the local Ray it started), by
their Ray process title, and killed by pid: real process death, nothing else on the machine.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raysys import architectures, cli, datasets
from raysys.config import RaysysError, validate
from raysys.integrity import verify_zoo
from raysys.store import MANIFEST, META, ZooWriter, open_zoo, rows_table, splits_for
from raysys.train import METRICS, ModelSpec

TIMEOUT_S = 240


# --- finding and killing our own Ray processes -----------------------------------------------------

def descendants(root: int = os.getpid()) -> dict[int, str]:
    """{pid: process title} of every descendant of ``root`` (Ray retitles workers 'ray::Class.method')."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, frontier = set(), [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in found]
        found.update(kids)
        frontier.extend(kids)
    out = {}
    for pid in found:
        try:
            out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            pass
    return out


class Killer(threading.Thread):
    """Waits until ``ready()`` and a descendant whose title starts with ``title`` exists, then SIGKILLs it once."""

    def __init__(self, title: str, ready=lambda: True, delay_s: float = 0.0):
        super().__init__(daemon=True)
        self.title, self.ready, self.delay_s = title, ready, delay_s
        self.killed: list[tuple[int, str]] = []
        self.stop = threading.Event()

    def run(self):
        deadline = time.time() + TIMEOUT_S
        while not self.stop.is_set() and time.time() < deadline:
            if self.ready():
                targets = {p: t for p, t in descendants().items() if t.startswith(self.title)}
                if targets:
                    if self.delay_s:
                        time.sleep(self.delay_s)
                    pid = min(targets)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append((pid, targets[pid]))
                    except ProcessLookupError:
                        continue
                    return
            time.sleep(0.05)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join(timeout=10)
        return False


# --- integrity of the store (no Ray) ------------------------------------------------------------------

N_SHARDS, PER_SHARD, EPOCHS = 4, 3, 2


def write_store(root: Path, layout_arch: str = "tetris_ffn") -> ZooWriter:
    """A zoo directory as generate writes it: manifest with a shard plan and epochs, one Parquet file per shard."""
    data = datasets.load("tetris")
    layout = architectures.layout_of(layout_arch, data.in_channels, data.num_classes)
    n = N_SHARDS * PER_SHARD
    splits, rng = splits_for(n, 0), np.random.default_rng(0)
    writer = ZooWriter(root)
    plan = [{"shard": s, "model_ids": list(range(s * PER_SHARD, (s + 1) * PER_SHARD))} for s in range(N_SHARDS)]
    writer.write_manifest({"name": "faults", "arch": layout_arch, "layout": layout.to_dict(), "dataset": data.describe(),
                           "config": {}, "epochs": EPOCHS, "num_params": layout.num_params, "shards": plan})
    for s in plan:
        writer.write_shard(s["shard"], shard_table(s["model_ids"], layout.num_params, splits, rng), s["model_ids"])
    return writer


def shard_table(ids, num_params, splits, rng, epochs=range(EPOCHS + 1)) -> pa.Table:
    specs = [ModelSpec(model_id=i, seed=i).hyperparameters() for i in ids]
    return pa.concat_tables([rows_table(num_params, ids, e, [splits[i] for i in ids],
                                        rng.normal(size=(len(ids), num_params)).astype(np.float32),
                                        {m: rng.uniform(size=len(ids)) for m in METRICS}, specs) for e in epochs])


def flip_bytes(path: Path) -> None:
    """Corrupt a file in place, keeping its size (a bit-rot / bad-copy model)."""
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 16] = bytes(b ^ 0xFF for b in raw[mid:mid + 16])
    path.write_bytes(bytes(raw))


def test_verify_passes_an_intact_zoo_and_the_cli_exits_zero(tmp_path, capsys):
    write_store(tmp_path / "zoo")
    report = verify_zoo(tmp_path / "zoo")
    assert report.ok and report.good_shards == N_SHARDS and report.rows == N_SHARDS * PER_SHARD * (EPOCHS + 1)
    assert cli.main(["zoo", "verify", str(tmp_path / "zoo")]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_finds_every_kind_of_damage(tmp_path, capsys):
    root = tmp_path / "zoo"
    writer = write_store(root)
    num_params = open_zoo(root).num_params
    rng, splits = np.random.default_rng(1), splits_for(N_SHARDS * PER_SHARD, 0)
    # shard 0 truncated, shard 1 bit-flipped, shard 2 lost, shard 3 rewritten (valid checksum) with a
    # duplicated row, a foreign model and a missing epoch; plus a shard nobody planned and a temp file.
    p0 = writer.shard_path(0)
    p0.write_bytes(p0.read_bytes()[: p0.stat().st_size // 2])
    flip_bytes(writer.shard_path(1))
    writer.shard_path(2).unlink()
    ids3 = list(range(3 * PER_SHARD, 4 * PER_SHARD))
    bad = pa.concat_tables([shard_table(ids3, num_params, splits, rng, epochs=[0, 1]),
                            shard_table(ids3[:1], num_params, splits, rng, epochs=[1]),
                            shard_table([0], num_params, splits, rng, epochs=[0])])
    writer.write_shard(3, bad, ids3)
    writer.write_shard(7, shard_table([0], num_params, splits, rng), [0])
    (root / "shards" / ".shard-00001.parquet.abc.tmp").write_bytes(b"half")

    report = verify_zoo(root)
    kinds = {(p.kind, p.shard) for p in report.problems}
    assert {("truncated", 0), ("corrupted", 1), ("missing", 2), ("duplicate_rows", 3), ("foreign_rows", 3),
            ("missing_rows", 3), ("unplanned", None)} <= kinds, report.format()
    assert report.bad_shards == [0, 1, 2, 3] and report.good_shards == 0
    assert [w.kind for w in report.warnings] == ["leftover"]

    assert cli.main(["zoo", "verify", str(root)]) == 1
    out = capsys.readouterr().out
    for word in ("TRUNCATED", "CORRUPTED", "MISSING", "DUPLICATE_ROWS", "FOREIGN_ROWS", "UNPLANNED",
                 "shard-00000.parquet", "raysys zoo generate"):
        assert word in out, out
    # a record without its Parquet file, and a Parquet file without its record
    writer.shard_path(3).unlink()
    rec1 = writer.record_path(1)
    rec1.unlink()
    report = verify_zoo(root)
    kinds = {(p.kind, p.shard) for p in report.problems}
    assert ("missing", 3) in kinds and ("unrecorded", 1) in kinds


DAMAGE = {
    "truncate": lambda w, s: w.shard_path(s).write_bytes(w.shard_path(s).read_bytes()[:100]),
    "flip": lambda w, s: flip_bytes(w.shard_path(s)),
    "lose": lambda w, s: w.shard_path(s).unlink(),
    "unrecord": lambda w, s: w.record_path(s).unlink(),
}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.integers(0, N_SHARDS - 1), st.sampled_from(sorted(DAMAGE)), max_size=N_SHARDS))
def test_verify_flags_exactly_the_damaged_shards(tmp_path_factory, damage):
    root = tmp_path_factory.mktemp("zoo")
    writer = write_store(root)
    for shard, how in damage.items():
        DAMAGE[how](writer, shard)
    report = verify_zoo(root)
    assert report.bad_shards == sorted(damage), report.format()
    assert report.ok == (not damage) and report.good_shards == N_SHARDS - len(damage)


def test_readers_refuse_a_manifest_that_disagrees_with_the_data(tmp_path):
    root = tmp_path / "zoo"
    write_store(root)
    manifest = json.loads((root / MANIFEST).read_text())
    digits = datasets.load("digits")
    manifest["layout"] = architectures.layout_of("cnn_s", digits.in_channels, digits.num_classes).to_dict()
    manifest.pop("num_params")
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RaysysError, match=r"manifest and data disagree.*length 100.*2464 parameters.*new --out"):
        open_zoo(root)
    assert any(p.kind == "schema" for p in verify_zoo(root).problems)
    manifest["num_params"] = 100
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RaysysError, match="num_params 100 but its layout has 2464"):
        open_zoo(root)


# --- a Ray Train worker killed mid-zoo, then a corrupted shard repaired by a rerun ------------------

ZOO = {"name": "faults", "dataset": {"name": "tetris"}, "arch": "tetris_ffn",
       "grid": {"init": "kaiming_uniform", "lr": 1e-2}, "seeds": {"start": 1, "count": 8},
       "epochs": 2, "models_per_shard": 2, "resources": {"num_workers": 1, "max_failures": 2}}


def reference_weights(tmp_path: Path, config):
    """The same zoo trained shard by shard in this process, never interrupted."""
    from raysys.zoo import expand, plan_shards, train_shard

    specs = expand(config)
    data = datasets.load("tetris")
    writer = ZooWriter(tmp_path / "reference")
    writer.write_manifest({"layout": architectures.layout_of("tetris_ffn", 1, 4).to_dict()})
    for shard in plan_shards(specs, config.models_per_shard):
        train_shard(config.arch, shard, specs, data, config.epochs, splits_for(len(specs), 0), writer)
    return open_zoo(tmp_path / "reference").weights()


@pytest.mark.slow
def test_worker_killed_mid_zoo_then_a_corrupted_shard_is_rewritten_alone(tmp_path, ray_local, mlflow_uri, capsys):
    import yaml

    from raysys.zoo import ZooConfig, generate

    config = validate(ZooConfig, {**ZOO, "mlflow": {"tracking_uri": mlflow_uri, "experiment": "faults"}})
    out, n_shards = tmp_path / "zoo", 4
    writer = ZooWriter(out)
    first_shard_done = lambda: any((out / META).glob("shard-*.json"))  # noqa: E731
    with Killer("ray::RayTrainWorker", ready=first_shard_done) as killer:
        generate(config, out, progress=False)
    assert killer.killed, "no Ray Train worker was found to kill"
    report = verify_zoo(out)
    assert report.ok, report.format()
    w, meta = open_zoo(out).weights()
    keys = list(zip(meta.model_id, meta.epoch))
    assert len(keys) == len(set(keys)) == 8 * 3  # every (model, epoch) exactly once
    ref_w, ref_meta = reference_weights(tmp_path, config)
    assert list(zip(ref_meta.model_id, ref_meta.epoch)) == keys
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-6)

    # One shard's bytes go bad on disk: verify names it; a rerun rewrites exactly that shard.
    mtimes = {s: writer.shard_path(s).stat().st_mtime_ns for s in range(n_shards)}
    flip_bytes(writer.shard_path(2))
    assert cli.main(["zoo", "verify", str(out)]) == 1
    assert "CORRUPTED" in capsys.readouterr().out
    cfg = tmp_path / "zoo.yaml"
    cfg.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert cli.main(["zoo", "generate", str(cfg), "--out", str(out), "--no-progress"]) == 0
    after = {s: writer.shard_path(s).stat().st_mtime_ns for s in range(n_shards)}
    assert [s for s in range(n_shards) if after[s] != mtimes[s]] == [2]
    assert cli.main(["zoo", "verify", str(out)]) == 0
    w2, meta2 = open_zoo(out).weights()
    np.testing.assert_allclose(w2, ref_w, rtol=1e-5, atol=1e-6)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "complete"
    assert manifest["shards"][2]["sha256"] == json.loads(writer.record_path(2).read_text())["sha256"]


# --- a fine-tuning actor killed mid-population ------------------------------------------------------

@pytest.mark.slow
def test_finetune_actors_killed_mid_population_every_result_exactly_once(ray_local):
    """Two deaths: a SIGKILLed actor process (a crash: Ray restarts it and retries the call) and a
    ``ray.kill`` for good (the pool replaces the actor and requeues its population)."""
    import ray

    from raysys.populations import finetune

    data = datasets.load("tetris")
    specs = [ModelSpec(model_id=i, seed=50 + i, init="kaiming_uniform", lr=1e-2, batch_size=8) for i in range(6)]
    jobs = [finetune.Job(f"pop{j}", "in_dataset", "tetris_ffn", "tetris", specs[3 * j:3 * j + 3], epochs=4)
            for j in range(2)]
    seen: list[str] = []
    done = lambda: len(seen) >= 1  # noqa: E731
    killed_for_good: list[str] = []

    def ray_kill_when_working():
        deadline = time.time() + TIMEOUT_S
        while time.time() < deadline and not killed_for_good:
            working = [t for t in descendants().values() if t.startswith("ray::FinetuneWorker.run")]
            if done() and working:
                names = [n for n in ray.util.list_named_actors() if n.startswith("raysys-finetune-")]
                for name in names:
                    try:
                        ray.kill(ray.get_actor(name))
                        killed_for_good.append(name)
                    except ValueError:  # already gone
                        pass
                return
            time.sleep(0.05)

    second = threading.Thread(target=ray_kill_when_working, daemon=True)
    with Killer("ray::FinetuneWorker.run") as crash:
        second.start()
        results = finetune.run_jobs(jobs, num_actors=1, progress=False, on_result=lambda j, r: seen.append(j.key))
    second.join(timeout=10)
    assert crash.killed, "no fine-tuning actor was found working to SIGKILL"
    assert killed_for_good, "no fine-tuning actor was found to ray.kill"
    assert sorted(seen) == sorted(j.key for j in jobs) and len(seen) == len(set(seen))  # exactly once each
    for job, res in zip(jobs, results):
        truth = finetune.finetune_population(job.arch, job.specs, data, job.epochs)
        assert res["metrics"]["test_acc"].shape == (job.epochs + 1, len(job.specs))
        np.testing.assert_allclose(res["metrics"]["test_acc"], truth["metrics"]["test_acc"], atol=1e-6)
        np.testing.assert_allclose(res["metrics"]["train_loss"], truth["metrics"]["train_loss"], rtol=1e-4)


# --- a Tune trial killed mid-search, then --resume ----------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("max_failures", [0, 1])
def test_trial_killed_mid_search_is_retried_or_rerun_by_resume(tmp_path, ray_local, mlflow_uri, max_failures):
    """A trial whose worker dies (a preempted node) is restarted from its checkpoint by Tune when
    ``resources.max_failures`` allows it; with no retries left it errors and ``--resume`` reruns it."""
    from mlflow.tracking import MlflowClient

    from raysys.search import SearchConfig, run_search

    from test_search import make_zoo

    zoo = make_zoo(tmp_path / "zoo", n=10, epochs=2)
    out = tmp_path / "search"
    base = {"model": {"d_model": 8, "heads": 2, "layers": 1, "ff": 16, "latent_dim": 4, "projection_dim": 8},
            "train": {"epochs": 3, "batch_size": 8, "epoch_window": [1, 2], "device": "cpu"}}
    cfg = validate(SearchConfig, {"base": base, "space": {"beta": {"type": "float", "low": 0.5, "high": 1.0}},
                                  "objectives": ["recon_r2"], "num_samples": 1, "max_concurrent": 1,
                                  "asha": {"enabled": False}, "resources": {"max_failures": max_failures}})

    def trial_running():
        try:
            return json.loads((out / "progress.json").read_text()).get("running", 0) >= 1
        except (OSError, ValueError, AttributeError):
            return False

    with Killer("ray::ImplicitFunc", ready=trial_running) as killer:
        first = run_search(cfg, zoo, out, tracking_uri=mlflow_uri)
    assert killer.killed, "no Tune trial was found running"
    if max_failures:
        assert first["status"].get("errored", 0) == 0, first["status"]  # retried within the same run
        summary = first
    else:
        assert first["status"].get("errored", 0) >= 1, first["status"]
        summary = run_search(cfg, zoo, out, resume=True)
    import csv
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == cfg.num_samples == summary["trials"]
    assert len({r["trial_id"] for r in rows}) == len(rows) and all(r["status"] == "completed" for r in rows), rows
    state = json.loads((out / "state.json").read_text())
    runs = MlflowClient(mlflow_uri).search_runs([state["experiment_id"]])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == state["parent_run_id"]]
    assert sorted(r.data.tags["raysys_trial_id"] for r in children) == sorted(r["trial_id"] for r in rows)
    assert all(r.info.status == "FINISHED" for r in children)
