"""The Python API (issue 13, item 4): ``Zoo.model`` gives a zoo model back as a torch module,
``Zoo.to_ray_dataset`` reads the zoo into Ray Data; the README's example runs as written."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raysys import datasets
from raysys.architectures import layout_of
from raysys.population import train_population
from raysys.store import StoreError, ZooWriter, open_zoo, rows_table, splits_for
from raysys.train import ModelSpec, evaluate

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2


def write_zoo(root: Path, per_activation: int = 4, stray: bool = False) -> Path:
    """A real tetris zoo: two shards (tanh, relu), 3 epochs each (0..2), written through the store;
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
        train_population("tetris_ffn", specs, data, EPOCHS, lambda e, w, m, ids=ids, specs=specs, tables=tables:
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


def readme_example() -> str:
    """The Python block under "Python API" in README.md."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_is_short():
    code = readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    assert "from_pretrained" in code and "zoo.model(" in code and "encode" in code and "decode" in code
