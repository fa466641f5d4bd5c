"""The Python API (issue 13, item 4): ``Zoo.model`` gives a zoo model back as a torch module,
``Zoo.to_ray_dataset`` reads the zoo into Ray Data; the README's example runs as written."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raysys import datasets
from raysys.architectures import layout_of
from raysys.batched_trainer import train_population
from raysys.store import StoreError, ZooWriter, open_zoo, rows_table, splits_for
from raysys.train import ModelSpec, evaluate

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2


def write_zoo(root: Path, per_activation: int = 4, stray: bool = False, epochs: int = EPOCHS) -> Path:
    """A real tetris zoo: two shards (tanh, relu), epochs 0..``epochs``, written through the store;
    ``stray``: a third complete shard that is not in the manifest's plan."""
    data = datasets.load("tetris")
    layout = layout_of("tetris_ffn", data.in_channels, data.num_classes, data.image_size)
    writer = ZooWriter(root)
    shards = ("tanh", "relu", "sigmoid") if stray else ("tanh", "relu")
    writer.write_manifest({"arch": "tetris_ffn", "layout": layout.to_dict(), "dataset": data.describe(),
                           "config": {}, "shards": [{"shard": 0}, {"shard": 1}]})
    n = len(shards) * per_activation
    splits = splits_for(n, seed=0)
    for shard, act in enumerate(shards):
        ids = list(range(shard * per_activation, (shard + 1) * per_activation))
        specs = [ModelSpec(i, seed=i, init="kaiming_uniform", activation=act, lr=1e-2) for i in ids]
        tables = []
        train_population("tetris_ffn", specs, data, epochs, lambda e, w, m, ids=ids, specs=specs, tables=tables:
                         tables.append(rows_table(layout.num_params, ids, e, [splits[i] for i in ids], w.numpy(), m,
                                                  [s.hyperparameters() for s in specs])))
        writer.write_shard(shard, pa.concat_tables(tables), ids)
    return root


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared machine
    yield write_zoo(tmp_path_factory.mktemp("api") / "zoo", stray=True)
    torch.set_num_threads(before)


def test_zoo_model_gives_the_stored_test_accuracy(zoo_dir):
    zoo = open_zoo(zoo_dir)
    data = zoo.dataset()
    frame = zoo.frame()
    assert len(frame) == 8 * (EPOCHS + 1)  # the unplanned shard is not data
    assert set(frame.activation) == {"tanh", "relu"}
    for row in frame.itertuples():
        model = zoo.model(row.model_id, row.epoch)
        assert isinstance(model, torch.nn.Module) and not model.training
        got = evaluate(model, data)
        assert abs(got["test_acc"] - row.test_acc) <= 1e-6, (row.model_id, row.epoch)
        assert abs(got["train_loss"] - row.train_loss) <= 1e-4 * max(1.0, row.train_loss)
    w, meta = zoo.weights(epochs=[EPOCHS])
    params = torch.nn.utils.parameters_to_vector(zoo.model(int(meta.model_id[5]), EPOCHS).parameters())
    np.testing.assert_array_equal(params.detach().numpy(), w[5])


def test_zoo_model_names_a_missing_row(zoo_dir):
    zoo = open_zoo(zoo_dir)
    with pytest.raises(StoreError, match=r"0 rows for model 8 at epoch 0.*zoo info"):
        zoo.model(8, 0)  # model 8 lives only in the unplanned shard
    with pytest.raises(StoreError, match="0 rows for model 0 at epoch 7"):
        zoo.model(0, 7)


@pytest.mark.slow
def test_to_ray_dataset_reads_the_planned_shards_with_fixed_size_weights(zoo_dir, ray_local):
    zoo = open_zoo(zoo_dir)
    ds = zoo.to_ray_dataset()
    field = ds.schema().base_schema.field("weights")
    assert pa.types.is_fixed_size_list(field.type) and field.type.list_size == zoo.num_params == 100
    rows = sorted(ds.take_all(), key=lambda r: (r["model_id"], r["epoch"]))
    w, meta = zoo.weights()
    assert [(r["model_id"], r["epoch"]) for r in rows] == list(zip(meta.model_id, meta.epoch))
    np.testing.assert_array_equal(np.stack([r["weights"] for r in rows]), w)
    # column selection passes through; a numpy batch holds one array per row, np.stack makes it [n, P]
    batch = zoo.to_ray_dataset(columns=["model_id", "weights"]).take_batch(5, batch_format="numpy")
    assert set(batch) == {"model_id", "weights"} and np.stack(batch["weights"]).shape == (5, 100)
    # the folder itself holds a stray shard a plain read_parquet(ZOO) would count
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in (zoo_dir / "shards").glob("*.parquet")) > len(rows)


# --- checkpoints like the Hub's (item 3) ----------------------------------------------------------

HYPERREP = {"model": {"d_model": 16, "heads": 2, "layers": 1, "ff": 32, "latent_dim": 8, "projection_dim": 8},
            "augment": {"permute": False, "erase_p": 0.0},
            "train": {"epoch_window": [1, 3], "epochs": 2, "batch_size": 16, "lr": 3e-3, "threads": 1}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``raysys hyperrep train`` (the CLI, in this process) on a tiny real zoo: zoos/tetris, runs/tetris-ae."""
    import yaml

    from raysys.cli import main

    root = tmp_path_factory.mktemp("hub")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        write_zoo(root / "zoos" / "tetris", per_activation=10, epochs=3)
        (root / "tiny.yaml").write_text(yaml.safe_dump(HYPERREP))
        rc = main(["hyperrep", "train", str(root / "tiny.yaml"), "--zoo", str(root / "zoos" / "tetris"),
                   "--out", str(root / "runs" / "tetris-ae"), "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}",
                   "--no-progress"])
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    return root


def test_save_pretrained_then_from_pretrained_gives_identical_outputs(tmp_path):
    from raysys.hyperrep import HyperRepConfig, HyperRepresentation
    from raysys.hyperrep.checkpoint import FORMAT
    from raysys.config import validate

    layout = layout_of("cnn_s", 1, 10)
    torch.manual_seed(0)
    model = HyperRepresentation(validate(HyperRepConfig, {"model": HYPERREP["model"]}), layout)
    model.set_layer_statistics(torch.arange(5.0), torch.linspace(0.5, 2.0, 5))
    w = 0.1 * torch.randn(4, layout.num_params)
    z, rec = model.encode(w), model.decode(model.encode(w))
    model.save_pretrained(tmp_path / "hub")
    files = {p.name for p in (tmp_path / "hub").iterdir()}
    assert {"model.safetensors", "config.json", "README.md"} <= files and not [f for f in files if f.endswith(".tmp")]
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["format"] == FORMAT  # raysys's own config
    for loaded in (HyperRepresentation.from_pretrained(tmp_path / "hub"),
                   HyperRepresentation.from_pretrained(str(tmp_path / "hub")), HyperRepresentation.load(tmp_path / "hub")):
        assert isinstance(loaded, HyperRepresentation) and not loaded.training
        assert torch.equal(loaded.encode(w), z) and torch.equal(loaded.decode(z), rec)
        assert torch.equal(loaded.lwln_std, model.lwln_std) and loaded.layout == layout
    assert "raysys" in (tmp_path / "hub" / "README.md").read_text()  # the model card names the library
    with pytest.raises(TypeError, match="unexpected"):
        HyperRepresentation.from_pretrained(tmp_path / "hub", colour="red")


@pytest.mark.slow
def test_a_folder_from_hyperrep_train_loads_with_from_pretrained(trained, tmp_path):
    from raysys.hyperrep import HyperRepresentation
    from raysys.hyperrep.model import load_for_zoo

    ckpt = trained / "runs" / "tetris-ae"
    hr = HyperRepresentation.from_pretrained(ckpt)
    reference = load_for_zoo(ckpt, trained / "zoos" / "tetris")
    W, _ = open_zoo(trained / "zoos" / "tetris").weights(epochs=[3])
    z = hr.encode(W)
    np.testing.assert_array_equal(z, reference.encode(W))
    np.testing.assert_array_equal(hr.decode(z), reference.decode(z))
    assert hr.meta["mlflow_run_id"] == reference.meta["mlflow_run_id"]
    # saved again with save_pretrained: the training record (zoo hash, run id, metrics) goes along
    hr.save_pretrained(tmp_path / "again")
    again = HyperRepresentation.from_pretrained(tmp_path / "again")
    assert again.meta["zoo"] == reference.meta["zoo"] and again.meta["mlflow_run_id"] == reference.meta["mlflow_run_id"]
    np.testing.assert_array_equal(again.encode(W), z)
    load_for_zoo(tmp_path / "again", trained / "zoos" / "tetris")  # --checkpoint takes it too


def test_hyperrep_train_run_sits_in_a_model_training_experiment(trained):
    """Item 6 on a real stage run: the experiment opens on the runs table; the headline figures are metrics."""
    from mlflow.tracking import MlflowClient

    from raysys.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING

    client = MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hyperrep")
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    (run,) = client.search_runs([exp.experiment_id])
    assert {"final_test_r2", "final_val_rec"} <= set(run.data.metrics)


def test_from_pretrained_names_a_folder_that_is_no_checkpoint(tmp_path):
    from raysys.config import RaysysError
    from raysys.hyperrep import HyperRepresentation

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RaysysError, match="not a hyper-representation checkpoint"):
        HyperRepresentation.from_pretrained(tmp_path)


# --- the README's example -----------------------------------------------------------------------

def readme_example() -> str:
    """The Python block under "Python API" in README.md."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_as_written(trained, monkeypatch, capsys):
    code = readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    monkeypatch.chdir(trained)  # where the example's zoos/tetris and runs/tetris-ae are
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the project's own README
    printed = capsys.readouterr().out.split()
    stored, reloaded, decoded = (float(x) for x in printed[-3:])
    assert reloaded == pytest.approx(stored, abs=1e-6) and 0.0 <= decoded <= 1.0
