"""The zoo directory is a plain Parquet dataset: pandas, pyarrow, Ray Data, Hugging Face datasets (and DuckDB,
polars where installed) read it as it is; zoos of the first layout are still read, and `raysys zoo migrate`
converts them, in place (every interrupted step leaving a readable zoo) or into a new directory."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from test_store import P, write_zoo

from raysys import __version__, cli
from raysys.integrity import verify_zoo
from raysys.store import (LAYOUT_KEY, LEGACY_MANIFEST, MANIFEST, META, SHARDS, SUMMARY_PLOT, ZooWriter, is_legacy,
                          legacy_record_file, open_zoo, record_file, recorded_shards, sha256_file, shard_file,
                          weights_numpy)

ROWS = 10 * 3  # write_zoo's 10 models x epochs 0-2, in 3 shards


@pytest.fixture
def zoo(tmp_path):
    """A complete zoo with a shard plan, the plot `zoo generate` leaves and a killed run's temporary file."""
    root = tmp_path / "zoo"
    writer, _, _ = write_zoo(root, num_models=10, epochs=2, per_shard=4)
    manifest = json.loads((root / MANIFEST).read_text())
    records = [json.loads(record_file(root, s).read_text()) for s in recorded_shards(root)]
    manifest.update(status="complete", shards=[{"shard": r["shard"], "model_ids": r["model_ids"], "sha256": r["sha256"],
                                                "rows": r["rows"]} for r in records])
    writer.write_manifest({k: v for k, v in manifest.items() if k != "raysys_version"})
    (root / META / SUMMARY_PLOT).write_bytes(b"\x89PNG not really")
    (root / SHARDS / ".shard-00009.parquet.deadbeef.tmp").write_bytes(b"half a shard")
    return root


def reference(root):
    w, meta = open_zoo(root).weights()
    return w, list(zip(meta.model_id, meta.epoch))


def sorted_weights(table: pa.Table):
    """(weights [rows, P] float32, [(model_id, epoch)]) of any reader's table, in the store's row order."""
    table = table.sort_by([("model_id", "ascending"), ("epoch", "ascending")])
    keys = list(zip(table.column("model_id").to_pylist(), table.column("epoch").to_pylist()))
    return weights_numpy(table.column("weights")), keys


def test_pandas_and_pyarrow_read_the_zoo_directory(zoo):
    w_ref, keys_ref = reference(zoo)
    assert w_ref.shape == (ROWS, P)
    df = pd.read_parquet(zoo).sort_values(["model_id", "epoch"])
    assert len(df) == ROWS and list(zip(df.model_id, df.epoch)) == keys_ref
    np.testing.assert_array_equal(np.stack(df.weights.to_numpy()).astype(np.float32), w_ref)
    for table in (pads.dataset(zoo).to_table(), pq.read_table(zoo)):
        w, keys = sorted_weights(table)
        assert keys == keys_ref and w.dtype == np.float32
        np.testing.assert_array_equal(w, w_ref)


def test_every_shard_carries_the_layout_in_its_parquet_metadata(zoo):
    manifest = json.loads((zoo / MANIFEST).read_text())
    for sid in recorded_shards(zoo):
        meta = json.loads(pq.read_schema(shard_file(zoo, sid)).metadata[LAYOUT_KEY.encode()])
        assert meta == {"layout": manifest["layout"], "num_params": P, "raysys_version": __version__}
    assert LAYOUT_KEY.encode() in pads.dataset(zoo).schema.metadata


def test_hugging_face_datasets_loads_the_zoo_directory(zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is in the test extra; not installed here")
    ds = datasets.load_dataset("parquet", data_dir=str(zoo), cache_dir=str(tmp_path / "hf-cache"), split="train")
    assert ds.num_rows == ROWS
    assert ds.features["weights"] == datasets.List(datasets.Value("float32"), length=P)
    w, keys = sorted_weights(ds.data.table)
    w_ref, keys_ref = reference(zoo)
    assert keys == keys_ref
    np.testing.assert_array_equal(w, w_ref)


def test_duckdb_reads_the_zoo_directory(zoo):
    duckdb = pytest.importorskip("duckdb", reason="DuckDB is not a dependency; checked where it is installed")
    result = duckdb.execute("SELECT * FROM read_parquet(?)", [f"{zoo}/**/*.parquet"])
    table = result.to_arrow_table() if hasattr(result, "to_arrow_table") else result.fetch_arrow_table()  # DuckDB 2 / 1
    # Parquet itself has no fixed-size list (pyarrow restores it from the Arrow schema in the file): DuckDB reads a LIST
    i = table.schema.get_field_index("weights")
    table = table.set_column(i, "weights", table.column(i).cast(pa.list_(pa.float32(), P)))
    w, keys = sorted_weights(table)
    w_ref, keys_ref = reference(zoo)
    assert keys == keys_ref
    np.testing.assert_array_equal(w, w_ref)


def test_polars_reads_the_zoo_directory(zoo):
    pl = pytest.importorskip("polars", reason="polars is not a dependency; checked where it is installed")
    w, keys = sorted_weights(pl.read_parquet(str(zoo / SHARDS / "*.parquet")).to_arrow())
    w_ref, keys_ref = reference(zoo)
    assert keys == keys_ref
    np.testing.assert_array_equal(w, w_ref)


@pytest.mark.slow
def test_ray_data_reads_the_zoo_directory(zoo, ray_local):
    import ray.data

    ds = ray.data.read_parquet(str(zoo))
    assert ds.count() == ROWS
    w, keys = sorted_weights(ds.take_batch(ROWS, batch_format="pyarrow"))
    w_ref, keys_ref = reference(zoo)
    assert keys == keys_ref
    np.testing.assert_array_equal(w, w_ref)
    batch = ds.take_batch(ROWS, batch_format="numpy")
    assert np.stack(batch["weights"]).shape == (ROWS, P)


# --- the first layout -------------------------------------------------------------------------------

def to_first_layout(root) -> None:
    """Rewrite a zoo the way raysys 0.1.0 wrote it: manifest.json and summary.png on top, records beside their
    Parquet files, weights an Arrow fixed_shape_tensor, no layout metadata."""
    manifest = json.loads((root / MANIFEST).read_text())
    for sid in recorded_shards(root):
        path = shard_file(root, sid)
        t = pq.read_table(path).replace_schema_metadata(None)
        storage = pa.concat_arrays(t.column("weights").chunks).cast(pa.list_(pa.float32(), P))
        tensor = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), [P]), storage)
        t = t.set_column(t.schema.get_field_index("weights"), pa.field("weights", tensor.type), tensor)
        pq.write_table(t, path, compression="zstd", write_page_checksum=True)
        rec = {**json.loads(record_file(root, sid).read_text()), "bytes": path.stat().st_size,
               "sha256": sha256_file(path)}
        legacy_record_file(root, sid).write_text(json.dumps(rec))
        for s in manifest["shards"]:
            if s["shard"] == sid:
                s["sha256"] = rec["sha256"]
    (root / LEGACY_MANIFEST).write_text(json.dumps(manifest))
    os.replace(root / META / SUMMARY_PLOT, root / SUMMARY_PLOT)
    shutil.rmtree(root / META)
    assert isinstance(pq.read_schema(shard_file(root, 0)).field("weights").type, pa.FixedShapeTensorType)


def assert_current_layout(root, w_ref, keys_ref) -> None:
    assert not is_legacy(root) and not (root / LEGACY_MANIFEST).exists()
    assert not list((root / SHARDS).glob("*.json")) and not list(root.rglob("*.tmp"))
    assert (root / META / SUMMARY_PLOT).is_file()
    assert pa.types.is_fixed_size_list(pq.read_schema(shard_file(root, 0)).field("weights").type)
    report = verify_zoo(root)
    assert report.ok and not report.warnings, report.format()
    w, keys = reference(root)
    assert keys == keys_ref
    np.testing.assert_array_equal(w, w_ref)
    w, keys = sorted_weights(pq.read_table(root))  # a plain Parquet dataset again
    np.testing.assert_array_equal(w, w_ref)


def test_a_zoo_of_the_first_layout_is_read_and_migrated(zoo, tmp_path, capsys):
    w_ref, keys_ref = reference(zoo)
    to_first_layout(zoo)
    assert is_legacy(zoo)
    copy = tmp_path / "copy"
    shutil.copytree(zoo, copy)
    # read as it is: same rows, same weights; verify passes and says how to convert it
    w, keys = reference(zoo)
    assert keys == keys_ref
    np.testing.assert_array_equal(w, w_ref)
    report = verify_zoo(zoo)
    assert report.ok and [p.kind for p in report.warnings] == ["leftover", "layout"], report.format()
    assert "raysys zoo migrate" in report.format()

    out = tmp_path / "converted"
    assert cli.main(["zoo", "migrate", str(copy), "--out", str(out)]) == 0
    assert is_legacy(copy)  # --out leaves the source as it was
    assert_current_layout(out, w_ref, keys_ref)

    assert cli.main(["zoo", "migrate", str(zoo)]) == 0
    assert "3 shards converted" in capsys.readouterr().out
    assert_current_layout(zoo, w_ref, keys_ref)
    assert cli.main(["zoo", "verify", str(zoo)]) == 0
    assert cli.main(["zoo", "migrate", str(zoo)]) == 0  # nothing left to do
    assert "0 shards converted, 3 already" in capsys.readouterr().out

    # a writer (a resumed generate or align) converts an old zoo before it writes into it
    manifest = json.loads((copy / LEGACY_MANIFEST).read_text())
    plan = [{"shard": s["shard"], "model_ids": s["model_ids"]} for s in manifest["shards"]]
    ZooWriter(copy).write_manifest({**manifest, "status": "running", "shards": plan})  # what generate writes first
    assert not is_legacy(copy) and verify_zoo(copy).ok
    w, meta = open_zoo(copy, partial=True).weights()
    np.testing.assert_array_equal(w, w_ref)


def test_a_migration_killed_at_any_step_leaves_a_readable_zoo_and_a_rerun_finishes_it(zoo, tmp_path, monkeypatch):
    import raysys.store as store

    w_ref, keys_ref = reference(zoo)
    to_first_layout(zoo)
    real_replace, steps = os.replace, 0

    class Killed(BaseException):
        pass

    def replace_then_die(at):
        def replace(src, dst):
            nonlocal steps
            steps += 1
            if steps == at:
                raise Killed  # the process dies before this rename
            real_replace(src, dst)
        return replace

    at = 0
    while True:
        at, steps = at + 1, 0
        root = tmp_path / f"killed-at-{at}"
        shutil.copytree(zoo, root)
        monkeypatch.setattr(store.os, "replace", replace_then_die(at))
        try:
            store.migrate_zoo(root)
            finished = True
        except Killed:
            finished = False
        monkeypatch.setattr(store.os, "replace", real_replace)
        w, keys = reference(root)  # whatever the step, every row reads, with its weights
        assert keys == keys_ref, at
        np.testing.assert_array_equal(w, w_ref)
        store.migrate_zoo(root)
        assert_current_layout(root, w_ref, keys_ref)
        if finished:
            break
    assert at > 2 * 3  # at least each shard's record and file were a step of their own
