"""From latents to models: encode anchors, decode samples, load them into the zoo's architecture.

Works with any autoencoder exposing ``encode(weights [n, P]) -> z [n, D]`` and
``decode(z [n, D]) -> weights [n, P]`` (:class:`raysys.hyperrep.HyperRepresentation`), in
batches so large populations fit in memory. Decoded vectors are checked against the zoo's
layout before anything is trained on them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from raysys import architectures
from raysys.architectures import Layout
from raysys.config import RaysysError


def load_autoencoder(checkpoint_dir: str | Path):
    """Load a trained hyper-representation from its checkpoint directory."""
    path = Path(checkpoint_dir)
    if not path.exists():
        raise RaysysError(f"hyper-representation checkpoint {path} does not exist. Train one with "
                          f"'raysys hyperrep train CONFIG --zoo ZOO --out {path}' or fix the path.")
    from raysys.hyperrep import HyperRepresentation

    return HyperRepresentation.load(path)


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _autoencoder_layout(autoencoder) -> Layout | None:
    lay = getattr(autoencoder, "layout", None)
    if isinstance(lay, dict):
        return Layout.from_dict(lay)
    return lay if isinstance(lay, Layout) else None


def check_layout(autoencoder, layout: Layout) -> None:
    """The autoencoder must have been trained on weights of exactly this layout."""
    if hasattr(autoencoder, "check_layout"):
        autoencoder.check_layout(layout)
        return
    theirs = _autoencoder_layout(autoencoder)
    if theirs is None:
        return
    ours = [(t.name, tuple(t.shape)) for t in layout.tensors]
    if [(t.name, tuple(t.shape)) for t in theirs.tensors] != ours:
        raise RaysysError(f"the hyper-representation was trained on {theirs.arch} weights ({theirs.num_params} "
                          f"parameters) but the zoo holds {layout.arch} ({layout.num_params}). Use the checkpoint "
                          f"trained on this zoo.")


@torch.no_grad()
def encode(autoencoder, weights, layout: Layout, batch_size: int = 512) -> np.ndarray:
    """Latents [n, D] of flat weights [n, P]."""
    check_layout(autoencoder, layout)
    W = torch.from_numpy(np.array(weights, dtype=np.float32))
    return np.concatenate([_to_numpy(autoencoder.encode(W[i:i + batch_size]))
                           for i in range(0, len(W), batch_size)]).astype(np.float32)


@torch.no_grad()
def decode(autoencoder, Z, layout: Layout, batch_size: int = 512) -> np.ndarray:
    """Flat weights [n, P] decoded from latents [n, D], checked against ``layout``."""
    check_layout(autoencoder, layout)
    Z = torch.from_numpy(np.array(Z, dtype=np.float32))
    W = np.concatenate([_to_numpy(autoencoder.decode(Z[i:i + batch_size]))
                        for i in range(0, len(Z), batch_size)]).astype(np.float32)
    W = W.reshape(len(Z), -1)
    if W.shape[1] != layout.num_params:
        raise RaysysError(f"the autoencoder decodes {W.shape[1]} values per model but {layout.arch} has "
                          f"{layout.num_params} parameters. Use the checkpoint trained on this zoo.")
    return W


def load_models(layout: Layout, weights, activation: str) -> list[torch.nn.Module]:
    """Instantiate the zoo's architecture once per weight vector (eval mode)."""
    out = []
    for w in torch.from_numpy(np.array(weights, dtype=np.float32)):
        model = architectures.build(layout.arch, activation, 0.0, layout.in_channels, layout.num_classes)
        out.append(architectures.unflatten(w, model).eval())
    return out


def epoch_window(autoencoder) -> list[int] | None:
    """The zoo epochs the autoencoder was trained on, when its config says so."""
    try:
        lo, hi = autoencoder.config.train.epoch_window
    except AttributeError:
        return None
    return list(range(int(lo), int(hi) + 1))
