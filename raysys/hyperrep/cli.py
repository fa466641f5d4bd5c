"""Handler of ``raysys hyperrep train`` (its arguments are in raysys/cli.py; ``eval`` and ``baselines`` are in
raysys.hyperrep.evaluate). Training runs in this process: it does not use Ray."""
from __future__ import annotations

import json


def _train(args) -> int:
    from raysys.config import load
    from raysys.hyperrep.config import HyperRepConfig
    from raysys.hyperrep.train import train

    cfg = load(HyperRepConfig, args.config, args.overrides)
    summary = train(cfg, args.zoo, args.out, tracking_uri=args.tracking_uri, resume=args.resume,
                    progress=not getattr(args, "no_progress", False))
    print(json.dumps(summary, indent=2))
    return 0
