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
        if self.dir.exists() and any(self.dir.iterdir()) and not cfg.output.overwrite:
            raise FileExistsError(f"run folder {self.dir} is not empty and "
                                  "`output.overwrite` is false")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.toml").write_text(
            f"# resolved config, hash {cfg.hash()}\n" + tomli_w.dumps(cfg.to_dict()))
        self.metrics_path = self.dir / "metrics.jsonl"
        self.metrics_path.write_text("")
        self.rows: list[dict] = []
        self.log = _file_logger(self.dir / "run.log")

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict) -> None:
        tmp = self.dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.dir / "summary.json")


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
    return {
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
