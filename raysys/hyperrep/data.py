"""What an autoencoder learns from and is scored on: a zoo's usable states in an epoch window.

One definition for training, evaluation and search: a state is usable when its weights are finite and its model did
not diverge; the window is the config's ``train.epoch_window`` = [first, last], inclusive.
"""
from __future__ import annotations

import numpy as np
import torch

from raysys.config import RaysysError

SPLITS = ("train", "val", "test")


def usable(weights: np.ndarray, frame):
    """The states an autoencoder learns from and is scored on: finite weights of models that did not diverge
    (rows of ``weights`` [N, P] and of their ``frame``, the zoo's metadata)."""
    keep = np.isfinite(weights).all(axis=1) & ~frame["diverged"].to_numpy(bool)
    return weights[keep], frame[keep].reset_index(drop=True)


def usable_states(zoo, epochs, splits):
    """``usable`` rows of the zoo's states at ``epochs`` in ``splits``: (weights [N, P], frame)."""
    return usable(*zoo.weights(epochs=list(epochs), splits=list(splits)))


def window_epochs(zoo, window, split: str, fix: str) -> list[int]:
    """The epochs of ``window`` = [first, last] (a config's ``train.epoch_window``) that the zoo stores for
    ``split``; an error ending in ``fix`` (what to set) when there are none."""
    first, last = window
    stored = sorted(int(e) for e in zoo.frame(splits=[split])["epoch"].unique())
    epochs = [e for e in stored if first <= e <= last]
    if not epochs:
        have = f"epochs {stored[0]}..{stored[-1]}" if stored else "no epochs"
        raise RaysysError(f"zoo {zoo.root} stores {have} for its {split} split but the autoencoder's epoch_window "
                          f"is [{first}, {last}]. {fix}")
    return epochs


def load_window(zoo, window: tuple[int, int]) -> dict[str, torch.Tensor]:
    """{split: weights [rows, P]} of the model states in the epoch window; diverged rows dropped."""
    epochs = list(range(window[0], window[1] + 1))
    out = {}
    for split in SPLITS:
        w, _ = usable_states(zoo, epochs, [split])
        out[split] = torch.from_numpy(np.ascontiguousarray(w)).float() if len(w) else torch.zeros(0, zoo.num_params)
    if len(out["train"]) < 2 or len(out["val"]) < 1:
        have = sorted(zoo.frame()["epoch"].unique().tolist())
        raise RaysysError(
            f"zoo {zoo.root} has {len(out['train'])} training and {len(out['val'])} validation model states in "
            f"epochs {window[0]}-{window[1]} (the zoo has epochs {have[0]}-{have[-1]}). Set train.epoch_window "
            f"to epochs the zoo has, e.g. --set 'train.epoch_window=[{max(have[0], have[-1] - 4)},{have[-1]}]'.")
    return out
