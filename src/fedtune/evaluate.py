"""Centralized evaluation, per task: what the server measures on its held-out split.

- causal-lm / instruction: token-weighted loss over the tokens that carry labels (every
  token of a block; only response tokens in SFT) and its perplexity;
- prompt-classification: the loss on the label tokens, accuracy by comparing the
  log-likelihood of every candidate label (exact and fast), and optionally accuracy and
  ROUGE of greedily generated text (what the seed report measured);
- sequence-classification: loss, accuracy, macro-F1 and Matthews correlation.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fedtune import checkpoint, config as C, mmlu, model as M, tasks
from fedtune.config import Config
from fedtune.errors import ConfigError
from fedtune.losses import causal_lm_loss_sum
from fedtune.metrics import classification_metrics, rouge
from fedtune.model import autocast
from fedtune.scoring import choose, generate_greedy, score_candidates
from fedtune.tasks import classification_prompt, collate, encode_completion, label_text

log = logging.getLogger(__name__)


def _batches(examples, batch_size, pad_id, device):
    for i in range(0, len(examples), batch_size):
        yield {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}


@torch.no_grad()
def eval_lm(
    model,
    examples: list[dict],
    batch_size: int,
    pad_id: int,
    precision: str = "fp32",
    fused: bool = True,
) -> dict:
    """Mean next-token cross-entropy over every labelled target token, and exp of it."""
    model.eval()
    total, count = 0.0, 0
    for batch in _batches(examples, batch_size, pad_id, model.device):
        with autocast(precision, model.device):
            loss_sum, n = causal_lm_loss_sum(model, batch, fused)
        total += loss_sum.item()
        count += n
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def eval_sequence_classification(
    model, examples: list[dict], batch_size: int, pad_id: int, precision: str = "fp32"
) -> dict:
    """Mean cross-entropy of the classifier, accuracy, macro-F1, Matthews correlation."""
    model.eval()
    total, preds, golds = 0.0, [], []
    for batch in _batches(examples, batch_size, pad_id, model.device):
        labels = batch.pop("labels")
        with autocast(precision, model.device):
            logits = model(**batch).logits.float()
        total += F.cross_entropy(logits, labels, reduction="sum").item()
        preds += logits.argmax(-1).tolist()
        golds += labels.tolist()
    m = classification_metrics(preds, golds)
    return {
        "eval_loss": total / len(golds),
        "eval_accuracy": m["accuracy"],
        "eval_f1_macro": m["f1_macro"],
        "eval_mcc": m["mcc"],
    }


def eval_prompt_classification(model, tokenizer, rows, examples: list[dict], cfg: Config) -> dict:
    """Label loss, log-likelihood accuracy, and (eval.generate) generation accuracy + ROUGE."""
    t, e, prec = cfg.task, cfg.eval, cfg.train.precision
    pad_id = tokenizer.pad_token_id
    out = eval_lm(model, examples, e.batch_size, pad_id, prec, cfg.train.fused_loss)
    out.pop("eval_ppl")
    prompts = [classification_prompt(r, t) for r in rows]
    golds = [ex["class_label"] for ex in examples]
    labels = [label_text(t, k) for k in range(len(t.label_names))]
    scores = score_candidates(
        model,
        tokenizer,
        prompts,
        [labels] * len(prompts),
        batch_size=e.batch_size,
        precision=prec,
        add_eos=True,
    )
    m = classification_metrics(choose(scores), golds)
    out.update(eval_accuracy=m["accuracy"], eval_f1_macro=m["f1_macro"], eval_mcc=m["mcc"])
    if e.generate:
        longest = max(len(encode_completion(tokenizer, x, add_eos=True)) for x in labels)
        texts = generate_greedy(
            model,
            tokenizer,
            prompts,
            e.max_new_tokens or longest + 2,
            batch_size=e.batch_size,
            precision=prec,
        )
        refs = [t.label_names[k] for k in golds]
        norm = [x.strip().lower() for x in texts]
        hits = sum(n == r.strip().lower() for n, r in zip(norm, refs))
        out["eval_gen_accuracy"] = hits / len(refs)
        out.update({f"eval_{k}": v for k, v in rouge(texts, refs).items()})
    return out


def evaluate_task(model, tokenizer, cfg: Config, rows, examples: list[dict]) -> dict:
    """The centralized metrics of `cfg.task.type` on the test rows and their examples."""
    kind, e = cfg.task.type, cfg.eval
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if kind == "sequence-classification":
        return eval_sequence_classification(
            model, examples, e.batch_size, pad_id, cfg.train.precision
        )
    if kind == "prompt-classification":
        return eval_prompt_classification(model, tokenizer, rows, examples, cfg)
    return eval_lm(model, examples, e.batch_size, pad_id, cfg.train.precision, cfg.train.fused_loss)


def run_suites(model, tokenizer, cfg: Config, out_dir, rnd) -> dict:
    """Benchmarks beyond the task's own test split (MMLU); details to eval/*.json."""
    out = {}
    if "mmlu" in cfg.eval.suites:
        e = cfg.eval
        questions = mmlu.load_questions(
            e.mmlu_source, e.mmlu_subset, e.mmlu_split, e.mmlu_max_questions, cfg.train.seed
        )
        t0 = time.perf_counter()
        res = mmlu.evaluate_mmlu(
            model, tokenizer, questions, e.batch_size, e.mmlu_mode, cfg.train.precision
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"mmlu-round-{rnd}.json").write_text(json.dumps(res, indent=2) + "\n")
        out.update(eval_mmlu_accuracy=res["accuracy"], eval_mmlu_seconds=time.perf_counter() - t0)
        for cat, v in res["by_category"].items():
            out[f"eval_mmlu_{cat.replace(' ', '_')}"] = v["accuracy"]
        log.info(
            f"round {rnd}: MMLU accuracy {res['accuracy']:.4f} on "
            f"{res['num_questions']} questions ({e.mmlu_mode} scoring)"
        )
    return out


def evaluate_saved(target: str, suites: list[str], overrides: list[str], out_dir=None) -> dict:
    """`fedtune eval`: a run folder's final model (its recipe rebuilds the model, the saved
    adapter or weights go in) or a base model by name/path, on benchmark suites and/or the
    recipe's own test split (`task`). Results go to OUT/eval/*.json and are returned."""
    run_dir = Path(target).expanduser()
    is_run = (run_dir / "config.toml").is_file()
    bench = [s for s in suites if s != "task"]
    sets = [*overrides] + ([f"eval.suites={json.dumps(bench)}"] if bench else [])
    if is_run:
        cfg = C.load(run_dir / "config.toml", sets)
        weights = run_dir / "final"
        if not weights.is_dir():
            raise ConfigError([f"{run_dir} has no final/ model yet (the run has not ended)"])
        out = Path(out_dir) if out_dir else run_dir
    else:
        cfg = C.load(None, sets + [f"model.name={target}", "model.finetune=full"])
        weights = None
        out = Path(out_dir or Path("runs") / ("eval-" + Path(target).name.replace(":", "-")))
    model = M.load_model(cfg)
    if weights is not None:
        checkpoint.load_weights(model, weights, cfg.model.finetune)
    tokenizer = M.load_tokenizer(cfg.model.name)
    result = {"target": str(target), "model": cfg.model.name, "trained": weights is not None}
    if "task" in suites:
        test, _, _ = tasks.load_task_data(cfg)
        rows, examples = tasks.encode_test(test, tokenizer, cfg)
        result["task"] = evaluate_task(model, tokenizer, cfg, rows, examples)
    if bench:
        result.update(run_suites(model, tokenizer, cfg, out / "eval", "final"))
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
