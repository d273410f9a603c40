"""The GPU paths, measured: run on a CUDA machine (bench/gpu_check.sh runs it).

    python bench/gpu_check.py              # every check below
    python bench/gpu_check.py --steps 20

1. the demo's local step (SmolLM2-135M, LoRA) in bf16 autocast on the GPU;
2. the QLoRA path: the same model in 4-bit NF4 (bitsandbytes) with a LoRA adapter;
3. a full fine-tuning step of an OPT-350M-sized model built from its config (random
   weights: a memory and speed check, not a quality one), bf16 autocast;
4. two simulated clients sharing one GPU (`federation.client_gpus = 0.5`) through Flower's
   Simulation Engine, one round of the demo.
Prints tokens/s and peak GPU memory for each (1-3: torch's peak allocated in this process;
4: the device's peak used memory sampled by nvidia-smi every 0.2 s). Exits 2 without CUDA.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from aggregation_memory import OPT_350M  # bench/ is on sys.path: the script's folder
from fedtune import config as C, model as M, tasks
from fedtune.simulation import prepare
from fedtune.train import train_local

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "recipes" / "demo.toml")


def step(cfg: C.Config, steps: int) -> dict:
    """Time `steps` local steps of client 0 after one warm-up step, on the GPU."""
    prepare(cfg)
    torch.cuda.reset_peak_memory_stats()
    model = M.load_model(cfg)
    tokenizer = M.load_tokenizer(cfg.model.name)
    examples = tasks.client_examples(cfg, 0, tokenizer)
    warm = C.updated(cfg, "train", local_steps=1).train
    train_local(model, examples, warm, cfg.train.lr, 0.0, 0, tokenizer.pad_token_id)
    torch.cuda.synchronize()
    timed = C.updated(cfg, "train", local_steps=steps).train
    r = train_local(model, examples, timed, cfg.train.lr, 0.0, 1, tokenizer.pad_token_id)
    torch.cuda.synchronize()
    out = {
        "device": str(model.device),
        "tokens_per_s": r.tokens / r.seconds,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20,
    }
    del model
    torch.cuda.empty_cache()
    return out


def opt350m_folder(root: Path) -> Path:
    """OPT-350M's shape (24 layers, 1024 wide, 512-wide embeddings) with GPT-2's tokenizer
    from the offline assets, saved like a hub model."""
    sys.path.insert(0, str(ROOT / "tests"))
    from transformers import GPT2Tokenizer, OPTConfig, OPTForCausalLM

    from tinymodels import gpt2_tokenizer  # noqa: PLC0415 - bench-only helper from tests

    tok = GPT2Tokenizer.from_pretrained(gpt2_tokenizer(root / "tok"))
    cfg = OPTConfig(**(OPT_350M | {"vocab_size": len(tok)}))
    OPTForCausalLM(cfg).save_pretrained(root / "opt350m")
    tok.save_pretrained(root / "opt350m")
    return root / "opt350m"


def gpu_memory_sampler(stop: threading.Event, peak: list) -> None:
    while not stop.is_set():
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
        )
        if q.returncode == 0:
            peak[0] = max(peak[0], max(float(x) for x in q.stdout.split()))
        time.sleep(0.2)


def shared_gpu_simulation(out: Path) -> dict:
    sets = [
        "federation.num_clients=2",
        "federation.rounds=1",
        "federation.client_gpus=0.5",
        "federation.client_cpus=1",
        "train.precision=bf16",
        f"output.dir={out}",
    ]
    args = [sys.executable, "-m", "fedtune.cli", "run", DEMO]
    for s in sets:
        args += ["--set", s]
    stop, peak = threading.Event(), [0.0]
    sampler = threading.Thread(target=gpu_memory_sampler, args=(stop, peak), daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    stop.set()
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        raise SystemExit(f"the shared-GPU simulation failed (exit {done.returncode})")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r.get("round", 0) >= 1]
    return {
        "device": "2 clients on 1 GPU",
        "tokens_per_s": trained[-1]["tokens_per_s"],
        "peak_gpu_mib": peak[0],
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False)")
        raise SystemExit(2)
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
    lora_bf16 = ["model.finetune=lora", "train.precision=bf16"]
    results = {}
    results["demo LoRA bf16"] = step(C.load(DEMO, lora_bf16), args.steps)
    if importlib.util.find_spec("bitsandbytes"):
        qlora = C.load(DEMO, lora_bf16 + ["model.quantization=4bit"])
        results["demo QLoRA 4-bit"] = step(qlora, args.steps)
    else:
        print("QLoRA skipped: pip install bitsandbytes")
    with tempfile.TemporaryDirectory() as tmp:
        folder = opt350m_folder(Path(tmp))
        full = C.load(
            DEMO,
            [
                f"model.name={folder}",
                "model.finetune=full",
                "train.precision=bf16",
                "train.lr=1e-5",
            ],
        )
        results["OPT-350M-sized full bf16"] = step(full, args.steps)
        results["demo, 2 clients sharing 1 GPU"] = shared_gpu_simulation(Path(tmp) / "run")
    print("| check | ran on | tokens/s | peak GPU MiB |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['device']} | {r['tokens_per_s']:.0f} | {r['peak_gpu_mib']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
