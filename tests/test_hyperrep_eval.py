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
from raysys.batched_trainer import train_population
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
        def keep(e, w, m, ids=ids, specs=specs, tables=tables):  # bound now, not at the loop's end
            tables.append(rows_table(layout.num_params, list(ids), e, [splits[i] for i in ids], w.numpy(), m,
                                     [s.hyperparameters() for s in specs]))
        train_population("tetris_ffn", specs, data, EPOCHS, keep)
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


@pytest.mark.slow
def test_eval_cli_end_to_end(trained, capsys):
    from raysys.cli import main
    from raysys.hyperrep.model import HyperRepresentation

    out = trained["root"] / "eval"
    rc = main(["hyperrep", "eval", "--checkpoint", str(trained["ckpt"]), "--zoo", str(trained["zoo"]),
               "--out", str(out), "--ood-zoo", str(trained["zoo"]), "--tracking-uri", trained["uri"]])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "reconstruction R²" in printed
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

    # Yardsticks against an independent computation: the train split's states in the checkpoint's
    # epoch window (the autoencoder's own training data), sklearn PCA with k = latent_dim, r2_score.
    from sklearn.decomposition import PCA
    from raysys.hyperrep.data import load_window

    w_train = load_window(zoo, tuple(hr.config.train.epoch_window))["train"].numpy().astype(np.float64)
    sticks = rec["yardsticks"]
    assert sticks["fit"] == {"split": "train", "epochs": [1, 2, 3], "rows": len(w_train), "source": "train.epoch_window"}
    k = hr.config.model.latent_dim
    pca = PCA(n_components=k).fit(w_train)
    w_pca = pca.inverse_transform(pca.transform(w.astype(np.float64)))
    mu = w_train.mean(axis=0)
    assert sticks["pca"]["k"] == k
    assert sticks["pca"]["r2"] == pytest.approx(r2_score(w, w_pca, multioutput="variance_weighted"), abs=1e-6)
    assert sticks["mean"]["r2"] == pytest.approx(
        r2_score(w, np.broadcast_to(mu, w.shape), multioutput="variance_weighted"), abs=1e-9)
    assert sticks["mean"]["r2"] < 0  # the train mean is not the test split's own mean
    for name, pred in (("pca", w_pca), ("ae", w_hat)):
        got = rec["r2_ref"] if name == "ae" else sticks["pca"]["r2_ref"]
        assert got == pytest.approx(1 - np.sum((w - pred) ** 2) / np.sum((w - mu) ** 2), abs=1e-5)
    assert sticks["mean"]["r2_ref"] == pytest.approx(0.0, abs=1e-12)
    for l in layout.layers:
        cols = slice(layout.tensor(l.weight).offset, layout.tensor(l.weight).offset + layout.tensor(l.weight).numel)
        assert sticks["pca"]["r2_per_layer"][l.name] == pytest.approx(
            r2_score(w[:, cols], w_pca[:, cols], multioutput="variance_weighted"), abs=1e-6)
    assert set(rec["r2_ref_per_layer"]) == set(sticks["mean"]["r2_per_layer"]) == {l.name for l in layout.layers}
    assert result["beats_pca"] is bool(rec["r2"] > sticks["pca"]["r2"])
    assert result["beats_mean"] is bool(rec["r2"] > sticks["mean"]["r2"])
    assert f"PCA-{k}'s {sticks['pca']['r2']:.3f}" in result["verdict"]
    assert ("below" in result["verdict"]) is (not result["beats_pca"])
    assert result["verdict"] in printed
    assert result["zoo_aligned"] is False and result["alignment"] is None

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
    # PCA-k reconstructions and the train-mean model, each loaded and evaluated by hand.
    model = architectures.build("tetris_ffn", frame["activation"][i], 0.0, 1, 4)
    architectures.unflatten(torch.as_tensor(w_pca[i], dtype=torch.float32), model)
    assert row.pca_test_acc == pytest.approx(evaluate_model(model, data)["test_acc"])
    assert result["accuracy"]["pca"]["mean"] == pytest.approx(acc["pca_test_acc"].mean())
    mean_model = result["accuracy"]["mean_model"]
    assert mean_model["per_activation"].keys() == {"tanh", "relu"} and mean_model["zoo_aligned"] is False
    for act, value in mean_model["per_activation"].items():
        model = architectures.build("tetris_ffn", act, 0.0, 1, 4)
        architectures.unflatten(torch.as_tensor(mu, dtype=torch.float32), model)
        assert value == pytest.approx(evaluate_model(model, data)["test_acc"])
        assert (acc.loc[acc.activation == act, "mean_model_test_acc"] == value).all()
    assert mean_model["mean"] == pytest.approx(acc["mean_model_test_acc"].mean())

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
    for key, value in {"recon/pca/r2": sticks["pca"]["r2"], "recon/mean/r2": sticks["mean"]["r2"],
                       "recon/r2_ref": rec["r2_ref"], "recon/pca/r2_ref": sticks["pca"]["r2_ref"],
                       "recon/pca/k": k, "recon/beats_pca": float(result["beats_pca"]),
                       "acc/pca/mean": result["accuracy"]["pca"]["mean"],
                       "acc/mean_model/mean": mean_model["mean"]}.items():
        assert run.data.metrics[key] == pytest.approx(value), key
    assert run.data.metrics["recon/pca/r2_layer/fc1"] == pytest.approx(sticks["pca"]["r2_per_layer"]["fc1"])
    assert run.data.metrics["recon/r2_layer/fc2"] == pytest.approx(rec["r2_per_layer"]["fc2"])
    assert run.data.metrics["recon/r2/fc1.weight"] == pytest.approx(rec["r2_per_tensor"]["fc1.weight"])
    assert run.data.tags["raysys.verdict"] == result["verdict"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "eval.json", "probes.csv", "accuracy.csv", "reconstruction.png", "latent_pca.png"}


@pytest.mark.slow
def test_eval_cli_bad_checkpoint_is_a_clear_error(trained, capsys, tmp_path):
    from raysys.cli import main

    rc = main(["hyperrep", "eval", "--checkpoint", str(tmp_path / "nope"), "--zoo", str(trained["zoo"]),
               "--out", str(tmp_path / "out"), "--tracking-uri", trained["uri"]])
    assert rc == 2
    assert "not a hyper-representation checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_zoo_dataset_refuses_different_images(trained):
    from raysys.store import zoo_dataset

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


@settings(max_examples=10, deadline=None)
@given(n_train=st.integers(12, 40), n_test=st.integers(3, 12), k=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_yardsticks_match_sklearn(n_train, n_test, k, seed):
    """PCA-k and the train-mean predictor against sklearn PCA and r2_score, computed independently."""
    from sklearn.decomposition import PCA
    from raysys.hyperrep.evaluate import yardsticks

    layout = layout_of("tetris_ffn", num_classes=4)
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(6, layout.num_params))  # low-rank signal + noise: PCA has something to find
    draw = lambda n: rng.normal(size=(n, 6)) @ basis + 0.3 * rng.normal(size=(n, layout.num_params))  # noqa: E731
    w_train, w_test = draw(n_train), draw(n_test)
    got, preds = yardsticks(w_train, w_test, layout, k)

    pca = PCA(n_components=k).fit(w_train)
    w_pca = pca.inverse_transform(pca.transform(w_test))
    np.testing.assert_allclose(preds["pca"], w_pca, atol=1e-8)
    assert got["pca"]["k"] == k
    assert got["pca"]["r2"] == pytest.approx(r2_score(w_test, w_pca, multioutput="variance_weighted"), abs=1e-9)
    for l in layout.layers:
        t = layout.tensor(l.weight)
        cols = slice(t.offset, t.offset + t.numel)
        assert got["pca"]["r2_per_layer"][l.name] == pytest.approx(
            r2_score(w_test[:, cols], w_pca[:, cols], multioutput="variance_weighted"), abs=1e-9)
    mu = w_train.mean(axis=0)
    ss_ref = np.sum((w_test - mu) ** 2)
    assert got["pca"]["r2_ref"] == pytest.approx(1 - np.sum((w_test - w_pca) ** 2) / ss_ref, abs=1e-9)

    # The mean predictor: exactly r2_score of the broadcast train mean, and negative by the gap
    # between the train and test means: R² = −n_test·‖μ_train − μ_test‖² / SST_test.
    mean_r2 = r2_score(w_test, np.broadcast_to(mu, w_test.shape), multioutput="variance_weighted")
    assert got["mean"]["r2"] == pytest.approx(mean_r2, abs=1e-12)
    sst = np.sum((w_test - w_test.mean(0)) ** 2)
    assert got["mean"]["r2"] == pytest.approx(-n_test * np.sum((mu - w_test.mean(0)) ** 2) / sst, abs=1e-9)
    assert got["mean"]["r2"] < 0
    assert got["mean"]["r2_ref"] == pytest.approx(0.0, abs=1e-12)


def test_mean_predictor_r2_size_and_ref_convention_on_train():
    """iid data: the train-mean predictor scores about −(n_test/n_train + 1)/(n_test − 1) on test
    (E‖μ_train − μ_test‖² = σ²(1/n_train + 1/n_test) per parameter); on the training split itself
    R²_ref of the train mean is 0 by construction and R²_ref equals the ordinary R² (same mean)."""
    from raysys.hyperrep.evaluate import yardsticks

    layout = layout_of("tetris_ffn", num_classes=4)
    rng = np.random.default_rng(0)
    n_train, n_test, reps = 30, 10, 40
    values = [yardsticks(rng.normal(size=(n_train, layout.num_params)), rng.normal(size=(n_test, layout.num_params)),
                       layout, 4)[0]["mean"]["r2"] for _ in range(reps)]
    expected = -(n_test / n_train + 1) / (n_test - 1)
    assert np.mean(values) == pytest.approx(expected, rel=0.1)

    w_train = rng.normal(size=(n_train, layout.num_params))
    on_train, _ = yardsticks(w_train, w_train, layout, 4)
    assert on_train["mean"]["r2_ref"] == pytest.approx(0.0, abs=1e-12)
    assert on_train["mean"]["r2"] == pytest.approx(0.0, abs=1e-12)
    assert on_train["pca"]["r2_ref"] == pytest.approx(on_train["pca"]["r2"], abs=1e-12)
    assert on_train["pca"]["r2"] == pytest.approx(on_train["pca"]["explained_variance_train"], abs=1e-9)


def test_verdict_says_when_the_autoencoder_loses_to_pca():
    from raysys.hyperrep.evaluate import _verdict

    sticks = {"pca": {"k": 16, "r2": 0.39}, "mean": {"r2": -0.01}}
    lose = _verdict(0.15, sticks)
    assert lose["beats_pca"] is False and lose["beats_mean"] is True
    assert lose["verdict"] == "autoencoder test R² 0.150 is below PCA-16's 0.390"
    win = _verdict(0.6, sticks)
    assert win["beats_pca"] is True and "above PCA-16's" in win["verdict"]
    worse = _verdict(-0.2, sticks)
    assert worse["beats_mean"] is False and "not above the train-mean predictor's -0.010" in worse["verdict"]


@pytest.mark.slow
def test_baselines_cli_matches_sklearn_and_brute_force(trained, capsys, tmp_path):
    """`raysys hyperrep baselines` fits PCA-k and the mean on the train split's window and scores the test split;
    the nearest-training-state row is the closest training row in L2."""
    from sklearn.decomposition import PCA

    from raysys.cli import main
    from raysys.hyperrep.data import load_window

    out = tmp_path / "baselines.json"
    assert main(["hyperrep", "baselines", str(trained["zoo"]), "--k", "2", "4", "--window", "1", str(EPOCHS),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PCA-4" in printed and "nearest training state" in printed
    result = json.loads(out.read_text())
    rows = {r["baseline"]: r for r in result["baselines"]}
    dim = result["intrinsic_dimension"]
    assert dim is None or (dim["twonn"] > 0 and dim["twonn_gaussian"] > 0)
    data = load_window(open_zoo(trained["zoo"]), (1, EPOCHS))
    tr, te = data["train"].double().numpy(), data["test"].double().numpy()
    for k in (2, 4):
        pca = PCA(k).fit(tr)
        want = r2_score(te, pca.inverse_transform(pca.transform(te)), multioutput="variance_weighted")
        assert rows[f"PCA-{k}"]["r2"] == pytest.approx(want, abs=1e-9)
    assert rows["PCA-4"]["r2"] > rows["PCA-2"]["r2"] > rows["train-mean predictor"]["r2"]
    assert rows["train-mean predictor"]["r2"] == pytest.approx(
        r2_score(te, np.broadcast_to(tr.mean(0), te.shape), multioutput="variance_weighted"))
    nearest = tr[np.argmin([[np.sum((t - x) ** 2) for x in tr] for t in te], axis=1)]
    assert rows["nearest training state"]["r2"] == pytest.approx(
        r2_score(te, nearest, multioutput="variance_weighted"), abs=1e-9)


def test_twonn_finds_a_curved_low_dimensional_set_and_a_gaussian_ceiling():
    """TwoNN reads the dimension of a curved 5-dim set in R^60 as about 5, while a Gaussian of the same
    covariance reads far higher; a Gaussian sample is its own surrogate (the near-Gaussian verdict)."""
    from raysys.hyperrep.evaluate import gaussian_ceiling, twonn_dimension

    rng = np.random.default_rng(0)
    curved = np.tanh(rng.normal(size=(800, 5)) @ rng.normal(size=(5, 60)))  # a 5-dim curved set in R^60
    assert 4 < twonn_dimension(curved) < 8
    ceiling = gaussian_ceiling(curved, draws=2)
    assert ceiling["twonn"] < 0.5 * ceiling["twonn_gaussian"]
    gauss = rng.normal(size=(800, 20)) * np.linspace(0.5, 2, 20)
    same = gaussian_ceiling(gauss, draws=3)
    assert abs(same["twonn"] - same["twonn_gaussian"]) < 3 * same["twonn_gaussian_sd"] + 1.0
