"""Training throughput of the hyper-representation autoencoder (samples/s): raysys's training step beside
the same model in plain PyTorch, measured side by side in one run.

One "sample" is one zoo model state; each step encodes and decodes its two augmented views, as in
training. Weights are synthetic (random, cnn_s layout by default): throughput does not depend on their
values. Arms, interleaved in every repetition (median over repetitions):

- ``plain``: the same HyperRepresentation in a plain PyTorch loop (two copies of the batch, MSE,
  ``torch.optim.AdamW`` with its default per-tensor kernels) — what a user would write;
- ``before``: raysys's training step as it was before this benchmark's changes (two augmented views
  always, LWLN, contrastive, per-tensor AdamW);
- ``raysys``: the step as ``raysys hyperrep train`` runs it (``raysys.hyperrep.train.train_step``: fused
  AdamW; one view when the views cannot differ and beta = 1);
- ``bf16``: the same under bfloat16 autocast (run with ``--bf16``, default: only where the CPU has
  bf16 units or on CUDA);
- ``compiled``: ``torch.compile`` of the model (``--compile``; minutes of compilation first).

It also counts the step's FLOPs (torch.utils.flop_counter) and measures this machine's fp32 GEMM rate
on the model's largest matmul shape: ``roofline`` is the speed-up left if every FLOP ran at that rate.

    python benchmarks/hyperrep_throughput.py                                  # digits config, 1 and 2 threads
    python benchmarks/hyperrep_throughput.py --config configs/hyperrep/paper.yaml --threads 2 --steps 3
    python benchmarks/hyperrep_throughput.py --device cuda --bf16 --steps 50
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from raysys.architectures import layout_of
from raysys.config import load
from raysys.hyperrep.augment import Augmenter
from raysys.hyperrep.config import HyperRepConfig
from raysys.hyperrep.losses import CONTRASTIVE, layer_statistics, reconstruction_loss
from raysys.hyperrep.model import HyperRepresentation
from raysys.hyperrep.tokens import Tokenizer
from raysys.hyperrep.train import make_optimizer, train_step

REPO = Path(__file__).resolve().parents[1]


def build(cfg, layout, device, weights):
    torch.manual_seed(0)
    model = HyperRepresentation(cfg, layout)
    model.set_layer_statistics(*layer_statistics(weights.cpu(), model.tokenizer.param_group,
                                                 model.tokenizer.num_groups))
    return model.to(device).train()


def arms(cfg, layout, device, weights, names):
    """{name: step()} for the requested arms, each with its own model and optimizer."""
    aug = Augmenter(layout, cfg.augment.permute, cfg.augment.erase_p, cfg.augment.erase_low,
                    cfg.augment.erase_high, cfg.augment.noise_std)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name in names:
        model = build(cfg, layout, device, weights)
        if name == "plain":
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

            def step(model=model, opt=opt):
                x = torch.cat([weights, weights])
                _, recon, _ = model(x)
                loss = F.mse_loss(recon, x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        elif name == "before":
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
            contrastive, inv_var = CONTRASTIVE[cfg.loss.contrastive], model.loss_weights()

            def step(model=model, opt=opt, inv_var=inv_var, contrastive=contrastive):
                (clean1, view1), (clean2, view2) = aug.two_views(weights, gen)
                _, recon, proj = model(torch.cat([view1, view2]))
                rec = reconstruction_loss(recon, torch.cat([clean1, clean2]), inv_var)
                con = contrastive(proj[:len(weights)], proj[len(weights):], cfg.loss.temperature)
                loss = cfg.loss.beta * rec + (1 - cfg.loss.beta) * con
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        else:
            opt = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
            if name == "compiled":
                model.encode_weights = torch.compile(model.encode_weights)
                model.decode_weights = torch.compile(model.decode_weights)
            precision = "bf16" if name == "bf16" else "fp32"
            inv_var = model.loss_weights()

            def step(model=model, opt=opt, precision=precision, inv_var=inv_var):
                train_step(model, opt, aug, weights, gen, cfg.loss, inv_var, precision)
        out[name] = step
    return out


def gemm_rate(rows: int, k: int, n: int, device, seconds: float = 0.5) -> float:
    """fp32 FLOP/s of an [rows, k] x [k, n] matmul on this device."""
    a, b = torch.randn(rows, k, device=device), torch.randn(k, n, device=device)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * rows * k * n * count / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs/hyperrep/digits.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--arch", default="cnn_s")
    ap.add_argument("--in-channels", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts to measure")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per arm and repetition")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (the median is reported)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's train.batch_size")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="run the bf16 arm (default: where the CPU has bf16 units, or on CUDA)")
    ap.add_argument("--compile", action="store_true", help="run the torch.compile arm")
    args = ap.parse_args()

    cfg = load(HyperRepConfig, args.config, args.overrides)
    batch = args.batch_size or cfg.train.batch_size
    layout = layout_of(args.arch, args.in_channels, 10)
    device = torch.device(args.device)
    native_bf16 = device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    names = ["plain", "before", "raysys"] + ["bf16"] * bool(native_bf16 if args.bf16 is None else args.bf16) \
        + ["compiled"] * args.compile
    num_tokens = Tokenizer(layout).num_tokens
    weights = torch.randn(batch, layout.num_params, generator=torch.Generator().manual_seed(0)).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    results = []
    for threads in args.threads if device.type == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        steps = arms(cfg, layout, device, weights, names)
        for step in steps.values():  # warm-up (and compilation)
            step()
        sync()
        times = {name: [] for name in steps}
        for _ in range(args.reps):
            for name, step in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                sync()
                times[name].append((time.perf_counter() - t0) / args.steps)
        with FlopCounterMode(display=False) as counter:
            steps["raysys"]()
        flops = counter.get_total_flops()
        rate = gemm_rate(2 * batch * num_tokens, cfg.model.d_model, cfg.model.ff, device)
        row = {"threads": threads}
        for name, ts in times.items():
            row[name] = {"ms_per_step": round(1e3 * statistics.median(ts), 2),
                         "samples_per_s": round(batch / statistics.median(ts), 1)}
        fastest = min(statistics.median(times[n]) for n in times if n not in ("plain", "before"))
        row.update(gflop_per_step=round(flops / 1e9, 3), gemm_gflops=round(rate / 1e9, 1),
                   roofline_ms=round(1e3 * flops / rate, 2),
                   speedup_vs_before=round(statistics.median(times["before"]) / fastest, 2),
                   raysys_vs_plain=round(statistics.median(times["plain"]) / statistics.median(times["raysys"]), 2),
                   roofline_headroom=round(fastest / (flops / rate), 2))
        results.append(row)
        print(f"threads {threads}: " + ", ".join(f"{n} {row[n]['samples_per_s']} samples/s" for n in times)
              + f"; raysys / before {row['speedup_vs_before']}x; {row['gflop_per_step']} GFLOP/step, GEMM {row['gemm_gflops']} GFLOP/s -> roofline "
              f"{row['roofline_ms']} ms/step ({row['roofline_headroom']}x left)", flush=True)

    print(json.dumps({
        "benchmark": "hyperrep_train_throughput", "config": str(args.config), "overrides": args.overrides,
        "arch": args.arch, "num_params": layout.num_params, "tokens": num_tokens,
        "d_model": cfg.model.d_model, "heads": cfg.model.heads, "layers": cfg.model.layers, "ff": cfg.model.ff,
        "batch_size": batch, "steps": args.steps, "reps": args.reps, "results": results,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16,
        "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
    }))


if __name__ == "__main__":
    main()
