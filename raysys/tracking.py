"""MLflow helpers shared by every stage: one place that decides where runs go and how configs become params.

MLflow 3 refuses the old file store, and Ray Tune changes the working directory of trials, so
every tracking URI is made absolute here before anything talks to MLflow. Every experiment raysys
creates comes from :func:`experiment_id`, which tags it as a model-training experiment
(:data:`EXPERIMENT_KIND_TAG`), so MLflow 3's UI opens it on the runs table rather than its GenAI
overview. MLflow's INFO lines about creating and migrating a sqlite store are not printed
(:func:`quiet_logs`); its warnings and errors are.
"""
from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlparse

from raysys.config import RaysysError

if TYPE_CHECKING:
    import mlflow

DEFAULT_DB = "mlflow.db"
# The experiment tag MLflow 3's UI reads to pick an experiment's layout ("genai_development" opens the
# GenAI overview; "custom_model_development" the runs table). Values from mlflow/server/js's ExperimentKind.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# Loggers whose INFO lines announce a new or migrated sqlite store ("Creating initial MLflow database
# tables...", alembic's "Context impl SQLiteImpl."): raysys says where runs go itself.
QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration")
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
PARAM_BATCH = 100  # MLflow's limit on params in one log_batch
PARENT_TAG = "mlflow.parentRunId"  # the tag MLflow's UI nests a child run under its parent by
PROBE_TIMEOUT_S = 3.0  # a server that does not answer /health in this long is taken as not there
# user:password@ in a URI; the password may hold '@' (the last one before the path ends it)
CREDENTIALS = re.compile(r"(://[^/\s:@]+):[^/\s]+@")
MASKED = ":***@"
# MLflow's own variables for HTTP basic auth (mlflow.environment_variables); raysys reads them to resume
# from a URI it stored masked.
USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


class TrackingError(RaysysError):
    pass


def resolve_tracking_uri(uri: str | None = None) -> str:
    """An absolute tracking URI.

    ``None`` means ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db``. Relative
    sqlite paths become absolute (a Tune trial runs in another directory); servers (http, https,
    databricks, postgresql, mysql, ...) pass through; file stores are refused.
    """
    if uri is None or uri == "":
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path in ("", ":memory:"):
            raise TrackingError(f"tracking URI '{uri}' names no database file. "
                                f"Use e.g. --tracking-uri sqlite:///{Path.cwd() / DEFAULT_DB}.")
        # sqlite:////abs/x.db has path "/abs/x.db"; sqlite:///x.db is relative to the cwd.
        return f"sqlite:///{Path(path).expanduser().resolve()}"
    if uri.startswith("sqlite:"):
        raise TrackingError(f"tracking URI '{uri}' is not a sqlite file URI. Write sqlite:////absolute/path/mlflow.db "
                            f"(four slashes for an absolute path).")
    if uri.startswith("file:") or "://" not in uri:
        path = uri[len("file:"):].lstrip("/") if uri.startswith("file:") else uri
        suggestion = Path("/" + path if uri.startswith("file:") else path).expanduser().resolve()
        suggestion = suggestion if suggestion.suffix == ".db" else suggestion / DEFAULT_DB
        raise TrackingError(f"tracking URI '{uri}' is an MLflow file store, which MLflow 3 refuses. "
                            f"Use a sqlite database instead, e.g. --tracking-uri sqlite:///{suggestion}, "
                            f"or an MLflow server (http://host:5000).")
    return uri


def check_tracking_uri(uri: str | None) -> str:
    """Resolve an MLflow tracking URI and check it can be used: a server answers, a sqlite file's folder exists."""
    uri = resolve_tracking_uri(uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            # without user:password@ (urllib takes it for the host); a server that wants them answers 401: reached
            host = f"[{parsed.hostname}]" if ":" in (parsed.hostname or "") else parsed.hostname or ""
            probe = parsed._replace(netloc=host + (f":{parsed.port}" if parsed.port else "")).geturl()
            with urllib.request.urlopen(probe.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S):  # noqa: S310 - http(s)
                pass
        except urllib.error.HTTPError:
            pass  # something answered: an MLflow behind a proxy may not expose /health
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(f"cannot reach the MLflow server at {mask_uri(uri)} ({reason}). Start it ('raysys mlflow serve') "
                                f"or fix --tracking-uri; or log locally with --tracking-uri "
                                f"sqlite:////absolute/path/mlflow.db.") from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if db.is_dir():
            raise TrackingError(f"the MLflow database {db} is a directory. Name a file: --tracking-uri sqlite:///{db / 'mlflow.db'}.")
        ancestor = db.parent
        while not ancestor.exists():  # MLflow creates missing folders, but not through a file
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise TrackingError(f"the MLflow database {db} cannot be created: {ancestor} is a file, not a directory. "
                                f"Pass --tracking-uri sqlite:////a/directory/mlflow.db.")
    return uri


def flatten_params(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists -> {"a.b": "value"}; lists of scalars stay one value ("[1, 2]")."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten_params(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in data):
        for i, v in enumerate(data):
            out.update(flatten_params(v, f"{prefix}.{i}"))
        return out
    # A URI may carry a password (https://user:pw@host); params are readable by anyone with the UI.
    text = mask_uri(str(list(data) if isinstance(data, tuple) else data))
    out[prefix or "value"] = text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 3] + "..."
    return out


def mask_uri(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` replaced by ``***``: for messages,
    reports and params, which others read (postgresql://u:s3cret@db/x -> postgresql://u:***@db/x)."""
    return CREDENTIALS.sub(r"\1:***@", text)


def mask_secrets(obj: Any) -> Any:
    """``obj`` (dicts, lists, strings) with :func:`mask_uri` applied to every string: what may be written to disk."""
    if isinstance(obj, str):
        return mask_uri(obj)
    if isinstance(obj, dict):
        return {k: mask_secrets(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mask_secrets(v) for v in obj]
    return obj


def with_credentials(stored: str, given: str | None = None) -> str:
    """The URI to talk to, from one raysys wrote to disk masked (``http://user:***@host``).

    ``given`` (the URI the user passes again) or ``$MLFLOW_TRACKING_URI`` when it masks to ``stored``; else the password from
    ``$MLFLOW_TRACKING_PASSWORD`` (and the user from ``$MLFLOW_TRACKING_USERNAME``, else the URI's); a URI
    without a masked password comes back as it is. Otherwise a :class:`TrackingError` naming both ways.
    """
    for uri in (given, os.environ.get("MLFLOW_TRACKING_URI")):
        if uri and mask_uri(uri) == stored:
            return uri
    if MASKED not in stored:
        return stored
    password = os.environ.get(PASSWORD_ENV)
    if password:
        head, tail = stored.split(MASKED, 1)
        scheme, user = head.rsplit("://", 1)
        return f"{scheme}://{os.environ.get(USERNAME_ENV) or user}:{password}@{tail}"
    raise TrackingError(f"the tracking URI was stored without its password ({stored}). Pass it again "
                        f"(--tracking-uri), or set {USERNAME_ENV} and {PASSWORD_ENV}.")

@contextmanager
def start_run(tracking_uri: str | None, experiment: str, run_name: str | None = None,
              tags: dict[str, str] | None = None, params: dict | None = None,
              run_id: str | None = None) -> Iterator["mlflow.ActiveRun"]:
    """An MLflow run in experiment ``experiment`` (created if missing), params flattened from ``params``.

    ``run_id`` continues that existing run (as ``$MLFLOW_RUN_ID`` does) instead of starting one.
    The fluent (``mlflow.log_metric``) run of this process; a run logged to from another thread or a driver that
    holds several at once is :func:`new_run`'s. The run ends FAILED if the block raises, KILLED on Ctrl-C, FINISHED otherwise.
    """
    import mlflow

    quiet_logs()
    uri = check_tracking_uri(tracking_uri)  # resolves it too
    no_links_with_passwords(uri)
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment_id=experiment_id(uri, experiment))
    except Exception as err:  # an unreachable server or a locked/corrupt db: say where and how to fix
        raise TrackingError(mask_uri(f"cannot open MLflow experiment '{experiment}' at {uri}: {err}. "
                                     f"Check --tracking-uri (or mlflow.tracking_uri in the config).")) from None
    with mlflow.start_run(run_id=run_id, run_name=run_name, tags=tags) as run:
        if params:
            log_params(client(uri), run.info.run_id, params)
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")
            raise


def experiment_id(tracking_uri: str | None, name: str) -> str:
    """The id of experiment ``name``, created if missing with its artifacts beside a sqlite database.

    The one place raysys creates experiments. Left to MLflow, an experiment created on a sqlite
    store keeps its artifacts in ./mlruns of whichever directory the first run happened to start
    in (Tune trials change it); with a server, the server decides. Each is tagged as a model-training
    experiment (:data:`EXPERIMENT_KIND_TAG`), an existing one without a kind too (made by an older raysys).
    """
    uri = resolve_tracking_uri(tracking_uri)
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # a kind someone chose in the UI stays
            _set_kind(c, exp.experiment_id)
        return exp.experiment_id
    root = Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name if uri.startswith("sqlite:///") else None
    try:
        return c.create_experiment(name, artifact_location=None if root is None else str(root),
                                   tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    except Exception:  # created by a concurrent process in the meantime
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _set_kind(c, exp_id: str) -> None:
    try:
        c.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    except Exception:  # noqa: S110 - a read-only user or server: the UI merely opens another tab first
        pass


def quiet_logs() -> None:
    """MLflow's and alembic's INFO lines about creating/migrating a database off the console (idempotent)."""
    import logging

    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


def no_links_with_passwords(uri: str) -> None:
    """MLflow prints a link to every run it ends on a server ("View run ... at: http://user:pw@host/..."):
    not when the URI holds a password."""
    if CREDENTIALS.search(uri):
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def client(tracking_uri: str | None = None):
    """An ``MlflowClient`` on the resolved URI (thread-safe logging from a progress thread)."""
    from mlflow.tracking import MlflowClient

    quiet_logs()
    uri = resolve_tracking_uri(tracking_uri)
    no_links_with_passwords(uri)
    return MlflowClient(tracking_uri=uri)


def log_params(c, run_id: str, params: dict | None) -> None:
    """``params`` flattened (:func:`flatten_params`: nested keys joined by dots, URIs masked, long values cut) onto
    run ``run_id`` in MLflow's batches of :data:`PARAM_BATCH`: the one place raysys logs params."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in flatten_params(params or {}).items()]
    for i in range(0, len(items), PARAM_BATCH):
        c.log_batch(run_id, params=items[i:i + PARAM_BATCH])


def new_run(tracking_uri: str | None, experiment: str | None = None, run_name: str | None = None,
            tags: dict[str, str] | None = None, params: dict | None = None, parent: str | None = None,
            exp_id: str | None = None):
    """``(client, run_id)``: a RUNNING run created through an explicit ``MlflowClient`` (no global state: safe
    in a Tune trial, a progress thread, or a driver holding a parent and its children at once).

    In experiment ``experiment`` (created if missing, :func:`experiment_id`), or the one whose id is
    ``exp_id``; ``parent`` nests it under that run (:data:`PARENT_TAG`); params as :func:`log_params`.
    The caller ends it (``client.set_terminated(run_id, status)``)."""
    uri = resolve_tracking_uri(tracking_uri)
    c = client(uri)
    exp = exp_id if exp_id is not None else experiment_id(uri, experiment or "Default")
    tags = {**(tags or {}), **({PARENT_TAG: parent} if parent else {})}
    run_id = c.create_run(exp, run_name=run_name, tags=tags).info.run_id
    if params:
        log_params(c, run_id, params)
    return c, run_id


def tag_runs(c, links: dict[str, dict[str, str | None]]) -> None:
    """Link runs by tags: ``{run_id: {tag: value}}``, empty run ids and values skipped (a stage that did not run)."""
    for run_id, tags in links.items():
        if not run_id:
            continue
        for key, value in tags.items():
            if value:
                c.set_tag(run_id, key, value)
