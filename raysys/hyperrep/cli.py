"""``raysys hyperrep ...`` subcommands: ``train`` here; ``eval`` comes from raysys.hyperrep.evaluate when present."""
from __future__ import annotations

import importlib
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("hyperrep", help="train and evaluate hyper-representations of a zoo")
    hsub = parser.add_subparsers(dest="hyperrep_command", required=True)

    p = hsub.add_parser("train", help="train a hyper-representation autoencoder on a zoo")
    p.add_argument("config", help="YAML config (see configs/hyperrep/)")
    p.add_argument("--zoo", required=True, help="zoo directory (written by 'raysys zoo generate')")
    p.add_argument("--out", required=True, help="checkpoint directory (model.safetensors + config.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=10 (repeatable)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (absolute sqlite:////... or a .db path)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted training from OUT/resume/ (same config and zoo; the same MLflow "
                        "run); with nothing to resume, train from epoch 1")
    p.set_defaults(func=_train)

    # Hook for the evaluation stage: raysys/hyperrep/evaluate.py exposes register_eval(hsub).
    try:
        evaluate = importlib.import_module("raysys.hyperrep.evaluate")
    except ModuleNotFoundError as err:
        if err.name != "raysys.hyperrep.evaluate":
            raise
    else:
        if hasattr(evaluate, "register_eval"):
            evaluate.register_eval(hsub)


def _train(args) -> int:
    from raysys.config import load
    from raysys.hyperrep.config import HyperRepConfig
    from raysys.hyperrep.train import train

    cfg = load(HyperRepConfig, args.config, args.overrides)
    summary = train(cfg, args.zoo, args.out, tracking_uri=args.tracking_uri, resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 0
