"""What a report reads from a run folder: metrics rows, summary.json, config.toml.

Why a module of its own: the run report, its plots and the comparison of several runs all
read the same files, and none of them may raise on partial data (a run in progress, a
killed run, a folder from an older fedtune): a missing key is a gap, not an error. Rows come
only through `results.read_metrics`, the one metrics reader.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

from fedtune.results import best_round, read_metrics

MIB = 2**20
_CORE_EVAL = {"eval_loss", "eval_ppl", "eval_seconds"}


def num(v) -> float | None:
    """A finite number or None: JSON null, NaN, strings and bools become gaps."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def load_rows(run_dir: str | Path) -> list[dict]:
    """Completed rounds of metrics.jsonl (`results.read_metrics`)."""
    return read_metrics(run_dir)


def load_json(path: Path) -> dict:
    """A JSON object from `path`, or {} when it is missing, torn or not an object."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def read_config(run_dir: Path) -> tuple[str, dict]:
    """config.toml as text and as a dict ("", {} when missing or unreadable)."""
    try:
        text = (run_dir / "config.toml").read_text()
        return text, tomllib.loads(text)
    except (OSError, ValueError):
        return "", {}


def identity(summary: dict, cfg: dict) -> tuple[str, str, str]:
    """(model, finetune, strategy): from summary.json, else from config.toml."""
    sec = lambda name: cfg.get(name) if isinstance(cfg.get(name), dict) else {}  # noqa: E731
    return (
        str(summary.get("model") or sec("model").get("name") or "unknown model"),
        str(summary.get("finetune") or sec("model").get("finetune") or "?"),
        str(summary.get("strategy") or sec("strategy").get("name") or "?"),
    )


def task_metrics(rows: list[dict]) -> list[str]:
    """Numeric eval_* keys other than loss/ppl/seconds (accuracy, mcc, rouge1, ...)."""
    keys = {
        k
        for r in rows
        for k, v in r.items()
        if k.startswith("eval_") and k not in _CORE_EVAL and num(v) is not None
    }
    return sorted(keys)


def best_row(rows: list[dict], metric: str = "eval_loss") -> dict | None:
    """The best round by `metric` (`results.best_round`; round 0 included)."""
    return best_round(rows, metric)


def series(rows, key, scale=1.0, first=0):
    """(rounds, values / scale) of `key` from round `first` on, gaps left out."""
    pts = [(r["round"], num(r.get(key))) for r in rows if r["round"] >= first]
    pts = [(x, y / scale) for x, y in pts if y is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def mean(rows, key) -> float | None:
    """Mean of `key` over the trained rounds (round 0 left out), None without values."""
    vals = [v for r in rows if r["round"] > 0 and (v := num(r.get(key))) is not None]
    return sum(vals) / len(vals) if vals else None


def total(rows, key) -> float:
    """Sum of `key` over the trained rounds; gaps count as 0."""
    return sum(num(r.get(key)) or 0.0 for r in rows if r["round"] > 0)
