"""Hyper-representation evaluation end to end: a tiny real zoo (Parquet store), a briefly trained
autoencoder checkpoint, `raysys hyperrep eval` through the CLI, real MLflow (sqlite)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings, strategies as st
from sklearn.metrics import r2_score

from raysys import architectures, datasets
from raysys.architectures import layout_of
from raysys.config import RaysysError
from raysys.population import train_population
from raysys.store import ZooWriter, open_zoo, rows_table, splits_for
from raysys.train import ModelSpec, evaluate as evaluate_model

EPOCHS = 3


def write_tiny_zoo(root, per_activation: int = 10):
    """20 tetris FFNs, 3 epochs: init, lr and activation vary, so every probe kind has a target."""
    data = datasets.load("tetris")
    layout = layout_of("tetris_ffn", data.in_channels, data.num_classes, data.image_size)
    writer = ZooWriter(root)
    writer.write_manifest({"arch": "tetris_ffn", "layout": layout.to_dict(), "dataset": data.describe(), "config": {}})
    n = 2 * per_activation
    splits = splits_for(n, seed=0)
    for shard, act in enumerate(("tanh", "relu")):
        ids = range(shard * per_activation, (shard + 1) * per_activation)
        specs = [ModelSpec(i, seed=i, init=("kaiming_uniform", "xavier_normal")[i % 2], activation=act,
                           lr=(3e-3, 1e-2)[(i // 2) % 2]) for i in ids]
        tables = []
        train_population("tetris_ffn", specs, data, EPOCHS, lambda e, w, m: tables.append(rows_table(
            layout.num_params, list(ids), e, [splits[i] for i in ids], w.numpy(), m,
            [s.hyperparameters() for s in specs])))
        writer.write_shard(shard, pa.concat_tables(tables), ids)
    return root


@pytest.fixture(scope="module")
def one_thread():
    # Tiny tensors: on a shared 2-core machine, torch's intra-op threads only add contention
    # (measured 40x slower zoo training under load with the default thread count).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    from raysys.hyperrep.train import train

    root = tmp_path_factory.mktemp("hyperrep_eval")
    zoo = write_tiny_zoo(root / "zoo")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = {"model": {"d_model": 16, "heads": 2, "layers": 1, "ff": 32, "latent_dim": 8, "projection_dim": 8},
           "train": {"epoch_window": [1, EPOCHS], "epochs": 2, "batch_size": 16, "lr": 3e-3, "device": "cpu"}}
    summary = train(cfg, zoo, root / "ckpt", tracking_uri=uri, progress=False)
    return {"root": root, "zoo": zoo, "ckpt": root / "ckpt", "uri": uri, "summary": summary}


def test_eval_cli_end_to_end(trained, capsys):
    from raysys.cli import main
    from raysys.hyperrep.model import HyperRepresentation

    out = trained["root"] / "eval"
    rc = main(["hyperrep", "eval", "--checkpoint", str(trained["ckpt"]), "--zoo", str(trained["zoo"]),
               "--out", str(out), "--ood-zoo", str(trained["zoo"]), "--tracking-uri", trained["uri"]])
    assert rc == 0
    assert "reconstruction R²" in capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    for name in ("eval.json", "probes.csv", "accuracy.csv", "reconstruction.png", "latent_pca.png"):
        assert (out / name).stat().st_size > 0
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporaries

    # Reconstruction R² against an independent computation on the same test rows.
    zoo = open_zoo(trained["zoo"])
    w, frame = zoo.weights(epochs=range(1, EPOCHS + 1), splits=["test"])
    hr = HyperRepresentation.load(trained["ckpt"])
    w_hat = hr.decode(hr.encode(w))
    rec = result["reconstruction"]
    assert rec["epochs"] == list(range(1, EPOCHS + 1)) and rec["rows"] == len(w)
    assert rec["r2"] == pytest.approx(r2_score(w, w_hat, multioutput="variance_weighted"), abs=1e-5)
    layout = zoo.layout
    for t in layout.tensors:
        cols = slice(t.offset, t.offset + t.numel)
        assert rec["r2_per_tensor"][t.name] == pytest.approx(
            r2_score(w[:, cols], w_hat[:, cols], multioutput="variance_weighted"), abs=1e-5)

    # Accuracies: originals reproduce the training loop's stored test accuracy; a decoded model's
    # accuracy matches loading its weights by hand and evaluating with the training code.
    acc = pd.read_csv(out / "accuracy.csv")
    np.testing.assert_allclose(acc["original_test_acc"], acc["stored_test_acc"], atol=1e-9)
    assert result["accuracy"]["original"]["mean"] == pytest.approx(frame["test_acc"].mean())
    data = datasets.load("tetris")
    row = acc.iloc[0]
    i = int(np.flatnonzero((frame["model_id"] == row.model_id) & (frame["epoch"] == row.epoch))[0])
    model = architectures.build("tetris_ffn", frame["activation"][i], 0.0, 1, 4)
    architectures.unflatten(torch.as_tensor(w_hat[i]), model)
    assert row.decoded_test_acc == pytest.approx(evaluate_model(model, data)["test_acc"])
    decoded = result["accuracy"]["decoded"]
    assert decoded["mean"] == pytest.approx(acc["decoded_test_acc"].mean())
    assert decoded["near_chance"] == pytest.approx(np.mean(acc["decoded_test_acc"] < 0.25 + 0.05))

    # Probe table: every varying target x {z, W, s(W)}, in and out of distribution.
    probes = pd.read_csv(out / "probes.csv")
    ind = probes[probes.evaluation == "in_distribution"]
    assert set(ind.target) == {"test_acc", "ggap", "epoch", "lr", "init", "activation"}
    assert set(ind.features) == {"z", "W", "s(W)"}
    assert set(ind[ind.task == "classification"].target) == {"init", "activation"}
    ood = probes[probes.evaluation == "out_of_distribution"]
    assert set(ood.metric) == {"r2", "kendall_tau"} and set(ood.features) == {"z", "W", "s(W)"}
    assert result["probes"]["r2"]["test_acc"].keys() == {"z", "W", "s(W)"}

    # MLflow: one evaluation run, tagged with the checkpoint, carrying metrics and artifacts.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(trained["uri"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["raysys.checkpoint"] == str(trained["ckpt"].resolve())
    assert run.data.metrics["recon/r2"] == pytest.approx(rec["r2"])
    assert "probe/r2/test_acc/sW" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "eval.json", "probes.csv", "accuracy.csv", "reconstruction.png", "latent_pca.png"}


def test_eval_cli_bad_checkpoint_is_a_clear_error(trained, capsys, tmp_path):
    from raysys.cli import main

    rc = main(["hyperrep", "eval", "--checkpoint", str(tmp_path / "nope"), "--zoo", str(trained["zoo"]),
               "--out", str(tmp_path / "out"), "--tracking-uri", trained["uri"]])
    assert rc == 2
    assert "not a hyper-representation checkpoint" in capsys.readouterr().err


def test_zoo_dataset_refuses_different_images(trained):
    from raysys.hyperrep.evaluate import zoo_dataset

    manifest = open_zoo(trained["zoo"]).manifest
    assert zoo_dataset(manifest).describe()["sha256_16"] == manifest["dataset"]["sha256_16"]
    changed = {**manifest, "dataset": {**manifest["dataset"], "sha256_16": {"test": "0" * 16}}}
    with pytest.raises(RaysysError, match="differ from the ones the zoo was trained on"):
        zoo_dataset(changed)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 6), seed=st.integers(0, 10_000), noise=st.floats(0.0, 2.0))
def test_reconstruction_r2_properties(n, seed, noise):
    from raysys.hyperrep.evaluate import reconstruction_r2

    layout = layout_of("tetris_ffn", num_classes=4)
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n, layout.num_params))
    assert reconstruction_r2(w, w, layout)["overall"] == pytest.approx(1.0)
    assert reconstruction_r2(w, np.broadcast_to(w.mean(0), w.shape), layout)["overall"] == pytest.approx(0.0, abs=1e-9)
    noisy = w + noise * rng.normal(size=w.shape)
    got = reconstruction_r2(w, noisy, layout)
    assert got["overall"] == pytest.approx(r2_score(w, noisy, multioutput="variance_weighted"))
    assert got["per_layer"]["fc1"] == pytest.approx(got["per_tensor"]["fc1.weight"])  # no biases in tetris_ffn
