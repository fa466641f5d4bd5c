"""Job: train (and evaluate) a hyper-representation autoencoder on a zoo, on a GPU node if asked.

    RAY_AUTH_MODE=token ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/hyperrep.py --config configs/hyperrep/digits.yaml \
        --zoo /mnt/shared/zoos/digits --out /mnt/shared/hyperrep/digits --gpus 1
"""
import _common


def run():
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--zoo", required=True, help="zoo directory on shared storage")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs for the training task (the job driver has none)")
    p.add_argument("--no-evaluate", action="store_true", help="skip probes and figures (OUT/eval)")
    args = p.parse_args()
    out, zoo_dir, address = _common.local_out(args.out), _common.local_out(args.zoo), _common.ray_address(args.address)
    from raysys.config import apply_overrides, read_yaml, validate
    from raysys.hyperrep.config import HyperRepConfig
    from raysys.pipeline import train_autoencoder
    from raysys.tracking import resolve_tracking_uri

    config = validate(HyperRepConfig, apply_overrides(read_yaml(args.config), args.set), source=args.config)
    _common.connect(address)
    run_id = train_autoencoder(config, zoo_dir, out, resolve_tracking_uri(args.tracking_uri),
                               not args.no_evaluate, args.gpus, progress=False)
    print(f"raysys job: autoencoder in {out} (MLflow run {run_id})", flush=True)


if __name__ == "__main__":
    _common.main(run)
