"""The benchmarks run, through their README commands (smoke runs of a few seconds). Their numbers
are not asserted: speed lives in the benchmarks' own side-by-side reports, never in timed tests."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # each runs a benchmark in a subprocess


def test_zoo_throughput_smoke(tmp_path):
    out = tmp_path / "tp.json"
    subprocess.run([sys.executable, "benchmarks/zoo_throughput.py", "--quick", "--models", "2", "--procs", "1",
                    "--json", str(out)], cwd=ROOT, check=True, timeout=240)
    result = json.loads(out.read_text())
    (rep,) = result["repeats"]
    for side in ("loop", "population"):
        assert rep[side]["model_epochs"] == 2 and rep[side]["wall_s"] > 0 and rep[side]["cpu_s"] > 0
    assert result["speedup"] == rep["speedup"] > 0


def test_zoo_throughput_cli_side_smoke(tmp_path):
    """--cli runs the real `raysys zoo generate` at two sizes (and the tiny zoo) beside the kernel sides."""
    out = tmp_path / "tp.json"
    subprocess.run([sys.executable, "benchmarks/zoo_throughput.py", "--quick", "--cli", "--cli-models", "2", "4",
                    "--procs", "1", "--json", str(out)], cwd=ROOT, check=True, timeout=400)
    result = json.loads(out.read_text())
    (rep,) = result["repeats"]
    assert rep["population"]["model_epochs"] == 2 and result["models"] == 2
    cli = rep["cli"]
    assert cli["small"]["models"] == 2 and cli["big"]["models"] == 4 and cli["tiny_wall_s"] > 0
    assert cli["small"]["wall_s"] > 0 and cli["big"]["wall_s"] > 0 and cli["kernel_s_per_model_epoch"] > 0
    assert set(result["cli"]) >= {"cli_vs_kernel", "cli_vs_loop", "marginal_s_per_model_epoch", "tiny_wall_s"}


def test_hyperrep_throughput_smoke():
    run = subprocess.run([sys.executable, "benchmarks/hyperrep_throughput.py", "--config", "configs/hyperrep/digits.yaml",
                          "--steps", "1", "--reps", "1", "--threads", "1"], cwd=ROOT, check=True, timeout=240,
                         capture_output=True, text=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["num_params"] == 2464 and result["steps"] == 1
    row = result["results"][0]
    assert row["threads"] == 1 and all(row[arm]["samples_per_s"] > 0 for arm in ("plain", "before", "raysys"))
    # the step's FLOPs: at least the feed-forward matmuls of 4 blocks over 2 x 32 sequences of 49 tokens, x3 for backward
    assert row["gflop_per_step"] > 3 * 4 * 2 * 2 * 64 * 49 * 64 * 256 / 1e9
    assert row["roofline_headroom"] > 1


def test_hyperrep_arms_smoke(tmp_path):
    """Both arms of benchmarks/hyperrep_arms.py run on a tiny zoo; the MLP arm starts exactly at PCA-k."""
    from test_hyperrep import make_zoo

    zoo = make_zoo(tmp_path / "zoo", n=30, epochs=4)
    common = ["--latent", "4", "--steps", "4", "--every", "2", "--bs", "16", "--window", "1,3", "--test-window", "1,3"]
    heads = []
    for extra in ([], ["--mlp", "16"]):
        run = subprocess.run([sys.executable, "benchmarks/hyperrep_arms.py", str(zoo), *common, *extra], cwd=ROOT,
                             check=True, timeout=240, capture_output=True, text=True)
        lines = run.stdout.strip().splitlines()
        assert lines[-1].startswith("step 4 ") and "test R²" in lines[-1], run.stdout
        heads.append(lines[0])
    # The transformer arm prints PCA-4's test R²; the MLP arm's step-0 reconstruction is PCA-4 itself.
    pca_test = float(heads[0].split("PCA-4: ")[1].split("test R² ")[1].split(";")[0])
    mlp_step0 = float(heads[1].split("test R² ")[1].split()[0])
    assert "(= PCA-4)" in heads[1] and mlp_step0 == pytest.approx(pca_test, abs=1e-3)
