"""Reliability II (issue 14): strays are quarantined, one writer per directory, a damaged manifest is
repaired, and every command that reads a damaged zoo says so in one line.

Zoos here are written the way ``raysys zoo generate`` writes them (its own manifest, shards trained in
this process by its shard function), so that a rerun of ``generate`` resumes them without training:
no Ray unless a shard has to be redone.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raysys import cli, datasets
from raysys.config import RaysysError, validate
from raysys.integrity import verify_zoo
from raysys.store import (LOCK, MANIFEST, META, PLAN, QUARANTINE, WriterLock, ZooWriter, clean_temp_files,
                          open_zoo, quarantined_files, shard_file, temp_path)
from raysys.zoo import ZooConfig, _manifest, expand, generate, plan_shards, splits_for, train_shard

REPO = Path(__file__).resolve().parents[1]
TINY = {"name": "rel", "dataset": {"name": "tetris"}, "arch": "tetris_ffn", "grid": {"lr": 1e-2},
        "seeds": {"start": 1, "count": 4}, "epochs": 1, "models_per_shard": 2,
        "mlflow": {"experiment": "reliability-test"}}


def tiny_config(mlflow_uri: str) -> ZooConfig:
    return validate(ZooConfig, {**TINY, "mlflow": {**TINY["mlflow"], "tracking_uri": mlflow_uri}})


def trained_zoo(out: Path, config: ZooConfig) -> ZooWriter:
    """Every shard of ``config``'s zoo trained in this process, under generate's own 'running' manifest."""
    data = datasets.load(config.dataset.name)
    specs = expand(config)
    shards, splits = plan_shards(specs, config.models_per_shard), splits_for(len(specs), config.split_seed)
    writer = ZooWriter(out)
    writer.write_manifest(_manifest(config, data, shards, splits, "running"))
    for shard in shards:
        train_shard(config.arch, shard, specs, data, config.epochs, splits, writer)
    return writer


# --- A: strays are quarantined ------------------------------------------------------------------


@pytest.mark.slow
def test_resumed_generate_quarantines_unplanned_files_and_verify_names_them(tmp_path, mlflow_uri, capsys):
    out, config = tmp_path / "zoo", tiny_config(mlflow_uri)
    writer = trained_zoo(out, config)
    # a shard of another zoo copied in with its record, a stray Parquet file, a record without a plan entry
    shutil.copy(writer.shard_path(0), writer.shard_path(7))
    rec = json.loads(writer.record_path(0).read_text())
    writer.record_path(7).write_text(json.dumps({**rec, "shard": 7}))
    shutil.copy(writer.shard_path(1), out / "shards" / "part-0.parquet")
    (out / "extra").mkdir()
    shutil.copy(writer.shard_path(1), out / "extra" / "more.parquet")  # pd.read_parquet(ZOO) would read it too
    writer.record_path(9).write_text(json.dumps({**rec, "shard": 9}))
    good = {s: writer.shard_path(s).stat().st_mtime_ns for s in (0, 1)}

    generate(config, out, progress=False)  # nothing to train: no Ray
    printed = capsys.readouterr().out
    for name in ("shard-00007.parquet", "shard-00007.json", "part-0.parquet", "more.parquet", "shard-00009.json"):
        assert f"quarantined {out}" in printed and name in printed, printed
        assert not list(out.rglob(name))  # moved, under another name
    q = quarantined_files(out)
    assert len(q) == 5 and all(".quarantined-" in p.name for p in q)
    assert not [p for p in q if p.name.endswith(".parquet")]  # no **/*.parquet glob reads them
    assert {s: writer.shard_path(s).stat().st_mtime_ns for s in (0, 1)} == good  # the zoo's own shards stay
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000.parquet", "shard-00001.parquet"]
    assert len(open_zoo(out).frame()) == 4 * 2

    report = verify_zoo(out)
    assert report.ok and sorted(w.where for w in report.warnings if w.kind == "quarantined") == \
        sorted(f"{QUARANTINE}/{p.name}" for p in q)
    assert cli.main(["zoo", "verify", str(out)]) == 0
    text = capsys.readouterr().out
    assert all(p.name in text for p in q) and "quarantine" in text


@pytest.mark.slow
def test_resumed_generate_quarantines_a_shard_that_does_not_match_its_record(tmp_path, ray_local, mlflow_uri, capsys):
    from tests.test_faults import flip_bytes

    out, config = tmp_path / "zoo", tiny_config(mlflow_uri)
    writer = trained_zoo(out, config)
    before = writer.shard_path(0).read_bytes()
    flip_bytes(writer.shard_path(1))
    kept = writer.shard_path(0).stat().st_mtime_ns
    generate(config, out, progress=False)
    printed = capsys.readouterr().out
    assert "quarantined" in printed and "shard-00001.parquet" in printed and "sha256 does not match" in printed
    names = sorted(p.name.split(".quarantined-")[0] for p in quarantined_files(out))
    assert names == ["shard-00001.json", "shard-00001.parquet"]
    assert writer.is_complete(1) and writer.shard_path(0).stat().st_mtime_ns == kept
    assert writer.shard_path(0).read_bytes() == before
    assert verify_zoo(out).ok


# --- B: one writer per directory ----------------------------------------------------------------

HOLD = ("import sys; from raysys.store import WriterLock\n"
        "locks = [WriterLock(d, 'test holder', heartbeat_s=0.2).acquire() for d in sys.argv[1:]]\n"
        "print('locked', flush=True); sys.stdin.read()")  # holds until stdin closes, then dies without releasing


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


@pytest.fixture
def complete_zoo(tmp_path, mlflow_uri):
    out, config = tmp_path / "zoo", tiny_config(mlflow_uri)
    trained_zoo(out, config)
    generate(config, out, progress=False)
    return out, config


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_owner_then_a_dead_owners_lock_is_taken_over(complete_zoo, tmp_path,
                                                                                            capsys):
    zoo, config = complete_zoo
    dst = tmp_path / "aligned"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(zoo), str(dst)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        owner = f"pid {holder.pid}@{socket.gethostname()}"
        lock = json.loads((zoo / LOCK).read_text())
        assert lock["pid"] == holder.pid and lock["host"] == socket.gethostname() and len(lock["token"]) == 32
        mtime = (zoo / LOCK).stat().st_mtime_ns
        time.sleep(0.6)
        assert (zoo / LOCK).stat().st_mtime_ns > mtime  # the owner's heartbeat
        before = sorted((p.name, p.stat().st_mtime_ns) for p in zoo.rglob("*") if p.is_file() and p.name != "lock")

        with pytest.raises(RaysysError, match=rf"being written by another process: test holder \({owner}, since "
                                              rf"{lock['since']}.*Wait for it to finish"):
            generate(config, zoo, progress=False)
        assert cli.main(["zoo", "align", str(zoo), "--out", str(dst), "--template-epochs", "1", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("raysys: error:") == 1 and owner in err and "Traceback" not in err
        assert not (dst / MANIFEST).exists()
        after = sorted((p.name, p.stat().st_mtime_ns) for p in zoo.rglob("*") if p.is_file() and p.name != "lock")
        assert after == before  # the refused writer touched nothing
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # the holder died without releasing: its lock names a dead pid, and the next writer takes it over
    assert json.loads((zoo / LOCK).read_text())["pid"] == holder.pid
    generate(config, zoo, progress=False)
    printed = capsys.readouterr().out
    assert f"took over the stale lock {zoo / LOCK} of pid {holder.pid}@" in printed and "no longer running" in printed
    assert not (zoo / LOCK).exists()  # released at the end
    align = cli.main(["zoo", "align", str(zoo), "--out", str(dst), "--template-epochs", "1", "--no-progress"])
    assert align == 0 and "took over the stale lock" in capsys.readouterr().out and not (dst / LOCK).exists()


def test_a_lock_of_another_host_is_stale_only_after_the_timeout_and_a_reused_pid_is_dead(tmp_path, capsys):
    root = tmp_path / "zoo"
    (root / META).mkdir(parents=True)
    other = {"pid": 1, "host": "some-other-node", "since": "2026-01-01T00:00:00Z", "token": "t" * 32,
             "command": "raysys zoo generate"}
    (root / LOCK).write_text(json.dumps(other))
    with pytest.raises(RaysysError, match=r"pid 1@some-other-node.*taken over after 300 s without its heartbeat"):
        WriterLock(root, "test").acquire()
    old = time.time() - 301
    os.utime(root / LOCK, (old, old))
    with WriterLock(root, "test") as lock:
        assert "not refreshed for 30" in capsys.readouterr().out
        assert json.loads((root / LOCK).read_text())["token"] == lock.token
    # same host, a live pid that now belongs to another process (its start time differs)
    (root / LOCK).write_text(json.dumps({**other, "host": socket.gethostname(), "pid": os.getpid(), "proc_start": "1"}))
    with WriterLock(root, "test"):
        assert "now belongs to another process" in capsys.readouterr().out
    # the lock of a live process on this host is never taken over, however old
    (root / LOCK).write_text(json.dumps({**other, "host": socket.gethostname(), "pid": os.getpid()}))
    os.utime(root / LOCK, (old, old))
    with pytest.raises(RaysysError, match=f"pid {os.getpid()}@"):
        WriterLock(root, "test").acquire()


@pytest.mark.slow
def test_start_up_cleanup_removes_only_temp_files_of_dead_owners(complete_zoo):
    zoo, config = complete_zoo
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        host = temp_path(zoo / "x").name.split(".")[-2].split("-")[0]
        names = {"live": f".shard-00000.parquet.{host}-{live.pid}-abc.tmp",
                 "dead": f".shard-00000.parquet.{host}-{dead_pid()}-abc.tmp",
                 "other_fresh": ".shard-00001.parquet.0123abcd-42-abc.tmp",
                 "other_old": ".shard-00001.parquet.0123abcd-43-abc.tmp",
                 "unowned": ".shard-00001.parquet.deadbeef.tmp"}  # a name of raysys before owners were named
        paths = {k: zoo / "shards" / v for k, v in names.items()}
        for p in paths.values():
            p.write_bytes(b"half")
        old = time.time() - 400
        os.utime(paths["other_old"], (old, old))
        os.utime(paths["unowned"], (old, old))
        generate(config, zoo, progress=False)
        assert {k for k, p in paths.items() if p.exists()} == {"live", "other_fresh"}
        assert clean_temp_files(zoo) == []  # their owners may still be writing them
    finally:
        live.stdin.close()
        live.wait(timeout=30)
    assert sorted(p.name for p in clean_temp_files(zoo)) == [names["live"]]  # its owner is gone now


# --- C: a damaged manifest is rebuilt; every reader of a damaged zoo says so in one line -----------------

HYPERREP = {"model": {"d_model": 16, "heads": 2, "layers": 1, "ff": 32, "latent_dim": 8, "dropout": 0.0,
                      "projection_dim": 8},
            "train": {"epochs": 1, "batch_size": 8, "lr": 1.0e-3, "epoch_window": [0, 1], "device": "cpu",
                      "threads": 1}}


def finished_zoo(out: Path, mlflow_uri: str = "sqlite:///unused.db") -> Path:
    """A complete zoo exactly as generate leaves it (its final manifest), without MLflow or Ray."""
    from raysys.store import shard_record

    config = tiny_config(mlflow_uri)
    trained_zoo(out, config)
    data, specs = datasets.load("tetris"), expand(config)
    shards, splits = plan_shards(specs, config.models_per_shard), splits_for(len(specs), config.split_seed)
    records = {s.shard: shard_record(out, s.shard)[1] for s in shards}
    ZooWriter(out).write_manifest(_manifest(config, data, shards, splits, "complete", records))
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A finished zoo and an (untrained) autoencoder checkpoint for it, copied by each test that damages them."""
    from raysys.hyperrep.checkpoint import save_checkpoint
    from raysys.hyperrep.config import HyperRepConfig
    from raysys.hyperrep.model import HyperRepresentation

    root = tmp_path_factory.mktemp("pristine")
    zoo = finished_zoo(root / "zoo")
    model = HyperRepresentation(validate(HyperRepConfig, HYPERREP), open_zoo(zoo).layout)
    save_checkpoint(model, root / "ckpt", {"zoo": str(zoo)})
    return root


def test_verify_repair_rebuilds_a_truncated_manifest_byte_for_byte(pristine, tmp_path, capsys):
    zoo = tmp_path / "zoo"
    shutil.copytree(pristine / "zoo", zoo)
    original = (zoo / MANIFEST).read_bytes()
    assert json.loads((zoo / PLAN).read_text())["status"] == "planned"
    (zoo / MANIFEST).write_bytes(original[: len(original) // 3])  # a torn write, a full disk, a bad copy
    assert cli.main(["zoo", "verify", str(zoo)]) == 2
    err = capsys.readouterr().err
    assert f"{zoo / MANIFEST} is damaged: it is not valid JSON" in err and f"raysys zoo verify {zoo} --repair" in err

    assert cli.main(["zoo", "verify", str(zoo), "--repair"]) == 0
    out = capsys.readouterr().out
    assert f"rebuilt {zoo / MANIFEST}" in out and "2/2 verified shard records" in out and "OK" in out
    assert (zoo / MANIFEST).read_bytes() == original  # the bytes the writer wrote: checkpoints' zoo hashes hold
    assert [p.name.split(".quarantined-")[0] for p in quarantined_files(zoo)] == ["manifest.json"]
    assert len(open_zoo(zoo).frame()) == 4 * 2
    assert cli.main(["zoo", "verify", str(zoo), "--repair"]) == 0  # nothing left to rebuild
    assert "nothing to rebuild" in capsys.readouterr().out
    (zoo / MANIFEST).unlink()  # lost altogether
    assert cli.main(["zoo", "info", str(zoo)]) == 2 and "is damaged: it is missing" in capsys.readouterr().err
    assert cli.main(["zoo", "verify", str(zoo), "--repair"]) == 0 and (zoo / MANIFEST).read_bytes() == original
    capsys.readouterr()

    # a shard that no longer matches its record is left out: the rebuilt manifest says 'running'
    from tests.test_faults import flip_bytes

    flip_bytes(shard_file(zoo, 1))
    (zoo / MANIFEST).write_text("[]")
    assert cli.main(["zoo", "verify", str(zoo), "--repair"]) == 1
    out = capsys.readouterr().out
    assert "shards [1] do not match their records" in out and "CORRUPTED" in out
    assert json.loads((zoo / MANIFEST).read_text())["status"] == "running"
    # without plan.json (an older zoo) the error says how else to get a manifest back
    (zoo / MANIFEST).write_text("{")
    (zoo / PLAN).unlink()
    assert cli.main(["zoo", "verify", str(zoo), "--repair"]) == 2
    assert "no readable __raysys__/plan.json" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_rebuilds_a_damaged_manifest_from_its_config(pristine, tmp_path, mlflow_uri, capsys):
    zoo = tmp_path / "zoo"
    shutil.copytree(pristine / "zoo", zoo)
    (zoo / PLAN).unlink()  # an older zoo: only the config can say what the manifest was
    kept = {p.name: p.stat().st_mtime_ns for p in (zoo / "shards").iterdir()}
    (zoo / MANIFEST).write_bytes((zoo / MANIFEST).read_bytes()[:100])
    generate(tiny_config(mlflow_uri), zoo, progress=False)  # every shard matches its record: no training, no Ray
    assert "quarantined" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (zoo / "shards").iterdir()} == kept
    assert verify_zoo(zoo).ok and json.loads((zoo / MANIFEST).read_text())["status"] == "complete"
    (zoo / MANIFEST).unlink()  # lost altogether, plan.json (written again by that run) still there
    with pytest.raises(RaysysError, match="different config"):  # plan.json says which config made the zoo
        generate(tiny_config(mlflow_uri), zoo, overrides=["epochs=2"], progress=False)
    generate(tiny_config(mlflow_uri), zoo, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (zoo / "shards").iterdir()} == kept and verify_zoo(zoo).ok


def _truncate_manifest(zoo: Path) -> str:
    (zoo / MANIFEST).write_bytes((zoo / MANIFEST).read_bytes()[:200])
    return "manifest.json"


def _garble_shard(zoo: Path) -> str:
    path = shard_file(zoo, 0)
    path.write_bytes(b"\0" * path.stat().st_size)  # same size: only reading it shows the damage
    return "shard-00000.parquet"


def _lose_record(zoo: Path) -> str:
    (zoo / META / "shard-00001.json").unlink()
    return "shard-00001"


DAMAGES = {"truncated_manifest": _truncate_manifest, "malformed_shard": _garble_shard, "missing_record": _lose_record}
FIXES = {"truncated_manifest": "--repair", "malformed_shard": "raysys zoo generate",
         "missing_record": "raysys zoo generate"}
COMMANDS = {
    "zoo_info": lambda z, c, t: ["zoo", "info", z],
    "zoo_verify": lambda z, c, t: ["zoo", "verify", z],
    "zoo_align": lambda z, c, t: ["zoo", "align", z, "--out", f"{t}/aligned", "--template-epochs", "1",
                                  "--no-progress"],
    "hyperrep_train": lambda z, c, t: ["hyperrep", "train", f"{t}/hyperrep.yaml", "--zoo", z, "--out", f"{t}/hr",
                                       "--tracking-uri", f"sqlite:///{t}/mlflow.db", "--no-progress"],
    "hyperrep_eval": lambda z, c, t: ["hyperrep", "eval", "--checkpoint", c, "--zoo", z, "--out", f"{t}/eval",
                                      "--tracking-uri", f"sqlite:///{t}/mlflow.db", "--epochs", "0-1"],
    "hyperrep_baselines": lambda z, c, t: ["hyperrep", "baselines", z, "--k", "2", "--window", "0", "1"],
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_reader_of_a_damaged_zoo_fails_with_one_line_naming_the_file_and_the_fix(pristine, tmp_path, capsys,
                                                                                      damage, command):
    import yaml

    zoo = tmp_path / "zoo"
    shutil.copytree(pristine / "zoo", zoo)
    (tmp_path / "hyperrep.yaml").write_text(yaml.safe_dump(HYPERREP))
    name = DAMAGES[damage](zoo)
    rc = cli.main(COMMANDS[command](str(zoo), str(pristine / "ckpt"), str(tmp_path)))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if command == "zoo_verify" and damage != "truncated_manifest":  # verify's report is the answer: it names both
        assert rc == 1 and name in out and FIXES[damage] in out, out
        return
    assert rc == 2, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("raysys: error: "), err
    assert name in err and FIXES[damage] in err, err


# --- item 5: cache keys that see code --------------------------------------------------------------


@pytest.mark.slow
def test_a_zoo_made_by_other_trainer_code_is_not_resumed(tmp_path, mlflow_uri, capsys, monkeypatch):
    """The manifest and every shard record name the store format and the trainer's code fingerprint; a resumed
    generate whose fingerprint differs from the zoo's (forged here) is refused, naming both and the way to start
    fresh, touching nothing; $RAYSYS_ALLOW_CODE_CHANGE=1 resumes it anyway."""
    from raysys.provenance import ALLOW_ENV, STORE_FORMAT, code_fingerprint, describe

    out, config = tmp_path / "zoo", tiny_config(mlflow_uri)
    writer = trained_zoo(out, config)
    now = code_fingerprint("zoo")
    assert now["raysys_version"] and len(now["sources"]) == 16 and "train.py" in now["files"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["store_format"] == STORE_FORMAT and manifest["code"] == now
    for s in (0, 1):
        record = json.loads(writer.record_path(s).read_text())
        assert record["store_format"] == STORE_FORMAT and record["code"] == now

    forged = {**now, "raysys_version": "0.0.1", "sources": "0123456789abcdef"}
    (out / MANIFEST).write_text(json.dumps({**manifest, "code": forged}))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RaysysError) as err:
        generate(config, out, progress=False)
    msg = str(err.value)
    assert describe(forged) in msg and describe(now) in msg, msg
    assert "0.0.1" in msg and "--out NEW_DIR" in msg and "delete" in msg and ALLOW_ENV in msg, msg
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    # the same through the CLI: one error line
    import yaml

    cfg = tmp_path / "zoo.yaml"
    cfg.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    capsys.readouterr()
    assert cli.main(["zoo", "generate", str(cfg), "--out", str(out), "--no-progress"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("raysys: error: ") and "0.0.1" in lines[0], lines
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before

    monkeypatch.setenv(ALLOW_ENV, "1")
    shards = {s: writer.shard_path(s).stat().st_mtime_ns for s in (0, 1)}
    capsys.readouterr()
    generate(config, out, progress=False)  # nothing to train: no Ray
    assert f"{ALLOW_ENV}=1" in capsys.readouterr().out
    assert {s: writer.shard_path(s).stat().st_mtime_ns for s in (0, 1)} == shards
    assert json.loads((out / MANIFEST).read_text())["code"] == now
