"""Training throughput of the hyper-representation autoencoder (samples/s), printed as JSON.

One "sample" is one zoo model state; each step encodes and decodes its two augmented views, as
in training. Weights are synthetic (random, cnn_s layout by default): throughput does not depend
on their values. Defaults are paper-sized (002 §4: 4 heads, 4 blocks, d_model 800-ish -> 768).

    python benchmarks/hyperrep_throughput.py                      # CPU, configs/hyperrep/paper.yaml
    python benchmarks/hyperrep_throughput.py --device cuda --steps 50
    python benchmarks/hyperrep_throughput.py --config configs/hyperrep/digits.yaml
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from raysys.architectures import layout_of
from raysys.config import load
from raysys.hyperrep.augment import Augmenter
from raysys.hyperrep.config import HyperRepConfig
from raysys.hyperrep.losses import CONTRASTIVE, reconstruction_loss
from raysys.hyperrep.model import HyperRepresentation

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs/hyperrep/paper.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--arch", default="cnn_s")
    ap.add_argument("--in-channels", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after 1 warm-up step)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's train.batch_size")
    args = ap.parse_args()

    cfg = load(HyperRepConfig, args.config, args.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch_size or cfg.train.batch_size
    layout = layout_of(args.arch, args.in_channels, 10)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = HyperRepresentation(cfg, layout).to(device)
    augment = Augmenter(layout, cfg.augment.permute, cfg.augment.erase_p, cfg.augment.erase_low,
                        cfg.augment.erase_high, cfg.augment.noise_std)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    contrastive = CONTRASTIVE[cfg.loss.contrastive]
    weights = torch.randn(batch, layout.num_params).to(device)
    gen = torch.Generator().manual_seed(0)

    def step():
        (c1, v1), (c2, v2) = augment.two_views(weights, gen)
        _, recon, proj = model(torch.cat([v1, v2]))
        loss = cfg.loss.beta * reconstruction_loss(recon, torch.cat([c1, c2])) + \
            (1 - cfg.loss.beta) * contrastive(proj[:batch], proj[batch:], cfg.loss.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "benchmark": "hyperrep_train_throughput", "config": str(args.config), "overrides": args.overrides,
        "arch": args.arch, "num_params": layout.num_params, "tokens": model.tokenizer.num_tokens,
        "token_dim": model.tokenizer.token_dim, "model_params": sum(p.numel() for p in model.parameters()),
        "d_model": cfg.model.d_model, "heads": cfg.model.heads, "layers": cfg.model.layers,
        "batch_size": batch, "steps": args.steps, "seconds": round(seconds, 3),
        "samples_per_s": round(batch * args.steps / seconds, 2),
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()
