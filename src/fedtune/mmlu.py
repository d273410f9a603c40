"""MMLU-style multiple-choice evaluation by log-likelihood (zero-shot).

Why log-likelihood and not generation: small models rarely answer in the expected format,
so the model's probability of each answer is read directly (" A".." D" in `letter` mode, the
text of each choice in `choice` mode) and the most likely one is its answer.
"""

from __future__ import annotations

import random
import string
from collections import defaultdict

from fedtune.config import DataConfig
from fedtune.data import load_source
from fedtune.errors import DataError
from fedtune.scoring import choose, score_candidates

# hendrycks/test categories.py: subject -> subcategory, subcategory -> category
_SUBCATEGORY = {
    "abstract_algebra": "math",
    "anatomy": "health",
    "astronomy": "physics",
    "business_ethics": "business",
    "clinical_knowledge": "health",
    "college_biology": "biology",
    "college_chemistry": "chemistry",
    "college_computer_science": "computer science",
    "college_mathematics": "math",
    "college_medicine": "health",
    "college_physics": "physics",
    "computer_security": "computer science",
    "conceptual_physics": "physics",
    "econometrics": "economics",
    "electrical_engineering": "engineering",
    "elementary_mathematics": "math",
    "formal_logic": "philosophy",
    "global_facts": "other",
    "high_school_biology": "biology",
    "high_school_chemistry": "chemistry",
    "high_school_computer_science": "computer science",
    "high_school_european_history": "history",
    "high_school_geography": "geography",
    "high_school_government_and_politics": "politics",
    "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math",
    "high_school_microeconomics": "economics",
    "high_school_physics": "physics",
    "high_school_psychology": "psychology",
    "high_school_statistics": "math",
    "high_school_us_history": "history",
    "high_school_world_history": "history",
    "human_aging": "health",
    "human_sexuality": "culture",
    "international_law": "law",
    "jurisprudence": "law",
    "logical_fallacies": "philosophy",
    "machine_learning": "computer science",
    "management": "business",
    "marketing": "business",
    "medical_genetics": "health",
    "miscellaneous": "other",
    "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy",
    "nutrition": "health",
    "philosophy": "philosophy",
    "prehistory": "history",
    "professional_accounting": "other",
    "professional_law": "law",
    "professional_medicine": "health",
    "professional_psychology": "psychology",
    "public_relations": "politics",
    "security_studies": "politics",
    "sociology": "culture",
    "us_foreign_policy": "politics",
    "virology": "health",
    "world_religions": "philosophy",
}
_CATEGORY = {
    "STEM": ("physics", "chemistry", "biology", "computer science", "math", "engineering"),
    "humanities": ("history", "philosophy", "law"),
    "social sciences": ("politics", "culture", "economics", "geography", "psychology"),
    "other": ("other", "business", "health"),
}
SUBJECT_CATEGORY = {
    subject: cat
    for subject, sub in _SUBCATEGORY.items()
    for cat, subs in _CATEGORY.items()
    if sub in subs
}
LETTERS = string.ascii_uppercase
REQUIRED = ("question", "choices", "answer")


def category(subject: str) -> str:
    return SUBJECT_CATEGORY.get(subject, "other")


def _answer_index(answer, n_choices: int, where: str) -> int:
    """An int index, or a letter "A".."Z" (or a digit string)."""
    a = answer.strip() if isinstance(answer, str) else answer
    if isinstance(a, str) and not a.isdigit():
        idx = LETTERS.find(a.upper()) if len(a) == 1 else -1
    else:
        try:
            idx = int(a)
        except (TypeError, ValueError):
            idx = -1
    if not 0 <= idx < n_choices:
        raise DataError(f"{where}: answer {answer!r} is not one of the {n_choices} choices")
    return idx


def load_questions(
    source: str, subset: str = "all", split: str = "test", max_questions: int = 0, seed: int = 0
) -> list[dict]:
    """Rows {question, choices, answer (int), subject} from a hub id (e.g. cais/mmlu), a local
    .jsonl/.json/.csv/.parquet file, or offline:NAME. `max_questions` > 0 keeps a seeded
    random sample (in source order, so subjects stay grouped)."""
    ds = load_source(DataConfig(source=source, subset=subset, split=split), required=())
    missing = [c for c in REQUIRED if c not in ds.column_names]
    if missing:
        raise DataError(
            f"MMLU source {source!r} lacks column(s) {', '.join(missing)}; it has: "
            f"{', '.join(ds.column_names)} (needed: question, choices, answer "
            "and optionally subject)"
        )
    indices = list(range(len(ds)))
    if 0 < max_questions < len(ds):
        indices = sorted(random.Random(seed).sample(indices, max_questions))
    rows = ds.select(indices) if len(indices) < len(ds) else ds
    out = []
    for n, row in enumerate(rows):
        choices = row["choices"]
        if not isinstance(choices, (list, tuple)) or len(choices) < 2:
            raise DataError(
                f"{source!r} row {indices[n]}: `choices` must be a list of at "
                f"least 2 strings, got {choices!r}"
            )
        out.append(
            {
                "question": str(row["question"]),
                "choices": [str(c) for c in choices],
                "answer": _answer_index(
                    row["answer"], len(choices), f"{source!r} row {indices[n]}"
                ),
                "subject": str(row.get("subject") or "unknown"),
            }
        )
    return out


def format_prompt(q: dict) -> str:
    """The standard zero-shot MMLU prompt (hendrycks/test), ending in "Answer:"."""
    subject = q.get("subject") or "unknown"
    about = "" if subject == "unknown" else " about " + subject.replace("_", " ")
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(q["choices"]))
    return (
        f"The following are multiple choice questions (with answers){about}.\n\n"
        f"{q['question']}{options}\nAnswer:"
    )


def _accuracy_table(groups: dict[str, list[bool]]) -> dict[str, dict]:
    return {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}


def evaluate_mmlu(
    model,
    tokenizer,
    questions: list[dict],
    batch_size: int = 8,
    mode: str = "letter",
    precision: str = "fp32",
) -> dict:
    """Zero-shot accuracy: overall (micro, over questions), per subject and per category.

    `letter` scores " A", " B", ... after the prompt; `choice` scores " " + each choice's
    text (summed log-probability, so it favours short choices)."""
    if mode not in ("letter", "choice"):
        raise ValueError(f"unknown MMLU mode {mode!r}; use 'letter' or 'choice'")
    prompts = [format_prompt(q) for q in questions]
    if mode == "letter":
        candidates = [[" " + LETTERS[i] for i in range(len(q["choices"]))] for q in questions]
    else:
        candidates = [[" " + c for c in q["choices"]] for q in questions]
    picks = choose(
        score_candidates(
            model, tokenizer, prompts, candidates, batch_size=batch_size, precision=precision
        )
    )
    by_subject, by_category = defaultdict(list), defaultdict(list)
    for q, pick in zip(questions, picks):
        subject = q.get("subject") or "unknown"
        by_subject[subject].append(pick == q["answer"])
        by_category[category(subject)].append(pick == q["answer"])
    correct = sum(sum(v) for v in by_subject.values())
    return {
        "accuracy": correct / len(questions) if questions else 0.0,
        "num_questions": len(questions),
        "by_subject": _accuracy_table(by_subject),
        "by_category": _accuracy_table(by_category),
        "mode": mode,
    }
