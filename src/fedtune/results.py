"""The run folder: resolved config, one metrics line per round as it ends, summary, log.

Why line-per-round with fsync: a run killed in round 7 (an OOM kill, exit 137) must still
leave rounds 0..6 on disk.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
from pathlib import Path

import tomli_w

from fedtune.config import Config

LOGGER_NAME = "fedtune"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RunFolder:
    def __init__(self, cfg: Config):
        self.dir = Path(cfg.output.dir).expanduser().absolute()
        resume = cfg.output.resume
        if (self.dir.exists() and any(self.dir.iterdir()) and not cfg.output.overwrite
                and not resume):
            raise FileExistsError(f"run folder {self.dir} is not empty and "
                                  "`output.overwrite` is false")
        self.dir.mkdir(parents=True, exist_ok=True)
        resolved = cfg.to_dict()
        resolved["output"]["resume"] = False  # the file re-runs the experiment from scratch
        (self.dir / "config.toml").write_text(
            f"# resolved config, hash {cfg.hash()}\n" + tomli_w.dumps(resolved))
        self.metrics_path = self.dir / "metrics.jsonl"
        if not resume:
            self.metrics_path.write_text("")
            for stale in ("summary.json", "report.md", "report.html"):
                (self.dir / stale).unlink(missing_ok=True)
        self.rows: list[dict] = []
        self.log = _file_logger(self.dir / "run.log")

    def reset_rows(self, rows: list[dict]) -> None:
        """On resume: metrics.jsonl holds exactly the checkpoint's rounds again."""
        self.rows = []
        self.metrics_path.write_text("")
        for row in rows:
            self.append(row)

    def write_json(self, name: str, obj) -> None:
        tmp = self.dir / f"{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.dir / name)

    def plots(self) -> None:
        """Refresh plots/*.png; a plotting problem is logged, never fatal to the run."""
        try:
            from fedtune.report import write_plots

            write_plots(self.dir)
        except Exception as err:  # noqa: BLE001 - results matter more than pictures
            self.log.warning(f"could not write plots: {err!r}")

    def report(self) -> None:
        try:
            from fedtune.report import write_report

            md, html = write_report(self.dir)
            self.log.info(f"report: {html}")
        except Exception as err:  # noqa: BLE001
            self.log.warning(f"could not write the report: {err!r}")

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict) -> None:
        self.write_json("summary.json", summary)


def _file_logger(path: Path) -> logging.Logger:
    """The `fedtune` logger writes to the terminal and to run.log of the current run."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        if getattr(h, "_fedtune_run", False):
            logger.removeHandler(h)
            h.close()
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    fh._fedtune_run = True
    logger.addHandler(fh)
    if not any(getattr(h, "_fedtune_console", False) for h in logger.handlers):
        sh = logging.StreamHandler()
        sh.setFormatter(logging.Formatter("[fedtune] %(message)s"))
        sh._fedtune_console = True
        logger.addHandler(sh)
    return logger


def summarize(rows: list[dict], wall_seconds: float, extra: dict) -> dict:
    """Best round by eval loss, final metrics and totals over rounds."""
    evaluated = [r for r in rows if r.get("eval_loss") is not None
                 and math.isfinite(r["eval_loss"])]
    best = min(evaluated, key=lambda r: r["eval_loss"]) if evaluated else None
    trained = [r for r in rows if r["round"] > 0]
    from fedtune import __version__

    return {
        "fedtune_version": __version__,
        "rounds_completed": len(trained),
        "best_round": best["round"] if best else None,
        "best_eval_loss": best["eval_loss"] if best else None,
        "initial": rows[0] if rows else None,
        "final": rows[-1] if rows else None,
        "total_wall_seconds": wall_seconds,
        "total_bytes_down": sum(r.get("bytes_down", 0) for r in trained),
        "total_bytes_up": sum(r.get("bytes_up", 0) for r in trained),
        "total_train_samples": sum(r.get("train_samples", 0) for r in trained),
        "total_train_tokens": sum(r.get("train_tokens", 0) for r in trained),
        **extra,
    }


def partition_report(parts, column: str | None = None, label_names=None,
                     partitioner: str | None = None) -> dict:
    """partitions.json: per client the number of samples and, when `column` is set, the
    examples per label/group (how non-IID the split is). `partitioner`: a title such as
    `partition.describe(cfg.data)`."""
    from fedtune.partition import groups, histogram

    out = {"column": column, "groups": groups(parts, column, label_names), "clients": [
        {"client": i, "num_examples": len(p), "histogram": histogram(p, column, label_names)}
        for i, p in enumerate(parts)]}
    return {"partitioner": partitioner, **out} if partitioner else out


def manifest(cfg: Config, parts) -> dict:
    """What reproduces this run: versions, git commit, config and partition hashes, seed."""
    import hashlib
    import platform
    import subprocess
    import sys
    from importlib import metadata

    from fedtune import __version__

    versions = {}
    for pkg in ("torch", "transformers", "peft", "flwr", "flwr-datasets", "datasets"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    commit = None
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], text=True,
                                capture_output=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    fingerprints = [getattr(p, "_fingerprint", str(len(p))) for p in parts]
    import torch

    return {
        "fedtune_version": __version__, "git_commit": commit, "packages": versions,
        "python": sys.version.split()[0], "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available(),
        "config_hash": cfg.hash(),
        "partition_hash": hashlib.sha256(json.dumps(fingerprints).encode()).hexdigest()[:12],
        "seed": cfg.train.seed, "command": " ".join(sys.argv),
    }
