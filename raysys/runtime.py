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
