"""Plots and reports from a run folder (metrics.jsonl, summary.json, config.toml).

Why it reads files rather than live objects: the same code serves a run in progress (called
after every round), a finished run, and `fedtune report` on folders from earlier runs.
Nothing here may raise on partial data: a missing key is a gap in a plot, not an error.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import sys
from pathlib import Path

from fedtune.results import best_round, read_metrics

MIB = 2**20
_CORE_EVAL = {"eval_loss", "eval_ppl", "eval_seconds"}


# ---------------------------------------------------------------------------- reading
def _num(v) -> float | None:
    """A finite number or None: JSON null, NaN, strings and bools become gaps."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def load_rows(run_dir: str | Path) -> list[dict]:
    """Completed rounds of metrics.jsonl (`results.read_metrics`)."""
    return read_metrics(run_dir)


def _load_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def task_metrics(rows: list[dict]) -> list[str]:
    """Numeric eval_* keys other than loss/ppl/seconds (accuracy, mcc, rouge1, ...)."""
    keys = {k for r in rows for k, v in r.items()
            if k.startswith("eval_") and k not in _CORE_EVAL and _num(v) is not None}
    return sorted(keys)


def best_row(rows: list[dict], metric: str = "eval_loss") -> dict | None:
    """The best round by `metric` (`results.best_round`; round 0 included)."""
    return best_round(rows, metric)


def _series(rows, key, scale=1.0, first=0):
    pts = [(r["round"], _num(r.get(key))) for r in rows if r["round"] >= first]
    pts = [(x, y / scale) for x, y in pts if y is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _mean(rows, key) -> float | None:
    vals = [v for r in rows if r["round"] > 0 and (v := _num(r.get(key))) is not None]
    return sum(vals) / len(vals) if vals else None


def _total(rows, key) -> float:
    return sum(_num(r.get(key)) or 0.0 for r in rows if r["round"] > 0)


# ---------------------------------------------------------------------------- plots
def _figure(nrows: int, height: float = 3.0):
    """A pyplot-free Agg figure: no global backend switch, safe inside any host process."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h = 0.6 + height * nrows
    fig = Figure(figsize=(8, h), dpi=110)
    FigureCanvasAgg(fig)
    # Fixed margins in inches (title, tick labels, axis labels): as tidy as tight_layout on
    # these plots at a third less time per refresh.
    axes_h = (h - 0.4 - 0.55 - 0.85 * (nrows - 1)) / nrows
    fig.subplots_adjust(left=0.9 / 8, right=1 - 0.25 / 8, top=1 - 0.4 / h,
                        bottom=0.55 / h, hspace=0.85 / axes_h)
    return fig, list(fig.subplots(nrows, 1, squeeze=False)[:, 0])


def _line(ax, xs, ys, label, **kw):
    if len(xs):
        kw = {"marker": "o", "markersize": 4, "label": label, **kw}
        ax.plot(xs, ys, **(kw | {"marker": ""} if len(xs) > 30 else kw))  # long runs: lines


def _save(fig, axes, path: Path, xlabel: str = "round", legend: bool = True) -> Path:
    """Label and tidy every panel, then write atomically (a reader never sees half a PNG)."""
    from matplotlib.ticker import MaxNLocator

    used = [ax for ax in axes if ax.has_data()]
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax not in used:
            ax.set(xticks=[], yticks=[])
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
            continue
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi + 0.22 * (hi - lo))  # headroom: the legend sits above the data
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right" if xlabel == "client" else "best")
    if used:  # panels of one figure share the round axis, at least one round wide
        left = min(ax.get_xlim()[0] for ax in used)
        right = max(ax.get_xlim()[1] for ax in used)
        mid, half = (left + right) / 2, max((right - left) / 2, 0.6)
        for ax in used:
            ax.set_xlim(mid - half, mid + half)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _plot_loss(rows, path):
    fig, (ax, ax2) = _figure(2)
    _line(ax, *_series(rows, "eval_loss"), "eval loss (centralized, after aggregation)")
    _line(ax, *_series(rows, "train_loss", first=1), "train loss (mean over clients)")
    _line(ax2, *_series(rows, "eval_ppl"), "eval perplexity", color="tab:purple")
    if best := best_row(rows):
        x, y = best["round"], best["eval_loss"]
        ax.plot([x], [y], marker="*", markersize=16, color="tab:red", linestyle="none",
                label=f"best eval loss: round {x}")
        last = x == rows[-1]["round"] and x > rows[0]["round"]  # keep the label inside
        ax.annotate(f"best: round {x}\n{y:.4f}", (x, y), textcoords="offset points",
                    xytext=(-8 if last else 0, 12), ha="right" if last else "center",
                    va="bottom", fontsize=8, color="tab:red",
                    bbox={"boxstyle": "round", "fc": "white", "ec": "none", "alpha": 0.8})
        for a in (ax, ax2):
            a.axvline(x, color="tab:red", alpha=0.3, linestyle="--")
    ax.set(title="Loss per round (round 0 = before training)", ylabel="loss (nats/token)")
    ax2.set(title="Eval perplexity per round", ylabel="perplexity (exp of eval loss)")
    return _save(fig, [ax, ax2], path)


def _plot_task(rows, keys, path):
    fig, (ax,) = _figure(1, height=3.6)
    for k in keys:
        _line(ax, *_series(rows, k), k.removeprefix("eval_"))
    ax.set(title="Task metrics per round (centralized eval)", ylabel="metric value")
    return _save(fig, [ax], path)


def _plot_time(rows, path):
    fig, (ax, ax2) = _figure(2)
    for key, label in (("round_seconds", "whole round"),
                       ("train_phase_seconds", "training phase (server wall clock)"),
                       ("client_train_seconds_max", "slowest client's training"),
                       ("eval_seconds", "centralized eval")):
        _line(ax, *_series(rows, key), label)
    _line(ax2, *_series(rows, "tokens_per_s"), "tokens/s (all clients)", color="tab:green")
    ax.set(title="Time per round", ylabel="seconds", ylim=(0, None))
    ax2.set(title="Training throughput per round", ylabel="tokens / s")
    return _save(fig, [ax, ax2], path)


def _plot_comm(rows, path):
    import numpy as np

    fig, (ax, ax2) = _figure(2)
    for i, (key, label, style) in enumerate([("bytes_down", "down (server → clients)", "-"),
                                             ("bytes_up", "up (clients → server)", "--")]):
        xs, ys = _series(rows, key, MIB, first=1)
        if xs:
            ax.bar(np.array(xs) + (i - 0.5) * 0.38, ys, width=0.38, label=label)
            _line(ax2, xs, np.cumsum(ys), label, linestyle=style, marker="os"[i])
    xs = [r["round"] for r in rows if r["round"] > 0]
    both = [(_num(r.get("bytes_down")) or 0) + (_num(r.get("bytes_up")) or 0)
            for r in rows if r["round"] > 0]
    if any(both):
        _line(ax2, xs, np.cumsum(both) / MIB, "total", color="black", linestyle=":")
    ax.set(title="Communication per round", ylabel="MiB")
    ax2.set(title="Cumulative communication", ylabel="MiB")
    return _save(fig, [ax, ax2], path)


def _plot_memory(rows, path):
    fig, (ax,) = _figure(1, height=3.6)
    _line(ax, *_series(rows, "server_peak_rss_mb"), "server process")
    _line(ax, *_series(rows, "client_peak_rss_mb"), "client (max over clients)")
    ax.set(title="Peak resident memory (RSS) so far", ylabel="MiB", ylim=(0, None))
    return _save(fig, [ax], path)


def _plot_partitions(parts, path):
    """Examples per client stacked by label/group, and each client's label mix: the skew of
    a non-IID split (and the size imbalance Dirichlet adds) shows at a glance."""
    clients = [c for c in parts.get("clients", []) if isinstance(c, dict)]
    xs = [int(_num(c.get("client")) if _num(c.get("client")) is not None else i)
          for i, c in enumerate(clients)]
    hists = [{str(k): _num(v) or 0.0 for k, v in (c.get("histogram") or {}).items()}
             if isinstance(c.get("histogram"), dict) else {} for c in clients]
    listed = parts.get("groups") if isinstance(parts.get("groups"), list) else []
    groups = list(dict.fromkeys([*map(str, listed), *(k for h in hists for k in h)]))
    if len(groups) > 10:  # keep the legend readable: the 9 largest groups, then "other"
        total = {g: sum(h.get(g, 0.0) for h in hists) for g in groups}
        top = set(sorted(groups, key=lambda g: -total[g])[:9])
        hists = [{**{g: v for g, v in h.items() if g in top},
                  "other": sum(v for g, v in h.items() if g not in top)} for h in hists]
        groups = [g for g in groups if g in top] + ["other"]
    what = ", ".join(str(v) for v in (parts.get("partitioner"), parts.get("column") and
                                      f"by {parts['column']!r}") if v)
    title = "Training examples per client" + (f" ({what})" if what else "")
    if not groups:
        fig, (ax,) = _figure(1, height=3.6)
        sizes = [_num(c.get("num_examples")) or 0.0 for c in clients]
        if clients:
            ax.bar(xs, sizes, color="tab:blue", label="examples")
            ax.axhline(sum(sizes) / len(sizes), color="black", linestyle=":",
                       label=f"mean ({sum(sizes) / len(sizes):.0f})")
        ax.set(title=title, ylabel="examples")
        return _save(fig, [ax], path, xlabel="client")
    fig, (ax, ax2) = _figure(2)
    fig.subplots_adjust(right=1 - 1.7 / 8)  # room for the legend right of the panels
    ax2.sharex(ax)
    bottom, share_bottom = [0.0] * len(clients), [0.0] * len(clients)
    sums = [sum(h.values()) or 1.0 for h in hists]
    for g in groups:
        ys = [h.get(g, 0.0) for h in hists]
        shares = [y / s for y, s in zip(ys, sums)]
        color = "lightgray" if g == "other" else None
        bar = ax.bar(xs, ys, bottom=bottom, label=g[:18], color=color, width=0.8)
        ax2.bar(xs, shares, bottom=share_bottom, color=bar.patches[0].get_facecolor()
                if bar.patches else color, width=0.8)
        bottom = [b + y for b, y in zip(bottom, ys)]
        share_bottom = [b + y for b, y in zip(share_bottom, shares)]
    ax.set(title=title, ylabel="examples")
    ax2.set(title="Mix per client (share of its examples)", ylabel="share", ylim=(0, 1),
            xlabel="client")
    ax2.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="upper left", fontsize=8,  # top = top
               bbox_to_anchor=(1 - 1.6 / 8, 1 - 0.4 / fig.get_figheight()),
               title=str(parts.get("column") or "group")[:18], title_fontsize=8)
    return _save(fig, [ax], path, xlabel="client", legend=False)


def write_plots(run_dir: str | Path) -> list[Path]:
    """Refresh run_dir/plots/*.png; cheap enough to call after every round."""
    run_dir = Path(run_dir)
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(run_dir)
    paths = [_plot_loss(rows, out / "loss.png")]
    if keys := task_metrics(rows):
        paths.append(_plot_task(rows, keys, out / "task_metrics.png"))
    paths += [_plot_time(rows, out / "time.png"), _plot_comm(rows, out / "communication.png"),
              _plot_memory(rows, out / "memory.png")]
    parts = _load_json(run_dir / "partitions.json")
    if parts.get("clients"):
        paths.append(_plot_partitions(parts, out / "partitions.png"))
    for stale in {"task_metrics.png", "partitions.png"} - {p.name for p in paths}:
        (out / stale).unlink(missing_ok=True)  # left by an earlier run in this folder
    return paths


# ---------------------------------------------------------------------------- documents
# A document is a list of blocks, rendered twice: ("h", text), ("p", text), ("code", text),
# ("table", header, rows), ("img", path). Values are plain text; renderers escape them.
def _fmt(v, spec: str = ".4f") -> str:
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if spec == "mib":
        return f"{v / MIB:.2f}"
    return str(v) if isinstance(v, int) or not math.isfinite(v) else format(v, spec)


def _duration(s: float) -> str:
    m, sec = divmod(round(s), 60)
    return f"{s:.1f} s" + (f" ({m // 60} h {m % 60} min)" if m >= 60 else
                          f" ({m} min {sec} s)" if m else "")


def _md(blocks) -> str:
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    out = []
    for b in blocks:
        if b[0] == "h":
            out.append(f"{'#' * b[2] if len(b) > 2 else '##'} {b[1]}")
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "code":
            fence = "```"
            while fence in b[1]:
                fence += "`"
            out.append(f"{fence}{b[2] if len(b) > 2 else ''}\n{b[1].rstrip()}\n{fence}")
        elif b[0] == "table":
            lines = ["| " + " | ".join(map(cell, b[1])) + " |", "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(map(cell, r)) + " |" for r in b[2]]
            out.append("\n".join(lines))
        elif b[0] == "img":
            out.append(f"![{b[1].stem}](plots/{b[1].name})")
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}pre{background:#f6f8fa;padding:.8em;
overflow-x:auto;font-size:.85em}img{max-width:100%;display:block;margin:1em 0}
code{background:#f6f8fa}"""


def _html(blocks, title: str) -> str:
    e = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if b[0] == "h":
            n = b[2] if len(b) > 2 else 2
            out.append(f"<h{n}>{e(b[1])}</h{n}>")
        elif b[0] == "p":
            out.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "code":
            out.append(f"<pre><code>{e(b[1])}</code></pre>")
        elif b[0] == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>"
                           for r in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b[0] == "img":
            data = base64.b64encode(b[1].read_bytes()).decode("ascii")
            out.append(f'<img alt="{e(b[1].stem)}" src="data:image/png;base64,{data}">')
    return "\n".join(out) + "\n</body></html>\n"


def _write_docs(out_dir: Path, blocks, title: str) -> tuple[Path, Path]:
    md, page = out_dir / "report.md", out_dir / "report.html"
    for path, text in ((md, _md(blocks)), (page, _html(blocks, title))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return md, page


def _config(run_dir: Path) -> tuple[str, dict]:
    import tomllib

    try:
        text = (run_dir / "config.toml").read_text()
        return text, tomllib.loads(text)
    except (OSError, ValueError):
        return "", {}


def _identity(summary: dict, cfg: dict) -> tuple[str, str, str]:
    """(model, finetune, strategy): from summary.json, else from config.toml."""
    sec = lambda name: cfg.get(name) if isinstance(cfg.get(name), dict) else {}  # noqa: E731
    return (str(summary.get("model") or sec("model").get("name") or "unknown model"),
            str(summary.get("finetune") or sec("model").get("finetune") or "?"),
            str(summary.get("strategy") or sec("strategy").get("name") or "?"))


def _environment(manifest: dict) -> list[tuple[str, str]]:
    """The run's manifest when recorded, else this machine (marked as such)."""
    if manifest:
        flat = []
        for k, v in manifest.items():
            if isinstance(v, dict):
                flat += [(f"{k}.{k2}", _fmt(v2)) for k2, v2 in v.items()]
            elif k != "command":
                flat.append((k, _fmt(v)))
        return flat
    from importlib.metadata import PackageNotFoundError, version

    env = [("source", "this machine at report time (no manifest in summary.json)"),
           ("python", sys.version.split()[0]), ("platform", platform.platform()),
           ("cpu_count", str(os.cpu_count()))]
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
    rows, summary = load_rows(run_dir), _load_json(run_dir / "summary.json")
    cfg_text, cfg = _config(run_dir)
    model, finetune, strategy = _identity(summary, cfg)
    manifest = summary.get("manifest") if isinstance(summary.get("manifest"), dict) else {}
    title = f"fedtune run: {model} · {finetune} · {strategy}"
    trained = [r for r in rows if r["round"] > 0]
    down, up = _total(rows, "bytes_down"), _total(rows, "bytes_up")
    wall = _num(summary.get("total_wall_seconds"))
    metric = summary.get("best_metric") or (cfg.get("eval") or {}).get("metric") or "eval_loss"
    best = best_row(rows, metric)
    status = "finished" if summary else "in progress (no summary.json yet)"
    if summary.get("stopped_early"):
        status = f"stopped early: {summary.get('stop_reason') or 'no reason recorded'}"
    totals = [
        ("status", status), ("run folder", str(run_dir.resolve())),
        ("rounds completed", str(len(trained))),
        ("wall time", _duration(wall) if wall is not None else
         f"{_duration(_total(rows, 'round_seconds'))} so far (sum of round times)"),
        (f"best round (by {metric})", "none" if best is None else str(best["round"])),
        (f"best {metric}", _fmt(best and best[metric])),
        ("final eval loss", _fmt(rows[-1].get("eval_loss") if rows else None)),
        ("MiB down / up / total",
         f"{down / MIB:.2f} / {up / MIB:.2f} / {(down + up) / MIB:.2f}"),
        ("samples/s (mean over rounds)", _fmt(_mean(rows, "samples_per_s"), ".2f")),
        ("tokens/s (mean over rounds)", _fmt(_mean(rows, "tokens_per_s"), ".1f")),
        ("train samples / tokens", f"{_total(rows, 'train_samples'):.0f} / "
                                   f"{_total(rows, 'train_tokens'):.0f}"),
    ]
    totals += [(k.replace("_", " "), _fmt(summary[k])) for k in
               ("trainable_parameters", "client_failures", "final_model", "config_hash",
                "fedtune_version") if summary.get(k) is not None]
    tm = task_metrics(rows)
    head = ["round", "eval_loss", "eval_ppl", "train_loss", "lr", "round_s", "tokens/s",
            "MiB down", "MiB up", "clients ok/sampled", *tm]
    table = [[r["round"], _fmt(r.get("eval_loss")), _fmt(r.get("eval_ppl"), ".3f"),
              _fmt(r.get("train_loss")), _fmt(r.get("lr"), ".3g"),
              _fmt(r.get("round_seconds"), ".1f"), _fmt(r.get("tokens_per_s"), ".1f"),
              _fmt(r.get("bytes_down"), "mib"), _fmt(r.get("bytes_up"), "mib"),
              "" if r.get("clients_sampled") is None else
              f"{_fmt(r.get('clients_ok'))}/{_fmt(r.get('clients_sampled'))}",
              *[_fmt(r.get(k)) for k in tm]] for r in rows]
    blocks = [("h", title, 1)]
    command = summary.get("command") or manifest.get("command")
    if command:
        blocks += [("p", "Command:"), ("code", str(command), "bash")]
    blocks += [("h", "Summary"), ("table", ["", "value"], totals),
               ("h", "Per round"), ("table", head, table)]
    parts = _load_json(run_dir / "partitions.json").get("clients") or []
    if parts:
        blocks += [("h", "Partitions"), ("table", ["client", "examples", "histogram"], [
            [c.get("client", i), _fmt(c.get("num_examples")),
             ", ".join(f"{k}: {v}" for k, v in (c.get("histogram") or {}).items())]
            for i, c in enumerate(parts) if isinstance(c, dict)])]
    blocks += [("h", "Plots"), *[("img", p) for p in plots]]
    if cfg_text:
        blocks += [("h", "Resolved config"), ("code", cfg_text, "toml")]
    blocks += [("h", "Environment"), ("table", ["", "value"], _environment(manifest))]
    return _write_docs(run_dir, blocks, title)


# ---------------------------------------------------------------------------- comparison
def _names(run_dirs: list[Path]) -> list[str]:
    """Folder names, with the parent added where two runs share a name."""
    names = [d.resolve().name for d in run_dirs]
    return [f"{d.resolve().parent.name}/{n}" if names.count(n) > 1 else n
            for d, n in zip(run_dirs, names)]


def write_comparison(run_dirs: list, out_dir: str | Path) -> tuple[Path, Path]:
    """Overlay several runs (loss curves and a table) to compare recipes side by side."""
    run_dirs, out_dir = [Path(d) for d in run_dirs], Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    names, runs = _names(run_dirs), [load_rows(d) for d in run_dirs]
    plots = []
    for key, first, what in (("eval_loss", 0, "Centralized eval loss"),
                             ("train_loss", 1, "Train loss (mean over clients)")):
        fig, (ax,) = _figure(1, height=4.0)
        for name, rows in zip(names, runs):
            _line(ax, *_series(rows, key, first=first), name)
        ax.set(title=f"{what} per round", ylabel="loss (nats/token)")
        plots.append(_save(fig, [ax], out_dir / "plots" / f"compare_{key}.png"))
    table = []
    for d, name, rows in zip(run_dirs, names, runs):
        summary, (_, cfg) = _load_json(d / "summary.json"), _config(d)
        model, finetune, strategy = _identity(summary, cfg)
        best = best_row(rows)
        wall = _num(summary.get("total_wall_seconds"))
        mib = (_total(rows, "bytes_down") + _total(rows, "bytes_up")) / MIB
        table.append([name, f"{model} ({finetune})", strategy,
                      sum(r["round"] > 0 for r in rows), "" if best is None else best["round"],
                      _fmt(best and best["eval_loss"]),
                      _fmt(rows[-1].get("eval_loss") if rows else None),
                      "in progress" if wall is None else f"{wall:.1f}", f"{mib:.2f}"])
    head = ["run", "model", "strategy", "rounds", "best round", "best eval loss",
            "final eval loss", "wall s", "total MiB"]
    blocks = [("h", f"fedtune comparison: {len(run_dirs)} runs", 1),
              ("p", "Run folders: " + ", ".join(str(d.resolve()) for d in run_dirs)),
              ("h", "Runs"), ("table", head, table), ("h", "Plots"), *[("img", p) for p in plots]]
    return _write_docs(out_dir, blocks, "fedtune comparison")


def comparison_dir(run_dirs: list[Path]) -> Path:
    """Where `fedtune report RUN_A RUN_B ...` writes: next to the first run."""
    name = ("compare-" + "-vs-".join(n.replace("/", "_") for n in _names(run_dirs)))[:100]
    return run_dirs[0].resolve().parent / name
