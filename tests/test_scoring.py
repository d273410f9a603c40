"""Log-likelihood scoring and greedy decoding: exact values on a forced model, padding
invariance and batch invariance on a tiny real Llama."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fedtune.scoring import choose, generate_greedy, score_candidates
from fedtune.tasks import encode_completion, encode_prompt

V, BIG, EOS = 128, 10.0, 0


class CharTokenizer:
    """One token per ASCII character; EOS = 0. `append_eos` mimics tokenizers that add one."""

    def __init__(self, append_eos=False, bos=None):
        self.append_eos, self.bos = append_eos, bos
        self.eos_token_id, self.pad_token_id, self.eos_token = EOS, None, "\0"

    def __call__(self, text, add_special_tokens=True, **kw):
        ids = [ord(ch) for ch in text]
        if add_special_tokens:
            ids = ([self.bos] if self.bos is not None else []) + ids
            ids += [EOS] if self.append_eos else []
        return {"input_ids": ids}


class SuccessorModel(torch.nn.Module):
    """Always puts logit BIG on (previous token + 1): "ab" is followed by "cde..."."""

    device = torch.device("cpu")

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, **kw):
        self.calls += 1
        nxt = (input_ids + 1) % V
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, V).float() * BIG)


HIT = BIG - math.log(math.exp(BIG) + V - 1)  # log p of the forced token
MISS = -math.log(math.exp(BIG) + V - 1)  # log p of any other token


def test_encoding_rule():
    assert encode_prompt(CharTokenizer(), "ab") == [97, 98]
    assert encode_prompt(CharTokenizer(append_eos=True, bos=1), "ab") == [1, 97, 98]
    assert encode_completion(CharTokenizer(bos=1), "cd", add_eos=False) == [99, 100]
    assert encode_completion(CharTokenizer(bos=1), "cd", add_eos=True) == [99, 100, EOS]


def test_forced_model_multi_token_candidates_of_different_lengths():
    model = SuccessorModel()
    prompts = ["ab", "wxyz0", "k"]
    cands = [["cde", "x", "cx", "dc", ""], ["12", "1", "a"], ["lmnop", "lmnoq"]]
    got = score_candidates(model, CharTokenizer(), prompts, cands, batch_size=2)
    want = [
        [3 * HIT, MISS, HIT + MISS, 2 * MISS, 0.0],
        [2 * HIT, HIT, MISS],
        [5 * HIT, 4 * HIT + MISS],
    ]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-5)
    assert choose(got) == [4, 1, 0]  # the empty candidate (log 1) beats the rest
    assert choose([s[:4] for s in got[:1]]) == [0]


def test_forced_model_add_eos_scores_the_eos_token():
    got = score_candidates(SuccessorModel(), CharTokenizer(), ["ab"], [["c", "x"]], add_eos=True)
    assert got[0] == pytest.approx([HIT + MISS, 2 * MISS], abs=1e-5)


def test_forced_model_single_tokens_take_the_fast_path():
    model = SuccessorModel()
    prompts = ["ab", "hello", "q", "xy"]
    got = score_candidates(
        model,
        CharTokenizer(bos=1),
        prompts,
        [["c", "d", "b"], ["p", "m"], ["r", "s"], ["z", "y"]],
        batch_size=3,
    )
    assert model.calls == 2  # one pass per prompt, in batches of 3
    assert got == [
        pytest.approx(v, abs=1e-5)
        for v in ([HIT, MISS, MISS], [HIT, MISS], [HIT, MISS], [HIT, MISS])
    ]
    assert choose(got) == [0, 0, 0, 0]


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="encodes to no tokens"):
        score_candidates(SuccessorModel(), CharTokenizer(), [""], [["a"]])


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _alone(model, tok, prompt, cand):
    """Reference: one unpadded sequence, a plain forward pass, gather the targets."""
    p = encode_prompt(tok, prompt)
    ids = p + encode_completion(tok, cand, add_eos=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = logits[:-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logp[len(p) - 1 :].sum().item()


PROMPTS = [
    "Question: is the sky blue?\nAnswer:",
    "Hi",
    "def f(x):\n    return x +",
    "One two three four five six seven eight nine ten eleven",
]


def test_padding_invariance_generic_path(tiny):
    model, tok = tiny
    cands = [
        [" yes", " no, it is green today"],
        [" there", " you"],
        [" 1", " y * 2"],
        [" twelve", " thirteen fourteen"],
    ]
    got = score_candidates(model, tok, PROMPTS, cands, batch_size=3)
    for prompt, cs, row in zip(PROMPTS, cands, got):
        assert row == pytest.approx([_alone(model, tok, prompt, c) for c in cs], abs=1e-4)


def test_padding_invariance_fast_path(tiny):
    model, tok = tiny
    cands = [[" A", " B", " C", " D"]] * len(PROMPTS)
    assert all(len(encode_completion(tok, c, False)) == 1 for c in cands[0])
    got = score_candidates(model, tok, PROMPTS, cands, batch_size=4)
    for prompt, cs, row in zip(PROMPTS, cands, got):
        assert row == pytest.approx([_alone(model, tok, prompt, c) for c in cs], abs=1e-4)


def test_generate_greedy_batched_equals_one_at_a_time(tiny):
    model, tok = tiny
    side = tok.padding_side
    batched = generate_greedy(model, tok, PROMPTS, max_new_tokens=6, batch_size=4)
    alone = [generate_greedy(model, tok, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == alone
    assert any(batched)
    assert tok.padding_side == side
