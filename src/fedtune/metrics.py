"""Pure metric functions: classification scores and ROUGE.

Why here and not `evaluate`/sklearn at run time: both numbers go into reports compared across
runs and papers, so they are pinned to the standard definitions (sklearn's MCC and macro-F1,
Google's `rouge_score`) and tested against them, without a heavy import on every client.
"""

from __future__ import annotations

import numpy as np


def _confusion(preds, labels) -> np.ndarray:
    """Confusion matrix [true, pred] over the union of the classes seen in either list."""
    classes = {c: i for i, c in enumerate(sorted(set(labels) | set(preds), key=repr))}
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(cm, ([classes[y] for y in labels], [classes[p] for p in preds]), 1)
    return cm


def classification_metrics(preds, labels) -> dict[str, float]:
    """Accuracy, macro-F1 (sklearn, zero_division=0) and Matthews correlation (multi-class R_K).

    MCC is 0.0 when undefined (e.g. a constant prediction), as in sklearn."""
    preds, labels = list(preds), list(labels)
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    if not labels:
        return {"accuracy": 0.0, "f1_macro": 0.0, "mcc": 0.0}
    cm = _confusion(preds, labels).astype(np.float64)
    tp = np.diag(cm)
    t, p = cm.sum(axis=1), cm.sum(axis=0)  # true and predicted counts per class
    s, c = cm.sum(), tp.sum()
    # F1 = 2tp / (2tp + fp + fn) = 2tp / (t + p); 0 where a class has neither
    denom = t + p
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    # Gorodkin's R_K: (c*s - t.p) / sqrt((s^2 - p.p) (s^2 - t.t))
    cov = c * s - t @ p
    var = (s * s - p @ p) * (s * s - t @ t)
    mcc = float(cov / np.sqrt(var)) if var > 0 else 0.0
    return {"accuracy": float(c / s), "f1_macro": float(f1.mean()), "mcc": mcc}


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions, references) -> dict[str, float]:
    """Mean per-example ROUGE F-measure, as HF `evaluate`'s "rouge" (no stemming).

    rougeLsum splits sentences on "\\n", so join sentences with newlines for summaries."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return {k: 0.0 for k in ROUGE_KEYS}
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=False)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # score(target, prediction)
        for k in ROUGE_KEYS:
            totals[k] += scores[k].fmeasure
    return {k: v / len(predictions) for k, v in totals.items()}
