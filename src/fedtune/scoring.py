"""Score candidate completions by log-likelihood, and decode greedily, with a causal LM.

Scoring uses training's own tokenization rule (`tasks.encode_prompt` +
`tasks.encode_completion`), so the tokens scored at evaluation are exactly the tokens the
model was trained to produce.
"""

from __future__ import annotations

import inspect

import torch

from fedtune.model import autocast
from fedtune.tasks import encode_completion, encode_prompt


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def _keeps_logits(model) -> bool:
    """Can the model return logits for the last positions only (saves a [B, T, vocab] tensor)?"""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _right_padded(seqs: list[list[int]], pad: int, device):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _logits_from(model, seqs, pad, first_pos, precision):
    """Forward a right-padded batch; return (logits, offset) where logits[:, i] is position
    i + offset. Only positions >= first_pos are needed, so only those are kept if possible."""
    ids, mask = _right_padded(seqs, pad, model.device)
    kw = {"logits_to_keep": ids.shape[1] - first_pos} if _keeps_logits(model) else {}
    with autocast(precision, model.device):
        logits = model(input_ids=ids, attention_mask=mask, **kw).logits
    return ids, logits, ids.shape[1] - logits.shape[1]


def _batches(order: list[int], batch_size: int):
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


@torch.no_grad()
def score_candidates(
    model,
    tokenizer,
    prompts: list[str],
    candidates: list[list[str]],
    batch_size: int = 8,
    precision: str = "fp32",
    add_eos: bool = False,
) -> list[list[float]]:
    """Summed log-probability of each candidate's tokens given its prompt (teacher forcing).

    Right padding keeps every real token at its unpadded position, so the scores do not
    depend on the batch. When every candidate is one token (MMLU's " A".." D"), one forward
    pass per prompt reads them all from the last prompt position."""
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    model.eval()
    pad = _pad_id(tokenizer)
    p_ids = [encode_prompt(tokenizer, p) for p in prompts]
    for p, ids in zip(prompts, p_ids):
        if not ids:
            raise ValueError(
                f"prompt {p!r} encodes to no tokens: the first completion token "
                "would have no context to be scored from"
            )
    c_ids = [[encode_completion(tokenizer, c, add_eos) for c in cs] for cs in candidates]
    scores = [[0.0] * len(cs) for cs in candidates]

    if all(len(c) == 1 for cs in c_ids for c in cs):  # fast path: one pass per prompt
        order = sorted(range(len(prompts)), key=lambda i: -len(p_ids[i]))
        for batch in _batches(order, batch_size):
            seqs = [p_ids[i] for i in batch]
            _, logits, off = _logits_from(model, seqs, pad, min(map(len, seqs)) - 1, precision)
            for r, i in enumerate(batch):
                logp = logits[r, len(p_ids[i]) - 1 - off].float().log_softmax(-1)
                scores[i] = [logp[c[0]].item() for c in c_ids[i]]
        return scores

    items = [(i, j) for i, cs in enumerate(c_ids) for j in range(len(cs))]
    seqs = [p_ids[i] + c_ids[i][j] for i, j in items]
    order = sorted(range(len(items)), key=lambda k: -len(seqs[k]))  # longest first: OOM early
    for batch in _batches(order, batch_size):
        starts = [len(p_ids[items[k][0]]) for k in batch]  # position of the first target
        ids, logits, off = _logits_from(
            model, [seqs[k] for k in batch], pad, min(starts) - 1, precision
        )
        for r, k in enumerate(batch):
            start, end = starts[r], len(seqs[k])
            if end == start:  # empty candidate: log 1
                continue
            logp = logits[r, start - 1 - off : end - 1 - off].float().log_softmax(-1)
            target = ids[r, start:end, None]
            i, j = items[k]
            scores[i][j] = logp.gather(1, target).sum().item()
    return scores


def choose(scores: list[list[float]]) -> list[int]:
    """Index of the best-scoring candidate of each prompt (first one on ties)."""
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def _eos_ids(model, tokenizer) -> list[int]:
    """Tokenizer EOS plus the model's generation EOS ids (chat models often add <|im_end|>)."""
    ids = [tokenizer.eos_token_id]
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [extra]
    return sorted({i for i in ids if i is not None})


@torch.no_grad()
def generate_greedy(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 8,
    precision: str = "fp32",
) -> list[str]:
    """Greedy continuation of each prompt (new text only, specials dropped, stripped).

    Prompts are encoded with `encode_prompt` (as in training) and LEFT-padded here, so every
    row's next token comes from the same last position; the tokenizer is left untouched."""
    model.eval()
    pad = _pad_id(tokenizer)
    eos = _eos_ids(model, tokenizer)
    enc = [encode_prompt(tokenizer, p) for p in prompts]
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(enc[i]))
    for batch in _batches(order, batch_size):
        width = max(len(enc[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, width - len(enc[i]) :] = torch.tensor(enc[i], dtype=torch.long)
            mask[r, width - len(enc[i]) :] = 1
        with autocast(precision, model.device):
            gen = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,  # load_model turns the cache off for training
                pad_token_id=pad,
                eos_token_id=eos or None,
            )
        for r, i in enumerate(batch):
            out[i] = tokenizer.decode(gen[r, width:], skip_special_tokens=True).strip()
    return out
