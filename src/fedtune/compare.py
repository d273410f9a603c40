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
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

from fedtune import config as C, kd
from fedtune.results import best_round, read_metrics

LOCAL = ("pretrained", "centralized", "local-only")


def headline_metric(cfg: C.Config) -> str:
    """`compare.metric`, else the run's headline metric (`eval.metric` or the task's)."""
    return cfg.compare.metric or C.headline_metric(cfg)


def arm_runs(base: C.Config, arm: str, seed: int, root: Path) -> list[tuple[str, dict, str]]:
    """(name, resolved config dict, engine) of every sub-run an arm needs for one seed."""
    raw = base.to_dict()
    raw["compare"] = {"arms": [], "seeds": 1, "metric": "", "overrides": {}}
    raw = C.apply_overrides(raw, base.compare.overrides.get(arm, []))
    raw["train"]["seed"] = seed
    raw["output"].update(resume=False, overwrite=True)
    raw["kd"]["enabled"] = False
    n = base.federation.num_clients

    def sub(name, engine="simulation", **changes):
        r = json.loads(json.dumps(raw))
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            r[section][key] = value
        r["output"]["dir"] = str(root / name)
        C.from_dict(r)  # a bad per-arm override fails here, naming the key
        return name, r, engine

    tag = f"seed{seed}"
    if arm == "pretrained":
        return [sub(f"pretrained-{tag}", "inprocess", federation__rounds=0,
                    output__save_final=False, output__save_every=0, train__early_stopping={})]
    if arm == "centralized":
        steps = raw["train"]["local_steps"] * C.clients_per_round(base)
        return [sub(f"centralized-{tag}", "inprocess", data__merge_partitions=list(range(n)),
                    data__split_clients=n, federation__num_clients=1, federation__fraction=1.0,
                    train__local_steps=steps)]
    if arm == "local-only":
        return [sub(f"local-only-client{i}-{tag}", "inprocess", data__merge_partitions=[i],
                    data__split_clients=n, federation__num_clients=1,
                    federation__fraction=1.0) for i in range(n)]
    if arm == "fedavg-full":
        return [sub(f"fedavg-full-{tag}", model__finetune="full", strategy__name="fedavg",
                    strategy__params={})]
    if arm == "fedlora":
        return [sub(f"fedlora-{tag}", model__finetune="lora", strategy__name="fedavg",
                    strategy__params={})]
    if arm == "fedkd-lora":
        return [sub(f"fedkd-lora-{tag}", model__finetune="lora", strategy__name="fedavg",
                    strategy__params={}, kd__enabled=True)]
    params = raw["strategy"]["params"] if arm == base.strategy.name else {}
    return [sub(f"{arm}-{tag}", strategy__name=arm, strategy__params=params)]


def _run_one(name: str, raw: dict, engine: str, root: Path, echo) -> dict:
    """One sub-run as `fedtune run` in a child process; its output goes to a log file."""
    cfg_path = root / "arms" / f"{name}.toml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(tomli_w.dumps(raw))
    log_path = root / "arms" / f"{name}.log"
    t0 = time.perf_counter()
    with log_path.open("w") as log, subprocess.Popen(
            [sys.executable, "-m", "fedtune.cli", "run", str(cfg_path), "--engine", engine],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        for line in proc.stdout:
            log.write(line)
            if line.startswith(("[fedtune] round ", "[fedtune] teacher", "fedtune:",
                                "[fedtune] training the KD teacher")):
                echo(f"  {name}: {line[len('[fedtune] '):].rstrip()}"
                     if line.startswith("[fedtune]") else f"  {name}: {line.rstrip()}")
    seconds = time.perf_counter() - t0
    run_dir = Path(raw["output"]["dir"])
    if proc.returncode != 0 or not (run_dir / "summary.json").exists():
        lines = log_path.read_text(errors="replace").splitlines()
        reason = next((x for x in reversed(lines) if x.startswith("fedtune:")), None)
        reason = reason or (lines[-1] if lines else f"exit code {proc.returncode}")
        return {"name": name, "status": "failed", "error": reason[:500],
                "exit_code": proc.returncode, "log": str(log_path), "seconds": seconds}
    rows = read_metrics(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"name": name, "status": "ok", "run_dir": str(run_dir), "rows": rows,
            "seconds": summary["total_wall_seconds"],
            "megabytes": (summary["total_bytes_down"] + summary["total_bytes_up"]) / 2**20}


def _summarize_seed(runs: list[dict], metric: str, mode: str) -> dict:
    """One arm, one seed: final/best metric, curve, runtime, MB (local-only: over clients)."""
    curves = [[(r["round"], r[metric]) for r in run["rows"] if r.get(metric) is not None]
              for run in runs]
    if not all(curves):
        raise ValueError(f"metric {metric!r} is missing from a sub-run's metrics")
    finals = [c[-1][1] for c in curves]
    rounds = sorted({rnd for c in curves for rnd, _ in c})
    mean_curve = [(rnd, statistics.fmean(v for c in curves for r2, v in c if r2 == rnd))
                  for rnd in rounds]
    best = best_round([{"round": r, metric: v} for r, v in mean_curve], metric)
    best_rnd, best_value = best["round"], best[metric]
    worst = max(finals) if mode == "min" else min(finals)
    others = {}
    for key in runs[0]["rows"][-1]:
        if key.startswith("eval_") and not key.endswith("_seconds"):
            vals = [run["rows"][-1].get(key) for run in runs]
            if all(isinstance(v, (int, float)) for v in vals):
                others[key] = statistics.fmean(vals)
    return {"final": statistics.fmean(finals), "worst_client": worst if len(runs) > 1 else None,
            "best": best_value, "best_round": best_rnd, "curve": mean_curve,
            "seconds": sum(run["seconds"] for run in runs),
            "megabytes": sum(run["megabytes"] for run in runs), "final_metrics": others,
            "run_dirs": [run["run_dir"] for run in runs]}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_compare(base: C.Config, arms: list[str], seeds: int, echo=print) -> dict:
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
                echo(f"arm {arm}, seed {seed}: {name} ({engine})")
                out = _run_one(name, raw, engine, root, echo)
                if arm in LOCAL and out["status"] == "ok":
                    out["megabytes"] = 0.0  # nothing travels: one process, no federation
                runs.append(out)
                if out["status"] != "ok":
                    echo(f"arm {arm}: {name} FAILED: {out['error']}")
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
            results[arm] = {"status": "failed", "error": failures[0]["error"],
                            "log": failures[0].get("log"), "seeds": per_seed}
            continue
        final_m, final_s = _mean_std([s["final"] for s in per_seed])
        results[arm] = {
            "status": "ok", "final_mean": final_m, "final_std": final_s,
            "best_mean": statistics.fmean(s["best"] for s in per_seed),
            "best_round_mean": statistics.fmean(s["best_round"] for s in per_seed),
            "worst_client_mean": (statistics.fmean(s["worst_client"] for s in per_seed)
                                  if per_seed[0]["worst_client"] is not None else None),
            "seconds_mean": statistics.fmean(s["seconds"] for s in per_seed),
            "megabytes_mean": statistics.fmean(s["megabytes"] for s in per_seed),
            "final_metrics_mean": {key: statistics.fmean(s["final_metrics"][key]
                                                         for s in per_seed)
                                   for key in per_seed[0]["final_metrics"]},
            "seeds": per_seed,
        }
    teacher = {}
    if "fedkd-lora" in arms:  # the teacher's own score: what the students distil from
        for k in range(seeds):
            _, raw, _ = arm_runs(base, "fedkd-lora", base.train.seed + k, root)[0]
            info = kd.teacher_dir(C.from_dict(raw)) / "fedtune-teacher.json"
            if info.exists():
                teacher[str(base.train.seed + k)] = json.loads(info.read_text())
    comparison = {"recipe_hash": base.hash(), "metric": metric, "mode": mode,
                  "teacher": teacher,
                  "arms": results, "seeds": seeds, "task": base.task.type,
                  "model": base.model.name, "rounds": base.federation.rounds,
                  "num_clients": base.federation.num_clients,
                  "total_seconds": time.perf_counter() - t_start}
    (root / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    (root / "comparison.md").write_text(markdown(comparison))
    try:
        write_plots(comparison, root / "plots")
    except Exception as err:  # noqa: BLE001 - the table matters more than the pictures
        echo(f"could not write comparison plots: {err!r}")
    return comparison


def _f(v, spec=".4f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(c: dict) -> str:
    """The comparison table(s) as Markdown."""
    m, arms = c["metric"], c["arms"]
    arrow = "lower is better" if c["mode"] == "min" else "higher is better"
    lines = [f"# Comparison: {c['task']} on {c['model']}", "",
             f"{c['num_clients']} clients, {c['rounds']} rounds, {c['seeds']} seed(s); "
             f"headline metric `{m}` ({arrow}), on the server's test split after the last "
             "round; mean ± std over seeds.", "",
             f"| arm | {m} (final) | best | round of best | runtime (s) | MB communicated "
             "| status |",
             "|---|---|---|---|---|---|---|"]
    for arm, r in arms.items():
        if r["status"] != "ok":
            lines.append(f"| {arm} | — | — | — | — | — | **failed**: {r['error']} |")
            continue
        final = f"{_f(r['final_mean'])} ± {_f(r['final_std'])}"
        if r["worst_client_mean"] is not None:
            final += f" (worst client {_f(r['worst_client_mean'])})"
        lines.append(f"| {arm} | {final} | {_f(r['best_mean'])} | {_f(r['best_round_mean'], '.1f')}"
                     f" | {_f(r['seconds_mean'], '.0f')} | {_f(r['megabytes_mean'], '.1f')} | ok |")
    for seed, t in c.get("teacher", {}).items():
        score = t.get("test_metrics", {}).get(m)
        lines += ["", f"KD teacher (seed {seed}): {t['teacher']} fully fine-tuned on the public "
                  f"slice ({t['public_samples']} samples, {t['steps']} steps, "
                  f"{t['seconds']:.0f} s): {m} {_f(score)} on the same test split."]
    keys = sorted({k for r in arms.values() if r["status"] == "ok"
                   for k in r["final_metrics_mean"]})
    if keys:
        lines += ["", "All final metrics (mean over seeds):", "",
                  "| arm | " + " | ".join(k[5:] for k in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for arm, r in arms.items():
            if r["status"] == "ok":
                lines.append(f"| {arm} | " + " | ".join(_f(r["final_metrics_mean"].get(k))
                                                        for k in keys) + " |")
    lines += ["", "Plots: `plots/comparison_metric.png` (metric per round, all arms), "
              "`plots/comparison_cost.png` (runtime and communication). Sub-runs: one run "
              "folder per arm and seed next to this file; their configs and logs in `arms/`.",
              ""]
    return "\n".join(lines)


def write_plots(c: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    ok = {a: r for a, r in c["arms"].items() if r["status"] == "ok"}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm, r in ok.items():
        curves = [s["curve"] for s in r["seeds"]]
        rounds = [rnd for rnd, _ in curves[0]]
        mean = [statistics.fmean(cv[i][1] for cv in curves) for i in range(len(rounds))]
        if len(rounds) == 1:  # pretrained: a reference line across the rounds
            ax.axhline(mean[0], ls="--", lw=1.5, label=f"{arm}", color="grey")
            continue
        line, = ax.plot(rounds, mean, marker="o", label=arm)
        if len(curves) > 1:
            lo = [min(cv[i][1] for cv in curves) for i in range(len(rounds))]
            hi = [max(cv[i][1] for cv in curves) for i in range(len(rounds))]
            ax.fill_between(rounds, lo, hi, alpha=0.15, color=line.get_color())
    teacher = [t.get("test_metrics", {}).get(c["metric"]) for t in c.get("teacher", {}).values()]
    teacher = [v for v in teacher if v is not None]
    if teacher:
        ax.axhline(statistics.fmean(teacher), ls=":", lw=1.5, color="black",
                   label="KD teacher (public slice)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(c["metric"])
    ax.set_title(f"{c['metric']} per round (server test split; band = min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths = [out / "comparison_metric.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(ok)
    seconds = [ok[a]["seconds_mean"] for a in names]
    mb = [ok[a]["megabytes_mean"] for a in names]
    bars1 = a1.bar(names, seconds, color="tab:blue")
    a1.set_title("runtime per arm (s, mean over seeds)")
    bars2 = a2.bar(names, mb, color="tab:orange")
    positive = [v for v in mb if v > 0]
    if positive and max(positive) > 100 * min(positive):  # LoRA vs full: 100-1000x apart
        a2.set_yscale("log")
    a2.set_title("communication per arm (MB, down + up" +
                 (", log scale)" if a2.get_yscale() == "log" else ")"))
    a1.bar_label(bars1, labels=[f"{v:.0f}" for v in seconds])
    a2.bar_label(bars2, labels=[f"{v:.1f}" for v in mb])
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    fig.tight_layout()
    paths.append(out / "comparison_cost.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def rewrite(root: Path) -> list[Path]:
    """`fedtune report COMPARE_DIR`: comparison.md and plots again from comparison.json."""
    c = json.loads((root / "comparison.json").read_text())
    (root / "comparison.md").write_text(markdown(c))
    return [root / "comparison.md", *write_plots(c, root / "plots")]
