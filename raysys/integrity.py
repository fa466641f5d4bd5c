"""Integrity of what raysys writes, and pre-flight checks of what it is given.

Two halves, both plain functions:

* :func:`verify_zoo` reads a zoo directory back against its manifest and reports every shard
  that is missing, truncated, corrupted (checksum mismatch), unrecorded or unplanned, and every
  row that is duplicated, foreign to its shard or absent. ``raysys zoo verify DIR`` prints the
  report and exits non-zero on problems; ``raysys zoo generate`` (rerun) rewrites exactly the
  shards whose bytes no longer match their checksum. The cheap check every reader runs (the
  manifest's layout and the Parquet schema must agree) is :func:`raysys.store.check_schema`.
* :func:`check_output_dir`, :func:`check_ray_address` (and :func:`raysys.tracking.check_tracking_uri`) turn the
  failures a stage would otherwise hit half-way (a file where a directory goes, a Ray cluster or
  an MLflow server that is not there) into one :class:`~raysys.config.RaysysError` before anything
  is written. Ray and MLflow retry an unreachable address for minutes; a 3 s socket probe
  answers at once.
"""
from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from raysys.config import RaysysError
# Pre-flight check of a tracking URI: it lives in raysys.tracking (which owns MLflow); re-exported here only for
# raysys/zoo.py, which still imports it from this module.
from raysys.tracking import check_tracking_uri  # noqa: F401

PROBE_TIMEOUT_S = 3.0


# --- zoo verification ---------------------------------------------------------------------------

# Kinds of problem, in the order the report lists them. "leftover" (a temporary file a killed
# run left behind) is a warning: generate removes them and readers never see them.
KINDS = ("schema", "missing", "unrecorded", "truncated", "corrupted", "unplanned",
         "duplicate_rows", "foreign_rows", "missing_rows")


@dataclass
class Problem:
    kind: str
    where: str  # a file name, or the zoo
    detail: str
    shard: int | None = None


@dataclass
class ZooReport:
    root: Path | str
    planned_shards: int = 0
    good_shards: int = 0
    rows: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    repair: str = ""  # how to rewrite the bad shards when it is not the generate command

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_shards(self) -> list[int]:
        """Shards a resume has to rewrite."""
        return sorted({p.shard for p in self.problems if p.shard is not None})

    def format(self) -> str:
        lines = [f"zoo {self.root}: {self.good_shards}/{self.planned_shards} planned shards intact, {self.rows} rows read"]
        for p in sorted(self.problems, key=lambda p: (KINDS.index(p.kind), p.where)):
            lines.append(f"  {p.kind.upper():15s} {p.where}: {p.detail}")
        for p in self.warnings:
            lines.append(f"  warning         {p.where}: {p.detail}")
        if self.ok:
            lines.append("OK: every planned shard is present, matches its checksum, and every (model, epoch) row "
                         "exists exactly once.")
        else:
            repair = self.repair or f"'raysys zoo generate CONFIG --out {self.root}' with the zoo's config"
            lines.append(f"{len(self.problems)} problem(s) in shards {self.bad_shards or '-'}. Fix: rerun "
                         f"{repair}; it rewrites the bad shards and keeps the intact ones.")
        return "\n".join(lines)


def verify_zoo(root: str | Path, checksums: bool = True) -> ZooReport:
    """Check every planned shard of a zoo against its record, the manifest and the plan."""
    import pyarrow.parquet as pq

    from raysys.store import (META, MANIFEST, QUARANTINE, SHARDS, is_legacy, open_zoo, planned_shards, quarantined_files,
                              read_shard, schema_problem, sha256_file, shard_file, shard_record)

    from raysys.storage import Remote, is_remote

    if is_remote(root):  # the bytes fetched from the remote store into its working copy are the ones checked
        remote = Remote(str(root), flag="zoo")
        remote.pull()
        report = verify_zoo(remote.local, checksums)
        report.root, report.repair = remote.uri, report.repair.replace(str(remote.local), remote.uri)
        return report
    root = Path(root)
    if not root.is_dir():
        raise RaysysError(f"{root} is not a directory. Pass the zoo directory written by "
                          f"'raysys zoo generate CONFIG --out DIR'.")
    zoo = open_zoo(root, check=False)  # the schema check is part of this report
    manifest, shard_dir = zoo.manifest, root / SHARDS
    report = ZooReport(root)
    aligned = manifest.get("aligned")
    if isinstance(aligned, dict):  # an aligned copy is repaired by aligning again, not by generating
        report.repair = f"'raysys zoo align {aligned.get('source', 'SRC')} --out {root}' with the same options"
    imported = manifest.get("imported")
    if isinstance(imported, dict):  # an imported zoo is repaired by importing again
        report.repair = f"'raysys zoo import-modelzoos {imported.get('source', 'SRC')} --out {root}' with the same options"
    try:
        num_params = zoo.num_params
    except (KeyError, TypeError, ValueError) as err:
        report.problems.append(Problem("schema", MANIFEST, f"has no usable layout ({err!r}); regenerate the zoo"))
        return report
    if "num_params" in manifest and manifest["num_params"] != num_params:
        report.problems.append(Problem("schema", MANIFEST, f"says num_params {manifest['num_params']} but its "
                                                           f"layout has {num_params}"))
    epochs = manifest.get("epochs")
    first_epoch = manifest.get("first_epoch", 0)  # an imported zoo without its initializations starts at 1
    first_epoch = first_epoch if isinstance(first_epoch, int) else 0
    expected_epochs = set(range(first_epoch, int(epochs) + 1)) if isinstance(epochs, int) else None
    plan = planned_shards(manifest, root)
    report.planned_shards = len(plan)
    planned_ids = {int(s["shard"]) for s in plan}
    owner: dict[int, int] = {}  # model_id -> shard that wrote it
    for s in plan:
        sid, ids = int(s["shard"]), s.get("model_ids")
        path = shard_file(root, sid)
        rec_path, rec = shard_record(root, sid)
        if not path.exists():
            report.problems.append(Problem("missing", path.name, "planned but absent" +
                                           (" (its record exists)" if rec_path is not None else ""), sid))
            continue
        if rec_path is None:
            report.problems.append(Problem("unrecorded", path.name, "has no completion record: a run stopped "
                                                                    "before finishing it", sid))
            continue
        if rec is None:
            report.problems.append(Problem("corrupted", rec_path.name, "is not valid JSON", sid))
            continue
        size = path.stat().st_size
        if rec.get("bytes") is not None and size != rec["bytes"]:
            report.problems.append(Problem("truncated", path.name, f"{size} bytes, the record says {rec['bytes']}", sid))
            continue
        if checksums:
            digest = sha256_file(path)
            if digest != rec.get("sha256"):
                report.problems.append(Problem("corrupted", path.name, f"sha256 {digest[:12]}... does not match the "
                                                                       f"record's {str(rec.get('sha256'))[:12]}...", sid))
                continue
            if s.get("sha256") and s["sha256"] != rec.get("sha256"):
                report.problems.append(Problem("corrupted", path.name, "its record's sha256 differs from the one "
                                                                       "in manifest.json", sid))
                continue
        try:
            pf = pq.ParquetFile(path)
            problem = schema_problem(pf.schema_arrow, num_params)
            t = pf.read(columns=["model_id", "epoch"])
            if checksums:  # every page checksum (the sha256 above is only as good as its record)
                read_shard(path)
        except Exception as err:  # an unreadable file is corrupt whatever its checksum says
            report.problems.append(Problem("corrupted", path.name, f"unreadable Parquet ({type(err).__name__})", sid))
            continue
        if problem:
            report.problems.append(Problem("schema", path.name, problem, sid))
            continue
        mids, eps = t.column("model_id").to_pylist(), t.column("epoch").to_pylist()
        report.rows += len(mids)
        keys = Counter(zip(mids, eps))
        dup = [k for k, n in keys.items() if n > 1]
        if dup:
            report.problems.append(Problem("duplicate_rows", path.name, f"{len(dup)} (model_id, epoch) pairs more "
                                                                        f"than once, e.g. {dup[0]}", sid))
        allowed = set(int(m) for m in (ids if ids is not None else rec.get("model_ids", [])))
        foreign = sorted(set(mids) - allowed)
        if foreign:
            report.problems.append(Problem("foreign_rows", path.name, f"rows of models {foreign[:5]} that are not "
                                                                      f"in this shard's model set", sid))
        elsewhere = sorted({m for m in set(mids) & allowed if owner.get(m, sid) != sid})
        if elsewhere:
            report.problems.append(Problem("duplicate_rows", path.name, f"models {elsewhere[:5]} also appear in "
                                                                        f"shard {owner[elsewhere[0]]}", sid))
        for m in set(mids):
            owner.setdefault(m, sid)
        if expected_epochs is not None:
            want = {(m, e) for m in allowed for e in expected_epochs}
            absent = sorted(want - set(keys))
            if absent:
                report.problems.append(Problem("missing_rows", path.name, f"{len(absent)} (model_id, epoch) rows "
                                                                          f"absent, e.g. {absent[0]}", sid))
        if not any(p.shard == sid for p in report.problems):
            report.good_shards += 1
    for path in sorted(shard_dir.glob("shard-*.parquet")):
        try:
            number: int | None = int(path.stem.split("-")[1])
        except (IndexError, ValueError):
            number = None
        if number not in planned_ids:
            report.problems.append(Problem("unplanned", path.name, "is not in the manifest's shard plan (from another "
                                                                  "zoo?); move it away"))
    for path in sorted([*shard_dir.glob(".*.tmp"), *(root / META).glob(".*.tmp")]):
        report.warnings.append(Problem("leftover", path.name, "temporary file of a killed run (generate removes it "
                                                              "once its writer is gone)"))
    for path in quarantined_files(root):
        report.warnings.append(Problem("quarantined", f"{QUARANTINE}/{path.name}",
                                       "moved aside by a writer (unplanned, or not matching its record): not part "
                                       "of the zoo; inspect it, then delete it"))
    if is_legacy(root):
        report.warnings.append(Problem("layout", root.name, "has files of the first zoo layout (manifest.json, "
                                                           "shards/shard-N.json): still readable; 'raysys zoo "
                                                           f"migrate {root}' makes it a plain Parquet dataset"))
    return report


def _cmd_verify(args) -> int:
    if getattr(args, "repair", False):
        from raysys.storage import is_remote
        from raysys.store import MANIFEST, PLAN, repair_manifest

        if is_remote(args.dir):
            raise RaysysError(f"--repair rewrites a manifest in place and works on a local zoo directory, not "
                              f"{args.dir}. Rerun 'raysys zoo generate CONFIG --out {args.dir}' with the zoo's config: "
                              f"it rebuilds the manifest and keeps every shard that matches its record.")
        if not Path(args.dir).is_dir():
            raise RaysysError(f"{args.dir} is not a directory. Pass the zoo directory written by "
                              f"'raysys zoo generate CONFIG --out DIR'.")
        r = repair_manifest(args.dir)
        if not r["rebuilt"]:
            print(f"raysys zoo verify: {Path(args.dir) / MANIFEST} is readable; nothing to rebuild")
        else:
            left = (f"; shards {r['left_out']} do not match their records and are left out (status "
                    f"'{r['status']}': rerun the command that wrote the zoo to rewrite them)" if r["left_out"] else "")
            print(f"raysys zoo verify: rebuilt {Path(args.dir) / MANIFEST} ({r['why']}) from {PLAN} and "
                  f"{r['verified']}/{r['planned']} verified shard records{left}")
    report = verify_zoo(args.dir, checksums=not args.no_checksums)
    print(report.format())
    return 0 if report.ok else 1


# --- pre-flight checks ----------------------------------------------------------------------------

def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """A directory raysys may create or write into: not a file, and under a writable existing ancestor."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise RaysysError(f"{flag} {path} is a file, not a directory. Pass a directory path (it is created if "
                          f"missing), or move the file away.")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RaysysError(f"{flag} {path}: {parent} is a file, so the directory cannot be created. "
                          f"Choose another {flag}.")
    import os

    if not os.access(parent, os.W_OK | os.X_OK):
        raise RaysysError(f"{flag} {path}: {parent} is not writable. Choose an {flag} you can write to.")
    return path


def _probe(host: str, port: int) -> str | None:
    """None when something accepts TCP connections at host:port, else why not."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as err:
        return err.strerror or type(err).__name__


def check_ray_address(address: str | None) -> None:
    """Fail fast on a Ray address nothing listens on (ray.init would retry it for minutes)."""
    if not address or address in ("local", "auto"):
        return
    target = address.split("://", 1)[-1].split("/", 1)[0]  # ray://host:port, host:port
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise RaysysError(f"Ray address '{address}' is not host:port (or ray://host:port, 'auto', 'local'). "
                          f"Fix --address (e.g. 10.0.0.5:6379), or leave it out to start a local Ray.")
    why = _probe(host.strip("[]"), int(port))
    if why:
        raise RaysysError(f"cannot reach the Ray cluster at {address} ({why}). Start it ('ray start --head') or fix "
                          f"--address / ray_address; leave it out to run on a local Ray.")
