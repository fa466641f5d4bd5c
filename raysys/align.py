"""Weight matching: permute hidden units so one model lines up with another, and aligned zoo copies.

Permuting the hidden units of a layer (its output rows, and the matching input columns of the next
layer) leaves the function unchanged, so models of one zoo can sit far apart in weight space while
computing nearly the same thing. Two uses here:

* the primitives (:func:`permute_units`, :func:`align_to`, :func:`aligned_distances`), also used by
  the novelty measures of :mod:`raysys.populations.novelty`;
* :func:`align_zoo` / ``raysys zoo align SRC --out DST``: a copy of a zoo with every state (all
  splits, all epochs) permuted onto one template, the mean of the training split's last
  ``template_epochs`` epochs after ``rounds`` rounds of aligning those states onto the current
  template. The template never sees validation or test models, so a hyper-representation trained
  on the aligned copy is still evaluated on unseen models.

Alignment is weight matching (Ainsworth et al. 2023) done greedily forward through the chain: for
each hidden layer, after the previous layer's permutation is applied to this layer's inputs, match
units by the squared distance of their incoming weights and bias, solved exactly with
``scipy.optimize.linear_sum_assignment``. A conv->flatten->fc boundary moves whole blocks of fc
columns (``Layer.in_block``). The output layer is never permuted (its units are the classes).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from scipy.optimize import linear_sum_assignment

from raysys import architectures
from raysys.architectures import Layout
from raysys.config import Config, RaysysError, validate

# --- the primitives -------------------------------------------------------------------------------


def check_chain(layout: Layout) -> None:
    if not layout.chain:
        raise RaysysError(f"permutation alignment needs a plain chain of layers; {layout.arch} is not one. "
                          f"Use raw distances (align=False) for this architecture.")


def _expand_cols(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Channel permutation [M, C] -> column permutation [M, C*block] of a flattened conv output."""
    if block == 1:
        return perm
    ar = torch.arange(block, device=perm.device)
    return (perm[..., :, None] * block + ar).reshape(*perm.shape[:-1], -1)


def _permute_inputs(w: torch.Tensor, perm: torch.Tensor, block: int) -> torch.Tensor:
    """Reorder dim 2 (the inputs) of batched weights [M, out, in, *k] by perm [M, in//block]."""
    cols = _expand_cols(perm, block)
    idx = cols[:, None, :].expand(w.shape[0], w.shape[1], cols.shape[1])
    idx = idx.reshape(*idx.shape, *([1] * (w.dim() - 3))).expand(w.shape)
    return torch.gather(w, 2, idx)


def _permute_outputs(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    idx = perm.reshape(*perm.shape, *([1] * (t.dim() - 2))).expand(t.shape)
    return torch.gather(t, 1, idx)


def permute_units(W, layout: Layout, perms: list) -> torch.Tensor:
    """Apply hidden-unit permutations (one per hidden layer) to flat weights [N, P] or [P].

    ``perms[l][i]`` is the old index of new unit i. The result computes the same function.
    """
    check_chain(layout)
    W = torch.as_tensor(W, dtype=torch.float32)
    single = W.dim() == 1
    W = W[None] if single else W
    parts = {k: v.clone() for k, v in architectures.split_vector(W, layout).items()}
    prev = None
    for l, layer in enumerate(layout.layers):
        w = parts[layer.weight]
        if prev is not None:
            w = _permute_inputs(w, prev.expand(w.shape[0], -1), layer.in_block)
        if l < len(layout.layers) - 1:
            p = torch.as_tensor(np.asarray(perms[l]), dtype=torch.long)[None].expand(w.shape[0], -1)
            w = _permute_outputs(w, p)
            if layer.bias is not None:
                parts[layer.bias] = _permute_outputs(parts[layer.bias], p)
            prev = p[:1]
        parts[layer.weight] = w
    out = architectures.join_tensors(parts, layout)
    return out[0] if single else out


def align_to(w, references, layout: Layout) -> torch.Tensor:
    """Permute the hidden units of one model ``w`` [P] to best match each of ``references`` [M, P].

    Returns [M, P]: row m is ``w`` aligned to reference m (same function as ``w``).
    """
    R = torch.as_tensor(references, dtype=torch.float32)
    parts, _ = _align(torch.as_tensor(w, dtype=torch.float32), architectures.split_vector(R, layout), layout)
    return architectures.join_tensors(parts, layout)


def align_onto(W, reference, layout: Layout) -> torch.Tensor:
    """Permute the hidden units of each model of ``W`` [N, P] to best match one ``reference`` [P].

    Returns [N, P]: row n is ``W[n]`` aligned to the reference (same function as ``W[n]``).
    """
    W = torch.as_tensor(W, dtype=torch.float32)
    R = torch.as_tensor(reference, dtype=torch.float32)[None].expand(len(W), -1)
    parts, _ = _align(W, architectures.split_vector(R, layout), layout)
    return architectures.join_tensors(parts, layout)


def aligned_distances(w, ref_parts: dict[str, torch.Tensor], layout: Layout) -> np.ndarray:
    """L2 distance [M] between ``w`` aligned to each reference and that reference.

    ``ref_parts`` is ``split_vector(references, layout)``, split once for many calls.
    """
    _, sq = _align(torch.as_tensor(w, dtype=torch.float32), ref_parts, layout)
    return np.sqrt(np.maximum(sq, 0.0))


def _align(w: torch.Tensor, r_parts: dict[str, torch.Tensor], layout: Layout):
    """Row m of the result is model ``w`` (one model [P], or row m of [M, P]) aligned to reference m."""
    check_chain(layout)
    M = next(iter(r_parts.values())).shape[0]
    a_parts = architectures.split_vector(w[None] if w.dim() == 1 else w, layout)
    out, sq = {}, np.zeros(M)

    def add(name, t):
        out[name] = t
        sq[:] += (t - r_parts[name]).pow(2).reshape(M, -1).sum(1).double().numpy()

    prev = None
    last = len(layout.layers) - 1
    for l, layer in enumerate(layout.layers):
        wa = a_parts[layer.weight].expand(M, *a_parts[layer.weight].shape[1:])
        ba = a_parts[layer.bias].expand(M, -1) if layer.bias is not None else None
        if prev is not None:
            wa = _permute_inputs(wa, prev, layer.in_block)
        if l < last:
            # cost[m, i, j]: squared distance between reference unit i and our unit j.
            cost = torch.cdist(r_parts[layer.weight].reshape(M, layer.out_units, -1),
                               wa.reshape(M, layer.out_units, -1)).pow(2)
            if ba is not None and layer.bias is not None:
                cost += (r_parts[layer.bias][:, :, None] - ba[:, None, :]).pow(2)
            cost = cost.numpy()
            perm = np.empty((M, layer.out_units), dtype=np.int64)
            for m in range(M):
                _, perm[m] = linear_sum_assignment(cost[m])
            prev = torch.from_numpy(perm)
            wa = _permute_outputs(wa, prev)
            ba = _permute_outputs(ba, prev) if ba is not None else None
        add(layer.weight, wa)
        if ba is not None:
            add(layer.bias, ba)
    return out, sq


# --- the template ----------------------------------------------------------------------------------

def build_template(W: np.ndarray, layout: Layout, rounds: int) -> np.ndarray:
    """Mean of the states ``W`` [N, P] after ``rounds`` rounds of aligning each onto the current mean.

    Starts from ``W[0]``; each round aligns every state onto the template, then averages (in float64,
    so the template does not depend on summation order at float32 precision).
    """
    template = np.asarray(W[0], dtype=np.float32)
    for _ in range(rounds):
        aligned = align_onto(W, template, layout).numpy()
        template = aligned.astype(np.float64).mean(axis=0).astype(np.float32)
    return template


# --- aligned zoo copies ------------------------------------------------------------------------------

TEMPLATE_FILE = "template.safetensors"
TEMPLATE_SPLIT = "train"  # never validation or test: those models stay unseen by everything fitted


class AlignOptions(Config):
    template_epochs: int = Field(5, ge=1)  # the template averages the last this-many epochs of each model
    rounds: int = Field(3, ge=1)  # align-then-average rounds; the mean moves little after 2-3


def source_fingerprint(zoo) -> str:
    """sha256 over the source manifest's bytes and each shard record's sha256 (in shard order)."""
    from raysys.store import manifest_path, recorded_shards, shard_record

    h = hashlib.sha256(manifest_path(zoo.root).read_bytes())
    for sid in recorded_shards(zoo.root):
        h.update((shard_record(zoo.root, sid)[1] or {})["sha256"].encode())
    return h.hexdigest()


def _open_source(src: Path):
    from raysys.integrity import verify_zoo
    from raysys.store import open_zoo

    if not src.is_dir():
        raise RaysysError(f"{src} is not a directory. Pass the zoo directory written by "
                          f"'raysys zoo generate CONFIG --out DIR' as SRC.")
    zoo = open_zoo(src)
    layout = zoo.layout
    if not layout.chain:
        raise RaysysError(f"zoo {src} holds {layout.arch} models, which are not a plain chain of layers (residual "
                          f"connections tie the units of several layers together), so their hidden units cannot be "
                          f"permuted one layer at a time. 'raysys zoo align' works for tetris_ffn, cnn_s and cnn_m zoos.")
    report = verify_zoo(src)
    if not report.ok:
        first = report.problems[0]
        raise RaysysError(f"zoo {src} is not intact ({len(report.problems)} problem(s) in shards "
                          f"{report.bad_shards or '-'}, e.g. {first.kind.upper()} {first.where}: {first.detail}). Run 'raysys zoo verify {src}' and repair it with "
                          f"'raysys zoo generate CONFIG --out {src}' before aligning it.")
    return zoo


def _template_window(zoo, options: AlignOptions) -> list[int]:
    epochs = zoo.manifest.get("epochs")
    if not isinstance(epochs, int):
        raise RaysysError(f"zoo {zoo.root}: manifest.json has no 'epochs'; it is not a manifest raysys wrote. "
                          f"Regenerate the zoo with 'raysys zoo generate'.")
    if options.template_epochs > epochs + 1:
        raise RaysysError(f"--template-epochs {options.template_epochs} but zoo {zoo.root} has only epochs 0-{epochs}. "
                          f"Use --template-epochs {epochs + 1} or fewer.")
    return list(range(epochs - options.template_epochs + 1, epochs + 1))


def _identity(zoo, options: AlignOptions, window: list[int]) -> dict:
    """What determines an aligned copy's contents; a rerun resumes only when all of it matches."""
    return {"source_fingerprint": source_fingerprint(zoo), "template_epochs": window,
            "rounds": options.rounds, "template_split": TEMPLATE_SPLIT}


def _check_destination(dst: Path, identity: dict) -> bool:
    """True when ``dst`` holds (part of) this very aligned copy; error when it holds anything else."""
    from raysys.store import writer_manifest

    manifest = writer_manifest(dst, "aligned", "is not an aligned copy made by 'raysys zoo align'")
    if manifest is None:
        return False
    old = manifest["aligned"]
    short = lambda k, v: f"{v[:12]}..." if k == "source_fingerprint" and isinstance(v, str) else repr(v)
    diff = [f"{k}: {short(k, old.get(k))} -> {short(k, v)}" for k, v in identity.items() if old.get(k) != v]
    if diff:
        what = ("a different source zoo (or one that has changed since)" if old.get("source_fingerprint")
                != identity["source_fingerprint"] else "different options")
        window = old.get("template_epochs")
        flags = f"--template-epochs {len(window) if isinstance(window, list) else '?'} --rounds {old.get('rounds')}"
        raise RaysysError(f"--out {dst} holds an aligned copy of {old.get('source')} made from {what} "
                          f"({'; '.join(diff)}). To resume it, rerun 'raysys zoo align {old.get('source')} --out {dst} "
                          f"{flags}'; otherwise choose a new --out directory (or delete {dst}).")
    return True


def _save_template(path: Path, template: np.ndarray, meta: dict) -> None:
    from safetensors.torch import save

    from raysys.store import atomic_write_bytes

    atomic_write_bytes(path, save({"template": torch.from_numpy(template)},
                                  metadata={k: json.dumps(v) for k, v in meta.items()}))


def _load_template(path: Path, num_params: int) -> np.ndarray | None:
    from safetensors.torch import load

    if not path.exists():
        return None
    try:
        t = load(path.read_bytes())["template"].numpy()
    except Exception:  # unreadable: recompute it (and redo the shards made with it)
        return None
    return t if t.shape == (num_params,) else None


def _align_states(W: np.ndarray, template: np.ndarray, layout: Layout, chunk: int = 1024) -> np.ndarray:
    """Every finite row of ``W`` aligned onto the template; a diverged (non-finite) row is copied as it is."""
    out = W.copy()
    finite = np.flatnonzero(np.isfinite(W).all(axis=1))
    for i in range(0, len(finite), chunk):
        rows = finite[i:i + chunk]
        out[rows] = align_onto(W[rows], template, layout).numpy()
    return out


def _distances(W: np.ndarray, template: np.ndarray) -> np.ndarray:
    W = W[np.isfinite(W).all(axis=1)]
    return np.linalg.norm(W.astype(np.float64) - template.astype(np.float64), axis=1)


def align_zoo(src: str | Path, dst: str | Path, template_epochs: int = 5, rounds: int = 3,
              progress: bool = False) -> dict:
    """Write a copy of zoo ``src`` to ``dst`` with every state aligned onto one training-split template.

    Everything is checked before anything is written (``src`` intact and a chain architecture, ``dst``
    a directory that is new, empty or this very copy). Shards are written one by one, atomically, with
    their sha256 records; a rerun after a crash keeps the complete shards and redoes the rest, and ends
    with the same bytes as an uninterrupted run. Returns a summary: shards written/skipped, states
    aligned, and the mean L2 distance to the template before and after alignment.
    """
    from raysys.integrity import check_output_dir
    from raysys.store import WriterLock

    t0 = time.time()
    options = validate(AlignOptions, {"template_epochs": template_epochs, "rounds": rounds}, "zoo align options")
    src = Path(src).expanduser().resolve()
    dst = check_output_dir(dst).resolve()
    if dst == src:
        raise RaysysError(f"--out {dst} is the source zoo itself. Write the aligned copy to a new directory.")
    zoo = _open_source(src)
    window = _template_window(zoo, options)
    identity = _identity(zoo, options, window)
    _check_destination(dst, identity)
    with WriterLock(dst, "raysys zoo align"):
        return _align_zoo(zoo, src, dst, options, window, identity, progress, t0)


def _align_zoo(zoo, src: Path, dst: Path, options: AlignOptions, window: list[int], identity: dict, progress: bool,
               t0: float) -> dict:
    from raysys.store import (META, ZooWriter, clean_temp_files, meta_file, migrate_zoo, open_zoo, planned_shards,
                              quarantine_strays, read_shard, recorded_shards, shard_file, weights_column, weights_numpy)

    layout = zoo.layout
    resuming = _check_destination(dst, identity)  # again, now that no other writer can change it

    writer = ZooWriter(dst)
    if resuming:  # an aligned copy of the first layout: converted before anything is added to it
        migrate_zoo(dst)
    template_path = dst / META / TEMPLATE_FILE
    template = _load_template(meta_file(dst, TEMPLATE_FILE), layout.num_params) if resuming else None
    if template is None:
        W, meta = zoo.weights(epochs=window, splits=[TEMPLATE_SPLIT])
        finite = np.isfinite(W).all(axis=1)
        if not finite.any():
            raise RaysysError(f"zoo {src} has no finite {TEMPLATE_SPLIT}-split state at epochs {window[0]}-{window[-1]} "
                              f"(all diverged), so there is nothing to build a template from.")
        # Start from the lowest model id's last epoch: a deterministic, trained model.
        order = np.lexsort((-meta["epoch"].to_numpy(), meta["model_id"].to_numpy()))
        W = W[order][finite[order]]
        template = build_template(W, layout, options.rounds)
        new_template = True
        if resuming:  # shards made with a lost template cannot be trusted to match this one
            for sid in recorded_shards(dst):
                writer.record_path(sid).unlink(missing_ok=True)
    else:
        new_template = False

    manifest = {k: v for k, v in zoo.manifest.items() if k != "raysys_version"}
    plan = [{k: v for k, v in s.items() if k not in ("sha256", "rows")} for s in planned_shards(zoo.manifest, src)]
    aligned = {"source": str(src), **identity, "template_file": f"{META}/{TEMPLATE_FILE}",
               "method": "weight matching of hidden units (function-preserving permutations)"}
    manifest.update(name=f"{zoo.manifest.get('name', src.name)}-aligned", status="running", shards=plan, aligned=aligned)
    if resuming:  # strays and shards that do not match their records go to the quarantine, never into the copy
        quarantine_strays(dst, [int(s["shard"]) for s in plan])
    writer.write_manifest(manifest)
    clean_temp_files(dst)
    if new_template:
        _save_template(template_path, template, {"source": str(src), **identity})

    records, written, skipped, before, after = {}, 0, 0, [], []
    for i, s in enumerate(plan):
        sid = int(s["shard"])
        table = read_shard(shard_file(src, sid))
        W = weights_numpy(table.column("weights"))
        kept = writer.is_complete(sid)
        if kept:
            skipped += 1
            done = read_shard(writer.shard_path(sid), columns=["weights"])
            A = weights_numpy(done.column("weights"))
        else:
            A = _align_states(W, template, layout)
            table = table.set_column(table.schema.get_field_index("weights"), table.schema.field("weights"),
                                     weights_column(A))
            model_ids = s.get("model_ids") or sorted(set(table.column("model_id").to_pylist()))
            writer.write_shard(sid, table, model_ids)
            written += 1
        before.append(_distances(W, template))
        after.append(_distances(A, template))
        records[sid] = json.loads(writer.record_path(sid).read_text())
        if progress:
            print(f"raysys zoo align: shard {i + 1}/{len(plan)} {'kept (already complete)' if kept else 'written'}",
                  flush=True)

    manifest.update(status="complete", shards=[{**s, "sha256": records[int(s["shard"])]["sha256"],
                                                 "rows": records[int(s["shard"])]["rows"]} for s in plan])
    writer.write_manifest(manifest)
    open_zoo(dst)  # the result must read back as a zoo
    dist_before, dist_after = np.concatenate(before), np.concatenate(after)
    states = sum(int(r["rows"]) for r in records.values())
    return {"source": str(src), "out": str(dst), "shards_written": written, "shards_skipped": skipped,
            "states": states, "diverged_states_copied": states - len(dist_before),
            "template_epochs": window, "rounds": options.rounds,
            "mean_l2_to_template_before": float(dist_before.mean()), "mean_l2_to_template_after": float(dist_after.mean()),
            "wall_s": time.time() - t0}


# --- CLI ---------------------------------------------------------------------------------------------

def _cmd_align(args) -> int:
    s = align_zoo(args.src, args.out, template_epochs=args.template_epochs, rounds=args.rounds,
                  progress=not args.no_progress)
    print(f"aligned      {s['states']} states ({s['diverged_states_copied']} diverged, copied unchanged) onto the "
          f"train-split mean of epochs {s['template_epochs'][0]}-{s['template_epochs'][-1]} after {s['rounds']} rounds")
    print(f"shards       {s['shards_written']} written, {s['shards_skipped']} already complete")
    print(f"L2 to template  before {s['mean_l2_to_template_before']:.3f}  after {s['mean_l2_to_template_after']:.3f} "
          f"(mean over states)")
    print(f"wall time    {s['wall_s']:.1f} s")
    print(f"zoo written to {s['out']}")
    return 0
