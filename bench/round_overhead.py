"""What does Flower cost? R rounds of a recipe through Flower's Simulation Engine vs the same
local training steps, FedAvg and evaluation in a plain loop in one process.

    python bench/round_overhead.py                      # demo recipe, 2 rounds
    python bench/round_overhead.py --rounds 3 --set train.local_steps=4

Prints both times and their ratio. Both use the whole machine: the simulation runs clients in
parallel (federation.client_cpus each), the plain loop runs them one after another with all
threads. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def flower_run(recipe: str, overrides: list[str], out: Path) -> tuple[float, dict, list]:
    args = [sys.executable, "-m", "fedtune.cli", "run", recipe, "--set", f"output.dir={out}"]
    for o in overrides:
        args += ["--set", o]
    t0 = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return wall, json.loads((out / "summary.json").read_text()), rows


def plain_loop(cfg) -> tuple[float, float, list]:
    """Same clients, steps, seeds, FedAvg and evaluation; no Flower, no Ray, no messages."""
    import torch

    from fedtune import model as M, tasks
    from fedtune.evaluate import evaluate_task
    from fedtune.train import lr_for_round, train_local

    torch.set_num_threads(os.cpu_count() or 1)
    t_setup = time.perf_counter()
    tok = M.load_tokenizer(cfg.model.name)
    model = M.load_model(cfg)
    test, parts, _ = tasks.load_task_data(cfg)
    blocks = [tasks.encode(p, tok, cfg) for p in parts]
    test_rows, test_examples = tasks.encode_test(test, tok, cfg)
    setup = time.perf_counter() - t_setup

    def evaluate():
        return evaluate_task(model, tok, cfg, test_rows, test_examples)["eval_loss"]

    losses = [evaluate()]
    t0 = time.perf_counter()
    for rnd in range(1, cfg.federation.rounds + 1):
        glob = {k: v.clone() for k, v in M.trainable_state(model).items()}
        acc = {k: torch.zeros_like(v) for k, v in glob.items()}
        total = sum(len(b) for b in blocks)
        for pid, b in enumerate(blocks):
            M.load_trainable_state(model, glob)
            train_local(
                model,
                b,
                cfg.train,
                lr_for_round(rnd, cfg.federation.rounds, cfg.train),
                0.0,
                seed=cfg.train.seed * 100_003 + rnd * 1_009 + pid,
                pad_id=tok.pad_token_id,
            )
            for k, v in M.trainable_state(model).items():
                acc[k] += v * (len(b) / total)
        M.load_trainable_state(model, acc)
        losses.append(evaluate())
    return setup, time.perf_counter() - t0, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes/demo.toml"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedtune import config as C

    overrides = [f"federation.rounds={args.rounds}", *args.set]
    cfg = C.load(args.recipe, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        wall, summary, rows = flower_run(args.recipe, overrides, Path(tmp) / "run")
    rounds_s = sum(r["round_seconds"] for r in rows[1:])
    setup, loop_s, losses = plain_loop(cfg)
    print(f"recipe {args.recipe} with {overrides}")
    print(f"  flower simulation, whole command  : {wall:8.1f} s")
    print(
        f"  flower simulation, {args.rounds} rounds only : {rounds_s:8.1f} s "
        f"({rounds_s / args.rounds:.1f} s/round; eval loss {rows[0]['eval_loss']:.4f} -> "
        f"{rows[-1]['eval_loss']:.4f})"
    )
    print(
        f"  plain loop, {args.rounds} rounds              : {loop_s:8.1f} s "
        f"({loop_s / args.rounds:.1f} s/round; eval loss {losses[0]:.4f} -> {losses[-1]:.4f};"
        f" setup {setup:.1f} s not counted)"
    )
    print(f"  ratio flower rounds / plain loop  : {rounds_s / loop_s:8.2f}")
    print(f"  ratio flower command / plain loop : {wall / (loop_s + setup):8.2f}")
    for r in rows[1:]:
        other = r["round_seconds"] - r["client_train_seconds_sum"] - r["eval_seconds"]
        print(
            f"  flower round {r['round']}: {r['round_seconds']:.1f} s = clients' local training "
            f"{r['client_train_seconds_sum']:.1f} s (summed) + server eval "
            f"{r['eval_seconds']:.1f} s + the rest {other:.1f} s (client setup "
            f"{r['client_setup_seconds_max']:.1f} s, messages, aggregation, parallelism)"
        )


if __name__ == "__main__":
    main()
