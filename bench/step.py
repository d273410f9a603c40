"""How close the local training step is to this machine's limit, in one run.

    python bench/step.py                  # demo (SmolLM2-135M) and encoder demo (MiniLM-L6)
    python bench/step.py --steps 6 --threads 2
    python bench/step.py --all-settings   # bf16 settings too where bf16 is only emulated

First the matmul floor: a 1024 x 2048 @ 2048 x 2048 matmul in fp32 and in bf16 at the
clients' thread count (`federation.client_threads` of the demo). Then fedtune's own
`train.train_local` on a client's real examples, in each setting: LoRA and full
fine-tuning; fp32, bf16 autocast, and (LoRA) bf16 frozen base weights with the adapter in
fp32 (PEFT keeps adapters fp32) under bf16 autocast. Two warm-up steps, then `--steps` timed.

FLOPs of a step, per trained (non-padding) token, N = parameters in matmuls (attention and
MLP projections, and the LM head for a causal LM; embeddings are lookups): forward 2 N;
backward 2 N for the input gradients, which every setting needs, plus 2 N for the weight
gradients in full fine-tuning only (frozen weights get none; LoRA's own matmuls, < 1 %
here, are left out). Attention scores and values add 4 L s d per token forward, twice that
backward (L layers, s positions, d width). So full = 6 N + 12 L s d, LoRA = 4 N + 12 L s d.
Padding positions are computed but not counted, so achieved FLOP/s is a lower bound.
Prints tokens/s, achieved GFLOP/s and that as a fraction of the matmul floor of the fastest
dtype the CPU has natively (bf16 with AVX512-BF16/AMX, else fp32). bf16
settings are skipped where the CPU has no native bf16 (no AVX512-BF16/AMX: emulated bf16
runs ~20x slower and measures nothing a user would pick).

Then the step's optimisations, each on top of the last, measured as one epoch over the same
first examples of client 0 (so grouping by length is compared on equal work): the model's
own full-logits loss with batches in random order (what a Trainer loop does), the fused
head + loss at labelled positions (`train.fused_loss`), and batches grouped by length
(`train.group_by_length`); for the demo (packed blocks: every position labelled, no
padding), the instruction demo (response-only loss) and the prompt-classification demo
(loss on the label only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fedtune import config as C, model as M, tasks
from fedtune.simulation import prepare
from fedtune.train import train_local

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name: recipe overrides
    "lora fp32": ["model.finetune=lora", "model.dtype=float32", "train.precision=fp32"],
    "lora bf16 autocast": ["model.finetune=lora", "model.dtype=float32", "train.precision=bf16"],
    "lora bf16 base": ["model.finetune=lora", "model.dtype=bfloat16", "train.precision=bf16"],
    "full fp32": ["model.finetune=full", "model.dtype=float32", "train.precision=fp32"],
    "full bf16 autocast": ["model.finetune=full", "model.dtype=float32", "train.precision=bf16"],
}
MODELS = {
    "demo (SmolLM2-135M, causal LM, 128 tokens)": ("demo.toml", []),
    "encoder demo (MiniLM-L6, classification, <= 64 tokens)": (
        "demo-encoder-sentiment.toml",
        ["lora.target_modules=['query','key','value','dense']"],
    ),
}


def matmul_gflops(dtype: torch.dtype, seconds: float = 2.0) -> float:
    a, b = torch.randn(1024, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024 * 2048 * 2048 * n / (time.perf_counter() - t0) / 1e9


def matmul_params(model) -> int:
    """Parameters of the model's Linear layers (LoRA's own excluded) and its LM head."""
    base = getattr(model, "get_base_model", lambda: model)()
    total = 0
    for name, mod in base.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lora_" not in name:
            total += mod.weight.numel()
    return total


def flops_per_token(model, seq: int, full: bool) -> float:
    cfg = getattr(model, "get_base_model", lambda: model)().config
    layers, width = cfg.num_hidden_layers, cfg.hidden_size
    n = matmul_params(model)
    return (6 if full else 4) * n + 12 * layers * seq * width


OPTIMISATIONS = {  # name: recipe overrides, each row adding one
    "model loss, random batches": ["train.fused_loss=false", "train.group_by_length=false"],
    "+ fused head and loss": ["train.fused_loss=true", "train.group_by_length=false"],
    "+ grouped by length": ["train.fused_loss=true", "train.group_by_length=true"],
}
EPOCH_MODELS = {  # label: (recipe, examples in the timed epoch)
    "demo (packed blocks)": ("demo.toml", 24),
    "instruct demo (response-only loss)": ("demo-instruct.toml", 48),
    "prompt demo (loss on the label)": ("demo-prompt-sentiment.toml", 96),
}


def epoch(recipe: str, sets: list[str], n: int, threads: int) -> dict:
    """One local epoch over client 0's first n examples (LoRA, the recipe's precision)."""
    cfg = C.load(str(ROOT / "recipes" / recipe), sets + ["train.local_steps=0"])
    cfg = C.updated(cfg, "train", local_epochs=1.0)
    prepare(cfg)
    torch.set_num_threads(threads)
    model = M.load_model(cfg)
    tokenizer = M.load_tokenizer(cfg.model.name)
    examples = tasks.client_examples(cfg, 0, tokenizer)[:n]
    warm = C.updated(cfg, "train", local_steps=1).train
    train_local(model, examples, warm, cfg.train.lr, 0.0, 0, tokenizer.pad_token_id)
    r = train_local(model, examples, cfg.train, cfg.train.lr, 0.0, 1, tokenizer.pad_token_id)
    return {
        "epoch_seconds": r.seconds,
        "tokens_per_s": r.tokens / r.seconds,
        "padding": 1 - r.tokens / r.positions,
        "precision_ran": M.resolved_precision(cfg.train.precision, model.device),
    }


def one(recipe: str, sets: list[str], steps: int, threads: int) -> dict:
    cfg = C.load(str(ROOT / "recipes" / recipe), sets + [f"train.local_steps={steps}"])
    prepare(cfg)
    torch.set_num_threads(threads)
    model = M.load_model(cfg)
    tokenizer = M.load_tokenizer(cfg.model.name)
    examples = tasks.client_examples(cfg, 0, tokenizer)
    warm = C.updated(cfg, "train", local_steps=2).train
    train_local(model, examples, warm, cfg.train.lr, 0.0, 0, tokenizer.pad_token_id)
    r = train_local(model, examples, cfg.train, cfg.train.lr, 0.0, 1, tokenizer.pad_token_id)
    per_token = flops_per_token(model, cfg.data.seq_len, cfg.model.finetune == "full")
    return {
        "tokens_per_s": r.tokens / r.seconds,
        "padding": 1 - r.tokens / r.positions,
        "step_seconds": r.seconds / r.steps,
        "gflops": r.tokens * per_token / r.seconds / 1e9,
        "precision_ran": M.resolved_precision(cfg.train.precision, model.device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the demo's clients)")
    ap.add_argument("--all-settings", action="store_true", help="bf16 even where emulated")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    native = M.native_bf16("cpu")
    floor = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(
        f"matmul floor at {args.threads} threads: fp32 {floor['fp32']:.1f} GFLOP/s, "
        f"bf16 {floor['bf16']:.1f} GFLOP/s (native bf16 here: {native})\n"
    )
    rows, epochs = [], []
    ref = "bf16" if native else "fp32"  # the fastest matmul this CPU really has
    print(f"| model | setting | ran as | tokens/s | s/step | GFLOP/s | of the {ref} floor |")
    print("|---|---|---|---|---|---|---|")
    for label, (recipe, extra) in MODELS.items():
        for name, sets in SETTINGS.items():
            if "bf16" in name and not (native or args.all_settings):
                print(f"| {label} | {name} | bf16 emulated here: skipped | | | | |", flush=True)
                continue
            r = one(recipe, extra + sets, args.steps, args.threads)
            rows.append({"model": label, "setting": name, **r})
            share = r["gflops"] / floor[ref]
            print(
                f"| {label} | {name} | {r['precision_ran']} | {r['tokens_per_s']:.0f} | "
                f"{r['step_seconds']:.2f} | {r['gflops']:.1f} | {share:.2f} |",
                flush=True,
            )
    print("\n| model | step (LoRA) | ran as | epoch s | tokens/s | padding | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for label, (recipe, n) in EPOCH_MODELS.items():
        base = None
        for name, sets in OPTIMISATIONS.items():
            r = epoch(recipe, ["model.finetune=lora", *sets], n, args.threads)
            base = base or r["epoch_seconds"]
            epochs.append({"model": label, "step": name, "examples": n, **r})
            print(
                f"| {label}, {n} examples | {name} | {r['precision_ran']} | "
                f"{r['epoch_seconds']:.1f} | {r['tokens_per_s']:.0f} | {r['padding']:.1%} | "
                f"{base / r['epoch_seconds']:.2f}x |",
                flush=True,
            )
    if args.json:
        out = {"floor": floor, "native_bf16": native, "rows": rows, "epochs": epochs, "ref": ref}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
