"""`report.md` and `report.html` of one run folder.

Why it reads files rather than live objects: the same code serves a run in progress (called
after every round), a finished run, and `fedtune report` on folders from earlier runs.
Nothing here may raise on partial data: a missing key is an empty cell, not an error.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from fedtune.report.document import duration, fmt, write_docs
from fedtune.report.folder import (
    MIB,
    best_row,
    identity,
    load_json,
    load_rows,
    mean,
    num,
    read_config,
    task_metrics,
    total,
)
from fedtune.report.plots import write_plots


def _environment(manifest: dict) -> list[tuple[str, str]]:
    """The run's manifest when recorded, else this machine (marked as such)."""
    if manifest:
        flat = []
        for k, v in manifest.items():
            if isinstance(v, dict):
                flat += [(f"{k}.{k2}", fmt(v2)) for k2, v2 in v.items()]
            elif k != "command":
                flat.append((k, fmt(v)))
        return flat
    from importlib.metadata import PackageNotFoundError, version

    env = [
        ("source", "this machine at report time (no manifest in summary.json)"),
        ("python", sys.version.split()[0]),
        ("platform", platform.platform()),
        ("cpu_count", str(os.cpu_count())),
    ]
    for pkg in ("torch", "transformers", "peft", "flwr"):
        try:
            env.append((pkg, version(pkg)))
        except PackageNotFoundError:
            env.append((pkg, "not installed"))
    try:
        import torch

        env.append(("cuda", str(torch.cuda.is_available())))
    except Exception:  # noqa: BLE001 - a broken torch must not cost the report
        env.append(("cuda", "unknown"))
    return env


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """report.md and a self-contained report.html: one file to share or archive a run."""
    run_dir = Path(run_dir)
    plots = write_plots(run_dir)
    rows, summary = load_rows(run_dir), load_json(run_dir / "summary.json")
    cfg_text, cfg = read_config(run_dir)
    model, finetune, strategy = identity(summary, cfg)
    manifest = summary.get("manifest") if isinstance(summary.get("manifest"), dict) else {}
    title = f"fedtune run: {model} · {finetune} · {strategy}"
    trained = [r for r in rows if r["round"] > 0]
    down, up = total(rows, "bytes_down"), total(rows, "bytes_up")
    wall = num(summary.get("total_wall_seconds"))
    metric = summary.get("best_metric") or (cfg.get("eval") or {}).get("metric") or "eval_loss"
    best = best_row(rows, metric)
    status = "finished" if summary else "in progress (no summary.json yet)"
    if summary.get("stopped_early"):
        status = f"stopped early: {summary.get('stop_reason') or 'no reason recorded'}"
    totals = [
        ("status", status),
        ("run folder", str(run_dir.resolve())),
        ("rounds completed", str(len(trained))),
        (
            "wall time",
            duration(wall)
            if wall is not None
            else f"{duration(total(rows, 'round_seconds'))} so far (sum of round times)",
        ),
        (f"best round (by {metric})", "none" if best is None else str(best["round"])),
        (f"best {metric}", fmt(best and best[metric])),
        ("final eval loss", fmt(rows[-1].get("eval_loss") if rows else None)),
        ("MiB down / up / total", f"{down / MIB:.2f} / {up / MIB:.2f} / {(down + up) / MIB:.2f}"),
        ("samples/s (mean over rounds)", fmt(mean(rows, "samples_per_s"), ".2f")),
        ("tokens/s (mean over rounds)", fmt(mean(rows, "tokens_per_s"), ".1f")),
        (
            "train samples / tokens",
            f"{total(rows, 'train_samples'):,.0f} / {total(rows, 'train_tokens'):,.0f}",
        ),
    ]
    totals += [
        (k.replace("_", " "), fmt(summary[k]))
        for k in (
            "trainable_parameters",
            "lora_aggregation",
            "compression",
            "client_failures",
            "final_model",
            "config_hash",
            "fedtune_version",
        )
        if summary.get(k) is not None
    ]
    privacy = summary.get("privacy") if isinstance(summary.get("privacy"), dict) else {}
    if privacy:
        totals.append(
            (
                "privacy spent",
                f"{privacy.get('mode')}: epsilon {fmt(privacy.get('epsilon'), '.3f')} at delta "
                f"{fmt(privacy.get('delta'), '.3g')} ({privacy.get('accounting')}, clipping "
                f"norm {fmt(privacy.get('clipping_norm'), '.3g')}, noise multiplier "
                f"{fmt(privacy.get('noise_multiplier'), '.3g')})",
            )
        )
    tm = task_metrics(rows) + (["dp_epsilon"] if any("dp_epsilon" in r for r in rows) else [])
    head = [
        "round",
        "eval_loss",
        "eval_ppl",
        "train_loss",
        "lr",
        "round_s",
        "tokens/s",
        "MiB down",
        "MiB up",
        "clients ok/sampled",
        *tm,
    ]
    table = [
        [
            r["round"],
            fmt(r.get("eval_loss")),
            fmt(r.get("eval_ppl"), ".3f"),
            fmt(r.get("train_loss")),
            fmt(r.get("lr"), ".3g"),
            fmt(r.get("round_seconds"), ".1f"),
            fmt(r.get("tokens_per_s"), ".1f"),
            fmt(r.get("bytes_down"), "mib"),
            fmt(r.get("bytes_up"), "mib"),
            ""
            if r.get("clients_sampled") is None
            else f"{fmt(r.get('clients_ok'))}/{fmt(r.get('clients_sampled'))}",
            *[fmt(r.get(k)) for k in tm],
        ]
        for r in rows
    ]
    blocks = [("h", title, 1)]
    command = summary.get("command") or manifest.get("command")
    if command:
        blocks += [("p", "Command:"), ("code", str(command), "bash")]
    blocks += [
        ("h", "Summary"),
        ("table", ["", "value"], totals),
        ("h", "Per round"),
        ("table", head, table, next((i for i, r in enumerate(rows) if r is best), None)),
    ]
    parts = load_json(run_dir / "partitions.json").get("clients") or []
    if parts:
        blocks += [
            ("h", "Partitions"),
            (
                "table",
                ["client", "examples", "histogram"],
                [
                    [
                        c.get("client", i),
                        fmt(c.get("num_examples")),
                        ", ".join(f"{k}: {v}" for k, v in (c.get("histogram") or {}).items()),
                    ]
                    for i, c in enumerate(parts)
                    if isinstance(c, dict)
                ],
            ),
        ]
    blocks += [("h", "Plots"), *[("img", p) for p in plots]]
    if cfg_text:
        blocks += [("h", "Resolved config"), ("code", cfg_text, "toml")]
    blocks += [("h", "Environment"), ("table", ["", "value"], _environment(manifest))]
    return write_docs(run_dir, blocks, title)
