"""Where the demo's local step spends its time: torch.profiler over a few real steps.

    python bench/profile_step.py                       # demo, LoRA, its precision (auto)
    python bench/profile_step.py --set train.precision=fp32 --steps 3

The demo's `train.train_local` on client 0's examples (two warm-up steps first), profiled
on the CPU; prints the ops by self CPU time, then the share of the step in matmuls (the
part bench/step.py's floor measures) against everything else (attention softmax,
normalisation, activations, casts, the optimizer). What stands between the step and the
matmul floor is the second share. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fedtune import config as C, model as M, tasks  # noqa: E402
from fedtune.simulation import prepare  # noqa: E402
from fedtune.train import train_local  # noqa: E402
from step import ROOT  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes/demo.toml"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    cfg = C.load(args.recipe, [*args.set, f"train.local_steps={args.steps}"])
    prepare(cfg)
    torch.set_num_threads(args.threads)
    model = M.load_model(cfg)
    tok = M.load_tokenizer(cfg.model.name)
    examples = tasks.client_examples(cfg, 0, tok)
    warm = C.updated(cfg, "train", local_steps=2).train
    train_local(model, examples, warm, cfg.train.lr, 0.0, 0, tok.pad_token_id)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        r = train_local(model, examples, cfg.train, cfg.train.lr, 0.0, 1, tok.pad_token_id)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    ran = M.resolved_precision(cfg.train.precision, model.device)
    print(f"{args.recipe} {cfg.model.finetune}, ran as {ran}, {args.threads} threads: ")
    print(f"{r.steps} steps in {r.seconds:.2f} s, {r.tokens / r.seconds:.0f} tokens/s")
    print("| op | self CPU s | share |\n|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(
            f"| {e.key} | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total:.1%} |"
        )
    mm = sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMUL))
    print(f"matmuls {mm / total:.1%} of self CPU time; everything else {1 - mm / total:.1%}")


if __name__ == "__main__":
    main()
