"""The local training loop: one client, one round. Short on purpose; no Trainer inside.

Why explicit: the federation owns the learning rate (a schedule across rounds), the number
of steps and the FedProx term, so they are plain arguments here, not hidden in a framework.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import partial

import torch

from fedtune.config import TrainConfig
from fedtune.losses import task_loss
from fedtune.model import autocast
from fedtune.tasks import IGNORE, collate

log = logging.getLogger(__name__)

MEGABATCH = 64  # group_by_length sorts within windows of this many batches (as HF's sampler)


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of one client's round (batch order, dropout): a pure function of the run's
    seed, the round and the partition, so resume and deployment reproduce simulation."""
    return seed * 100_003 + server_round * 1_009 + partition_id


def sampling_seed(seed: int, server_round: int, attempt: int = 0) -> int:
    """The seed of the server's client sampling in a round (and in each retry of it)."""
    return seed * 7_919 + server_round + 1_000_003 * attempt


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


def target_count(batch: dict) -> int:
    """How many targets a micro-batch's mean loss averages over: labelled next tokens for
    language models (labels [B, T], shifted by one), examples for classifiers (labels [B])."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 1:] != IGNORE).sum())


def epoch_order(
    lengths: list[int], batch_size: int, gen: torch.Generator, group: bool
) -> list[int]:
    """One epoch's example order: a seeded permutation. With `group`, each window of
    MEGABATCH batches is sorted by length and cut into batches, and the batches are then
    shuffled: a batch holds examples of similar length (less padding), and a round of a
    few steps still sees a random sample of the data, not only its longest examples.
    Examples of one length (packed blocks) have nothing to group: their order is unchanged."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if not group or len(set(lengths)) <= 1:
        return order
    size = batch_size * MEGABATCH
    batches = []
    for start in range(0, len(order), size):
        window = sorted(order[start : start + size], key=lambda i: -lengths[i])
        batches += [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
    return [i for b in torch.randperm(len(batches), generator=gen).tolist() for i in batches[b]]


def proximal_term(params: list[torch.Tensor], anchors: list[torch.Tensor]) -> torch.Tensor:
    """||w - w_global||^2 over the trainable tensors (FedProx adds mu/2 times this)."""
    return sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))


@dataclass
class TrainResult:
    loss: float  # mean task loss per target (token or example), without the prox term
    steps: int
    samples: int  # examples trained on (with repeats across epochs)
    tokens: int  # non-padding tokens trained on
    seconds: float
    positions: int = 0  # positions computed, padding included (tokens / positions = 1 - pad)


def train_local(
    model,
    examples: list[dict],
    cfg: TrainConfig,
    lr: float,
    proximal_mu: float,
    seed: int,
    pad_id: int = 0,
    log_every: int = 0,
    log_prefix: str = "",
    loss_fn=None,
) -> TrainResult:
    """Train `model` in place on `examples` (see fedtune.tasks) for this round's steps.

    The task loss is `model(**batch).loss`, for causal LMs computed only at the labelled
    positions (fedtune.losses; the masks in the batch decide which tokens count), or
    `loss_fn(model, batch)` when given (knowledge distillation); both are means
    over the micro-batch's targets. With gradient accumulation each micro-batch's mean is
    weighted by its share of the window's targets, so a step's gradient is that of the mean
    over every target token in the window (micro-batches of masked tasks hold different
    numbers of targets), exactly as one big batch would give.
    FedProx: the client adds `mu/2 * ||w - w_global||^2` (once per step) to its loss, where
    w_global are the trainable tensors as received this round. mu = 0 is exactly FedAvg's
    client.
    """
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
    step_loss = loss_fn or partial(task_loss, fused=cfg.fused_loss)
    if cfg.compile:  # dynamo caches per code object: later rounds in this process reuse it
        step_loss = torch.compile(step_loss, dynamic=None)
    lengths = [len(e["input_ids"]) for e in examples]
    order = epoch_order(lengths, cfg.batch_size, gen, cfg.group_by_length)
    cursor, loss_sum, targets_seen, samples, tokens, positions = 0, 0.0, 0, 0, 0, 0
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        window = []
        for _ in range(cfg.grad_accum):
            if cursor >= len(order):  # next epoch: a fresh permutation
                order = epoch_order(lengths, cfg.batch_size, gen, cfg.group_by_length)
                cursor = 0
            picked = [examples[i] for i in order[cursor : cursor + cfg.batch_size]]
            cursor += cfg.batch_size
            window.append(
                (len(picked), {k: v.to(model.device) for k, v in collate(picked, pad_id).items()})
            )
        counts = [target_count(batch) for _, batch in window]
        total_targets = max(sum(counts), 1)
        for i, ((n_picked, batch), count) in enumerate(zip(window, counts)):
            with autocast(cfg.precision, model.device):
                loss = step_loss(model, batch)
            weighted = loss * (count / total_targets)
            if anchors and i == 0:
                weighted = weighted + proximal_mu / 2 * proximal_term(params, anchors)
            weighted.backward()
            loss_sum += loss.item() * count
            targets_seen += count
            samples += n_picked
            tokens += int(batch["attention_mask"].sum())
            positions += batch["attention_mask"].numel()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            log.info(
                f"{log_prefix}step {step + 1}/{steps} loss {loss_sum / max(targets_seen, 1):.4f}"
            )
    seconds = time.perf_counter() - t0
    return TrainResult(
        loss=loss_sum / max(targets_seen, 1),
        steps=steps,
        samples=samples,
        tokens=tokens,
        seconds=seconds,
        positions=positions,
    )
