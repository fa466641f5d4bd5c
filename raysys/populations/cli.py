"""CLI of the populations stage.

    raysys sample CONFIG --zoo ZOO --checkpoint CKPT --method S_KDE30 --out pop.safetensors
    raysys finetune CONFIG --zoo ZOO --weights pop.safetensors [--dataset fontdigits] --out DIR
    raysys populations run CONFIG --zoo ZOO --checkpoint CKPT [--nolwln-checkpoint CKPT2] --out DIR
    raysys populations report DIR
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from raysys.config import RaysysError, load


def _config(args):
    from raysys.populations.config import PopulationsConfig
    return load(PopulationsConfig, args.config, args.overrides)


def _ray_init(address: str | None):
    import ray

    from raysys.runtime import init_ray

    init_ray(address)  # --address, else $RAY_ADDRESS, else a private local Ray
    return ray


def cmd_sample(args) -> int:
    from raysys.populations import stage

    cfg = _config(args)
    if args.num_models is not None:
        cfg.num_models = args.num_models
    if args.method in ("B_T", "B_F"):
        raise RaysysError(f"{args.method} is trained, not sampled. Use 'raysys populations run' for baselines.")
    aes = stage.load_autoencoders(args.checkpoint, args.nolwln_checkpoint)
    cfg, view, anchors = stage.prepare(cfg, args.zoo, aes)
    if args.method == "B_KDE30" and "nolwln" not in aes:
        raise RaysysError("B_KDE30 needs the autoencoder trained without LWLN: pass --nolwln-checkpoint DIR.")
    # The same seed as 'populations run': this is exactly the population the stage would fine-tune.
    W = stage.initial_weights(args.method, cfg, anchors, aes, view, max(cfg.anchor_epochs),
                              stage._method_seed(cfg, "generate", args.method))
    if W is None:  # B_T, refused above
        raise RaysysError(f"{args.method} has no initial weights to write")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage._save_population(out, W)
    # A quick sanity evaluation of what was generated, before anyone fine-tunes it.
    from raysys.populations.novelty import predict
    activation = stage._specs(view, cfg)[0].activation
    acc = (predict(view.arch, W, view.data.x_test, activation, view.layout.num_classes)
           == view.data.y_test.numpy()[None]).mean(axis=1)
    print(f"wrote {len(W)} {args.method} models ({W.shape[1]} parameters) to {out}; "
          f"test accuracy before fine-tuning {100 * acc.mean():.1f} % (std {100 * acc.std():.1f})")
    return 0


def cmd_finetune(args) -> int:
    from safetensors.numpy import load_file
    from tqdm.auto import tqdm  # noqa: F401  (progress bar inside run_jobs)

    from raysys import datasets
    from raysys.populations import finetune, stage
    from raysys.store import atomic_write_json

    cfg = _config(args)
    path = Path(args.weights)
    if not path.exists():
        raise RaysysError(f"{path} does not exist. Write a population with 'raysys sample ... --out {path}'.")
    W = load_file(str(path))["weights"]
    cfg.num_models = len(W)
    view = stage.ZooView(args.zoo, [], cfg.dataset_options)
    dataset = args.dataset or view.dataset_name
    options = view.dataset_options if dataset == view.dataset_name else \
        (cfg.transfer.dataset_options if cfg.transfer and dataset == cfg.transfer.dataset else {})
    datasets.load(dataset, **options)  # fail here, not inside an actor, on a bad name
    epochs = max(cfg.finetune.budgets)
    job = finetune.Job(name=path.stem, setting="in_dataset" if dataset == view.dataset_name else "transfer",
                       arch=view.arch, dataset=dataset, specs=stage._specs(view, cfg), epochs=epochs,
                       weights=W, dataset_options=options)
    _ray_init(args.address)
    res = finetune.run_jobs([job], 1, cfg.finetune.cpus_per_actor, cfg.finetune.gpus_per_actor,
                            progress=not getattr(args, "no_progress", False))[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "finetune.json", {
        "weights": str(path.resolve()), "dataset": dataset, "epochs": epochs,
        "metrics": {k: v.tolist() for k, v in res["metrics"].items()}})
    acc = res["metrics"]["test_acc"]
    for b in cfg.finetune.budgets:
        print(f"epoch {b:3d}: test accuracy {100 * np.nanmean(acc[b]):.1f} % (std {100 * np.nanstd(acc[b]):.1f})")
    print(f"wrote {out / 'finetune.json'}")
    return 0


def cmd_run(args) -> int:
    from raysys.populations.stage import run_populations

    cfg = _config(args)
    _ray_init(args.address)
    results = run_populations(cfg, args.zoo, args.checkpoint, args.out, args.nolwln_checkpoint,
                              tracking_uri=args.tracking_uri, progress=not getattr(args, "no_progress", False))
    print(Path(results["report_files"]["markdown"]).read_text())
    print(f"results in {Path(args.out).resolve()}")
    return 0


def cmd_report(args) -> int:
    from raysys.populations import report
    from raysys.populations.stage import load_results

    files = report.write_report(load_results(args.dir), args.dir)
    print(Path(files["markdown"]).read_text())
    print(json.dumps(files, indent=2))
    return 0
