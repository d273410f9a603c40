"""What a client process keeps between messages: one explicit cache, keyed by dependencies.

Why: Ray keeps simulation actors alive across rounds, so a client should load the base
model once, not every round; but one actor serves many clients and, in a long-lived
process, several experiments one after another. Every entry is therefore keyed by
everything it was built from (a model by its model, LoRA and task settings and the seed;
examples by their data, task, tokenizer and partition), and a kind keeps at most `keep`
entries, newest first. Flower's deployment runtime starts a fresh process per message:
there the cache simply misses (the examples also live on disk, see `tasks.client_examples`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict

from fedtune.config import Config


class ProcessCache:
    def __init__(self):
        self._kinds: dict[str, OrderedDict] = {}

    def get(self, kind: str, key, build: Callable, keep: int = 1) -> tuple[object, bool]:
        """(the entry for `key`, whether it was built just now)."""
        entries = self._kinds.setdefault(kind, OrderedDict())
        if key in entries:
            entries.move_to_end(key)
            return entries[key], False
        while len(entries) >= keep:
            entries.popitem(last=False)
        entries[key] = build()
        return entries[key], True

    def clear(self) -> None:
        self._kinds.clear()


def model_key(cfg: Config) -> str:
    """Everything `model.load_model` builds from: the base model and dtype, LoRA, the task
    (causal LM or a classifier with its labels: another class and head) and the seed."""
    return json.dumps(
        {
            "model": asdict(cfg.model),
            "lora": asdict(cfg.lora),
            "task": cfg.task.type,
            "labels": cfg.task.label_names,
            "seed": cfg.train.seed,
        },
        sort_keys=True,
    )


CACHE = ProcessCache()
