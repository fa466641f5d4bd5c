"""Which code made a stored result: the store format version and code fingerprints.

A cache key that sees only the config misses a change in the code that turned the config into data: a
resumed zoo would mix shards trained by two versions of the trainer, and a pipeline would skip a stage
whose code changed. So every zoo manifest and shard record carries :data:`STORE_FORMAT` and the
fingerprint of the trainer (:func:`code_fingerprint`), a resumed ``raysys zoo generate`` refuses a zoo
made by other code (:func:`check_same_code`), and each pipeline stage's hash covers its own code.

A fingerprint is ``{"raysys_version", "sources", "files"}``: ``sources`` is the first 16 hex digits of the
sha256 over each listed source file's path and bytes. Computed once per process (a few small files).
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from raysys import __version__
from raysys.config import RaysysError

# The zoo store's format: 1 = the first layout (manifest.json on top, records beside the shards),
# 2 = a plain Parquet dataset with __raysys__/ (manifest, plan, records). Recorded in manifests and records.
STORE_FORMAT = 2
# Set to 1 to resume a zoo whose trainer code differs from this one (its shard records keep which code made each).
ALLOW_ENV = "RAYSYS_ALLOW_CODE_CHANGE"

_PACKAGE = Path(__file__).resolve().parent
_TRAINER = ("train.py", "batched_trainer.py", "architectures.py", "datasets.py")
# The source files whose code decides what each stage writes (paths relative to the raysys package).
STAGE_SOURCES: dict[str, tuple[str, ...]] = {
    "zoo": _TRAINER,
    "zoo_aligned": ("align.py", "architectures.py"),
    "hyperrep": ("hyperrep/augment.py", "hyperrep/checkpoint.py", "hyperrep/config.py", "hyperrep/data.py",
                 "hyperrep/evaluate.py", "hyperrep/losses.py", "hyperrep/model.py", "hyperrep/tokens.py", "hyperrep/train.py", "probes.py"),
    "populations": ("populations/config.py", "populations/finetune.py", "populations/codec.py", "populations/novelty.py",
                    "populations/report.py", "populations/samplers.py", "populations/stage.py",
                    "batched_trainer.py", "architectures.py", "datasets.py"),
}
STAGE_SOURCES["hyperrep_nolwln"] = STAGE_SOURCES["hyperrep"]


@lru_cache(maxsize=None)
def _fingerprint(files: tuple[str, ...]) -> tuple[tuple[str, object], ...]:
    h = hashlib.sha256(__version__.encode())
    for name in files:
        path = _PACKAGE / name
        h.update(b"\0" + name.encode() + b"\0")
        try:
            h.update(path.read_bytes())
        except OSError:
            h.update(b"<missing>")
    return (("raysys_version", __version__), ("sources", h.hexdigest()[:16]), ("files", list(files)))


def code_fingerprint(stage: str = "zoo") -> dict:
    """The fingerprint of the code that produces ``stage``'s output (``zoo``: the trainer)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in _fingerprint(STAGE_SOURCES[stage])}


def describe(fp: dict | None) -> str:
    """``raysys 0.1.0, sources 1a2b3c4d5e6f7a8b`` (or that none was recorded)."""
    if not isinstance(fp, dict):
        return "no code fingerprint (written before raysys recorded one)"
    return f"raysys {fp.get('raysys_version')}, sources {fp.get('sources')}"


def same_code(recorded: dict | None, now: dict) -> bool:
    return isinstance(recorded, dict) and recorded.get("raysys_version") == now["raysys_version"] \
        and recorded.get("sources") == now["sources"]


def check_same_code(out_dir: Path, manifest: dict, command: str) -> None:
    """Refuse to resume the zoo in ``out_dir`` when its manifest names other trainer code than this one.

    A manifest without a fingerprint (older raysys) is resumed as before; ``$RAYSYS_ALLOW_CODE_CHANGE=1``
    resumes anyway (with a printed note). The error names both fingerprints and the ways to start fresh.
    """
    recorded, now = manifest.get("code"), code_fingerprint("zoo")
    if "code" not in manifest or same_code(recorded, now):
        return
    if os.environ.get(ALLOW_ENV) == "1":
        print(f"raysys: note: resuming {out_dir}, made by {describe(recorded)}, with {describe(now)} "
              f"(${ALLOW_ENV}=1); each shard record names the code that wrote it", flush=True)
        return
    raise RaysysError(
        f"{out_dir} holds a zoo made by other trainer code ({describe(recorded)}; this is {describe(now)}): "
        f"resuming would mix shards of two trainers. Start fresh with '{command} --out NEW_DIR' (or delete "
        f"{out_dir} and rerun), or set {ALLOW_ENV}=1 to resume it anyway.")
