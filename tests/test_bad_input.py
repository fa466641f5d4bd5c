"""Bad input, table-driven, through the real CLI.

Every case runs ``raysys ...`` (``raysys.cli.main`` in-process, or a subprocess where the process
itself matters) and must end with exit code 2 and ONE ``raysys: error:`` message that names the
problem and the fix (checked by key words), no traceback, and nothing half-written: the case's
output path is not created (or, when it already existed, is unchanged), no temporary files
anywhere, and the shared input zoos and checkpoints are untouched.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pytest
import yaml

from raysys import architectures, cli, datasets
from raysys.batched_trainer import train_population
from raysys.store import ZooWriter, rows_table, splits_for
from raysys.train import METRICS, ModelSpec

REPO = Path(__file__).absolute().parents[1]
N_MODELS, EPOCHS = 10, 3

ZOO = {"name": "t", "dataset": {"name": "tetris"}, "arch": "tetris_ffn", "seeds": {"count": 2}, "epochs": 1,
       "models_per_shard": 1}
HYPERREP = {"model": {"d_model": 8, "heads": 2, "layers": 1, "ff": 16, "latent_dim": 4, "projection_dim": 8,
                      "dropout": 0.0},
            "train": {"epochs": 1, "batch_size": 8, "epoch_window": [2, 3], "device": "cpu"}}
POPULATIONS = {"num_models": 4, "methods": ["S_KDE30", "B_T"], "transfer": None,
               "finetune": {"budgets": [0, 1], "num_actors": 1}}
SEARCH = {"base": HYPERREP, "space": {"d_model": {"type": "categorical", "choices": [8]}}, "num_samples": 1}


# --- inputs: real zoos and a real checkpoint ----------------------------------------------------

def _write_zoo(root: Path, arch: str, data, weights_per_epoch, metrics=None) -> Path:
    layout = architectures.layout_of(arch, data.in_channels, data.num_classes)
    n = weights_per_epoch[0].shape[0]
    splits = splits_for(n, 0)
    specs = [ModelSpec(model_id=i, seed=i, init="kaiming_uniform", lr=3e-2, batch_size=32) for i in range(n)]
    hp = [s.hyperparameters() for s in specs]
    m = metrics or {k: np.full(n, 0.5) for k in METRICS}
    tables = [rows_table(layout.num_params, range(n), e, splits, w, m, hp) for e, w in enumerate(weights_per_epoch)]
    writer = ZooWriter(root)
    writer.write_manifest({"name": root.name, "arch": arch, "layout": layout.to_dict(), "dataset": data.describe(),
                           "config": {}, "epochs": len(weights_per_epoch) - 1,
                           "shards": [{"shard": 0, "model_ids": list(range(n))}]})
    writer.write_shard(0, pa.concat_tables(tables), range(n))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs shared by every case: a trained tetris zoo, a checkpoint of it, and broken zoos."""
    from raysys.hyperrep.train import train

    root = tmp_path_factory.mktemp("inputs")
    tetris = datasets.load("tetris")
    specs = [ModelSpec(model_id=i, seed=i, init="kaiming_uniform", lr=3e-2, batch_size=32) for i in range(N_MODELS)]
    states, metrics = [], []
    train_population("tetris_ffn", specs, tetris, EPOCHS,
                     lambda e, w, m: (states.append(w.numpy().copy()), metrics.append(m)))
    zoo = _write_zoo(root / "zoo", "tetris_ffn", tetris, states, metrics[-1])
    ckpt = root / "ckpt"
    train(HYPERREP, zoo, ckpt, tracking_uri=f"sqlite:///{root / 'mlflow.db'}", progress=False)

    digits = datasets.load("digits")
    p = architectures.layout_of("cnn_s", digits.in_channels, digits.num_classes).num_params
    rng = np.random.default_rng(0)
    _write_zoo(root / "cnn_zoo", "cnn_s", digits, [rng.normal(0, 0.1, (6, p)).astype(np.float32)
                                                   for _ in range(EPOCHS + 1)])
    nan = [np.full_like(w, np.nan) for w in states]
    _write_zoo(root / "diverged_zoo", "tetris_ffn", tetris, nan)
    resnet = architectures.layout_of("resnet18", 3, 10)  # a manifest is enough: align refuses before reading shards
    ZooWriter(root / "resnet_zoo").write_manifest({"name": "r", "arch": "resnet18", "layout": resnet.to_dict(),
                                                   "config": {}, "epochs": EPOCHS, "shards": []})
    (root / "empty").mkdir()
    (root / "a_file").write_text("not a directory\n")
    return root


def config_file(dirpath: Path, name: str, data) -> str:
    path = dirpath / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the table ------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    argv: Callable[[Path, Path], list[str]]  # (inputs, case dir) -> argv; outputs go to case_dir/"out"
    words: tuple[str, ...]  # must all appear (case-insensitive) in the message
    subprocess: bool = False


def zoo_gen(cfg: dict | str, *extra: str) -> Callable:
    return lambda w, d: ["zoo", "generate", config_file(d, "zoo.yaml", cfg), "--out", str(d / "out"), "--no-progress",
                         "--tracking-uri", f"sqlite:///{d / 'mlflow.db'}", *extra]


def hr_train(cfg: dict | str, zoo: str = "zoo", *extra: str) -> Callable:
    return lambda w, d: ["hyperrep", "train", config_file(d, "hr.yaml", cfg), "--zoo", str(w / zoo),
                         "--out", str(d / "out"), "--tracking-uri", f"sqlite:///{d / 'mlflow.db'}", *extra]


def pop_run(cfg: dict, zoo: str = "zoo") -> Callable:
    return lambda w, d: ["populations", "run", config_file(d, "pop.yaml", cfg), "--zoo", str(w / zoo),
                         "--checkpoint", str(w / "ckpt"), "--out", str(d / "out"),
                         "--tracking-uri", f"sqlite:///{d / 'mlflow.db'}"]


def with_(base: dict, **sections) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


CASES = [
    # files and syntax
    Case("malformed_yaml", zoo_gen("name: t\narch: [tetris_ffn\n"), ("not valid yaml", "line", "fix the syntax")),
    Case("config_path_missing", lambda w, d: ["zoo", "generate", str(d / "nope.yaml"), "--out", str(d / "out")],
         ("does not exist", "configs/")),
    Case("hyperrep_config_path_missing", lambda w, d: ["hyperrep", "train", str(d / "nope.yaml"), "--zoo",
                                                       str(w / "zoo"), "--out", str(d / "out")], ("does not exist",)),
    Case("config_not_a_mapping", zoo_gen("- tetris\n- 3\n"), ("mapping", "key: value")),
    Case("override_without_equals", zoo_gen(ZOO, "--set", "epochs"), ("no '='", "key=value")),
    # unknown keys, one per config type
    Case("unknown_key_zoo", zoo_gen({**ZOO, "epoch": 3}), ("unknown key 'epoch'", "did you mean 'epochs'")),
    Case("unknown_key_zoo_nested", zoo_gen(with_(ZOO, grid={"lrs": [0.1]})), ("unknown key 'grid.lrs'", "'lr'")),
    Case("unknown_key_hyperrep", hr_train(with_(HYPERREP, model={"dmodel": 8})), ("unknown key 'model.dmodel'", "d_model")),
    Case("unknown_key_populations", pop_run({**POPULATIONS, "num_model": 4}), ("unknown key 'num_model'", "num_models")),
    Case("unknown_key_search", lambda w, d: ["search", config_file(d, "s.yaml", {**SEARCH, "num_sample": 2}),
                                             "--zoo", str(w / "zoo"), "--out", str(d / "out")],
         ("unknown key 'num_sample'", "num_samples")),
    Case("unknown_key_pipeline", lambda w, d: ["pipeline", config_file(d, "p.yaml", {
        **yaml.safe_load((REPO / "configs/pipeline/tiny.yaml").read_text()), "evalute": True}), "--out", str(d / "out")],
         ("unknown key 'evalute'", "evaluate")),
    # wrong types
    Case("wrong_type_zoo_epochs", zoo_gen({**ZOO, "epochs": "three"}), ("epochs", "integer")),
    Case("wrong_type_hyperrep_lr", hr_train(with_(HYPERREP, train={"lr": "fast"})), ("train.lr", "number")),
    Case("wrong_type_populations", pop_run({**POPULATIONS, "num_models": "many"}), ("num_models", "integer")),
    # impossible values
    Case("negative_lr_zoo", zoo_gen(with_(ZOO, grid={"lr": [-0.1]})), ("lr", "positive")),
    Case("negative_lr_hyperrep", hr_train(with_(HYPERREP, train={"lr": -1e-3})), ("train.lr", "greater than 0")),
    Case("zero_epochs_zoo", zoo_gen({**ZOO, "epochs": 0}), ("epochs", "greater than or equal to 1")),
    Case("zero_epochs_hyperrep", hr_train(with_(HYPERREP, train={"epochs": 0})), ("train.epochs", "greater than 0")),
    Case("dropout_above_one", zoo_gen(with_(ZOO, grid={"dropout": [1.5]})), ("dropout", "[0, 1)")),
    Case("unknown_architecture", zoo_gen({**ZOO, "arch": "cnn_xl"}), ("arch", "tetris_ffn")),
    Case("more_models_than_grid", zoo_gen(ZOO, "--models", "99"), ("models", "lower --models")),
    Case("heads_not_dividing_d_model", hr_train(with_(HYPERREP, model={"d_model": 30, "heads": 4})),
         ("heads", "must divide d_model")),
    Case("latent_larger_than_model", hr_train(with_(HYPERREP, model={"latent_dim": 500})),
         ("latent_dim", "500", "100", "parameters")),
    Case("top_fraction_above_one", pop_run(with_(POPULATIONS, sampling={"top_fraction": 1.5})),
         ("top_fraction", "less than or equal to 1")),
    Case("negative_bandwidth", pop_run(with_(POPULATIONS, sampling={"bandwidth": -0.5})), ("bandwidth", "-0.5")),
    Case("unknown_sampler_method", pop_run({**POPULATIONS, "methods": ["S_GAN"]}), ("unknown method 's_gan'", "s_kde")),
    # wrong or broken data
    Case("zoo_of_another_architecture", lambda w, d: ["hyperrep", "eval", "--checkpoint", str(w / "ckpt"),
                                                      "--zoo", str(w / "cnn_zoo"), "--out", str(d / "out"),
                                                      "--tracking-uri", f"sqlite:///{d / 'mlflow.db'}"],
         ("cnn_s", "tetris_ffn")),
    Case("sample_with_another_architecture", lambda w, d: ["sample", config_file(d, "pop.yaml", POPULATIONS),
                                                           "--zoo", str(w / "cnn_zoo"), "--checkpoint", str(w / "ckpt"),
                                                           "--out", str(d / "out" / "pop.safetensors")],
         ("cnn_s", "tetris_ffn")),
    Case("empty_zoo_dir", hr_train(HYPERREP, "empty"), ("manifest.json is missing", "raysys zoo generate")),
    Case("zoo_dir_missing", hr_train(HYPERREP, "no_such_zoo"), ("raysys zoo generate",)),
    Case("zoo_all_diverged", hr_train(HYPERREP, "diverged_zoo"), ("diverged",)),
    Case("nan_weights_into_autoencoder", lambda w, d: ["sample", config_file(d, "pop.yaml", POPULATIONS),
                                                       "--zoo", str(w / "diverged_zoo"), "--checkpoint",
                                                       str(w / "ckpt"), "--out", str(d / "out" / "pop.safetensors")],
         ("diverged",)),
    Case("zoo_info_not_a_zoo", lambda w, d: ["zoo", "info", str(w / "empty")], ("not a zoo", "raysys zoo generate")),
    Case("zoo_verify_not_a_directory", lambda w, d: ["zoo", "verify", str(w / "a_file")], ("not a directory", "zoo directory")),
    Case("align_source_not_a_zoo", lambda w, d: ["zoo", "align", str(w / "empty"), "--out", str(d / "out")],
         ("not a zoo", "raysys zoo generate")),
    Case("align_source_is_a_file", lambda w, d: ["zoo", "align", str(w / "a_file"), "--out", str(d / "out")],
         ("not a directory", "zoo directory")),
    Case("align_output_is_a_file", lambda w, d: ["zoo", "align", str(w / "zoo"), "--out", str(w / "a_file")],
         ("is a file", "directory")),
    Case("align_residual_architecture", lambda w, d: ["zoo", "align", str(w / "resnet_zoo"), "--out", str(d / "out")],
         ("resnet18", "not a plain chain", "cnn_s")),
    Case("align_zero_rounds", lambda w, d: ["zoo", "align", str(w / "zoo"), "--out", str(d / "out"), "--rounds", "0"],
         ("rounds", "greater than or equal to 1")),
    Case("dataset_root_missing", zoo_gen({**ZOO, "dataset": {"name": "mnist", "root": "/nonexistent/raysys-data"}}),
         ("/nonexistent/raysys-data",)),
    Case("weights_file_missing", lambda w, d: ["finetune", config_file(d, "pop.yaml", POPULATIONS), "--zoo", str(w / "zoo"),
                                               "--weights", str(d / "pop.safetensors"), "--out", str(d / "out")],
         ("does not exist", "raysys sample")),
    Case("search_resume_nothing", lambda w, d: ["search", config_file(d, "s.yaml", SEARCH), "--zoo", str(w / "zoo"),
                                                "--out", str(d / "out"), "--resume"], ("no search to resume", "without --resume")),
    # places that are not there
    Case("unreachable_ray", zoo_gen(ZOO, "--address", "127.0.0.1:{port}"), ("cannot reach the ray cluster", "--address"), True),
    Case("unreachable_mlflow", lambda w, d: zoo_gen(ZOO)(w, d)[:-2] + ["--tracking-uri", "http://127.0.0.1:{port}"],
         ("cannot reach the mlflow server", "--tracking-uri")),
    Case("unreachable_mlflow_hyperrep", lambda w, d: hr_train(HYPERREP)(w, d)[:-2] + ["--tracking-uri",
                                                                                     "http://127.0.0.1:{port}"],
         ("cannot reach the mlflow server", "--tracking-uri")),
    Case("mlflow_file_store", lambda w, d: zoo_gen(ZOO)(w, d)[:-2] + ["--tracking-uri", str(d / "mlruns")],
         ("file store", "sqlite")),
    Case("output_is_a_file", lambda w, d: [a if a != str(d / "out") else str(w / "a_file") for a in zoo_gen(ZOO)(w, d)],
         ("is a file", "directory")),
    Case("hyperrep_output_is_a_file", lambda w, d: [a if a != str(d / "out") else str(w / "a_file")
                                                    for a in hr_train(HYPERREP)(w, d)], ("is a file", "directory")),
]


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def run(argv: list[str], in_subprocess: bool, cwd: Path, capsys) -> tuple[object, str]:
    if in_subprocess:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
        proc = subprocess.run([sys.executable, "-m", "raysys.cli", *argv], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=120)
        return proc.returncode, proc.stdout + proc.stderr
    try:
        rc = cli.main(argv)
    except BaseException:  # anything but a RaysysError escaping the CLI is itself the failure
        captured = capsys.readouterr()
        return "exception", captured.out + captured.err + traceback.format_exc()
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


@pytest.mark.slow  # the module's `world` trains a population and an autoencoder first
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error_and_writes_nothing(case, world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default ./mlflow.db or ./ray_results would land here, not in the repo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    inputs_before = snapshot(world)
    port = closed_port()
    argv = [a.replace("{port}", str(port)) for a in case.argv(world, tmp_path)]
    before = snapshot(tmp_path)

    rc, text = run(argv, case.subprocess, tmp_path, capsys)

    assert rc == 2, f"exit {rc!r}, expected 2:\n{text[-4000:]}"
    assert "Traceback" not in text, text[-4000:]
    assert text.count("raysys: error:") == 1, text[-4000:]
    message = text[text.index("raysys: error:"):].lower()
    for word in case.words:
        assert word.lower() in message, f"{word!r} not in the message:\n{message}"
    assert not (tmp_path / "out").exists(), f"{case.id} left {sorted(p.name for p in (tmp_path / 'out').rglob('*'))}"
    after = snapshot(tmp_path)
    new = {p for p in set(after) - set(before) if not p.startswith("mlflow.db")}
    assert not new, f"{case.id} wrote {sorted(new)}"
    assert not [p for p in tmp_path.rglob("*.tmp")] and not [p for p in world.rglob("*.tmp")]
    assert snapshot(world) == inputs_before, "inputs were modified"


# --- the pre-flight checks themselves (fast, no CLI) ------------------------------------------------

def test_ray_address_check_accepts_listeners_and_refuses_the_rest():
    from raysys.config import RaysysError
    from raysys.integrity import check_ray_address

    for fine in (None, "", "local", "auto"):
        check_ray_address(fine)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        check_ray_address(f"127.0.0.1:{port}")
        check_ray_address(f"ray://127.0.0.1:{port}")
    with pytest.raises(RaysysError, match="cannot reach the Ray cluster.*ray start --head"):
        check_ray_address(f"127.0.0.1:{closed_port()}")
    with pytest.raises(RaysysError, match="not host:port"):
        check_ray_address("my-cluster")


def test_tracking_check_accepts_a_live_server_and_sqlite_in_an_existing_dir(tmp_path):
    import http.server
    import threading

    from raysys.tracking import check_tracking_uri
    from raysys.tracking import TrackingError

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501: alive
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        assert check_tracking_uri(uri) == uri
    finally:
        server.shutdown()
    assert check_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}") == f"sqlite:///{tmp_path / 'm.db'}"
    check_tracking_uri(f"sqlite:///{tmp_path / 'missing' / 'm.db'}")  # MLflow creates the folder
    (tmp_path / "f").write_text("x")
    with pytest.raises(TrackingError, match="is a file, not a directory"):
        check_tracking_uri(f"sqlite:///{tmp_path / 'f' / 'm.db'}")
    with pytest.raises(TrackingError, match="is a directory"):
        check_tracking_uri(f"sqlite:///{tmp_path}")
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "missing").exists()  # checking creates nothing


def test_output_dir_check(tmp_path):
    from raysys.config import RaysysError
    from raysys.integrity import check_output_dir

    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    (tmp_path / "f").write_text("x")
    with pytest.raises(RaysysError, match="is a file"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(RaysysError, match="cannot be created"):
        check_output_dir(tmp_path / "f" / "sub")


# --- every leaf of every shipped config (issue 14, item 10) --------------------------------------------------
# Validation only, through the loader each CLI command uses: for each leaf of each config in configs/ (YAML
# walked; a list of scalars is a leaf and so is each of its elements), a wrong type, a negative value (numbers)
# and an out-of-range value (fractions) must give one ConfigError that names the key, and write nothing.

def _load_pipeline(path: Path):
    from raysys import pipeline

    cfg = pipeline.load_config(path)
    pipeline.stage_configs(cfg, path.parent)  # what 'raysys pipeline' validates before anything runs


def _loaders() -> dict:
    from raysys import search, zoo
    from raysys.config import load
    from raysys.hyperrep.config import HyperRepConfig
    from raysys.populations import PopulationsConfig

    return {"zoo": zoo.load_config, "hyperrep": lambda p: load(HyperRepConfig, p),
            "populations": lambda p: load(PopulationsConfig, p), "search": search.load_search,
            "pipeline": _load_pipeline}


KINDS = ("zoo", "hyperrep", "populations", "search", "pipeline")
FRACTIONS = {"dropout", "beta", "erase_p", "erase_low", "erase_high", "top_fraction"}  # in [0, 1]
# Leaves that legitimately take any value, and why: (kind, dotted path prefix; '#' stands for a list index).
ACCEPTS_ANY = {
    ("zoo", "dataset.options"): "free-form keyword arguments of the dataset loader, checked by it when the zoo is made",
    ("pipeline", "zoo.dataset.options"): "the same, embedded in a pipeline",
}


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list) and node and not any(isinstance(x, (dict, list)) for x in node):
        yield path, node
        for i, x in enumerate(node):
            yield (*path, i), x
    elif isinstance(node, list):
        for i, x in enumerate(node):
            yield from _leaves(x, (*path, i))
    else:
        yield path, node


def _mutations(path: tuple, value):
    keys = [p for p in path if isinstance(p, str)]
    if isinstance(value, bool):
        yield "wrong type", "yes please"
    elif isinstance(value, (int, float)):
        yield "wrong type", "not a number"
        yield "negative", -abs(value) - 1
        if keys[-1] in FRACTIONS or (keys[0] == "space" and len(keys) > 1 and keys[1] in FRACTIONS):
            yield "out of range", 1.5
    elif isinstance(value, (str, list)) or value is None:
        yield "wrong type", {"not": "this"}


def _dotted(path: tuple) -> str:
    return ".".join(p if isinstance(p, str) else "#" for p in path)


def _skip(kind: str, path: tuple) -> str | None:
    dotted = _dotted(path)
    for (k, prefix), why in ACCEPTS_ANY.items():
        if k == kind and (dotted == prefix or dotted.startswith(prefix + ".")):
            return why
    return None


def _leaf_cases():
    seen, cases = set(), []
    for kind in KINDS:
        for file in sorted((REPO / "configs" / kind).glob("*.yaml")):
            data = yaml.safe_load(file.read_text())
            for path, value in _leaves(data):
                for how, bad in _mutations(path, value):
                    key = (kind, _dotted(path), how)
                    if key in seen or _skip(kind, path):
                        continue
                    seen.add(key)
                    cases.append(pytest.param(kind, file, path, bad, id=f"{kind}:{_dotted(path)}:{how.replace(' ', '_')}"))
    return cases


LEAF_CASES = _leaf_cases()


def test_the_leaf_table_covers_every_config_kind_and_names_its_skips():
    kinds = {c.values[0] for c in LEAF_CASES}
    assert kinds == set(KINDS) and len(LEAF_CASES) > 150, (kinds, len(LEAF_CASES))
    assert all(why for why in ACCEPTS_ANY.values())  # every skip says why


@pytest.fixture(scope="module")
def configs_copy(tmp_path_factory) -> Path:
    """configs/ copied, so that a probe sits beside the files its relative paths name without ever being in the
    checkout (where another test's glob would find it)."""
    import shutil

    root = tmp_path_factory.mktemp("configs-copy") / "configs"
    shutil.copytree(REPO / "configs", root)
    return root


@pytest.mark.parametrize("kind,file,path,bad", LEAF_CASES)
def test_every_leaf_of_every_shipped_config_set_wrong_is_one_error_naming_it(kind, file, path, bad, tmp_path,
                                                                             monkeypatch, configs_copy):
    from raysys.config import RaysysError

    file = configs_copy / file.relative_to(REPO / "configs")

    data = yaml.safe_load(file.read_text())
    node = data
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = bad
    # beside the original's copy, so that relative paths (a search's base_config, a pipeline's stage files)
    # resolve; the working directory is a fresh tmp dir that must stay empty
    before = sorted(p.name for p in file.parent.iterdir())
    probe = file.parent / f".leaf-{os.getpid()}-{file.name}"
    probe.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(RaysysError) as err:
            _loaders()[kind](probe)
    finally:
        probe.unlink()
    msg = str(err.value)
    keys = [p for p in path if isinstance(p, str)]
    names = {".".join(keys), keys[-1]} | ({f"space.{keys[1]}"} if keys[0] == "space" and len(keys) > 1 else set())
    assert any(n in msg for n in names), f"{_dotted(path)} = {bad!r}: the error does not name the key:\n{msg}"
    assert "Traceback" not in msg
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())  # nothing written
    assert sorted(p.name for p in file.parent.iterdir()) == before
