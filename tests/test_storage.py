"""The multi-node storage pre-flight (issue 14, item 4) on a real two-node Ray cluster on this machine.

The second node runs in its own mount namespace with a private tmpfs over one folder: that node really does not
see what the driver writes there, as a worker whose ``--out`` is a local disk would not. Started with
``ray start`` in new process groups, stopped by killing those groups (never ``ray stop``).
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

import pytest

from tests.test_e2e_cluster import cli, free_port, start, stop

pytestmark = [pytest.mark.timeout(600), pytest.mark.cluster]

DRIVER = """
import json, sys, ray
from raysys.config import RaysysError
from raysys.storage import check_shared_storage
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = __import__("time").time() + 120
while len([n for n in ray.nodes() if n["Alive"]]) < 2 and __import__("time").time() < deadline:
    __import__("time").sleep(0.5)
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


def test_a_node_that_does_not_see_the_output_storage_is_named_before_any_work(tmp_path):
    if not _namespaces_work():
        pytest.skip("needs 'unshare -m' and tmpfs mounts (root in a VM or container with CAP_SYS_ADMIN)")
    shared, private = tmp_path / "shared", tmp_path / "private"
    shared.mkdir()
    private.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="rs-st-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    gcs = free_port()

    def ports():
        return [f"--{flag}={free_port()}" for flag in (
            "node-manager-port", "object-manager-port", "runtime-env-agent-port", "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port", "metrics-export-port")]
    head = [cli("ray"), "start", "--head", "--block", f"--port={gcs}", f"--temp-dir={ray_tmp}", "--num-cpus=1",
            "--include-dashboard=false", "--disable-usage-stats", f"--ray-client-server-port={free_port()}", *ports()]
    worker = " ".join([cli("ray"), "start", "--block", f"--address=127.0.0.1:{gcs}", "--num-cpus=1",
                       "--disable-usage-stats", *ports()])
    procs = [start(head, env, tmp_path / "head.log")]
    try:
        time.sleep(3)
        procs.append(start([shutil.which("unshare"), "-m", "sh", "-c", f"mount -t tmpfs tmpfs {private} && exec {worker}"],
                           env, tmp_path / "worker.log"))
        run = subprocess.run([sys.executable, "-c", DRIVER, f"127.0.0.1:{gcs}", str(shared), str(private)],
                             env=env, capture_output=True, text=True, timeout=300)
        line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
        assert line, run.stdout[-3000:] + run.stderr[-3000:] + (tmp_path / "worker.log").read_text()[-2000:]
        result = json.loads(line[len("RESULT "):])
    finally:
        stop(procs, [ray_tmp])
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result["nodes"] == 2
    assert result["shared"] == 2  # both nodes read the driver's sentinel on the folder they share
    msg = result["private"]
    assert msg.startswith("1 of 2 Ray nodes do not see the output storage") and str(private) in msg, msg
    assert "FileNotFoundError" in msg and "mounts at the same path" in msg and "s3://" in msg, msg
    assert not [p for p in [*shared.iterdir(), *private.iterdir()] if p.name.startswith(".raysys-sentinel-")]
