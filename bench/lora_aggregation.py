"""Quality, bytes and exactness of every `lora.aggregation` mode on the same recipes.

    python bench/lora_aggregation.py                          # both LoRA demos, all modes
    python bench/lora_aggregation.py --modes naive fedex --set federation.rounds=2
    python bench/lora_aggregation.py --recipes recipes/demo-instruct.toml --modes svd@2,4,8

Each (recipe, mode) is one `fedtune run --engine inprocess` of the same recipe, seed and
partitions (early stopping off, so every mode trains the same rounds; generation and suites
off, so it fits 2 cores). `svd@4,8,16` is `svd` with `lora.client_ranks = [4, 8, 16]` and
the server at the largest rank (plain `svd`: every client at the recipe's rank). From
metrics.jsonl: the
headline metric at round 0, at the end and at its best, MB per round each way (the
serialized records that travelled), and the mean over rounds of `lora_naive_error` (how far
element-wise averaging is from the mean update; also per round) and of `lora_fedex_residual` /
`lora_svd_dropped`. A failed run is a table row, not the end of the bench. Prints one
markdown table per recipe. Not a test: one seed, this machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [
    str(ROOT / "recipes" / "demo-prompt-sentiment.toml"),
    str(ROOT / "recipes" / "demo-instruct.toml"),
]
MODES = ["naive", "ffa", "rolora", "fedex", "svd", "svd@4,8,16"]
EXTRA = {"fedex": "lora_fedex_residual", "svd": "lora_svd_dropped"}  # mode -> row key
MIB = 2**20


def mean_of(rows: list[dict], key: str) -> float | None:
    """Mean over the rounds that recorded `key` (None where none did: an older build)."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def tail(log: Path, lines: int = 3) -> str:
    """The last non-empty lines of a run's output, on one line: why it failed."""
    text = log.read_text(errors="replace") if log.exists() else ""
    kept = [x.strip() for x in text.splitlines() if x.strip(" ^~\n")]  # no caret lines
    last = kept[-lines:]
    return " / ".join(last) or "no output"


def run(recipe: str, spec: str, extra: list[str], tmp: Path) -> dict:
    """One run of `recipe` with `lora.aggregation` as `spec` says (MODE or svd@RANKS); a
    result dict, failed or not."""
    mode, _, ranks = spec.partition("@")
    name = f"{Path(recipe).stem}-{mode}-{ranks.replace(',', '-')}"
    out, log = tmp / name, tmp / f"{name}.log"
    sets = [
        f"lora.aggregation={mode}",
        f"output.dir={out}",
        "output.plots=false",
        "output.save_every=0",
        "output.save_final=false",
        "output.keep_best=false",
        "train.early_stopping={}",
        "eval.generate=false",
        "eval.suites=[]",
    ]
    if ranks:
        sets += [f"lora.client_ranks=[{ranks}]", f"lora.r={max(map(int, ranks.split(',')))}"]
    sets += extra  # the user's --set last, so they win
    cmd = [sys.executable, "-m", "fedtune.cli", "run", recipe, "--engine", "inprocess"]
    for s in sets:
        cmd += ["--set", s]
    result: dict = {"recipe": recipe, "mode": spec, "command": shlex.join(cmd)}
    t0 = time.perf_counter()
    with log.open("w") as f:  # stdout too: the CLI's one-line errors may go to either
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    result["seconds"] = time.perf_counter() - t0
    return result | collect(out, log, code, mode)


def collect(out: Path, log: Path, code: int, mode: str) -> dict:
    """What one run's folder says (or why it failed)."""
    if code != 0:
        return {"error": f"exit {code}: {tail(log)}"}
    try:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError) as err:
        return {"error": f"no results: {err}"}
    trained = [r for r in rows if r["round"] > 0 and r.get("status") != "failed"]
    metric = summary["best_metric"]
    start = next((r.get(metric) for r in rows if r["round"] == 0), None)
    evaluated = [r[metric] for r in trained if r.get(metric) is not None]
    return {
        "metric": metric,
        "round0": start,
        "final": evaluated[-1] if evaluated else None,
        "best": summary.get("best_value"),
        "rounds": len(trained),
        "down_mb": mean_of(trained, "bytes_down") / MIB if trained else None,
        "up_mb": mean_of(trained, "bytes_up") / MIB if trained else None,
        "naive_error": mean_of(trained, "lora_naive_error"),
        "naive_error_rounds": [r.get("lora_naive_error") for r in trained],
        "extra": mean_of(trained, EXTRA[mode]) if mode in EXTRA else None,
        "dropped_down": mean_of(trained, "lora_svd_dropped_down"),
    }


def fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def line(r: dict) -> str:
    """One progress line for stderr."""
    if "error" in r:
        return f"failed ({r['seconds']:.0f} s): {r['error']}"
    return (
        f"{r['metric']} {fmt(r['round0'])} -> {fmt(r['final'])} (best {fmt(r['best'])}), "
        f"{fmt(r['down_mb'], '.3f')} MB down, {fmt(r['up_mb'], '.3f')} MB up per round, "
        f"naive error {fmt(r['naive_error'])} ({r['seconds']:.0f} s)"
    )


def per_round(r: dict) -> str:
    return " / ".join(fmt(x) for x in r.get("naive_error_rounds", [])) or "-"


def extra(r: dict) -> str:
    """Small shares matter here (1e-5 is not 0): two significant digits."""
    down = f"; {fmt(r['dropped_down'], '.2g')}" if r.get("dropped_down") is not None else ""
    return fmt(r["extra"], ".2g") + down


def table(recipe: str, results: list[dict]) -> str:
    """The README table of one recipe, one row per mode."""
    ok = [r for r in results if "error" not in r]
    metric = ok[0]["metric"] if ok else "metric"
    out = [
        f"{Path(recipe).name}: {metric}; MB per round, all clients together; means over rounds\n",
        f"| mode | {metric} round 0 -> final | best | MB down/round | MB up/round | "
        "naive error per round | fedex residual / svd energy dropped (server; down) | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            why = r["error"].replace("|", "\\|")
            out.append(f"| {r['mode']} | failed: {why} | | | | | | {r['seconds']:.0f} |")
            continue
        out.append(
            f"| {r['mode']} | {fmt(r['round0'])} -> {fmt(r['final'])} | {fmt(r['best'])} | "
            f"{fmt(r['down_mb'], '.3f')} | {fmt(r['up_mb'], '.3f')} | {per_round(r)} | "
            f"{extra(r)} | {r['seconds']:.0f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--modes", nargs="+", default=MODES)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", help="also write every run's results to this file")
    args = ap.parse_args()
    command = shlex.join(["python", *sys.argv])
    by_recipe: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            for mode in args.modes:
                print(f"recipe {recipe} mode {mode}: running ...", file=sys.stderr, flush=True)
                r = run(recipe, mode, args.set, Path(tmp))
                by_recipe.setdefault(recipe, []).append(r)
                print(f"recipe {recipe} mode {mode}: {line(r)}", file=sys.stderr, flush=True)
    print(f"`{command}`\n")
    print("\n\n".join(table(recipe, results) for recipe, results in by_recipe.items()))
    if args.json:
        runs = [r for results in by_recipe.values() for r in results]
        Path(args.json).write_text(json.dumps({"command": command, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
