"""The zoo store: schema, row identity, splits by model, atomic shards (other readers: test_store_readers.py)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raysys.architectures import layout_of
from raysys.store import (HYPERPARAMETERS, MANIFEST, StoreError, ZooWriter, open_zoo, rows_table, splits_for,
                          weights_numpy)
from raysys.train import METRICS

P = layout_of("tetris_ffn", 1, 4).num_params


def fake_population(model_ids, epochs, seed=0, nan_model=None):
    """What a trainer would report: weights and metrics per epoch for the given models."""
    rng = np.random.default_rng(seed)
    n = len(model_ids)
    out = []
    for e in range(epochs + 1):
        w = rng.normal(size=(n, P)).astype(np.float32)
        m = {k: rng.uniform(size=n) for k in METRICS}
        if nan_model is not None and e >= 1:
            i = list(model_ids).index(nan_model)
            w[i, :3] = np.nan
            m["train_loss"][i] = np.nan
        out.append((e, w, m))
    return out


def hparams_for(model_ids):
    return [{"seed": int(m) + 1, "init": "uniform", "activation": "tanh", "optimizer": "adam", "lr": 1e-3,
             "weight_decay": 0.0, "dropout": 0.0, "batch_size": 10} for m in model_ids]


def write_zoo(root, num_models=10, epochs=2, per_shard=4, nan_model=None):
    splits = splits_for(num_models, seed=0)
    writer = ZooWriter(root)
    writer.write_manifest({"layout": layout_of("tetris_ffn", 1, 4).to_dict(), "arch": "tetris_ffn",
                           "name": "fake", "splits": splits})
    written = {}
    for shard, start in enumerate(range(0, num_models, per_shard)):
        ids = list(range(start, min(start + per_shard, num_models)))
        tables = []
        for e, w, m in fake_population(ids, epochs, seed=shard, nan_model=nan_model if nan_model in ids else None):
            tables.append(rows_table(P, ids, e, [splits[i] for i in ids], w, m, hparams_for(ids)))
            for i, mid in enumerate(ids):
                written[(mid, e)] = w[i]
        writer.write_shard(shard, pa.concat_tables(tables), ids)
    return writer, splits, written


def test_schema_has_fixed_size_list_weights_every_metric_hparam_and_diverged(tmp_path):
    write_zoo(tmp_path)
    t = pq.read_table(tmp_path / "shards" / "shard-00000.parquet")
    wt = t.schema.field("weights").type
    assert pa.types.is_fixed_size_list(wt) and not isinstance(wt, pa.BaseExtensionType)
    assert wt.value_type == pa.float32() and wt.list_size == P
    for col in ("model_id", "epoch", "split", "diverged", *METRICS, *HYPERPARAMETERS):
        assert col in t.column_names, col
    assert t.schema.field("diverged").type == pa.bool_()
    assert t.schema.field("lr").type == pa.float64() and t.schema.field("init").type == pa.string()


def test_round_trip_weights_exact_and_one_row_per_model_epoch(tmp_path):
    _, splits, written = write_zoo(tmp_path, num_models=10, epochs=2, per_shard=4)
    zoo = open_zoo(tmp_path)
    w, meta = zoo.weights()
    assert w.dtype == np.float32 and w.shape == (10 * 3, P)
    keys = list(zip(meta.model_id, meta.epoch))
    assert len(set(keys)) == len(keys) == 30
    assert keys == sorted(keys)
    for row, key in enumerate(keys):
        np.testing.assert_array_equal(w[row], written[key])
    # filters select epochs and splits
    w2, meta2 = zoo.weights(epochs=[2], splits=["train"])
    assert set(meta2.epoch) == {2} and set(meta2.split) == {"train"}
    assert len(meta2) == splits.count("train")
    assert "weights" not in zoo.frame().columns


def test_a_streamed_shard_is_a_row_group_per_epoch_read_back_in_model_epoch_order_and_a_crash_leaves_nothing(tmp_path):
    """stream_shard writes each append as a row group of a temporary file; close renames it and writes its record;
    readers give (model_id, epoch) order whatever the file's order, also for columns without those keys; an
    exception inside the stream leaves neither the shard, its record nor a temporary file."""
    ids, splits = [0, 1, 2], splits_for(3, seed=0)
    writer = ZooWriter(tmp_path)
    writer.write_manifest({"layout": layout_of("tetris_ffn", 1, 4).to_dict(), "arch": "tetris_ffn", "name": "s",
                           "splits": splits})
    written = {}
    with writer.stream_shard(0, ids) as stream:
        for e, w, m in fake_population(ids, 3):
            stream.append(rows_table(P, ids, e, splits, w, m, hparams_for(ids)))
            assert not writer.shard_path(0).exists() and stream.tmp.exists()  # nothing in place until close
            written.update({(mid, e): w[i] for i, mid in enumerate(ids)})
        record = stream.close()
    assert pq.ParquetFile(writer.shard_path(0)).metadata.num_row_groups == 4 and record["rows"] == 12
    assert writer.is_complete(0) and not list(tmp_path.rglob("*.tmp"))
    assert pq.read_table(writer.shard_path(0)).column("epoch").to_pylist()[:3] == [0, 0, 0]  # epoch-major on disk
    zoo = open_zoo(tmp_path)
    w, meta = zoo.weights()
    assert list(zip(meta.model_id, meta.epoch)) == sorted(written)
    for row, key in enumerate(zip(meta.model_id, meta.epoch)):
        np.testing.assert_array_equal(w[row], written[key])
    only = weights_numpy(zoo.table(["weights"]).column("weights"))  # no keys asked for: still in that order
    np.testing.assert_array_equal(only, w)

    with pytest.raises(RuntimeError, match="the trainer died"):
        with writer.stream_shard(1, ids) as stream:
            e, w1, m1 = fake_population(ids, 0)[0]
            stream.append(rows_table(P, ids, e, splits, w1, m1, hparams_for(ids)))
            raise RuntimeError("the trainer died")
    assert not writer.shard_path(1).exists() and not writer.record_path(1).exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_split_is_by_model_never_by_epoch(tmp_path):
    _, splits, _ = write_zoo(tmp_path, num_models=20, epochs=3)
    df = open_zoo(tmp_path).frame()
    per_model = df.groupby("model_id")["split"].nunique()
    assert (per_model == 1).all()
    assert [df[df.model_id == m].split.iloc[0] for m in range(20)] == splits


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**31 - 1))
def test_splits_are_70_15_15_by_model_and_deterministic(n, seed):
    s = splits_for(n, seed)
    assert len(s) == n and set(s) <= {"train", "val", "test"}
    assert s.count("train") == int(round(0.7 * n)) and s.count("val") == int(round(0.15 * n))
    assert s == splits_for(n, seed)


def test_diverged_flag_marks_non_finite_models(tmp_path):
    write_zoo(tmp_path, num_models=6, epochs=2, per_shard=6, nan_model=3)
    df = open_zoo(tmp_path).frame()
    bad = df[df.diverged]
    assert set(bad.model_id) == {3} and set(bad.epoch) == {1, 2}
    assert not df[(df.model_id == 3) & (df.epoch == 0)].diverged.any()


def test_readable_by_plain_pyarrow_and_pandas(tmp_path):
    write_zoo(tmp_path, num_models=5, epochs=1, per_shard=5)
    path = tmp_path / "shards" / "shard-00000.parquet"
    t = pq.read_table(path)
    w = weights_numpy(t.column("weights"))
    assert w.shape == (10, P)
    df = pd.read_parquet(path)
    assert len(df) == 10 and set(df.columns) >= {"model_id", "epoch", "test_acc", "weights"}
    assert np.asarray(df.weights.iloc[0]).reshape(-1).shape == (P,)


def test_shard_completion_needs_matching_record(tmp_path):
    writer, _, _ = write_zoo(tmp_path, num_models=8, epochs=1, per_shard=4)
    assert writer.is_complete(0) and writer.is_complete(1)
    assert not writer.is_complete(2)
    # a truncated parquet with the old record: not complete, and readers skip it
    path = writer.shard_path(1)
    path.write_bytes(path.read_bytes()[:200])
    assert not writer.is_complete(1)
    zoo = open_zoo(tmp_path)
    assert zoo.shard_files() == [writer.shard_path(0)]
    assert set(zoo.frame().model_id) == {0, 1, 2, 3}
    # a parquet without record (crash between the two renames) is not complete
    writer.record_path(1).unlink()
    assert not writer.is_complete(1)
    # a record naming another checksum is not complete
    rec = json.loads(writer.record_path(0).read_text())
    rec["sha256"] = "0" * 64
    writer.record_path(0).write_text(json.dumps(rec))
    assert not writer.is_complete(0)


def test_writes_leave_no_temporary_files(tmp_path):
    write_zoo(tmp_path, num_models=4, epochs=1, per_shard=2)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["raysys_version"] and manifest["arch"] == "tetris_ffn"


def test_open_zoo_errors_say_how_to_fix(tmp_path):
    with pytest.raises(StoreError, match="raysys zoo generate"):
        open_zoo(tmp_path)
    (tmp_path / MANIFEST).parent.mkdir()
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(StoreError, match=r"manifest.json is damaged: it is not valid JSON.*raysys zoo generate"):
        open_zoo(tmp_path)  # no plan.json to rebuild it from: the config is the way back
    ZooWriter(tmp_path / "empty").write_manifest({"layout": layout_of("tetris_ffn", 1, 4).to_dict()})
    with pytest.raises(StoreError, match="no complete shards"):
        open_zoo(tmp_path / "empty").frame()


def _flip_bytes_inside_the_weights(path, count=16):
    """Bit rot: change ``count`` bytes in the middle of the weights' data pages; size and footer stay intact."""
    md = pq.ParquetFile(path).metadata.row_group(0)
    col = next(md.column(i) for i in range(md.num_columns) if md.column(i).path_in_schema.startswith("weights"))
    start = col.dictionary_page_offset or col.data_page_offset  # the chunk starts with its dictionary page
    at = start + col.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[at:at + count] = bytes(b ^ 0xFF for b in data[at:at + count])
    path.write_bytes(bytes(data))


def test_bit_rot_inside_a_shard_is_an_error_not_changed_weights(tmp_path):
    writer, _, written = write_zoo(tmp_path, num_models=8, epochs=1, per_shard=4)
    path = writer.shard_path(1)
    _flip_bytes_inside_the_weights(path)
    # without page checksums the change would pass: plain Parquet reads it, and the weights differ
    plain = weights_numpy(pq.read_table(path).column("weights"))
    assert plain.shape == (8, P)
    ids, eps = pq.read_table(path).column("model_id").to_pylist(), pq.read_table(path).column("epoch").to_pylist()
    assert any(not np.array_equal(plain[i], written[(m, e)]) for i, (m, e) in enumerate(zip(ids, eps)))
    zoo = open_zoo(tmp_path)
    with pytest.raises(StoreError, match=r"shard-00001\.parquet is corrupt.*raysys zoo verify"):
        zoo.weights()
    from raysys.integrity import verify_zoo

    report = verify_zoo(tmp_path)
    assert [p.kind for p in report.problems if p.shard == 1] == ["corrupted"]


def test_readers_read_only_the_planned_shards_of_a_complete_zoo(tmp_path):
    writer, _, _ = write_zoo(tmp_path, num_models=8, epochs=1, per_shard=4)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest.update(status="complete", shards=[{"shard": 0, "model_ids": [0, 1, 2, 3]},
                                               {"shard": 1, "model_ids": [4, 5, 6, 7]}])
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    # a stray shard (left over from another run) with rows of models 0-3 again
    stray = writer.shard_path(7)
    stray.write_bytes(writer.shard_path(0).read_bytes())
    rec = json.loads(writer.record_path(0).read_text())
    writer.record_path(7).write_text(json.dumps({**rec, "shard": 7, "file": stray.name}))
    frame = open_zoo(tmp_path).frame()
    assert len(frame) == 16 and not frame.duplicated(["model_id", "epoch"]).any()
    assert stray not in open_zoo(tmp_path).shard_files()
    # a zoo still being written is refused, unless partial data is asked for
    manifest["status"] = "running"
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"not complete.*'running'.*partial=True"):
        open_zoo(tmp_path).frame()
    assert len(open_zoo(tmp_path, partial=True).frame()) == 16


def test_zoo_info_describes_a_zoo_still_being_written(tmp_path, capsys):
    from raysys import cli

    write_zoo(tmp_path, num_models=8, epochs=1, per_shard=4)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "status": "running"}))
    assert cli.main(["zoo", "info", str(tmp_path)]) == 0
    assert "(running)" in capsys.readouterr().out
