"""Config validation: typed configs, unknown keys named with a fix, overrides, and the shipped zoo configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raysys.config import ConfigError, apply_overrides, dump, load, read_yaml, validate
from raysys.zoo import RandomSeeds, ZooConfig, expand, plan_shards

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "zoo"


def base(**changes) -> dict:
    d = {"name": "t", "dataset": {"name": "tetris"}, "arch": "tetris_ffn", "seeds": {"count": 3}, "epochs": 2}
    d.update(changes)
    return d


def error_of(data) -> str:
    with pytest.raises(ConfigError) as info:
        validate(ZooConfig, data, "test.yaml")
    return str(info.value)


def test_unknown_top_level_key_is_named_with_a_suggestion():
    msg = error_of(base(epoch=3))
    assert "unknown key 'epoch'" in msg and "did you mean 'epochs'" in msg
    assert "test.yaml" in msg and "Fix the config" in msg


def test_unknown_nested_key_is_named_with_its_path_and_suggestion():
    msg = error_of(base(grid={"lrr": [0.1]}))
    assert "grid.lrr" in msg and "did you mean 'lr'" in msg
    msg = error_of(base(resources={"num_worker": 2}))
    assert "resources.num_worker" in msg and "num_workers" in msg


@pytest.mark.parametrize("change, needle", [
    ({"epochs": 0}, "epochs"),
    ({"epochs": "ten"}, "epochs"),
    ({"grid": {"lr": [-1e-3]}}, "grid.lr must be positive"),
    ({"grid": {"lr": [0.0]}}, "grid.lr must be positive"),
    ({"grid": {"weight_decay": -1}}, "weight_decay"),
    ({"grid": {"dropout": [1.0]}}, "dropout"),
    ({"grid": {"batch_size": [0]}}, "batch_size"),
    ({"grid": {"init": ["glorot"]}}, "unknown init 'glorot'"),
    ({"grid": {"activation": ["swish"]}}, "unknown activation 'swish'"),
    ({"grid": {"optimizer": ["rmsprop"]}}, "optimizer"),
    ({"grid": {"lr": []}}, "grid.lr is empty"),
    ({"grid": {"lr": [0.1, 0.1]}}, "twice"),
    ({"arch": "vgg"}, "arch"),
    ({"seeds": []}, "empty list"),
    ({"seeds": {"count": 0}}, "count"),
    ({"seeds": {"random": 0}}, "random"),
    ({"models": 0}, "models"),
    ({"models_per_shard": 0}, "models_per_shard"),
    ({"resources": {"num_workers": 0}}, "num_workers"),
])
def test_impossible_values_are_rejected_with_the_field_named(change, needle):
    assert needle in error_of(base(**change))


def test_scalars_in_the_grid_mean_one_value():
    c = validate(ZooConfig, base(grid={"lr": 1e-3, "activation": "relu"}))
    assert c.grid.lr == [1e-3] and c.grid.activation == ["relu"]


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        validate(ZooConfig, [1, 2])


def test_overrides_reach_nested_keys_and_parse_yaml_values():
    d = apply_overrides(base(), ["grid.lr=[0.1, 0.01]", "epochs=7", "resources.use_gpu=true", "dataset.root=/data"])
    c = validate(ZooConfig, d)
    assert c.grid.lr == [0.1, 0.01] and c.epochs == 7 and c.resources.use_gpu and c.dataset.root == "/data"
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(base(), ["epochs"])


def test_load_dump_round_trip_and_file_errors(tmp_path):
    c = validate(ZooConfig, base(seeds={"random": 4, "seed": 3}))
    dump(c, tmp_path / "c.yaml")
    again = load(ZooConfig, tmp_path / "c.yaml")
    assert again == c and isinstance(again.seeds, RandomSeeds)
    with pytest.raises(ConfigError, match="does not exist"):
        load(ZooConfig, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(tmp_path / "bad.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    (tmp_path / "evil.yaml").write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError):
        read_yaml(tmp_path / "evil.yaml")


# --- the shipped configs ---------------------------------------------------------------------

ALL = sorted(CONFIGS.glob("*.yaml"))


def test_every_paper_and_laptop_zoo_is_shipped():
    names = {p.stem for p in ALL}
    for ds in ("mnist", "fmnist", "svhn", "usps", "cifar10-cnn_s", "cifar10-cnn_m", "stl10-cnn_s", "stl10-cnn_m"):
        assert {f"{ds}-seed", f"{ds}-hyp-10-rand", f"{ds}-hyp-10-fix"} <= names
    assert {"cifar10-resnet18-seed", "cifar100-resnet18-seed", "usps-seed-000"} <= names
    assert {"tetris-seed", "tetris-hyp", "digits-seed", "digits-hyp", "fontdigits-seed"} <= names


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_shipped_configs_load_and_plan(path):
    c = load(ZooConfig, path)
    assert c.name == path.stem
    specs = expand(c)
    assert [s.model_id for s in specs] == list(range(len(specs)))
    shards = plan_shards(specs, c.models_per_shard)
    assert sorted(m for s in shards for m in s.model_ids) == list(range(len(specs)))


def grid_points(c: ZooConfig) -> int:
    n = 1
    for v in c.grid.model_dump().values():
        n *= len(v)
    return n


@pytest.mark.parametrize("ds", ["mnist", "fmnist", "svhn", "usps", "cifar10-cnn_s", "cifar10-cnn_m",
                                "stl10-cnn_s", "stl10-cnn_m"])
def test_paper_grid_sizes(ds):
    seed = load(ZooConfig, CONFIGS / f"{ds}-seed.yaml")
    assert grid_points(seed) == 1 and len(expand(seed)) == 1000
    assert sorted({s.seed for s in expand(seed)}) == list(range(1, 1001))
    for kind in ("rand", "fix"):
        c = load(ZooConfig, CONFIGS / f"{ds}-hyp-10-{kind}.yaml")
        assert c.grid.init == ["uniform", "normal", "kaiming_uniform", "kaiming_normal"]
        assert c.grid.activation == ["tanh", "sigmoid", "relu", "gelu"]
        assert c.grid.optimizer == ["adam", "sgd"]
        points = grid_points(c)
        assert len(expand(c)) == 10 * points
    # 001 Table 1: SVHN adds wd 0 and dropout 0.3; CIFAR-10 has one learning rate
    expected = {"svhn": 4 * 4 * 2 * 2 * 3 * 3, "cifar10-cnn_s": 4 * 4 * 2 * 1 * 2 * 2, "cifar10-cnn_m": 128}
    assert grid_points(c) == expected.get(ds, 4 * 4 * 2 * 2 * 2 * 2)


def test_seed_zoo_hyperparameters_follow_the_papers():
    def one(name):
        c = load(ZooConfig, CONFIGS / f"{name}.yaml")
        return c.grid.init[0], c.grid.activation[0], c.grid.optimizer[0], c.grid.lr[0], c.grid.weight_decay[0]

    assert one("mnist-seed") == ("uniform", "tanh", "adam", 3e-4, 0.0)
    assert one("svhn-seed") == ("uniform", "tanh", "adam", 3e-3, 0.0)
    assert one("usps-seed-000") == ("kaiming_uniform", "tanh", "adam", 1e-4, 1e-3)
    assert one("cifar10-cnn_s-seed") == ("kaiming_uniform", "gelu", "adam", 1e-4, 1e-2)
    assert one("stl10-cnn_s-seed") == ("kaiming_uniform", "tanh", "adam", 1e-4, 1e-3)
    assert one("cifar100-resnet18-seed") == ("kaiming_uniform", "relu", "sgd", 1e-4, 5e-4)


def test_yaml_configs_are_plain_yaml():
    for p in ALL:
        assert isinstance(yaml.safe_load(p.read_text()), dict)
