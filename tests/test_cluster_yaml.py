"""The cluster launcher configs validate against Ray's own schema and keep raysys's deployment rules:
token auth on every node, MLflow on the head with an absolute database path, CUDA-capable installs."""
from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["cluster.yaml", "cluster-onprem.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_validates_against_ray_schema(name):
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(name)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:
        import jsonschema
    except ImportError:  # ray's helper below needs it too; say so rather than pass vacuously
        pytest.skip("jsonschema is not installed (pip install jsonschema)")
    jsonschema.validate(config, schema)
    # what `ray up` does before launching: merge the provider defaults, then validate again
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_schema_check_catches_a_typo():
    """Guard against the test above passing vacuously: the schema must reject an unknown key."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    bad = load("cluster.yaml")
    bad["available_node_types"]["gpu_worker"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_starts_ray_with_token_auth(name):
    config = load(name)
    # the launching machine's token is copied to every node
    assert any(k.endswith(".ray/auth_token") and v == "~/.ray/auth_token" for k, v in config["file_mounts"].items())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, key
        assert all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert any("RAY_AUTH_MODE=token" in c for c in config["setup_commands"])


@pytest.mark.parametrize("name", CONFIGS)
def test_head_runs_mlflow_server_that_raysys_accepts(name):
    from raysys import cli, mlflow_server

    parser = cli.build_parser()

    config = load(name)
    serve = [c for c in config["head_start_ray_commands"] if "raysys mlflow serve" in c]
    assert len(serve) == 1
    words = shlex.split(serve[0].split("raysys ", 1)[1].split(">", 1)[0].replace("$HOME", "/home/u"))
    args = parser.parse_args(words)
    assert args.func.target == "raysys.mlflow_server:serve"
    mlflow_server.check_backend_store_uri(args.backend_store_uri)  # absolute sqlite, or raises
    assert args.artifacts_destination.startswith("/mnt/shared")
    # workers log to the head's server
    assert any("MLFLOW_TRACKING_URI=http://" in c for c in config["worker_setup_commands"])


def test_aws_gpu_workers_autoscale_and_install_cuda_torch():
    config = load("cluster.yaml")
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    gpu = [v for v in workers.values() if v.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu and all(v["min_workers"] < v["max_workers"] for v in gpu)
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0
    install = [c for c in config["setup_commands"] if "pip install" in c and "raysys" in c]
    # the laptop pins (constraints.txt) select the CPU torch wheel; the cluster must not use them
    assert install and not any("constraints" in c for c in install)
    assert ".gitignore" in config["rsync_filter"]


def test_onprem_lists_its_machines():
    config = load("cluster-onprem.yaml")
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]


def test_mlflow_serve_command_is_local_and_absolute(tmp_path, monkeypatch):
    from raysys.config import ConfigError
    from raysys.mlflow_server import server_command

    monkeypatch.chdir(tmp_path)
    cmd = server_command(backend_store_uri="sqlite:///rel/mlflow.db", artifacts_destination="art")

    def opt(cmd, name):
        return cmd[cmd.index(name) + 1]

    assert cmd[1:4] == ["-m", "mlflow", "server"] and opt(cmd, "--host") == "127.0.0.1"
    assert opt(cmd, "--backend-store-uri") == f"sqlite:///{tmp_path / 'rel' / 'mlflow.db'}"
    assert opt(cmd, "--artifacts-destination") == str(tmp_path / "art")
    pg = server_command(backend_store_uri="postgresql://u@db/mlflow")
    assert opt(pg, "--backend-store-uri") == "postgresql://u@db/mlflow"
    for bad in ("file:///tmp/mlruns", "/tmp/mlruns"):
        with pytest.raises(ConfigError, match="file store"):
            server_command(backend_store_uri=bad)
    with pytest.raises(ConfigError, match="port"):
        server_command(port=70000)
