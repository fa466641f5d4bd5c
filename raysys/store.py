"""The zoo store: a plain Parquet dataset with one row per (model, epoch), plus its metadata in ``__raysys__/``.

Layout of a zoo directory::

    shards/shard-00007.parquet       all epochs of the models of one shard (the data: nothing else is Parquet)
    __raysys__/manifest.json         architecture layout, dataset record, config, version, shard plan
    __raysys__/shard-00007.json      completion record of shard 7: rows, model ids, sha256 of its Parquet file
    __raysys__/summary.png           accuracy over epochs (aligned copies: also template.safetensors)
    __raysys__/plan.json             the manifest as first written, without status and checksums (its repair copy)
    __raysys__/lock                  while a writer (zoo generate, zoo align) works here: its pid, host, token
    __raysys__/quarantine/           files a writer found there that were not the zoo's (unplanned, or not
                                     matching their record), renamed ``NAME.quarantined-STAMP`` (no ``.parquet``
                                     suffix, so that no ``**/*.parquet`` glob reads them)

The directory itself is the dataset: ``pd.read_parquet(ZOO)``, ``pyarrow.dataset.dataset(ZOO)``,
``ray.data.read_parquet(ZOO)``, DuckDB's ``read_parquet('ZOO/**/*.parquet')`` and
``datasets.load_dataset("parquet", data_dir=ZOO)`` read every row. Everything else lives in
``__raysys__/``, a name every one of those readers skips (Arrow skips names starting with ``_`` or
``.``; Hugging Face ``datasets`` skips ``.`` names and ``__`` folders, not ``_`` files); temporary files
start with ``.``. Weights are a plain ``fixed_size_list<float32>[P]`` column, which every Parquet
reader understands; each file's schema metadata carries the layout (key ``raysys.layout``: the
architecture layout, ``num_params`` and the raysys version), so a single shard describes itself.

A shard is complete when its record exists and matches its Parquet file; both are written to a
temporary name and renamed, so a crash never leaves a half-written shard that looks complete.
Every data page carries a CRC32 checksum (Parquet's page checksums), verified on every read, so bit
rot inside a shard is an error, not silently changed weights.

Readers read exactly the shards of the manifest's plan (a stray or left-over shard file is not data),
and refuse a zoo whose manifest says it is still being written, unless asked for partial data. A writer
moves such strays to ``__raysys__/quarantine/`` (:func:`quarantine_strays`) before it writes.

One writer per directory: :class:`WriterLock` (``__raysys__/lock``, created with ``O_CREAT | O_EXCL``)
names its owner (pid, host, start time, a random token); the owner refreshes its mtime every
``LOCK_HEARTBEAT_S``. A second writer is refused with the owner's name, unless the lock is stale: its
pid is dead (same host), or its mtime is older than ``LOCK_STALE_S`` (another host). Temporary files
carry their owner (``.NAME.<host>-<pid>-<random>.tmp``), so start-up cleanup removes only those of
dead owners (:func:`clean_temp_files`).

Zoos of the first layout (``manifest.json`` at the top, records ``shards/shard-00007.json`` beside
their Parquet files, weights as an Arrow ``fixed_shape_tensor``) are still read as they are;
``raysys zoo migrate ZOO`` (:func:`migrate_zoo`) converts one in place, and a writer (a resumed
``zoo generate`` or ``zoo align``) converts it before writing into it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysys import __version__
from raysys.architectures import Layout
from raysys.config import RaysysError
from raysys.train import METRICS

if TYPE_CHECKING:
    import pandas
    import torch

    from raysys import datasets

META = "__raysys__"  # every file of a zoo that is not data: skipped by Arrow, pandas, Ray Data and HF datasets
MANIFEST = f"{META}/manifest.json"  # relative to the zoo directory
SHARDS = "shards"
LAYOUT_KEY = "raysys.layout"  # Parquet schema metadata: {"layout", "num_params", "raysys_version"}
# The first layout (raysys 0.1.0 before the zoo folder became a plain Parquet dataset): read, and migrated.
LEGACY_MANIFEST = "manifest.json"
PLAN = f"{META}/plan.json"  # the manifest without status and checksums: what 'zoo verify --repair' rebuilds from
SUMMARY_PLOT = "summary.png"  # in META: accuracy over epochs (raysys zoo generate)
LEGACY_META_FILES = (SUMMARY_PLOT, "template.safetensors", "stage.json")  # at the top of an old zoo
HYPERPARAMETERS = {
    "seed": pa.int64(), "init": pa.string(), "activation": pa.string(), "optimizer": pa.string(),
    "lr": pa.float64(), "weight_decay": pa.float64(), "dropout": pa.float64(), "batch_size": pa.int64(),
}


class StoreError(RaysysError):
    pass


def weights_type(num_params: int) -> pa.DataType:
    return pa.list_(pa.float32(), num_params)


def schema(num_params: int) -> pa.Schema:
    fields = [
        pa.field("model_id", pa.int64()),
        pa.field("epoch", pa.int32()),
        pa.field("split", pa.string()),
        pa.field("weights", weights_type(num_params)),
        *[pa.field(m, pa.float64()) for m in METRICS],
        *[pa.field(k, t) for k, t in HYPERPARAMETERS.items()],
        pa.field("diverged", pa.bool_()),
    ]
    return pa.schema(fields)


def _host_tag() -> str:
    """This host, as it appears in temporary file names: 8 hex digits of its name's sha1."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]  # noqa: S324 - a name, not security


def temp_path(path: Path) -> Path:
    """A temporary name beside ``path`` that names its owner: ``.NAME.<host>-<pid>-<random>.tmp``."""
    return path.with_name(f".{path.name}.{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_owner(path: Path) -> tuple[str, int] | None:
    """(host tag, pid) of a temporary file named by :func:`temp_path`; None for another name."""
    parts = path.name[:-len(".tmp")].rsplit(".", 1)
    fields = parts[-1].split("-") if len(parts) == 2 else []
    if len(fields) == 3 and len(fields[0]) == 8 and fields[1].isdigit():
        return fields[0], int(fields[1])
    return None


def clean_temp_files(root: str | Path, dirs: Iterable[str] = (SHARDS, META), stale_s: float | None = None,
                     mine: bool = False) -> list[Path]:
    """Remove the temporary files (``.*.tmp``) in ``root``'s ``dirs`` whose owner is dead; returns them.

    Owner on this host: its pid is gone. Owner on another host (a Ray Train worker on another node):
    the file is older than ``stale_s`` (default :data:`LOCK_STALE_S`). A name without an owner was
    written by a raysys from before owners were named, which no live writer of this version is.
    ``mine``: also this process's own (a caller that is the only writer in this process, between writes).
    """
    stale_s = LOCK_STALE_S if stale_s is None else stale_s
    removed, host = [], _host_tag()
    for d in dirs:
        for p in sorted((Path(root) / d).glob(".*.tmp")):
            owner = _temp_owner(p)
            try:
                if owner is not None:
                    if owner[0] == host and pid_alive(owner[1]) and not (mine and owner[1] == os.getpid()):
                        continue
                    if owner[0] != host and time.time() - p.stat().st_mtime < stale_s:
                        continue
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def jsonable(obj):
    """Nested containers of numpy/Python values -> plain JSON types; NaN and inf become null."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=False).encode())


# --- one writer per directory ------------------------------------------------------------------

LOCK = f"{META}/lock"
LOCK_HEARTBEAT_S = 30.0  # the owner touches its lock this often
LOCK_STALE_S = 300.0  # a lock (or temp file) of another host untouched this long belongs to a dead writer


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, /proc/PID/stat field 22): a pid reused
    by another process has another one. None where /proc is not there."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class WriterLock:
    """``path`` (default ``root/__raysys__/lock``) held by one writer: a JSON file created with
    ``O_CREAT | O_EXCL`` holding pid, host, start time and a random token; its mtime is refreshed every
    ``heartbeat_s`` by a daemon thread. A use as a context manager acquires and releases it.

    A lock is stale (taken over, with a printed note) when its owner is on this host and its pid is gone
    (or now names another process), or on another host and the lock is older than ``stale_s``.
    Otherwise :meth:`acquire` raises a :class:`StoreError` naming the owner and what to do.
    """

    def __init__(self, root: str | Path, command: str, path: str | Path | None = None,
                 heartbeat_s: float = LOCK_HEARTBEAT_S, stale_s: float = LOCK_STALE_S):
        self.root = Path(root)
        self.path = Path(path) if path is not None else self.root / LOCK
        self.command, self.heartbeat_s, self.stale_s = command, heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created: list[Path] = []  # directories this lock created, removed again if left empty

    def _info(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "proc_start": _proc_start(pid), "command": self.command,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": self.token}

    def _stale(self, owner: dict | None, mtime: float) -> str | None:
        """Why the lock held by ``owner`` is stale, or None when its owner may be alive."""
        if owner is None:  # unreadable: a writer died between creating and filling it, or it was damaged
            return "unreadable" if time.time() - mtime > 5 else None
        pid = owner.get("pid")
        if owner.get("host") == socket.gethostname() and isinstance(pid, int):
            if not pid_alive(pid):
                return f"its process {pid} is no longer running"
            start = owner.get("proc_start")
            if start is not None and _proc_start(pid) not in (None, start):
                return f"its pid {pid} now belongs to another process"
            return None
        age = time.time() - mtime
        if age > self.stale_s:
            return f"not refreshed for {age:.0f} s (more than {self.stale_s:.0f} s)"
        return None

    def _read(self) -> tuple[dict | None, float] | None:
        try:
            raw, mtime = self.path.read_bytes(), self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            owner = json.loads(raw)
        except ValueError:
            owner = None
        return (owner if isinstance(owner, dict) else None), mtime

    def acquire(self) -> "WriterLock":
        for d in reversed([self.path.parent, *self.path.parent.parents]):
            if not d.exists():
                d.mkdir()
                self._created.append(d)
        data = json.dumps(self._info(), indent=2).encode()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                found = self._read()
                if found is None:
                    continue  # released meanwhile
                owner, mtime = found
                why = self._stale(owner, mtime)
                if why is None:
                    self._release_dirs()
                    o = owner or {}
                    raise StoreError(
                        f"{self.root} is being written by another process: {o.get('command', 'a raysys writer')} "
                        f"(pid {o.get('pid')}@{o.get('host')}, since {o.get('since')}; lock {self.path}). Wait for it "
                        f"to finish, or stop it and rerun; if that process is gone and its host cannot say so, "
                        f"delete {self.path} (a lock of another host is taken over after {self.stale_s:.0f} s "
                        f"without its heartbeat).") from None
                self._take_over(owner, why)
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._beat, daemon=True, name="raysys-lock-heartbeat")
            self._thread.start()
            return self
        raise StoreError(f"could not take the lock {self.path}: other writers keep taking it. Rerun.")

    def _take_over(self, owner: dict | None, why: str) -> None:
        """Move the stale lock away, unless another process took it over first (then its new lock stays)."""
        aside = self.path.with_name(f".{self.path.name}.{self.token}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = self._read_file(aside)
        if owner is not None and (moved or {}).get("token") != owner.get("token"):
            try:  # we moved a fresh lock of another process: put it back
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        o = owner or {}
        print(f"raysys: note: took over the stale lock {self.path} of pid {o.get('pid')}@{o.get('host')} "
              f"(since {o.get('since')}): {why}", flush=True)

    @staticmethod
    def _read_file(path: Path) -> dict | None:
        try:
            d = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        return d if isinstance(d, dict) else None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if (self._read_file(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self._release_dirs()

    def _release_dirs(self) -> None:
        for d in reversed(self._created):
            try:
                d.rmdir()  # only when empty: nothing was written after all
            except OSError:
                break
        self._created = []

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --- quarantine ----------------------------------------------------------------------------------

QUARANTINE = f"{META}/quarantine"


def only_writer_files(root: str | Path) -> bool:
    """Whether directory ``root`` holds nothing but what a writer leaves before its manifest: Ray Train's
    ``.ray_train``, and a ``__raysys__/`` of the lock, temporary files and the quarantine."""
    root = Path(root)
    for p in root.iterdir() if root.is_dir() else ():
        if p.name == ".ray_train":
            continue
        if p.name == META and p.is_dir() and all(q.name in ("lock", "quarantine") or q.name.startswith(".")
                                                 for q in p.iterdir()):
            continue
        return False
    return True


def quarantine(root: str | Path, path: Path, why: str) -> Path:
    """Move ``path`` to ``root/__raysys__/quarantine/NAME.quarantined-STAMP`` and print a line naming it."""
    qdir = Path(root) / QUARANTINE
    qdir.mkdir(parents=True, exist_ok=True)
    dest = qdir / f"{path.name}.quarantined-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    os.replace(path, dest)
    print(f"raysys: quarantined {path} -> {dest.relative_to(Path(root))}: {why}", flush=True)
    return dest


def quarantined_files(root: str | Path) -> list[Path]:
    qdir = Path(root) / QUARANTINE
    return sorted(p for p in qdir.iterdir() if p.is_file()) if qdir.is_dir() else []


def quarantine_strays(root: str | Path, planned: Iterable[int], bad: dict[int, str] | Iterable[int] = ()) -> list[Path]:
    """Move every file of zoo ``root`` that is not the zoo's to the quarantine; returns where they went.

    Strays: a Parquet file anywhere in the folder (outside ``__raysys__/`` and hidden folders) or a completion
    record that is not in the plan ``planned``;
    a planned shard whose record does not match its file (size or sha256), and the shards ``bad`` (rows
    that verify flags): both the file and its record. A planned file without a record (a run died
    between the two renames) is left: it is not data, and the writer overwrites it. ``bad`` may map each
    shard to why it is bad.
    """
    root, planned = Path(root), {int(s) for s in planned}
    moved = []
    keep = {shard_file(root, sid) for sid in planned}
    for path in sorted(root.rglob("*.parquet")):  # anywhere a reader of the folder would find it
        hidden = any(part.startswith((".", "__")) for part in path.relative_to(root).parts[:-1])
        if not hidden and path not in keep and not path.name.startswith("."):
            moved.append(quarantine(root, path, "not in the manifest's shard plan"))
    for path in sorted([*(root / META).glob("shard-*.json"), *(root / SHARDS).glob("shard-*.json")]):
        if _shard_number(path) not in planned:
            moved.append(quarantine(root, path, "the record of a shard not in the manifest's shard plan"))
    bad = {int(k): v for k, v in bad.items()} if isinstance(bad, dict) else {int(s): "" for s in bad}
    for sid in sorted(planned):
        path = shard_file(root, sid)
        rec_path, rec = shard_record(root, sid)
        if rec_path is None:
            continue
        if rec is None:
            why = "is not a valid completion record"
        elif not path.exists():
            moved.append(quarantine(root, rec_path, f"the record of {path.name}, which is absent"))
            continue
        elif rec.get("bytes") is not None and path.stat().st_size != rec.get("bytes"):
            why = f"{path.stat().st_size} bytes, its record says {rec.get('bytes')}"
        elif rec.get("sha256") != sha256_file(path):
            why = "its sha256 does not match its record"
        elif sid in bad:
            why = bad[sid] or "its rows are not the shard's planned rows ('raysys zoo verify' lists them)"
        else:
            continue
        if path.exists():
            moved.append(quarantine(root, path, why))
        moved.append(quarantine(root, rec_path, f"the record of the quarantined {path.name}"))
    return moved


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_file(root: str | Path, shard: int) -> Path:
    return Path(root) / SHARDS / f"shard-{int(shard):05d}.parquet"


def record_file(root: str | Path, shard: int) -> Path:
    """Where shard ``shard``'s completion record is written."""
    return Path(root) / META / f"shard-{int(shard):05d}.json"


def legacy_record_file(root: str | Path, shard: int) -> Path:
    return Path(root) / SHARDS / f"shard-{int(shard):05d}.json"


def meta_file(root: str | Path, name: str) -> Path:
    """``root/__raysys__/name``; for reading an old zoo, ``root/name`` when only that exists."""
    path, legacy = Path(root) / META / name, Path(root) / name
    return legacy if not path.exists() and name in LEGACY_META_FILES and legacy.exists() else path


def manifest_path(root: str | Path) -> Path:
    """The manifest of the zoo in ``root``: ``__raysys__/manifest.json``, or an old zoo's ``manifest.json``."""
    path, legacy = Path(root) / MANIFEST, Path(root) / LEGACY_MANIFEST
    return legacy if not path.exists() and legacy.exists() else path


def is_legacy(root: str | Path) -> bool:
    """Whether ``root`` holds any file of the first layout (what :func:`migrate_zoo` converts)."""
    root = Path(root)
    return ((root / LEGACY_MANIFEST).is_file() or any((root / n).is_file() for n in LEGACY_META_FILES)
            or any((root / SHARDS).glob("shard-*.json")))


def recorded_shards(root: str | Path) -> list[int]:
    """Numbers of the shards that have a completion record, in either layout."""
    root = Path(root)
    found = {_shard_number(p) for p in (root / META).glob("shard-*.json")}
    found |= {_shard_number(p) for p in (root / SHARDS).glob("shard-*.json")}
    return sorted(found - {-1})


def shard_record(root: str | Path, shard: int) -> tuple[Path | None, dict | None]:
    """(path, record) of the record that fits shard ``shard``'s Parquet file (its size), else the first one
    found (record None: not valid JSON), else (None, None). The new record comes first; an old zoo's, or one
    that a migration stopped half-way through, is read in its place."""
    path = shard_file(root, shard)
    size = path.stat().st_size if path.exists() else None
    first: tuple[Path | None, dict | None] = (None, None)
    for rec_path in (record_file(root, shard), legacy_record_file(root, shard)):
        if not rec_path.exists():
            continue
        try:
            rec = json.loads(rec_path.read_text())
            rec = rec if isinstance(rec, dict) else None
        except ValueError:
            rec = None
        if rec is not None and size is not None and rec.get("bytes") in (None, size):
            return rec_path, rec
        if first[0] is None:
            first = (rec_path, rec)
    return first


def planned_shards(manifest: dict, root: Path) -> list[dict]:
    """The shard plan; a hand-written manifest without one is planned as whatever records exist."""
    if isinstance(manifest.get("shards"), list):
        return manifest["shards"]
    plan = []
    for sid in recorded_shards(root):
        _, rec = shard_record(root, sid)
        try:
            plan.append({"shard": int((rec or {})["shard"]), "model_ids": (rec or {})["model_ids"]})
        except (KeyError, TypeError, ValueError):
            plan.append({"shard": sid, "model_ids": None})
    return plan


def splits_for(num_models: int, seed: int = 0) -> list[str]:
    perm = np.random.default_rng(seed).permutation(num_models)
    n_train, n_val = int(round(0.70 * num_models)), int(round(0.15 * num_models))
    out = [""] * num_models
    for rank, mid in enumerate(perm):
        out[mid] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return out


def rows_table(num_params: int, model_ids, epoch: int, splits, weights: np.ndarray,
               metrics: dict[str, np.ndarray], hparams: list[dict]) -> pa.Table:
    """Build the rows of one epoch of a population (weights: [N, P] float32)."""
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    n = len(model_ids)
    finite = np.isfinite(weights).all(axis=1) & np.all([np.isfinite(metrics[m]) for m in ("train_loss",)], axis=0)
    cols = {
        "model_id": pa.array(np.asarray(model_ids, dtype=np.int64)),
        "epoch": pa.array(np.full(n, epoch, dtype=np.int32)),
        "split": pa.array(list(splits), pa.string()),
        "weights": weights_column(weights),
        **{m: pa.array(np.asarray(metrics[m], dtype=np.float64)) for m in METRICS},
        **{k: pa.array([h[k] for h in hparams], t) for k, t in HYPERPARAMETERS.items()},
        "diverged": pa.array(~finite),
    }
    return pa.table(cols, schema=schema(num_params))


class ZooWriter:
    """Writes a zoo directory: the manifest first, then shards as they complete.

    ``remote`` (a :class:`raysys.storage.Remote`, or its URI): ``root`` is the working copy of a zoo on a pyarrow
    filesystem (``s3://...``); each shard is published as soon as it is written, its Parquet object before its
    completion record, and "complete" means complete there."""

    def __init__(self, root: str | Path, remote=None):
        from raysys.storage import Remote

        self.root = Path(root)
        self.remote = Remote(remote, local=root) if isinstance(remote, str) else remote
        self._layout: dict | None = None

    def write_manifest(self, manifest: dict) -> None:
        if is_legacy(self.root):  # never mix the two layouts in one directory
            migrate_zoo(self.root)
        (self.root / META).mkdir(parents=True, exist_ok=True)
        (self.root / SHARDS).mkdir(exist_ok=True)
        manifest = {"raysys_version": __version__, **manifest}
        plan = plan_of(manifest)
        try:
            same = json.loads((self.root / PLAN).read_text()) == plan
        except (OSError, ValueError):
            same = False
        if not same:  # first: a manifest is never without its repair copy
            atomic_write_json(self.root / PLAN, plan)
        atomic_write_json(self.root / MANIFEST, manifest)
        self._layout = manifest.get("layout")

    def shard_path(self, shard: int) -> Path:
        return shard_file(self.root, shard)

    def record_path(self, shard: int) -> Path:
        return record_file(self.root, shard)

    def _file_metadata(self, num_params: int) -> dict:
        if self._layout is None:  # a worker's writer: the driver wrote the manifest
            try:
                raw = self.remote.read_bytes(MANIFEST) if self.remote is not None else (self.root / MANIFEST).read_bytes()
                self._layout = json.loads(raw or b"null").get("layout")
            except (OSError, ValueError, TypeError, AttributeError):
                self._layout = None
        return layout_metadata(self._layout, num_params)

    def write_shard(self, shard: int, table: pa.Table, model_ids: Iterable[int]) -> dict:
        """Shard ``shard`` written whole from ``table`` (align, migrate); ``zoo generate`` streams it instead
        (:meth:`stream_shard`)."""
        with self.stream_shard(shard, model_ids) as stream:
            stream.append(table)
            return stream.close()

    def stream_shard(self, shard: int, model_ids: Iterable[int]) -> ShardStream:
        """Shard ``shard`` written as it is produced: :meth:`ShardStream.append` one epoch's rows at a time (one
        Parquet row group each, so memory holds one epoch of the shard, not all of them), then
        :meth:`ShardStream.close` renames the finished file into place, writes its record and publishes both.
        Used as a context manager, a stream left without ``close`` (an exception) leaves no file behind."""
        return ShardStream(self, shard, model_ids)

    def _publish(self, shard: int, tmp: Path, record: dict) -> dict:
        os.replace(tmp, self.shard_path(shard))  # the file first: a record always describes a complete file
        self.record_path(shard).parent.mkdir(exist_ok=True)
        atomic_write_json(self.record_path(shard), record)
        if self.remote is not None:  # the data, then the record that says it is complete
            for path in (self.shard_path(shard), self.record_path(shard)):
                self.remote.upload(path.relative_to(self.root).as_posix())
        return record

    def is_complete(self, shard: int) -> bool:
        if self.remote is not None:  # published: a record, and the object's size is the recorded one
            raw = self.remote.read_bytes(self.record_path(shard).relative_to(self.root).as_posix())
            try:
                rec = json.loads(raw) if raw is not None else None
            except ValueError:
                rec = None
            info = self.remote.info(self.shard_path(shard).relative_to(self.root).as_posix()) \
                if isinstance(rec, dict) else None
            return info is not None and isinstance(rec, dict) and rec.get("bytes") == info.size
        path = self.shard_path(shard)
        _, rec = shard_record(self.root, shard)
        if not path.exists() or rec is None:
            return False
        return rec.get("sha256") == sha256_file(path)


class ShardStream:
    """One shard's Parquet file being written, a row group per :meth:`append`, under a temporary name that names
    its owner (so a crash leaves only a temp file that the next run's cleanup removes); see
    :meth:`ZooWriter.stream_shard`."""

    def __init__(self, writer: ZooWriter, shard: int, model_ids: Iterable[int]):
        self.writer, self.shard, self.model_ids = writer, int(shard), [int(m) for m in model_ids]
        path = writer.shard_path(self.shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(path)
        self.rows = 0
        self.record: dict | None = None
        self._file: pq.ParquetWriter | None = None

    def append(self, table: pa.Table) -> None:
        """Write ``table`` (rows of the store's schema) as the file's next row group."""
        if self.record is not None:
            raise RuntimeError(f"shard {self.shard} is closed")
        table = _plain_weights(table)
        if self._file is None:  # the schema, with the layout metadata, comes from the first rows
            meta = {k.encode(): v.encode() for k, v in self.writer._file_metadata(_num_params(table)).items()}
            self._schema = table.schema.with_metadata({**(table.schema.metadata or {}), **meta})
            self._file = pq.ParquetWriter(self.tmp, self._schema, compression="zstd", write_page_checksum=True)
        self._file.write_table(table.replace_schema_metadata(self._schema.metadata))
        self.rows += table.num_rows

    def close(self) -> dict:
        """Finish the file (fsync), rename it into place, write and publish its record; returns the record."""
        if self.record is not None:
            return self.record
        if self._file is None:
            raise RuntimeError(f"shard {self.shard}: no rows were written")
        self._file.close()
        self.record = self.writer._publish(self.shard, self.tmp, _staged_record(self.tmp, self.shard, self.rows,
                                                                                  self.writer.shard_path(self.shard),
                                                                                  self.model_ids))
        return self.record

    def abort(self) -> None:
        if self._file is not None and self.record is None:
            try:
                self._file.close()
            except (OSError, pa.ArrowException):
                pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardStream:
        return self

    def __exit__(self, *exc) -> None:
        if self.record is None:
            self.abort()


def plan_of(manifest: dict) -> dict:
    """What ``__raysys__/plan.json`` keeps of a manifest: all of it but its status (``"planned"``, in its place,
    so that a rebuilt manifest has the original's bytes) and the shards' checksums."""
    out = {k: ("planned" if k == "status" else v) for k, v in manifest.items()}
    if isinstance(out.get("shards"), list):
        out["shards"] = [{k: v for k, v in s.items() if k not in ("sha256", "rows")} if isinstance(s, dict) else s
                         for s in out["shards"]]
    return out


def layout_metadata(layout: dict | None, num_params: int) -> dict:
    """The Parquet schema metadata of a shard: ``raysys.layout`` -> JSON of layout, num_params, version."""
    return {LAYOUT_KEY: json.dumps({"layout": layout, "num_params": int(num_params), "raysys_version": __version__},
                                   sort_keys=True)}


def _num_params(table: pa.Table) -> int:
    t = table.schema.field("weights").type
    t = getattr(t, "storage_type", t)
    return int(t.list_size)


def _stage_shard_file(root: Path, shard: int, table: pa.Table, model_ids: Iterable[int],
                      metadata: dict) -> tuple[Path, dict]:
    """Shard ``shard``'s Parquet file written and fsynced under a temporary name, and the record of its bytes."""
    path = shard_file(root, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = _plain_weights(table)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           **{k.encode(): v.encode() for k, v in metadata.items()}})
    tmp = temp_path(path)
    pq.write_table(table, tmp, compression="zstd", write_page_checksum=True)
    return tmp, _staged_record(tmp, shard, table.num_rows, path, model_ids)


def _staged_record(tmp: Path, shard: int, rows: int, path: Path, model_ids: Iterable[int]) -> dict:
    """A finished temporary shard file fsynced, and the completion record of its bytes."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    from raysys.provenance import STORE_FORMAT, code_fingerprint

    return {"shard": int(shard), "file": path.name, "rows": int(rows), "bytes": tmp.stat().st_size,
            "model_ids": sorted(int(m) for m in model_ids), "sha256": sha256_file(tmp),
            "store_format": STORE_FORMAT, "code": code_fingerprint("zoo")}


@dataclass
class Zoo:
    """A read-only view of a zoo directory (``partial``: also read a zoo that is still being written)."""

    root: Path
    manifest: dict
    partial: bool = False
    uri: str | None = None  # a zoo on a pyarrow filesystem: its URI (``root`` is its local working copy)

    @property
    def where(self) -> str:
        """The zoo as its user named it: the URI of a remote zoo, else the directory."""
        return self.uri or str(self.root)

    @property
    def layout(self) -> Layout:
        return Layout.from_dict(self.manifest["layout"])

    @property
    def num_params(self) -> int:
        return self.layout.num_params

    def shard_files(self) -> list[Path]:
        """Parquet files of complete shards: a record exists and the file has the recorded size.

        (The full checksum check is :meth:`ZooWriter.is_complete`; size is the cheap guard against
        reading a file that a crashed run left truncated.)
        """
        planned = {int(s["shard"]) for s in self.manifest.get("shards", [])}
        files = []
        for sid in recorded_shards(self.root):
            if planned and sid not in planned:
                continue  # not in the plan: left over from another run or copied in, never data
            path = shard_file(self.root, sid)
            _, rec = shard_record(self.root, sid)
            if rec is None:
                continue
            expected = rec.get("bytes")
            if path.exists() and (expected is None or path.stat().st_size == expected):
                files.append(path)
        return files

    def repair_command(self) -> str:
        """How to rewrite this zoo's bad shards: the command that wrote it, rerun."""
        aligned = self.manifest.get("aligned")
        if isinstance(aligned, dict):
            return f"rerun 'raysys zoo align {aligned.get('source', 'SRC')} --out {self.where}' with the same options"
        imported = self.manifest.get("imported")
        if isinstance(imported, dict):
            return (f"rerun 'raysys zoo import-modelzoos {imported.get('source', 'SRC')} --out {self.where}' with the "
                    f"same options")
        return f"rerun 'raysys zoo generate CONFIG --out {self.where}' with the zoo's config"

    def table(self, columns: list[str] | None = None, epochs: Iterable[int] | None = None,
              splits: Iterable[str] | None = None) -> pa.Table:
        status = self.manifest.get("status", "complete")
        if status != "complete" and not self.partial:
            raise StoreError(f"zoo {self.where} is not complete (its manifest says '{status}': "
                             f"{len(self.shard_files())} of {len(self.manifest.get('shards', []))} shards written). "
                             f"Let 'raysys zoo generate' finish, or rerun the same command to resume it; "
                             f"open_zoo(..., partial=True) reads the shards written so far.")
        files = self.shard_files()
        if status == "complete":  # a complete zoo with a planned shard gone is damaged, never silently smaller
            have = {_shard_number(f) for f in files}
            lost = [int(s["shard"]) for s in self.manifest.get("shards", []) if int(s["shard"]) not in have]
            if lost:
                raise StoreError(f"zoo {self.where} is damaged: planned shard(s) {lost} have no Parquet file with a "
                                 f"matching completion record ({record_file(self.root, lost[0])} and "
                                 f"{shard_file(self.root, lost[0])}). Run 'raysys zoo verify {self.where}' to see what "
                                 f"is wrong, then {self.repair_command()} to rewrite them.")
        if not files:
            raise StoreError(f"zoo {self.where} has no complete shards. Generate it with "
                             f"'raysys zoo generate CONFIG --out {self.where}'.")
        filters: list[tuple[str, str, list]] = []
        if epochs is not None:
            filters.append(("epoch", "in", [int(e) for e in epochs]))
        if splits is not None:
            filters.append(("split", "in", list(splits)))
        # rows in (model_id, epoch) order whatever the files' order (generate writes a row group per epoch)
        keys = [] if columns is None else [k for k in ("model_id", "epoch") if k not in columns]
        read = None if columns is None else [*columns, *keys]
        table = pa.concat_tables([read_shard(f, read, filters or None) for f in files])
        table = table.sort_by([("model_id", "ascending"), ("epoch", "ascending")])
        return table.drop_columns(keys) if keys else table

    def frame(self, epochs=None, splits=None):
        """Everything but the weights, as a pandas DataFrame."""
        cols = [f.name for f in schema(self.num_params) if f.name != "weights"]
        return self.table(cols, epochs, splits).to_pandas()

    def weights(self, epochs=None, splits=None) -> tuple[np.ndarray, "pandas.DataFrame"]:
        """(weights [rows, P] float32, metadata DataFrame in the same row order)."""
        t = self.table(None, epochs, splits)
        w = weights_numpy(t.column("weights"))
        if not w.flags.writeable:  # a view of Arrow's buffer: callers may normalise in place
            w = w.copy()
        return w, t.drop_columns(["weights"]).to_pandas()

    # --- the Python API (issue 13, item 4): one model as a torch module, the zoo as a Ray Dataset ------------

    def model(self, model_id: int, epoch: int) -> "torch.nn.Module":
        """Model ``model_id`` after ``epoch`` as a ``torch.nn.Module`` in eval mode: the zoo's architecture
        (:func:`raysys.architectures.build` with the model's activation and dropout) holding its stored weights.

        Evaluated on :meth:`dataset`, it gives the stored ``test_acc`` of that row (:func:`raysys.train.evaluate`).
        """
        import torch

        from raysys import architectures

        self.table(["model_id"], epochs=[epoch])  # the readable-zoo checks (complete, has shards)
        where = [("model_id", "=", int(model_id)), ("epoch", "=", int(epoch))]
        rows = pa.concat_tables([read_shard(f, ["weights", "activation", "dropout"], where) for f in self.shard_files()])
        if rows.num_rows != 1:
            raise StoreError(f"zoo {self.where} has {rows.num_rows} rows for model {model_id} at epoch {epoch}. "
                             f"'raysys zoo info {self.where}' lists its models and epochs.")
        layout = self.layout
        module = architectures.build(layout.arch, rows.column("activation")[0].as_py(),
                                     float(rows.column("dropout")[0].as_py()), layout.in_channels, layout.num_classes)
        return architectures.unflatten(torch.from_numpy(weights_numpy(rows.column("weights")).copy()[0]),
                                       module).eval()

    def dataset(self, data_root: str | None = None):
        """The image dataset this zoo was trained on (the same splits; checked against the manifest's digests)."""
        return zoo_dataset(self.manifest, data_root)

    def to_ray_dataset(self, columns: list[str] | None = None, **read_kwargs):
        """The zoo as a ``ray.data.Dataset``: ``ray.data.read_parquet`` of the planned, complete shard files only
        (never a stray file), one row per (model, epoch), ``weights`` a ``fixed_size_list<float32>[P]`` (in a numpy
        batch an array per row: ``np.stack(batch["weights"])`` is [n, P])."""
        import ray.data

        self.table(["model_id"], epochs=[-1])  # the readable-zoo checks, without reading any data
        return ray.data.read_parquet([str(f) for f in self.shard_files()], columns=columns, **read_kwargs)


def _shard_number(path: Path) -> int:
    try:
        return int(path.stem.split("-")[-1])
    except ValueError:
        return -1


def read_shard(path: Path, columns=None, filters=None) -> pa.Table:
    """One shard, every page checksum verified (shards written before checksums were on have none, and are read as
    they are); an old shard's ``fixed_shape_tensor`` weights come back as the plain fixed-size list."""
    try:
        table = pq.read_table(path, columns=columns, filters=filters, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as err:
        raise StoreError(f"shard {path} is corrupt ({type(err).__name__}: {err}). 'raysys zoo verify "
                         f"{path.parent.parent}' lists the damaged shards; rerun 'raysys zoo generate' with the "
                         f"same config and --out (or 'raysys zoo align' for an aligned copy): it quarantines them "
                         f"and writes them again.") from None
    return _plain_weights(table).replace_schema_metadata(None)


def _plain_weights(table: pa.Table) -> pa.Table:
    """The table with an Arrow ``fixed_shape_tensor`` weights column (the first layout) as its storage list."""
    if "weights" not in table.column_names:
        return table
    t = table.schema.field("weights").type
    if not isinstance(t, pa.BaseExtensionType):
        return table
    i = table.schema.get_field_index("weights")
    return table.set_column(i, pa.field("weights", t.storage_type), table.column(i).cast(t.storage_type))


def weights_column(weights: np.ndarray) -> pa.FixedSizeListArray:
    """[N, P] weights -> the store's ``fixed_size_list<float32>[P]`` column (the inverse of :func:`weights_numpy`)."""
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(weights.reshape(-1)), weights.shape[1])


def weights_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A weights column -> [N, P] float32: a zero-copy (read-only) view of a single chunk, one concatenation of
    several. Takes the plain fixed-size list and the first layout's ``fixed_shape_tensor``."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    t = column.type
    t = getattr(t, "storage_type", t)
    if not pa.types.is_fixed_size_list(t):
        raise StoreError(f"weights column of type {column.type} is not a fixed-size list of float32")
    size = t.list_size
    parts = [(c.storage if isinstance(c, pa.ExtensionArray) else c).flatten().to_numpy().reshape(-1, size)
             for c in chunks if len(c)]
    if not parts:
        return np.zeros((0, size), np.float32)
    w = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return w.astype(np.float32, copy=False)


def zoo_dataset(manifest: dict, data_root: str | None = None) -> "datasets.ImageData":
    """The image dataset a zoo was trained on, checked against the digests in its manifest.

    Loader options (and the data root, unless ``data_root`` is given) come from the zoo config's
    dataset section, the split seed from the dataset record, so the test images are the zoo's.
    """
    from raysys import datasets

    record = manifest.get("dataset") or {}
    name = record.get("name")
    if name is None:
        raise RaysysError("the zoo manifest has no dataset record ('dataset.name'); it was not written by "
                          "'raysys zoo generate'. Regenerate the zoo.")
    accepted = set(datasets.options_of(name)) if name in datasets.LOADERS else set()
    section = (manifest.get("config") or {}).get("dataset") or {}
    section = {**section, **(section.get("options") or {})} if isinstance(section, dict) else {}
    options = {k: v for k, v in section.items() if k in accepted and k not in ("root", "download")}
    seed = (record.get("preprocessing") or {}).get("split_seed")
    if seed is not None and "seed" in accepted:
        options.setdefault("seed", seed)
    data = datasets.load(name, root=data_root if data_root is not None else section.get("root"), **options)
    want = (record.get("sha256_16") or {}).get("test")
    have = data.describe()["sha256_16"]["test"]
    if want is not None and want != have:
        raise RaysysError(
            f"the '{name}' test images loaded here (options {options}) differ from the ones the zoo was "
            f"trained on (digest {have} vs {want} in the manifest). Point --data-root at the same copy of "
            f"the dataset the zoo used.")
    return data


def schema_problem(arrow_schema, num_params: int) -> str | None:
    """Why a shard's Parquet schema does not fit a zoo of ``num_params`` parameters (None: it fits)."""
    want = schema(num_params)
    missing = [n for n in want.names if n not in arrow_schema.names]
    if missing:
        return f"columns {missing} are missing"
    weights = arrow_schema.field("weights").type
    shape = getattr(weights, "shape", None)  # the first layout's fixed_shape_tensor
    if shape is not None and len(shape) != 1:
        return f"weights have shape {' x '.join(map(str, shape))} but the manifest's layout has {num_params} parameters"
    storage = getattr(weights, "storage_type", weights)
    if not pa.types.is_fixed_size_list(storage) or storage.value_type != pa.float32():
        return f"weights are {weights}, not a fixed-size list of float32"
    if storage.list_size != num_params:
        return f"weights have length {storage.list_size} but the manifest's layout has {num_params} parameters"
    return None


def check_schema(zoo) -> None:
    """Refuse a zoo whose manifest and Parquet data disagree (cheap: reads only the first shard's footer)."""
    files = zoo.shard_files()
    if not files:
        return
    try:
        num_params = zoo.num_params
    except (KeyError, TypeError, ValueError) as err:
        raise RaysysError(f"zoo {zoo.root}: manifest.json has no usable layout ({err!r}). The manifest is not one "
                          f"raysys wrote; regenerate the zoo with 'raysys zoo generate CONFIG --out DIR'.") from None
    stated = zoo.manifest.get("num_params")
    if stated is not None and stated != num_params:
        raise RaysysError(f"zoo {zoo.root}: manifest.json says num_params {stated} but its layout has {num_params}. "
                          f"The manifest was edited or mixed from two zoos; regenerate the zoo into a new --out.")
    try:
        problem = schema_problem(pq.read_schema(files[0]), num_params)
    except Exception as err:
        raise RaysysError(f"zoo {zoo.root}: {files[0].name} is not readable Parquet ({type(err).__name__}). "
                          f"Run 'raysys zoo verify {zoo.root}', then rerun 'raysys zoo generate' to rewrite it.") from None
    if problem:
        raise RaysysError(f"zoo {zoo.root}: manifest and data disagree: {files[0].name}: {problem}. The shards come "
                          f"from another zoo or the manifest was replaced; regenerate the zoo into a new --out "
                          f"directory (or restore its own manifest.json).")


def open_zoo(root: str | Path, check: bool = True, partial: bool = False) -> Zoo:
    """Open a zoo directory; ``check`` also refuses a manifest whose layout disagrees with the data;
    ``partial`` allows reading a zoo whose generation has not finished (the shards written so far).

    ``root`` may be a pyarrow filesystem URI (``s3://bucket/prefix``): the zoo is read from its local working copy
    (:func:`raysys.storage.mirror_dir`), first made equal to the remote one (only changed objects are fetched)."""
    from raysys.storage import Remote, is_remote

    if is_remote(root):
        remote = Remote(str(root), flag="zoo")
        remote.pull()
        try:
            zoo = open_zoo(remote.local, check, partial)
        except StoreError as err:
            raise StoreError(str(err).replace(str(remote.local), remote.uri)) from None
        zoo.uri = remote.uri
        return zoo
    root = Path(root)
    manifest = read_manifest(root)
    zoo = Zoo(root, manifest, partial)
    if check:
        try:
            Layout.from_dict(manifest["layout"])
        except Exception as err:
            raise StoreError(damaged_manifest(root, f"it has no usable layout ({type(err).__name__}: {err})")) from None
        check_schema(zoo)  # cheap: the first shard's Parquet footer
    return zoo


def manifest_problem(root: str | Path) -> str | None:
    """Why the manifest of the zoo in ``root`` cannot be read (None: it can, or there is none)."""
    path = manifest_path(root)
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        return f"it is not valid JSON ({type(err).__name__}: {err})"
    if not isinstance(manifest, dict):
        return f"it holds a JSON {type(manifest).__name__}, not an object"
    shards = manifest.get("shards")
    if shards is not None and not (isinstance(shards, list) and all(
            isinstance(x, dict) and isinstance(x.get("shard"), int) and not isinstance(x.get("shard"), bool)
            for x in shards)):
        return "its shard plan ('shards') is not a list of {shard: N, ...} entries"
    return None


def writer_manifest(out: str | Path, key: str, foreign: str) -> dict | None:
    """The manifest in ``out`` when its writer wrote it (it holds a ``key`` record: the writer's identity, for
    the caller to compare), None when ``out`` is new or holds only a writer's own files; a RaysysError naming
    the fix when ``out`` holds anything else: other files, a damaged manifest, or another writer's zoo (said as
    "holds a zoo that ``foreign``")."""
    out = Path(out)
    path = manifest_path(out)
    if not path.exists():
        if out.exists() and not only_writer_files(out):
            raise RaysysError(f"--out {out} exists, is not empty and holds no zoo manifest. "
                              f"Choose a new --out directory (or an empty one).")
        return None
    why = manifest_problem(out)
    if why is not None:
        raise RaysysError(damaged_manifest(out, why))
    manifest = json.loads(path.read_text())
    if not isinstance(manifest.get(key), dict):
        raise RaysysError(f"--out {out} holds a zoo that {foreign}. Choose a new --out directory.")
    return manifest


def damaged_manifest(root: str | Path, why: str) -> str:
    """The one-line error for a damaged manifest: what is wrong, and the command that rebuilds it."""
    root = Path(root)
    path = manifest_path(root)
    if read_plan(root) is not None:
        fix = (f"Rebuild it from {PLAN} and the shard records: 'raysys zoo verify {root} --repair' (shards that "
               f"do not match their records are left out and named).")
    else:
        fix = (f"There is no readable {PLAN} to rebuild it from (a zoo written by an older raysys): rerun "
               f"'raysys zoo generate CONFIG --out {root}' with the zoo's original config; it writes a new manifest "
               f"and keeps every shard that matches its record and the plan.")
    return f"{path} is damaged: {why}. {fix}"


def read_manifest(root: str | Path) -> dict:
    """The manifest of the zoo in ``root``; a :class:`StoreError` naming the file and the fix when it is
    missing or damaged."""
    root = Path(root)
    path = manifest_path(root)
    if not path.exists():
        if read_plan(root) is not None:  # a zoo that lost its manifest
            raise StoreError(damaged_manifest(root, "it is missing"))
        raise StoreError(f"{root} is not a zoo: {MANIFEST} is missing. Point at a directory written by "
                         f"'raysys zoo generate CONFIG --out DIR'.")
    why = manifest_problem(root)
    if why is not None:
        raise StoreError(damaged_manifest(root, why))
    return json.loads(path.read_bytes())


def read_plan(root: str | Path) -> dict | None:
    """``__raysys__/plan.json`` when it is there and usable (a JSON object with a shard plan and a layout)."""
    try:
        plan = json.loads((Path(root) / PLAN).read_bytes())
    except (OSError, ValueError):
        return None
    ok = isinstance(plan, dict) and isinstance(plan.get("shards"), list) and isinstance(plan.get("layout"), dict)
    return plan if ok and all(isinstance(x, dict) and isinstance(x.get("shard"), int) for x in plan["shards"]) else None


def repair_manifest(root: str | Path) -> dict:
    """Rebuild a damaged ``__raysys__/manifest.json`` from ``__raysys__/plan.json`` and the completion records
    whose sha256 matches their Parquet file; the damaged manifest goes to the quarantine. Returns a summary:
    ``rebuilt`` (False when the manifest was fine), ``verified`` and ``planned`` shard counts, ``left_out``.

    The status is ``complete`` when every planned shard verifies (the manifest then has the bytes the writer
    wrote), else ``running``: readers refuse it until the writer's command, rerun, rewrites the rest.
    """
    root = Path(root)
    path = root / MANIFEST
    why = manifest_problem(root) if path.exists() else "it is missing"
    if why is None:
        return {"rebuilt": False, "verified": None, "planned": None, "left_out": []}
    plan = read_plan(root)
    if plan is None:
        raise StoreError(damaged_manifest(root, why))
    with WriterLock(root, "raysys zoo verify --repair"):
        shards, left_out = [], []
        for entry in plan["shards"]:
            sid, file = int(entry["shard"]), shard_file(root, int(entry["shard"]))
            _, rec = shard_record(root, sid)
            if rec is not None and file.exists() and rec.get("sha256") == sha256_file(file):
                shards.append({**entry, "sha256": rec["sha256"], "rows": rec.get("rows")})
            else:
                shards.append(entry)
                left_out.append(sid)
        manifest = {**plan, "status": "running" if left_out else "complete", "shards": shards}
        if "status" not in plan:
            manifest = {"status": manifest.pop("status"), **manifest}
        if path.exists():
            quarantine(root, path, f"a damaged manifest ({why})")
        atomic_write_json(path, manifest)
    return {"rebuilt": True, "why": why, "verified": len(shards) - len(left_out), "planned": len(shards),
            "left_out": left_out, "status": manifest["status"]}


# --- migration from the first layout --------------------------------------------------------------

def migrate_zoo(root: str | Path, out: str | Path | None = None) -> dict:
    """Convert a zoo of the first layout (``manifest.json``, ``shards/shard-N.json`` records, ``fixed_shape_tensor``
    weights) to this one, in place, or into a new directory ``out``. Returns a summary.

    In place, each step leaves a zoo that reads: per shard, the new record (in ``__raysys__/``) is written
    first, then the converted Parquet file replaces the old one under a temporary name and a rename, then
    the old record goes; the manifest moves last. Until then readers take whichever record fits each file.
    Rerunning after a crash finishes the job. A shard without a complete record (an unfinished run's) is
    left for ``zoo generate`` to redo. The manifest's shard checksums change with the files, so a
    checkpoint or an aligned copy made from the old bytes no longer matches this zoo's hash.
    """
    root = Path(root)
    src_manifest = manifest_path(root)
    if not src_manifest.is_file():
        raise StoreError(f"{root} is not a zoo: neither {MANIFEST} nor {LEGACY_MANIFEST} is there.")
    try:
        manifest = json.loads(src_manifest.read_text())
    except ValueError as err:
        raise StoreError(f"{src_manifest} is not valid JSON ({err}); the zoo is corrupt.") from None
    dst = Path(out) if out is not None else root
    in_place = out is None or dst.resolve() == root.resolve()
    if not in_place and dst.exists() and any(dst.iterdir()):
        raise StoreError(f"--out {dst} exists and is not empty. Choose a new directory (or an empty one).")
    summary: dict[str, Any] = {"zoo": str(root), "out": str(dst), "converted": 0, "already": 0, "skipped": []}
    if in_place and not is_legacy(root):
        summary["already"] = len(recorded_shards(root))
        return summary
    (dst / META).mkdir(parents=True, exist_ok=True)
    (dst / SHARDS).mkdir(exist_ok=True)
    if in_place:  # temporary files of a migration (or a run) that was killed
        clean_temp_files(root, mine=True)
    layout = manifest.get("layout")
    records = {}
    for sid in recorded_shards(root):
        path, new_rec = shard_file(root, sid), record_file(dst, sid)
        rec_path, rec = shard_record(root, sid)
        if rec is None or not path.exists() or rec.get("sha256") != sha256_file(path):
            summary["skipped"].append(sid)  # not complete: generate redoes it
            if in_place:
                legacy_record_file(root, sid).unlink(missing_ok=True)
            continue
        if in_place and rec_path == new_rec:  # converted before a crash
            legacy_record_file(root, sid).unlink(missing_ok=True)
            records[sid] = rec
            summary["already"] += 1
            continue
        table = read_shard(path)
        tmp, record = _stage_shard_file(dst, sid, table, rec.get("model_ids", []),
                                        layout_metadata(layout, _num_params(table)))
        if in_place:  # the new record first (the old one still fits the old file), then the file, then the old record
            atomic_write_json(new_rec, record)
            os.replace(tmp, path)
            legacy_record_file(root, sid).unlink(missing_ok=True)
        else:
            os.replace(tmp, shard_file(dst, sid))
            atomic_write_json(new_rec, record)
        records[sid] = record
        summary["converted"] += 1
    for name in LEGACY_META_FILES:
        src = meta_file(root, name)
        if in_place and (root / name).is_file():
            if src == root / name:
                os.replace(src, dst / META / name)
            else:  # moved before a crash, or written anew since
                (root / name).unlink()
        elif not in_place and src.is_file():
            shutil.copy2(src, dst / META / name)
    if isinstance(manifest.get("shards"), list):
        manifest["shards"] = [{**s, **({"sha256": records[int(s["shard"])]["sha256"],
                                         "rows": records[int(s["shard"])]["rows"]}
                                        if "sha256" in s and int(s["shard"]) in records else {})}
                              for s in manifest["shards"]]
    aligned = manifest.get("aligned")
    if isinstance(aligned, dict) and aligned.get("template_file") in LEGACY_META_FILES:
        aligned["template_file"] = f"{META}/{aligned['template_file']}"
    atomic_write_json(dst / MANIFEST, manifest)
    if in_place:
        (root / LEGACY_MANIFEST).unlink(missing_ok=True)
    return summary


def _cmd_migrate(args) -> int:
    if not Path(args.dir).is_dir():
        raise StoreError(f"{args.dir} is not a directory. Pass a zoo directory.")
    with WriterLock(args.dir, "raysys zoo migrate"):
        summary = migrate_zoo(args.dir, args.out)
    print(f"raysys zoo migrate: {summary['out']}: {summary['converted']} shards converted, {summary['already']} "
          f"already in the current layout" + (f", shards {summary['skipped']} skipped (incomplete: rerun "
                                               f"'raysys zoo generate' to redo them)" if summary["skipped"] else ""))
    return 0
