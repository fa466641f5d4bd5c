"""What every job script shares: import the submitted code, connect to the cluster, report errors.

Each job runs as the driver of ``ray job submit --working-dir . -- python jobs/<stage>.py``; Ray
sets ``RAY_ADDRESS`` in the driver's environment, so ``ray.init()`` joins the cluster that runs
the job. Outside a job, pass ``--address`` (``local`` starts a private Ray on this machine).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# `python jobs/x.py` puts jobs/ on sys.path, not the working dir: make the submitted raysys win
# over any older copy installed on the cluster.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from raysys.config import RaysysError  # noqa: E402


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="stage config YAML (a path inside the working dir)")
    p.add_argument("--out", required=True,
                   help="output on the cluster's shared storage: an NFS path (/mnt/shared/...) or s3://bucket/prefix")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, set on cluster nodes by cluster.yaml; "
                        "without it, ./mlflow.db in the job's working directory: Ray's temporary copy of the uploaded files)")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, set by `ray job submit`)")
    return p


def ray_address(address: str | None) -> str:
    """The cluster to join: --address, else RAY_ADDRESS (set inside `ray job submit`); checked before any work."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise RaysysError("no Ray cluster to run on: RAY_ADDRESS is not set. Submit the job with "
                          "`ray job submit --working-dir . -- python jobs/...`, or set RAY_ADDRESS=local (or pass --address local) "
                          "to run on this machine.")
    return address


def connect(address: str) -> None:
    import ray

    from raysys.runtime import init_ray

    init_ray(address)
    print(f"raysys job: connected to Ray at {address}: {ray.cluster_resources()}", flush=True)


def local_out(out: str) -> Path:
    """Stages that write only through local paths: accept a local/NFS path (or file://), refuse remote URIs."""
    if "://" in out and not out.startswith("file://"):
        raise RaysysError(f"--out {out}: this stage writes through the local filesystem. Use a path on the shared "
                          f"storage mounted on every node (e.g. /mnt/shared/...), or run jobs/zoo.py or jobs/pipeline.py, "
                          f"which write s3:// outputs.")
    return Path(out[len("file://"):] if out.startswith("file://") else out).expanduser().resolve()


def main(run) -> None:
    """Run ``run()`` and turn a RaysysError into one clear line and exit status 2."""
    try:
        run()
    except RaysysError as err:
        print(f"raysys job: error: {err}", file=sys.stderr)
        sys.exit(2)
