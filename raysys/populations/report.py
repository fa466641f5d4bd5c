"""Reports in the shape of 000 Tables 1 and 2, with novelty beside accuracy.

Input is the ``results`` dict written by :func:`raysys.populations.stage.run_populations`
(``results.json``): one entry per population with test accuracies at every budget and novelty
summaries at epoch 0 and after the largest budget. Output (written atomically):

* ``report.json``: the tables as data;
* ``report.md``: accuracy tables (mean (std) % per method x epoch budget) per setting, and
  novelty tables (nearest-training-model distance raw / aligned, prediction agreement, diversity);
* ``accuracy_curves.png``: test accuracy over fine-tuning epochs per method;
* ``accuracy_vs_novelty.png``: per-model accuracy against aligned distance to the nearest
  training model, at epoch 0 and after the largest budget.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from raysys.populations.novelty import finite_mean_std
from raysys.store import atomic_write_bytes

SETTING_TITLES = {"in_dataset": "In-dataset (000 Table 1)", "transfer": "Transfer (000 Table 2)"}
NOVELTY_COLUMNS = [
    ("nearest_raw", "nearest train L2 (raw)"),
    ("nearest_aligned", "nearest train L2 (aligned)"),
    ("agreement", "agreement with nearest (%)"),
    ("diversity_raw", "pairwise L2 (raw)"),
    ("diversity_aligned", "pairwise L2 (aligned)"),
]


def tables(results: dict) -> dict:
    """{setting: {"accuracy": [rows], "novelty": [rows]}} with one row per method (x budget)."""
    out: dict[str, dict] = {}
    for pop in results["populations"]:
        t = out.setdefault(pop["setting"], {"dataset": pop["dataset"], "accuracy": [], "novelty": []})
        for budget in results["budgets"]:
            m, s = finite_mean_std(pop["test_acc"][str(budget)])
            t["accuracy"].append({"method": pop["name"], "epoch": budget, "mean": 100 * m, "std": 100 * s,
                                  "num_models": pop["num_models"]})
        for when, summary in pop["novelty"].items():
            row = {"method": pop["name"], "when": when}
            for key, _ in NOVELTY_COLUMNS:
                scale = 100 if key == "agreement" else 1
                row[key] = {"mean": scale * summary[f"{key}_mean"], "std": scale * summary[f"{key}_std"]}
            t["novelty"].append(row)
    return out


def _measure(pop: dict, kind: str) -> float:
    """A population's novelty (mean distance to the nearest training model) or diversity (mean
    pairwise distance), as generated (epoch 0): aligned where measured, else raw."""
    s = pop["novelty"]["epoch_0"]
    key = "nearest" if kind == "novelty" else "diversity"
    aligned = s[f"{key}_aligned_mean"]
    return aligned if np.isfinite(aligned) else s[f"{key}_raw_mean"]


def noise_comparison(results: dict) -> list[dict]:
    """Each generated population against the B_noise population closest to it in novelty, and the
    one closest in diversity where that is another population.

    Zeng et al. 2025: a generator is only interesting if it beats perturbed training models at a
    matched distance from the training set. Novelty is the mean aligned (else raw) distance to the
    nearest training model as generated (epoch 0), diversity the mean pairwise distance within the
    population; accuracy differences are in points, per budget.
    """
    rows = []
    for setting in dict.fromkeys(p["setting"] for p in results["populations"]):
        pops = [p for p in results["populations"] if p["setting"] == setting]
        noise = [p for p in pops if p["name"].startswith("B_noise_")]
        for pop in pops:
            if not (pop["name"].startswith("S_") or pop["name"] == "B_KDE30") or not noise:
                continue
            refs: dict[str, Any] = {}
            for kind in ("novelty", "diversity"):
                ref = min(noise, key=lambda p: abs(_measure(p, kind) - _measure(pop, kind)))
                refs.setdefault(ref["name"], (ref, []))[1].append(kind)
            for ref, kinds in refs.values():
                rows.append({"setting": setting, "method": pop["name"], "noise": ref["name"],
                             "matched_on": kinds, "novelty": _measure(pop, "novelty"),
                             "noise_novelty": _measure(ref, "novelty"), "diversity": _measure(pop, "diversity"),
                             "noise_diversity": _measure(ref, "diversity"),
                             "acc_diff": {str(b): _mean_acc(pop, b) - _mean_acc(ref, b) for b in results["budgets"]}})
    return rows


def _mean_acc(pop: dict, budget: int) -> float:
    return 100 * finite_mean_std(pop["test_acc"][str(budget)])[0]


def yardstick_lines(results: dict) -> list[str]:
    """The sampled populations against the training models they came from and against B_T."""
    y = results.get("yardsticks")
    pops = [p for p in results["populations"] if p["setting"] == "in_dataset"]
    if not y or not pops:
        return []
    top = 100 * y["top_test_acc"]
    lines = ["## Yardsticks", "",
             f"Training models the samplers start from ({y['num_anchors']} training-split states at epochs "
             f"{results['reference_epochs']}): test accuracy {100 * y['train_test_acc']:.1f} %; the top "
             f"{100 * y['top_fraction']:.0f} % by validation accuracy ({y['num_top']} states): {top:.1f} % "
             f"(std {100 * y['top_test_acc_std']:.1f}).", ""]
    budgets = results["budgets"]
    bt = next((p for p in pops if p["name"] == "B_T"), None)
    sampled = [p for p in pops if p["name"].startswith("S_") or p["name"] == "B_KDE30"]
    if sampled:
        head = ["Method", "Ep. 0", "% of top training models"]
        if bt is not None and 1 in budgets:
            head += ["Ep. 1", f"B_T at Ep. {max(budgets)}", "Δ"]
        lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for p in sampled:
            row = [p["name"], f"{_mean_acc(p, 0):.1f}", f"{100 * _mean_acc(p, 0) / top:.0f} %"]
            if bt is not None and 1 in budgets:
                diff = _mean_acc(p, 1) - _mean_acc(bt, max(budgets))
                row += [f"{_mean_acc(p, 1):.1f}", f"{_mean_acc(bt, max(budgets)):.1f}", f"{diff:+.1f}"]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def calibration_lines(results: dict) -> list[str]:
    cal = results.get("calibration") or {}
    if not cal:
        return []
    lines = ["Noise baselines calibrated on a sampled population (no fine-tuning involved):", ""]
    for method, c in cal.items():
        lines.append(f"- {method}: σ = {c['sigma']:.4g}, its {c['matched']} ({c['measure']}) {c['achieved']:.3f} "
                     f"against {c['on']}'s {c['target']:.3f} (tolerance {100 * c['tolerance']:.0f} %, "
                     f"{c['evaluations']} noise draws)")
    return lines + [""]


def _fmt(mean: float, std: float, digits: int = 1) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ({std:.{digits}f})"


def markdown(results: dict, tabs: dict | None = None) -> str:
    tabs = tabs or tables(results)
    budgets = results["budgets"]
    lines = [f"# Sampled populations: {results.get('zoo_name', results.get('zoo', ''))}", ""]
    lines += [f"Architecture `{results['arch']}`, source dataset `{results['dataset']}`, "
              f"{results['num_models']} models per population. Test accuracy in %, mean (std) over models; "
              f"novelty against the zoo's training-split models (epochs {results['reference_epochs']}).", ""]
    for setting, t in tabs.items():
        lines += [f"## {SETTING_TITLES.get(setting, setting)}: fine-tuned on `{t['dataset']}`", ""]
        # novelty and diversity as generated beside the accuracies (Zeng et al. 2025: never one without the other)
        lines += ["| Method | " + " | ".join(f"Ep. {b}" for b in budgets) + " | novelty | diversity |",
                  "|---|" + "---:|" * (len(budgets) + 2)]
        methods = list(dict.fromkeys(r["method"] for r in t["accuracy"]))
        pops = {p["name"]: p for p in results["populations"] if p["setting"] == setting}
        for method in methods:
            cells = {r["epoch"]: _fmt(r["mean"], r["std"]) for r in t["accuracy"] if r["method"] == method}
            lines.append(f"| {method} | " + " | ".join(cells[b] for b in budgets) + " | "
                         + " | ".join(f"{_measure(pops[method], k):.2f}" for k in ("novelty", "diversity")) + " |")
        lines += ["", "novelty: mean L2 distance to the nearest training model; diversity: mean pairwise L2 "
                  "within the population; both as generated (epoch 0), aligned where measured.", ""]
        if setting == "in_dataset":
            lines += calibration_lines(results)
        for when in dict.fromkeys(r["when"] for r in t["novelty"]):
            label = "as generated (epoch 0)" if when == "epoch_0" else f"after {when.split('_')[-1]} epochs"
            lines += [f"Novelty, {label}:", "",
                      "| Method | " + " | ".join(c for _, c in NOVELTY_COLUMNS) + " |",
                      "|---|" + "---:|" * len(NOVELTY_COLUMNS)]
            for r in t["novelty"]:
                if r["when"] == when:
                    digits = {"agreement": 1}
                    lines.append(f"| {r['method']} | " + " | ".join(
                        _fmt(r[k]["mean"], r[k]["std"], digits.get(k, 2)) for k, _ in NOVELTY_COLUMNS) + " |")
            lines.append("")
    lines += yardstick_lines(results)
    comparison = noise_comparison(results)
    if comparison:
        lines += ["## Against the noise baseline (Zeng et al. 2025)", "",
                  "The B_noise population closest in novelty, and the one closest in diversity where that is another; "
                  "accuracy difference in points (positive: the generated population is better). A generated "
                  "population that is as far from the training models, as diverse, and at least as accurate is "
                  "evidence of more than memorization.", "",
                  "| Setting | Method | novelty | diversity | vs | matched on | its novelty | its diversity | "
                  + " | ".join(f"Δ Ep. {b}" for b in budgets) + " |",
                  "|---|---|---:|---:|---|---|---:|---:|" + "---:|" * len(budgets)]
        for r in comparison:
            lines.append(f"| {r['setting']} | {r['method']} | {r['novelty']:.2f} | {r['diversity']:.2f} | {r['noise']} | "
                         f"{', '.join(r['matched_on'])} | {r['noise_novelty']:.2f} | {r['noise_diversity']:.2f} | "
                         + " | ".join(f"{r['acc_diff'][str(b)]:+.1f}" for b in budgets) + " |")
        lines.append("")
    for skipped in results.get("skipped", []):
        lines.append(f"- skipped {skipped['setting']}/{skipped['name']}: {skipped['reason']}")
    return "\n".join(lines).rstrip() + "\n"


def _colors(results: dict) -> dict[str, str]:
    """One colour per method across every panel, so S_KDE30 looks the same in-dataset and in transfer."""
    names = list(dict.fromkeys(p["name"] for p in results["populations"]))
    return {n: f"C{i % 10}" for i, n in enumerate(names)}


def _save_png(fig, path: Path) -> None:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    color = _colors(results)
    settings = list(dict.fromkeys(p["setting"] for p in results["populations"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for pop in results["populations"]:
            if pop["setting"] != setting:
                continue
            curve = np.asarray(pop["test_acc_curve"], dtype=np.float64) * 100  # [epochs+1, N]
            epochs = np.arange(len(curve))
            mean, std = np.nanmean(curve, axis=1), np.nanstd(curve, axis=1)
            ax.plot(epochs, mean, marker=".", label=pop["name"], color=color[pop["name"]])
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.15, color=color[pop["name"]])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title=f"{SETTING_TITLES.get(setting, setting)}", xlabel="fine-tuning epoch", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save_png(fig, path)
    plt.close(fig)


def plot_novelty(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    color = _colors(results)
    whens = ["epoch_0", f"epoch_{max(results['budgets'])}"]
    settings = list(dict.fromkeys(p["setting"] for p in results["populations"]))
    fig, axes = plt.subplots(len(settings), 2, figsize=(12, 4 * len(settings)), squeeze=False)
    for row, setting in zip(axes, settings):
        for ax, when in zip(row, whens):
            for pop in results["populations"]:
                if pop["setting"] != setting or when not in pop.get("novelty_per_model", {}):
                    continue
                nov = pop["novelty_per_model"][when]
                x = np.asarray(nov["nearest_aligned"], dtype=np.float64)
                if not np.isfinite(x).any():
                    x = np.asarray(nov["nearest_raw"], dtype=np.float64)
                y = 100 * np.asarray(pop["test_acc"][when.split("_")[-1]], dtype=np.float64)
                ax.scatter(x, y, s=10, alpha=0.7, label=pop["name"], color=color[pop["name"]])
            ax.set(title=f"{setting}, {when.replace('_', ' ')}", xlabel="L2 to nearest training model (aligned)",
                   ylabel="test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    _save_png(fig, path)
    plt.close(fig)


def write_report(results: dict, out_dir: str | Path) -> dict[str, str]:
    """Write report.json, report.md and the two plots into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tabs = tables(results)
    paths = {"json": out / "report.json", "markdown": out / "report.md",
             "curves": out / "accuracy_curves.png", "novelty": out / "accuracy_vs_novelty.png"}
    atomic_write_bytes(paths["json"], json.dumps({"budgets": results["budgets"], "tables": tabs,
                                                  "noise_comparison": noise_comparison(results),
                                                  "yardsticks": results.get("yardsticks"),
                                                  "calibration": results.get("calibration", {}),
                                                  "skipped": results.get("skipped", [])}, indent=2).encode())
    atomic_write_bytes(paths["markdown"], markdown(results, tabs).encode())
    plot_curves(results, paths["curves"])
    plot_novelty(results, paths["novelty"])
    return {k: str(v) for k, v in paths.items()}
