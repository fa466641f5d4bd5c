"""The vectorized population trainer reproduces train_one, model by model."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from raysys import architectures, datasets, store
from raysys.config import RaysysError
from raysys.batched_trainer import train_population
from raysys.train import METRICS, ModelSpec, train_one

EPOCHS = 2


def _jitter(x: torch.Tensor, seed: int) -> torch.Tensor:
    return x + 0.01 * torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def small_digits(digits):
    """60 training and 30 val/test digits (6 steps per epoch), lightly jittered.

    Why the jitter: the digits have exactly constant backgrounds, where max-pool windows hold
    exact ties. Which element of a tie wins depends on the last bit of the convolution, and
    PyTorch's grouped and ungrouped CPU convolutions round differently, so on exact ties the
    two trainers may route a gradient to different (equally valid) positions. Jitter of 1 %
    removes exact ties; everything else must then agree to float precision.
    """
    return dataclasses.replace(digits, x_train=_jitter(digits.x_train[:60], 0), y_train=digits.y_train[:60],
                               x_val=_jitter(digits.x_val[:30], 1), y_val=digits.y_val[:30],
                               x_test=_jitter(digits.x_test[:30], 2), y_test=digits.y_test[:30])


def _record(store: dict):
    def on_epoch(epoch, weights, metrics):
        store.setdefault(epoch, []).append((weights.clone(), {k: np.asarray(v) for k, v in metrics.items()}))
    return on_epoch


def _one_at_a_time(arch, specs, data, epochs, models=None):
    per_epoch: dict = {}
    for i, spec in enumerate(specs):
        train_one(arch, spec, data, epochs, _record(per_epoch), model=None if models is None else models[i])
    return {e: (torch.cat([w for w, _ in items]), {k: np.concatenate([m[k] for _, m in items]) for k in METRICS})
            for e, items in per_epoch.items()}


def _together(arch, specs, data, epochs, **kw):
    got: dict = {}
    final = train_population(arch, specs, data, epochs, _record(got), **kw)
    assert sorted(got) == list(range(epochs + 1))
    return {e: items[0] for e, items in got.items()}, final


def _assert_same(ref, got, atol=1e-4):
    for epoch in ref:
        w_ref, m_ref = ref[epoch]
        w_got, m_got = got[epoch]
        assert w_got.dtype == torch.float32 and w_got.device.type == "cpu"
        assert w_got.shape == w_ref.shape
        torch.testing.assert_close(w_got, w_ref, atol=atol, rtol=1e-4, msg=f"weights differ at epoch {epoch}")
        assert set(m_got) == set(METRICS)
        for k in METRICS:
            np.testing.assert_allclose(m_got[k], m_ref[k], atol=atol * 10, rtol=1e-4, err_msg=f"{k} at epoch {epoch}")


def _specs(n, optimizer="adam", activation="tanh", dropout=0.0, inits=None, lrs=None):
    # Well-conditioned configurations: a chaotic model (saturated N(0,1) init with a large lr under
    # Adam) amplifies float rounding differences past any fixed tolerance, whichever trainer runs it.
    inits = inits or ["kaiming_uniform", "xavier_normal", "kaiming_normal", "xavier_uniform"]
    lrs = lrs or ([1e-3, 3e-4, 2e-3, 5e-4] if optimizer == "adam" else [0.05, 0.01, 0.03, 0.02])
    wds = [0.0, 1e-3, 1e-2, 5e-4]
    return [ModelSpec(model_id=i, seed=100 + 7 * i, init=inits[i % len(inits)], activation=activation,
                      optimizer=optimizer, lr=lrs[i % len(lrs)], weight_decay=wds[i % len(wds)], dropout=dropout)
            for i in range(n)]


@pytest.mark.parametrize("optimizer,activation,dropout", [
    ("adam", "tanh", 0.0),
    ("sgd", "relu", 0.0),
    ("adam", "gelu", 0.25),
])
@pytest.mark.slow
def test_cnn_s_population_matches_train_one(small_digits, optimizer, activation, dropout):
    specs = _specs(4, optimizer, activation, dropout)
    ref = _one_at_a_time("cnn_s", specs, small_digits, EPOCHS)
    got, final = _together("cnn_s", specs, small_digits, EPOCHS)
    _assert_same(ref, got)
    torch.testing.assert_close(final, got[EPOCHS][0])
    # The models really trained (not a copy of epoch 0) and really differ from each other.
    assert not torch.allclose(got[EPOCHS][0], got[0][0])
    assert torch.cdist(final, final).fill_diagonal_(1.0).min() > 0


@pytest.mark.slow
def test_sliced_first_layer_matches_train_one(small_digits, monkeypatch):
    """The cache-sized slices of the fused conv+pool (training) and of evaluation's first layer,
    forced down to 3 images so a batch of 10 is cut into 3+3+3+1: still train_one's numbers."""
    from raysys import batched_trainer as population
    per_image = 3 * 8 * 24 * 24  # 3 models x 8 channels x 24 x 24 conv outputs
    monkeypatch.setitem(population.TRAIN_SLICE_FLOATS, "cpu", 3 * per_image)
    monkeypatch.setitem(population.EVAL_SLICE_FLOATS, "cpu", 3 * per_image)
    specs = _specs(3, "adam", "tanh", 0.25)
    ref = _one_at_a_time("cnn_s", specs, small_digits, EPOCHS)
    got, _ = _together("cnn_s", specs, small_digits, EPOCHS)
    _assert_same(ref, got)


@pytest.mark.slow
def test_unsliced_first_layer_the_gpu_setting_matches_train_one(small_digits, monkeypatch):
    """The GPU's slice settings (one slice per batch and per evaluation chunk), run on the CPU:
    the same numbers, and no buffer sized by the (huge) slice limit itself."""
    from raysys import batched_trainer as population
    for table in ("TRAIN_SLICE_FLOATS", "EVAL_SLICE_FLOATS", "EVAL_POOLED_CHUNK_FLOATS"):
        monkeypatch.setitem(getattr(population, table), "cpu", getattr(population, table)["cuda"])
    specs = _specs(2, "sgd", "relu", 0.0)
    ref = _one_at_a_time("cnn_s", specs, small_digits, 1)
    got, _ = _together("cnn_s", specs, small_digits, 1)
    _assert_same(ref, got)


def test_tanh_kernel_matches_torch_tanh():
    from raysys.batched_trainer import _tanh, _tanh_
    x = torch.cat([torch.randn(10_000) * 4, torch.tensor([0.0, 1e-8, -1e-5, 30.0, -30.0, 1e4, -1e4])])
    x.requires_grad_(True)
    y = _tanh(x)
    torch.testing.assert_close(y, torch.tanh(x), atol=3e-7, rtol=0)
    g = torch.randn_like(x)
    got, = torch.autograd.grad(y, x, g)
    want, = torch.autograd.grad(torch.tanh(x), x, g)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # the evaluation paths, no autograd node; _tanh_ overwrites its input
        torch.testing.assert_close(_tanh(x), torch.tanh(x), atol=3e-7, rtol=0)
        x_copy = x.clone()
        assert _tanh_(x_copy) is x_copy
        torch.testing.assert_close(x_copy, torch.tanh(x), atol=3e-7, rtol=0)
    assert torch.isnan(_tanh(torch.tensor([float("nan")]))).all()


@pytest.mark.parametrize("models", [4, 3])  # 4: two models per oneDNN group (block-diagonal); 3: one
def test_first_conv_kernels_match_plain_autograd(models):
    """The fused conv+pool (sliced, models sharing groups, bias gradient from the pooled gradient)
    and the grouped conv with its own bias gradient give autograd's numbers on the plain ops."""
    from raysys.batched_trainer import _ConvPool, _from_blocks, _GroupedConv, _models_per_group, _to_blocks
    g = torch.Generator().manual_seed(models)
    x = torch.rand(7, models, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(models * 8, 1, 5, 5, generator=g, requires_grad=True)
    b = torch.randn(models * 8, generator=g, requires_grad=True)
    k = _models_per_group(models, 8, torch.device("cpu"))
    assert k == (2 if models % 2 == 0 else 1)
    if models % 2 == 0:
        torch.testing.assert_close(_from_blocks(_to_blocks(w, models, 2), models, 2, 1), w)
    grad = torch.randn(7, models * 8, 12, 12, generator=g)
    got = _ConvPool.apply(x, w, b, models, k, 3)  # slices of 3 images: 3 + 3 + 1
    want = torch.nn.functional.max_pool2d(torch.nn.functional.conv2d(x, w, b, groups=models), 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got_w, got_b = torch.autograd.grad(got, (w, b), grad)
    want_w, want_b = torch.autograd.grad(want, (w, b), grad)
    torch.testing.assert_close(got_w, want_w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_b, want_b, atol=1e-4, rtol=1e-4)

    h = torch.randn(7, models * 8, 12, 12, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w2 = torch.randn(models * 6, 8, 5, 5, generator=g, requires_grad=True)
    b2 = torch.randn(models * 6, generator=g, requires_grad=True)
    grad2 = torch.randn(7, models * 6, 8, 8, generator=g)
    got2 = _GroupedConv.apply(h, w2, b2, models)
    want2 = torch.nn.functional.conv2d(h, w2, b2, groups=models)
    torch.testing.assert_close(got2, want2)
    for a, c in zip(torch.autograd.grad(got2, (h, w2, b2), grad2), torch.autograd.grad(want2, (h, w2, b2), grad2)):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


def test_models_share_a_group_only_where_it_pays():
    from raysys.batched_trainer import _models_per_group
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _models_per_group(24, 8, cpu) == 2   # 8 channels fill half a 16-lane vector
    assert _models_per_group(24, 4, cpu) == 4
    assert _models_per_group(25, 8, cpu) == 1   # an odd population keeps one model per group
    assert _models_per_group(24, 16, cpu) == 1 and _models_per_group(24, 6, cpu) == 1
    assert _models_per_group(24, 8, cuda) == 1


@pytest.mark.slow
def test_tetris_ffn_population_matches_train_one():
    data = datasets.load("tetris", copies=4)
    specs = _specs(5, "sgd", "sigmoid", 0.1, inits=["uniform", "normal", "kaiming_uniform"], lrs=[0.1, 0.03])
    ref = _one_at_a_time("tetris_ffn", specs, data, EPOCHS)
    got, _ = _together("tetris_ffn", specs, data, EPOCHS)
    _assert_same(ref, got)


@pytest.mark.slow
def test_init_weights_equal_train_one_with_preloaded_model(small_digits):
    specs = _specs(4, "adam", "tanh")
    g = torch.Generator().manual_seed(0)
    start = torch.randn(4, architectures.layout_of("cnn_s").num_params, generator=g) * 0.1
    models = [architectures.unflatten(start[i].clone(), architectures.build("cnn_s", "tanh"))
              for i in range(4)]
    ref = _one_at_a_time("cnn_s", specs, small_digits, 1, models)
    got, _ = _together("cnn_s", specs, small_digits, 1, init_weights=start)
    torch.testing.assert_close(got[0][0], start)
    _assert_same(ref, got)


@pytest.mark.slow
def test_diverged_model_does_not_poison_the_others(small_digits):
    specs = _specs(4, "adam", "relu")
    layout = architectures.layout_of("cnn_s")
    start = torch.stack([architectures.flatten(train_one("cnn_s", s, small_digits, 0)) for s in specs])
    start[1, 5] = float("nan")   # model 1 starts poisoned
    start[2, -3] = float("inf")  # model 2 has an infinite output bias
    got, final = _together("cnn_s", specs, small_digits, 1, init_weights=start)
    assert torch.isnan(final[1]).any() and not torch.isfinite(final[2]).all()
    assert np.isnan(got[1][1]["train_loss"][1]) and not np.isfinite(got[1][1]["train_loss"][2])
    # The healthy models are exactly what they would be in a population without the sick ones.
    ok = [0, 3]
    clean, clean_final = _together("cnn_s", [specs[i] for i in ok], small_digits, 1, init_weights=start[ok])
    assert torch.isfinite(final[ok]).all()
    torch.testing.assert_close(final[ok], clean_final, atol=1e-6, rtol=1e-5)
    for k in METRICS:
        np.testing.assert_allclose(got[1][1][k][ok], clean[1][1][k], atol=1e-5, err_msg=k)
    # The zoo store flags exactly the sick models' rows.
    table = store.rows_table(layout.num_params, [s.model_id for s in specs], 1, ["train"] * 4,
                             got[1][0].numpy(), got[1][1], [s.hyperparameters() for s in specs])
    assert table.column("diverged").to_pylist() == [False, True, True, False]


def test_mixed_population_is_refused(small_digits):
    base = ModelSpec(0, 1)
    for other in (dataclasses.replace(base, model_id=1, activation="relu"),
                  dataclasses.replace(base, model_id=1, optimizer="sgd"),
                  dataclasses.replace(base, model_id=1, dropout=0.1),
                  dataclasses.replace(base, model_id=1, batch_size=20)):
        with pytest.raises(RaysysError, match="population_key"):
            train_population("cnn_s", [base, other], small_digits, 1)


def test_bad_init_weights_shape_is_refused(small_digits):
    with pytest.raises(RaysysError, match="init_weights has shape"):
        train_population("cnn_s", _specs(2), small_digits, 1, init_weights=torch.zeros(2, 100))


@pytest.mark.slow
def test_cnn_m_uses_the_same_semantics():
    data = datasets.load("digits", size=32)
    data = dataclasses.replace(data, x_train=_jitter(data.x_train[:40], 0), y_train=data.y_train[:40],
                               x_val=_jitter(data.x_val[:20], 1), y_val=data.y_val[:20],
                               x_test=_jitter(data.x_test[:20], 2), y_test=data.y_test[:20])
    specs = _specs(3, "adam", "gelu", 0.1)
    _assert_same(_one_at_a_time("cnn_m", specs, data, 1), _together("cnn_m", specs, data, 1)[0])


def test_cuda_without_a_gpu_is_a_clear_error(small_digits):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(RaysysError, match="no CUDA GPU is visible"):
        train_population("cnn_s", _specs(1), small_digits, 1, device="cuda")
