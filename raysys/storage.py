"""Does every Ray node see the same output storage?

On a cluster each worker writes its shards to ``--out`` *as its own node resolves it*: a path that is a shared
mount on the head but a local folder on a worker would scatter a zoo over several disks. The pre-flight check
writes a sentinel with a random token under ``--out`` from the driver, then runs one task pinned to each alive
node that reads it back; any node that cannot read the token is named in the error, with the fix.

A local path and any pyarrow filesystem URI (``s3://bucket/prefix``, ``gs://...``) are checked the same way.
"""
from __future__ import annotations

import copy
import os
import secrets
import socket
from pathlib import Path

from pyarrow import fs as pafs

from raysys.config import ConfigError, RaysysError

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
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

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


# --- remote outputs: a pyarrow filesystem directory and its local working copy ------------------------------

CACHE_ENV = "RAYSYS_CACHE_DIR"  # where local working copies of remote outputs live (default ~/.cache/raysys)
OBJECT_STORES = ("S3FileSystem", "GcsFileSystem")  # an object appears only when its upload completes


def is_remote(out: str | Path) -> bool:
    """Whether ``out`` names a pyarrow filesystem URI (``s3://bucket/prefix``, ``gs://...``), not a local path."""
    text = str(out)
    return "://" in text and not text.startswith("file://")


def mirror_dir(uri: str) -> Path:
    """The local working copy of ``uri`` on this machine: ``$RAYSYS_CACHE_DIR/remote/SCHEME/BUCKET/PREFIX`` (default
    ``~/.cache/raysys``), so that the copy of ``s3://b/run/zoo`` is the ``zoo`` folder of the copy of ``s3://b/run``."""
    scheme, rest = str(uri).split("://", 1)
    parts = [p for p in rest.split("?", 1)[0].split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise RaysysError(f"{uri}: name a bucket and a prefix, e.g. s3://bucket/zoos/NAME (no '.' or '..' parts).")
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "raysys").expanduser()
    return base / "remote" / scheme / Path(*parts)


def _local_only(rel: str) -> bool:
    """Files of a working copy that are never published nor removed by a pull: locks, temporary files, sentinels,
    Ray Train's run records."""
    parts = rel.split("/")
    name = parts[-1]
    return (".ray_train" in parts or name.endswith((".tmp", ".stale")) or name.startswith(SENTINEL_PREFIX)
            or name == ".lock" or (name == "lock" and len(parts) >= 2 and parts[-2] == "__raysys__"))


def _publish_order(rel: str) -> int:
    """Data first, then completion records, then everything else; the manifest and stage records last: an object
    that says "complete" is published only after everything it vouches for."""
    name = rel.rsplit("/", 1)[-1]
    if name.endswith(".parquet"):
        return 0
    if name.startswith("shard-") and name.endswith(".json"):
        return 1
    return {"plan.json": 3, "manifest.json": 4, "stage.json": 5}.get(name, 2)


class Remote:
    """A directory on a pyarrow filesystem (``uri``) and its local working copy (``local``).

    The remote side is the truth: :meth:`pull` makes the working copy equal to it, :meth:`push` the other way round,
    each transferring only files whose size or modification time differ (after a transfer both sides carry the
    remote object's mtime). Every object is written whole: on an object store (S3, GCS) by one upload of the
    finished local file (an object appears only when its upload completes; a process killed mid-upload leaves
    nothing), elsewhere under a temporary name and moved. Locks, temporary files and Ray Train's records stay local.
    Credentials and endpoints come from the filesystem's standard configuration (for S3: ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``).
    """

    def __init__(self, uri: str, local: str | Path | None = None, filesystem: pafs.FileSystem | None = None,
                 flag: str = "--out"):
        text = str(uri).rstrip("/")
        if filesystem is not None:
            fs, path = filesystem, text
        else:
            try:
                fs, path = pafs.FileSystem.from_uri(text)
            except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid / ArrowNotImplementedError / OSError
                raise ConfigError(f"{flag} {text} is not a storage URI this machine can open ({err}). Use a local or "
                                  f"NFS path, or s3://bucket/prefix with AWS credentials configured.") from None
        self.uri, self.fs, self.path, self.flag = text, fs, path.rstrip("/"), flag
        self.local = Path(local) if local is not None else mirror_dir(text)
        self.whole_objects = type(fs).__name__ in OBJECT_STORES

    def sub(self, name: str, local: str | Path | None = None) -> "Remote":
        """The remote directory ``name`` inside this one (its working copy: ``local``, else ``self.local/name``)."""
        r = Remote.__new__(Remote)
        r.uri, r.fs, r.path, r.flag = f"{self.uri}/{name}", self.fs, f"{self.path}/{name}", self.flag
        r.local = Path(local) if local is not None else self.local / name
        r.whole_objects = self.whole_objects
        return r

    def at(self, local: str | Path) -> "Remote":
        """The same remote directory with another working copy (a worker's staging folder)."""
        r = copy.copy(self)
        r.local = Path(local)
        return r

    def key(self, rel: str) -> str:
        return f"{self.path}/{rel}"

    def _unreachable(self, err: Exception) -> RaysysError:
        return RaysysError(f"cannot read {self.flag} {self.uri} ({err}). Check the bucket name and the credentials "
                           f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, an instance role), and "
                           f"AWS_ENDPOINT_URL for an S3-compatible store; or write to an NFS path such as /mnt/shared/...")

    def listing(self, sub: str = "") -> dict[str, pafs.FileInfo]:
        """{path relative to this directory: FileInfo} of every file under it (or under ``sub``)."""
        base = self.key(sub).rstrip("/") if sub else self.path
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except OSError as err:
            raise self._unreachable(err) from None
        cut = len(self.path) + 1
        return {i.path[cut:]: i for i in infos if i.type == pafs.FileType.File}

    def info(self, rel: str) -> pafs.FileInfo | None:
        try:
            i = self.fs.get_file_info(self.key(rel))
        except OSError as err:
            raise self._unreachable(err) from None
        return i if i.type == pafs.FileType.File else None

    def read_bytes(self, rel: str) -> bytes | None:
        """The object ``rel``, None when it is not there."""
        try:
            with self.fs.open_input_stream(self.key(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            if self.info(rel) is None:
                return None
            raise self._unreachable(err) from None

    @staticmethod
    def _same(path: Path, info: pafs.FileInfo) -> bool:
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        return (info.mtime is not None and st.st_size == info.size
                and abs(st.st_mtime - info.mtime.timestamp()) < 1e-3)

    def _stamp(self, path: Path, info: pafs.FileInfo | None) -> None:
        if info is not None and info.mtime is not None:
            t = info.mtime.timestamp()
            os.utime(path, (t, t))

    def download(self, rel: str, info: pafs.FileInfo | None = None) -> Path:
        """Copy object ``rel`` to the working copy (a temporary name, then a rename)."""
        path = self.local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            with self.fs.open_input_stream(self.key(rel)) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            self._stamp(tmp, info if info is not None else self.info(rel))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def upload(self, rel: str) -> None:
        """Publish the working copy's file ``rel`` as one whole object."""
        path, key = self.local / rel, self.key(rel)
        parent = key.rsplit("/", 1)[0]
        if not self.whole_objects:
            self.fs.create_dir(parent, recursive=True)
        target = key if self.whole_objects else f"{parent}/.{rel.rsplit('/', 1)[-1]}.{secrets.token_hex(6)}.tmp"
        try:
            with open(path, "rb") as src, self.fs.open_output_stream(target) as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            if target != key:
                self.fs.move(target, key)
        except BaseException:
            # an exception (not a kill) inside the stream's close may still complete the upload: take it away again
            try:
                self.fs.delete_file(target)
            except OSError:
                pass
            raise
        self._stamp(path, self.info(rel))

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.key(rel))
        except FileNotFoundError:
            pass

    def _local_files(self, sub: str = "") -> dict[str, Path]:
        root = self.local / sub if sub else self.local
        if not root.is_dir():
            return {}
        return {p.relative_to(self.local).as_posix(): p for p in root.rglob("*") if p.is_file()}

    def pull(self, sub: str = "", delete: bool = True) -> dict:
        """Make the working copy (or its folder ``sub``) equal to the remote: download what differs; with ``delete``
        remove local files the remote does not have (never locks, temporary files, Ray Train's records)."""
        remote = self.listing(sub)
        self.local.mkdir(parents=True, exist_ok=True)
        got = [rel for rel, info in sorted(remote.items()) if not _local_only(rel)
               and not self._same(self.local / rel, info) and self.download(rel, info)]
        gone = []
        if delete:
            for rel, path in self._local_files(sub).items():
                if rel not in remote and not _local_only(rel):
                    path.unlink(missing_ok=True)
                    gone.append(rel)
        return {"downloaded": got, "removed": gone}

    def push(self, sub: str = "", delete: bool = True) -> dict:
        """Make the remote (or its folder ``sub``) equal to the working copy: upload what differs, data before the
        records that vouch for it (:func:`_publish_order`); with ``delete`` remove objects the copy no longer has,
        before the manifest and stage records are published."""
        remote = self.listing(sub)
        files = {rel: p for rel, p in self._local_files(sub).items() if not _local_only(rel)}
        changed = sorted((rel for rel, p in files.items() if rel not in remote or not self._same(p, remote[rel])),
                         key=lambda r: (_publish_order(r), r))
        last = [r for r in changed if _publish_order(r) >= 3]
        for rel in changed:
            if _publish_order(rel) < 3:
                self.upload(rel)
        gone = [rel for rel in sorted(remote) if delete and rel not in files and not _local_only(rel)]
        for rel in gone:
            self.delete(rel)
        for rel in last:
            self.upload(rel)
        return {"uploaded": changed, "removed": gone}
