"""Job: hyper-representation search (Ray Tune + Optuna) on the cluster.

    RAY_AUTH_MODE=token ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/search.py configs/search/digits.yaml --zoo /mnt/shared/zoos/digits --out /mnt/shared/search/digits

Arguments are those of `raysys search` (see `raysys search --help`); this script only connects to
the cluster first, so every trial runs on the cluster's workers.
"""
import sys

import _common


def run():
    import importlib

    from raysys.config import RaysysError

    try:
        search = importlib.import_module("raysys.search")
    except ModuleNotFoundError:
        search = None
    argv = sys.argv[1:]
    if search is not None and hasattr(search, "main"):
        entry = search.main
    elif search is not None and hasattr(search, "register"):
        from raysys.cli import main as cli_main

        def entry(args):
            return cli_main(["search", *args])
    else:
        raise RaysysError("this raysys has no search stage (raysys.search with main() or a 'raysys search' command). "
                          "Update the working dir to a raysys version that has it, or use jobs/hyperrep.py.")
    if "-h" not in argv and "--help" not in argv:
        _common.connect(_common.ray_address(None))  # the search then finds Ray initialized
    status = entry(argv)
    if status:
        sys.exit(int(status))


if __name__ == "__main__":
    _common.main(run)
