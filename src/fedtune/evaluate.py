"""Evaluation of a causal LM on packed blocks: token-weighted loss and perplexity."""

from __future__ import annotations

import math

import torch

from fedtune.train import autocast


@torch.no_grad()
def eval_causal_lm(model, blocks: torch.Tensor, batch_size: int, precision: str = "fp32"):
    """Mean next-token cross-entropy over all predicted tokens, and exp of it."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i: i + batch_size].to(model.device)
        with autocast(precision, model.device):
            loss = model(input_ids=batch, labels=batch).loss.float().item()
        n = batch.numel() - len(batch)  # each row predicts T-1 tokens
        total += loss * n
        count += n
    loss = total / count
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
