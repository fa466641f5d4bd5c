"""``raysys mlflow serve``: the MLflow tracking server (UI + REST API) for raysys runs.

A thin wrapper around ``mlflow server``: database paths are made absolute (the same database
whatever directory a process runs in), MLflow's file store is refused with the fix (MLflow 3
refuses it too), and it binds to 127.0.0.1 unless told otherwise, because the server has no
authentication: on a cluster, keep its port private and reach the UI through an SSH port-forward.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from raysys.config import ConfigError
from raysys.tracking import mask_uri

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
SQL_SCHEMES = ("postgresql", "postgresql+psycopg2", "mysql", "mysql+pymysql", "mssql")


def check_backend_store_uri(uri: str) -> str:
    """An absolute sqlite URI (relative paths resolved against this directory) or a SQL database URI.

    Anything else (MLflow's file store, a bare path) is a ConfigError that says what to write instead.
    """
    scheme = uri.split(":", 1)[0] if "://" in uri else ""
    if scheme == "sqlite":
        from raysys.tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(uri)  # sqlite:///rel.db -> sqlite:////cwd/rel.db
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return uri
    if scheme in SQL_SCHEMES:
        return uri
    raise ConfigError(
        f"backend store '{mask_uri(uri)}' is not supported: MLflow 3 refuses the file store, and raysys needs a database. "
        f"Use sqlite:////abs/path/mlflow.db on one machine or postgresql://user@host/db on a shared server.")


def default_backend_store_uri() -> str:
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def server_command(host: str = "127.0.0.1", port: int = 5000, backend_store_uri: str | None = None,
                   artifacts_destination: str | None = None, workers: int = 1) -> list[str]:
    """The ``mlflow server`` command line for these settings (validated)."""
    if not 0 < port < 65536:
        raise ConfigError(f"port {port} is out of range. Pass --port between 1 and 65535 (default 5000).")
    backend = check_backend_store_uri(backend_store_uri or default_backend_store_uri())
    if artifacts_destination is None:
        artifacts_destination = str(Path.cwd().resolve() / "mlartifacts")
    elif "://" not in artifacts_destination:
        # a relative artifact directory would move with the server's working directory
        artifacts_destination = str(Path(artifacts_destination).expanduser().resolve())
    return [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
            "--backend-store-uri", backend, "--artifacts-destination", artifacts_destination,
            "--serve-artifacts", "--workers", str(workers)]


def serve(args: argparse.Namespace) -> int:
    cmd = server_command(args.host, args.port, args.backend_store_uri, args.artifacts_destination, args.workers)
    if args.host not in LOCAL_HOSTS:
        print(f"raysys: warning: MLflow has no authentication and will accept connections on {args.host}:"
              f"{args.port}; keep that interface private (security group / firewall).", file=sys.stderr)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host  # noqa: S104 - only displayed
    print(f"raysys: MLflow UI at http://{shown}:{args.port}"
          f" (backend {mask_uri(cmd[cmd.index('--backend-store-uri') + 1])})", file=sys.stderr, flush=True)
    if args.dry_run:
        print(mask_uri(" ".join(cmd)))
        return 0
    # exec so that signals (Ctrl-C, SIGTERM from a process manager) reach mlflow directly
    os.execv(cmd[0], cmd)  # noqa: S606 - an argument list, no shell
    return 0  # unreachable
