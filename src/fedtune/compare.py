"""`fedtune compare`: every arm of a study on the same data, one table at the end.

Why sub-runs in their own processes: an arm that crashes (or is OOM-killed) must not take
the others down, and each arm is an ordinary run folder anyone can open, resume or report.
Arms are derived from ONE recipe, so they share the server test split, the partitions, the
public KD slice (removed from every arm's clients) and the seed; they differ only in what
the arm name says:

- `pretrained`   the base model evaluated, no training (federation.rounds = 0);
- `centralized`  one client holding the union of all client partitions, trained for the
                 same total optimizer steps (local_steps x clients per round, each round);
- `local-only`   each client alone on its own partition, same rounds and steps; reported
                 as the mean and the worst client;
- `fedavg-full`  FedAvg, full fine-tuning; `fedlora` FedAvg, LoRA; `fedkd-lora` FedAvg,
                 LoRA students distilling the teacher; any strategy name (fedprox, ...)
                 runs that strategy with the recipe's fine-tuning mode.
Non-federated arms run with in-process clients (no Ray); federated arms on the Simulation
Engine.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

from fedtune import config as C, kd
from fedtune.report.document import fmt
from fedtune.report.study import write_study
from fedtune.results import best_round, read_metrics

log = logging.getLogger(__name__)
LOCAL = ("pretrained", "centralized", "local-only")


def headline_metric(cfg: C.Config) -> str:
    """`compare.metric`, else the run's headline metric (`eval.metric` or the task's)."""
    return cfg.compare.metric or C.headline_metric(cfg)


# What each arm changes in the recipe, as `--set`-style overrides (TOML values) applied
# after the recipe's own `compare.overrides` for that arm; computed values (steps, partition
# ids) are added in `_arm_overrides`. Any other arm name is a strategy.
ARM_OVERRIDES = {
    "pretrained": [
        "federation.rounds=0",
        "output.save_final=false",
        "output.save_every=0",
        "train.early_stopping={}",
    ],
    "centralized": ["federation.num_clients=1", "federation.fraction=1.0"],
    "local-only": ["federation.num_clients=1", "federation.fraction=1.0"],
    "fedavg-full": ["model.finetune=full", "strategy.name=fedavg", "strategy.params={}"],
    "fedlora": ["model.finetune=lora", "strategy.name=fedavg", "strategy.params={}"],
    "fedkd-lora": [
        "model.finetune=lora",
        "strategy.name=fedavg",
        "strategy.params={}",
        "kd.enabled=true",
    ],
}


def _arm_overrides(base: C.Config, raw: dict, arm: str) -> list[tuple[str, list[str]]]:
    """(name without the seed tag, overrides) of every sub-run of `arm`."""
    n = base.federation.num_clients
    if arm == "centralized":  # the union of all partitions, every client's steps per round
        steps = raw["train"]["local_steps"] * C.clients_per_round(base)
        return [
            (
                "centralized",
                [
                    f"data.merge_partitions={list(range(n))}",
                    f"data.split_clients={n}",
                    *ARM_OVERRIDES[arm],
                    f"train.local_steps={steps}",
                ],
            )
        ]
    if arm == "local-only":
        return [
            (
                f"local-only-client{i}",
                [f"data.merge_partitions=[{i}]", f"data.split_clients={n}", *ARM_OVERRIDES[arm]],
            )
            for i in range(n)
        ]
    if arm in ARM_OVERRIDES:
        return [(arm, ARM_OVERRIDES[arm])]
    # a strategy arm keeps the recipe's strategy.params only for the recipe's own strategy
    return [
        (
            arm,
            [
                f"strategy.name={arm}",
                *([] if arm == base.strategy.name else ["strategy.params={}"]),
            ],
        )
    ]


def arm_runs(base: C.Config, arm: str, seed: int, root: Path) -> list[tuple[str, dict, str]]:
    """(name, resolved config dict, engine) of every sub-run an arm needs for one seed."""
    raw = base.to_dict()
    raw["compare"] = {"arms": [], "seeds": 1, "metric": "", "overrides": {}}
    raw = C.apply_overrides(raw, base.compare.overrides.get(arm, []))
    raw["train"]["seed"] = seed
    raw["output"].update(resume=False, overwrite=True)
    raw["kd"]["enabled"] = False
    engine = "inprocess" if arm in LOCAL else "simulation"
    runs = []
    for stem, overrides in _arm_overrides(base, raw, arm):
        name = f"{stem}-seed{seed}"
        sub = C.apply_overrides(raw, overrides)
        sub["output"]["dir"] = str(root / name)
        C.from_dict(sub)  # a bad per-arm override fails here, naming the key
        runs.append((name, sub, engine))
    return runs


def _progress(name: str, run_dir: Path, seen: int, metric: str, rounds, since: float) -> int:
    """Log the rounds of a sub-run's metrics.jsonl past the first `seen`; how many now.
    A metrics.jsonl older than `since` is an earlier study's, not yet cleared by the child."""
    try:
        if (run_dir / "metrics.jsonl").stat().st_mtime < since:
            return seen
    except OSError:
        return seen
    rows = read_metrics(run_dir)
    for row in rows[seen:]:
        log.info(
            f"  {name}: round {row['round']}/{rounds} {metric.removeprefix('eval_')} "
            f"{fmt(row.get(metric), missing='n/a')}"
        )
    return max(seen, len(rows))


def _run_one(name: str, raw: dict, engine: str, root: Path, metric: str) -> dict:
    """One sub-run as `fedtune run` in a child process. Its output goes to a log file only;
    progress comes from the run's metrics.jsonl, read every 2 s while it runs."""
    cfg_path = root / "arms" / f"{name}.toml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(tomli_w.dumps(raw))
    log_path = root / "arms" / f"{name}.log"
    run_dir, rounds, seen = Path(raw["output"]["dir"]), raw["federation"]["rounds"], 0
    t0, since = time.perf_counter(), time.time()
    with (
        log_path.open("w") as out,
        subprocess.Popen(
            [sys.executable, "-m", "fedtune.cli", "run", str(cfg_path), "--engine", engine],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        ) as proc,
    ):
        while proc.poll() is None:
            seen = _progress(name, run_dir, seen, metric, rounds, since)
            time.sleep(2)
    _progress(name, run_dir, seen, metric, rounds, since)  # the rounds of the last 2 s
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not (run_dir / "summary.json").exists():
        lines = log_path.read_text(errors="replace").splitlines()
        reason = next((x for x in reversed(lines) if x.startswith("fedtune:")), None)
        reason = reason or (lines[-1] if lines else f"exit code {proc.returncode}")
        return {
            "name": name,
            "status": "failed",
            "error": reason[:500],
            "exit_code": proc.returncode,
            "log": str(log_path),
            "seconds": seconds,
        }
    rows = read_metrics(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "name": name,
        "status": "ok",
        "run_dir": str(run_dir),
        "rows": rows,
        "seconds": summary["total_wall_seconds"],
        "megabytes": (summary["total_bytes_down"] + summary["total_bytes_up"]) / 2**20,
    }


def _summarize_seed(runs: list[dict], metric: str, mode: str) -> dict:
    """One arm, one seed: final/best metric, curve, runtime, MB (local-only: over clients)."""
    curves = [
        [(r["round"], r[metric]) for r in run["rows"] if r.get(metric) is not None] for run in runs
    ]
    if not all(curves):
        raise ValueError(f"metric {metric!r} is missing from a sub-run's metrics")
    finals = [c[-1][1] for c in curves]
    rounds = sorted({rnd for c in curves for rnd, _ in c})
    mean_curve = [
        (rnd, statistics.fmean(v for c in curves for r2, v in c if r2 == rnd)) for rnd in rounds
    ]
    best = best_round([{"round": r, metric: v} for r, v in mean_curve], metric)
    best_rnd, best_value = best["round"], best[metric]
    worst = max(finals) if mode == "min" else min(finals)
    others = {}
    for key in runs[0]["rows"][-1]:
        if key.startswith("eval_") and not key.endswith("_seconds"):
            vals = [run["rows"][-1].get(key) for run in runs]
            if all(isinstance(v, (int, float)) for v in vals):
                others[key] = statistics.fmean(vals)
    return {
        "final": statistics.fmean(finals),
        "worst_client": worst if len(runs) > 1 else None,
        "best": best_value,
        "best_round": best_rnd,
        "curve": mean_curve,
        "seconds": sum(run["seconds"] for run in runs),
        "megabytes": sum(run["megabytes"] for run in runs),
        "final_metrics": others,
        "run_dirs": [run["run_dir"] for run in runs],
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_compare(base: C.Config, arms: list[str], seeds: int) -> dict:
    """Run every arm x seed, then write comparison.json, comparison.md and plots."""
    root = Path(base.output.dir).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    metric, mode = headline_metric(base), C.metric_mode(headline_metric(base))
    t_start = time.perf_counter()
    for arm in arms:  # every derived config must parse before anything runs
        arm_runs(base, arm, base.train.seed, root)
    results = {}
    for arm in arms:
        per_seed, failures = [], []
        for k in range(seeds):
            seed = base.train.seed + k
            runs = []
            for name, raw, engine in arm_runs(base, arm, seed, root):
                log.info(
                    f"arm {arm}, seed {seed}: {name} ({engine}; log in "
                    f"{root / 'arms' / (name + '.log')})"
                )
                out = _run_one(name, raw, engine, root, metric)
                if arm in LOCAL and out["status"] == "ok":
                    out["megabytes"] = 0.0  # nothing travels: one process, no federation
                runs.append(out)
                if out["status"] != "ok":
                    log.info(f"arm {arm}: {name} FAILED: {out['error']}")
                    failures.append(out)
                    break
            if failures:
                break
            try:
                per_seed.append({"seed": seed, **_summarize_seed(runs, metric, mode)})
            except (KeyError, ValueError) as err:
                failures.append({"name": arm, "status": "failed", "error": str(err)})
                break
        if failures:
            results[arm] = {
                "status": "failed",
                "error": failures[0]["error"],
                "log": failures[0].get("log"),
                "seeds": per_seed,
            }
            continue
        final_m, final_s = _mean_std([s["final"] for s in per_seed])
        results[arm] = {
            "status": "ok",
            "final_mean": final_m,
            "final_std": final_s,
            "best_mean": statistics.fmean(s["best"] for s in per_seed),
            "best_round_mean": statistics.fmean(s["best_round"] for s in per_seed),
            "worst_client_mean": (
                statistics.fmean(s["worst_client"] for s in per_seed)
                if per_seed[0]["worst_client"] is not None
                else None
            ),
            "seconds_mean": statistics.fmean(s["seconds"] for s in per_seed),
            "megabytes_mean": statistics.fmean(s["megabytes"] for s in per_seed),
            "final_metrics_mean": {
                key: statistics.fmean(s["final_metrics"][key] for s in per_seed)
                for key in per_seed[0]["final_metrics"]
            },
            "seeds": per_seed,
        }
    teacher = {}
    if "fedkd-lora" in arms:  # the teacher's own score: what the students distil from
        for k in range(seeds):
            _, raw, _ = arm_runs(base, "fedkd-lora", base.train.seed + k, root)[0]
            info = kd.teacher_dir(C.from_dict(raw)) / "fedtune-teacher.json"
            if info.exists():
                teacher[str(base.train.seed + k)] = json.loads(info.read_text())
    comparison = {
        "recipe_hash": base.hash(),
        "metric": metric,
        "mode": mode,
        "teacher": teacher,
        "arms": results,
        "seeds": seeds,
        "task": base.task.type,
        "model": base.model.name,
        "rounds": base.federation.rounds,
        "num_clients": base.federation.num_clients,
        "total_seconds": time.perf_counter() - t_start,
    }
    write_study(comparison, root)
    return comparison
