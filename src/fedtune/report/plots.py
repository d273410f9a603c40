"""The plotting helpers every fedtune figure uses, and the plots of one run.

Why one set of helpers: a run's plots, the overlay of several runs and a study's plots are
refreshed while runs go on, inside whatever process hosts them; they all draw on a pyplot-free
Agg figure (no global backend switch), label and tidy panels the same way, and write each PNG
atomically through `files.atomic_write_bytes` (a reader never sees half a PNG).
matplotlib is imported only when a figure is drawn, so importing fedtune.report stays cheap.
"""

from __future__ import annotations

import contextvars
import io
import tomllib
from pathlib import Path

from fedtune.files import atomic_write_bytes
from fedtune.report.folder import MIB, best_row, load_json, load_rows, num, series, task_metrics

# what a run's figures say under their top edge (model, data, task, strategy, clients, seed)
SUBTITLE: contextvars.ContextVar[str] = contextvars.ContextVar("subtitle", default="")


# ---------------------------------------------------------------------------- helpers
def figure(nrows: int, height: float = 3.0):
    """A pyplot-free Agg figure: no global backend switch, safe inside any host process."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h = 0.75 + height * nrows  # 0.55 in above the panels: room for the run's subtitle
    fig = Figure(figsize=(8, h), dpi=110)
    FigureCanvasAgg(fig)
    # Fixed margins in inches (title, tick labels, axis labels): as tidy as tight_layout on
    # these plots at a third less time per refresh.
    axes_h = (h - 0.55 - 0.55 - 0.85 * (nrows - 1)) / nrows
    fig.subplots_adjust(
        left=0.9 / 8, right=1 - 0.25 / 8, top=1 - 0.55 / h, bottom=0.55 / h, hspace=0.85 / axes_h
    )
    return fig, list(fig.subplots(nrows, 1, squeeze=False)[:, 0])


def line(ax, xs, ys, label, **kw) -> list:
    """One labelled curve with round markers (plain lines past 30 points); [] if no data."""
    if not len(xs):
        return []
    kw = {"marker": "o", "markersize": 4, "label": label, **kw}
    return ax.plot(xs, ys, **(kw | {"marker": ""} if len(xs) > 30 else kw))  # long runs: lines


def save(
    fig, axes, path: Path, xlabel: str = "round", legend: bool = True, categories: bool = False
) -> Path:
    """Label and tidy every panel, then write atomically (a reader never sees half a PNG).
    `categories`: the x axis holds names (bars per arm), not rounds or clients."""
    from matplotlib.ticker import MaxNLocator

    used = [ax for ax in axes if ax.has_data()]
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax not in used:
            ax.set(xticks=[], yticks=[])
            ax.text(
                0.5,
                0.5,
                "no data yet",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="gray",
            )
            continue
        if not categories:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi + 0.22 * (hi - lo))  # headroom: the legend sits above the data
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right" if xlabel == "client" else "best")
    if used and not categories:  # panels share the round axis, at least one round wide
        left = min(ax.get_xlim()[0] for ax in used)
        right = max(ax.get_xlim()[1] for ax in used)
        mid, half = (left + right) / 2, max((right - left) / 2, 0.6)
        for ax in used:
            ax.set_xlim(mid - half, mid + half)
    if subtitle := SUBTITLE.get():
        fig.text(0.5, 1 - 0.1 / fig.get_figheight(), subtitle, ha="center", va="top",
                 fontsize=7, color="dimgray")  # fmt: skip
    from matplotlib import rc_context

    for fmt_, kw in (("png", {"dpi": 200}), ("svg", {})):  # SVG: vector, for papers
        buf = io.BytesIO()
        with rc_context({"svg.fonttype": "none"}):  # text stays text (editable, searchable)
            fig.savefig(buf, format=fmt_, **kw)
        atomic_write_bytes(path.with_suffix(f".{fmt_}"), buf.getvalue())
    return path


# ---------------------------------------------------------------------------- one run
def _plot_loss(rows, path):
    fig, (ax, ax2) = figure(2)
    line(ax, *series(rows, "eval_loss"), "eval loss (centralized, after aggregation)")
    line(ax, *series(rows, "train_loss", first=1), "train loss (mean over clients)")
    line(ax2, *series(rows, "eval_ppl"), "eval perplexity", color="tab:purple")
    if best := best_row(rows):
        x, y = best["round"], best["eval_loss"]
        ax.plot(
            [x],
            [y],
            marker="*",
            markersize=16,
            color="tab:red",
            linestyle="none",
            label=f"best eval loss: round {x}",
        )
        last = x == rows[-1]["round"] and x > rows[0]["round"]  # keep the label inside
        ax.annotate(
            f"best: round {x}\n{y:.4f}",
            (x, y),
            textcoords="offset points",
            xytext=(-8 if last else 0, 12),
            ha="right" if last else "center",
            va="bottom",
            fontsize=8,
            color="tab:red",
            bbox={"boxstyle": "round", "fc": "white", "ec": "none", "alpha": 0.8},
        )
        for a in (ax, ax2):
            a.axvline(x, color="tab:red", alpha=0.3, linestyle="--")
    ax.set(title="Loss per round (round 0 = before training)", ylabel="loss (nats/token)")
    ax2.set(title="Eval perplexity per round", ylabel="perplexity (exp of eval loss)")
    return save(fig, [ax, ax2], path)


def _plot_task(rows, keys, path):
    fig, (ax,) = figure(1, height=3.6)
    for k in keys:
        line(ax, *series(rows, k), k.removeprefix("eval_"))
    ax.set(title="Task metrics per round (centralized eval)", ylabel="metric value")
    return save(fig, [ax], path)


def _plot_time(rows, path):
    fig, (ax, ax2) = figure(2)
    for key, label in (
        ("round_seconds", "whole round"),
        (
            "train_phase_seconds",
            "training phase (server clock; above the slowest client when clients share "
            "cores and train in turn)",
        ),
        ("client_train_seconds_max", "slowest client's own training"),
        ("eval_seconds", "centralized eval"),
    ):
        line(ax, *series(rows, key), label)
    line(ax2, *series(rows, "tokens_per_s"), "tokens/s (all clients)", color="tab:green")
    ax.set(title="Time per round", ylabel="seconds", ylim=(0, None))
    ax2.set(title="Training throughput per round", ylabel="tokens / s", ylim=(0, None))
    return save(fig, [ax, ax2], path)


def _plot_comm(rows, path):
    import numpy as np

    fig, (ax, ax2) = figure(2)
    for i, (key, label, style) in enumerate(
        [
            ("bytes_down", "down, all clients (server → clients)", "-"),
            ("bytes_up", "up, all clients (clients → server)", "--"),
        ]
    ):
        xs, ys = series(rows, key, MIB, first=1)
        if xs:
            ax.bar(np.array(xs) + (i - 0.5) * 0.38, ys, width=0.38, label=label)
            line(ax2, xs, np.cumsum(ys), label, linestyle=style, marker="os"[i])
    xs = [r["round"] for r in rows if r["round"] > 0]
    both = [
        (num(r.get("bytes_down")) or 0) + (num(r.get("bytes_up")) or 0)
        for r in rows
        if r["round"] > 0
    ]
    if any(both):
        line(ax2, xs, np.cumsum(both) / MIB, "total", color="black", linestyle=":")
    ax.set(title="Communication per round (sum over the round's clients)", ylabel="MiB")
    ax2.set(title="Cumulative communication", ylabel="MiB")
    return save(fig, [ax, ax2], path)


def _plot_memory(rows, path):
    fig, (ax,) = figure(1, height=3.6)
    line(ax, *series(rows, "server_peak_rss_mb"), "server process")
    line(ax, *series(rows, "client_peak_rss_mb"), "client (max over clients)")
    ax.set(title="Peak resident memory (RSS) so far", ylabel="MiB", ylim=(0, None))
    return save(fig, [ax], path)


def _plot_partitions(parts, path):
    """Examples per client stacked by label/group, and each client's label mix: the skew of
    a non-IID split (and the size imbalance Dirichlet adds) shows at a glance."""
    clients = [c for c in parts.get("clients", []) if isinstance(c, dict)]
    xs = [
        int(num(c.get("client")) if num(c.get("client")) is not None else i)
        for i, c in enumerate(clients)
    ]
    hists = [
        {str(k): num(v) or 0.0 for k, v in (c.get("histogram") or {}).items()}
        if isinstance(c.get("histogram"), dict)
        else {}
        for c in clients
    ]
    listed = parts.get("groups") if isinstance(parts.get("groups"), list) else []
    groups = list(dict.fromkeys([*map(str, listed), *(k for h in hists for k in h)]))
    if len(groups) > 10:  # keep the legend readable: the 9 largest groups, then "other"
        total = {g: sum(h.get(g, 0.0) for h in hists) for g in groups}
        top = set(sorted(groups, key=lambda g: -total[g])[:9])
        hists = [
            {
                **{g: v for g, v in h.items() if g in top},
                "other": sum(v for g, v in h.items() if g not in top),
            }
            for h in hists
        ]
        groups = [g for g in groups if g in top] + ["other"]
    what = ", ".join(
        str(v)
        for v in (parts.get("partitioner"), parts.get("column") and f"by {parts['column']!r}")
        if v
    )
    title = "Training examples per client" + (f" ({what})" if what else "")
    if not groups:
        fig, (ax,) = figure(1, height=3.6)
        sizes = [num(c.get("num_examples")) or 0.0 for c in clients]
        if clients:
            ax.bar(xs, sizes, color="tab:blue", label="examples")
            ax.axhline(
                sum(sizes) / len(sizes),
                color="black",
                linestyle=":",
                label=f"mean ({sum(sizes) / len(sizes):.0f})",
            )
        ax.set(title=title, ylabel="examples")
        return save(fig, [ax], path, xlabel="client")
    fig, (ax, ax2) = figure(2)
    fig.subplots_adjust(right=1 - 1.7 / 8)  # room for the legend right of the panels
    ax2.sharex(ax)
    bottom, share_bottom = [0.0] * len(clients), [0.0] * len(clients)
    sums = [sum(h.values()) or 1.0 for h in hists]
    for g in groups:
        ys = [h.get(g, 0.0) for h in hists]
        shares = [y / s for y, s in zip(ys, sums)]
        color = "lightgray" if g == "other" else None
        bar = ax.bar(xs, ys, bottom=bottom, label=g[:18], color=color, width=0.8)
        ax2.bar(
            xs,
            shares,
            bottom=share_bottom,
            color=bar.patches[0].get_facecolor() if bar.patches else color,
            width=0.8,
        )
        bottom = [b + y for b, y in zip(bottom, ys)]
        share_bottom = [b + y for b, y in zip(share_bottom, shares)]
    ax.set(title=title, ylabel="examples")
    ax2.set(
        title="Mix per client (share of its examples)", ylabel="share", ylim=(0, 1), xlabel="client"
    )
    ax2.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(
        handles[::-1],
        labels[::-1],
        loc="upper left",
        fontsize=8,  # top = top
        bbox_to_anchor=(1 - 1.6 / 8, 1 - 0.55 / fig.get_figheight()),
        title=str(parts.get("column") or "group")[:18],
        title_fontsize=8,
    )
    return save(fig, [ax], path, xlabel="client", legend=False)


def _plot_clients(rows, path):
    """Each client's own train loss and training seconds per round (non-IID studies)."""
    fig, (ax, ax2) = figure(2)
    by_client: dict[int, list[tuple]] = {}
    for r in rows:
        for c in r.get("clients") or []:
            by_client.setdefault(c["partition"], []).append(
                (r["round"], c["train_loss"], c["train_seconds"])
            )
    for pid, points in sorted(by_client.items()):
        xs, losses, secs = zip(*points)
        line(ax, xs, losses, f"client {pid}")
        line(ax2, xs, secs, f"client {pid}")
    ax.set(title="Train loss per client (its own data, this round)", ylabel="loss")
    ax2.set(title="Local training time per client", ylabel="seconds", ylim=(0, None))
    return save(fig, [ax, ax2], path, legend=len(by_client) <= 12)


def write_plots(run_dir: str | Path) -> list[Path]:
    """Refresh run_dir/plots/*.png; cheap enough to call after every round."""
    run_dir = Path(run_dir)
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(run_dir)
    token = SUBTITLE.set(subtitle(run_dir))
    try:
        paths = _run_plots(run_dir, rows, out)
    finally:
        SUBTITLE.reset(token)
    for stale in {"task_metrics", "partitions", "clients"} - {p.stem for p in paths}:
        for ext in (".png", ".svg"):  # left by an earlier run in this folder
            (out / stale).with_suffix(ext).unlink(missing_ok=True)
    return paths


def _run_plots(run_dir: Path, rows: list[dict], out: Path) -> list[Path]:
    paths = [_plot_loss(rows, out / "loss.png")]
    if keys := task_metrics(rows):
        paths.append(_plot_task(rows, keys, out / "task_metrics.png"))
    paths += [
        _plot_time(rows, out / "time.png"),
        _plot_comm(rows, out / "communication.png"),
        _plot_memory(rows, out / "memory.png"),
    ]
    if any(r.get("clients") for r in rows):
        paths.append(_plot_clients(rows, out / "clients.png"))
    parts = load_json(run_dir / "partitions.json")
    if parts.get("clients"):
        paths.append(_plot_partitions(parts, out / "partitions.png"))
    return paths


def subtitle(run_dir: Path) -> str:
    """'model · data · task · strategy · N clients · seed S' from the run's config.toml."""
    try:
        cfg = tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, ValueError):
        return ""
    get = lambda sec, key: (cfg.get(sec) or {}).get(key)  # noqa: E731
    parts = [
        ("{}", get("model", "name")),
        ("{}", get("data", "source")),
        ("{}", get("task", "type")),
        ("{}", get("strategy", "name")),
        ("{} clients", get("federation", "num_clients")),
        ("seed {}", get("train", "seed")),
    ]
    return " · ".join(f.format(v) for f, v in parts if v is not None)
