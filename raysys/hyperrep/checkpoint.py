"""Checkpoints without pickle: ``model.safetensors`` (parameters + LWLN buffers) and ``config.json``
(the HyperRepConfig, the zoo layout, LWLN statistics, the zoo path and manifest hash, metrics).

Files are written to a temporary name and renamed, ``config.json`` last, so a directory with a
``config.json`` always has the matching weights next to it.

The same two files are a Hugging Face Hub model repository: :class:`HubCheckpoint` (a
``huggingface_hub.PyTorchModelHubMixin``, a base of :class:`~raysys.hyperrep.model.HyperRepresentation`)
gives ``save_pretrained(DIR)`` (these files plus a model card, ``README.md``), ``push_to_hub(REPO)`` and
``from_pretrained(DIR or REPO)``, which loads a folder written by ``raysys hyperrep train`` as it is.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors.torch import load_file, save_file

from raysys import __version__
from raysys.architectures import Layout
from raysys.config import RaysysError, validate
from raysys.hyperrep.config import HyperRepConfig
from raysys.store import atomic_write_json, manifest_path

FORMAT = "raysys.hyperrep/1"
WEIGHTS, CONFIG = "model.safetensors", "config.json"  # the Hub's names too (SAFETENSORS_SINGLE_FILE, CONFIG_NAME)
# config.json keys save_checkpoint writes itself; the rest (zoo, manifest hash, metrics, run id) is the model's meta
RECORD_KEYS = ("format", "raysys_version", "config", "layout", "lwln")


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


def load_checkpoint(cls, directory: str | Path, device: str = "cpu"):
    """The checkpoint in ``directory`` as a ``cls`` (:class:`~raysys.hyperrep.model.HyperRepresentation`, which
    passes itself: this module holds the file format and never imports the model)."""
    meta = read_meta(directory)
    config = validate(HyperRepConfig, meta["config"], source=str(Path(directory) / CONFIG))
    model = cls(config, Layout.from_dict(meta["layout"]))
    state = load_file(str(Path(directory) / WEIGHTS), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RaysysError(f"checkpoint {directory} does not match its config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); the files come from different runs. Retrain it.")
    model.meta = meta
    return model.to(device).eval()


class HubCheckpoint(PyTorchModelHubMixin, library_name="raysys", tags=["raysys", "hyper-representation"]):
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (huggingface_hub's ``ModelHubMixin``) over the
    checkpoint format above: ``model.safetensors`` + the raysys ``config.json``, so a folder written by
    ``raysys hyperrep train`` loads with ``from_pretrained`` and one written by ``save_pretrained`` loads with
    ``HyperRepresentation.load`` (and ``--checkpoint``)."""

    def _save_pretrained(self, save_directory: Path) -> None:
        meta = {k: v for k, v in (getattr(self, "meta", None) or {}).items() if k not in RECORD_KEYS}
        save_checkpoint(self, save_directory, meta)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, map_location: str = "cpu", device: str | None = None,
                         **model_kwargs):
        # model_kwargs holds config.json's "config" and "layout" (the mixin passes the keys named like __init__'s
        # arguments): load_checkpoint reads and checks them itself.
        unknown = set(model_kwargs) - {"config", "layout"}
        if unknown:
            raise TypeError(f"from_pretrained got unexpected arguments {sorted(unknown)}")
        directory = Path(model_id)
        if not directory.is_dir():  # a Hub repository: both files into one snapshot folder of the cache
            weights = hf_hub_download(model_id, WEIGHTS, revision=revision, cache_dir=cache_dir,
                                      force_download=force_download, local_files_only=local_files_only, token=token)
            hf_hub_download(model_id, CONFIG, revision=revision, cache_dir=cache_dir, force_download=force_download,
                            local_files_only=local_files_only, token=token)
            directory = Path(weights).parent
        return load_checkpoint(cls, directory, device or map_location)
