"""Where raysys runs: the one place every command starts or joins Ray.

The address is resolved the way Ray resolves it: an explicit address (``--address``, a config's
``ray_address``), else ``$RAY_ADDRESS`` (which ``ray job submit`` sets for a job's driver), else a
fresh Ray private to this process (``"local"``). An address nothing listens on fails at once
(:func:`raysys.integrity.check_ray_address`) instead of after ``ray.init``'s minutes of retries.

The console stays raysys's: a new local Ray keeps the token authentication Ray gives it, without the
banner announcing it; Ray Train's INFO lines are left out (its warnings and errors are
not); where the Ray has no dashboard, Ray Train's placement-group cleaner is not started: it asks the
dashboard's State API about the controller every few seconds and, with no dashboard, prints a
warning (or a thread traceback) each time, while the placement groups of a private Ray end with
it anyway; and the few lines in :data:`RAY_NOISE` that Ray's own actors print on every run are
dropped from the forwarded worker output, which otherwise passes unchanged (real errors included).
"""
from __future__ import annotations

import logging
import os

LOCAL = "local"
ADDRESS_HELP = "Ray address (default: $RAY_ADDRESS, else a local Ray)"
TRAIN_LOG_LEVEL = "WARNING"

_dashboard: dict[str, bool] = {}  # gcs address -> whether the Ray this process joined has a dashboard


def resolve_address(address: str | None = None) -> str:
    """``address``, else ``$RAY_ADDRESS``, else ``"local"`` (a new Ray on this machine)."""
    return address or os.environ.get("RAY_ADDRESS") or LOCAL


def init_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True) -> bool:
    """Join the Ray at :func:`resolve_address` (``address``) unless this process already has one.

    Returns True when this call initialized Ray, so the caller owns the ``ray.shutdown()``.
    ``num_cpus`` applies to a new local Ray only; a cluster has the CPUs it has.
    """
    import ray

    if ray.is_initialized():
        return False
    from raysys.integrity import check_ray_address

    where = resolve_address(address)
    check_ray_address(where)
    local = where == LOCAL
    _quiet_driver_logs()
    context = ray.init(address=where, num_cpus=num_cpus if local else None,
                       include_dashboard=False if local else None, configure_logging=False,
                       log_to_driver=log_to_driver)
    _dashboard[ray.get_runtime_context().gcs_address] = bool(getattr(context, "dashboard_url", None))
    if log_to_driver:
        _filter_worker_logs()
    return True


def cluster_tags() -> dict[str, str]:
    """MLflow tags naming the Ray this process is attached to (empty when it is attached to none)."""
    import ray

    if not ray.is_initialized():
        return {}
    ctx = ray.get_runtime_context()
    return {"raysys.ray_gcs_address": str(ctx.gcs_address), "raysys.ray_session": str(ctx.get_session_name())}


def has_dashboard() -> bool:
    """Whether the Ray this process is attached to serves the dashboard (and with it the State API)."""
    import ray

    gcs = ray.get_runtime_context().gcs_address
    if gcs not in _dashboard:  # joined by someone else (a test, a job script)
        try:
            from ray._private import worker

            _dashboard[gcs] = bool(worker._global_node.webui_url)
        except Exception:  # private API moved: assume a dashboard, i.e. keep Ray's defaults
            _dashboard[gcs] = True
    return _dashboard[gcs]


def train_logging_config():
    """Ray Train's console at WARNING: its INFO lines about worker groups are not raysys's progress."""
    import ray.train

    return ray.train.LoggingConfig(log_level=TRAIN_LOG_LEVEL)


def torch_trainer(*args, **kwargs):
    """``ray.train.torch.TorchTrainer(*args, **kwargs)``, without the placement-group cleaner where the
    Ray has no dashboard (see the module docstring)."""
    from ray.train.torch import TorchTrainer

    if has_dashboard():
        return TorchTrainer(*args, **kwargs)

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):  # a private hook: if Ray renames it, the cleaner simply stays
            callbacks = super()._create_default_callbacks()
            return [c for c in callbacks if type(c).__name__ != "PlacementGroupCleanerCallback"]

    return Trainer(*args, **kwargs)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# Ray enables token auth for every new local cluster (when RAY_AUTH_MODE is unset) and announces it each
# time: the setting stays, the announcement goes. Its other warnings (auth *disabled*) still print.
_TOKEN_BANNER = _DropMessage("Token authentication is enabled for this Ray cluster")


def _quiet_driver_logs() -> None:
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TOKEN_BANNER)
    # MLflow announces every new sqlite store at INFO; raysys prints where runs go itself
    from raysys.tracking import quiet_logs

    quiet_logs()


# Lines Ray's own actors print that say nothing about the user's work (matched as substrings).
RAY_NOISE = (
    # Ray Train's PreemptionWatcher actor, logged at error level by the controller's core worker on every run
    "has constructor arguments in the object store and max_restarts > 0",
)


# Warnings Ray's actors print *with a traceback* that say nothing about the user's work: the line and the
# traceback under it go. Ray Train's controller asks the (absent, on a local Ray) autoscaler for resources
# and logs each 5 s timeout on a busy CPU with its stack; Ray itself calls it safe to ignore.
RAY_NOISE_WITH_TRACEBACK = ("Failed to send resource request for train-",)


def _drop_noise(lines: list[str]) -> list[str]:
    kept, in_traceback = [], False
    for line in lines:
        if any(n in line for n in RAY_NOISE_WITH_TRACEBACK):
            in_traceback = True  # this line, then its "Traceback ...", indented frames and the exception line
            continue
        if in_traceback:
            if line.startswith(("Traceback", " ", "\t")) or not line.strip():
                continue
            in_traceback = False
            if line.split(":")[0].replace(".", "").replace("_", "").isalnum() and ":" in line:
                continue  # the exception line closing the traceback, e.g. "ray.exceptions.GetTimeoutError: ..."
        if not any(n in line for n in RAY_NOISE):
            kept.append(line)
    return kept


def quiet_handler(handler):
    """``handler`` (of Ray's forwarded worker output) without the lines in :data:`RAY_NOISE` and the warnings of
    :data:`RAY_NOISE_WITH_TRACEBACK` with their tracebacks."""
    if getattr(handler, "raysys_quiet", False):
        return handler

    def handle(data):
        lines = _drop_noise(data.get("lines", []))
        if lines:
            handler({**data, "lines": lines})

    handle.raysys_quiet = True
    return handle


def _filter_worker_logs() -> None:
    """Drop :data:`RAY_NOISE` from the worker output Ray forwards to this driver; every other line passes."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # private API moved: print everything
        return
    with dispatcher._lock:
        dispatcher.handlers = [(name, quiet_handler(h) if name == "ray_print_logs" else h)
                               for name, h in dispatcher.handlers]


# --- MLflow in a helper process ------------------------------------------------------------------------

class TrackingProcess:
    """One MLflow run kept by a helper process, so that importing MLflow (and its database layer: about two
    seconds of single-threaded imports) runs on another core while this process loads the data and trains.

    Created early (it imports MLflow at once), used late: :meth:`run` opens the run with
    :func:`raysys.tracking.start_run` in the helper and ends it FINISHED, FAILED (the block raised) or KILLED
    (Ctrl-C) as that function does; metrics and artifacts go through it. The helper ignores Ctrl-C (this
    process decides how the run ends); if this process dies, the helper ends the run FAILED and exits.
    Errors in the helper come back as :class:`raysys.tracking.TrackingError` with the helper's message."""

    def __init__(self, tracking_uri: str):
        import multiprocessing as mp
        import threading

        ctx = mp.get_context("spawn")  # a fresh interpreter: no torch, no Ray, no threads inherited
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_tracking_main, args=(child, tracking_uri), daemon=True,
                                 name="raysys-mlflow")
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        self.run_id: str | None = None

    def _call(self, *msg):
        from raysys.tracking import TrackingError

        with self._lock:
            try:
                self._conn.send(msg)
                reply = self._conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                raise TrackingError(f"the MLflow helper process ended unexpectedly (exit code "
                                    f"{self._proc.exitcode}) during '{msg[0]}'") from None
        if reply[0] == "error":
            raise TrackingError(reply[1])
        return reply[1:]

    def run(self, experiment: str, run_name: str | None, tags: dict, params: dict):
        from contextlib import contextmanager

        @contextmanager
        def opened():
            (self.run_id,) = self._call("start", experiment, run_name, tags, params)
            status = "FINISHED"
            try:
                yield self
            except KeyboardInterrupt:
                status = "KILLED"
                raise
            except BaseException:
                status = "FAILED"
                raise
            finally:
                try:
                    self._call("end", status)
                except Exception:
                    if status == "FINISHED":
                        raise
        return opened()

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._call("metrics", {k: float(v) for k, v in metrics.items()}, step)

    def log_artifact(self, path) -> None:
        self._call("artifact", str(path))

    def close(self) -> None:
        try:
            with self._lock:
                self._conn.send(("close",))
                self._conn.recv()
        except Exception:  # noqa: S110 - it is gone already
            pass
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.terminate()
        self._conn.close()


def _tracking_main(conn, tracking_uri: str) -> None:
    """The helper's loop (see :class:`TrackingProcess`)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_ctx = None
    try:
        import mlflow

        from raysys import tracking

        if tracking_uri.startswith(("sqlite:", "postgresql:", "mysql:", "mssql:")):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401 - warm: the run's store needs it
    except Exception as err:  # answered on the first request
        import_error: str | None = f"cannot import MLflow: {type(err).__name__}: {err}"
    else:
        import_error = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            msg = ("end", "FAILED") if run_ctx is not None else ("close",)
            if run_ctx is not None:
                try:
                    run_ctx.__exit__(RuntimeError, RuntimeError("the raysys process ended"), None)
                except Exception:  # noqa: S110 - nobody is left to tell
                    pass
            return
        kind = msg[0]
        try:
            if import_error:
                raise RuntimeError(import_error)
            if kind == "start":
                _, experiment, run_name, tags, params = msg
                run_ctx = tracking.start_run(tracking_uri, experiment, run_name=run_name, tags=tags, params=params)
                run = run_ctx.__enter__()
                conn.send(("ok", run.info.run_id))
            elif kind == "metrics":
                mlflow.log_metrics(msg[1], step=msg[2])
                conn.send(("ok",))
            elif kind == "artifact":
                mlflow.log_artifact(msg[1])
                conn.send(("ok",))
            elif kind == "end":
                ctx, run_ctx = run_ctx, None
                if ctx is not None:
                    if msg[1] == "FINISHED":
                        ctx.__exit__(None, None, None)
                    elif msg[1] == "KILLED":
                        ctx.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
                    else:
                        ctx.__exit__(RuntimeError, RuntimeError("the zoo generation failed"), None)
                conn.send(("ok",))
            elif kind == "close":
                conn.send(("ok",))
                return
        except Exception as err:
            text = str(err) if type(err).__name__ == "TrackingError" else f"MLflow: {type(err).__name__}: {err}"
            try:
                conn.send(("error", text))
            except Exception:
                return
