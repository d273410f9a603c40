"""final/README.md: a model card that says what was trained, on what, how, and how to load it.

Why: PEFT's save_pretrained writes an empty template. A model shared from a run folder (or
pushed to the hub) should carry its base model, data, partitions, strategy, rounds and final
metrics, and the two lines that load it, taken from the run's own config and summary.
"""

from __future__ import annotations

from pathlib import Path

from fedtune import __version__, assets
from fedtune.config import Config
from fedtune.files import atomic_write_text
from fedtune.report.document import fmt

AUTO_CLASS = {  # (LoRA adapter, full model) loader per task family
    "sequence-classification": (
        "AutoPeftModelForSequenceClassification",
        "AutoModelForSequenceClassification",
    ),
    "causal": ("AutoPeftModelForCausalLM", "AutoModelForCausalLM"),
}


def model_card(cfg: Config, summary: dict, final: str | Path, local: str | None = None) -> str:
    """The card's text; `local`: the folder an offline:NAME base was loaded from here."""
    lora = cfg.model.finetune == "lora"
    family = "sequence-classification" if cfg.task.type == "sequence-classification" else "causal"
    cls = AUTO_CLASS[family][0 if lora else 1]
    module = "peft" if lora else "transformers"
    base = assets.hub_id(cfg.model.name)
    fed, metric = cfg.federation, summary.get("best_metric", "eval_loss")
    first, last = summary.get("initial") or {}, summary.get("final") or {}
    rows = [
        ("base model", f"`{base}`" + (f" (trained from the copy at `{local}`)" if local else "")),
        ("fine-tuning", f"{cfg.model.finetune}" + (f" (r {cfg.lora.r})" if lora else "")),
        ("task", cfg.task.type),
        ("data", f"`{cfg.data.source}`"),
        (
            "clients",
            f"{fed.num_clients}, {cfg.data.partitioner} partitions, fraction {fed.fraction}",
        ),
        ("strategy", cfg.strategy.name),
        ("rounds", f"{summary.get('rounds_completed')} (best: round {summary.get('best_round')})"),
        (f"{metric}, round 0 -> final", f"{fmt(first.get(metric))} -> {fmt(last.get(metric))}"),
        ("seed / config hash", f"{cfg.train.seed} / {cfg.hash()}"),
    ]
    offline_note = (
        f"\nWithout the hub, load the base from this machine's copy: "
        f'`PeftModel.from_pretrained({AUTO_CLASS[family][1]}.from_pretrained("{local}"), '
        f'"{final}")`.\n'
        if local and lora
        else ""
    )
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    tags = ["fedtune", "federated-learning", "flower"] + (["lora", "peft"] if lora else [])
    return f"""---
base_model: {base}
library_name: {module}
tags: [{", ".join(tags)}]
---
# {base.rsplit("/", 1)[-1]}, federated {cfg.model.finetune} fine-tuning

Trained with fedtune {__version__} on Flower: {fed.num_clients} clients
kept their data and trained locally; a server aggregated their updates each round.

| | |
|---|---|
{table}

## Load

```python
from {module} import {cls}
model = {cls}.from_pretrained("{final}")
```
{offline_note}"""


def write_model_card(cfg: Config, summary: dict, final: Path) -> Path:
    path = Path(final) / "README.md"
    offline = assets.is_offline(cfg.model.name)
    local = assets.resolve_model(cfg.model.name) if offline else None  # converted already
    atomic_write_text(path, model_card(cfg, summary, final, local))
    return path
