"""MLflow's UI (issue 13, item 6): every experiment raysys creates is a model-training experiment,
so MLflow 3 opens it on the runs table, and each stage's headline figures are run metrics."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from raysys import tracking
from raysys.populations import finetune
from raysys.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING

ROOT = Path(__file__).resolve().parents[1]


def _kind(uri: str, name: str) -> str | None:
    return MlflowClient(uri).get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG)


def test_mlflow_reads_this_tag():
    """The tag and value are MLflow's own (its UI's ExperimentKind), not a guess."""
    import mlflow

    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    bundle = "".join(p.read_text(errors="ignore") for p in js.glob("main.*.js"))
    assert f'"{EXPERIMENT_KIND_TAG}"' in bundle and f'"{MODEL_TRAINING}"' in bundle


def test_the_helper_tags_new_and_old_experiments(mlflow_uri):
    exp_id = tracking.experiment_id(mlflow_uri, "new")
    assert _kind(mlflow_uri, "new") == MODEL_TRAINING
    assert tracking.experiment_id(mlflow_uri, "new") == exp_id
    client = MlflowClient(mlflow_uri)
    client.create_experiment("old")  # made by an older raysys: no kind yet
    tracking.experiment_id(mlflow_uri, "old")
    assert _kind(mlflow_uri, "old") == MODEL_TRAINING
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert tracking.experiment_id(mlflow_uri, "chosen") == chosen
    assert _kind(mlflow_uri, "chosen") == "genai_development"  # a kind chosen in the UI stays


def test_start_run_creates_a_tagged_experiment(mlflow_uri):
    with tracking.start_run(mlflow_uri, "via-start-run", params={"a": 1}) as run:
        pass
    assert _kind(mlflow_uri, "via-start-run") == MODEL_TRAINING
    assert MlflowClient(mlflow_uri).get_run(run.info.run_id).data.params == {"a": "1"}


def test_no_stage_creates_an_experiment_itself():
    """Every experiment comes from tracking.experiment_id (start_run goes through it)."""
    calls = re.compile(r"\.create_experiment\(|mlflow\.set_experiment\((?!experiment_id=)|mlflow\.create_experiment\(")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "raysys").rglob("*.py") if p.name != "tracking.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if calls.search(line)]
    assert not offenders, offenders


def test_populations_tracker_tags_its_experiment_and_logs_accuracy_per_budget(mlflow_uri):
    from raysys.populations.stage import _Tracker

    tracker = _Tracker(mlflow_uri, "raysys-populations", None, {"budgets": [0, 1, 3]}, budgets=[0, 1, 3])
    assert _kind(mlflow_uri, "raysys-populations") == MODEL_TRAINING
    curve = np.array([[0.1, 0.3], [0.4, 0.6], [0.5, 0.5], [0.7, 0.9]])  # [epoch, model]
    job = finetune.Job("S_KDE30", "in_dataset", "tetris_ffn", "tetris", [], epochs=3)
    tracker.child(job, curve)
    tracker.finish(Path("/nonexistent"))
    client = MlflowClient(mlflow_uri)
    child = client.get_run(tracker.run_ids["in_dataset/S_KDE30"]).data.metrics
    for b in (0, 1, 3):
        assert abs(child[f"acc_ep{b}_mean"] - curve[b].mean()) < 1e-12
        assert abs(child[f"acc_ep{b}_std"] - curve[b].std()) < 1e-12
    parent = client.get_run(tracker.parent).data.metrics
    assert abs(parent["in_dataset/S_KDE30/acc_ep3_mean"] - 0.8) < 1e-12
    assert "in_dataset/S_KDE30/acc_ep2_mean" not in parent  # 2 is no budget


def test_pipeline_experiment_is_tagged(mlflow_uri, tmp_path):
    from raysys import pipeline

    config = type("PipelineConfig", (), {"name": "p"})()  # link_runs reads only its name
    linked = pipeline.link_runs(mlflow_uri, config, tmp_path, {"zoo": None}, {"zoo": {"test_acc_last": [0.5, 0.1]}})
    assert _kind(mlflow_uri, pipeline.EXPERIMENTS["pipeline"]) == MODEL_TRAINING
    assert MlflowClient(mlflow_uri).get_run(linked["pipeline_run"]).data.metrics["zoo.test_acc_last_mean"] == 0.5
