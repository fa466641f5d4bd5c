"""Security properties of the code and the shipped configs, checked by reading them.

* no pickle (or dill/cloudpickle/joblib/shelve/marshal) on the data path: the one exception is the
  restricted CIFAR unpickler in raysys/datasets.py, which only resolves numpy array globals;
* every ``torch.load`` passes ``weights_only=True``; no ``torch.save`` (checkpoints are safetensors);
  no ``numpy.load(..., allow_pickle=True)``, no ``pandas.read_pickle``;
* YAML is read only with ``yaml.safe_load``;
* every Ray node starts with token auth, the dashboard (and its job-submission API) binds to
  localhost, and every documented ``ray job submit`` carries ``RAY_AUTH_MODE=token``;
* ``raysys mlflow serve`` binds to 127.0.0.1 unless told otherwise;
* no credentials in configs/, cluster configs or job files, and none reach MLflow params.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).absolute().parents[1]
CODE = sorted([*REPO.glob("raysys/**/*.py"), *REPO.glob("jobs/**/*.py")])
PICKLERS = {"pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "_pickle"}
ALLOWED_PICKLE = {REPO / "raysys" / "datasets.py"}  # RestrictedUnpickler for the CIFAR python batches


def tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(), filename=str(path))


def dotted(node: ast.AST) -> str:
    """'torch.load' for torch.load, 'yaml.safe_load' for yaml.safe_load, '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def calls(path: Path):
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Call):
            yield node, dotted(node.func)


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


def test_the_scan_sees_the_code():
    names = {p.relative_to(REPO).as_posix() for p in CODE}
    assert {"raysys/store.py", "raysys/datasets.py", "raysys/hyperrep/checkpoint.py", "jobs/_common.py"} <= names


def test_no_pickle_on_the_data_path():
    offenders = [f"{p.relative_to(REPO)}: imports {sorted(imported_modules(p) & PICKLERS)}" for p in CODE
                 if imported_modules(p) & PICKLERS and p not in ALLOWED_PICKLE]
    assert not offenders, offenders
    # The allowed module unpickles only through the restricted class, never pickle.load(s).
    datasets = REPO / "raysys" / "datasets.py"
    direct = [where(datasets, n) for n, name in calls(datasets) if name in ("pickle.load", "pickle.loads", "pickle.Unpickler")]
    assert not direct, direct
    classes = [n for n in ast.walk(tree(datasets)) if isinstance(n, ast.ClassDef)]
    restricted = [c for c in classes if any(dotted(b) == "pickle.Unpickler" for b in c.bases)]
    assert len(restricted) == 1 and any(isinstance(f, ast.FunctionDef) and f.name == "find_class"
                                        for f in restricted[0].body), "the CIFAR unpickler must override find_class"


def test_the_restricted_unpickler_refuses_code():
    import io
    import os
    import pickle

    from raysys.config import RaysysError
    from raysys.datasets import RestrictedUnpickler

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(RaysysError, match="refusing"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()


def test_torch_load_is_weights_only_and_nothing_is_torch_saved():
    bad = []
    for p in CODE:
        for node, name in calls(p):
            if name == "torch.load":
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)
                if not ok:
                    bad.append(f"{where(p, node)} torch.load without weights_only=True")
            elif name in ("torch.save", "pandas.read_pickle", "pd.read_pickle", "pickle.dump", "pickle.dumps"):
                bad.append(f"{where(p, node)} {name}")
            elif name in ("np.load", "numpy.load"):
                if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                       for k in node.keywords):
                    bad.append(f"{where(p, node)} np.load with allow_pickle")
    assert not bad, bad


def test_yaml_is_only_safe_loaded():
    bad = []
    for p in CODE:
        for node, name in calls(p):
            if name.startswith("yaml.") and name.split(".")[-1] in ("load", "load_all", "unsafe_load", "full_load",
                                                                     "unsafe_load_all", "full_load_all"):
                bad.append(f"{where(p, node)} {name}")
        for node in ast.walk(tree(p)):
            if isinstance(node, ast.Attribute) and dotted(node) in ("yaml.Loader", "yaml.UnsafeLoader", "yaml.FullLoader"):
                bad.append(f"{where(p, node)} {dotted(node)}")
    assert not bad, bad
    # and the shared loader really is safe: a python object tag is refused
    from raysys.config import ConfigError, read_yaml

    evil = REPO / "tests" / ".evil-test-security.yaml"
    try:
        evil.write_text("x: !!python/object/apply:os.system ['echo pwned']\n")
        with pytest.raises(ConfigError, match="not valid YAML"):
            read_yaml(evil)
    finally:
        evil.unlink(missing_ok=True)


CLUSTERS = sorted(REPO.glob("cluster*.yaml"))


@pytest.mark.parametrize("path", CLUSTERS, ids=[p.name for p in CLUSTERS])
def test_cluster_nodes_use_token_auth_and_a_local_dashboard(path):
    config = yaml.safe_load(path.read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config.get(key, [])
              if "ray start" in c]
    assert starts, f"{path.name} starts no Ray"
    assert all("RAY_AUTH_MODE=token" in c for c in starts), starts
    heads = [c for c in config.get("head_start_ray_commands", []) if "ray start" in c]
    # the dashboard serves the job-submission API: it must not listen on every interface
    assert heads and all("--dashboard-host=127.0.0.1" in c for c in heads), heads


@pytest.mark.parametrize("path", CLUSTERS, ids=[p.name for p in CLUSTERS])
def test_the_mlflow_server_of_a_cluster_listens_on_one_private_address_not_every_interface(path):
    """Item 6: the head's MLflow server has no auth on sqlite: it binds the head's private address (the one the
    nodes' MLFLOW_TRACKING_URI names), never 0.0.0.0; and the docs name the basic-auth app and PostgreSQL."""
    config = yaml.safe_load(path.read_text())
    serve = [c for c in config.get("head_start_ray_commands", []) if "mlflow serve" in c or "mlflow server" in c]
    assert serve, f"{path.name} starts no MLflow server"
    for command in serve:
        host = re.search(r"--host[ =](\S+)", command)
        assert host and host.group(1) not in ("0.0.0.0", "::", "[::]"), command  # noqa: S104
    text = path.read_text() + (REPO / "README.md").read_text()
    assert "0.0.0.0" not in path.read_text()  # noqa: S104
    assert "--app-name basic-auth" in text and "postgresql://" in text


def test_every_documented_job_submission_uses_token_auth():
    files = [*CLUSTERS, *REPO.glob("jobs/*.py"), *REPO.glob("jobs/*.yaml"), *REPO.glob("docs/*.md"), REPO / "README.md"]
    examples = []
    for path in files:
        if not path.exists():
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip().lstrip("#$ ").strip()
            # a command line (not prose that mentions the command in backticks)
            if re.match(r"^(RAY_AUTH_MODE=\S+\s+)?ray job submit\b", stripped):
                examples.append((f"{path.relative_to(REPO)}:{n}", stripped))
    assert examples, "no documented 'ray job submit' found"
    missing = [w for w, s in examples if not s.startswith("RAY_AUTH_MODE=token ")]
    assert not missing, f"'ray job submit' without RAY_AUTH_MODE=token at {missing}"


def test_mlflow_serve_binds_to_localhost_by_default(capsys):
    from raysys import cli

    assert cli.main(["mlflow", "serve", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--host 127.0.0.1" in out and "0.0.0.0" not in out
    parser = cli.build_parser()
    args = parser.parse_args(["mlflow", "serve"])
    assert args.host == "127.0.0.1"


SECRET = re.compile(
    r"(?i)(aws_secret_access_key|aws_access_key_id|secret|password|passwd|api[_-]?key|access[_-]?key|"
    r"private[_-]?key|bearer)\s*[:=]\s*['\"]?[A-Za-z0-9/+_\-]{6,}"
    r"|AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|://[^/\s:@]+:[^/\s@]+@")


def test_no_credentials_in_configs_cluster_files_or_jobs():
    files = [*REPO.glob("configs/**/*.yaml"), *CLUSTERS, *REPO.glob("jobs/*"), *REPO.glob("benchmarks/*.py")]
    assert files
    hits = []
    for path in files:
        if path.is_file():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if SECRET.search(line):
                    hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:80]}")
    assert not hits, hits


def test_the_secret_pattern_catches_what_it_should():
    for leak in ("password: hunter2hunter2", "AWS_SECRET_ACCESS_KEY=abcdefgh12345678",
                 "tracking_uri: https://alice:s3cretpw@mlflow.example.com", "AKIAABCDEFGHIJKLMNOP"):
        assert SECRET.search(leak), leak
    for fine in ("auth: {ssh_user: ubuntu}", '"/home/ubuntu/.ray/auth_token": "~/.ray/auth_token"',
                 "tracking_uri: sqlite:////home/ubuntu/mlflow/mlflow.db"):
        assert not SECRET.search(fine), fine


def test_credentials_in_a_tracking_uri_never_reach_mlflow_params():
    from raysys.tracking import flatten_params

    params = flatten_params({"mlflow": {"tracking_uri": "https://alice:s3cretpw@mlflow.example.com/"},
                             "dataset": {"root": "/data"}})
    text = " ".join(params.values())
    assert "s3cretpw" not in text and "mlflow.example.com" in text
    assert params["dataset.root"] == "/data"


def test_a_password_in_a_tracking_uri_is_masked_in_errors_and_server_output(capsys):
    import socket

    from raysys import cli
    from raysys.tracking import check_tracking_uri
    from raysys.tracking import TrackingError, mask_uri

    assert mask_uri("postgresql://alice:s3cretpw@db:5432/mlflow") == "postgresql://alice:***@db:5432/mlflow"
    assert mask_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TrackingError) as err:
        check_tracking_uri(f"http://alice:s3cretpw@127.0.0.1:{port}")
    assert "s3cretpw" not in str(err.value) and "alice:***@127.0.0.1" in str(err.value)
    assert cli.main(["mlflow", "serve", "--dry-run",
                     "--backend-store-uri", "postgresql://alice:s3cretpw@db:5432/mlflow"]) == 0
    out = capsys.readouterr()
    assert "s3cretpw" not in out.out + out.err and "alice:***@db" in out.out + out.err


# --- item 6: a password in the tracking URI is never written -----------------------------------------

PASSWORD = "hunter2-x9q"  # noqa: S105 - the test's own fake password ('secret' is in MLflow's schema)
SECRET_URI = "http://alice:" + PASSWORD + "@127.0.0.1:{port}"


def _files_with(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in Path(root).rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_state_and_records_written_with_a_password_uri_hold_no_password(tmp_path, monkeypatch):
    """The lowest-level writers (no server): the search's state.json, the pipeline's tracking.json, the
    populations' results config; a resume takes the password from the URI passed again, $MLFLOW_TRACKING_URI,
    or MLflow's $MLFLOW_TRACKING_USERNAME/PASSWORD, and otherwise says so."""
    from raysys import pipeline, search
    from raysys.tracking import TrackingError, mask_secrets, with_credentials

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    uri = SECRET_URI.format(port=5000)
    search.write_state(tmp_path, {"tracking_uri": uri, "experiment_id": "1", "parent_run_id": "r", "zoo": "/z"})
    cfg = pipeline.load_config(REPO / "configs" / "pipeline" / "tiny.yaml", [f"tracking_uri={uri}"])
    out = tmp_path / "run"
    out.mkdir()
    pipeline.record_tracking_uri(out, uri)
    assert mask_secrets({"a": [uri, 1], "b": None}) == {"a": ["http://alice:***@127.0.0.1:5000", 1], "b": None}
    assert not _files_with(tmp_path, PASSWORD.encode())
    stored = json.loads((tmp_path / "state.json").read_text())["tracking_uri"]
    assert stored == "http://alice:***@127.0.0.1:5000"

    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_PASSWORD") as err:
        with_credentials(stored)
    assert "--tracking-uri" in str(err.value) and PASSWORD not in str(err.value)
    assert with_credentials(stored, uri) == uri  # the URI passed again
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    assert with_credentials(stored) == uri
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "carol")
    assert with_credentials(stored) == f"http://carol:{PASSWORD}@127.0.0.1:5000"
    assert with_credentials("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    # the pipeline's rerun: the recorded (masked) URI plus the password from the environment
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    cfg.tracking_uri = None
    assert pipeline.tracking_uri(cfg, out) == uri


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` (no auth: it ignores the basic-auth header) on a free local port."""
    import subprocess
    import time
    import urllib.request

    from raysys.mlflow_server import server_command

    port = _free_port()
    cmd = server_command("127.0.0.1", port, f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}",
                         str(tmp_path / "server" / "artifacts"))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)  # noqa: S603
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)  # noqa: S310
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.5)
        yield port, tmp_path / "server"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_search_with_a_password_uri_writes_it_nowhere_and_resumes_from_the_environment(
        tmp_path, mlflow_server, ray_local, monkeypatch, capsys):
    """A real search against a real MLflow server through http://alice:PASSWORD@...: no file the search wrote
    (state.json, search_config.yaml, Tune's tuner.pkl and trial files, results), nothing MLflow stored (params,
    tags, artifacts) and nothing printed holds the password; --resume with MLflow's $MLFLOW_TRACKING_PASSWORD
    finds the parent run again."""
    from tests.test_search import TINY_BASE, make_zoo, search_config

    from raysys.search import run_search

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    port, server_dir = mlflow_server
    uri = SECRET_URI.format(port=port)
    zoo, out = make_zoo(tmp_path / "zoo"), tmp_path / "search"
    cfg = search_config(num_samples=1, max_concurrent=1, objectives=["recon_r2"],
                        base={**TINY_BASE, "train": {**TINY_BASE["train"], "epochs": 1, "epoch_window": [1, 2]}})
    run_search(cfg, zoo, out, tracking_uri=uri, progress=False)  # as --tracking-uri passes it
    state = json.loads((out / "state.json").read_text())
    assert state["tracking_uri"] == f"http://alice:***@127.0.0.1:{port}"
    assert (out / "tune" / "search" / "tuner.pkl").exists()
    assert not _files_with(out, PASSWORD.encode()), "password written to disk"
    assert not _files_with(server_dir, PASSWORD.encode()), "password reached MLflow"
    printed = capsys.readouterr()
    assert PASSWORD not in printed.out + printed.err

    # the pipeline's MLflow run (as run_pipeline links it): params, tags, and the report's URI are masked
    from raysys import pipeline

    linked = pipeline.link_runs(uri, pipeline.load_config(REPO / "configs" / "pipeline" / "tiny.yaml"),
                                tmp_path / "run", {"zoo": None}, {"hashes": {"zoo": "abc"}})
    assert linked["tracking_uri"] == f"http://alice:***@127.0.0.1:{port}"
    assert not _files_with(server_dir, PASSWORD.encode())

    from raysys.config import RaysysError

    with pytest.raises(RaysysError, match="MLFLOW_TRACKING_PASSWORD"):
        run_search(cfg, zoo, out, resume=True, progress=False)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    run_search(cfg, zoo, out, resume=True, progress=False)  # the parent run is found on the server again
    printed = capsys.readouterr()
    assert PASSWORD not in printed.out + printed.err
    assert not _files_with(out, PASSWORD.encode()) and not _files_with(server_dir, PASSWORD.encode())
