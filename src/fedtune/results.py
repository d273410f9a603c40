"""The run folder: resolved config, one metrics line per round as it ends, summary, log.

Why line-per-round with fsync: a run killed in round 7 (an OOM kill, exit 137) must still
leave rounds 0..6 on disk. Why the overwrite rule: a rerun into an old folder must not mix
its checkpoints, plots or summary with the old run's, so every artefact of the old run goes
before the new one writes anything.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import traceback
from pathlib import Path

import tomli_w

from fedtune import __version__
from fedtune.config import Config, metric_mode
from fedtune.console import to_terminal
from fedtune.errors import ConfigError
from fedtune.files import atomic_write_json, atomic_write_text
from fedtune.partition import groups, histogram

# everything a run writes into its folder (a rerun with overwrite removes all of it)
ARTEFACTS = (
    "config.toml",
    "metrics.jsonl",
    "summary.json",
    "partitions.json",
    "run.log",
    "report.md",
    "report.html",
    "checkpoints",
    "final",
    "eval",
    "plots",
    "tensorboard",
)
FAILED = "failed"  # `status` of a metrics line that records a round attempt that failed


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_metrics(run_dir: str | Path, failed: bool = False) -> list[dict]:
    """The rows of metrics.jsonl, one per completed round in round order (a half-written
    last line of a run in progress is skipped; a round written twice keeps its last line).
    `failed=True` returns every line as written, failed round attempts included."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = []
    for text in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(text)
        except ValueError:
            continue
        rnd = row.get("round") if isinstance(row, dict) else None
        if isinstance(rnd, (int, float)) and not isinstance(rnd, bool) and float(rnd).is_integer():
            row["round"] = int(rnd)
            lines.append(row)
    if failed:
        return lines
    by_round = {r["round"]: r for r in lines if r.get("status") != FAILED}
    return [by_round[k] for k in sorted(by_round)]


def best_round(rows: list[dict], metric: str) -> dict | None:
    """The row with the best finite `metric` (lowest for losses, highest otherwise); the
    earliest round wins ties. The one rule summary.json, checkpoints/best, early stopping,
    reports and comparisons share."""
    sign = 1.0 if metric_mode(metric) == "min" else -1.0
    scored = [
        r
        for r in rows
        if isinstance(r.get(metric), (int, float))
        and not isinstance(r.get(metric), bool)
        and math.isfinite(r[metric])
    ]
    return min(scored, key=lambda r: (sign * r[metric], r["round"])) if scored else None


def is_run_folder(folder: Path) -> bool:
    return (Path(folder) / "config.toml").is_file() or (Path(folder) / "metrics.jsonl").is_file()


def list_runs(root: str | Path) -> list[dict]:
    """Every run folder at or below `root` (two levels), newest first, with its state from
    its own files: finished (summary.json) or not, rounds, best metric, wall seconds."""
    root = Path(root)
    found = [root] if is_run_folder(root) else []
    found += [p for p in sorted(root.glob("*")) + sorted(root.glob("*/*")) if is_run_folder(p)]
    out, seen = [], set()
    for folder in found:
        if folder.resolve() in seen:  # a symlink to a run listed already
            continue
        seen.add(folder.resolve())
        rows = [r for r in read_metrics(folder) if r.get("status") != FAILED]
        summary_path = folder / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        metrics = folder / "metrics.jsonl"
        out.append(
            {
                "run": str(folder),
                "status": "finished" if summary else "incomplete",
                "rounds": rows[-1]["round"] if rows else None,
                "best_metric": summary.get("best_metric"),
                "best_value": summary.get("best_value"),
                "best_round": summary.get("best_round"),
                "wall_seconds": summary.get("total_wall_seconds"),
                "modified": (metrics if metrics.exists() else folder).stat().st_mtime,
            }
        )
    return sorted(out, key=lambda r: -r["modified"])


def clear_old_run(folder: Path, overwrite: bool) -> None:
    """Before a fresh run: remove every artefact of an earlier run in `folder`, or refuse
    when `output.overwrite` is false. Files fedtune did not write are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    old = [folder / name for name in ARTEFACTS if (folder / name).exists()]
    if not old:
        return
    if not overwrite:
        raise ConfigError(
            [
                f"run folder {folder} holds an earlier run and `output.overwrite` "
                "is false; choose another `output.dir`, set output.overwrite=true, "
                f"or continue it with: fedtune run --resume {folder}"
            ]
        )
    for path in old:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


class RunFolder:
    """The folder a run writes to; `lines` are metrics.jsonl's lines, `rows` the completed
    rounds among them."""

    def __init__(self, cfg: Config):
        self.dir = Path(cfg.output.dir).expanduser().absolute()
        if not cfg.output.resume:
            clear_old_run(self.dir, cfg.output.overwrite)
        self.dir.mkdir(parents=True, exist_ok=True)
        resolved = cfg.to_dict()
        resolved["output"]["resume"] = False  # the file re-runs the experiment from scratch
        atomic_write_text(
            self.dir / "config.toml",
            f"# resolved config, hash {cfg.hash()}\n" + tomli_w.dumps(resolved),
        )
        self.metrics_path = self.dir / "metrics.jsonl"
        if not cfg.output.resume:
            self.metrics_path.write_text("")
        self.lines: list[dict] = []
        self.log = _file_logger(self.dir / "run.log")

    @property
    def rows(self) -> list[dict]:
        return [r for r in self.lines if r.get("status") != FAILED]

    def reset_lines(self, lines: list[dict]) -> None:
        """On resume: metrics.jsonl holds exactly the checkpoint's lines again."""
        self.lines = []
        self.metrics_path.write_text("")
        for line in lines:
            self.append(line)

    def write_json(self, name: str, obj) -> None:
        atomic_write_json(self.dir / name, obj)

    def append(self, row: dict) -> None:
        self.lines.append(row)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict) -> None:
        self.write_json("summary.json", summary)

    def record_failure(self, err: BaseException) -> None:
        """Why the run died, in run.log: in deployment the ServerApp's own output lives in
        a container or behind `flwr log`, and a run.log ending mid-setup says nothing."""
        self.log.error(f"the run failed: {type(err).__name__}: {err}")
        with (self.dir / "run.log").open("a") as f:
            f.write("".join(traceback.format_exception(err)))


def _file_logger(path: Path) -> logging.Logger:
    """The `fedtune` logger writes to the terminal and to run.log of the current run."""
    logger = to_terminal()
    for h in list(logger.handlers):
        if getattr(h, "_fedtune_run", False):
            logger.removeHandler(h)
            h.close()
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    fh._fedtune_run = True
    logger.addHandler(fh)
    return logger


def summarize(rows: list[dict], wall_seconds: float, metric: str, extra: dict) -> dict:
    """Best round by `metric` (see `best_round`), final metrics and totals over rounds."""
    best = best_round(rows, metric)
    trained = [r for r in rows if r["round"] > 0]
    return {
        "fedtune_version": __version__,
        "rounds_completed": len(trained),
        "best_metric": metric,
        "best_round": best["round"] if best else None,
        "best_value": best[metric] if best else None,
        "initial": rows[0] if rows else None,
        "final": rows[-1] if rows else None,
        "total_wall_seconds": wall_seconds,
        "total_bytes_down": sum(r.get("bytes_down", 0) for r in trained),
        "total_bytes_up": sum(r.get("bytes_up", 0) for r in trained),
        "total_train_samples": sum(r.get("train_samples", 0) for r in trained),
        "total_train_tokens": sum(r.get("train_tokens", 0) for r in trained),
        **extra,
    }


def summary_text(run_dir: str | Path, summary: dict, max_rows: int = 12) -> str:
    """What a person reads when a run ends: the per-round table (first and last rounds of a
    long run), the best round by the run's metric, totals and where the results are."""
    rows, metric = read_metrics(run_dir), summary["best_metric"]
    shown = rows if len(rows) <= max_rows else rows[:3] + [None] + rows[-(max_rows - 4) :]

    def num(row, key, fmt):
        value = row.get(key)
        return f"{'-':>{fmt.split('.')[0]}}" if value is None else format(value, fmt)

    lines = [f"{'round':>5}  {metric:>12}  {'train_loss':>10}  {'seconds':>8}  {'MB moved':>9}"]
    for r in shown:
        if r is None:
            lines.append(f"{'...':>5}")
            continue
        moved = (r.get("bytes_down", 0) + r.get("bytes_up", 0)) / 1e6
        lines.append(
            f"{r['round']:>5}  {num(r, metric, '12.4f')}  {num(r, 'train_loss', '10.4f')}  "
            f"{num(r, 'round_seconds', '8.1f')}  {moved if r['round'] else 0:>9.2f}"
        )
    if summary.get("best_round") is not None:
        first = (summary.get("initial") or {}).get(metric)
        lines.append(
            f"best round {summary['best_round']}: {metric} {summary['best_value']:.4f}"
            + (f" (round 0: {first:.4f})" if first is not None else "")
        )
    total = (summary.get("total_bytes_down", 0) + summary.get("total_bytes_up", 0)) / 1e6
    lines.append(
        f"{summary['rounds_completed']} rounds in {summary.get('total_wall_seconds', 0):,.0f} s; "
        f"{total:,.2f} MB communicated (all clients, both directions)"
    )
    run_dir = Path(run_dir)
    for label, path in (
        ("final model", summary.get("final_model")),
        ("report", run_dir / "report.html" if (run_dir / "report.html").exists() else None),
        ("metrics", run_dir / "metrics.jsonl"),
    ):
        if path:
            lines.append(f"{label + ':':<13}{path}")
    return "\n".join(lines)


def partition_report(
    parts, column: str | None = None, label_names=None, partitioner: str | None = None
) -> dict:
    """partitions.json: per client the number of samples and, when `column` is set, the
    examples per label/group (how non-IID the split is). `partitioner`: a title such as
    `partition.describe(cfg.data)`."""
    out = {
        "column": column,
        "groups": groups(parts, column, label_names),
        "clients": [
            {"client": i, "num_examples": len(p), "histogram": histogram(p, column, label_names)}
            for i, p in enumerate(parts)
        ],
    }
    return {"partitioner": partitioner, **out} if partitioner else out


def manifest(cfg: Config, parts) -> dict:
    """What reproduces this run: versions, git commit, config and partition hashes, seed."""
    import hashlib
    import platform
    import subprocess
    import sys
    from importlib import metadata

    versions = {}
    for pkg in ("torch", "transformers", "peft", "flwr", "flwr-datasets", "datasets"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    commit = None
    try:
        here = Path(__file__).resolve().parent
        commit = (
            subprocess.run(
                ["git", "-C", str(here), "rev-parse", "HEAD"],
                text=True,
                capture_output=True,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        pass
    fingerprints = [getattr(p, "_fingerprint", str(len(p))) for p in parts]
    import torch

    return {
        "fedtune_version": __version__,
        "git_commit": commit,
        "packages": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "config_hash": cfg.hash(),
        "partition_hash": hashlib.sha256(json.dumps(fingerprints).encode()).hexdigest()[:12],
        "seed": cfg.train.seed,
        "command": " ".join(sys.argv),
    }
