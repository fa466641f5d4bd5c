"""Zoo training throughput: the plain per-model loop vs the vectorized population trainer.

Both sides run in ONE invocation, side by side, on the same models, data, batch size, epochs
and per-epoch evaluation (epoch 0 included), so the ratio holds even on a noisy shared machine:

  (a) loop:       ``--procs`` single-thread processes, each running ``train_one`` over its share
                  of the models (the way one would parallelise the plain loop: one per core);
  (b) population: ``--procs`` single-thread processes, each running ``train_population`` on its
                  share of the models as one batched computation.

Each worker loads everything, then waits at a barrier; the time is from the barrier to the last
worker's end, so process start-up and imports are not counted on either side.

    python benchmarks/zoo_throughput.py                      # CNN-s on digits, 3 alternating repeats, ~1 minute
    python benchmarks/zoo_throughput.py --quick              # smoke run
    python benchmarks/zoo_throughput.py --json /tmp/tp.json  # also write the result
    python benchmarks/zoo_throughput.py --gpu-zoo            # 1000 CNN-s x 50 epochs, 60k images, one CUDA GPU
    python benchmarks/zoo_throughput.py --cli                # + the real `raysys zoo generate` at two sizes

``--cli`` adds a third side: the command a user runs, ``raysys zoo generate configs/zoo/digits-seed.yaml
--models N --epochs E --workers PROCS`` in a fresh process (imports, Ray, Ray Train, evaluation, Parquet,
MLflow, progress, shut-down: everything), at ``--cli-models`` A and B models. Its *marginal* cost, (wall(B) -
wall(A)) / ((B - A) x E) seconds per model-epoch, cancels the fixed cost and is set beside the population side's
seconds per model-epoch on populations of the same size per process (A / PROCS: the default 100 and 200 are
whole 50-model shards, two and four, so the workers get equal shares). All sides alternate within each repeat.
The wall time of the smallest zoo (``--tiny``: 2 models x 1 epoch, the same command) is reported too.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysys import datasets  # noqa: E402
from raysys.datasets import ImageData  # noqa: E402
from raysys.batched_trainer import train_population  # noqa: E402
from raysys.train import ModelSpec, train_one  # noqa: E402

INITS = ("kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal")


def make_specs(n: int, activation: str, optimizer: str, batch_size: int, dropout: float) -> list[ModelSpec]:
    """A seed-and-hyperparameter zoo of one population key: varied seeds, inits, lrs, weight decays."""
    lrs = (1e-3, 3e-4, 3e-3) if optimizer == "adam" else (0.03, 0.01, 0.1)
    return [ModelSpec(model_id=i, seed=1000 + i, init=INITS[i % len(INITS)], activation=activation, optimizer=optimizer,
                      lr=lrs[i % len(lrs)], weight_decay=(0.0, 1e-4, 1e-3)[i % 3], dropout=dropout,
                      batch_size=batch_size) for i in range(n)]


def _worker(mode: str, arch: str, specs: list[ModelSpec], dataset: str, epochs: int, threads: int,
            barrier, results) -> None:
    torch.set_num_threads(threads)
    data = datasets.load(dataset)
    evaluated = [0]

    def on_epoch(epoch, weights, metrics):  # what a zoo writer receives; forces per-epoch evaluation
        evaluated[0] += len(weights)

    barrier.wait()
    start, cpu_start = time.perf_counter(), time.process_time()
    if mode == "loop":
        for spec in specs:
            train_one(arch, spec, data, epochs, on_epoch)
    else:
        train_population(arch, specs, data, epochs, on_epoch)
    results.put((mode, time.perf_counter() - start, time.time(), evaluated[0], time.process_time() - cpu_start))


def run_side(mode: str, arch: str, specs: list[ModelSpec], dataset: str, epochs: int, procs: int, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs + 1), ctx.Queue()
    shares = [specs[i::procs] for i in range(procs)]
    workers = [ctx.Process(target=_worker, args=(mode, arch, share, dataset, epochs, threads, barrier, results))
               for share in shares if share]
    for w in workers:
        w.start()
    barrier.wait()
    t0 = time.time()
    out = [results.get() for _ in workers]
    for w in workers:
        w.join()
        if w.exitcode != 0:
            raise SystemExit(f"{mode} worker failed with exit code {w.exitcode}")
    wall = max(o[2] for o in out) - t0
    cpu = sum(o[4] for o in out)
    assert sum(o[3] for o in out) == len(specs) * (epochs + 1), "every model must report every epoch"
    model_epochs = len(specs) * epochs
    # CPU seconds are the steadier measure on a shared machine: other users' load stretches wall
    # time, not (much) the CPU time our own work needs.
    return {"mode": mode, "processes": len(workers), "threads_per_process": threads, "wall_s": round(wall, 3),
            "worker_s": [round(o[1], 3) for o in out], "cpu_s": round(cpu, 3), "model_epochs": model_epochs,
            "model_epochs_per_s": round(model_epochs / wall, 3),
            "model_epochs_per_cpu_s": round(model_epochs / cpu, 4)}


REPO = Path(__file__).resolve().parents[1]
CLI_CONFIG = REPO / "configs" / "zoo" / "digits-seed.yaml"  # CNN-s on digits, tanh, Adam, batch 10: the kernel sides' setting


def run_cli(models: int, epochs: int, workers: int | None, work: Path) -> dict:
    """Wall time of one real `raysys zoo generate` in a fresh process (a new output directory, MLflow in work/)."""
    out = Path(tempfile.mkdtemp(prefix=f"zoo-{models}-", dir=work))
    shutil.rmtree(out)
    cmd = [sys.executable, "-m", "raysys.cli", "zoo", "generate", str(CLI_CONFIG), "--out", str(out),
           "--models", str(models), "--set", f"seeds.count={max(models, 100)}", "--epochs", str(epochs), "--no-progress",
           "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local run, as on a laptop
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"raysys zoo generate failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return {"models": models, "epochs": epochs, "workers": workers, "wall_s": round(wall, 3)}


def cpu_benchmark(args) -> dict:
    specs = make_specs(args.models, args.activation, args.optimizer, args.batch_size, args.dropout)
    print(f"{args.arch} on {args.dataset}: {args.models} models x {args.epochs} epochs, batch {args.batch_size}, "
          f"{args.optimizer}, {args.procs} processes x 1 thread per side, {args.repeats} alternating repeat(s)", flush=True)
    # The sides alternate (loop, population, loop, ...), so a burst of load from other users hits
    # both; each repeat gives a ratio and the median of them is the result.
    if args.cli:
        small, big = args.cli_models
        work = Path(tempfile.mkdtemp(prefix="raysys-zoo-throughput-"))
        print(f"  --cli: raysys zoo generate {CLI_CONFIG.relative_to(REPO)} at {small} and {big} models x {args.epochs} "
              f"epochs, --workers {args.procs}; tiny: 2 models x 1 epoch; work dir {work}", flush=True)
    repeats = []
    for r in range(args.repeats):
        sides = {mode: run_side(mode, args.arch, specs, args.dataset, args.epochs, args.procs, 1)
                 for mode in ("loop", "population")}
        ratio = sides["population"]["model_epochs_per_s"] / sides["loop"]["model_epochs_per_s"]
        cpu_ratio = sides["population"]["model_epochs_per_cpu_s"] / sides["loop"]["model_epochs_per_cpu_s"]
        rep = {"loop": sides["loop"], "population": sides["population"], "speedup": round(ratio, 3),
               "speedup_per_cpu_s": round(cpu_ratio, 3), "load_avg_1min": os.getloadavg()[0]}
        for mode in ("loop", "population"):
            s = sides[mode]
            print(f"  [{r + 1}] {mode:<11} {s['model_epochs_per_s']:8.2f} model-epochs/s  (wall {s['wall_s']:.1f} s, "
                  f"{s['model_epochs_per_cpu_s']:.3f} model-epochs per CPU-s)", flush=True)
        print(f"  [{r + 1}] speed-up    {ratio:8.2f}x wall, {cpu_ratio:.2f}x per CPU-second "
              f"(1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", flush=True)
        if args.cli:
            tiny = run_cli(2, 1, None, work)
            a = run_cli(small, args.epochs, args.procs, work)
            b = run_cli(big, args.epochs, args.procs, work)
            marginal = (b["wall_s"] - a["wall_s"]) / ((big - small) * args.epochs)
            kernel = 1.0 / sides["population"]["model_epochs_per_s"]
            rep["cli"] = {"tiny_wall_s": tiny["wall_s"], "small": a, "big": b,
                          "marginal_s_per_model_epoch": round(marginal, 5),
                          "marginal_model_epochs_per_s": round(1.0 / marginal, 3) if marginal > 0 else None,
                          "kernel_s_per_model_epoch": round(kernel, 5),
                          "cli_vs_kernel": round(kernel / marginal, 3) if marginal > 0 else None,
                          "cli_vs_loop": round(sides["loop"]["wall_s"] / sides["loop"]["model_epochs"] / marginal, 3)
                          if marginal > 0 else None}
            c = rep["cli"]
            print(f"  [{r + 1}] cli         {c['marginal_model_epochs_per_s'] or float('nan'):8.2f} model-epochs/s marginal "
                  f"({small}: {a['wall_s']:.1f} s, {big}: {b['wall_s']:.1f} s) = {c['cli_vs_kernel'] or float('nan'):.2f}x "
                  f"the kernels, {c['cli_vs_loop'] or float('nan'):.2f}x the loop; tiny zoo {tiny['wall_s']:.1f} s", flush=True)
        repeats.append(rep)
    median = lambda key: sorted(x[key] for x in repeats)[len(repeats) // 2]  # noqa: E731
    ratio, cpu_ratio = median("speedup"), median("speedup_per_cpu_s")
    if args.repeats > 1:
        print(f"  median      {ratio:8.2f}x wall, {cpu_ratio:.2f}x per CPU-second over {args.repeats} repeats", flush=True)
    result = {"benchmark": "zoo_throughput", "arch": args.arch, "dataset": args.dataset, "models": args.models,
              "epochs": args.epochs, "batch_size": args.batch_size, "optimizer": args.optimizer,
              "activation": args.activation, "dropout": args.dropout, "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "repeats": repeats, "speedup": ratio, "speedup_per_cpu_s": cpu_ratio}
    if args.cli:
        shutil.rmtree(work, ignore_errors=True)
        med = lambda key: sorted(x["cli"][key] or 0.0 for x in repeats)[len(repeats) // 2]  # noqa: E731
        result["cli"] = {"config": str(CLI_CONFIG.relative_to(REPO)), "models": [small, big], "workers": args.procs,
                         "cli_vs_kernel": med("cli_vs_kernel"), "cli_vs_loop": med("cli_vs_loop"),
                         "marginal_s_per_model_epoch": med("marginal_s_per_model_epoch"),
                         "tiny_wall_s": med("tiny_wall_s")}
        print(f"  median cli  {result['cli']['cli_vs_kernel']:.2f}x the kernels' throughput (1.00 = as fast), "
              f"{result['cli']['cli_vs_loop']:.2f}x the loop, tiny zoo {result['cli']['tiny_wall_s']:.1f} s", flush=True)
    return result


def synthetic_mnist(seed: int = 0, n_train: int = 60_000, n_val: int = 5_000, n_test: int = 10_000) -> ImageData:
    """MNIST-sized random images (28x28, 10 classes), generated on the spot: no download needed."""
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.rand(n, 1, 28, 28, generator=g)  # noqa: E731
    y = lambda n: torch.randint(0, 10, (n,), generator=g)  # noqa: E731
    return ImageData("synthetic_mnist", x(n_train), y(n_train), x(n_val), y(n_val), x(n_test), y(n_test), 10,
                     {"synthetic": True, "seed": seed})


def gpu_zoo(args) -> dict:
    if not torch.cuda.is_available():
        print("--gpu-zoo needs a CUDA GPU and none is visible here: skipped.")
        return {"benchmark": "zoo_throughput_gpu", "skipped": "no CUDA device"}
    models, epochs = args.models or 1000, args.epochs or 50
    data = synthetic_mnist()
    specs = make_specs(models, args.activation, args.optimizer, args.batch_size, args.dropout)
    times = []
    torch.cuda.synchronize()
    start = time.perf_counter()

    def on_epoch(epoch, weights, metrics):  # weights arrive on the CPU, as the zoo writer gets them
        times.append(time.perf_counter() - start)
        print(f"  epoch {epoch:3d}  {times[-1]:8.1f} s  mean val_acc {metrics['val_acc'].mean():.3f}", flush=True)

    train_population("cnn_s", specs, data, epochs, on_epoch, device="cuda")
    wall = time.perf_counter() - start
    result = {"benchmark": "zoo_throughput_gpu", "device": torch.cuda.get_device_name(), "models": models,
              "epochs": epochs, "train_images": len(data.x_train), "batch_size": args.batch_size,
              "wall_s": round(wall, 1), "epoch_times_s": [round(t, 2) for t in times],
              "model_epochs_per_s": round(models * epochs / wall, 2)}
    print(f"{models} models x {epochs} epochs in {wall:.0f} s: {result['model_epochs_per_s']} model-epochs/s")
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=None, help="zoo size (default 48; --quick 6; --gpu-zoo 1000)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 2; --quick 1; --gpu-zoo 50)")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    p.add_argument("--arch", default="cnn_s", choices=["tetris_ffn", "cnn_s", "cnn_m"])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--activation", default="tanh")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--procs", type=int, default=2, help="processes per side (one per core)")
    p.add_argument("--repeats", type=int, default=None, help="alternating loop/population repeats (default 3; --quick 1)")
    p.add_argument("--gpu-zoo", action="store_true", help="1000 CNN-s x 50 epochs on 60k synthetic images, one CUDA GPU")
    p.add_argument("--cli", action="store_true",
                   help="also run the real `raysys zoo generate` at --cli-models A B and report its marginal throughput")
    p.add_argument("--cli-models", type=int, nargs=2, default=None, metavar=("A", "B"),
                   help="the two zoo sizes of --cli (default 100 200; --quick 4 8); the population side then trains "
                        "A models (A / procs per process) unless --models says otherwise")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    args = p.parse_args(argv)
    if args.gpu_zoo:
        result = gpu_zoo(args)
    else:
        if args.cli:
            args.cli_models = args.cli_models or ([4, 8] if args.quick else [100, 200])
            if not 0 < args.cli_models[0] < args.cli_models[1]:
                p.error("--cli-models A B needs 0 < A < B")
            args.models = args.models or args.cli_models[0]
        args.models = args.models or (6 if args.quick else 48)
        args.epochs = args.epochs or (1 if args.quick else 2)
        args.repeats = args.repeats or (1 if args.quick else 3)
        result = cpu_benchmark(args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(args.json)
    return result


if __name__ == "__main__":
    main()
