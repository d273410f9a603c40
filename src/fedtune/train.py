"""The local training loop: one client, one round. Short on purpose; no Trainer inside.

Why explicit: the federation owns the learning rate (a schedule across rounds), the number
of steps and the FedProx term, so they are plain arguments here, not hidden in a framework.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from fedtune.config import TrainConfig


def lr_for_round(server_round: int, num_rounds: int, cfg: TrainConfig) -> float:
    """Constant, or cosine / linear from `lr` (round 1) to `lr_min` (last round)."""
    if cfg.lr_schedule == "constant" or num_rounds <= 1:
        return cfg.lr
    progress = (server_round - 1) / (num_rounds - 1)
    if cfg.lr_schedule == "linear":
        return cfg.lr + (cfg.lr_min - cfg.lr) * progress
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * progress))


def num_local_steps(n_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps this round: `local_steps`, or epochs over the client's examples."""
    if cfg.local_steps:
        return cfg.local_steps
    per_epoch = math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum))
    return max(1, math.ceil(per_epoch * cfg.local_epochs))


def autocast(precision: str, device: torch.device | str = "cpu"):
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def proximal_term(params: list[torch.Tensor], anchors: list[torch.Tensor]) -> torch.Tensor:
    """||w - w_global||^2 over the trainable tensors (FedProx adds mu/2 times this)."""
    return sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))


@dataclass
class TrainResult:
    loss: float          # mean task loss of the micro-batches seen (without the prox term)
    steps: int
    samples: int         # examples trained on (with repeats across epochs)
    tokens: int          # non-padding tokens trained on
    seconds: float


def train_local(model, examples: list[dict], cfg: TrainConfig, lr: float, proximal_mu: float,
                seed: int, pad_id: int = 0, log_every: int = 0, log=print,
                loss_fn=None) -> TrainResult:
    """Train `model` in place on `examples` (see fedtune.tasks) for this round's steps.

    The task loss is `model(**batch).loss` (the masks in the batch decide which tokens
    count), or `loss_fn(model, batch)` when given (knowledge distillation).
    FedProx: the client adds `mu/2 * ||w - w_global||^2` to its loss, where w_global are the
    trainable tensors as received this round. mu = 0 is exactly FedAvg's client.
    """
    from fedtune.tasks import collate  # tasks -> scoring -> train (autocast): import late

    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, weight_decay=cfg.weight_decay)
    steps = num_local_steps(len(examples), cfg)
    # dropout draws from the global RNG: seed it so a client's round depends only on
    # (seed, round, client), not on what the process ran before (resume, caching, deployment)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=gen)
    cursor, total_loss, n_micro, samples, tokens = 0, 0.0, 0, 0, 0
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for _ in range(cfg.grad_accum):
            if cursor >= len(order):  # next epoch: a fresh permutation
                order, cursor = torch.randperm(len(examples), generator=gen), 0
            picked = [examples[i] for i in order[cursor: cursor + cfg.batch_size].tolist()]
            batch = {k: v.to(model.device) for k, v in collate(picked, pad_id).items()}
            cursor += cfg.batch_size
            with autocast(cfg.precision, model.device):
                loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
            total = loss
            if anchors:
                total = loss + proximal_mu / 2 * proximal_term(params, anchors)
            (total / cfg.grad_accum).backward()
            total_loss += loss.item()
            n_micro += 1
            samples += len(picked)
            tokens += int(batch["attention_mask"].sum())
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            log(f"step {step + 1}/{steps} loss {total_loss / n_micro:.4f}")
    seconds = time.perf_counter() - t0
    return TrainResult(loss=total_loss / max(n_micro, 1), steps=steps, samples=samples,
                       tokens=tokens, seconds=seconds)
