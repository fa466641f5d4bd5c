"""A clean console (issue 13, item 7): a normal run prints raysys's lines, not MLflow's database
set-up, alembic, Ray's token banner or placement-group cleaner, nor thread tracebacks; real
warnings and errors still reach the console."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Lines that are not raysys's: MLflow creating/migrating its sqlite store (and alembic under it), Ray
# Train's placement-group cleaner without a dashboard, Ray's token-auth banner, thread tracebacks.
NOISE = ("Creating initial MLflow database tables", "Updating database tables", "alembic", "Context impl",
         "PlacementGroupCleaner", "Failed to query Ray Train Controller actor state",
         "Token authentication is enabled", "Traceback")

TINY = {"name": "quiet", "dataset": {"name": "tetris", "options": {"copies": 2}}, "arch": "tetris_ffn",
        "grid": {"init": "kaiming_uniform", "lr": 1e-2}, "seeds": {"start": 1, "count": 4},
        "epochs": 2, "models_per_shard": 2, "mlflow": {"experiment": "zoo-console"}}


def _env() -> dict:
    # a private Ray and the URI given on the command line, whatever the developer's shell sets
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}


def _noise(text: str) -> list[str]:
    return [n for n in NOISE if n in text]


@pytest.mark.slow
def test_zoo_generate_on_a_tiny_config_prints_only_raysys_lines(tmp_path):
    from mlflow.tracking import MlflowClient

    from raysys.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a fresh database: MLflow creates its tables in this run
    raysys = Path(sys.executable).with_name("raysys")  # the console script pip installed, as a user runs it
    res = subprocess.run([str(raysys), "zoo", "generate", str(cfg), "--out", str(tmp_path / "zoo"),
                          "--tracking-uri", uri, "--no-progress"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=500)
    both = res.stdout + res.stderr
    assert res.returncode == 0, both[-3000:]
    assert "zoo          quiet (complete)" in res.stdout and "zoo written to" in res.stdout
    assert not _noise(both), f"{_noise(both)} in:\n{both[-3000:]}"

    # item 6 on the same real run: the experiment opens on the runs table; the headline figures are metrics
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("zoo-console")
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert 0.0 <= run.data.metrics["test_acc_last_mean"] <= 1.0 and run.data.metrics["test_acc_last_std"] >= 0.0
    assert run.data.metrics["model_epochs_done"] == 4 * 2


@pytest.mark.slow
def test_tracking_without_ray_prints_nothing(tmp_path):
    """The stages that log through an MlflowClient (hyperrep eval, populations, pipeline) without Ray."""
    code = ("import sys; from raysys import tracking; "
            "i = tracking.experiment_id(sys.argv[1], 'x'); c = tracking.client(sys.argv[1]); "
            "r = c.create_run(i); c.log_metric(r.info.run_id, 'm', 1.0); c.set_terminated(r.info.run_id)")
    res = subprocess.run([sys.executable, "-c", code, f"sqlite:///{tmp_path / 'fresh.db'}"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout + res.stderr == ""


def test_quieting_keeps_warnings_and_errors():
    from raysys import runtime, tracking

    tracking.quiet_logs()
    runtime._quiet_driver_logs()
    for name in tracking.QUIET_LOGGERS:
        logger = logging.getLogger(name)
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING), name
    # the token filter drops the banner only, not Ray's other authentication warnings
    banner = logging.makeLogRecord({"msg": "Token authentication is enabled for this Ray cluster. ..."})
    other = logging.makeLogRecord({"msg": "Token authentication is disabled: anyone can connect"})
    assert not runtime._TOKEN_BANNER.filter(banner) and runtime._TOKEN_BANNER.filter(other)
