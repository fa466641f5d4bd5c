"""Does every Ray node see the same output storage?

On a cluster each worker writes its shards to ``--out`` *as its own node resolves it*: a path that is a shared
mount on the head but a local folder on a worker would scatter a zoo over several disks. The pre-flight check
writes a sentinel with a random token under ``--out`` from the driver, then runs one task pinned to each alive
node that reads it back; any node that cannot read the token is named in the error, with the fix.

A local path and any pyarrow filesystem URI (``s3://bucket/prefix``, ``gs://...``) are checked the same way.
"""
from __future__ import annotations

import secrets
import socket
from pathlib import Path

import ray
from pyarrow import fs as pafs
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raysys.config import RaysysError

SENTINEL_PREFIX = ".raysys-sentinel-"  # a dot name: Parquet readers skip it if a crash leaves it behind


def _filesystem(out: str | Path) -> tuple[pafs.FileSystem, str]:
    text = str(out)
    if "://" not in text:
        return pafs.LocalFileSystem(), str(Path(text).resolve())
    return pafs.FileSystem.from_uri(text)


def _read_sentinel(uri: str, name: str) -> tuple[str, str | None, str | None]:
    """On one node: (hostname, the token it reads or None, why not)."""
    host = socket.gethostname()
    try:
        fs, path = _filesystem(uri)
        with fs.open_input_stream(f"{path.rstrip('/')}/{name}") as f:
            return host, f.read().decode(), None
    except Exception as exc:  # noqa: BLE001 - every failure to read is the answer, reported per node
        return host, None, f"{type(exc).__name__}: {exc}"


def check_shared_storage(out: str | Path, timeout_s: float = 120.0) -> int:
    """Raise :class:`RaysysError` unless every alive node of the connected Ray cluster reads what the driver
    wrote under ``out``. Returns the number of nodes checked; a one-node cluster is not checked (returns 1).
    ``out`` is created if missing (a local path) and left as it was, apart from that."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return len(nodes)
    fs, path = _filesystem(out)
    uri = str(out) if "://" in str(out) else path
    token = secrets.token_hex(16)
    name = f"{SENTINEL_PREFIX}{token[:12]}"
    fs.create_dir(path, recursive=True)
    sentinel = f"{path.rstrip('/')}/{name}"
    with fs.open_output_stream(sentinel) as f:
        f.write(token.encode())
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(_read_sentinel)
        refs = {n["NodeID"]: read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(uri, name) for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        problems = []
        for node in nodes:
            ref, where = refs[node["NodeID"]], f"{node.get('NodeManagerAddress')} (node {node['NodeID'][:8]})"
            if ref not in ready:
                problems.append(f"{where}: no answer within {timeout_s:.0f} s")
                continue
            host, seen, why = ray.get(ref)
            if seen != token:
                problems.append(f"{where} on {host}: " + (why or "reads another file under that name"))
    finally:
        try:
            fs.delete_file(sentinel)
        except OSError:
            pass
    if problems:
        raise RaysysError(
            f"{len(problems)} of {len(nodes)} Ray nodes do not see the output storage {out} that the driver wrote "
            f"to: " + "; ".join(problems) + ". Put --out on storage that every node mounts at the same path "
            "(NFS or the shared mount in cluster.yaml, e.g. /mnt/shared/...), or on s3://bucket/prefix with "
            "credentials on every node.")
    return len(nodes)
