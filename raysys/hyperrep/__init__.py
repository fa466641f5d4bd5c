"""Hyper-representations: a transformer autoencoder over the weights of a model zoo (002, 000).

``train(config, zoo_dir, out_dir)`` fits one; ``HyperRepresentation.load(dir)`` gives back a model
with ``encode(weights [n, P]) -> z`` and ``decode(z) -> weights``.
"""
from raysys.hyperrep.config import HyperRepConfig
from raysys.hyperrep.model import HyperRepresentation
from raysys.hyperrep.tokens import Tokenizer

__all__ = ["HyperRepConfig", "HyperRepresentation", "Tokenizer", "train"]


def train(*args, **kwargs):
    """See :func:`raysys.hyperrep.train.train` (imported lazily: it pulls in the zoo store and tqdm)."""
    from raysys.hyperrep.train import train as _train
    return _train(*args, **kwargs)
