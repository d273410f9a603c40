"""MMLU: the subject table, loading local files, the prompt, and scoring with forced models."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from fedtune.data import DataError
from fedtune.mmlu import SUBJECT_CATEGORY, category, evaluate_mmlu, format_prompt, load_questions


def test_subject_table_is_complete():
    assert len(SUBJECT_CATEGORY) == 57
    assert set(SUBJECT_CATEGORY.values()) == {"STEM", "humanities", "social sciences", "other"}
    assert Counter(SUBJECT_CATEGORY.values()) == {
        "STEM": 18,
        "humanities": 13,
        "social sciences": 12,
        "other": 14,
    }
    spot = {
        "anatomy": "other",
        "abstract_algebra": "STEM",
        "econometrics": "social sciences",
        "high_school_european_history": "humanities",
        "professional_law": "humanities",
        "professional_accounting": "other",
        "human_sexuality": "social sciences",
        "formal_logic": "humanities",
        "machine_learning": "STEM",
        "virology": "other",
    }
    assert {k: SUBJECT_CATEGORY[k] for k in spot} == spot
    assert category("not_a_subject") == "other"


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {
        "question": "2 + 2 = ?",
        "choices": ["3", "4", "5", "6"],
        "answer": 1,
        "subject": "elementary_mathematics",
    },
    {
        "question": "Capital of France?",
        "choices": ["Rome", "Paris", "Oslo", "Bern"],
        "answer": 1,
        "subject": "high_school_geography",
    },
    {
        "question": "Who wrote Hamlet?",
        "choices": ["Shakespeare", "Dante", "Homer", "Ovid"],
        "answer": 0,
        "subject": "high_school_european_history",
    },
    {
        "question": "H2O is?",
        "choices": ["salt", "water", "air", "gold"],
        "answer": 1,
        "subject": "high_school_chemistry",
    },
    {
        "question": "Largest planet?",
        "choices": ["Mars", "Venus", "Jupiter", "Earth"],
        "answer": 2,
        "subject": "astronomy",
    },
    {
        "question": "A bone of the leg?",
        "choices": ["femur", "ulna", "skull", "rib"],
        "answer": 0,
        "subject": "anatomy",
    },
]


def test_load_questions_int_and_letter_answers(tmp_path):
    ints = load_questions(str(_write(tmp_path / "int.jsonl", ROWS)))
    letters = [dict(r, answer="ABCD"[r["answer"]]) for r in ROWS]
    lets = load_questions(str(_write(tmp_path / "let.jsonl", letters)))
    assert ints == lets == ROWS
    no_subject = [{k: v for k, v in r.items() if k != "subject"} for r in ROWS[:2]]
    got = load_questions(str(_write(tmp_path / "nosub.jsonl", no_subject)))
    assert [q["subject"] for q in got] == ["unknown", "unknown"]


def test_load_questions_sample_is_seeded(tmp_path):
    src = str(_write(tmp_path / "q.jsonl", ROWS))
    a = load_questions(src, max_questions=3, seed=1)
    assert len(a) == 3 and a == load_questions(src, max_questions=3, seed=1)
    assert [ROWS.index(q) for q in a] == sorted(ROWS.index(q) for q in a)  # source order
    assert len(load_questions(src, max_questions=100)) == len(ROWS)


def test_load_questions_errors_name_the_problem(tmp_path):
    bad = [{"question": "q", "options": ["a", "b"], "label": 0}]
    with pytest.raises(
        DataError,
        match=r"lacks column\(s\) choices, answer; it has: "
        r"question, options, label",
    ):
        load_questions(str(_write(tmp_path / "bad.jsonl", bad)))
    out_of_range = [dict(ROWS[0], answer="E")]
    with pytest.raises(DataError, match="answer 'E' is not one of the 4 choices"):
        load_questions(str(_write(tmp_path / "e.jsonl", out_of_range)))


def test_format_prompt_is_the_standard_zero_shot_prompt():
    assert format_prompt(ROWS[0]) == (
        "The following are multiple choice questions (with answers) about elementary "
        "mathematics.\n\n2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )
    three = {"question": "Q?", "choices": ["x", "y", "z"], "answer": 0}
    assert format_prompt(three).endswith("Q?\nA. x\nB. y\nC. z\nAnswer:")


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer_dir):
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer.from_pretrained(gpt2_tokenizer_dir)


class Prefers(torch.nn.Module):
    """Puts a large logit on one token id at every position."""

    device = torch.device("cpu")

    def __init__(self, token_id: int, vocab: int):
        super().__init__()
        self.token_id, self.vocab = token_id, vocab

    def forward(self, input_ids, attention_mask=None, **kw):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token_id] = 10.0
        return SimpleNamespace(logits=logits)


def test_letter_mode_with_a_model_that_always_says_b(gpt2):
    (b,) = gpt2(" B", add_special_tokens=False)["input_ids"]
    res = evaluate_mmlu(Prefers(b, len(gpt2)), gpt2, ROWS, batch_size=4)
    assert res["mode"] == "letter" and res["num_questions"] == 6
    assert res["accuracy"] == pytest.approx(3 / 6)  # three answers are B
    assert res["by_subject"]["elementary_mathematics"] == {"accuracy": 1.0, "n": 1}
    assert res["by_subject"]["astronomy"] == {"accuracy": 0.0, "n": 1}
    assert res["by_category"] == {
        "STEM": {"accuracy": pytest.approx(2 / 3), "n": 3},  # math, chemistry, astronomy
        "humanities": {"accuracy": 0.0, "n": 1},
        "other": {"accuracy": 0.0, "n": 1},  # anatomy
        "social sciences": {"accuracy": 1.0, "n": 1},  # geography
    }


def test_choice_mode_scores_the_choice_text(gpt2):
    (water,) = gpt2(" water", add_special_tokens=False)["input_ids"]
    choices = ["sodium chloride", "water", "liquid nitrogen", "gold"]  # multi-token too
    qs = [dict(ROWS[3], choices=choices, answer=a) for a in range(4)]
    res = evaluate_mmlu(Prefers(water, len(gpt2)), gpt2, qs, mode="choice")
    assert res["mode"] == "choice"
    assert res["accuracy"] == pytest.approx(1 / 4)  # always picks "water" (index 1)
    assert res["by_subject"] == {"high_school_chemistry": {"accuracy": 0.25, "n": 4}}
    with pytest.raises(ValueError, match="unknown MMLU mode"):
        evaluate_mmlu(Prefers(water, len(gpt2)), gpt2, qs, mode="cloze")
