"""End to end on real services, nothing mocked.

* a Ray cluster of its own: ``ray start --head --block`` with token auth, in a new process group
  (stopped by killing that group, never with ``ray stop``, which would kill every Ray on the host);
* an ``mlflow server`` on a free localhost port, started through ``raysys mlflow serve``'s command;
* the tiny pipeline submitted with ``ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml``,
  logging to that server; then rerun on its outputs, when every stage must be skipped;
* the runs checked through MLflow's REST API and in the MLflow UI rendered by headless Chromium.

Every wait is bounded.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 180  # s, a loaded 2-core machine needs most of it to import mlflow
JOB_TIMEOUT = 480

pytestmark = [pytest.mark.timeout(1200), pytest.mark.cluster]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(name: str) -> str:
    """The console script installed beside this Python (ray, ...), else the one on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"the '{name}' command is not installed; pip install -e '.[test]' provides it")
    return found


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    # a new session: the whole tree (raylet, GCS, dashboard, workers; mlflow's workers) is one group
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def stop(procs: list[subprocess.Popen], markers: list[str]) -> None:
    """Stop the process groups we started (TERM, then KILL after a grace period), then any straggler
    whose command line names one of our private directories. Never `ray stop`: it kills every Ray on the host."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.2)
        if all(p.poll() is not None for p in procs):
            break
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes()
            if any(m.encode() in cmdline for m in markers):
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float, headers: dict | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode} before {url} came up:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def rest(base: str, endpoint: str, body: dict | None = None, query: dict | None = None) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """A private Ray cluster (token auth) and an MLflow server, started side by side."""
    from raysys.mlflow_server import server_command

    # Ray's socket paths must stay short: its temp dir lives directly in /tmp
    ray_tmp = tempfile.mkdtemp(prefix="rs-e2e-", dir="/tmp")
    logs = tmp_path_factory.mktemp("logs")
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "MLFLOW_TRACKING_URI"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    gcs, dash = free_port(), free_port()
    ray_cmd = [cli("ray"), "start", "--head", "--block", f"--port={gcs}", f"--temp-dir={ray_tmp}", "--num-cpus=2",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
               "--disable-usage-stats"] + [f"--{flag}={free_port()}" for flag in (
                   "node-manager-port", "object-manager-port", "ray-client-server-port", "dashboard-agent-listen-port",
                   "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")]
    mlflow_dir = tmp_path_factory.mktemp("mlflow")
    mlflow_port = free_port()
    mlflow_cmd = server_command("127.0.0.1", mlflow_port, f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                                str(mlflow_dir / "artifacts"), workers=1)

    ray_proc = start(ray_cmd, env, logs / "ray.log")
    mlflow_proc = start(mlflow_cmd, env, logs / "mlflow.log")
    try:
        dashboard = f"http://127.0.0.1:{dash}"
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        wait_http(f"{dashboard}/api/version", ray_proc, logs / "ray.log", START_TIMEOUT,
                  headers={"Authorization": f"Bearer {token}"})
        wait_http(f"{mlflow_url}/health", mlflow_proc, logs / "mlflow.log", START_TIMEOUT)
        yield {"dashboard": dashboard, "mlflow": mlflow_url, "env": env, "token": token, "logs": logs,
               "gcs_port": gcs, "ray_tmp": ray_tmp}
    finally:
        stop([ray_proc, mlflow_proc], markers=[ray_tmp, f"{mlflow_dir}/"])
        shutil.rmtree(ray_tmp, ignore_errors=True)


def submit(services: dict, out: Path, name: str) -> subprocess.CompletedProcess:
    env = services["env"]
    cmd = [cli("ray"), "job", "submit", "--address", services["dashboard"], "--working-dir", ".",
           "--runtime-env", "jobs/runtime_env.yaml", "--",
           "python", "jobs/pipeline.py", "--config", "configs/pipeline/tiny.yaml", "--out", str(out),
           "--tracking-uri", services["mlflow"], "--set", f"name={name}"]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT)


@pytest.fixture(scope="module")
def first_run(services, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "tiny"
    name = f"e2e-{secrets.token_hex(3)}"
    t0 = time.time()
    job = submit(services, out, name)
    log = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in log, log[-6000:]
    return {"out": out, "name": name, "log": log, "seconds": time.time() - t0}


def test_cluster_rejects_a_client_without_the_token(services):
    """The job API that `ray job submit` talks to answers only with the cluster's token."""
    jobs = f"{services['dashboard']}/api/jobs/"
    for headers in ({}, {"Authorization": "Bearer " + "0" * 64}):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(jobs, headers=headers), timeout=30)
        assert err.value.code in (401, 403)
    with urllib.request.urlopen(urllib.request.Request(
            jobs, headers={"Authorization": f"Bearer {services['token']}"}), timeout=30) as r:
        assert r.status == 200


def test_zoo_generate_job_runs_on_the_cluster_that_runs_the_job(services, tmp_path):
    """`ray job submit -- raysys zoo generate ...` with no --address: the command joins the cluster the job
    runs on ($RAY_ADDRESS, which Ray sets for the job's driver), not a private Ray of its own; the zoo's
    MLflow run names the Ray it used, which must be this cluster's GCS and session."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps({"name": "job-zoo", "dataset": {"name": "tetris"}, "arch": "tetris_ffn",
                               "seeds": {"count": 2}, "epochs": 1}))  # JSON is YAML
    out = tmp_path / "zoo"
    cmd = [cli("ray"), "job", "submit", "--address", services["dashboard"], "--",
           cli("raysys"), "zoo", "generate", str(cfg), "--out", str(out), "--tracking-uri", services["mlflow"],
           "--no-progress"]
    job = subprocess.run(cmd, env=services["env"], cwd=tmp_path, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    log = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in log, log[-6000:]
    assert "zoo          job-zoo (complete)" in log
    from raysys.store import MANIFEST

    assert json.loads((out / MANIFEST).read_text())["status"] == "complete"

    base = services["mlflow"]
    exp = rest(base, "experiments/get-by-name", query={"experiment_name": "raysys-zoo"})["experiment"]
    runs = rest(base, "runs/search", {"experiment_ids": [exp["experiment_id"]],
                                      "filter": f"tags.`raysys.out_dir` = '{out}'"})["runs"]
    assert len(runs) == 1
    tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
    assert tags["raysys.ray_gcs_address"].rsplit(":", 1)[1] == str(services["gcs_port"]), tags
    assert (Path(services["ray_tmp"]) / tags["raysys.ray_session"]).is_dir(), tags  # the head's own session


def test_pipeline_job_writes_the_report(first_run):
    out = first_run["out"]
    from raysys.pipeline import stage_file

    for stage in ("zoo", "hyperrep", "populations"):
        record = json.loads(stage_file(out / stage).read_text())
        assert len(record["hash"]) == 16 and record["mlflow_run_id"], stage
    report = json.loads((out / "report.json").read_text())
    assert report["name"] == first_run["name"]
    assert report["zoo"]["models"] == 24 and report["zoo"]["status"] == "complete"
    assert report["populations"]["num_models"] == 6
    methods = {r["method"] for r in report["populations"]["accuracy"]}
    assert methods == {"S_KDE30", "B_T", "B_noise_0.02"}
    assert all(0 <= r["mean"] <= 100 for r in report["populations"]["accuracy"])
    assert report["figures"] and all((out / f).stat().st_size > 1000 for f in report["figures"])
    md = (out / "report.md").read_text()
    assert "## Zoo" in md and "## Hyper-representation" in md and "| S_KDE30 |" in md


def test_runs_are_linked_in_the_mlflow_server(services, first_run):
    base = services["mlflow"]
    pipe_exp = rest(base, "experiments/get-by-name", query={"experiment_name": "raysys-pipeline"})["experiment"]
    runs = rest(base, "runs/search", {"experiment_ids": [pipe_exp["experiment_id"]],
                                      "filter": f"attributes.run_name = '{first_run['name']}'"})["runs"]
    assert len(runs) == 1
    pipe = runs[0]
    tags = {t["key"]: t["value"] for t in pipe["data"]["tags"]}
    metrics = {m["key"]: m["value"] for m in pipe["data"].get("metrics", [])}
    assert pipe["info"]["status"] == "FINISHED"
    assert any(k.startswith("populations.in_dataset.S_KDE30") for k in metrics)

    def run(run_id):
        r = rest(base, "runs/get", query={"run_id": run_id})["run"]
        return r, {t["key"]: t["value"] for t in r["data"]["tags"]}

    zoo, zoo_tags = run(tags["raysys.zoo_run"])
    hyper, hyper_tags = run(tags["raysys.hyperrep_run"])
    pops, pops_tags = run(tags["raysys.populations_run"])
    experiments = {name: rest(base, "experiments/get-by-name", query={"experiment_name": name})["experiment"]
                   ["experiment_id"] for name in ("raysys-zoo", "raysys-hyperrep", "raysys-populations")}
    assert zoo["info"]["experiment_id"] == experiments["raysys-zoo"]
    assert hyper["info"]["experiment_id"] == experiments["raysys-hyperrep"]
    assert pops["info"]["experiment_id"] == experiments["raysys-populations"]
    for t in (zoo_tags, hyper_tags, pops_tags):
        assert t["raysys.pipeline_run"] == pipe["info"]["run_id"] and t["raysys.pipeline"] == first_run["name"]
    assert hyper_tags["raysys.parent_zoo_run"] == zoo["info"]["run_id"]
    assert pops_tags["raysys.parent_zoo_run"] == zoo["info"]["run_id"]
    assert pops_tags["raysys.parent_hyperrep_run"] == hyper["info"]["run_id"]
    _, eval_tags = run(tags["raysys.hyperrep_eval_run"])  # the autoencoder's probes and figures
    assert eval_tags["raysys.parent_hyperrep_run"] == hyper["info"]["run_id"]


def test_rerun_skips_every_stage_and_needs_no_ray(services, first_run, capsys):
    """Rerun on the job's outputs, here in the test process: every stage is up to date, so nothing is
    redone, Ray is never started, and only the report and the pipeline's MLflow run are written again."""
    import ray

    from raysys import pipeline

    out = first_run["out"]
    before = {s: pipeline.stage_file(out / s).read_text() for s in ("zoo", "zoo_aligned", "hyperrep", "populations")}
    config = pipeline.load_config(ROOT / "configs" / "pipeline" / "tiny.yaml",
                                  [f"name={first_run['name']}-rerun", f"tracking_uri={services['mlflow']}"])
    was_running = ray.is_initialized()
    report = pipeline.run_pipeline(config, out, progress=False)
    log = capsys.readouterr().out
    for stage in before:
        assert f"{stage}: up to date" in log
        assert pipeline.stage_file(out / stage).read_text() == before[stage]  # untouched, not redone
    assert ray.is_initialized() == was_running
    assert report["hashes"]["zoo"] in before["zoo"]
    assert json.loads((out / "report.json").read_text())["name"] == f"{first_run['name']}-rerun"


@pytest.mark.browser
def test_mlflow_ui_shows_the_pipeline_run(services, first_run, tmp_path):
    chromium = next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)
    if chromium is None:
        pytest.skip("no headless browser: install Debian's chromium (apt-get install -y chromium) to render the MLflow UI")
    base = services["mlflow"]
    exp_id = rest(base, "experiments/get-by-name", query={"experiment_name": "raysys-pipeline"})["experiment"]["experiment_id"]
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=15000", "--dump-dom", f"{base}/#/experiments/{exp_id}/runs"]
    page = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    assert page.returncode == 0, page.stderr[-2000:]
    # the runs table is rendered by the UI's JavaScript from the server's ajax API
    assert "raysys-pipeline" in page.stdout
    assert f">{first_run['name']}<" in page.stdout, page.stdout[-3000:]
