"""Job: hyper-representation search (Ray Tune + Optuna) on the cluster.

    RAY_AUTH_MODE=token ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/search.py configs/search/cluster.yaml --zoo /mnt/shared/zoos/mnist-seed --out /mnt/shared/search/mnist

Arguments are those of `raysys search` (see `raysys search --help`); this script only connects to
the cluster first, so every trial runs on the cluster's workers.
"""
import sys

import _common


def run():
    from raysys.cli import main as cli_main

    argv = sys.argv[1:]
    if "-h" not in argv and "--help" not in argv:
        _common.connect(_common.ray_address(None))  # the search then finds Ray initialized
    status = cli_main(["search", *argv])
    if status:
        sys.exit(int(status))


if __name__ == "__main__":
    _common.main(run)
