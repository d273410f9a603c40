"""Comparisons: several run folders overlaid, and the table and plots of a `fedtune compare`
study (comparison.json -> comparison.md, plots/comparison_*.png).

Why here and not in compare.py: `fedtune report` rewrites a study's table and plots from
comparison.json without running anything (and without importing torch), and both kinds of
comparison draw with the same helpers and format numbers the same way as a run's report.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from fedtune.files import atomic_write_text
from fedtune.report.document import fmt, write_docs
from fedtune.report.folder import (
    MIB,
    best_row,
    identity,
    load_json,
    load_rows,
    num,
    read_config,
    series,
    total,
)
from fedtune.report.plots import figure, line, save

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- run folders
def _names(run_dirs: list[Path]) -> list[str]:
    """Folder names, with the parent added where two runs share a name."""
    names = [d.resolve().name for d in run_dirs]
    return [
        f"{d.resolve().parent.name}/{n}" if names.count(n) > 1 else n
        for d, n in zip(run_dirs, names)
    ]


def write_comparison(run_dirs: list, out_dir: str | Path) -> tuple[Path, Path]:
    """Overlay several runs (loss curves and a table) to compare recipes side by side."""
    run_dirs, out_dir = [Path(d) for d in run_dirs], Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    names, runs = _names(run_dirs), [load_rows(d) for d in run_dirs]
    plots = []
    for key, first, what in (
        ("eval_loss", 0, "Centralized eval loss"),
        ("train_loss", 1, "Train loss (mean over clients)"),
    ):
        fig, (ax,) = figure(1, height=4.0)
        for name, rows in zip(names, runs):
            line(ax, *series(rows, key, first=first), name)
        ax.set(title=f"{what} per round", ylabel="loss (nats/token)")
        plots.append(save(fig, [ax], out_dir / "plots" / f"compare_{key}.png"))
    table = []
    for d, name, rows in zip(run_dirs, names, runs):
        summary, (_, cfg) = load_json(d / "summary.json"), read_config(d)
        model, finetune, strategy = identity(summary, cfg)
        best = best_row(rows)
        wall = num(summary.get("total_wall_seconds"))
        mib = (total(rows, "bytes_down") + total(rows, "bytes_up")) / MIB
        table.append(
            [
                name,
                f"{model} ({finetune})",
                strategy,
                sum(r["round"] > 0 for r in rows),
                "" if best is None else best["round"],
                fmt(best and best["eval_loss"]),
                fmt(rows[-1].get("eval_loss") if rows else None),
                "in progress" if wall is None else f"{wall:.1f}",
                f"{mib:.2f}",
            ]
        )
    head = [
        "run",
        "model",
        "strategy",
        "rounds",
        "best round",
        "best eval loss",
        "final eval loss",
        "wall s",
        "total MiB",
    ]
    blocks = [
        ("h", f"fedtune comparison: {len(run_dirs)} runs", 1),
        ("p", "Run folders: " + ", ".join(str(d.resolve()) for d in run_dirs)),
        ("h", "Runs"),
        ("table", head, table),
        ("h", "Plots"),
        *[("img", p) for p in plots],
    ]
    return write_docs(out_dir, blocks, "fedtune comparison")


def comparison_dir(run_dirs: list[Path]) -> Path:
    """Where `fedtune report RUN_A RUN_B ...` writes: next to the first run."""
    name = ("compare-" + "-vs-".join(n.replace("/", "_") for n in _names(run_dirs)))[:100]
    return run_dirs[0].resolve().parent / name


# ---------------------------------------------------------------------------- studies
def study_markdown(c: dict) -> str:
    """The comparison table(s) of a `fedtune compare` study as Markdown."""
    m, arms = c["metric"], c["arms"]

    def f(v, spec=".4f"):  # a mean that is missing or NaN reads n/a
        return fmt(v, spec, missing="n/a")

    arrow = "lower is better" if c["mode"] == "min" else "higher is better"
    lines = [
        f"# Comparison: {c['task']} on {c['model']}",
        "",
        f"{c['num_clients']} clients, {c['rounds']} rounds, {c['seeds']} seed(s); "
        f"headline metric `{m}` ({arrow}), on the server's test split after the last "
        "round; mean ± std over seeds.",
        "",
        f"| arm | {m} (final) | best | round of best | runtime (s) | MB communicated | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, r in arms.items():
        if r["status"] != "ok":
            lines.append(f"| {arm} | — | — | — | — | — | **failed**: {r['error']} |")
            continue
        final = f"{f(r['final_mean'])} ± {f(r['final_std'])}"
        if r["worst_client_mean"] is not None:
            final += f" (worst client {f(r['worst_client_mean'])})"
        lines.append(
            f"| {arm} | {final} | {f(r['best_mean'])} | {f(r['best_round_mean'], '.1f')}"
            f" | {f(r['seconds_mean'], '.0f')} | {f(r['megabytes_mean'], '.1f')} | ok |"
        )
    for seed, t in c.get("teacher", {}).items():
        score = t.get("test_metrics", {}).get(m)
        lines += [
            "",
            f"KD teacher (seed {seed}): {t['teacher']} fully fine-tuned on the public "
            f"slice ({t['public_samples']} samples, {t['steps']} steps, "
            f"{t['seconds']:.0f} s): {m} {f(score)} on the same test split.",
        ]
    keys = sorted(
        {k for r in arms.values() if r["status"] == "ok" for k in r["final_metrics_mean"]}
    )
    if keys:
        lines += [
            "",
            "All final metrics (mean over seeds):",
            "",
            "| arm | " + " | ".join(k[5:] for k in keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for arm, r in arms.items():
            if r["status"] == "ok":
                lines.append(
                    f"| {arm} | "
                    + " | ".join(f(r["final_metrics_mean"].get(k)) for k in keys)
                    + " |"
                )
    lines += [
        "",
        "Plots: `plots/comparison_metric.png` (metric per round, all arms), "
        "`plots/comparison_cost.png` (runtime and communication). Sub-runs: one run "
        "folder per arm and seed next to this file; their configs and logs in `arms/`.",
        "",
    ]
    return "\n".join(lines)


def study_plots(c: dict, out: Path) -> list[Path]:
    """comparison_metric.png (the headline metric per round, every arm, band = min-max over
    seeds) and comparison_cost.png (runtime and communication per arm)."""
    out.mkdir(parents=True, exist_ok=True)
    ok = {a: r for a, r in c["arms"].items() if r["status"] == "ok"}
    fig, (ax,) = figure(1, height=4.0)
    for arm, r in ok.items():
        curves = [s["curve"] for s in r["seeds"]]
        rounds = [rnd for rnd, _ in curves[0]]
        means = [statistics.fmean(cv[i][1] for cv in curves) for i in range(len(rounds))]
        if len(rounds) == 1:  # pretrained: a reference line across the rounds
            ax.axhline(means[0], ls="--", lw=1.5, label=f"{arm}", color="grey")
            continue
        drawn = line(ax, rounds, means, arm)
        if len(curves) > 1:
            lo = [min(cv[i][1] for cv in curves) for i in range(len(rounds))]
            hi = [max(cv[i][1] for cv in curves) for i in range(len(rounds))]
            ax.fill_between(rounds, lo, hi, alpha=0.15, color=drawn[0].get_color())
    teacher = [t.get("test_metrics", {}).get(c["metric"]) for t in c.get("teacher", {}).values()]
    teacher = [v for v in teacher if v is not None]
    if teacher:
        ax.axhline(
            statistics.fmean(teacher),
            ls=":",
            lw=1.5,
            color="black",
            label="KD teacher (public slice)",
        )
    ax.set(
        title=f"{c['metric']} per round (server test split; band = min-max over seeds)",
        ylabel=c["metric"],
    )
    paths = [save(fig, [ax], out / "comparison_metric.png")]

    fig, (a1, a2) = figure(2, height=3.2)
    names = list(ok)
    seconds = [ok[a]["seconds_mean"] for a in names]
    mb = [ok[a]["megabytes_mean"] for a in names]
    bars1 = a1.bar(names, seconds, color="tab:blue")
    bars2 = a2.bar(names, mb, color="tab:orange")
    positive = [v for v in mb if v > 0]
    if positive and max(positive) > 100 * min(positive):  # LoRA vs full: 100-1000x apart
        a2.set_yscale("log")
    a1.set(title="Runtime per arm (mean over seeds)", ylabel="seconds")
    a2.set(
        title="Communication per arm (down + up, mean over seeds"
        + (", log scale)" if a2.get_yscale() == "log" else ")"),
        ylabel="MB",
    )
    a1.bar_label(bars1, labels=[f"{v:.0f}" for v in seconds])
    a2.bar_label(bars2, labels=[f"{v:.1f}" for v in mb])
    for a in (a1, a2):
        a.tick_params(axis="x", labelsize=8)
    paths.append(save(fig, [a1, a2], out / "comparison_cost.png", xlabel="arm", categories=True))
    return paths


def write_study(c: dict, root: Path) -> None:
    """comparison.json, comparison.md and plots/ of a study; the table matters more than
    the pictures, so a plot that cannot be drawn is a warning."""
    atomic_write_text(root / "comparison.json", json.dumps(c, indent=2) + "\n")
    atomic_write_text(root / "comparison.md", study_markdown(c))
    try:
        study_plots(c, root / "plots")
    except Exception as err:  # noqa: BLE001 - the table matters more than the pictures
        log.warning(f"could not write comparison plots: {err!r}")


def rewrite_study(root: Path) -> list[Path]:
    """`fedtune report COMPARE_DIR`: comparison.md and plots again from comparison.json."""
    c = json.loads((root / "comparison.json").read_text())
    atomic_write_text(root / "comparison.md", study_markdown(c))
    return [root / "comparison.md", *study_plots(c, root / "plots")]
