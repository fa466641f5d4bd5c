"""Controlled autoencoder experiments on a fixed step budget: train/test reconstruction R² against PCA-k.

One arm per call; every arm gets the same steps, batch and one-cycle schedule, so arms compare side by side:

    python benchmarks/hyperrep_arms.py ZOO --latent 16                       # permutation on, beta 1
    python benchmarks/hyperrep_arms.py ZOO --latent 16 --perm 0 --n 16       # overfit 16 training models
    python benchmarks/hyperrep_arms.py ZOO --window 0,75                      # train on every epoch
    python benchmarks/hyperrep_arms.py ZOO --mlp 256 --wd 1e-2 --dropout 0.1  # the simplest nonlinear code

``--mlp H`` is the yardstick arm for "can any nonlinear k-dim code beat PCA-k here?": PCA-k's code and
reconstruction plus a learned MLP correction (two hidden layers of H, zero-initialized, so step 0 is PCA-k),
trained on plain MSE of the centred weights.

Test R² is taken on the test split's epochs 21-25 unless ``--test-window`` says otherwise (split-own mean, as ``raysys hyperrep eval``); PCA-k is
fit on the arm's own training rows. ``sat`` is the share of |z| > 0.99 (tanh saturation). Results: docs/results.md.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import r2_score

from raysys.hyperrep.augment import Augmenter
from raysys.hyperrep.config import HyperRepConfig
from raysys.hyperrep.losses import CONTRASTIVE, layer_statistics, reconstruction_loss
from raysys.hyperrep.model import HyperRepresentation
from raysys.hyperrep.data import load_window
from raysys.store import open_zoo


def r2(original: torch.Tensor, decoded: torch.Tensor) -> float:
    return float(r2_score(original.double().numpy(), decoded.double().numpy(), multioutput="variance_weighted"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("zoo")
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ff", type=int, default=512)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--linear", type=int, default=0, help="model.linear_path: a PCA-initialized linear path (needs --perm 0)")
    p.add_argument("--beta", type=float, default=1.0, help="1: reconstruction only")
    p.add_argument("--perm", type=int, default=1, help="permutation augmentation on (1) or off (0)")
    p.add_argument("--erase", type=float, default=0.0, help="random-erasing probability")
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--target", choices=["clean", "view"], default="clean",
                   help="reconstruct the clean permuted weights or the augmented view")
    p.add_argument("--lwln", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=1e-5)
    p.add_argument("--bs", type=int, default=128)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--n", type=int, default=0, help="use only the first N training models (0: all)")
    p.add_argument("--window", default="21,25", help="training epochs, first,last")
    p.add_argument("--test-window", default="21,25", help="test-split epochs, first,last")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mlp", type=int, default=0, help="hidden width of the PCA + MLP-correction arm (0: the transformer)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    zoo = open_zoo(a.zoo)
    first, last = map(int, a.window.split(","))
    train = load_window(zoo, (first, last))["train"]
    if a.n:
        ids = sorted(zoo.frame().query("split == 'train'").model_id.unique())[:a.n]
        w, meta = zoo.weights(epochs=list(range(first, last + 1)), splits=["train"])
        train = torch.from_numpy(np.ascontiguousarray(w[meta["model_id"].isin(ids).to_numpy()])).float()
    test = load_window(zoo, tuple(map(int, a.test_window.split(","))))["test"]
    if a.mlp:
        return mlp_arm(a, train, test)

    cfg = HyperRepConfig.model_validate({
        "model": dict(d_model=a.d_model, heads=a.heads, layers=a.layers, ff=a.ff, latent_dim=a.latent,
                      dropout=a.dropout, projection_dim=32, linear_path=bool(a.linear)),
        "loss": dict(beta=a.beta, lwln=bool(a.lwln)),
        "augment": dict(permute=bool(a.perm), erase_p=a.erase, noise_std=a.noise)})
    model = HyperRepresentation(cfg, zoo.layout)
    model.set_layer_statistics(*layer_statistics(train, model.tokenizer.param_group, model.tokenizer.num_groups))
    if a.linear:
        model.init_linear_path(train)
    augment = Augmenter(zoo.layout, bool(a.perm), a.erase, 0.03, 0.3, a.noise)
    inv_var, contrastive = model.loss_weights(), CONTRASTIVE[cfg.loss.contrastive]
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(0)

    pca = PCA(a.latent).fit(train.numpy())
    def pca_rec(x): return torch.from_numpy(pca.inverse_transform(pca.transform(x.numpy())))
    def ae_rec(x): return torch.from_numpy(model.decode(model.encode(x.numpy())))
    print(f"train rows {len(train)}, test rows {len(test)}; PCA-{a.latent}: train R² {r2(train, pca_rec(train)):.3f} "
          f"test R² {r2(test, pca_rec(test)):.3f}; autoencoder at step 0: test R² {r2(test, ae_rec(test)):.3f}", flush=True)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        model.train()
        idx = torch.randint(len(train), (min(a.bs, len(train)),), generator=gen)
        (clean1, view1), (clean2, view2) = augment.two_views(train[idx], gen)
        _, recon, proj = model(torch.cat([view1, view2]))
        target = torch.cat([clean1, clean2] if a.target == "clean" else [view1, view2])
        loss = a.beta * reconstruction_loss(recon, target, inv_var)
        if a.beta < 1:
            loss = loss + (1 - a.beta) * contrastive(proj[:len(idx)], proj[len(idx):], cfg.loss.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % a.every == 0 or step == a.steps:
            model.eval()
            sat = float((torch.from_numpy(model.encode(test.numpy())).abs() > 0.99).float().mean())
            print(f"step {step} loss {loss.item():.4f} train R² {r2(train[:2000], ae_rec(train[:2000])):.3f} "
                  f"test R² {r2(test, ae_rec(test)):.3f} sat {sat:.2f} ({time.time() - t0:.0f} s)", flush=True)


class PcaMlp(torch.nn.Module):
    """z = PCA code + MLP(x); x̂ = PCA decode(z) + MLP(z), on centred weights; zero-initialized corrections."""

    def __init__(self, components: torch.Tensor, hidden: int, dropout: float):
        super().__init__()
        k, d = components.shape
        self.register_buffer("components", components)

        def mlp(n_in, n_out):
            net = torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.GELU(), torch.nn.Dropout(dropout),
                                      torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, n_out))
            torch.nn.init.zeros_(net[-1].weight)
            torch.nn.init.zeros_(net[-1].bias)
            return net
        self.enc, self.dec = mlp(d, k), mlp(k, d)

    def forward(self, x):
        z = x @ self.components.T + self.enc(x)
        return z @ self.components + self.dec(z)


def mlp_arm(a, train: torch.Tensor, test: torch.Tensor) -> None:
    mean = train.mean(0)
    pca = PCA(a.latent).fit(train.numpy())
    model = PcaMlp(torch.from_numpy(pca.components_).float(), a.mlp, a.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(0)

    def rec(x):
        model.eval()
        with torch.no_grad():
            return model(x - mean) + mean

    print(f"train rows {len(train)}, test rows {len(test)}; PCA-{a.latent} + MLP-{a.mlp} at step 0 (= PCA-{a.latent}): "
          f"train R² {r2(train[:2000], rec(train[:2000])):.3f} test R² {r2(test, rec(test)):.3f}", flush=True)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        model.train()
        x = train[torch.randint(len(train), (min(a.bs, len(train)),), generator=gen)] - mean
        loss = ((model(x) - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % a.every == 0 or step == a.steps:
            print(f"step {step} loss {loss.item():.5f} train R² {r2(train[:2000], rec(train[:2000])):.3f} "
                  f"test R² {r2(test, rec(test)):.3f} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
