"""Per-round time in deployment vs simulation vs a plain local loop, with a breakdown.

    python bench/deploy_overhead.py                 # demo recipe, 2 rounds
    python bench/deploy_overhead.py --rounds 3 --set train.local_steps=4

Flower 1.41's deployment runtime starts a fresh ClientApp process for every message, so each
client pays process start + imports, model load and data preparation every round; this
prints how much, per round, next to the same recipe in simulation and in a plain loop.
Not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from round_overhead import ROOT, flower_run, plain_loop  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes/demo.toml"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedtune import config as C
    from fedtune.deploy import deploy_local
    from fedtune.results import read_metrics

    overrides = [
        f"federation.rounds={args.rounds}",
        "output.plots=false",
        "output.save_every=0",
        *args.set,
    ]
    with tempfile.TemporaryDirectory() as tmp:
        _, _, sim_rows = flower_run(args.recipe, overrides, Path(tmp) / "sim")
        cfg = C.load(args.recipe, [*overrides, f"output.dir={Path(tmp) / 'dep'}"])
        deploy_local(cfg)  # its progress is logged; nothing configures logging here
        dep_rows = read_metrics(Path(tmp) / "dep")
    setup, loop_s, _ = plain_loop(C.load(args.recipe, overrides))

    n = cfg.federation.num_clients
    print(f"recipe {args.recipe}, {n} clients, {overrides}")
    print(f"{'round':>5} {'deployment':>11} {'simulation':>11} {'plain loop':>11}   (seconds)")
    for d, s in zip(dep_rows[1:], sim_rows[1:]):
        print(
            f"{d['round']:>5} {d['round_seconds']:>11.1f} {s['round_seconds']:>11.1f} "
            f"{loop_s / args.rounds:>11.1f}"
        )
    print(f"plain loop setup (model load + data, once): {setup:.1f} s")
    print(
        "deployment breakdown per round (slowest client for each part; the clients of a "
        "round run in parallel):"
    )
    for d in dep_rows[1:]:
        rest = (
            d["round_seconds"]
            - d["client_process_age_seconds_max"]
            - d["client_setup_seconds_max"]
            - d["client_train_seconds_max"]
            - d["eval_seconds"]
        )
        print(
            f"  round {d['round']}: spawn+imports {d['client_process_age_seconds_max']:.1f}"
            f" | model load {d['client_model_load_seconds_max']:.1f}"
            f" | data {d['client_data_seconds_max']:.1f}"
            f" | training {d['client_train_seconds_max']:.1f}"
            f" | server eval {d['eval_seconds']:.1f}"
            f" | transfer, aggregation, waiting {rest:.1f}"
            f" | {(d['bytes_down'] + d['bytes_up']) / 2**20:.1f} MiB moved"
        )


if __name__ == "__main__":
    main()
