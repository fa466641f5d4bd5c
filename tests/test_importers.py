"""``raysys zoo import-modelzoos``: the published Model Zoos format (NeurIPS 2022) into a raysys store.

Each test writes a small zoo in that format itself: Ray Tune trial folders with params.json, result.json
(JSON lines) and checkpoint_N/checkpoints (a torch.save'd state_dict of the reference ``nn.ModuleList``
model, keys ``module_list.<i>.weight``; the indices shift with dropout modules). The reference modules are
built here from the paper's description, independently of raysys.architectures, so that "the import
preserves the function" is a real check of the mapping.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from raysys import architectures, cli
from raysys.store import open_zoo, splits_for

ACT = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


class RefNet(nn.Module):
    """The reference layout: everything in one ``module_list``, run in order."""

    def __init__(self, modules):
        super().__init__()
        self.module_list = nn.ModuleList(modules)

    def forward(self, x):
        for m in self.module_list:
            x = m(x)
        return x


def ref_cnn_s(channels_in: int, nlin: str, dropout: float) -> RefNet:
    """conv(8,5) > pool > act [> drop] > conv(6,5) > pool > act [> drop] > conv(4,2) > act > flatten > fc(36,20)
    > act [> drop] > fc(20,10): dropout modules only when dropout > 0, as in the reference CNN."""
    d = [nn.Dropout(dropout)] if dropout > 0 else []
    a = ACT[nlin]
    return RefNet([nn.Conv2d(channels_in, 8, 5), nn.MaxPool2d(2, 2), a(), *d,
                   nn.Conv2d(8, 6, 5), nn.MaxPool2d(2, 2), a(), *d,
                   nn.Conv2d(6, 4, 2), a(), nn.Flatten(), nn.Linear(36, 20), a(), *d, nn.Linear(20, 10)])


def ref_cnn_m(channels_in: int, nlin: str, dropout: float) -> RefNet:
    """The reference CNN3: a dropout module after every hidden activation, whatever the rate."""
    a = ACT[nlin]
    return RefNet([nn.Conv2d(channels_in, 16, 3), nn.MaxPool2d(2, 2), a(), nn.Dropout(dropout),
                   nn.Conv2d(16, 32, 3), nn.MaxPool2d(2, 2), a(), nn.Dropout(dropout),
                   nn.Conv2d(32, 15, 3), nn.MaxPool2d(2, 2), a(), nn.Dropout(dropout), nn.Flatten(),
                   nn.Linear(60, 20), a(), nn.Dropout(dropout), nn.Linear(20, 10)])


def ref_mlp(nlin: str) -> RefNet:
    """The TETRIS MLP: 16 -> 5 -> 4 without biases."""
    return RefNet([nn.Linear(16, 5, bias=False), ACT[nlin](), nn.Linear(5, 4, bias=False)])


def copy_into_reference(model: nn.Module, ref: RefNet) -> RefNet:
    """raysys module -> the reference module, layer by layer (weight layers in order)."""
    src = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    dst = [m for m in ref.module_list if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(src) == len(dst)
    with torch.no_grad():
        for s, d in zip(src, dst):
            d.weight.copy_(s.weight)
            if d.bias is not None:
                d.bias.copy_(s.bias)
    return ref


def write_trial(root: Path, n: int, params: dict, states: dict[int, dict], results: list[dict] | None,
                padded: bool = True) -> Path:
    """One trial folder of the published format; ``states``: epoch -> state_dict."""
    name = (f"NN_tune_trainable_{n:05x}abc_{n}_model::dropout={params.get('model::dropout', 0)},"
            f"model::nlin={params.get('model::nlin')},seed={params.get('seed')}_2022-01-01_00-00-00")
    trial = root / name
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps(params))
    if results is not None:
        (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in results))
    for e, sd in states.items():
        d = trial / (f"checkpoint_{e:06d}" if padded else f"checkpoint_{e}")
        d.mkdir()
        torch.save(sd, d / "checkpoints")
        torch.save({"state": {}, "param_groups": []}, d / "optimizer")
    return trial


def cnn_params(seed: int, nlin: str, dropout: float, model_type: str = "CNN", optimizer: str = "adam",
               lr: float = 3e-4, wd: float = 0.0, init: str = "kaiming_uniform", channels: int = 1) -> dict:
    return {"model::type": model_type, "model::channels_in": channels, "model::nlin": nlin,
            "model::dropout": dropout, "model::init_type": init, "optim::optimizer": optimizer, "optim::lr": lr,
            "optim::wd": wd, "optim::momentum": 0.9, "training::batchsize": 10, "training::epochs_train": 3,
            "seed": seed, "cuda": False, "dataset::dump": "/data/dataset_mnist.pt"}


def trajectory(arch: str, nlin: str, dropout: float, seed: int, init: str, epochs: int, in_channels: int = 1,
               num_classes: int = 10) -> list[nn.Module]:
    """Realistic states: raysys's own architecture and init, then small drifts standing in for training."""
    g = torch.Generator().manual_seed(seed)
    model = architectures.init_model(architectures.build(arch, nlin, dropout, in_channels, num_classes), init, g)
    out = []
    for _ in range(epochs + 1):
        m = architectures.build(arch, nlin, dropout, in_channels, num_classes)
        m.load_state_dict(model.state_dict())
        out.append(m)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return out


def result_lines(seed: int, epochs: int, spelling: str = "new", iteration: bool = True, first: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for e in range(first, epochs + 1):
        tl, ta, vl, va = float(rng.uniform(0.1, 2)), float(rng.uniform(0, 1)), float(rng.uniform(0.1, 2)), float(rng.uniform(0, 1))
        row = ({"train_loss": tl, "train_acc": ta, "test_loss": vl, "test_acc": va} if spelling == "new"
               else {"loss_train": tl, "acc_train": ta, "loss_test": vl, "acc_test": va})
        if iteration:
            row["training_iteration"] = e
        row.update({"trial_id": f"t{seed}", "time_this_iter_s": 0.1, "done": e == epochs})
        rows.append(row)
    return rows


EPOCHS = 3


@pytest.fixture
def cnn_s_zoo(tmp_path):
    """Six CNN-s trials: four importable (two spellings of result keys, padded and plain checkpoint names,
    with and without dropout modules, one without result.json), one with a checkpoint missing, one with NaN."""
    src = tmp_path / "tune_zoo_mnist_hyperparameter"
    specs = [  # (seed, nlin, dropout, optimizer, init, spelling, padded, results)
        (11, "tanh", 0.0, "adam", "kaiming_uniform", "new", True, True),
        (12, "relu", 0.1, "sgd", "uniform", "old", False, True),
        (13, "gelu", 0.0, "adam", "normal", "new", True, True),
        (14, "sigmoid", 0.2, "adam", "xavier_normal", "new", True, False),
        (15, "tanh", 0.0, "adam", "kaiming_normal", "new", True, True),  # checkpoint 2 missing: skipped
        (16, "tanh", 0.0, "adam", "kaiming_normal", "new", True, True),  # NaN at epoch 3: skipped
    ]
    kept, refs = [], {}
    for n, (seed, nlin, dropout, opt, init, spelling, padded, has_results) in enumerate(specs):
        models = trajectory("cnn_s", nlin, dropout, seed, init, EPOCHS)
        sds = {e: copy_into_reference(m, ref_cnn_s(1, nlin, dropout)).state_dict() for e, m in enumerate(models)}
        if seed == 15:
            del sds[2]
        if seed == 16:
            sds[3]["module_list.0.weight"][0, 0, 0, 0] = float("nan")
        results = result_lines(seed, EPOCHS, spelling) if has_results else None
        trial = write_trial(src, n, cnn_params(seed, nlin, dropout, optimizer=opt, init=init, lr=1e-3 * (n + 1),
                                               wd=1e-4 * n), sds, results, padded)
        if seed < 15:
            kept.append(trial.name)
            refs[seed] = (sds, models, results)
    (src / "not_a_trial").mkdir()  # e.g. Tune's own folders: ignored
    (src / "experiment_state-2022.json").write_text("{}")
    return src, kept, refs


def test_import_cnn_s_zoo(cnn_s_zoo, tmp_path, capsys):
    src, kept, refs = cnn_s_zoo
    out = tmp_path / "zoo"
    assert cli.main(["zoo", "import-modelzoos", str(src), "--out", str(out), "--no-progress",
                     "--models-per-shard", "3"]) == 0
    text = capsys.readouterr().out
    assert "imported     4 models, epochs 0..3" in text
    assert "skipped      2 models" in text and "missing checkpoint" in text and "non-finite" in text
    assert cli.main(["zoo", "verify", str(out)]) == 0
    assert "OK:" in capsys.readouterr().out

    zoo = open_zoo(out)
    m = zoo.manifest
    assert m["arch"] == "cnn_s" and m["num_models"] == 4 and m["epochs"] == EPOCHS and m["first_epoch"] == 0
    assert m["imported"]["trials"] == kept and len(m["imported"]["skipped"]) == 2
    assert m["dataset"]["name"] == "mnist" and m["status"] == "complete"
    from raysys.provenance import STORE_FORMAT

    assert m["store_format"] == STORE_FORMAT
    assert len(m["shards"]) == 2 and m["splits"] == splits_for(4, 0)
    W, meta = zoo.weights()
    assert W.shape == (4 * (EPOCHS + 1), 2464)
    seeds = [11, 12, 13, 14]
    x = torch.randn(7, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for mid, seed in enumerate(seeds):
        sds, models, results = refs[seed]
        nlin, dropout = ("tanh", 0.0) if seed == 11 else ("relu", 0.1) if seed == 12 else \
            ("gelu", 0.0) if seed == 13 else ("sigmoid", 0.2)
        for e in range(EPOCHS + 1):
            row = meta.index[(meta.model_id == mid) & (meta.epoch == e)]
            assert len(row) == 1
            # the stored vector is the saved tensors in raysys order
            np.testing.assert_array_equal(W[row[0]], architectures.flatten(models[e]).numpy())
            # and the function is the reference module's
            ref = ref_cnn_s(1, nlin, dropout)
            ref.load_state_dict(sds[e])
            with torch.no_grad():
                torch.testing.assert_close(zoo.model(mid, e)(x), ref.eval()(x), rtol=0, atol=1e-6)
        rows = meta[meta.model_id == mid].sort_values("epoch")
        assert rows.seed.tolist() == [seed] * (EPOCHS + 1)
        assert rows.activation.iloc[0] == nlin and rows.dropout.iloc[0] == dropout
        assert rows.optimizer.iloc[0] == ("sgd" if seed == 12 else "adam")
        assert rows.lr.iloc[0] == pytest.approx(1e-3 * (mid + 1)) and rows.weight_decay.iloc[0] == pytest.approx(1e-4 * mid)
        assert rows.batch_size.iloc[0] == 10 and rows.split.nunique() == 1
        assert rows.split.iloc[0] == splits_for(4, 0)[mid]
        assert not rows.diverged.any()
        if results is None:  # no result.json: the weights are imported, the metrics are NaN
            assert rows.test_acc.isna().all()
            continue
        key = "acc_test" if seed == 12 else "test_acc"
        assert rows.test_acc.tolist() == pytest.approx([r[key] for r in results])
        tr = "acc_train" if seed == 12 else "train_acc"
        assert rows.ggap.tolist() == pytest.approx([r[tr] - r[key] for r in results])
        assert rows.train_loss.tolist() == pytest.approx([r["loss_train" if seed == 12 else "train_loss"] for r in results])
        assert rows.val_acc.isna().all()  # the zoo reported no validation split
    assert cli.main(["zoo", "info", str(out)]) == 0


def test_import_resumes_and_refuses_other_options(cnn_s_zoo, tmp_path, capsys):
    from raysys.store import record_file, shard_file, sha256_file

    src, _, _ = cnn_s_zoo
    out = tmp_path / "zoo"
    args = ["zoo", "import-modelzoos", str(src), "--out", str(out), "--models-per-shard", "2"]
    assert cli.main(args) == 0
    digests = [sha256_file(shard_file(out, s)) for s in (0, 1)]
    manifest = (out / "__raysys__" / "manifest.json").read_bytes()
    # a run killed after shard 0: shard 1 and its record gone, the manifest still "running"
    shard_file(out, 1).unlink()
    record_file(out, 1).unlink()
    capsys.readouterr()
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "shard 1/2 kept (already complete)" in text and "shard 2/2 written" in text
    assert [sha256_file(shard_file(out, s)) for s in (0, 1)] == digests
    assert (out / "__raysys__" / "manifest.json").read_bytes() == manifest
    assert cli.main(["zoo", "verify", str(out)]) == 0
    # another split seed into the same --out: refused, nothing changed
    assert cli.main([*args, "--split-seed", "1"]) == 2
    assert "other options" in capsys.readouterr().err
    assert (out / "__raysys__" / "manifest.json").read_bytes() == manifest
    # a directory that is not an import
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("x")
    assert cli.main(["zoo", "import-modelzoos", str(src), "--out", str(other)]) == 2
    assert "not empty" in capsys.readouterr().err


def _one_cnn_s_trial(src: Path, n: int, seed: int, mutate=None) -> Path:
    models = trajectory("cnn_s", "tanh", 0.0, seed, "kaiming_uniform", 1)
    sds = {e: copy_into_reference(m, ref_cnn_s(1, "tanh", 0.0)).state_dict() for e, m in enumerate(models)}
    if mutate is not None:
        mutate(sds)
    return write_trial(src, n, cnn_params(seed, "tanh", 0.0), sds, result_lines(seed, 1))


def test_wrong_shape_is_an_error_naming_file_and_key(tmp_path, capsys):
    src = tmp_path / "src"
    _one_cnn_s_trial(src, 0, 1)
    _one_cnn_s_trial(src, 1, 2)

    def bad(sds):
        sds[1]["module_list.3.weight"] = torch.zeros(6, 8, 3, 3)

    trial = _one_cnn_s_trial(src, 2, 3, bad)
    out = tmp_path / "zoo"
    assert cli.main(["zoo", "import-modelzoos", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(trial / "checkpoint_000001" / "checkpoints") in err
    assert "'module_list.3.weight' has shape [6, 8, 3, 3]" in err and "'conv2.weight' of shape [6, 8, 5, 5]" in err
    assert not (out / "shards").exists() or not any((out / "shards").glob("*.parquet"))
    # --skip-mismatched: the model is left out, and said so
    assert cli.main(["zoo", "import-modelzoos", str(src), "--out", str(out), "--skip-mismatched", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "imported     2 models" in text and "skipped      1 models: 1 mismatched" in text
    assert open_zoo(out).manifest["imported"]["skipped"].keys() == {trial.name}
    assert cli.main(["zoo", "verify", str(out)]) == 0


def test_unexpected_key_and_missing_params(tmp_path, capsys):
    src = tmp_path / "src"
    _one_cnn_s_trial(src, 0, 1)

    def extra(sds):
        sds[0]["module_list.0.running_mean"] = torch.zeros(8)

    trial = _one_cnn_s_trial(src, 1, 2, extra)
    assert cli.main(["zoo", "import-modelzoos", str(src), "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert str(trial / "checkpoint_000000") in err and "module_list.0.running_mean" in err
    # a folder without params.json is not a trial; a folder of none at all is an error
    empty = tmp_path / "empty"
    (empty / "NN_tune_trainable_0").mkdir(parents=True)
    assert cli.main(["zoo", "import-modelzoos", str(empty), "--out", str(tmp_path / "z2")]) == 2
    assert "no trial folders" in capsys.readouterr().err
    broken = tmp_path / "broken"
    t = _one_cnn_s_trial(broken, 0, 1)
    (t / "params.json").write_text("{not json")
    assert cli.main(["zoo", "import-modelzoos", str(broken), "--out", str(tmp_path / "z3")]) == 2
    assert str(t / "params.json") in capsys.readouterr().err


MARK = []


def _side_effect():
    MARK.append("unpickled")
    return torch.zeros(1)


class Sneaky:
    """Something that runs code when unpickled: a weights-only load must refuse it."""

    def __reduce__(self):
        return (_side_effect, ())


def test_refuses_a_pickle_that_is_not_weights_only(tmp_path, capsys):
    src = tmp_path / "src"
    _one_cnn_s_trial(src, 0, 1)

    def sneaky(sds):
        sds[1] = {**sds[1], "module_list.0.weight": Sneaky()}

    trial = _one_cnn_s_trial(src, 1, 2, sneaky)
    for extra in ([], ["--skip-mismatched"]):  # never skipped quietly either
        assert cli.main(["zoo", "import-modelzoos", str(src), "--out", str(tmp_path / "z"), *extra]) == 2
        err = capsys.readouterr().err
        assert str(trial / "checkpoint_000001" / "checkpoints") in err and "weights_only" in err
    assert MARK == []


def test_unreadable_checkpoint_is_skipped(tmp_path, capsys):
    src = tmp_path / "src"
    _one_cnn_s_trial(src, 0, 1)
    t = _one_cnn_s_trial(src, 1, 2)
    data = (t / "checkpoint_000001" / "checkpoints").read_bytes()
    (t / "checkpoint_000001" / "checkpoints").write_bytes(data[: len(data) // 2])  # truncated
    out = tmp_path / "z"
    assert cli.main(["zoo", "import-modelzoos", str(src), "--out", str(out), "--no-progress"]) == 0
    assert "skipped      1 models: 1 unreadable checkpoint" in capsys.readouterr().out
    assert open_zoo(out).manifest["num_models"] == 1


def test_import_cnn_m_and_tetris_ffn(tmp_path, capsys):
    # CNN-m (model::type CNN3, 3 channels, 32x32): dropout modules at every hidden activation
    src = tmp_path / "cifar_cnn_m"
    refs = []
    for n, (seed, nlin) in enumerate([(1, "gelu"), (2, "tanh"), (3, "relu")]):
        models = trajectory("cnn_m", nlin, 0.0, seed, "kaiming_uniform", 2, in_channels=3)
        sds = {e: copy_into_reference(m, ref_cnn_m(3, nlin, 0.0)).state_dict() for e, m in enumerate(models)}
        write_trial(src, n, cnn_params(seed, nlin, 0.0, "CNN3", channels=3) | {"dataset::dump": "/d/cifar10.pt"},
                    sds, result_lines(seed, 2))
        refs.append((nlin, sds, models))
    out = tmp_path / "zoo_m"
    assert cli.main(["zoo", "import-modelzoos", str(src), "--out", str(out), "--no-progress"]) == 0
    assert cli.main(["zoo", "verify", str(out)]) == 0
    zoo = open_zoo(out)
    assert zoo.manifest["arch"] == "cnn_m" and zoo.num_params == 10853 and zoo.manifest["dataset"]["name"] == "cifar10"
    W, meta = zoo.weights()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for mid, (nlin, sds, models) in enumerate(refs):
        for e in range(3):
            i = meta.index[(meta.model_id == mid) & (meta.epoch == e)][0]
            np.testing.assert_array_equal(W[i], architectures.flatten(models[e]).numpy())
            ref = ref_cnn_m(3, nlin, 0.0)
            ref.load_state_dict(sds[e])
            with torch.no_grad():
                torch.testing.assert_close(zoo.model(mid, e)(x), ref.eval()(x), rtol=0, atol=1e-5)

    # TETRIS FFN (model::type MLP, no biases), the older layout: no initialization saved (checkpoint_1..),
    # plain checkpoint names, result.json lines without training_iteration (line i is epoch i + 1)
    src = tmp_path / "tetris_seed"
    refs = []
    for n, seed in enumerate([5, 6, 7]):
        models = trajectory("tetris_ffn", "tanh", 0.0, seed, "uniform", 3, num_classes=4)
        sds = {e: copy_into_reference(m, ref_mlp("tanh")).state_dict() for e, m in enumerate(models) if e >= 1}
        params = {"model::type": "MLP", "model::i_dim": 16, "model::h_dim": [5], "model::o_dim": 4,
                  "model::nlin": "tanh", "model::dropout": 0.0, "model::init_type": "uniform", "model::use_bias": False,
                  "optim::optimizer": "adam", "optim::lr": 1e-3, "optim::wd": 0.0, "training::batchsize": 10,
                  "seed": seed}
        results = result_lines(seed, 3, "old", iteration=False, first=1)
        write_trial(src, n, params, sds, results, padded=False)
        refs.append((sds, models, results))
    out = tmp_path / "zoo_t"
    assert cli.main(["zoo", "import-modelzoos", str(src), "--out", str(out), "--no-progress"]) == 0
    assert "epochs 1..3" in capsys.readouterr().out
    assert cli.main(["zoo", "verify", str(out)]) == 0
    zoo = open_zoo(out)
    assert zoo.manifest["arch"] == "tetris_ffn" and zoo.num_params == 100 and zoo.manifest["first_epoch"] == 1
    assert zoo.manifest["dataset"]["name"] == "tetris"
    W, meta = zoo.weights()
    assert sorted(meta.epoch.unique()) == [1, 2, 3]
    x = torch.rand(9, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    for mid, (sds, models, results) in enumerate(refs):
        rows = meta[meta.model_id == mid].sort_values("epoch")
        assert rows.test_acc.tolist() == pytest.approx([r["acc_test"] for r in results])
        for e in (1, 2, 3):
            i = meta.index[(meta.model_id == mid) & (meta.epoch == e)][0]
            np.testing.assert_array_equal(W[i], architectures.flatten(models[e]).numpy())
            ref = ref_mlp("tanh")
            ref.load_state_dict(sds[e])
            with torch.no_grad():
                torch.testing.assert_close(zoo.model(mid, e)(x), ref(x.flatten(1)), rtol=0, atol=1e-6)
    assert not math.isnan(float(meta.test_acc.iloc[0]))


def test_unsupported_model_type_and_activation(tmp_path, capsys):
    src = tmp_path / "src"
    t = _one_cnn_s_trial(src, 0, 1)
    p = json.loads((t / "params.json").read_text())
    (t / "params.json").write_text(json.dumps({**p, "model::type": "Resnet18"}))
    assert cli.main(["zoo", "import-modelzoos", str(src), "--out", str(tmp_path / "z")]) == 2
    assert "model::type 'Resnet18'" in capsys.readouterr().err
    # --arch says what the folder holds, whatever model::type says (the shapes are still checked)
    assert cli.main(["zoo", "import-modelzoos", str(src), "--out", str(tmp_path / "z0"), "--arch", "cnn_s"]) == 0
    assert open_zoo(tmp_path / "z0").manifest["arch"] == "cnn_s"
    assert cli.main(["zoo", "import-modelzoos", str(src), "--out", str(tmp_path / "z1"), "--arch", "cnn_m"]) == 2
    assert "'module_list.0.weight' has shape [8, 1, 5, 5]" in capsys.readouterr().err
    (t / "params.json").write_text(json.dumps({**p, "model::nlin": "leakyrelu"}))
    assert cli.main(["zoo", "import-modelzoos", str(src), "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert str(t / "params.json") in err and "'model::nlin' is 'leakyrelu'" in err
