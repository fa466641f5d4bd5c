"""Checkpoints without pickle: ``model.safetensors`` (parameters + LWLN buffers) and ``config.json``
(the HyperRepConfig, the zoo layout, LWLN statistics, the zoo path and manifest hash, metrics).

Files are written to a temporary name and renamed, ``config.json`` last, so a directory with a
``config.json`` always has the matching weights next to it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from raysys import __version__
from raysys.architectures import Layout
from raysys.config import RaysysError, validate
from raysys.hyperrep.config import HyperRepConfig
from raysys.store import atomic_write_json, manifest_path

FORMAT = "raysys.hyperrep/1"
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def manifest_sha256(zoo_dir: str | Path) -> str:
    return hashlib.sha256(manifest_path(zoo_dir).read_bytes()).hexdigest()


def save_checkpoint(model, directory: str | Path, meta: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = directory / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"format": FORMAT})
    tmp.replace(directory / WEIGHTS)
    record = {
        "format": FORMAT,
        "raysys_version": __version__,
        "config": model.config.model_dump(mode="json"),
        "layout": model.layout.to_dict(),
        "lwln": {"groups": [g.name for g in model.tokenizer.groups],
                 "mean": model.lwln_mean.tolist(), "std": model.lwln_std.tolist()},
        **meta,
    }
    atomic_write_json(directory / CONFIG, record)
    return directory


def read_meta(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / CONFIG
    if not path.exists() or not (directory / WEIGHTS).exists():
        raise RaysysError(f"{directory} is not a hyper-representation checkpoint ({CONFIG} and {WEIGHTS} expected). "
                          f"Point at the --out directory of 'raysys hyperrep train'.")
    try:
        meta = json.loads(path.read_text())
    except ValueError as err:
        raise RaysysError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt. Retrain it.") from None
    if meta.get("format") != FORMAT:
        raise RaysysError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}: "
                          f"it was not written by this version of raysys. Retrain the hyper-representation.")
    return meta


def load_checkpoint(directory: str | Path, device: str = "cpu"):
    from raysys.hyperrep.model import HyperRepresentation

    meta = read_meta(directory)
    config = validate(HyperRepConfig, meta["config"], source=str(Path(directory) / CONFIG))
    model = HyperRepresentation(config, Layout.from_dict(meta["layout"]))
    state = load_file(str(Path(directory) / WEIGHTS), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RaysysError(f"checkpoint {directory} does not match its config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); the files come from different runs. Retrain it.")
    model.meta = meta
    return model.to(device).eval()


def load_for_zoo(directory: str | Path, zoo_dir: str | Path, device: str = "cpu"):
    """Load a checkpoint and check that ``zoo_dir`` holds the architecture it was trained on."""
    from raysys.store import open_zoo

    model = load_checkpoint(directory, device)
    model.check_layout(open_zoo(zoo_dir).layout, what=f"zoo {zoo_dir}")
    return model
