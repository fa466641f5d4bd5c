"""Decoding, fine-tuning on Ray actors, and the whole populations stage on a tiny real zoo."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raysys import architectures, datasets
from raysys.config import RaysysError, load, validate
from raysys.batched_trainer import train_population
from raysys.populations import codec, finetune
from raysys.populations.config import PopulationsConfig
from raysys.populations.stage import run_populations
from raysys.store import ZooWriter, open_zoo, rows_table, splits_for
from raysys.train import ModelSpec, evaluate

ROOT = Path(__file__).resolve().parents[1]
ZOO_MODELS, ZOO_EPOCHS = 20, 3


class PCAAutoencoder:
    """A real linear autoencoder (PCA over the anchors' weights) with the encode/decode protocol
    of :class:`raysys.hyperrep.HyperRepresentation`: small, fast and exactly invertible on its span."""

    def __init__(self, weights: np.ndarray, latent_dim: int, layout):
        self.layout = layout
        self.mean = weights.mean(0)
        _, _, vt = np.linalg.svd(weights - self.mean, full_matrices=False)
        self.components = vt[:latent_dim]

    def encode(self, w):
        return (np.asarray(w) - self.mean) @ self.components.T

    def decode(self, z):
        return np.asarray(z) @ self.components + self.mean


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    """A real zoo on disk: 20 tetris FFNs, 3 epochs, written through the store."""
    root = tmp_path_factory.mktemp("zoo")
    data = datasets.load("tetris")
    layout = architectures.layout_of("tetris_ffn", 1, 4)
    specs = [ModelSpec(model_id=i, seed=100 + i, init="kaiming_uniform", activation="tanh", lr=0.05, batch_size=32)
             for i in range(ZOO_MODELS)]
    splits = splits_for(ZOO_MODELS, 0)
    tables = []
    hparams = [s.hyperparameters() for s in specs]
    train_population("tetris_ffn", specs, data, ZOO_EPOCHS,
                     lambda e, w, m: tables.append(rows_table(layout.num_params, range(ZOO_MODELS), e, splits,
                                                              w.numpy(), m, hparams)))
    writer = ZooWriter(root)
    writer.write_manifest({"arch": "tetris_ffn", "layout": layout.to_dict(), "dataset": data.describe(),
                           "config": {}})
    import pyarrow as pa
    writer.write_shard(0, pa.concat_tables(tables), range(ZOO_MODELS))
    return root


def tiny_config(**overrides) -> PopulationsConfig:
    base = {"num_models": 4, "zoo_epochs": [2, 3],
            "methods": ["S_KDE", "S_KDE30", "B_KDE30", "B_T", "B_noise_0.02"],
            "finetune": {"budgets": [0, 1, 2], "num_actors": 2, "lr": 0.01, "batch_size": 32},
            "transfer": {"dataset": "tetris", "dataset_options": {"seed": 1, "noise": 0.3},
                         "methods": ["S_KDE30", "B_F"]}}
    base.update(overrides)
    return validate(PopulationsConfig, base)


@pytest.mark.slow
def test_decoded_population_loads_and_evaluates(tiny_zoo):
    zoo = open_zoo(tiny_zoo)
    W, meta = zoo.weights(epochs=[3], splits=["train"])
    ae = PCAAutoencoder(W, len(W), zoo.layout)  # full rank: decoding reproduces the zoo's weights
    Z = codec.encode(ae, W, zoo.layout, batch_size=5)
    assert Z.shape == (len(W), len(W))
    decoded = codec.decode(ae, Z, zoo.layout, batch_size=3)  # batches must not change the result
    np.testing.assert_allclose(decoded, codec.decode(ae, Z, zoo.layout), rtol=1e-6, atol=1e-6)
    data = datasets.load("tetris")
    models = codec.load_models(zoo.layout, decoded, "tanh")
    accs = np.array([evaluate(m, data)["test_acc"] for m in models])
    # Loaded into the architecture, decoded models behave exactly as the zoo recorded them.
    np.testing.assert_allclose(accs, meta["test_acc"].to_numpy(), atol=1e-9)
    assert accs.mean() > 0.3  # above chance (0.25): trained models, not noise
    wrong = architectures.layout_of("cnn_s", 1, 10)
    with pytest.raises(RaysysError, match="cnn_s"):
        codec.decode(ae, Z, wrong)


@pytest.mark.slow
def test_finetune_epoch_zero_is_evaluation_only(tiny_zoo):
    data = datasets.load("tetris")
    zoo = open_zoo(tiny_zoo)
    W, _ = zoo.weights(epochs=[3], splits=["train"])
    specs = [ModelSpec(model_id=i, seed=7 + i, init="kaiming_uniform", lr=0.01, batch_size=32) for i in range(3)]
    res = finetune.finetune_population("tetris_ffn", specs, data, 2, W[:3], keep_epochs=(0, 2))
    np.testing.assert_array_equal(res["weights"][0], W[:3])
    for i in range(3):
        m = architectures.unflatten(torch.as_tensor(W[i]), architectures.build("tetris_ffn", "tanh", 0, 1, 4))
        assert res["metrics"]["test_acc"][0, i] == pytest.approx(evaluate(m, data)["test_acc"])
    assert res["metrics"]["test_acc"].shape == (3, 3)
    assert not np.allclose(res["weights"][2], W[:3])
    with pytest.raises(RaysysError, match="shape"):
        finetune.finetune_population("tetris_ffn", specs, data, 1, W[:2])


@pytest.mark.slow
def test_actors_return_per_epoch_accuracy_for_every_model(ray_local, tiny_zoo):
    zoo = open_zoo(tiny_zoo)
    W, _ = zoo.weights(epochs=[3], splits=["train"])
    specs = [ModelSpec(model_id=i, seed=11 + i, init="kaiming_uniform", lr=0.01, batch_size=32) for i in range(3)]
    jobs = [finetune.Job("B_T", "in_dataset", "tetris_ffn", "tetris", specs, epochs=2),
            finetune.Job("zoo", "transfer", "tetris_ffn", "tetris", specs, epochs=2, weights=W[:3],
                         dataset_options={"seed": 1})]
    seen = []
    results = finetune.run_jobs(jobs, num_actors=2, progress=False, on_result=lambda j, r: seen.append(j.key))
    assert sorted(seen) == ["in_dataset/B_T", "transfer/zoo"]
    for res in results:
        acc = res["metrics"]["test_acc"]
        assert acc.shape == (3, 3) and np.isfinite(acc).all() and ((0 <= acc) & (acc <= 1)).all()
    # Fresh inits start near chance (4 classes); trained zoo models start well above it.
    assert results[1]["metrics"]["test_acc"][0].mean() > results[0]["metrics"]["test_acc"][0].mean()


@pytest.mark.slow
def test_whole_stage_on_tiny_zoo(ray_local, tiny_zoo, tmp_path, mlflow_uri):
    zoo = open_zoo(tiny_zoo)
    W, _ = zoo.weights(epochs=[2, 3], splits=["train"])
    ae = PCAAutoencoder(W, 8, zoo.layout)
    weak = PCAAutoencoder(W, 2, zoo.layout)  # stands in for the autoencoder trained without LWLN
    out = tmp_path / "out"
    cfg = tiny_config(methods=["S_KDE", "S_KDE30", "B_KDE30", "B_T", "B_noise_0.02", "B_noise_novelty"])
    cfg.finetune.num_actors = 1  # one actor start-up: the two-actor pool is tested above
    res = run_populations(cfg, tiny_zoo, None, out, autoencoder=ae, nolwln_autoencoder=weak,
                          tracking_uri=mlflow_uri, progress=False)
    pops = {(p["setting"], p["name"]): p for p in res["populations"]}
    assert set(pops) == {("in_dataset", m) for m in ["S_KDE", "S_KDE30", "B_KDE30", "B_T", "B_noise_0.02",
                                                      "B_noise_novelty"]} \
        | {("transfer", m) for m in ["S_KDE30", "B_F"]}
    for p in pops.values():
        assert all(len(p["test_acc"][b]) == 4 for b in ("0", "1", "2"))
        assert set(p["novelty"]) == {"epoch_0", "epoch_2"}
    # The noise baseline is (nearly) a copy of training models; fresh inits are not.
    nb, bt = pops[("in_dataset", "B_noise_0.02")]["novelty"]["epoch_0"], pops[("in_dataset", "B_T")]["novelty"]["epoch_0"]
    assert nb["nearest_aligned_mean"] < 0.02 * np.sqrt(zoo.layout.num_params) * 1.5 < bt["nearest_aligned_mean"]
    assert nb["agreement_mean"] > 0.9
    # Transfer reuses the in-dataset S_KDE30 models as its starting point.
    assert pops[("transfer", "S_KDE30")]["novelty_per_model"]["epoch_0"]["nearest_raw"] == \
        pops[("in_dataset", "S_KDE30")]["novelty_per_model"]["epoch_0"]["nearest_raw"]

    # B_noise_novelty sits at S_KDE30's novelty (within the tolerance), as measured by the report itself
    cal = res["calibration"]["B_noise_novelty"]
    want = pops[("in_dataset", "S_KDE30")]["novelty"]["epoch_0"]["nearest_aligned_mean"]
    got = pops[("in_dataset", "B_noise_novelty")]["novelty"]["epoch_0"]["nearest_aligned_mean"]
    assert cal["on"] == "S_KDE30" and cal["target"] == pytest.approx(want) and cal["achieved"] == pytest.approx(got)
    assert abs(got - want) <= cfg.matched_noise.tolerance * want
    y = res["yardsticks"]
    assert 0 < y["top_test_acc"] <= 1 and y["top_test_acc"] >= y["train_test_acc"]

    md = (out / "report.md").read_text()
    assert f"B_noise_novelty: σ = {cal['sigma']:.4g}" in md and "% of top training models" in md
    assert "| S_KDE30 |" in md and "Ep. 2" in md and "agreement" in md
    assert "| in_dataset | S_KDE30 |" in md.split("Against the noise baseline")[1]
    for name in ("report.json", "results.json", "accuracy_curves.png", "accuracy_vs_novelty.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "populations" / "in_dataset_S_KDE30.safetensors").exists()
    tables = json.loads((out / "report.json").read_text())["tables"]
    row = [r for r in tables["in_dataset"]["accuracy"] if r["method"] == "S_KDE" and r["epoch"] == 0][0]
    assert row["mean"] == pytest.approx(100 * np.mean(pops[("in_dataset", "S_KDE")]["test_acc"]["0"]))
    cmp = json.loads((out / "report.json").read_text())["noise_comparison"]
    assert {r["method"] for r in cmp} == {"S_KDE", "S_KDE30", "B_KDE30"}
    s30 = [r for r in cmp if r["method"] == "S_KDE30" and "novelty" in r["matched_on"]]
    assert [r["noise"] for r in s30] == ["B_noise_novelty"]

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=mlflow_uri)
    parent = client.get_run(res["mlflow_parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == len(pops)
    child = [c for c in children if c.info.run_name == "in_dataset/S_KDE30"][0]
    hist = client.get_metric_history(child.info.run_id, "test_acc_mean")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [0, 1, 2]
    matched = [c for c in children if c.info.run_name == "in_dataset/B_noise_novelty"][0]
    assert float(matched.data.params["sigma"]) == pytest.approx(cal["sigma"], rel=1e-5)
    assert matched.data.metrics["calibration_achieved"] == pytest.approx(cal["achieved"])
    assert parent.data.metrics["calibration/B_noise_novelty/sigma"] == pytest.approx(cal["sigma"])
    assert parent.data.metrics["yardstick/top_test_acc"] == pytest.approx(y["top_test_acc"])

    # The CLI rebuilds the report from results.json alone.
    from raysys.cli import main
    (out / "report.md").unlink()
    assert main(["populations", "report", str(out)]) == 0
    assert (out / "report.md").read_text() == md


def test_matched_noise_sigma_gives_the_target_novelty_and_diversity(tiny_zoo):
    """The calibrated B_noise scores, on the novelty module's own summary, within the stated tolerance
    of the sampled population it is matched to: a real zoo, a real decoded S_KDE30 population."""
    from raysys.populations import novelty, stage
    zoo = open_zoo(tiny_zoo)
    W, _ = zoo.weights(epochs=[2, 3], splits=["train"])
    ae = {"lwln": PCAAutoencoder(W, 8, zoo.layout)}
    cfg = tiny_config(num_models=12, methods=["S_KDE30", "B_noise_novelty", "B_noise_diversity"], transfer=None,
                      sampling={"bandwidth": 2.0})
    cfg, view, anchors = stage.prepare(cfg, tiny_zoo, ae)
    target = stage.initial_weights("S_KDE30", cfg, anchors, ae, view, 3, 11)
    x = datasets.load("tetris").x_test
    want = novelty.novelty(target, anchors["weights"], view.layout, x, "tanh")["summary"]
    for method, key in (("B_noise_novelty", "nearest_aligned_mean"), ("B_noise_diversity", "diversity_aligned_mean")):
        info = stage.calibrated_noise(method, cfg, anchors, target, anchors["weights"], view.layout, 12)
        got = novelty.novelty(info["weights"], anchors["weights"], view.layout, x, "tanh")["summary"]
        assert info["measure"] == key and info["target"] == pytest.approx(want[key])
        assert abs(got[key] - want[key]) <= cfg.matched_noise.tolerance * want[key], (method, got[key], want[key])
        assert info["sigma"] > 0
    # the same population through initial_weights (what 'raysys sample --method B_noise_novelty' writes)
    again = stage.initial_weights("B_noise_novelty", cfg, anchors, ae, view, 3,
                                  stage._method_seed(cfg, "generate", "B_noise_novelty"))
    got = novelty.novelty(again, anchors["weights"], view.layout, x, "tanh")["summary"]["nearest_aligned_mean"]
    target_stage = stage.initial_weights("S_KDE30", cfg, anchors, ae, view, 3,
                                         stage._method_seed(cfg, "generate", "S_KDE30"))
    want = novelty.novelty(target_stage, anchors["weights"], view.layout, x, "tanh")["summary"]["nearest_aligned_mean"]
    assert abs(got - want) <= cfg.matched_noise.tolerance * want


def test_methods_draw_from_distinct_seeded_streams():
    from raysys.populations.stage import _method_seed
    cfg = tiny_config()
    seeds = {m: _method_seed(cfg, "generate", m) for m in cfg.methods}
    assert len(set(seeds.values())) == len(seeds)
    assert seeds == {m: _method_seed(tiny_config(), "generate", m) for m in cfg.methods}
    assert _method_seed(tiny_config(seed=1), "generate", "S_KDE") != seeds["S_KDE"]


@pytest.mark.slow
def test_shipped_configs_validate_and_bad_zoo_is_clear(tiny_zoo, tmp_path):
    for path in sorted((ROOT / "configs" / "populations").glob("*.yaml")):
        cfg = load(PopulationsConfig, path)
        assert cfg.num_models >= 50 and cfg.finetune.budgets == [0, 1, 5, 25]
    ae = PCAAutoencoder(open_zoo(tiny_zoo).weights(epochs=[3])[0], 4, open_zoo(tiny_zoo).layout)
    with pytest.raises(RaysysError, match="zoo_epochs"):
        run_populations(tiny_config(zoo_epochs=[21]), tiny_zoo, None, tmp_path, autoencoder=ae, progress=False)
    with pytest.raises(RaysysError, match="same shape"):
        run_populations(tiny_config(transfer={"dataset": "digits"}), tiny_zoo, None, tmp_path, autoencoder=ae,
                        progress=False)


@pytest.mark.slow
def test_cli_sample_then_finetune_with_a_real_checkpoint(ray_local, tiny_zoo, tmp_path, capsys):
    """`raysys sample` loads a real HyperRepresentation checkpoint (untrained, tiny), decodes and
    checks the layout; `raysys finetune` trains the saved population on an actor."""
    from safetensors.numpy import load_file

    from raysys.cli import main
    from raysys.hyperrep import HyperRepConfig, HyperRepresentation

    hcfg = validate(HyperRepConfig, {"model": {"d_model": 8, "heads": 1, "layers": 1, "ff": 8, "latent_dim": 4,
                                               "projection_dim": 4}, "train": {"epoch_window": [2, 3]}})
    torch.manual_seed(0)
    HyperRepresentation(hcfg, open_zoo(tiny_zoo).layout).save(tmp_path / "ckpt")
    config = str(ROOT / "configs" / "populations" / "digits.yaml")
    pop = tmp_path / "pop.safetensors"
    assert main(["sample", config, "--zoo", str(tiny_zoo), "--checkpoint", str(tmp_path / "ckpt"),
                 "--method", "S_KDE30", "-n", "3", "--out", str(pop)]) == 0
    W = load_file(str(pop))["weights"]
    assert W.shape == (3, 100) and np.isfinite(W).all()
    assert "test accuracy before fine-tuning" in capsys.readouterr().out
    assert main(["finetune", config, "--zoo", str(tiny_zoo), "--weights", str(pop), "--out", str(tmp_path / "ft"),
                 "--set", "finetune.budgets=[0,1]", "--set", "finetune.num_actors=1"]) == 0
    acc = np.array(json.loads((tmp_path / "ft" / "finetune.json").read_text())["metrics"]["test_acc"])
    assert acc.shape == (2, 3) and np.isfinite(acc).all()
    # A user error is one line on stderr, exit code 2, no traceback.
    assert main(["sample", config, "--zoo", str(tmp_path / "nope"), "--checkpoint", str(tmp_path / "ckpt"),
                 "--out", str(pop)]) == 2
    assert "is not a zoo" in capsys.readouterr().err
