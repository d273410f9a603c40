"""Simulation round time with one client at a time on all threads vs clients in parallel.

    python bench/actors_threads.py                  # demo recipe, 3 clients, 2 rounds
    python bench/actors_threads.py --set federation.num_clients=2

On a machine with C cores, `federation.client_cpus = C, client_threads = C` gives Ray one
actor that trains the clients one after another on every core; `client_cpus = 1,
client_threads = 1` gives C actors training C clients at once, one thread each. Which is
faster depends on how well one client's step uses several threads (matmul sizes, memory
bandwidth) against what parallel clients pay in caches and memory. Prints the warm (last)
round and the whole run for each; the faster one is what recipes/demo.toml uses.
Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_overhead import cpu_name  # noqa: E402
from round_overhead import ROOT, flower_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes/demo.toml"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cores = os.cpu_count() or 1
    base = [f"federation.rounds={args.rounds}", "output.plots=false", "output.save_every=0"]
    settings = {
        f"1 actor x {cores} threads": [
            f"federation.client_cpus={cores}",
            f"federation.client_threads={cores}",
        ],
        f"{cores} actors x 1 thread": ["federation.client_cpus=1", "federation.client_threads=1"],
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, sets) in enumerate(settings.items()):
            wall, _, rows = flower_run(args.recipe, [*base, *sets, *args.set], Path(tmp) / str(i))
            results[name] = (wall, rows)
    print(f"recipe {args.recipe} {base + args.set}; {cores} cores, {cpu_name()}")
    print("| setting | last round (s) | all rounds (s) | whole command (s) | final eval loss |")
    print("|---|---|---|---|---|")
    for name, (wall, rows) in results.items():
        rounds = sum(r["round_seconds"] for r in rows[1:])
        print(
            f"| {name} | {rows[-1]['round_seconds']:.1f} | {rounds:.1f} | {wall:.1f} "
            f"| {rows[-1]['eval_loss']:.4f} |"
        )
    (a, (_, ra)), (b, (_, rb)) = results.items()
    ratio = rb[-1]["round_seconds"] / ra[-1]["round_seconds"]
    print(f"last round, {b} / {a}: {ratio:.2f}")


if __name__ == "__main__":
    main()
