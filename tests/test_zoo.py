"""Zoo generation: grid expansion, shard plan, shard training, and the real thing end to end —
``raysys zoo generate`` on Ray Train, killed with SIGKILL mid-run, resumed, tracked in MLflow."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from raysys import datasets
from raysys.architectures import layout_of
from raysys.config import RaysysError, validate
from raysys.store import MANIFEST, META, ZooWriter, open_zoo, splits_for
from raysys.zoo import ZooConfig, expand, format_summary, generate, plan_shards, summarize, train_shard

REPO = Path(__file__).resolve().parents[1]


def config(**changes) -> ZooConfig:
    d = {"name": "t", "dataset": {"name": "tetris"}, "arch": "tetris_ffn", "seeds": {"count": 3}, "epochs": 2}
    d.update(changes)
    return validate(ZooConfig, d)


# --- expansion and shard plan ------------------------------------------------------------------

HYP = {"init": ["uniform", "kaiming_normal"], "activation": ["tanh", "relu"], "optimizer": ["adam", "sgd"],
       "lr": [1e-3, 1e-4], "dropout": [0.0, 0.5]}


def test_seed_zoo_varies_only_the_seed():
    specs = expand(config(seeds={"start": 1, "count": 50}))
    assert [s.seed for s in specs] == list(range(1, 51))
    assert len({(s.init, s.activation, s.lr, s.optimizer) for s in specs}) == 1


def test_hyp_10_fix_uses_the_same_seeds_for_every_grid_point():
    specs = expand(config(grid=HYP, seeds={"start": 1, "count": 10}))
    assert len(specs) == 32 * 10
    by_point: dict[tuple, list[int]] = {}
    for s in specs:
        by_point.setdefault((s.init, s.activation, s.optimizer, s.lr, s.dropout), []).append(s.seed)
    assert len(by_point) == 32
    assert all(sorted(v) == list(range(1, 11)) for v in by_point.values())


def test_hyp_10_rand_draws_distinct_seeds_per_point_reproducibly():
    c = config(grid=HYP, seeds={"random": 10, "seed": 7})
    specs = expand(c)
    assert len(specs) == 320 and specs == expand(c)
    by_point: dict[tuple, list[int]] = {}
    for s in specs:
        by_point.setdefault((s.init, s.activation, s.optimizer, s.lr, s.dropout), []).append(s.seed)
    assert all(len(set(v)) == 10 for v in by_point.values())
    assert len({tuple(v) for v in by_point.values()}) == 32  # points do not share a seed list
    other = expand(config(grid=HYP, seeds={"random": 10, "seed": 8}))
    assert [s.seed for s in other] != [s.seed for s in specs]


@settings(max_examples=25, deadline=None)
@given(count=st.integers(1, 6), extra=st.integers(1, 4), random=st.booleans(), n_lr=st.integers(1, 3))
def test_model_ids_are_stable_when_seeds_are_added(count, extra, random, n_lr):
    grid = {"lr": [10.0 ** -k for k in range(1, n_lr + 1)], "activation": ["tanh", "relu"]}
    seeds = (lambda n: {"random": n}) if random else (lambda n: {"count": n})
    small, big = expand(config(grid=grid, seeds=seeds(count))), expand(config(grid=grid, seeds=seeds(count + extra)))
    assert big[:len(small)] == small
    # a prefix (--models) covers every grid point before repeating one
    first = big[:2 * n_lr]
    assert len({(s.lr, s.activation) for s in first}) == 2 * n_lr


def test_models_keeps_a_prefix_and_rejects_too_many():
    c = config(grid=HYP, seeds={"count": 10})
    assert expand(c.model_copy(update={"models": 40})) == expand(c)[:40]
    with pytest.raises(RaysysError, match="only 320 models"):
        expand(config(grid=HYP, seeds={"count": 10}, models=321))


def _eager_expand(c: ZooConfig) -> list:
    """The expansion as raysys built it before it was lazy (every seed of every point, then the cut): the lazy one
    must give the same models, or zoos on disk would no longer resume."""
    from raysys.train import ModelSpec
    from raysys.zoo import RandomSeeds, SeedRange

    points, s = c.grid.points(), c.seeds
    if isinstance(s, list):
        seeds = np.tile(np.asarray(s, np.int64), (len(points), 1))
    elif isinstance(s, SeedRange):
        seeds = np.tile(np.arange(s.start, s.start + s.count, dtype=np.int64), (len(points), 1))
    else:
        assert isinstance(s, RandomSeeds)
        seeds = np.empty((len(points), s.random), np.int64)
        for p in range(len(points)):
            rng, seen = np.random.default_rng([s.seed, p]), set()
            while len(seen) < s.random:
                v = int(rng.integers(1, 2**31))
                if v not in seen:
                    seeds[p, len(seen)] = v
                    seen.add(v)
    specs = [ModelSpec(model_id=k * len(points) + p, seed=int(seeds[p, k]), **point)
             for k in range(seeds.shape[1]) for p, point in enumerate(points)]
    return specs[:c.models] if c.models is not None else specs


@pytest.mark.parametrize("seeds", [{"count": 7, "start": 3}, {"random": 6, "seed": 4}, [5, 1, 9]],
                         ids=["range", "random", "list"])
def test_lazy_expansion_gives_the_models_the_eager_one_gave(seeds):
    for models in (None, 1, 13, 32 * 3):
        c = config(grid=HYP, seeds=seeds, models=models)
        assert expand(c) == _eager_expand(c)


@pytest.mark.parametrize("seeds", [{"count": 10**12}, {"random": 10**12}], ids=["range", "random"])
def test_planning_a_huge_seed_count_with_a_models_cap_builds_only_the_models_kept(seeds):
    """seeds.count 10**12 with models: 4 plans four models in milliseconds and kilobytes (no grid x seeds
    product); without a cap such a product is refused with its size, before anything is built."""
    import tracemalloc

    from raysys.config import ConfigError
    from raysys.zoo import grid_size

    c = config(grid=HYP, seeds=seeds, models=4)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        specs = expand(c)
        shards, splits = plan_shards(specs, c.models_per_shard), splits_for(len(specs), c.split_seed)
        seconds, (_, peak) = time.perf_counter() - t0, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [s.model_id for s in specs] == [0, 1, 2, 3] and len(splits) == 4 and sum(len(s.model_ids) for s in shards) == 4
    assert seconds < 3 and peak < 50 * 2**20, (seconds, peak)
    assert grid_size(c) == 32 * 10**12
    with pytest.raises(ConfigError, match=r"\(32 points\) x seeds \(1000000000000 per point\) define "
                                          r"32,000,000,000,000 models.*Set models: N \(--models N\)"):
        expand(config(grid=HYP, seeds=seeds))


def test_a_shard_that_does_not_fit_in_memory_is_refused_before_anything_is_written(tmp_path, mlflow_uri, capsys):
    """The size of the zoo and of one shard in memory is printed; a shard larger than the memory budget
    (resources.shard_memory_gb, else what the machine has) is one error naming the numbers and models_per_shard."""
    from raysys import cli
    from raysys.zoo import available_memory, check_memory

    c = config(seeds={"count": 40}, epochs=9, models_per_shard=20)
    p = 100
    est = check_memory(c, p, plan_shards(expand(c), 20), budget=10**9)
    assert est["zoo_bytes"] == 40 * 10 * p * 4 and est["shard_epoch_bytes"] == 20 * p * 4
    assert est["shard_bytes"] == 7 * est["shard_epoch_bytes"]  # streamed: the number of epochs does not enter
    assert check_memory(config(seeds={"count": 40}, epochs=99, models_per_shard=20), p,
                        plan_shards(expand(c), 20), budget=10**9)["shard_bytes"] == est["shard_bytes"]
    assert "40 models x 10 epochs (0..9) x 100 parameters" in capsys.readouterr().out
    with pytest.raises(RaysysError, match=r"(?s)one shard of 20 models x 100 parameters needs 0.0534 MiB of memory "
                                          r"while it trains and is written"):
        check_memory(c, p, plan_shards(expand(c), 20), budget=50_000)
    with pytest.raises(RaysysError, match=r"at most 17 fit: --set models_per_shard=17"):
        check_memory(c, p, plan_shards(expand(c), 20), budget=50_000)
    r = config(seeds={"count": 40}, epochs=9, models_per_shard=20, arch="resnet18")  # trained one model at a time
    assert check_memory(r, p, plan_shards(expand(r), 20), budget=10**9)["shard_bytes"] == 7 * p * 4
    with pytest.raises(RaysysError, match=r"one resnet18 model of 100 parameters needs .*models_per_shard does not "
                                          r"change this"):
        check_memory(r, p, plan_shards(expand(r), 20), budget=1000)
    assert available_memory() > 0

    # through the CLI: the budget from the config, nothing written
    cfg = tmp_path / "zoo.yaml"
    cfg.write_text(yaml.safe_dump({"name": "big", "dataset": {"name": "tetris"}, "arch": "tetris_ffn",
                                   "seeds": {"count": 40}, "epochs": 9, "models_per_shard": 20,
                                   "resources": {"shard_memory_gb": 1e-5},
                                   "mlflow": {"tracking_uri": mlflow_uri}}))
    out = tmp_path / "zoo"
    capsys.readouterr()
    assert cli.main(["zoo", "generate", str(cfg), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("raysys: error:") == 1 and "models_per_shard (now 20" in err
    assert "resources.shard_memory_gb" in err and "Traceback" not in err
    assert not out.exists()


# Trains one shard of N tetris FFNs for E epochs through train_shard under RLIMIT_DATA (what Linux counts of the
# heap and private writable mappings) set to LIMIT MiB above the process's use after imports.
_UNDER_A_LIMIT = """
import resource, sys, torch
from pathlib import Path
from raysys.config import validate
from raysys.datasets import ImageData
from raysys.store import ZooWriter, splits_for
from raysys.zoo import ZooConfig, expand, plan_shards, train_shard

out, limit_mb, epochs, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x = lambda k: torch.rand(k, 1, 4, 4, generator=g)
y = lambda k: torch.randint(0, 4, (k,), generator=g)
data = ImageData("tiny", x(4), y(4), x(2), y(2), x(2), y(2), 4)
c = validate(ZooConfig, {"name": "big", "dataset": {"name": "tetris"}, "arch": "tetris_ffn",
                         "grid": {"batch_size": 4}, "seeds": {"count": n}, "epochs": epochs, "models_per_shard": n})
specs = expand(c)
vmdata = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmData")) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (vmdata + limit_mb * 2**20, resource.RLIM_INFINITY))
record = train_shard(c.arch, plan_shards(specs, n)[0], specs, data, epochs, splits_for(n, 0), ZooWriter(out))
print("rows", record["rows"])
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and /proc/self/status are Linux's")
def test_a_shard_larger_than_the_memory_limit_trains_because_its_epochs_are_streamed(tmp_path):
    """10,000 models x 151 epochs x 100 parameters: 576 MiB of float32 rows, and a shard file that holds them all;
    the training process is allowed 360 MiB more than it uses after its imports. Holding the shard's epochs until
    the end (and sorting them) needs more than twice the limit and fails with an allocation error; a row group
    per epoch trains the shard within it (measured: it fails at 260 MiB, passes at 300 MiB)."""
    import pyarrow.parquet as pq

    n, epochs, limit_mb = 10_000, 150, 360
    assert n * (epochs + 1) * 100 * 4 > 1.5 * limit_mb * 2**20  # the shard's rows alone do not fit
    run = subprocess.run([sys.executable, "-c", _UNDER_A_LIMIT, str(tmp_path), str(limit_mb), str(epochs), str(n)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"rows {n * (epochs + 1)}" in run.stdout
    meta = pq.ParquetFile(ZooWriter(tmp_path).shard_path(0)).metadata
    assert meta.num_rows == n * (epochs + 1) and meta.num_row_groups == epochs + 1
    assert ZooWriter(tmp_path).is_complete(0)


@settings(max_examples=25, deadline=None)
@given(per_shard=st.integers(1, 40), count=st.integers(1, 8))
def test_shards_partition_the_zoo_into_single_population_chunks(per_shard, count):
    specs = expand(config(grid=HYP, seeds={"count": count}))
    shards = plan_shards(specs, per_shard)
    ids = [m for s in shards for m in s.model_ids]
    assert sorted(ids) == list(range(len(specs)))
    by_id = {s.model_id: s for s in specs}
    for sh in shards:
        assert 1 <= len(sh.model_ids) <= per_shard
        assert {by_id[m].population_key() for m in sh.model_ids} == {sh.population}
    assert [s.shard for s in shards] == list(range(len(shards)))
    assert len({s.population for s in shards}) == 8  # activation x optimizer x dropout


# --- one shard, no Ray --------------------------------------------------------------------------

def test_train_shard_writes_every_epoch_of_every_model(tmp_path):
    c = config(seeds={"count": 5}, epochs=2, grid={"init": "kaiming_uniform", "lr": 1e-2})
    tetris = datasets.load("tetris", copies=2)
    specs = expand(c)
    splits = splits_for(len(specs), 0)
    shard = plan_shards(specs, 3)[1]
    done = []
    record = train_shard(c.arch, shard, specs, tetris, c.epochs, splits, ZooWriter(tmp_path), on_progress=done.append)
    assert record["rows"] == len(shard.model_ids) * 3 and record["model_ids"] == [3, 4]
    assert sum(done) == len(shard.model_ids) * c.epochs  # models x epochs trained, epoch 0 is the init
    ZooWriter(tmp_path).write_manifest({"layout": layout_of("tetris_ffn", 1, 4).to_dict()})
    df = open_zoo(tmp_path).frame()
    assert sorted(zip(df.model_id, df.epoch)) == [(m, e) for m in (3, 4) for e in range(3)]
    assert list(df.drop_duplicates("model_id").split) == [splits[3], splits[4]]
    assert set(df.seed) == {4, 5} and set(df.init) == {"kaiming_uniform"}


@pytest.mark.slow
def test_a_resnet_shard_is_streamed_one_model_at_a_time_and_equals_the_population_trainers_result(tmp_path):
    """ResNet-18 (BatchNorm: not a batched chain) shards are trained model after model, a row group per model
    and epoch, so memory holds one model's epoch; the weights are those train_population gives for the shard."""
    import pyarrow.parquet as pq
    import torch

    from raysys.datasets import ImageData
    from raysys.batched_trainer import train_population

    g = torch.Generator().manual_seed(0)
    data = ImageData("tiny", torch.rand(4, 3, 8, 8, generator=g), torch.arange(4), torch.rand(2, 3, 8, 8, generator=g),
                     torch.arange(2), torch.rand(2, 3, 8, 8, generator=g), torch.arange(2), 10)
    c = validate(ZooConfig, {"name": "r", "dataset": {"name": "digits"}, "arch": "resnet18", "seeds": {"count": 2},
                             "grid": {"optimizer": "sgd", "lr": 1e-3, "batch_size": 4}, "epochs": 1})
    specs = expand(c)
    shard = plan_shards(specs, 2)[0]
    record = train_shard(c.arch, shard, specs, data, 1, splits_for(2, 0), ZooWriter(tmp_path))
    f = pq.ParquetFile(ZooWriter(tmp_path).shard_path(0))
    assert record["rows"] == 4 and f.metadata.num_row_groups == 4
    assert f.read(columns=["model_id"]).column(0).to_pylist() == [0, 0, 1, 1]
    ZooWriter(tmp_path).write_manifest({"layout": layout_of("resnet18", 3, 10).to_dict()})
    w, meta = open_zoo(tmp_path).weights(epochs=[1])
    finals = train_population(c.arch, specs, data, 1).numpy()
    assert list(meta.model_id) == [0, 1]
    np.testing.assert_array_equal(w, finals)


# --- the real thing: CLI, Ray Train, SIGKILL, resume, MLflow --------------------------------------

TINY = {
    "name": "tiny", "dataset": {"name": "tetris", "options": {"copies": 2}}, "arch": "tetris_ffn",
    "grid": {"init": "kaiming_uniform", "lr": 1e-2}, "seeds": {"start": 1, "count": 16},
    "epochs": 3, "models_per_shard": 2, "mlflow": {"experiment": "zoo-test"},
}


def _reference_weights(tmp_path):
    """The uninterrupted result: every shard trained in this process by the same shard function."""
    c = validate(ZooConfig, TINY)
    data = datasets.load(c.dataset.name, **c.dataset.options)
    specs = expand(c)
    splits = splits_for(len(specs), c.split_seed)
    writer = ZooWriter(tmp_path / "reference")
    writer.write_manifest({"layout": layout_of("tetris_ffn", 1, 4).to_dict()})
    for shard in plan_shards(specs, c.models_per_shard):
        train_shard(c.arch, shard, specs, data, c.epochs, splits, writer)
    return open_zoo(tmp_path / "reference").weights()


@pytest.mark.slow
def test_generate_killed_midway_resumes_to_the_uninterrupted_zoo(tmp_path, ray_local, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from raysys import cli

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "zoo"
    writer = ZooWriter(out)
    n_shards = 8
    address = ray_local.get_runtime_context().gcs_address

    # 1. a real generation in its own process (joined to the test's Ray), SIGKILLed once a shard is done.
    # It calls the zoo stage directly: `python -m raysys.cli` would also import every other stage.
    log = open(tmp_path / "killed.log", "wb")
    run = ("import sys; from raysys.zoo import generate; "
           "generate(sys.argv[1], sys.argv[2], overrides=sys.argv[3:], progress=False)")
    proc = subprocess.Popen(
        [sys.executable, "-c", run, str(cfg), str(out), f"ray_address={address}", f"mlflow.tracking_uri={mlflow_uri}"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list((out / META).glob("shard-*.json")):
        time.sleep(0.05)
    alive = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert alive, f"generation ended before it could be killed:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
    # The killed job's Ray Train worker lives in the cluster until Ray reaps the dead driver's actors;
    # wait until it has stopped writing so the state below is what the rerun starts from.
    last, stable_since = None, time.time()
    while time.time() - stable_since < 3:
        state = sorted((p.name, p.stat().st_mtime_ns) for p in [*(out / "shards").glob("shard-*"), *(out / META).glob("shard-*")])
        if state != last:
            last, stable_since = state, time.time()
        time.sleep(0.2)
    complete = [s for s in range(n_shards) if writer.is_complete(s)]
    if len(complete) == n_shards:
        # On an idle machine the orphaned worker can finish every tiny shard before Ray reaps it;
        # drop the later shards' completion records, the state an earlier death leaves behind.
        for s in complete[n_shards // 2:]:
            writer.record_path(s).unlink()
        complete = complete[:n_shards // 2]
    assert 1 <= len(complete) < n_shards, complete
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "running" and len(manifest["shards"]) == n_shards
    before = {s: writer.shard_path(s).stat().st_mtime_ns for s in complete}

    # 2. what a crash mid-write can leave: a temp file, and a truncated parquet without its record
    torn = max(s for s in range(n_shards) if s not in complete)
    writer.shard_path(torn).write_bytes(b"PAR1 truncated")
    writer.record_path(torn).unlink(missing_ok=True)
    (out / "shards" / f".shard-{torn:05d}.parquet.deadbeef.tmp").write_bytes(b"half")

    # 3. rerun the same command: skips complete shards, redoes the rest
    rc = cli.main(["zoo", "generate", str(cfg), "--out", str(out), "--tracking-uri", mlflow_uri, "--no-progress"])
    assert rc == 0
    assert all(writer.is_complete(s) for s in range(n_shards))
    assert {s: writer.shard_path(s).stat().st_mtime_ns for s in complete} == before  # not retrained
    assert not [p for p in out.rglob("*.tmp")]

    w, meta = open_zoo(out).weights()
    keys = list(zip(meta.model_id, meta.epoch))
    assert len(keys) == len(set(keys)) == 16 * 4  # exactly one row per (model, epoch)
    assert set(keys) == {(m, e) for m in range(16) for e in range(4)}
    ref_w, ref_meta = _reference_weights(tmp_path)
    assert list(zip(ref_meta.model_id, ref_meta.epoch)) == keys
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(meta.test_acc, ref_meta.test_acc, atol=1e-9)
    assert (meta.groupby("model_id").split.nunique() == 1).all()

    final = json.loads((out / MANIFEST).read_text())
    assert final["status"] == "complete" and all(len(s["sha256"]) == 64 for s in final["shards"])
    assert final["dataset"]["name"] == "tetris" and final["layout"]["arch"] == "tetris_ffn"
    assert final["splits"] == splits_for(16, 0)

    # 4. MLflow: one run per invocation; the completed one has params, progress metrics and artifacts
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("zoo-test")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2
    run = runs[-1]
    assert run.info.status == "FINISHED" and run.data.tags["raysys.resumed"] == "true"
    assert run.data.params["epochs"] == "3" and run.data.params["grid.lr"] == "[0.01]"
    assert run.data.params["seeds.count"] == "16" and run.data.params["dataset.name"] == "tetris"
    assert run.data.metrics["model_epochs_done"] == 16 * 3
    # >=: the killed job's worker may still finish a shard before Ray reaps it; never fewer
    assert run.data.metrics["shards_skipped"] >= len(complete)
    assert 0.0 <= run.data.metrics["test_acc_last_mean"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "summary.png"} <= artifacts

    # 5. a rerun of a complete zoo trains nothing; another config is refused with the fix named
    generate(validate(ZooConfig, {**TINY, "mlflow": {"experiment": "zoo-test", "tracking_uri": mlflow_uri}}),
             out, progress=False)
    assert {s: writer.shard_path(s).stat().st_mtime_ns for s in complete} == before
    with pytest.raises(RaysysError, match=r"different config \(epochs: 3 -> 4\).*new --out"):
        generate(cfg, out, overrides=["epochs=4", f"mlflow.tracking_uri={mlflow_uri}"], progress=False)

    # 6. zoo info summarizes it
    s = summarize(open_zoo(out))
    assert s["models"] == 16 and s["rows"] == 64 and s["epochs"] == [0, 3]
    assert sum(s["splits"].values()) == 16 and s["splits"]["train"] == 11
    text = format_summary(s)
    assert "tetris_ffn (100 parameters)" in text and "16 of 16" in text


def test_info_cli_and_errors(tmp_path, capsys):
    from raysys import cli

    assert cli.main(["zoo", "info", str(tmp_path / "nowhere")]) == 2
    assert "raysys zoo generate" in capsys.readouterr().err
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "epoch": 3}))
    assert cli.main(["zoo", "generate", str(cfg), "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'epoch'" in err and "did you mean 'epochs'" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something.txt").write_text("x")
    cfg.write_text(yaml.safe_dump(TINY))
    with pytest.raises(RaysysError, match="not empty"):
        generate(cfg, tmp_path / "full", progress=False)


# --- who trains the shards: in this process or on Ray Train ------------------------------------------

def test_choose_runner_trains_in_process_only_when_one_local_worker_does_all_the_work(monkeypatch):
    from raysys import zoo

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(zoo, "_ray_initialized", lambda: False)
    monkeypatch.setattr(zoo, "local_cpus", lambda: 2)
    c = config()
    assert zoo.choose_runner(c, 1) == "in_process"  # one shard: one worker would do it all
    assert zoo.choose_runner(c, 0) == "in_process"
    assert zoo.choose_runner(c, 2) == "ray_train"  # two CPUs, two shards: two workers
    assert zoo.choose_runner(config(resources={"num_workers": 1}), 5) == "in_process"
    assert zoo.choose_runner(config(resources={"cpus_per_worker": 2}), 5) == "in_process"  # 2 CPUs / 2 per worker
    assert zoo.choose_runner(config(resources={"use_gpu": True}), 1) == "ray_train"
    assert zoo.choose_runner(config(ray_address="10.0.0.5:6379"), 1) == "ray_train"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert zoo.choose_runner(c, 1) == "ray_train"  # a Ray job's driver
    monkeypatch.delenv("RAY_ADDRESS")
    assert zoo.choose_runner(config(resources={"runner": "ray_train"}), 1) == "ray_train"
    assert zoo.choose_runner(config(resources={"runner": "in_process"}), 9) == "in_process"
    monkeypatch.setattr(zoo, "_ray_initialized", lambda: True)  # a script or test joined a Ray: use it
    assert zoo.choose_runner(c, 1) == "ray_train"


def _runner_zoo(tmp_path, name, runner, mlflow_uri):
    out = tmp_path / name
    c = validate(ZooConfig, {**TINY, "seeds": {"start": 1, "count": 6}, "epochs": 2, "models_per_shard": 3,
                             "resources": {"runner": runner},
                             "mlflow": {"experiment": "zoo-test", "tracking_uri": mlflow_uri}})
    manifest = generate(c, out, progress=False)
    return out, manifest


@pytest.mark.slow
def test_a_tiny_local_zoo_trains_in_process_without_ray(tmp_path, mlflow_uri):
    """The in-process runner end to end: the zoo, its records, the manifest and the MLflow run (tagged with
    the runner), and no Ray started by generate."""
    import sys

    from mlflow.tracking import MlflowClient

    was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    out, manifest = _runner_zoo(tmp_path, "zoo", "in_process", mlflow_uri)
    assert manifest["status"] == "complete" and len(manifest["shards"]) == 2
    assert ("ray" in sys.modules and sys.modules["ray"].is_initialized()) == was_up
    w, meta = open_zoo(out).weights()
    assert sorted(set(zip(meta.model_id, meta.epoch))) == [(m, e) for m in range(6) for e in range(3)]
    from raysys.integrity import verify_zoo

    assert not verify_zoo(out).problems
    client = MlflowClient(mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("zoo-test").experiment_id])[0]
    assert run.data.tags["raysys.runner"] == "in_process" and run.data.metrics["model_epochs_done"] == 12


@pytest.mark.slow
def test_both_runners_write_the_same_zoo(tmp_path, ray_local, mlflow_uri):
    """The in-process runner and Ray Train write byte-identical shards (same records, same sha256) of the
    same plan: a zoo does not depend on which path trained it."""
    a, ma = _runner_zoo(tmp_path, "in_process", "in_process", mlflow_uri)
    b, mb = _runner_zoo(tmp_path, "ray_train", "ray_train", mlflow_uri)
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    for s in range(len(ma["shards"])):
        assert ZooWriter(a).shard_path(s).read_bytes() == ZooWriter(b).shard_path(s).read_bytes()
    strip = lambda m: {k: v for k, v in m.items() if k != "config"}  # noqa: E731 - config.resources.runner differs
    assert strip(ma) == strip(mb)


@pytest.mark.slow
def test_the_mlflow_helper_process_ends_runs_as_the_block_ends(tmp_path, mlflow_uri):
    """zoo generate keeps its MLflow run in a helper process (raysys.runtime.TrackingProcess): metrics and
    artifacts arrive, a block that raises ends the run FAILED, a normal one FINISHED, and errors come back."""
    from mlflow.tracking import MlflowClient

    from raysys.runtime import TrackingProcess
    from raysys.tracking import TrackingError

    art = tmp_path / "a.txt"
    art.write_text("x")
    tracker = TrackingProcess(mlflow_uri)
    try:
        with tracker.run("helper", "ok", {"t": "1"}, {"a": {"b": 2}}) as run:
            run.log_metrics({"m": 3}, step=1)
            run.log_artifact(art)
        ok = tracker.run_id
        with pytest.raises(ValueError), tracker.run("helper", "bad", {}, {}):
            raise ValueError("boom")
        bad = tracker.run_id
        with pytest.raises(TrackingError, match="MLflow"), tracker.run("helper", "x", {}, {}) as run:
            run.log_artifact(tmp_path / "missing.txt")
    finally:
        tracker.close()
    client = MlflowClient(mlflow_uri)
    r = client.get_run(ok)
    assert r.info.status == "FINISHED" and r.data.metrics["m"] == 3 and r.data.params["a.b"] == "2"
    assert r.data.tags["t"] == "1" and [a.path for a in client.list_artifacts(ok)] == ["a.txt"]
    assert client.get_run(bad).info.status == "FAILED"
