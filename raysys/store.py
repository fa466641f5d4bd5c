"""The zoo store: a Parquet dataset with one row per (model, epoch), plus ``manifest.json``.

Layout of a zoo directory::

    manifest.json                  architecture layout, dataset record, config, version, shards
    shards/shard-00007.parquet     all epochs of the models of one shard
    shards/shard-00007.json        completion record: rows, model ids, sha256 of the parquet file

A shard is complete when its JSON record exists and matches its Parquet file; both are written
to a temporary name and renamed, so a crash never leaves a half-written shard that looks
complete. Weights are an Arrow ``fixed_shape_tensor`` column of float32, readable by pyarrow,
pandas and Ray Data. Every data page carries a CRC32 checksum (Parquet's page checksums), verified on
every read, so bit rot inside a shard is an error, not silently changed weights.

Readers read exactly the shards of the manifest's plan (a stray or left-over shard file is not data),
and refuse a zoo whose manifest says it is still being written, unless asked for partial data.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysys import __version__
from raysys.architectures import Layout
from raysys.config import RaysysError
from raysys.train import METRICS

if TYPE_CHECKING:
    import pandas

MANIFEST = "manifest.json"
SHARDS = "shards"
HYPERPARAMETERS = {
    "seed": pa.int64(), "init": pa.string(), "activation": pa.string(), "optimizer": pa.string(),
    "lr": pa.float64(), "weight_decay": pa.float64(), "dropout": pa.float64(), "batch_size": pa.int64(),
}


class StoreError(RaysysError):
    pass


def schema(num_params: int) -> pa.Schema:
    fields = [
        pa.field("model_id", pa.int64()),
        pa.field("epoch", pa.int32()),
        pa.field("split", pa.string()),
        pa.field("weights", pa.fixed_shape_tensor(pa.float32(), [num_params])),
        *[pa.field(m, pa.float64()) for m in METRICS],
        *[pa.field(k, t) for k, t in HYPERPARAMETERS.items()],
        pa.field("diverged", pa.bool_()),
    ]
    return pa.schema(fields)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    """Writes a zoo directory: the manifest first, then shards as they complete."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def write_manifest(self, manifest: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / SHARDS).mkdir(exist_ok=True)
        atomic_write_json(self.root / MANIFEST, {"raysys_version": __version__, **manifest})

    def shard_path(self, shard: int) -> Path:
        return self.root / SHARDS / f"shard-{shard:05d}.parquet"

    def write_shard(self, shard: int, table: pa.Table, model_ids: Iterable[int]) -> dict:
        path = self.shard_path(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        pq.write_table(table, tmp, compression="zstd", write_page_checksum=True)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        record = {"shard": shard, "file": path.name, "rows": table.num_rows, "bytes": path.stat().st_size,
                  "model_ids": sorted(int(m) for m in model_ids), "sha256": sha256_file(path)}
        atomic_write_json(path.with_suffix(".json"), record)
        return record

    def is_complete(self, shard: int) -> bool:
        path = self.shard_path(shard)
        rec = path.with_suffix(".json")
        if not (path.exists() and rec.exists()):
            return False
        try:
            return json.loads(rec.read_text())["sha256"] == sha256_file(path)
        except (ValueError, KeyError):
            return False


@dataclass
class Zoo:
    """A read-only view of a zoo directory (``partial``: also read a zoo that is still being written)."""

    root: Path
    manifest: dict
    partial: bool = False

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
        for rec in sorted((self.root / SHARDS).glob("shard-*.json")):
            path = rec.with_suffix(".parquet")
            if planned and _shard_number(path) not in planned:
                continue  # not in the plan: left over from another run or copied in, never data
            try:
                expected = json.loads(rec.read_text()).get("bytes")
            except ValueError:
                continue
            if path.exists() and (expected is None or path.stat().st_size == expected):
                files.append(path)
        return files

    def table(self, columns: list[str] | None = None, epochs: Iterable[int] | None = None,
              splits: Iterable[str] | None = None) -> pa.Table:
        status = self.manifest.get("status", "complete")
        if status != "complete" and not self.partial:
            raise StoreError(f"zoo {self.root} is not complete (its manifest says '{status}': "
                             f"{len(self.shard_files())} of {len(self.manifest.get('shards', []))} shards written). "
                             f"Let 'raysys zoo generate' finish, or rerun the same command to resume it; "
                             f"open_zoo(..., partial=True) reads the shards written so far.")
        files = self.shard_files()
        if not files:
            raise StoreError(f"zoo {self.root} has no complete shards. Generate it with "
                             f"'raysys zoo generate CONFIG --out {self.root}'.")
        filters = []
        if epochs is not None:
            filters.append(("epoch", "in", [int(e) for e in epochs]))
        if splits is not None:
            filters.append(("split", "in", list(splits)))
        tables = [read_shard(f, columns, filters or None) for f in files]
        return pa.concat_tables(tables).sort_by([("model_id", "ascending"), ("epoch", "ascending")]) \
            if columns is None or {"model_id", "epoch"} <= set(columns) else pa.concat_tables(tables)

    def frame(self, epochs=None, splits=None):
        """Everything but the weights, as a pandas DataFrame."""
        cols = [f.name for f in schema(self.num_params) if f.name != "weights"]
        return self.table(cols, epochs, splits).to_pandas()

    def weights(self, epochs=None, splits=None) -> tuple[np.ndarray, "pandas.DataFrame"]:
        """(weights [rows, P] float32, metadata DataFrame in the same row order)."""
        t = self.table(None, epochs, splits)
        w = weights_numpy(t.column("weights"))
        return w, t.drop_columns(["weights"]).to_pandas()


def _shard_number(path: Path) -> int:
    try:
        return int(path.stem.split("-")[-1])
    except ValueError:
        return -1


def read_shard(path: Path, columns=None, filters=None) -> pa.Table:
    """One shard, every page checksum verified (shards written before checksums were on have none, and are read as they are)."""
    try:
        return pq.read_table(path, columns=columns, filters=filters, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as err:
        raise StoreError(f"shard {path} is corrupt ({type(err).__name__}: {err}). 'raysys zoo verify "
                         f"{path.parent.parent}' lists the damaged shards; delete them and rerun 'raysys zoo "
                         f"generate' with the same config and --out to write them again.") from None


def weights_column(weights: np.ndarray) -> pa.ExtensionArray:
    """[N, P] weights -> the store's ``fixed_shape_tensor`` float32 column (the inverse of :func:`weights_numpy`)."""
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(weights.reshape(-1)), weights.shape[1])
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), [weights.shape[1]]), storage)


def weights_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if not chunks:
        return np.zeros((0, 0), np.float32)
    return np.concatenate([c.to_numpy_ndarray() for c in chunks]).astype(np.float32, copy=False)


def open_zoo(root: str | Path, check: bool = True, partial: bool = False) -> Zoo:
    """Open a zoo directory; ``check`` also refuses a manifest whose layout disagrees with the data;
    ``partial`` allows reading a zoo whose generation has not finished (the shards written so far)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        raise StoreError(f"{root} is not a zoo: {MANIFEST} is missing. Point at a directory written by "
                         f"'raysys zoo generate CONFIG --out DIR'.")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise StoreError(f"{path} is not valid JSON ({err}); the zoo is corrupt. Regenerate it.") from None
    zoo = Zoo(root, manifest, partial)
    if check:
        from raysys.integrity import check_schema  # cheap: the first shard's Parquet footer

        check_schema(zoo)
    return zoo
