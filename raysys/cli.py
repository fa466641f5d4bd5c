"""The ``raysys`` command: every subcommand's arguments, with the stage code imported only when a command runs.

Building the parser imports nothing heavy (no Ray, torch, MLflow or pyarrow), so ``raysys --help`` and
``raysys zoo --help`` answer at once; each handler is named as ``"module:function"`` and imported when
its command runs. Errors the user can fix (:class:`raysys.config.RaysysError`) print as one message,
without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from raysys import __version__
from raysys.runtime import ADDRESS_HELP

DESCRIPTION = """\
Learn from populations of neural networks (model zoos) on Ray: generate zoos with Ray Train,
train hyper-representations of their weights, sample and fine-tune new populations, search
with Ray Tune + Optuna, and track every stage in MLflow."""
EPILOG = """\
examples:
  raysys pipeline configs/pipeline/demo.yaml --out runs/demo     every stage; a rerun resumes
  raysys zoo generate configs/zoo/digits-seed.yaml --out zoos/digits-seed
  raysys hyperrep train configs/hyperrep/digits.yaml --zoo zoos/digits-seed --out ckpt/digits
  raysys mlflow serve                                            the MLflow UI on ./mlflow.db

Ray: --address, else $RAY_ADDRESS (set inside `ray job submit`), else a local Ray.
MLflow: --tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlflow.db, for every command.
Run 'raysys COMMAND --help' for a command's options."""
TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlflow.db)"
PROGRESS_HELP = "no progress bars (for logs and batch jobs)"


class _Lazy:
    """A handler that imports ``module:function`` (its ``target``) when its command runs."""

    def __init__(self, target: str):
        self.target = target

    def __call__(self, args):
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)(args)


def _command(sub, name: str, target: str, help: str, **kwargs) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=kwargs.pop("description", None) or help[:1].upper() + help[1:] + ".",
                       **kwargs)
    p.set_defaults(func=_Lazy(target))
    return p


def _overrides(p, example: str, dest: str = "set") -> None:
    p.add_argument("--set", dest=dest, action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value, e.g. --set {example} (repeatable)")


# --- zoo ------------------------------------------------------------------------------------------

def _zoo(subparsers) -> None:
    zoo = subparsers.add_parser("zoo", help="generate and inspect model zoos", description="Generate and inspect model zoos.")
    sub = zoo.add_subparsers(dest="zoo_command", required=True)

    g = _command(sub, "generate", "raysys.zoo:_cmd_generate", "train a zoo from a config on Ray Train (reruns resume)")
    g.add_argument("config", help="zoo config YAML (see configs/zoo/)")
    g.add_argument("--out", required=True, help="zoo directory; rerunning with the same config resumes it")
    _overrides(g, "grid.lr=[1e-3]")
    g.add_argument("--models", type=int, help="keep only the first N models of the grid")
    g.add_argument("--epochs", type=int, help="number of training epochs")
    g.add_argument("--address", help=ADDRESS_HELP)
    g.add_argument("--tracking-uri", help=TRACKING_HELP)
    g.add_argument("--workers", type=int,
                   help="Ray Train workers (default: resources.num_workers, else one per CPU of the Ray)")
    g.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)

    i = _command(sub, "info", "raysys.zoo:_cmd_info", "summarize a zoo directory")
    i.add_argument("dir", help="zoo directory")
    i.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    v = _command(sub, "verify", "raysys.integrity:_cmd_verify", "check a zoo's shards against checksums, plan and rows")
    v.add_argument("dir", help="zoo directory")
    v.add_argument("--no-checksums", action="store_true", help="skip the sha256 pass (sizes, schema and rows only)")
    v.add_argument("--repair", action="store_true",
                   help="first rebuild a damaged (truncated, unreadable) manifest from __raysys__/plan.json and the "
                        "shard records that match their files; the damaged one goes to __raysys__/quarantine/")

    m = _command(sub, "migrate", "raysys.store:_cmd_migrate",
                 "convert a zoo of the first layout (manifest.json, fixed_shape_tensor weights) to a plain Parquet dataset",
                 description="Convert a zoo written before the zoo folder became a plain Parquet dataset (manifest.json "
                             "at the top, shards/shard-N.json records, fixed_shape_tensor weights) to the current "
                             "layout: metadata in __raysys__/, weights a fixed-size list. In place, every step leaves "
                             "a readable zoo and a rerun finishes an interrupted migration; --out writes a converted "
                             "copy instead. Old zoos are read as they are either way.")
    m.add_argument("dir", help="zoo directory")
    m.add_argument("--out", help="write the converted zoo here (a new or empty directory) instead of in place")

    a = _command(sub, "align", "raysys.align:_cmd_align",
                 "copy a zoo with every model permuted onto one training-split template (function-preserving)",
                 description="Copy zoo SRC to DST with the hidden units of every state (all splits, all epochs) permuted "
                             "onto one template: the mean of the train split's last --template-epochs epochs after "
                             "--rounds rounds of weight matching. Each model computes exactly what it computed before. "
                             "Rerunning the same command resumes an interrupted copy.")
    a.add_argument("src", help="zoo directory to align (written by 'raysys zoo generate')")
    a.add_argument("--out", required=True, help="directory of the aligned copy; rerunning the same command resumes it")
    a.add_argument("--template-epochs", type=int, default=5, help="last epochs averaged into the template (default 5)")
    a.add_argument("--rounds", type=int, default=3, help="align-then-average rounds for the template (default 3)")
    a.add_argument("--no-progress", action="store_true", help="no per-shard progress lines")

    im = _command(sub, "import-modelzoos", "raysys.importers:_cmd_import",
                  "import a published Model Zoos directory (www.modelzoos.cc) into a raysys zoo",
                  description="Import a zoo in the published Model Zoos format (NeurIPS 2022; www.modelzoos.cc): one "
                              "Ray Tune trial folder per model with params.json, result.json and "
                              "checkpoint_N/checkpoints (a torch state_dict, read with weights_only=True only). CNN-s "
                              "(model::type CNN), CNN-m (CNN3) and the TETRIS FFN (MLP) map onto raysys's layout, every "
                              "shape checked; hyperparameters and per-epoch metrics become columns, splits are 70/15/15 "
                              "by model. Models with a missing, unreadable or non-finite checkpoint are skipped and "
                              "counted. Rerunning the same command resumes an interrupted import.")
    im.add_argument("src", help="the unpacked zoo directory (one folder per model)")
    im.add_argument("--out", required=True, help="raysys zoo directory to write; rerunning the same command resumes it")
    im.add_argument("--arch", choices=["cnn_s", "cnn_m", "tetris_ffn"], default=None,
                    help="architecture (default: from params.json's model::type, else the checkpoint shapes)")
    im.add_argument("--epochs", type=int, default=None,
                    help="last epoch to import (default: the last epoch most models reached); models without every "
                         "checkpoint up to it are skipped")
    im.add_argument("--split-seed", type=int, default=0, help="seed of the 70/15/15 split by model (default 0)")
    im.add_argument("--models-per-shard", type=int, default=50, help="models per Parquet shard (default 50)")
    im.add_argument("--name", default=None, help="zoo name in the manifest (default: SRC's folder name)")
    im.add_argument("--dataset", default=None,
                    help="dataset name for the manifest, e.g. mnist (default: guessed from dataset::dump and SRC)")
    im.add_argument("--skip-mismatched", action="store_true",
                    help="skip (and count) models whose params.json or state_dict does not fit the architecture "
                         "instead of stopping with an error (a checkpoint that is not weights-only always stops it)")
    im.add_argument("--no-progress", action="store_true", help="no progress lines")


# --- hyper-representations ------------------------------------------------------------------------

def _hyperrep(subparsers) -> None:
    parser = subparsers.add_parser("hyperrep", help="train and evaluate hyper-representations of a zoo",
                                   description="Train and evaluate hyper-representations of a zoo.")
    sub = parser.add_subparsers(dest="hyperrep_command", required=True)

    p = _command(sub, "train", "raysys.hyperrep.cli:_train", "train a hyper-representation autoencoder on a zoo",
                 description="Train a hyper-representation autoencoder on a zoo, in this process (no Ray: on a "
                             "cluster, 'raysys pipeline' with hyperrep_gpus or jobs/hyperrep.py puts it on a GPU node).")
    p.add_argument("config", help="YAML config (see configs/hyperrep/)")
    p.add_argument("--zoo", required=True, help="zoo directory (written by 'raysys zoo generate')")
    p.add_argument("--out", required=True, help="checkpoint directory (model.safetensors + config.json)")
    _overrides(p, "train.epochs=10", dest="overrides")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted training from OUT/resume/ (same config and zoo; the same MLflow "
                        "run); with nothing to resume, train from epoch 1")
    p.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)

    p = _command(sub, "eval", "raysys.hyperrep.evaluate:_run_eval", "evaluate a hyper-representation checkpoint on a zoo")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory written by 'raysys hyperrep train'")
    p.add_argument("--zoo", required=True, help="zoo directory (its test split is evaluated)")
    p.add_argument("--out", required=True, help="output directory for eval.json, probes.csv and figures")
    p.add_argument("--ood-zoo", default=None, help="second zoo of the same architecture for out-of-distribution probes")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    p.add_argument("--data-root", default=None, help="where on-disk image datasets live")
    p.add_argument("--epochs", default=None, help="zoo epochs to reconstruct, e.g. 21-25 (default: the training epochs)")
    p.add_argument("--probe-epochs", default=None, help="zoo epochs to probe, e.g. 1-25 (default: all after init)")
    p.add_argument("--no-progress", action="store_true",
                   help="accepted like every long command's; the evaluation draws no progress bars")

    p = _command(sub, "baselines", "raysys.hyperrep.evaluate:_run_baselines",
                 "reconstruction baselines of a zoo (train-mean predictor, PCA-k, nearest training state) that an "
                 "autoencoder has to beat")
    p.add_argument("zoo", help="zoo directory")
    p.add_argument("--k", type=int, nargs="+", default=[8, 16, 32, 64], help="PCA components (the latent sizes to compare)")
    p.add_argument("--window", type=int, nargs=2, default=[21, 25], metavar=("FIRST", "LAST"),
                   help="zoo epochs the autoencoder trains on (train.epoch_window)")
    p.add_argument("--out", default=None, help="write the numbers to this JSON file")


# --- populations ----------------------------------------------------------------------------------

def _populations_common(p, checkpoint: bool = True) -> None:
    p.add_argument("config", help="populations config YAML (see configs/populations/)")
    p.add_argument("--zoo", required=True, help="zoo directory (raysys zoo generate)")
    if checkpoint:
        p.add_argument("--checkpoint", required=True, help="hyper-representation checkpoint directory")
    _overrides(p, "num_models=100", dest="overrides")


def _populations(subparsers) -> None:
    target = "raysys.populations.cli:"
    p = _command(subparsers, "sample", target + "cmd_sample",
                 "sample a population from a hyper-representation (S_KDE, S_KDE30, ...)")
    _populations_common(p)
    p.add_argument("--method", default="S_KDE30",
                   help="S_KDE | S_KDE30 | S_KDE_joint | S_U | B_KDE30 | B_noise_<sigma> (default S_KDE30)")
    p.add_argument("--nolwln-checkpoint", default=None, help="autoencoder trained without LWLN (for B_KDE30)")
    p.add_argument("-n", "--num-models", type=int, default=None, help="population size (default: the config's)")
    p.add_argument("--out", required=True, help="output .safetensors file (tensor 'weights' [n, P])")

    p = _command(subparsers, "finetune", target + "cmd_finetune", "fine-tune a saved population on Ray actors")
    _populations_common(p, checkpoint=False)
    p.add_argument("--weights", required=True, help=".safetensors written by 'raysys sample'")
    p.add_argument("--dataset", default=None, help="target dataset (default: the zoo's own)")
    p.add_argument("--out", required=True, help="output directory (finetune.json)")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)

    pops = subparsers.add_parser("populations", help="the whole populations stage and its report",
                                 description="The whole populations stage and its report.")
    sub = pops.add_subparsers(dest="populations_command", required=True)
    p = _command(sub, "run", target + "cmd_run", "sample -> baselines -> fine-tune on actors -> novelty -> report")
    _populations_common(p)
    p.add_argument("--nolwln-checkpoint", default=None, help="autoencoder trained without LWLN (for B_KDE30)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)
    p = _command(sub, "report", target + "cmd_report", "rebuild report.md/json and plots from DIR/results.json")
    p.add_argument("dir", help="output directory of 'raysys populations run'")


# --- search, pipeline, MLflow ---------------------------------------------------------------------

def _search(subparsers) -> None:
    p = _command(subparsers, "search", "raysys.search:_run",
                 "hyperparameter search over the autoencoder and its sampler (Ray Tune + Optuna)",
                 description="Hyperparameter search over the hyper-representation autoencoder and its KDE sampler.")
    p.add_argument("config", help="search config YAML (see configs/search/)")
    p.add_argument("--zoo", required=True, help="zoo directory written by 'raysys zoo generate'")
    p.add_argument("--out", required=True, help="output directory (Tune experiment, results, best config)")
    _overrides(p, "num_samples=4")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: mlflow.tracking_uri in the config, else $MLFLOW_TRACKING_URI, "
                        "else sqlite:///$PWD/mlflow.db); a resume uses the search's original URI")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.add_argument("--no-progress", action="store_true", help="no line per trial event (progress.json is still written)")


def _pipeline(subparsers) -> None:
    p = _command(subparsers, "pipeline", "raysys.pipeline:_cmd",
                 "zoo -> hyper-representation -> populations -> report, in one command",
                 description="Run every stage into --out; stages whose outputs match the config are skipped.")
    p.add_argument("config", help="pipeline config YAML (see configs/pipeline/)")
    p.add_argument("--out", required=True, help="output directory (local, NFS, or s3://bucket/prefix)")
    _overrides(p, "zoo.epochs=5 or --set tracking_uri=http://127.0.0.1:5000")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: tracking_uri in the config, else $MLFLOW_TRACKING_URI, else the "
                        "URI a previous run into --out recorded, else sqlite:///$PWD/mlflow.db)")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)


def _mlflow(subparsers) -> None:
    mlflow = subparsers.add_parser("mlflow", help="MLflow tracking server for raysys runs",
                                   description="MLflow tracking server for raysys runs.")
    sub = mlflow.add_subparsers(dest="mlflow_command", required=True)
    p = _command(sub, "serve", "raysys.mlflow_server:serve",
                 "run the MLflow tracking server (UI + REST API), localhost by default",
                 description="A thin wrapper around 'mlflow server': database paths are made absolute (the same "
                             "database whatever directory a process runs in), MLflow's file store is refused with the "
                             "fix (MLflow 3 refuses it too), and it binds to 127.0.0.1 unless told otherwise, because "
                             "the server has no authentication: on a cluster, keep its port private and reach the UI "
                             "through an SSH port-forward.")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", default=None,
                   help="sqlite:////abs/path/mlflow.db or postgresql://... (default: ./mlflow.db, made absolute: the "
                        "store every other command uses by default)")
    p.add_argument("--artifacts-destination", default=None,
                   help="directory or s3:// URI for artifacts (default: ./mlartifacts, made absolute)")
    p.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the mlflow command instead of running it")


STAGES = [_zoo, _hyperrep, _populations, _search, _pipeline, _mlflow]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysys", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"raysys {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    for stage in STAGES:
        stage(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from raysys.config import RaysysError  # pydantic: only once a command runs

    try:
        result = args.func(args)
    except RaysysError as err:
        print(f"raysys: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raysys: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
