"""The CLI's conventions, shared by every command: a fast, user-facing ``--help`` that imports no stage code;
the Ray address resolved as Ray resolves it (``--address``, else ``$RAY_ADDRESS``, else a local Ray);
one MLflow default; ``--no-progress`` on every long command; ``zoo info --json``; zoo workers that
default to the machine's CPUs; and a quiet console."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raysys import cli, runtime
from raysys.config import RaysysError

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("ray", "torch", "mlflow", "pyarrow", "pandas", "numpy", "scipy", "sklearn")

RAY_COMMANDS = [("zoo", "generate"), ("search",), ("pipeline",), ("finetune",), ("populations", "run")]
LONG_COMMANDS = [("zoo", "generate"), ("zoo", "align"), ("hyperrep", "train"), ("hyperrep", "eval"), ("search",),
                 ("pipeline",), ("finetune",), ("populations", "run")]


def subparser(*path: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def all_commands(parser=None, path=()):
    parser = parser or cli.build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from all_commands(child, (*path, name))


# --- raysys --help --------------------------------------------------------------------------------

def test_building_the_parser_imports_no_heavy_module():
    code = ("import sys, raysys.cli as c; c.build_parser(); "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_help_is_a_user_facing_summary():
    out = subprocess.run([sys.executable, "-m", "raysys.cli", "--help"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.startswith("usage: raysys")
    assert "Learn from populations of neural networks (model zoos) on Ray" in out
    assert "$RAY_ADDRESS" in out and "sqlite:///$PWD/mlflow.db" in out
    assert "Each stage module registers" not in out and "handler" not in out  # not the module docstring
    for command in ("zoo", "hyperrep", "populations", "search", "pipeline", "mlflow"):
        assert f"    {command}" in out


def test_every_handler_exists():
    for path, parser in all_commands():
        target = parser.get_default("func").target
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), (path, target)


# --- Ray address ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", RAY_COMMANDS, ids=" ".join)
def test_every_ray_command_takes_an_address(path):
    opt = options(subparser(*path))["--address"]
    assert opt.help == runtime.ADDRESS_HELP == "Ray address (default: $RAY_ADDRESS, else a local Ray)"


def test_hyperrep_train_says_it_runs_without_ray():
    parser = subparser("hyperrep", "train")
    assert "--address" not in options(parser) and "no Ray" in parser.description


def test_address_precedence(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert runtime.resolve_address(None) == "local"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert runtime.resolve_address(None) == "10.0.0.5:6379"
    assert runtime.resolve_address("ray://head:10001") == "ray://head:10001"
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert runtime.resolve_address(None) == "local"


class FakeRay:
    def __init__(self):
        self.calls = []

    def is_initialized(self):
        return bool(self.calls)

    def init(self, **kwargs):
        self.calls.append(kwargs)
        return argparse.Namespace(dashboard_url="")

    def get_runtime_context(self):
        return argparse.Namespace(gcs_address="127.0.0.1:1")


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    fake = FakeRay()
    for name in ("init", "is_initialized", "get_runtime_context"):
        monkeypatch.setattr(ray, name, getattr(fake, name))
    monkeypatch.setattr("raysys.integrity.check_ray_address", lambda address: None)
    return fake


@pytest.mark.parametrize("explicit,env,expected", [
    (None, None, "local"),
    (None, "10.0.0.5:6379", "10.0.0.5:6379"),
    ("10.0.0.7:6379", "10.0.0.5:6379", "10.0.0.7:6379"),
    ("local", "10.0.0.5:6379", "local"),
])
def test_init_ray_joins_the_resolved_address(fake_ray, monkeypatch, explicit, env, expected):
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert runtime.init_ray(explicit, num_cpus=2) is True
    (call,) = fake_ray.calls
    assert call["address"] == expected
    local = expected == "local"
    assert call["include_dashboard"] is (False if local else None)
    assert call["num_cpus"] == (2 if local else None)  # a cluster has the CPUs it has
    assert runtime.init_ray(explicit) is False and len(fake_ray.calls) == 1  # joined once; the caller owns shutdown


def test_an_unreachable_address_fails_before_ray_init(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init must not be reached"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(RaysysError, match="cannot reach the Ray cluster at 127.0.0.1:9"):
        runtime.init_ray()


def test_stage_commands_pass_the_address_on(monkeypatch, tmp_path):
    """zoo generate -> ray_address; pipeline -> config.ray_address; search -> run_search(address=)."""
    from raysys import pipeline, search, zoo

    seen = {}
    monkeypatch.setattr(zoo, "generate", lambda config, out, progress: seen.setdefault("zoo", (config.ray_address,
                                                                                                progress)) and 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["zoo", "generate", str(ROOT / "configs/zoo/tetris-seed.yaml"), "--out", str(tmp_path / "z"),
                  "--address", "10.0.0.5:6379", "--no-progress"])
    assert seen["zoo"] == ("10.0.0.5:6379", False)

    monkeypatch.setattr(pipeline, "run_pipeline", lambda config, out, config_dir, progress: seen.setdefault(
        "pipeline", (config.ray_address, config.tracking_uri, progress)) and 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["pipeline", str(ROOT / "configs/pipeline/tiny.yaml"), "--out", str(tmp_path / "p"),
                  "--address", "auto", "--tracking-uri", "http://127.0.0.1:5999", "--no-progress"])
    assert seen["pipeline"] == ("auto", "http://127.0.0.1:5999", False)

    monkeypatch.setattr(search, "run_search", lambda *a, **kw: seen.setdefault("search", kw) and 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["search", str(ROOT / "configs/search/laptop.yaml"), "--zoo", str(tmp_path), "--out",
                  str(tmp_path / "s"), "--address", "auto", "--no-progress"])
    assert seen["search"]["address"] == "auto" and seen["search"]["progress"] is False


# --- MLflow default, --no-progress ----------------------------------------------------------------

def test_every_tracking_uri_option_names_the_one_default():
    found = []
    for path, parser in all_commands():
        opt = options(parser).get("--tracking-uri")
        if opt is not None:
            found.append(path)
            assert "sqlite:///$PWD/mlflow.db" in opt.help and "<out>" not in opt.help, path
    assert len(found) >= 6, found


@pytest.mark.parametrize("path", LONG_COMMANDS, ids=" ".join)
def test_every_long_command_has_no_progress(path):
    assert "--no-progress" in options(subparser(*path))


def test_default_tracking_uri_is_the_same_for_every_stage(tmp_path, monkeypatch):
    from raysys import tracking
    from raysys.populations.config import PopulationsConfig
    from raysys.populations.stage import _tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    default = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.resolve_tracking_uri(None) == default
    cfg = PopulationsConfig.model_validate(yaml.safe_load((ROOT / "configs/populations/digits.yaml").read_text()))
    assert _tracking_uri(cfg, tmp_path / "populations-out", None) == default


# --- zoo info --json, workers ---------------------------------------------------------------------

def test_zoo_info_json(tmp_path, capsys):
    from raysys import datasets
    from raysys.architectures import layout_of
    from raysys.config import validate
    from raysys.store import ZooWriter, splits_for
    from raysys.zoo import ZooConfig, expand, plan_shards, train_shard

    c = validate(ZooConfig, {"name": "t", "dataset": {"name": "tetris"}, "arch": "tetris_ffn",
                             "seeds": {"count": 2}, "epochs": 1})
    specs = expand(c)
    writer = ZooWriter(tmp_path)
    train_shard(c.arch, plan_shards(specs, 2)[0], specs, datasets.load("tetris"), 1, splits_for(2, 0), writer)
    writer.write_manifest({"name": "t", "arch": "tetris_ffn", "status": "complete", "num_models": 2,
                           "dataset": {"name": "tetris"}, "layout": layout_of("tetris_ffn", 1, 4).to_dict()})
    assert cli.main(["zoo", "info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dir"] == str(tmp_path.resolve()) and info["name"] == "t" and info["models"] == 2
    assert info["rows"] == 4 and info["epochs"] == [0, 1] and info["num_params"] == 100
    assert set(info["test_acc_last"]) == {"mean", "std"} and 0 <= info["test_acc_last"]["mean"] <= 1


def test_zoo_workers_default_to_the_cpus_of_the_ray(monkeypatch):
    import ray

    from raysys.config import validate
    from raysys.zoo import ZooConfig, _resolve_workers

    base = {"name": "t", "dataset": {"name": "tetris"}, "arch": "tetris_ffn", "seeds": {"count": 2}, "epochs": 1}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 6.0, "GPU": 2.0})
    cfg = validate(ZooConfig, base)
    assert cfg.resources.num_workers is None
    assert _resolve_workers(cfg).resources.num_workers == 6 and cfg.resources.num_workers is None
    half = validate(ZooConfig, {**base, "resources": {"cpus_per_worker": 4}})
    assert _resolve_workers(half).resources.num_workers == 1
    assert _resolve_workers(validate(ZooConfig, {**base, "resources": {"use_gpu": True}})).resources.num_workers == 2
    assert _resolve_workers(validate(ZooConfig, {**base, "resources": {"num_workers": 3}})).resources.num_workers == 3


def test_shipped_zoo_configs_do_not_pin_one_worker():
    pinned = [p.name for p in sorted((ROOT / "configs" / "zoo").glob("*.yaml"))
              if (yaml.safe_load(p.read_text()).get("resources") or {}).get("num_workers") == 1]
    assert not pinned, pinned


# --- a quiet console ------------------------------------------------------------------------------

RAY_NOISE = ("PlacementGroupCleaner", "Failed to query Ray Train Controller actor state",
             "Token authentication is enabled", "Traceback", "core_worker.cc", "Creating initial MLflow database")


@pytest.mark.slow
def test_zoo_generate_prints_raysys_output_only(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"name": "quiet", "dataset": {"name": "tetris"}, "arch": "tetris_ffn",
                                   "seeds": {"count": 2}, "epochs": 1}))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    res = subprocess.run([sys.executable, "-m", "raysys.cli", "zoo", "generate", str(cfg), "--out", str(tmp_path / "z"),
                          "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-progress"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "zoo          quiet (complete)" in res.stdout
    noise = [n for n in RAY_NOISE if n in res.stderr]
    assert not noise, f"{noise} in:\n{res.stderr[-3000:]}"


def test_worker_log_filter_drops_only_ray_noise():
    got = []
    handler = runtime.quiet_handler(lambda data: got.append(data["lines"]))
    assert runtime.quiet_handler(handler) is handler  # wrapped once, however often Ray is joined
    noise = ("core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: 'x' has constructor "
             "arguments in the object store and max_restarts > 0")
    handler({"lines": [noise, "RuntimeError: a real error"], "is_err": True})
    handler({"lines": [noise], "is_err": True})
    assert got == [["RuntimeError: a real error"]]


def test_worker_log_filter_drops_a_noisy_warning_with_its_traceback_and_keeps_the_next_error():
    got = []
    handler = runtime.quiet_handler(lambda data: got.append(data["lines"]))
    handler({"lines": [
        "Failed to send resource request for train-c6d4. If this only happens transiently during network partition "
        "or CPU being overloaded, it's safe to ignore this error. If this error persists, file a GitHub issue.",
        "Traceback (most recent call last):",
        '  File "autoscaling_coordinator_client.py", line 57, in send_resource_request',
        "    ray.get(",
        "           ^^^^^^^^^^^^^^^^^^^",
        "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
        "Traceback (most recent call last):",
        '  File "train_fn.py", line 3, in train',
        "ValueError: the user's own error",
    ], "is_err": True})
    assert got == [["Traceback (most recent call last):", '  File "train_fn.py", line 3, in train',
                    "ValueError: the user's own error"]]
