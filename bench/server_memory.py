"""Does the server's memory grow with the number of clients? Full fine-tuning of the demo
model on the Simulation Engine with 2 and with 6 clients, one round each.

    python bench/server_memory.py                       # 2 vs 6 clients
    python bench/server_memory.py --clients 2 4 8

Reads `server_peak_rss_mb` (the ServerApp process's peak RSS, in metrics.jsonl) of each run
and prints it with the ratio to the first. Every client sends the whole model (SmolLM2-135M,
~0.5 GB in fp32): a server that held every reply would grow by that much per client; the
streaming fold holds one at a time. Not a test: the figures depend on the machine.
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


def peak(n: int, out: Path, extra: list[str]) -> tuple[float, float, int]:
    sets = [
        "model.finetune=full",
        f"federation.num_clients={n}",
        "federation.rounds=1",
        "federation.client_cpus=1",
        "federation.client_threads=1",
        "train.local_steps=1",
        "train.batch_size=1",
        "data.max_samples=120",
        "data.test_samples=8",
        "eval.max_blocks=4",
        "output.plots=false",
        "output.save_every=0",
        "output.save_final=false",
        "output.keep_best=false",
        "train.early_stopping={}",
        f"output.dir={out}",
        *extra,
    ]
    cmd = [sys.executable, "-m", "fedtune.cli", "run", str(ROOT / "recipes" / "demo.toml")]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["server_peak_rss_mb"], time.perf_counter() - t0, rows[-1]["bytes_up"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[2, 6])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            mb, seconds, up = peak(n, Path(tmp) / f"n{n}", args.set)
            results.append((n, mb, up))
            print(f"  {n} clients: server peak {mb:.0f} MB ({seconds:.0f} s)", file=sys.stderr)
    print("| clients | server peak RSS | x first | MB received by the server in the round |")
    print("|---|---|---|---|")
    for n, mb, up in results:
        print(f"| {n} | {mb:.0f} MB | {mb / results[0][1]:.2f} | {up / 2**20:.0f} |")


if __name__ == "__main__":
    main()
