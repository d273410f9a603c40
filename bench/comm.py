"""Bytes on the wire vs final quality for every `comm.uplink` / `comm.downlink` setting.

    python bench/comm.py                                      # the offline demo (LoRA)
    python bench/comm.py --recipe recipes/demo-encoder-sentiment.toml   # full fine-tuning
    python bench/comm.py --settings fp32:fp32 topk-int8:int8 --set federation.rounds=2

Each setting (UPLINK:DOWNLINK) is one `fedtune run --engine inprocess` of the same recipe,
seed and partitions (early stopping off, so every run trains the same rounds); the bytes
come from metrics.jsonl, i.e. from the serialized records that travelled. Prints MB per
round in each direction, the ratio to fp32 in the same run of this script, and the final
centralized metric against fp32's. Not a test: one seed, this machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    "fp32:fp32",
    "fp16:fp16",
    "bf16:bf16",
    "int8:int8",
    "topk:fp32",
    "topk-int8:fp32",
    "topk-int8:int8",
]
MIB = 2**20


def run(recipe: str, up: str, down: str, extra: list[str], out: Path) -> dict:
    sets = [
        f"comm.uplink={up}",
        f"comm.downlink={down}",
        f"output.dir={out}",
        "output.plots=false",
        "output.save_every=0",
        "output.save_final=false",
        "output.keep_best=false",
        "train.early_stopping={}",
        *extra,
    ]
    cmd = [sys.executable, "-m", "fedtune.cli", "run", recipe, "--engine", "inprocess"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    trained = [r for r in rows if r["round"] > 0 and r.get("status") != "failed"]
    metric = summary["best_metric"]
    return {
        "setting": f"{up}:{down}",
        "seconds": time.perf_counter() - t0,
        "up_mb": sum(r["bytes_up"] for r in trained) / len(trained) / MIB,
        "down_mb": sum(r["bytes_down"] for r in trained) / len(trained) / MIB,
        "metric": metric,
        "final": rows[-1][metric],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.toml"))
    ap.add_argument("--settings", nargs="+", default=SETTINGS)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    settings = args.settings if args.settings[0] == "fp32:fp32" else ["fp32:fp32", *args.settings]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, setting in enumerate(settings):
            up, down = setting.split(":")
            rows.append(run(args.recipe, up, down, args.set, Path(tmp) / f"run{i}"))
            r = rows[-1]
            print(
                f"  {setting}: {r['up_mb']:.3f} MB up, {r['down_mb']:.3f} MB down per round, "
                f"{r['metric']} {r['final']:.4f} ({r['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    base = rows[0]
    base_total = base["up_mb"] + base["down_mb"]
    print(
        f"{Path(args.recipe).name}, {base['metric']} after the last round; MB per round, all "
        "clients together\n"
    )
    print(
        "| uplink:downlink | MB up | MB down | x fewer bytes up | x fewer bytes in total | "
        f"final {base['metric']} | vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = base_total / (r["up_mb"] + r["down_mb"])
        change = 100 * (r["final"] - base["final"]) / abs(base["final"])
        print(
            f"| {r['setting']} | {r['up_mb']:.3f} | {r['down_mb']:.3f} | "
            f"{base['up_mb'] / r['up_mb']:.1f} | {ratio:.1f} | {r['final']:.4f} | {change:+.2f} % |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
