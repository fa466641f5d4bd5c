"""Hyperparameter search: space validation, define-by-run conditionals, and one real search on a
tiny tetris zoo (real Ray, real Optuna, real MLflow sqlite) that is interrupted and resumed."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import optuna
import pyarrow as pa
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from raysys import datasets
from raysys.architectures import layout_of
from raysys.config import ConfigError, RaysysError, load, validate
from raysys.hyperrep.config import HyperRepConfig
from raysys.batched_trainer import train_population
from raysys.search import DefineByRun, SearchConfig, check_search, load_search, pareto_front, run_search
from raysys.store import ZooWriter, rows_table, splits_for
from raysys.train import ModelSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)

TINY_BASE = {
    "model": {"d_model": 8, "heads": 2, "layers": 1, "ff": 16, "latent_dim": 4, "projection_dim": 8},
    "train": {"epochs": 2, "batch_size": 8, "epoch_window": [1, 2], "device": "cpu"},
}


def search_config(**changes) -> SearchConfig:
    data = {"base": TINY_BASE, "space": {"d_model": {"type": "categorical", "choices": [8, 12]},
                                         "heads": {"type": "categorical", "choices": [1, 2, 4]}}}
    data.update(changes)
    return validate(SearchConfig, data)


# --- space validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("space, objectives, needle", [
    ({"lr": {"type": "float", "low": 1e-2, "high": 1e-4, "log": True}}, ["recon_r2"], "swap them"),
    ({"lerning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}}, ["recon_r2"], "unknown search parameter 'lerning_rate'"),
    ({"d_modle": {"type": "categorical", "choices": [8]}}, ["recon_r2"], "did you mean 'd_model'"),
    ({"model": {"type": "categorical", "choices": [8]}}, ["recon_r2"], "names a whole section"),
    ({"beta": {"type": "float", "low": 0.5, "high": 1.0}}, ["recon_r2", "accuracy"], "unknown objective"),
    ({"top_fraction": {"type": "float", "low": 0.1, "high": 1.5}}, ["recon_r2"], "top_fraction must stay within"),
    ({"lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}, ["recon_r2"], "log range needs low > 0"),
])
def test_invalid_space_specs_are_config_errors(space, objectives, needle):
    with pytest.raises(ConfigError) as err:
        validate(SearchConfig, {"space": space, "objectives": objectives})
    assert needle in str(err.value)


def test_unknown_top_level_key_is_an_error():
    with pytest.raises(ConfigError, match="did you mean 'num_samples'"):
        validate(SearchConfig, {"space": {"beta": {"type": "float", "low": 0.5, "high": 1}}, "num_sample": 3})


def test_heads_that_never_divide_d_model_are_rejected():
    bad = search_config(space={"d_model": {"type": "categorical", "choices": [9, 15]},
                               "heads": {"type": "categorical", "choices": [2, 4]}})
    with pytest.raises(ConfigError, match=r"no heads choice \(2, 4\) divides d_model value\(s\) 9, 15"):
        check_search(bad)
    # An odd step makes some d_model values in an int range undividable too.
    odd = search_config(space={"d_model": {"type": "int", "low": 8, "high": 16, "step": 3},
                               "heads": {"type": "categorical", "choices": [2, 4]}})
    with pytest.raises(ConfigError, match=r"value\(s\) 11\. "):  # 8, 14 divide by 2; 11 never does
        check_search(odd)


def test_heads_fixed_in_base_must_divide_every_searched_d_model():
    cfg = search_config(space={"d_model": {"type": "categorical", "choices": [8, 10]}})  # base heads = 2
    check_search(cfg)
    cfg = search_config(space={"d_model": {"type": "categorical", "choices": [8, 9]}})
    with pytest.raises(ConfigError, match="divides d_model value"):
        check_search(cfg)


def test_range_outside_the_autoencoder_config_is_rejected():
    cfg = search_config(space={"beta": {"type": "float", "low": 0.5, "high": 1.5}})
    with pytest.raises(ConfigError, match="space.beta allows 1.5"):
        check_search(cfg)


def test_float_width_is_rejected():
    cfg = search_config(space={"d_model": {"type": "float", "low": 8, "high": 16}})
    with pytest.raises(ConfigError, match="int range or categorical"):
        check_search(cfg)


def test_shipped_configs_validate():
    root = Path(__file__).resolve().parents[1] / "configs" / "search"
    files = sorted(root.glob("*.yaml"))
    assert {f.name for f in files} >= {"laptop.yaml", "cluster.yaml"}
    for path in files:
        search, base = load_search(path)
        assert search.num_samples > 0 and isinstance(base, HyperRepConfig)


# --- define-by-run ------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(d_models=st.lists(st.sampled_from([4, 6, 8, 12, 16, 18, 24, 32, 48]), min_size=1, max_size=5, unique=True),
       heads=st.lists(st.integers(1, 8), min_size=1, max_size=4, unique=True),
       seed=st.integers(0, 10_000))
def test_define_by_run_only_proposes_heads_that_divide_d_model(d_models, heads, seed):
    cfg = search_config(space={"bandwidth": {"type": "float", "low": 0.0, "high": 0.5},  # sampler keys mix in
                               "heads": {"type": "categorical", "choices": heads},  # before d_model: order-free
                               "d_model": {"type": "categorical", "choices": d_models}})
    space = DefineByRun(cfg, HyperRepConfig.model_validate(TINY_BASE))
    if any(not space.valid_heads(d) for d in d_models):
        with pytest.raises(ConfigError):
            check_search(cfg)
        return
    check_search(cfg)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=3),
                                direction="maximize")
    seen = set()
    for _ in range(12):
        trial = study.ask()
        params = space(trial)
        d, h = params["hyperrep"]["d_model"], params["hyperrep"]["heads"]
        assert d in d_models and h in heads and d % h == 0
        assert 0.0 <= params["sampler"]["bandwidth"] <= 0.5
        seen.add((d, h))
        study.tell(trial, float(d % 5 + h))  # any objective: TPE must still stay inside the valid set
    assert seen


def test_asha_only_for_a_single_objective():
    from ray.tune.schedulers import ASHAScheduler

    from raysys.search import _optuna_searcher, _scheduler

    single = search_config(objectives=["sample_acc"], asha={"grace_period": 1})
    assert isinstance(_scheduler(single, 2), ASHAScheduler)
    assert _optuna_searcher(single, DefineByRun(single, check_search(single))).searcher.metric == "val_sample_acc"
    multi = search_config(objectives=["sample_acc", "recon_r2"])
    assert _scheduler(multi, 2) is None
    assert _optuna_searcher(multi, DefineByRun(multi, check_search(multi))).searcher.metric == \
        ["val_sample_acc", "val_recon_r2"]


def test_trials_stopped_at_max_t_count_as_completed_not_pruned():
    from types import SimpleNamespace

    from raysys.search import _finished_status

    assert _finished_status(SimpleNamespace(last_result={"epoch": 4, "completed": 0}), 4) == "completed"  # ASHA at max_t
    assert _finished_status(SimpleNamespace(last_result={"epoch": 2, "completed": 1}), 4) == "completed"  # patience
    assert _finished_status(SimpleNamespace(last_result={"epoch": 2, "completed": 0}), 4) == "pruned"


def test_pareto_front_keeps_exactly_the_non_dominated_rows():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(40, 2))
    front = set(pareto_front(values).tolist())
    for i, v in enumerate(values):
        dominated = any(np.all(w >= v) and np.any(w > v) for w in values)
        assert (i in front) == (not dominated)


# --- a real search on a tiny zoo ----------------------------------------------------------------

def make_zoo(root: Path, n: int = 12, epochs: int = 2) -> Path:
    data = datasets.load("tetris")
    layout = layout_of("tetris_ffn", data.in_channels, data.num_classes)
    specs = [ModelSpec(model_id=i, seed=i, init="kaiming_uniform", lr=3e-2, batch_size=32) for i in range(n)]
    splits = splits_for(n, 0)
    writer = ZooWriter(root)
    writer.write_manifest({"layout": layout.to_dict(), "dataset": data.describe(), "arch": "tetris_ffn", "config": {}})
    tables = []
    train_population("tetris_ffn", specs, data, epochs, lambda e, w, m: tables.append(rows_table(
        layout.num_params, [s.model_id for s in specs], e, splits, w.numpy(), m, [s.hyperparameters() for s in specs])))
    writer.write_shard(0, pa.concat_tables(tables), [s.model_id for s in specs])
    return root


def _reported_epochs(out: Path) -> dict[str, list[tuple[int, int]]]:
    """{trial_id: [(epoch, completed), ...]} in the order the trial reported them (Tune's result.json)."""
    reported = {}
    for path in (out / "tune" / "search").glob("trial_*/result.json"):
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line being written right now
                break
            rows.append((int(row["epoch"]), int(row["completed"])))
        reported[path.parent.name[len("trial_"):]] = rows
    return reported


def _cut_off(out: Path, epochs: int) -> dict[str, int]:
    """{trial_id: last reported epoch} of the trials part-way through training."""
    return {t: rows[-1][0] for t, rows in _reported_epochs(out).items()
            if rows and not rows[-1][1] and rows[-1][0] < epochs}


def _interrupt_mid_trial(out: Path, epochs: int, stop: threading.Event) -> None:
    """Send ourselves SIGUSR1 (Tune's Ctrl-C) once a trial has finished and another has reported at
    most half of its epochs (Tune takes a moment to stop): a real interruption mid-training."""
    while not stop.is_set():
        try:
            early = [e for e in _cut_off(out, epochs).values() if e <= epochs // 2]
            if json.loads((out / "progress.json").read_text())["done"] >= 1 and early:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)


EPOCHS = 6  # long enough for the interruption to catch a trial part-way through training


@pytest.mark.slow
def test_search_interrupted_and_resumed_keeps_every_trial(tmp_path, ray_local, mlflow_uri):
    from mlflow.tracking import MlflowClient

    zoo = make_zoo(tmp_path / "zoo")
    out = tmp_path / "search"
    cfg = search_config(space={"d_model": {"type": "categorical", "choices": [8, 12]},
                               "heads": {"type": "categorical", "choices": [1, 2, 3, 4]},
                               "beta": {"type": "float", "low": 0.5, "high": 1.0},
                               "bandwidth": {"type": "float", "low": 0.0, "high": 0.2}},
                        objectives=["recon_r2", "sample_acc"], num_samples=3, max_concurrent=2,
                        sampler={"num_models": 4}, base={**TINY_BASE, "train": {**TINY_BASE["train"], "epochs": EPOCHS}})

    stop = threading.Event()
    watcher = threading.Thread(target=_interrupt_mid_trial, args=(out, EPOCHS, stop), daemon=True)
    watcher.start()
    try:
        first = run_search(cfg, zoo, out, tracking_uri=mlflow_uri)
    finally:
        stop.set()
    assert first["interrupted"], first["status"]
    finished_first = {t["trial_id"] for t in _rows(out) if t["status"] == "completed"}
    assert finished_first
    cut = _cut_off(out, EPOCHS)  # trials the interruption caught part-way, and their last reported epoch
    assert cut, _reported_epochs(out)

    with pytest.raises(RaysysError, match="already holds a search"):
        run_search(cfg, zoo, out, tracking_uri=mlflow_uri)
    with pytest.raises(RaysysError, match=r"differs .*changed: num_samples"):
        run_search(cfg.model_copy(update={"num_samples": 5}), zoo, out, resume=True)
    summary = run_search(cfg, zoo, out, resume=True)

    rows = _rows(out)
    assert len(rows) == cfg.num_samples == summary["trials"] and not summary["interrupted"]
    assert all(r["status"] == "completed" for r in rows), rows
    assert finished_first <= {r["trial_id"] for r in rows}
    for r in rows:  # define-by-run held inside the real search too
        assert int(float(r["d_model"])) % int(float(r["heads"])) == 0

    # MLflow: one parent, exactly one child per trial (a resumed trial reuses its child run).
    client = MlflowClient(mlflow_uri)
    state = json.loads((out / "state.json").read_text())
    runs = client.search_runs([state["experiment_id"]])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == state["parent_run_id"]]
    assert sorted(r.data.tags["raysys_trial_id"] for r in children) == sorted(r["trial_id"] for r in rows)
    assert all(r.info.status == "FINISHED" for r in children)
    # A trial cut off mid-training resumed: its reports to Tune continue after the last one before the
    # interruption (no restart from epoch 1, no epoch reported twice), and every trial's MLflow run
    # holds each epoch exactly once.
    reported = _reported_epochs(out)
    for trial_id, last in cut.items():
        epochs = [e for e, completed in reported[trial_id] if not completed]
        assert epochs[0] == 1 and epochs[-1] == EPOCHS, (trial_id, last, reported[trial_id])
        assert all(a < b for a, b in zip(epochs, epochs[1:])), (trial_id, last, reported[trial_id])
        assert reported[trial_id][-1] == (EPOCHS, 1)  # and it then completed
    for run in children:
        for metric in ("val_rec", "val_recon_r2"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
            assert sorted(steps) == list(range(1, EPOCHS + 1)), (run.data.tags["raysys_trial_id"], metric, steps)
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_hyperrep.yaml", "pareto.csv", "search.png", "results.csv"} <= artifacts

    # The exported best config is exactly what the winning trial trained (its checkpoint records the
    # config train ran with), so `raysys hyperrep train` accepts it unchanged.
    best = load(HyperRepConfig, out / "best_hyperrep.yaml")
    trained = json.loads((out / "best_model" / "config.json").read_text())["config"]
    assert best == HyperRepConfig.model_validate(trained)
    winner = summary["best"]
    assert best.model.d_model == winner["params"]["d_model"] and best.model.heads == winner["params"]["heads"]
    assert best.loss.beta == pytest.approx(winner["params"]["beta"])
    assert winner["trial_id"] in {p["trial_id"] for p in summary["pareto"]}
    sampling = yaml.safe_load((out / "best_sampler.yaml").read_text())["sampling"]
    assert sampling["bandwidth"] == pytest.approx(winner["params"]["bandwidth"])
    assert (out / "best_model" / "model.safetensors").exists() and (out / "search.png").stat().st_size > 0


def _rows(out: Path) -> list[dict]:
    import csv
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))
