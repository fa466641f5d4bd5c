"""Weight matching and ``raysys zoo align``: an aligned copy computes the same functions, is a normal
zoo store, is closer to its template, and resumes after a crash to the uninterrupted result."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raysys import align, architectures, cli
from raysys.config import RaysysError, validate
from raysys.integrity import verify_zoo
from raysys.store import MANIFEST, META, SHARDS, ZooWriter, open_zoo, sha256_file, splits_for, weights_numpy
from raysys.zoo import ZooConfig, _manifest, expand, plan_shards, train_shard

TINY = {"name": "tiny-digits", "dataset": {"name": "digits"}, "arch": "cnn_s",
        "grid": {"init": "kaiming_uniform", "lr": 1e-2, "batch_size": 32}, "seeds": {"start": 1, "count": 10},
        "epochs": 3, "models_per_shard": 4}


def make_zoo(root: Path, data, **changes) -> Path:
    """A real zoo (real training, real manifest) written by the generate stage's own shard function, without Ray."""
    c = validate(ZooConfig, {**TINY, **changes})
    specs = expand(c)
    splits = splits_for(len(specs), c.split_seed)
    shards = plan_shards(specs, c.models_per_shard)
    writer = ZooWriter(root)
    writer.write_manifest(_manifest(c, data, shards, splits, "running"))
    records = {s.shard: train_shard(c.arch, s, specs, data, c.epochs, splits, writer) for s in shards}
    writer.write_manifest(_manifest(c, data, shards, splits, "complete", records))
    return root


@pytest.fixture(scope="module")
def zoos(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("align")
    src = make_zoo(root / "src", digits)
    result = align.align_zoo(src, root / "aligned", template_epochs=2, rounds=2)
    return {"root": root, "src": src, "dst": root / "aligned", "result": result}


def shard_digests(zoo: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted([*(zoo / SHARDS).glob("shard-*"), *(zoo / META).glob("shard-*")])}


def random_perms(layout, seed):
    rng = np.random.default_rng(seed)
    return [rng.permutation(l.out_units) for l in layout.layers[:-1]]


def logits(arch: str, layout, w: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    model = architectures.build(arch, "tanh", 0.0, layout.in_channels, layout.num_classes).eval()
    with torch.no_grad():
        return architectures.unflatten(torch.as_tensor(w), model)(x)


# --- the primitives ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_every_aligned_state_computes_the_same_outputs(zoos, digits):
    src, dst = open_zoo(zoos["src"]), open_zoo(zoos["dst"])
    w_src, f_src = src.weights()
    w_dst, f_dst = dst.weights()
    assert f_src[["model_id", "epoch"]].equals(f_dst[["model_id", "epoch"]])
    x = digits.x_test[:300]
    assert set(f_src.split) == {"train", "val", "test"} and set(f_src.epoch) == {0, 1, 2, 3}
    for r in range(len(w_src)):  # every model of every split at every epoch
        a, b = logits("cnn_s", src.layout, w_src[r], x), logits("cnn_s", src.layout, w_dst[r], x)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        assert torch.equal(a.argmax(1), b.argmax(1))
    assert np.abs(w_dst - w_src).max() > 0.1  # and the weights did move


@pytest.mark.parametrize("arch", ["tetris_ffn", "cnn_s", "cnn_m"])
@given(seed=st.integers(0, 10 ** 6))
@settings(max_examples=5, deadline=None)
def test_a_permuted_copy_aligns_back_onto_its_original_exactly(arch, seed):
    in_ch, classes = (1, 4) if arch == "tetris_ffn" else (3, 10) if arch == "cnn_m" else (1, 10)
    layout = architectures.layout_of(arch, in_ch, classes)
    model = architectures.build(arch, "tanh", 0.0, in_ch, classes)
    architectures.init_model(model, "kaiming_uniform", torch.Generator().manual_seed(seed))
    w = architectures.flatten(model)
    copies = torch.stack([align.permute_units(w, layout, random_perms(layout, seed + k)) for k in range(3)])
    assert (copies - w).norm(dim=1).max() > 0.1  # not vacuous (a single copy may draw the identity: 1 in 120 for tetris)
    torch.testing.assert_close(align.align_onto(copies, w, layout), w.expand(3, -1), atol=0, rtol=0)
    torch.testing.assert_close(align.align_to(copies[0], w[None], layout)[0], w, atol=0, rtol=0)


@pytest.mark.slow
def test_template_is_built_from_training_states_of_the_last_epochs_only(zoos):
    src = open_zoo(zoos["src"])
    W, meta = src.weights(epochs=[2, 3], splits=["train"])
    order = np.lexsort((-meta["epoch"].to_numpy(), meta["model_id"].to_numpy()))
    expected = align.build_template(W[order], src.layout, rounds=2)
    stored = align._load_template(zoos["dst"] / META / align.TEMPLATE_FILE, src.num_params)
    np.testing.assert_array_equal(stored, expected)
    assert zoos["result"]["template_epochs"] == [2, 3]


# --- the aligned zoo is a normal zoo ---------------------------------------------------------------

@pytest.mark.slow
def test_aligned_zoo_verifies_and_keeps_every_row_split_and_metric(zoos):
    report = verify_zoo(zoos["dst"])
    assert report.ok, report.format()
    src, dst = open_zoo(zoos["src"]), open_zoo(zoos["dst"])
    a, b = src.frame(), dst.frame()
    assert list(a.columns) == list(b.columns)
    pd.testing.assert_frame_equal(a, b)  # (model_id, epoch) rows, splits, every metric and hyperparameter
    assert dst.manifest["splits"] == src.manifest["splits"] and dst.manifest["epochs"] == src.manifest["epochs"]
    rec = dst.manifest["aligned"]
    assert rec["source"] == str(zoos["src"].resolve())
    assert rec["template_epochs"] == [2, 3] and rec["rounds"] == 2 and rec["template_split"] == "train"
    assert rec["source_fingerprint"] == align.source_fingerprint(src)
    assert dst.manifest["status"] == "complete" and dst.manifest["name"] == "tiny-digits-aligned"


@pytest.mark.slow
def test_aligned_states_are_closer_to_the_template(zoos):
    template = align._load_template(zoos["dst"] / META / align.TEMPLATE_FILE, open_zoo(zoos["src"]).num_params)
    for epochs in ([0], [3]):
        before = np.linalg.norm(open_zoo(zoos["src"]).weights(epochs=epochs)[0] - template, axis=1).mean()
        after = np.linalg.norm(open_zoo(zoos["dst"]).weights(epochs=epochs)[0] - template, axis=1).mean()
        assert after < 0.95 * before, (epochs, before, after)
    r = zoos["result"]
    assert r["mean_l2_to_template_after"] < r["mean_l2_to_template_before"]
    assert r["states"] == 10 * 4 and r["shards_written"] == 3 and r["shards_skipped"] == 0


# --- resume and refusal ----------------------------------------------------------------------------

@pytest.mark.slow
def test_rerun_after_a_crash_or_a_lost_shard_ends_identical(zoos, monkeypatch):
    dst = zoos["root"] / "resume"
    calls = {"n": 0}
    real = ZooWriter.write_shard

    def crash_on_second(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process dies here: one shard written, the second not
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ZooWriter, "write_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        align.align_zoo(zoos["src"], dst, template_epochs=2, rounds=2)
    monkeypatch.setattr(ZooWriter, "write_shard", real)
    assert not verify_zoo(dst).ok
    (dst / SHARDS / ".shard-00002.parquet.deadbeef.tmp").write_bytes(b"half a shard")
    r = align.align_zoo(zoos["src"], dst, template_epochs=2, rounds=2)
    assert (r["shards_skipped"], r["shards_written"]) == (1, 2)
    assert shard_digests(dst) == shard_digests(zoos["dst"])
    assert json.loads((dst / MANIFEST).read_text())["shards"] == \
        json.loads((zoos["dst"] / MANIFEST).read_text())["shards"]
    assert not list(dst.rglob("*.tmp"))

    (dst / SHARDS / "shard-00001.parquet").unlink()
    assert not verify_zoo(dst).ok
    r = align.align_zoo(zoos["src"], dst, template_epochs=2, rounds=2)
    assert (r["shards_skipped"], r["shards_written"]) == (2, 1)
    assert shard_digests(dst) == shard_digests(zoos["dst"]) and verify_zoo(dst).ok

    (dst / META / align.TEMPLATE_FILE).unlink()  # lost template: recomputed, and every shard is redone with it
    r = align.align_zoo(zoos["src"], dst, template_epochs=2, rounds=2)
    assert (r["shards_skipped"], r["shards_written"]) == (0, 3)
    assert shard_digests(dst) == shard_digests(zoos["dst"])


@pytest.mark.slow
def test_other_options_other_source_or_a_generated_zoo_are_refused(zoos, digits):
    with pytest.raises(RaysysError, match=r"different options.*rounds: 2 -> 3.*--template-epochs 2 --rounds 2.*new --out"):
        align.align_zoo(zoos["src"], zoos["dst"], template_epochs=2, rounds=3)
    with pytest.raises(RaysysError, match=r"template_epochs"):
        align.align_zoo(zoos["src"], zoos["dst"], template_epochs=3, rounds=2)
    other = zoos["root"] / "other"
    shutil.copytree(zoos["src"], other)
    manifest = json.loads((other / MANIFEST).read_text())
    (other / MANIFEST).write_text(json.dumps({**manifest, "split_seed": 1}))  # not the same zoo any more
    with pytest.raises(RaysysError, match="different source zoo"):
        align.align_zoo(other, zoos["dst"], template_epochs=2, rounds=2)
    with pytest.raises(RaysysError, match="not an aligned copy"):
        align.align_zoo(zoos["src"], other, template_epochs=2, rounds=2)
    with pytest.raises(RaysysError, match="source zoo itself"):
        align.align_zoo(zoos["src"], zoos["src"])
    with pytest.raises(RaysysError, match="template-epochs 4 or fewer"):  # epochs 0-3 exist
        align.align_zoo(zoos["src"], zoos["root"] / "new", template_epochs=9)
    with pytest.raises(RaysysError, match="rounds"):
        align.align_zoo(zoos["src"], zoos["root"] / "new", rounds=0)
    assert not (zoos["root"] / "new").exists()
    from raysys.zoo import _check_resume

    with pytest.raises(RaysysError, match="aligned copy .*raysys zoo align"):
        _check_resume(zoos["dst"], validate(ZooConfig, TINY))


@pytest.mark.slow
def test_a_damaged_source_is_refused(zoos):
    broken = zoos["root"] / "broken"
    shutil.copytree(zoos["src"], broken)
    with open(broken / SHARDS / "shard-00001.parquet", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(RaysysError, match=r"not intact.*raysys zoo verify"):
        align.align_zoo(broken, zoos["root"] / "from-broken")
    assert not (zoos["root"] / "from-broken").exists()


@pytest.mark.slow
def test_cli_aligns_resumes_and_verify_names_the_align_command(zoos, capsys):
    dst = zoos["root"] / "cli"
    assert cli.main(["zoo", "align", str(zoos["src"]), "--out", str(dst), "--template-epochs", "2",
                     "--rounds", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "40 states" in out and "3 written" in out and "L2 to template" in out
    assert shard_digests(dst) == shard_digests(zoos["dst"])
    assert cli.main(["zoo", "align", str(zoos["src"]), "--out", str(dst), "--template-epochs", "2", "--rounds", "2"]) == 0
    assert "0 written, 3 already complete" in capsys.readouterr().out
    assert cli.main(["zoo", "verify", str(dst)]) == 0
    (dst / SHARDS / "shard-00000.parquet").unlink()
    assert cli.main(["zoo", "verify", str(dst)]) == 1
    assert f"raysys zoo align {zoos['src'].resolve()} --out {dst}" in capsys.readouterr().out
    assert cli.main(["zoo", "info", str(zoos["dst"])]) == 0


@pytest.mark.slow
def test_diverged_states_are_copied_unchanged(tmp_path, digits):
    """A NaN model (a diverged run) cannot be matched: it must neither poison the template nor stop the copy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = make_zoo(tmp_path / "src", digits, seeds={"start": 1, "count": 4}, epochs=1)
    path = src / SHARDS / "shard-00000.parquet"
    t = pq.read_table(path)
    W = weights_numpy(t.column("weights")).copy()
    W[t.column("model_id").to_numpy() == 0] = np.nan
    field = t.schema.field("weights")
    column = pa.FixedSizeListArray.from_arrays(pa.array(W.reshape(-1)), W.shape[1])
    record = ZooWriter(src).write_shard(0, t.set_column(t.schema.get_field_index("weights"), field, column), range(4))
    manifest = json.loads((src / MANIFEST).read_text())
    manifest["shards"][0]["sha256"] = record["sha256"]
    (src / MANIFEST).write_text(json.dumps(manifest))
    assert verify_zoo(src).ok

    r = align.align_zoo(src, tmp_path / "dst", template_epochs=1, rounds=1)
    assert r["diverged_states_copied"] == 2 and r["states"] == 8
    w, f = open_zoo(tmp_path / "dst").weights()
    assert np.isnan(w[f.model_id.to_numpy() == 0]).all() and np.isfinite(w[f.model_id.to_numpy() != 0]).all()
    assert verify_zoo(tmp_path / "dst").ok
