"""Metrics agree with sklearn and with ROUGE computed by hand."""

from __future__ import annotations

import math

import pytest
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from fedtune.metrics import classification_metrics, rouge

CASES = {
    "binary": ([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], [1, 0, 0, 1, 0, 1, 1, 0, 0, 1]),
    "3-class": ([0, 2, 1, 1, 0, 2, 2, 1, 0, 0, 1, 2], [0, 1, 1, 2, 0, 2, 2, 0, 0, 1, 1, 2]),
    "constant": ([1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0]),
    # a predicted class that never occurs in the labels still counts in macro-F1
    "extra-pred": ([0, 1, 3, 1, 0, 3], [0, 1, 2, 1, 2, 0]),
    "strings": (["neg", "pos", "pos", "neu"], ["neg", "pos", "neu", "neu"]),
}


@pytest.mark.parametrize("name", CASES)
def test_classification_matches_sklearn(name):
    preds, labels = CASES[name]
    got = classification_metrics(preds, labels)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert got["f1_macro"] == pytest.approx(
        f1_score(labels, preds, average="macro", zero_division=0)
    )
    assert got["mcc"] == pytest.approx(matthews_corrcoef(labels, preds))


def test_constant_prediction_has_zero_mcc_and_empty_is_zero():
    assert classification_metrics([1] * 6, [0, 1, 0, 1, 1, 0])["mcc"] == 0.0
    assert classification_metrics([], []) == {"accuracy": 0.0, "f1_macro": 0.0, "mcc": 0.0}
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        classification_metrics([0, 1], [0])


def test_rouge_by_hand():
    # "not equivalent" vs "equivalent": unigrams P = 1/2, R = 1; no shared bigram
    got = rouge(["not equivalent"], ["equivalent"])
    assert got["rouge1"] == pytest.approx(2 * (0.5 * 1) / (0.5 + 1))
    assert got["rouge2"] == 0.0
    assert got["rougeL"] == pytest.approx(2 / 3)

    # "the cat sat on the mat" vs "the cat lay on the mat": 5/6 unigrams, bigrams
    # (the cat), (on the), (the mat) shared out of 5 each; mean over the two pairs with
    # a perfect second pair
    got = rouge(
        ["the cat sat on the mat", "hello world"], ["the cat lay on the mat", "hello world"]
    )
    assert got["rouge1"] == pytest.approx((5 / 6 + 1) / 2)
    assert got["rouge2"] == pytest.approx((3 / 5 + 1) / 2)


def test_rouge_lsum_splits_sentences_on_newlines():
    # one line: LCS of "a b c d" vs "c d a b" is 2 tokens; two lines: each sentence matches
    flat = rouge(["a b c d"], ["c d a b"])
    lines = rouge(["a b\nc d"], ["c d\na b"])
    assert flat["rougeLsum"] == pytest.approx(0.5)
    assert lines["rougeLsum"] == pytest.approx(1.0)
    assert lines["rougeL"] == pytest.approx(0.5)


def test_rouge_empty_lists_are_zero():
    assert rouge([], []) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0}
    assert not any(math.isnan(v) for v in rouge([""], ["x"]).values())
