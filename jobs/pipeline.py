"""Job: the whole pipeline (zoo -> hyper-representation -> populations -> report) on a Ray cluster.

    RAY_AUTH_MODE=token ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pipeline.py --config configs/pipeline/demo.yaml --out /mnt/shared/runs/demo

Rerunning with the same --out skips the stages whose outputs match the config.
"""
from pathlib import Path

import _common


def run():
    args = _common.parser(__doc__.splitlines()[0]).parse_args()
    address = _common.ray_address(args.address)
    from raysys import pipeline  # after argument checks: it imports torch, pyarrow and mlflow

    config = pipeline.load_config(args.config, args.set)
    if args.tracking_uri:
        config.tracking_uri = args.tracking_uri
    config.ray_address = address  # joined when a stage has work left; an all-skipped rerun needs no Ray
    report = pipeline.run_pipeline(config, args.out, config_dir=Path(args.config).parent, progress=False)
    print(f"raysys job: pipeline done: {args.out}/report.md; MLflow run {report['mlflow']['pipeline_run']} "
          f"at {report['mlflow']['tracking_uri']}", flush=True)


if __name__ == "__main__":
    _common.main(run)
