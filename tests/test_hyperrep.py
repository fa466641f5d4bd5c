"""Hyper-representation autoencoder: tokenizer, augmentations, losses, model, training, checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings, strategies as st

from raysys import datasets
from raysys.architectures import build, flatten, init_model, layout_of, split_vector, unflatten
from raysys.config import ConfigError, RaysysError, load, validate
from raysys.hyperrep.augment import Augmenter, Permuter, add_noise, random_erase
from raysys.hyperrep.model import load_for_zoo
from raysys.hyperrep.config import HyperRepConfig
from raysys.hyperrep.losses import layer_statistics, ntxent, positive_only, reconstruction_loss
from raysys.probes import r2
from raysys.hyperrep.model import HyperRepresentation
from raysys.hyperrep.tokens import Tokenizer
from raysys.store import MANIFEST

CHAINS = [("tetris_ffn", 1, 4), ("cnn_s", 1, 10), ("cnn_s", 3, 10), ("cnn_m", 3, 10)]
TINY = {"model": {"d_model": 32, "heads": 2, "layers": 1, "ff": 64, "latent_dim": 8, "dropout": 0.0,
                  "projection_dim": 16}}
REPO = Path(__file__).resolve().parents[1]


def random_models(arch, n, in_channels=1, num_classes=10, scheme="kaiming_uniform", seed=0):
    gen = torch.Generator().manual_seed(seed)
    models = [init_model(build(arch, "tanh", in_channels=in_channels, num_classes=num_classes), scheme, gen)
              for _ in range(n)]
    for m in models:  # biases all start at 0.01; make them distinct so a misplaced bias shows
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5, generator=gen)
    return models


# --- tokenizer ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,cin,ncls", CHAINS)
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4))
def test_tokenizer_round_trip_is_exact(arch, cin, ncls, seed, batch):
    layout = layout_of(arch, cin, ncls)
    tok = Tokenizer(layout)
    w = torch.randn(batch, layout.num_params, generator=torch.Generator().manual_seed(seed)) * 10
    t = tok.tokenize(w)
    assert t.shape == (batch, tok.num_tokens, tok.token_dim)
    assert torch.equal(tok.detokenize(t), w)
    assert int(tok.mask.sum()) == layout.num_params
    assert torch.all(t[:, ~tok.mask] == 0)
    assert tok.num_tokens == sum(l.out_units for l in layout.layers)


def test_token_is_one_units_incoming_weights_and_bias():
    layout = layout_of("cnn_s", 1, 10)
    tok = Tokenizer(layout)
    w = torch.randn(2, layout.num_params)
    parts = split_vector(w, layout)
    t = tok.tokenize(w)
    groups = {g.name: g for g in tok.groups}
    g = groups["conv2"]
    assert (g.count, g.width) == (6, 8 * 5 * 5 + 1)
    for u in (0, 5):
        expect = torch.cat([parts["conv2.weight"][1, u].flatten(), parts["conv2.bias"][1, u:u + 1]])
        assert torch.equal(t[1, g.start + u, :g.width], expect)
        assert torch.all(tok.layer_index[g.start + u] == list(groups).index("conv2"))
    assert torch.equal(tok.position, torch.arange(tok.num_tokens))


# --- augmentations --------------------------------------------------------------------------

@pytest.mark.parametrize("arch,dataset", [("cnn_s", "digits"), ("tetris_ffn", "tetris")])
def test_permutation_preserves_function(arch, dataset, digits):
    data = digits if dataset == "digits" else datasets.load("tetris")
    layout = layout_of(arch, data.in_channels, data.num_classes)
    models = random_models(arch, 4, data.in_channels, data.num_classes, seed=1)
    w = torch.stack([flatten(m) for m in models])
    permuted = Permuter(layout)(w, torch.Generator().manual_seed(3))
    x = data.x_test[:64]
    for i, m in enumerate(models):
        m.eval()
        twin = unflatten(permuted[i], build(arch, "tanh", in_channels=data.in_channels,
                                           num_classes=data.num_classes)).eval()
        assert not torch.equal(permuted[i], w[i])  # it did move units
        torch.testing.assert_close(twin(x), m(x), rtol=1e-5, atol=1e-5)
    # A permutation only reorders values.
    assert torch.equal(permuted.sort(dim=1).values, w.sort(dim=1).values)
    # Samples get independent permutations.
    assert not torch.equal(permuted[0] - w[0], permuted[1] - w[1])


def test_permutation_fixes_the_output_layer():
    layout = layout_of("cnn_s", 1, 10)
    w = torch.randn(8, layout.num_params)
    p = split_vector(Permuter(layout)(w), layout)
    orig = split_vector(w, layout)
    # Output units (classes) keep their order: each row of fc2 is a column-permutation of itself.
    torch.testing.assert_close(p["fc2.bias"], orig["fc2.bias"])
    torch.testing.assert_close(p["fc2.weight"].sort(-1).values, orig["fc2.weight"].sort(-1).values)


def test_permuter_refuses_non_chain():
    with pytest.raises(RaysysError, match="augment.permute=false"):
        Permuter(layout_of("resnet18", 3, 10))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), low=st.floats(0.01, 0.3), span=st.floats(0.0, 0.5))
def test_random_erase_zeroes_one_span_within_bounds(seed, low, span):
    high = min(low + span, 1.0)
    n = 400
    out = random_erase(torch.ones(256, n), 0.5, low, high, torch.Generator().manual_seed(seed))
    zeros = (out == 0)
    erased = zeros.any(1)
    assert 0.3 < erased.float().mean() < 0.7
    count = zeros.sum(1)[erased]
    assert count.min() >= max(1, int(low * n) - 1) and count.max() <= int(np.ceil(high * n)) + 1
    # Contiguous: the zero positions of each row form one run.
    for row in zeros[erased][:10]:
        pos = torch.nonzero(row).squeeze(1)
        assert int(pos[-1] - pos[0] + 1) == len(pos)


def test_noise_and_two_independent_views():
    layout = layout_of("tetris_ffn", 1, 4)
    w = torch.randn(64, layout.num_params)
    assert torch.equal(add_noise(w, 0.0), w)
    noisy = add_noise(w, 0.05, torch.Generator().manual_seed(0))
    assert abs(float((noisy - w).std()) - 0.05) < 0.005
    aug = Augmenter(layout, permute=True, erase_p=1.0, erase_low=0.1, erase_high=0.1, noise_std=0.0)
    (c1, v1), (c2, v2) = aug.two_views(w, torch.Generator().manual_seed(0))
    assert not torch.equal(c1, c2)  # independent permutations
    assert torch.equal(c1.sort(1).values, w.sort(1).values)  # targets are clean: un-erased, un-noised
    assert ((v1 == 0) & (c1 != 0)).sum(1).min() >= 9  # every view erased about 10 of 100


# --- losses ---------------------------------------------------------------------------------

def test_lwln_matches_hand_computation():
    # tetris_ffn: layer fc1 = params 0..79, layer fc2 = params 80..99 (no biases).
    layout = layout_of("tetris_ffn", 1, 4)
    tok = Tokenizer(layout)
    w = torch.zeros(2, 100)
    w[0, :80], w[1, :80] = 1.0, 3.0     # fc1 values: half 1, half 3 -> mean 2, std 1
    w[0, 80:], w[1, 80:] = 0.0, 0.2     # fc2 values: half 0, half 0.2 -> mean 0.1, std 0.1
    mean, std = layer_statistics(w, tok.param_group, tok.num_groups)
    torch.testing.assert_close(mean, torch.tensor([2.0, 0.1]))
    torch.testing.assert_close(std, torch.tensor([1.0, 0.1]))
    pred = w.clone()
    pred[:, 0] += 0.5    # one fc1 error of 0.5 per model: 0.25 / 1 each
    pred[:, 99] -= 0.1   # one fc2 error of 0.1 per model: 0.01 / 0.01 each
    inv_var = std[tok.param_group].pow(-2)
    # (1 / (M N)) * sum_i sum_l ||err||^2 / sigma_l^2 = (2 * 0.25 + 2 * 1.0) / (2 * 100)
    torch.testing.assert_close(reconstruction_loss(pred, w, inv_var), torch.tensor(2.5 / 200))
    torch.testing.assert_close(reconstruction_loss(pred, w), torch.tensor((2 * 0.25 + 2 * 0.01) / 200))


def test_lwln_groups_weights_with_their_biases():
    layout = layout_of("cnn_s", 1, 10)
    tok = Tokenizer(layout)
    counts = torch.bincount(tok.param_group).tolist()
    assert counts == [8 * 25 + 8, 6 * 8 * 25 + 6, 4 * 6 * 4 + 4, 20 * 36 + 20, 10 * 20 + 10]


def test_contrastive_losses_fall_as_views_align():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
    for loss in (ntxent, positive_only):
        values = [float(loss(a, (1 - t) * b + t * a, 0.5)) for t in np.linspace(0, 1, 6)]
        assert all(x > y for x, y in zip(values, values[1:])), (loss.__name__, values)
    assert float(positive_only(a, a, 0.1)) == pytest.approx(0.0, abs=1e-6)
    # Maximizes similarity: identical < orthogonal < opposite (the reference's (cos/T)^2 would favour orthogonal).
    e1, e2 = torch.eye(2)[:1], torch.eye(2)[1:]
    assert positive_only(e1, e1, 0.1) < positive_only(e1, e2, 0.1) < positive_only(e1, -e1, 0.1)


def test_r2_is_sklearns_with_y_true_first():
    from sklearn.metrics import r2_score

    target = torch.randn(50, 10).double().numpy()
    pred = target + 0.5 * torch.randn(50, 10).double().numpy()
    assert r2(target, target) == 1.0
    assert r2(target, np.broadcast_to(target.mean(0), target.shape)) == pytest.approx(0.0, abs=1e-9)
    assert r2(target, pred) == r2_score(target, pred, multioutput="variance_weighted")
    assert r2(target, pred) != r2(pred, target)  # the order matters: y_true, then y_pred
    assert np.isnan(r2(np.ones((5, 3)), np.zeros((5, 3))))  # every column constant: undefined


# --- config ---------------------------------------------------------------------------------

def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="heads .* must divide d_model"):
        validate(HyperRepConfig, {"model": {"d_model": 30, "heads": 4}})
    with pytest.raises(ConfigError, match="did you mean 'latent_dim'"):
        validate(HyperRepConfig, {"model": {"latent_dims": 8}})
    with pytest.raises(ConfigError, match="erase_low"):
        validate(HyperRepConfig, {"augment": {"erase_low": 0.5, "erase_high": 0.1}})


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "hyperrep").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load(HyperRepConfig, path)
    assert cfg.model.d_model % cfg.model.heads == 0


# --- model and checkpoints ------------------------------------------------------------------

def test_save_load_gives_identical_outputs(tmp_path):
    layout = layout_of("cnn_s", 1, 10)
    cfg = validate(HyperRepConfig, TINY)
    torch.manual_seed(0)
    model = HyperRepresentation(cfg, layout)
    model.set_layer_statistics(torch.arange(5.0), torch.linspace(0.5, 2.0, 5))
    w = torch.stack([flatten(m) for m in random_models("cnn_s", 3)])
    z = model.encode(w)
    assert z.shape == (3, 8) and z.abs().max() <= 1  # tanh-bounded
    rec = model.decode(z)
    assert rec.shape == w.shape
    model.save(tmp_path / "ck", {"note": "test"})
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["lwln"]["std"][-1] == 2.0
    loaded = HyperRepresentation.load(tmp_path / "ck")
    assert torch.equal(loaded.encode(w), z)
    assert torch.equal(loaded.decode(z), rec)
    assert torch.equal(loaded.lwln_std, model.lwln_std)
    np.testing.assert_array_equal(loaded.encode(w.numpy()), z.numpy())  # numpy in, numpy out
    with pytest.raises(RaysysError, match="parameters"):
        loaded.encode(torch.zeros(2, 100))
    with pytest.raises(RaysysError, match="not a hyper-representation checkpoint"):
        HyperRepresentation.load(tmp_path)


def _step_setup(beta=1.0, seed=0, **augment):
    layout = layout_of("cnn_s", 1, 10)
    cfg = validate(HyperRepConfig, {**TINY, "loss": {"beta": beta},
                                    "augment": {"permute": False, "erase_p": 0.0, **augment}})
    torch.manual_seed(seed)
    model = HyperRepresentation(cfg, layout)
    w = torch.stack([flatten(m) for m in random_models("cnn_s", 6)])
    model.set_layer_statistics(*layer_statistics(w, model.tokenizer.param_group, model.tokenizer.num_groups))
    aug = Augmenter(layout, cfg.augment.permute, cfg.augment.erase_p, cfg.augment.erase_low, cfg.augment.erase_high,
                    cfg.augment.noise_std)
    return cfg, model, aug, w


def test_single_view_step_equals_the_two_identical_views_it_replaces():
    """beta = 1, no augmentation, no dropout: the step computes one view; the trajectory is that of two."""
    from raysys.hyperrep.train import make_optimizer, train_step

    cfg, fast, aug, w = _step_setup()
    _, slow, _, _ = _step_setup()
    assert aug.is_identity
    opt_fast, opt_slow = make_optimizer(fast, 1e-3, 0.0), make_optimizer(slow, 1e-3, 0.0)
    inv_var = fast.loss_weights()
    for _ in range(5):
        out = train_step(fast, opt_fast, aug, w, torch.Generator(), cfg.loss, inv_var)
        recon = slow(torch.cat([w, w]))[1]
        loss = reconstruction_loss(recon, torch.cat([w, w]), inv_var)
        opt_slow.zero_grad()
        loss.backward()
        opt_slow.step()
        assert out[0] == out[1] and torch.isnan(out[2])  # reconstruction only; no contrastive pair
        torch.testing.assert_close(out[1], loss.detach(), rtol=1e-5, atol=0)
    # Compare functions, not parameters: attention's key bias gets a zero gradient up to rounding, and Adam
    # turns rounding noise into full-size steps of either sign; the outputs do not depend on it.
    torch.testing.assert_close(fast.decode(fast.encode(w)), slow.decode(slow.encode(w)), rtol=1e-3, atol=1e-5)
    # with noise the two views differ, and both are computed
    cfg, model, aug, w = _step_setup(beta=1.0, noise_std=0.01)
    assert not aug.is_identity
    out = train_step(model, make_optimizer(model, 1e-3, 0.0), aug, w, torch.Generator().manual_seed(0),
                     cfg.loss, model.loss_weights())
    assert torch.isfinite(out).all()


def test_fused_optimizer_matches_the_per_tensor_one():
    from raysys.hyperrep.train import make_optimizer, train_step

    cfg, a, aug, w = _step_setup(beta=0.9, noise_std=0.01)
    _, b, _, _ = _step_setup(beta=0.9, noise_std=0.01)
    opt_a = make_optimizer(a, 1e-3, 1e-5)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=1e-5, foreach=False)
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(5):
        la = train_step(a, opt_a, aug, w, ga, cfg.loss, a.loss_weights())
        lb = train_step(b, opt_b, aug, w, gb, cfg.loss, b.loss_weights())
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.decode(a.encode(w)), b.decode(b.encode(w)), rtol=1e-3, atol=1e-5)


def test_bf16_step_stays_close_to_fp32():
    """bf16 autocast (slow on CPUs without bf16 units, but it must be correct): the same losses within
    bf16's ~3 significant digits, over a few steps."""
    from raysys.hyperrep.train import make_optimizer, train_step

    cfg, a, aug, w = _step_setup(beta=0.9, noise_std=0.01)
    _, b, _, _ = _step_setup(beta=0.9, noise_std=0.01)
    opt_a, opt_b = make_optimizer(a, 1e-3, 0.0), make_optimizer(b, 1e-3, 0.0)
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(3):
        la = train_step(a, opt_a, aug, w, ga, cfg.loss, a.loss_weights(), "fp32")
        lb = train_step(b, opt_b, aug, w, gb, cfg.loss, b.loss_weights(), "bf16")
        assert la.dtype == lb.dtype == torch.float32
        torch.testing.assert_close(lb, la, rtol=0.03, atol=1e-3)


@pytest.mark.parametrize("d_model,latent", [(16, 8), (16, 40)])
def test_latent_has_full_rank_even_when_wider_than_a_token(d_model, latent):
    """z is a linear map of the compression tokens' outputs: with one d_model-wide token its rank would be
    capped at d_model, so a latent wider than d_model gets ceil(latent / d_model) compression tokens."""
    cfg = validate(HyperRepConfig, {"model": {"d_model": d_model, "heads": 2, "layers": 1, "ff": 32,
                                              "latent_dim": latent, "dropout": 0.0, "projection_dim": 8}})
    torch.manual_seed(0)
    model = HyperRepresentation(cfg, layout_of("tetris_ffn", 1, 4))
    assert model.num_compression == -(-latent // d_model)
    w = torch.randn(200, 100)
    z = model.encode(w).double()
    pre = torch.atanh(z.clamp(-1 + 1e-9, 1 - 1e-9))  # undo tanh: the rank of the linear part
    assert torch.linalg.matrix_rank(pre - pre.mean(0), rtol=1e-6).item() == latent


@pytest.mark.slow
def test_linear_path_starts_as_pca_and_survives_save_load(tmp_path):
    """model.linear_path: at initialization (transformer parts silent) the autoencoder is PCA-k of the training
    rows, up to tanh's curvature, which a small scale makes negligible; training leaves the linear pair alone."""
    from sklearn.decomposition import PCA

    layout = layout_of("tetris_ffn", 1, 4)
    cfg = validate(HyperRepConfig, {"model": {**TINY["model"], "linear_path": True}, "augment": {"permute": False}})
    torch.manual_seed(0)
    model = HyperRepresentation(cfg, layout)
    gen = torch.Generator().manual_seed(1)
    basis = torch.randn(12, 100, generator=gen)
    train = torch.randn(300, 12, generator=gen) @ basis + 0.1 * torch.randn(300, 100, generator=gen)
    test = torch.randn(40, 12, generator=gen) @ basis + 0.1 * torch.randn(40, 100, generator=gen)
    model.set_layer_statistics(*layer_statistics(train, model.tokenizer.param_group, model.tokenizer.num_groups))
    model.init_linear_path(train, scale=1e-3)
    pca = PCA(8).fit(train.double().numpy())
    want = pca.inverse_transform(pca.transform(test.double().numpy()))
    got = model.decode(model.encode(test)).double().numpy()
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max())
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    assert {"linear_encoder", "linear_decoder"} <= set(buffers) and not {"linear_encoder", "linear_decoder"} & set(params)
    model.save(tmp_path / "ck")
    loaded = HyperRepresentation.load(tmp_path / "ck")
    assert torch.equal(loaded.decode(loaded.encode(test)), model.decode(model.encode(test)))
    with pytest.raises(ConfigError, match="raysys zoo align"):
        validate(HyperRepConfig, {"model": {"linear_path": True}})


def test_wrong_architecture_is_refused():
    model = HyperRepresentation(validate(HyperRepConfig, TINY), layout_of("cnn_s", 1, 10))
    with pytest.raises(RaysysError, match="'tetris_ffn' models .* trained on 'cnn_s'"):
        model.check_layout(layout_of("tetris_ffn", 1, 4))
    model.check_layout(layout_of("cnn_s", 1, 10))


# --- training -------------------------------------------------------------------------------

def make_zoo(root: Path, n: int = 20, epochs: int = 4) -> Path:
    """A tiny tetris_ffn zoo written through the real store."""
    from raysys.batched_trainer import train_population
    from raysys.store import ZooWriter, rows_table, splits_for
    from raysys.train import ModelSpec

    data = datasets.load("tetris")
    layout = layout_of("tetris_ffn", data.in_channels, data.num_classes)
    specs = [ModelSpec(model_id=i, seed=i, init="kaiming_uniform", lr=1e-2) for i in range(n)]
    splits = splits_for(n, 0)
    writer = ZooWriter(root)
    writer.write_manifest({"layout": layout.to_dict(), "dataset": data.describe(), "config": {}, "arch": "tetris_ffn"})
    tables = []
    train_population("tetris_ffn", specs, data, epochs, lambda e, w, m: tables.append(
        rows_table(layout.num_params, range(n), e, splits, w.numpy(), m, [s.hyperparameters() for s in specs])))
    writer.write_shard(0, pa.concat_tables(tables), range(n))
    return root


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only wait on each other on a shared machine
    try:
        return make_zoo(tmp_path_factory.mktemp("zoo") / "tetris")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_training_lowers_reconstruction_and_tracks_in_mlflow(tiny_zoo, tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    from raysys.hyperrep.train import train

    # Augmentations off: 14 models cannot teach a permutation-invariant code in seconds, but the
    # loop must at least fit them (the augmentations have their own tests above).
    cfg = validate(HyperRepConfig, {**TINY, "augment": {"permute": False, "erase_p": 0.0},
                                    "train": {"epochs": 8, "batch_size": 16, "lr": 2e-3,
                                                      "epoch_window": [2, 4], "patience": 50,
                                                      "threads": 1}})
    reported, threads_before = [], torch.get_num_threads()
    summary = train(cfg, tiny_zoo, tmp_path / "ck", tracking_uri=mlflow_uri,
                    report=lambda e, m: reported.append((e, m)), progress=False)
    history = json.loads((tmp_path / "ck" / "history.json").read_text())
    assert [e for e, _ in reported] == list(range(1, 9))
    assert history[-1]["train_rec"] < 0.85 * history[0]["train_rec"]
    assert summary["val_rec"] <= history[0]["val_rec"]
    assert np.isfinite(summary["test_r2"]) and summary["train"] == 14 * 3  # 70 % of 20 models x 3 epochs

    client = MlflowClient(mlflow_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == "32" and run.data.params["loss.lwln"] == "True"
    assert len(client.get_metric_history(run.info.run_id, "val_rec")) == 8
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert {"checkpoint/model.safetensors", "checkpoint/config.json"} <= logged
    assert "checkpoint/resume" not in logged and not (tmp_path / "ck" / "resume").exists()

    # The best checkpoint reloads, reproduces the reported validation loss, and guards its architecture.
    model = load_for_zoo(tmp_path / "ck", tiny_zoo)
    assert model.meta["zoo"]["manifest_sha256"] and model.meta["epoch"] == summary["best_epoch"]
    assert model.meta["mlflow_run_id"] == run.info.run_id
    assert torch.get_num_threads() == threads_before  # train() restores the thread count
    other = make_zoo_like_cnn(tmp_path / "other")
    with pytest.raises(RaysysError, match="trained on 'tetris_ffn'"):
        load_for_zoo(tmp_path / "ck", other)


def make_zoo_like_cnn(root: Path) -> Path:
    from raysys.store import ZooWriter

    ZooWriter(root).write_manifest({"layout": layout_of("cnn_s", 1, 10).to_dict(), "arch": "cnn_s"})
    return root


@pytest.mark.slow
def test_autoencoder_overfits_a_tiny_zoo(tiny_zoo, tmp_path, mlflow_uri):
    """A learner that cannot memorize 14 training models (42 states) with augmentation off is broken,
    whatever it does on unseen models: train R^2 must reach 0.99 (the mean predictor scores 0)."""
    from raysys.hyperrep.train import train

    cfg = validate(HyperRepConfig, {"model": {**TINY["model"], "d_model": 64, "ff": 128, "latent_dim": 16},
                                    "loss": {"beta": 1.0},
                                    "augment": {"permute": False, "erase_p": 0.0},
                                    "train": {"epochs": 120, "batch_size": 6, "lr": 3e-3, "epoch_window": [2, 4],
                                              "keep": "last", "threads": 1}})
    summary = train(cfg, tiny_zoo, tmp_path / "ck", tracking_uri=mlflow_uri, progress=False)
    assert summary["train"] == 42
    assert summary["train_r2"] >= 0.99, summary


def test_training_refuses_missing_epochs(tiny_zoo, tmp_path):
    from raysys.hyperrep.train import train

    with pytest.raises(RaysysError, match="epoch_window"):
        train(validate(HyperRepConfig, TINY), tiny_zoo, tmp_path / "ck", progress=False)


def test_usable_states_drop_exactly_the_non_finite_and_diverged_rows_and_windows_name_the_fix(tiny_zoo):
    from raysys.hyperrep.data import usable, usable_states, window_epochs
    from raysys.store import open_zoo

    zoo = open_zoo(tiny_zoo)
    w, frame = zoo.weights(epochs=[1, 2], splits=["train"])
    w = w.copy()
    frame = frame.copy()
    w[0, 3] = np.nan                      # a non-finite state
    frame.loc[1, "diverged"] = True       # a diverged one
    kept, kept_frame = usable(w, frame)
    assert len(kept) == len(w) - 2 and len(kept_frame) == len(kept)
    np.testing.assert_array_equal(kept, w[2:])
    assert kept_frame["model_id"].tolist() == frame["model_id"].tolist()[2:]
    w2, f2 = usable_states(zoo, [1, 2], ["train"])  # the zoo's own states: all usable
    assert len(w2) == len(frame) and np.isfinite(w2).all()
    stored = sorted(int(e) for e in zoo.frame()["epoch"].unique())
    assert window_epochs(zoo, (stored[-1], 10 ** 6), "val", "fix") == [stored[-1]]
    with pytest.raises(RaysysError, match=r"epoch_window is \[500, 600\]\. Set X"):
        window_epochs(zoo, (500, 600), "val", "Set X")


# --- resume --------------------------------------------------------------------------------------

class Cut(Exception):
    pass


def _cut_at(k: int, seen: list):
    def report(epoch, metrics):
        seen.append(epoch)
        if epoch == k:
            raise Cut(f"interrupted after epoch {k}")
    return report


def _resume_config(schedule: str) -> HyperRepConfig:
    # Dropout, permutation, erasing and noise all on: every random stream must survive the resume.
    return validate(HyperRepConfig, {
        "model": {**TINY["model"], "dropout": 0.1},
        "augment": {"permute": True, "erase_p": 0.5, "noise_std": 0.01},
        "train": {"epochs": 6, "batch_size": 8, "lr": 3e-3, "epoch_window": [2, 4], "patience": 50,
                  "schedule": schedule, "threads": 1, "seed": 3}})


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_interrupted_then_resumed_training_equals_an_uninterrupted_one(tiny_zoo, tmp_path, mlflow_uri, schedule):
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from raysys.hyperrep.train import train

    cfg = _resume_config(schedule)
    whole = train(cfg, tiny_zoo, tmp_path / "whole", tracking_uri=mlflow_uri, progress=False)

    seen = []
    with pytest.raises(Cut):
        train(cfg, tiny_zoo, tmp_path / "cut", tracking_uri=mlflow_uri, report=_cut_at(3, seen), progress=False)
    assert seen == [1, 2, 3] and (tmp_path / "cut" / "resume" / "state.safetensors").exists()
    resumed = train(cfg, tiny_zoo, tmp_path / "cut", tracking_uri=mlflow_uri, resume=True,
                    report=lambda e, m: seen.append(e), progress=False)
    assert seen == [1, 2, 3, 4, 5, 6]  # continued after epoch 3, nothing run twice

    history = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert history == json.loads((tmp_path / "whole" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 7))
    torch.testing.assert_close(load_file(tmp_path / "cut" / "model.safetensors"),
                               load_file(tmp_path / "whole" / "model.safetensors"), rtol=0, atol=0)
    for key in ("best_epoch", "epochs_run", "val_rec", "test_r2"):
        assert resumed[key] == whole[key], key
    assert not (tmp_path / "cut" / "resume").exists()  # a finished training leaves nothing to resume

    # One MLflow run for the interrupted + resumed training, every epoch logged once.
    client = MlflowClient(mlflow_uri)
    run = client.get_run(resumed["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["raysys.resumed_after_epoch"] == "3"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_rec")) == list(range(1, 7))
    assert run.data.params["model.dropout"] == "0.1"


@pytest.mark.slow
def test_a_crash_in_the_final_mlflow_logging_keeps_the_resume_state(tiny_zoo, tmp_path, mlflow_uri, monkeypatch):
    """The resume state is removed only after the run's last MLflow call: a tracking server that fails while the
    checkpoint uploads leaves a training that ``--resume`` finishes without running an epoch again."""
    import mlflow

    from raysys.hyperrep.train import train

    cfg = _resume_config("cosine")
    real = mlflow.log_artifact

    def server_gone(*args, **kwargs):
        raise OSError("tracking server went away")

    monkeypatch.setattr(mlflow, "log_artifact", server_gone)
    seen = []
    with pytest.raises(OSError, match="went away"):
        train(cfg, tiny_zoo, tmp_path / "ck", tracking_uri=mlflow_uri, report=lambda e, m: seen.append(e),
              progress=False)
    assert seen == list(range(1, 7)) and (tmp_path / "ck" / "resume" / "state.safetensors").exists()
    monkeypatch.setattr(mlflow, "log_artifact", real)
    summary = train(cfg, tiny_zoo, tmp_path / "ck", tracking_uri=mlflow_uri, resume=True,
                    report=lambda e, m: seen.append(e), progress=False)
    assert seen == list(range(1, 7)) and summary["epochs_run"] == 6  # no epoch trained twice
    assert not (tmp_path / "ck" / "resume").exists()


@pytest.mark.slow
def test_resume_with_nothing_to_resume_starts_fresh_and_refuses_another_config_or_zoo(tiny_zoo, tmp_path, mlflow_uri,
                                                                                        capsys):
    import shutil

    from raysys.cli import main
    from raysys.hyperrep.train import train

    cfg = _resume_config("cosine").model_copy(deep=True)
    cfg.train.epochs = 3
    fresh = train(cfg, tiny_zoo, tmp_path / "fresh", tracking_uri=mlflow_uri, resume=True, progress=False)
    assert fresh["epochs_run"] == 3

    with pytest.raises(Cut):
        train(cfg, tiny_zoo, tmp_path / "ck", tracking_uri=mlflow_uri, report=_cut_at(1, []), progress=False)
    other = cfg.model_copy(deep=True)
    other.train.lr = 1e-2
    with pytest.raises(RaysysError, match=r"different config \(train.lr: 0.003 -> 0.01\).*new --out.*drop --resume"):
        train(other, tiny_zoo, tmp_path / "ck", tracking_uri=mlflow_uri, resume=True, progress=False)
    moved = tmp_path / "zoo2"
    shutil.copytree(tiny_zoo, moved)
    manifest = json.loads((moved / MANIFEST).read_text())
    (moved / MANIFEST).write_text(json.dumps({**manifest, "config": {"note": "another zoo"}}))
    with pytest.raises(RaysysError, match="different zoo.*drop --resume"):
        train(cfg, moved, tmp_path / "ck", tracking_uri=mlflow_uri, resume=True, progress=False)
    threads = cfg.model_copy(deep=True)
    threads.train.threads = 2  # a speed knob, not a different training: allowed

    # The CLI resumes too (the same config through a YAML file, another thread count). Against a
    # tracking store without the interrupted run, the resumed epochs go to a new run, with a warning.
    import yaml
    from mlflow import MlflowClient

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(threads.model_dump(mode="json")))
    other_uri = f"sqlite:///{tmp_path / 'other.db'}"
    assert main(["hyperrep", "train", str(path), "--zoo", str(tiny_zoo), "--out", str(tmp_path / "ck"),
                 "--tracking-uri", other_uri, "--resume"]) == 0
    assert "the resumed epochs go to a new run" in capsys.readouterr().err
    history = json.loads((tmp_path / "ck" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3] and not (tmp_path / "ck" / "resume").exists()
    run_id = json.loads((tmp_path / "ck" / "config.json").read_text())["mlflow_run_id"]
    assert [m.step for m in MlflowClient(other_uri).get_metric_history(run_id, "val_rec")] == [2, 3]


@pytest.mark.slow
def test_resume_from_an_older_state_redoes_epochs_without_logging_them_twice(tiny_zoo, tmp_path, mlflow_uri):
    """A Tune trial restores its last *registered* checkpoint, which can be older than its last
    report: the epochs after it are redone, to the same result, and not logged to MLflow again."""
    import shutil

    from mlflow import MlflowClient

    from raysys.hyperrep.train import train

    cfg = _resume_config("cosine").model_copy(deep=True)
    cfg.train.epochs = 4
    whole = train(cfg, tiny_zoo, tmp_path / "whole", tracking_uri=mlflow_uri, progress=False)
    state = tmp_path / "ck" / "resume" / "state.safetensors"

    def report(epoch, metrics):
        if epoch == 2:
            shutil.copy(state, tmp_path / "epoch2.safetensors")
        if epoch == 3:
            raise Cut("after epoch 3")

    with pytest.raises(Cut):
        train(cfg, tiny_zoo, tmp_path / "ck", tracking_uri=mlflow_uri, report=report, progress=False)
    shutil.copy(tmp_path / "epoch2.safetensors", state)  # the registered checkpoint was epoch 2's
    redone = []
    resumed = train(cfg, tiny_zoo, tmp_path / "ck", tracking_uri=mlflow_uri, resume=True,
                    report=lambda e, m: redone.append(e), progress=False)
    assert redone == [3, 4]
    assert json.loads((tmp_path / "ck" / "history.json").read_text()) == \
        json.loads((tmp_path / "whole" / "history.json").read_text())
    client = MlflowClient(mlflow_uri)
    values = {m.step: m.value for m in client.get_metric_history(whole["mlflow_run_id"], "train_loss")}
    history = client.get_metric_history(resumed["mlflow_run_id"], "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert {m.step: m.value for m in history} == values


@pytest.mark.slow
def test_a_joined_run_that_already_holds_epochs_gets_each_epoch_once(tiny_zoo, tmp_path, mlflow_uri, monkeypatch):
    """A search trial cut off before its first checkpoint was registered starts training again at epoch 1 in its
    own run (train's mlflow_run_id, or $MLFLOW_RUN_ID), which already holds the first epochs: they are redone, not
    logged twice."""
    from mlflow import MlflowClient

    from raysys.hyperrep.train import train

    cfg = _resume_config("cosine")
    seen = []
    with pytest.raises(Cut):
        train(cfg, tiny_zoo, tmp_path / "first", tracking_uri=mlflow_uri, report=_cut_at(2, seen), progress=False)
    client = MlflowClient(mlflow_uri)  # the run the interrupted training logged to: the experiment's newest
    run_id = max(client.search_runs([client.get_experiment_by_name("hyperrep").experiment_id]),
                 key=lambda r: r.info.start_time).info.run_id
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_rec")) == [1, 2]
    # no resume state: epoch 1 again, in the run a search trial passes
    train(cfg, tiny_zoo, tmp_path / "again", tracking_uri=mlflow_uri, progress=False, mlflow_run_id=run_id)
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_rec")) == list(range(1, 7))
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)  # MLflow's own variable names the run to join too
    train(cfg, tiny_zoo, tmp_path / "third", tracking_uri=mlflow_uri, progress=False)
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_rec")) == list(range(1, 7))
