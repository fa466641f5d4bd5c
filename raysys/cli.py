"""The ``raysys`` command. Each stage module registers its own subcommands, so stages stay independent.

A stage module exposes ``register(subparsers)`` that adds its parsers and sets ``func`` on them.
Errors the user can fix (:class:`raysys.config.RaysysError`) print as one message, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from raysys import __version__
from raysys.config import RaysysError

STAGE_MODULES = [
    "raysys.zoo",
    "raysys.hyperrep.cli",
    "raysys.populations.cli",
    "raysys.search",
    "raysys.pipeline",
    "raysys.mlflow_server",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysys", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"raysys {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and (err.name == name or name.startswith(err.name + ".")):
                continue  # stage not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except RaysysError as err:
        print(f"raysys: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raysys: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
