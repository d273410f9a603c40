"""Independent recomputations for tests: plain torch and stock Hugging Face/PEFT classes,
one example at a time, none of fedtune's evaluation code. A test compares fedtune's numbers
with these, so a bug in batching, padding, masking or scoring cannot hide."""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F


@torch.no_grad()
def token_loss(model, examples: list[dict], precision: str = "fp32") -> float:
    """Mean next-token cross-entropy over every labelled token, one example at a time."""
    model.eval()
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor([ex.get("labels", ex["input_ids"])])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=ids).logits.float()
        targets = labels[0, 1:]
        keep = targets != -100
        total += F.cross_entropy(logits[0, :-1][keep], targets[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / count


@torch.no_grad()
def completion_logprob(
    model, prompt_ids: list[int], completion_ids: list[int], precision: str = "fp32"
) -> float:
    """log p(completion | prompt), summed over the completion's tokens."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(input_ids=ids).logits
    logp = logits[0].float().log_softmax(-1)
    return sum(logp[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(completion_ids))


@torch.no_grad()
def greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """Greedy decoding without a KV cache: the whole sequence is re-read at every step."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt in eos_ids:
            break
        ids.append(nxt)
    return ids[len(prompt_ids) :]


def prompt_ids(tok, text: str) -> list[int]:
    """The prompt's tokens with the tokenizer's leading specials, never a trailing EOS."""
    ids = tok(text)["input_ids"]
    appends_eos = tok.eos_token_id is not None and tok("a")["input_ids"][-1] == tok.eos_token_id
    return ids[:-1] if appends_eos else ids


def letter_accuracy(
    model, tok, questions: list[dict], prompts: list[str], precision: str = "fp32"
) -> float:
    """MMLU letter scoring: the letter among " A".." D" with the highest probability after
    the prompt, compared with the answer index."""
    right = 0
    for q, text in zip(questions, prompts):
        p = prompt_ids(tok, text)
        scores = [
            completion_logprob(
                model, p, tok(" " + "ABCDEFGH"[i], add_special_tokens=False)["input_ids"], precision
            )
            for i in range(len(q["choices"]))
        ]
        right += max(range(len(scores)), key=scores.__getitem__) == q["answer"]
    return right / len(questions)


def unpacked_bytes(record) -> int:
    """An ArrayRecord's count_bytes() as if no Array were zlib-packed (stype "...+zlib")."""
    return sum(
        len(key) + len(zlib.decompress(a.data) if a.stype.endswith("+zlib") else a.data)
        for key, a in record.items()
    )


def unpacked(record):
    """The record with every zlib-packed Array replaced by its plain bytes (the largest a
    packed record of these shapes can be)."""
    from flwr.app import Array, ArrayRecord

    out = ArrayRecord()
    for key, a in record.items():
        if a.stype.endswith("+zlib"):
            a = Array(
                dtype=a.dtype,
                shape=a.shape,
                stype=a.stype[: -len("+zlib")],
                data=zlib.decompress(a.data),
            )
        out[key] = a
    return out
