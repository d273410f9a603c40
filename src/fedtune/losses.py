"""The causal-LM loss without the full logits: the head runs only where a label is.

Why: `model(**batch).loss` multiplies every position's hidden state by the 49,152 x 576
output embedding of SmolLM2 (a [B*T, V] fp32 tensor, ~20% of the step) and then throws
away the positions whose label is masked (the prompt in instruction tuning, everything but
the label in prompt classification). Here the backbone runs as usual, the hidden states are
gathered at the positions whose next token is a target, and a fused linear + cross-entropy
walks them in chunks, so no [N, V] tensor larger than one chunk ever exists. Gradients of
the hidden states (and of the head, when it trains) are computed in the forward pass, chunk
by chunk, and scaled in backward: the method of Liger's fused linear cross-entropy.

The result equals transformers' `ForCausalLMLoss` (mean over the targets) to float
rounding. Models whose head is not a plain linear map (logit soft-capping, logit scaling, a
LoRA-wrapped head) or which have no separate backbone fall back to `model(**batch).loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedtune.tasks import IGNORE

CHUNK_ELEMENTS = 2**23  # logits per chunk: 8 M fp32 values, 32 MiB (170 rows of SmolLM2)
_NOT_PLAIN = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype autocast would give the head's matmul (the model's own path does the same)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def _chunked(h, weight, bias, targets, chunk_rows: int, dtype: torch.dtype, need):
    """The loss sum and, for the inputs flagged in `need` (h, weight, bias), the gradients
    of that sum, one chunk of rows at a time."""
    need_h, need_w, need_b = need
    grad_h = torch.empty_like(h, dtype=torch.float32) if need_h else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
    grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], chunk_rows):
        hc = h[start : start + chunk_rows].to(dtype)
        yc = targets[start : start + chunk_rows]
        logits = (hc @ w.T if b is None else torch.addmm(b, hc, w.T)).float()
        lse = torch.logsumexp(logits, dim=-1)
        total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
        if not any(need):
            continue
        # d CE / d logits = softmax - onehot, built in place in the logits' buffer
        grad = logits.sub_(lse[:, None]).exp_()
        grad[torch.arange(len(yc), device=grad.device), yc] -= 1.0
        g = grad.to(dtype)
        if need_h:
            grad_h[start : start + chunk_rows] = g @ w
        if need_w:
            grad_w += (g.T @ hc).float()
        if need_b:
            grad_b += grad.sum(0)
    return total, (grad_h, grad_w, grad_b)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W.T + b, y_i) over N rows, chunked; returns a 0-d fp32 sum. The
    gradients are computed in forward (each chunk's logits are freed at once) and only
    scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_rows: int, dtype: torch.dtype):
        need = ctx.needs_input_grad[:3]
        total, grads = _chunked(h, weight, bias, targets, chunk_rows, dtype, need)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads = []
        for g, dt in zip(ctx.saved_tensors, ctx.dtypes):
            grads.append(None if g is None else (g * grad_out).to(dt))
        return grads[0], grads[1], grads[2], None, None, None


def linear_cross_entropy(h, weight, bias, targets) -> torch.Tensor:
    """Sum of cross-entropies of the rows of `h` through the head (weight [V, d], bias).
    Without autograd (evaluation) no gradient is computed, even for trainable weights."""
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    dtype = _compute_dtype(h.device.type, h.dtype)
    if not torch.is_grad_enabled():
        return _chunked(h, weight, bias, targets, rows, dtype, (False, False, False))[0]
    return LinearCrossEntropy.apply(h, weight, bias, targets, rows, dtype)


def split_head(model):
    """(backbone, head) of a causal LM (PEFT-wrapped or not), or None where the head's
    output is not the plain linear map the fused loss reproduces."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    config = getattr(base, "config", None)
    if head is None or backbone is None or type(head) is not torch.nn.Linear:
        return None
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in _NOT_PLAIN):
        return None
    return backbone, head


def causal_lm_loss_sum(model, batch: dict, fused: bool = True) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over the batch's targets, number of targets)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    parts = split_head(model) if fused else None
    if parts is None:  # the model's own logits (soft-capped, scaled, ... as it defines them)
        logits = model(**inputs).logits[:, :-1]
        total = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        return total, int(keep.sum())
    backbone, head = parts
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    h = hidden[:, :-1][keep]
    if h.shape[0] == 0:  # no target: a zero that still reaches the graph
        return hidden.sum() * 0.0, 0
    return linear_cross_entropy(h, head.weight, head.bias, labels[keep]), h.shape[0]


def causal_lm_loss(model, batch: dict, fused: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's targets, as `model(**batch).loss`
    (0, not NaN, for a batch without targets)."""
    total, count = causal_lm_loss_sum(model, batch, fused)
    return total / max(count, 1)


def task_loss(model, batch: dict, fused: bool = True) -> torch.Tensor:
    """The training loss of a batch: causal LMs (labels [B, T]) through the fused head,
    classifiers (labels [B]) through the model's own loss."""
    if batch["labels"].dim() == 1:
        return model(**batch).loss
    return causal_lm_loss(model, batch, fused)
