"""Job: generate (or resume) a model zoo on the cluster's Ray Train workers.

    RAY_AUTH_MODE=token ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/zoo.py --config configs/zoo/digits-seed.yaml --out /mnt/shared/zoos/digits-seed

--out may also be s3://bucket/prefix (credentials and AWS_ENDPOINT_URL through the standard AWS variables).
"""
import _common


def run():
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: the config's, else one per CPU of the cluster)")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker")
    args = p.parse_args()
    overrides = list(args.set or [])
    if args.tracking_uri:
        overrides.append(f"mlflow.tracking_uri={args.tracking_uri}")
    if args.workers:
        overrides.append(f"resources.num_workers={args.workers}")
    if args.gpu:
        overrides.append("resources.use_gpu=true")
    from raysys.storage import is_remote

    # s3://bucket/prefix (any pyarrow filesystem URI): the workers publish their shards there themselves
    out = args.out if is_remote(args.out) else _common.local_out(args.out)
    address = _common.ray_address(args.address)
    from raysys import zoo

    _common.connect(address)
    manifest = zoo.generate(args.config, out, overrides, progress=False)
    print(f"raysys job: zoo {manifest['name']} complete: {manifest['num_models']} models in {out}", flush=True)


if __name__ == "__main__":
    _common.main(run)
