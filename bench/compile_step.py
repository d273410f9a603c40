"""torch.compile of the loss step vs eager, on the demo's LoRA step (client 0's first batch).

    python bench/compile_step.py

Prints the first call (the compile) and the seconds per step after one more warm step,
3 timed steps each, 2 threads. What `train.compile`'s description quotes.
"""

import time

import torch

from fedtune import config as C, losses, model as M, tasks
from fedtune.simulation import prepare
from fedtune.tasks import collate

cfg = C.load(
    "recipes/demo.toml", ["model.finetune=lora", "model.dtype=float32", "train.precision=fp32"]
)
prepare(cfg)
torch.set_num_threads(2)
model = M.load_model(cfg)
tok = M.load_tokenizer(cfg.model.name)
ex = tasks.client_examples(cfg, 0, tok)
b = collate(ex[:4], tok.pad_token_id)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)


def step(fn):
    loss = fn(model, b)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


model.train()
for name, fn in (("eager", losses.task_loss), ("compiled", torch.compile(losses.task_loss))):
    t0 = time.perf_counter()
    step(fn)
    first = time.perf_counter() - t0
    step(fn)
    t0 = time.perf_counter()
    for _ in range(3):
        step(fn)
    print(
        name,
        "first",
        round(first, 1),
        "s/step",
        round((time.perf_counter() - t0) / 3, 2),
        flush=True,
    )
