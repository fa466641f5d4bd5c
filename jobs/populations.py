"""Job: sample populations from a hyper-representation, fine-tune them on Ray actors, write the report.

    RAY_AUTH_MODE=token ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/populations.py --config configs/populations/digits.yaml --zoo /mnt/shared/zoos/digits \
        --checkpoint /mnt/shared/hyperrep/digits --out /mnt/shared/populations/digits
"""
import _common


def run():
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--zoo", required=True, help="zoo directory on shared storage")
    p.add_argument("--checkpoint", required=True, help="autoencoder checkpoint directory")
    p.add_argument("--nolwln-checkpoint", default=None, help="autoencoder trained without LWLN (for B_KDE30)")
    args = p.parse_args()
    out, address = _common.local_out(args.out), _common.ray_address(args.address)
    nolwln = _common.local_out(args.nolwln_checkpoint) if args.nolwln_checkpoint else None
    from raysys.config import apply_overrides, read_yaml, validate
    from raysys.populations import PopulationsConfig, run_populations

    config = validate(PopulationsConfig, apply_overrides(read_yaml(args.config), args.set), source=args.config)
    _common.connect(address)
    results = run_populations(config, _common.local_out(args.zoo), _common.local_out(args.checkpoint), out, nolwln,
                              tracking_uri=args.tracking_uri, progress=False)
    print(f"raysys job: {len(results['populations'])} populations; report in {out}/report.md", flush=True)


if __name__ == "__main__":
    _common.main(run)
