"""Multi-node output storage (issue 14, item 4) on a real two-node Ray cluster on this machine.

The second node runs in its own mount namespace with a private tmpfs over one folder: that node really does not
see what the driver writes there, as a worker whose ``--out`` is a local disk would not. Started with
``ray start`` in new process groups, stopped by killing those groups (never ``ray stop``). The same cluster writes
a zoo to ``s3://`` on a real S3-compatible server (moto's, started here): the workers publish their shards there.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.test_e2e_cluster import cli, free_port, start, stop

pytestmark = [pytest.mark.timeout(600), pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[1]
TINY_ZOO = {"name": "st", "dataset": {"name": "tetris"}, "arch": "tetris_ffn", "grid": {"lr": 1e-2},
            "seeds": {"start": 1, "count": 4}, "epochs": 1, "models_per_shard": 2,
            "mlflow": {"experiment": "storage-test"}}

DRIVER = """
import json, sys, ray
from raysys.config import RaysysError
from raysys.storage import check_shared_storage
ray.init(address=sys.argv[1], log_to_driver=False)
out = {"nodes": len([n for n in ray.nodes() if n["Alive"]])}
out["shared"] = check_shared_storage(sys.argv[2])
try:
    check_shared_storage(sys.argv[3])
    out["private"] = "passed"
except RaysysError as exc:
    out["private"] = str(exc)
print("RESULT " + json.dumps(out))
"""


def _namespaces_work() -> bool:
    unshare = shutil.which("unshare")
    if not unshare:
        return False
    probe = subprocess.run([unshare, "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt && umount /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3-compatible server (moto's) on a free port, a bucket, and the standard AWS variables that point
    every client at it (pyarrow reads AWS_ENDPOINT_URL)."""
    moto_server = pytest.importorskip("moto.server")
    import logging

    import pyarrow.fs as pafs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "RAYSYS_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    fs = pafs.S3FileSystem(access_key="testing", secret_key="testing",  # noqa: S106 - moto's dummy credentials
                           region="us-east-1", scheme="http", endpoint_override=f"127.0.0.1:{port}",
                           allow_bucket_creation=True)
    fs.create_dir("bkt")
    try:
        yield {"env": env, "fs": fs}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    """A two-node Ray cluster (1 CPU each): the head, and a worker node with a private tmpfs over ``private``."""
    if not _namespaces_work():
        pytest.skip("needs 'unshare -m' and tmpfs mounts (root in a VM or container with CAP_SYS_ADMIN)")
    tmp = tmp_path_factory.mktemp("cluster")
    shared, private = tmp / "shared", tmp / "private"
    shared.mkdir()
    private.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="rs-st-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0", **s3["env"])
    gcs = free_port()

    def ports():
        return [f"--{flag}={free_port()}" for flag in (
            "node-manager-port", "object-manager-port", "runtime-env-agent-port", "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port", "metrics-export-port")]
    head = [cli("ray"), "start", "--head", "--block", f"--port={gcs}", f"--temp-dir={ray_tmp}", "--num-cpus=1",
            "--include-dashboard=false", "--disable-usage-stats", f"--ray-client-server-port={free_port()}", *ports()]
    worker = " ".join([cli("ray"), "start", "--block", f"--address=127.0.0.1:{gcs}", "--num-cpus=1",
                       "--disable-usage-stats", *ports()])
    procs = [start(head, env, tmp / "head.log")]
    try:
        time.sleep(3)
        procs.append(start([shutil.which("unshare"), "-m", "sh", "-c", f"mount -t tmpfs tmpfs {private} && exec {worker}"],
                           env, tmp / "worker.log"))
        wait = ("import ray, sys, time; ray.init(address=sys.argv[1], log_to_driver=False); d = time.time() + 120\n"
                "while len([n for n in ray.nodes() if n['Alive']]) < 2 and time.time() < d: time.sleep(0.5)\n"
                "print('NODES', len([n for n in ray.nodes() if n['Alive']]))")
        up = subprocess.run([sys.executable, "-c", wait, f"127.0.0.1:{gcs}"], env=env, capture_output=True, text=True,
                            timeout=200)
        assert "NODES 2" in up.stdout, up.stdout + up.stderr[-2000:] + (tmp / "worker.log").read_text()[-2000:]
        config = tmp / "zoo.yaml"
        config.write_text(json.dumps(TINY_ZOO))
        yield {"address": f"127.0.0.1:{gcs}", "env": env, "shared": shared, "private": private, "tmp": tmp,
               "config": config, "mlflow": f"sqlite:///{tmp / 'mlflow.db'}"}
    finally:
        stop(procs, [ray_tmp])
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("raysys: error:")]


def test_a_node_that_does_not_see_the_output_storage_is_named_before_any_work(cluster):
    shared, private = cluster["shared"], cluster["private"]
    run = subprocess.run([sys.executable, "-c", DRIVER, cluster["address"], str(shared), str(private)],
                         env=cluster["env"], capture_output=True, text=True, timeout=300)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    assert result["nodes"] == 2
    assert result["shared"] == 2  # both nodes read the driver's sentinel on the folder they share
    msg = result["private"]
    assert msg.startswith("1 of 2 Ray nodes do not see the output storage") and str(private) in msg, msg
    assert "FileNotFoundError" in msg and "mounts at the same path" in msg and "s3://" in msg, msg
    assert not [p for p in [*shared.iterdir(), *private.iterdir()] if p.name.startswith(".raysys-sentinel-")]


@pytest.mark.parametrize("command", ["zoo generate", "pipeline"])
def test_the_cli_refuses_an_output_a_node_does_not_see_and_writes_no_shard(cluster, command):
    """Through the real CLI: exit 2, one 'raysys: error:' line naming the node and the fix, no shard anywhere."""
    out = cluster["private"] / command.replace(" ", "-")
    config = cluster["config"] if command == "zoo generate" else ROOT / "configs" / "pipeline" / "tiny.yaml"
    run = subprocess.run([cli("raysys"), *command.split(), str(config), "--out", str(out), "--address",
                          cluster["address"], "--tracking-uri", cluster["mlflow"], "--no-progress"],
                         env=cluster["env"], capture_output=True, text=True, timeout=400, cwd=cluster["tmp"])
    errors = _error_lines(run.stderr)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    msg = errors[0]
    assert "1 of 2 Ray nodes do not see the output storage" in msg and str(out) in msg, msg
    assert "(node " in msg and "mounts at the same path" in msg and "s3://" in msg, msg
    assert not list(cluster["private"].rglob("*.parquet"))
    assert not [p for p in cluster["private"].rglob("*") if p.name.startswith(".raysys-sentinel-")]


def test_workers_on_two_nodes_write_a_zoo_to_s3_that_reads_back_equal_to_a_local_run(cluster, s3, tmp_path):
    """``zoo generate --out s3://`` on the two nodes (one Ray Train worker each), then verify and info on the URI;
    the zoo read back from S3 equals the same config generated into a local folder in this process, shard files
    byte for byte."""
    import pyarrow.fs as pafs

    from raysys.store import open_zoo
    from raysys.zoo import generate, load_config

    uri = "s3://bkt/zoos/st"
    run = subprocess.run([cli("raysys"), "zoo", "generate", str(cluster["config"]), "--out", uri, "--address",
                          cluster["address"], "--workers", "2", "--tracking-uri", cluster["mlflow"], "--no-progress"],
                         env=cluster["env"], capture_output=True, text=True, timeout=400, cwd=cluster["tmp"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"zoo written to {uri}" in run.stdout
    keys = {i.path: i.size for i in s3["fs"].get_file_info(pafs.FileSelector("bkt/zoos/st", recursive=True))
            if i.type == pafs.FileType.File}
    assert {"bkt/zoos/st/shards/shard-00000.parquet", "bkt/zoos/st/shards/shard-00001.parquet",
            "bkt/zoos/st/__raysys__/shard-00000.json", "bkt/zoos/st/__raysys__/manifest.json"} <= set(keys)
    assert not [k for k in keys if k.endswith((".tmp", "/lock")) or ".raysys-sentinel-" in k or ".ray_train" in k]
    for args in (["verify", uri], ["info", uri, "--json"]):
        res = subprocess.run([cli("raysys"), "zoo", *args], env=cluster["env"], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["dir"] == uri and json.loads(res.stdout)["status"] == "complete"

    local = tmp_path / "local"
    config = load_config(cluster["config"], [f"mlflow.tracking_uri={cluster['mlflow']}"])
    generate(config, local, progress=False)
    env = {k: os.environ.get(k) for k in s3["env"]}
    os.environ.update(s3["env"])
    try:
        remote = open_zoo(uri)
        assert remote.table().equals(open_zoo(local).table())
        for sid in (0, 1):
            name = f"shards/shard-{sid:05d}.parquet"
            with s3["fs"].open_input_stream(f"bkt/zoos/st/{name}") as f:
                assert f.read() == (local / name).read_bytes()
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# The pipeline's driver, SIGKILLed by itself as the autoencoder stage starts: after the zoo (and its aligned copy)
# completed, before anything else; no final push can run.
KILLED_AT_AUTOENCODER = """
import os, signal, sys
import raysys.pipeline as pipeline
from raysys import cli
pipeline.train_autoencoder = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_pipeline_killed_after_its_zoo_stage_has_published_it_and_a_rerun_skips_it(s3, tmp_path):
    """``raysys pipeline --out s3://…`` publishes each stage when it completes: a driver SIGKILLed as the
    autoencoder stage starts leaves the zoo and its aligned copy complete in the bucket (their stage records
    included); the rerun, from a fresh working copy, skips both and finishes."""
    import pyarrow.fs as pafs

    uri, env = "s3://bkt/runs/killed", {**os.environ, **s3["env"]}
    args = ["pipeline", str(ROOT / "configs" / "pipeline" / "tiny.yaml"), "--out", uri,
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-progress", "--set", "evaluate=false"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_AUTOENCODER, *args], env=env, capture_output=True,
                            text=True, timeout=400, cwd=tmp_path)
    assert killed.returncode == -9, killed.stdout[-3000:] + killed.stderr[-3000:]

    def objects(prefix):
        return {i.path[len(prefix) + 1:] for i in s3["fs"].get_file_info(pafs.FileSelector(prefix, recursive=True))
                if i.type == pafs.FileType.File}
    published = objects("bkt/runs/killed")
    for stage in ("zoo", "zoo_aligned"):
        assert {f"{stage}/__raysys__/stage.json", f"{stage}/__raysys__/manifest.json",
                f"{stage}/shards/shard-00000.parquet"} <= published, sorted(published)
        with s3["fs"].open_input_stream(f"bkt/runs/killed/{stage}/__raysys__/manifest.json") as f:
            assert json.loads(f.read())["status"] == "complete"
    assert not [k for k in published if k.startswith(("hyperrep/", "populations/"))]
    assert not [k for k in published if k.endswith((".tmp", ".lock")) or ".raysys-sentinel-" in k]

    # the rerun's working copy is a new scratch folder: it starts from what the bucket holds
    rerun = subprocess.run([cli("raysys"), *args], env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "zoo: up to date" in rerun.stdout and "zoo_aligned: up to date" in rerun.stdout, rerun.stdout
    assert "hyperrep: running" in rerun.stdout and "populations: running" in rerun.stdout
    assert {"report.md", "populations/stage.json", "hyperrep/stage.json"} <= objects("bkt/runs/killed")
