"""FedKD-LoRA: a teacher fine-tuned on a public slice distils into LoRA students on clients.

Why it looks like this:
- The public slice is the first `kd.teacher_data_pct` of the pool left after the server's
  test split; `data.load_data` removes it from every client partition (in every arm
  of a comparison, so all arms train on the same private data).
- The teacher is trained where it is used, from public data only, and cached under
  $FEDTUNE_CACHE/teachers/<hash of everything it depends on>: in simulation one process
  trains it and every client reuses it; a SuperNode without the cache trains its own copy
  (same seed, same result). The teacher's weights never travel.
- The client's loss is (1 - lambda) * CE(student, labels)
  + lambda * T^2 * KL(softmax(teacher / T) || softmax(student / T)), over classes for
  sequence classification and over the vocabulary at every labelled token for causal LMs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fedtune import config as C, model as M, tasks
from fedtune.assets import cache_dir
from fedtune.config import Config
from fedtune.errors import KDError
from fedtune.evaluate import evaluate_task
from fedtune.files import atomic_folder
from fedtune.tasks import IGNORE
from fedtune.train import train_local

log = logging.getLogger(__name__)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    lam: float,
    causal: bool,
) -> torch.Tensor:
    """(1-lam) * CE + lam * T^2 * KL(p_teacher || p_student), both at temperature T.

    Sequence classification: logits [B, C], labels [B]. Causal LM: logits [B, L, V] and
    token labels [B, L] (-100 = no loss); position t predicts token t+1, and both terms
    average over the labelled tokens only.
    """
    s, t = student_logits.float(), teacher_logits.float()
    if causal:
        s, t, labels = s[:, :-1], t[:, :-1], labels[:, 1:]
        keep = labels != IGNORE
        s, t, labels = s[keep], t[keep], labels[keep]
    ce = F.cross_entropy(s, labels)
    kl = F.kl_div(
        F.log_softmax(s / temperature, -1),
        F.log_softmax(t / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )
    return (1 - lam) * ce + lam * temperature**2 * kl


def loss_fn(teacher, cfg: Config):
    """A `train_local` loss: the student's task loss blended with the teacher's soft labels."""
    causal = cfg.task.type != "sequence-classification"
    k = cfg.kd

    def compute(model, batch):
        inputs = {key: v for key, v in batch.items() if key != "labels"}
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits
        return kd_loss(
            model(**inputs).logits,
            teacher_logits,
            batch["labels"],
            k.temperature,
            k.lambda_,
            causal,
        )

    return compute


def teacher_config(cfg: Config) -> Config:
    """The teacher's recipe: full fine-tuning of `kd.teacher` on the public slice."""
    k = cfg.kd
    c = C.updated(cfg, "model", name=k.teacher or cfg.model.name, finetune="full", quantization="")
    return C.updated(
        c,
        "train",
        lr=k.teacher_lr,
        local_steps=0,
        local_epochs=k.teacher_epochs,
        batch_size=k.teacher_batch_size,
        grad_accum=1,
        early_stopping=C.EarlyStoppingConfig(),
    )


def teacher_key(cfg: Config) -> str:
    """Hash of everything the teacher depends on (model, public data, task, training)."""
    k = cfg.kd
    parts = {
        "teacher": k.teacher or cfg.model.name,
        "pct": k.teacher_data_pct,
        "epochs": k.teacher_epochs,
        "lr": k.teacher_lr,
        "batch": k.teacher_batch_size,
        # the arms of a comparison share one teacher: how they group clients is not part
        "data": {
            f: v
            for f, v in dataclasses.asdict(cfg.data).items()
            if f not in ("merge_partitions", "split_clients")
        },
        "task": dataclasses.asdict(cfg.task),
        "seed": cfg.train.seed,
        "precision": cfg.train.precision,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def teacher_dir(cfg: Config) -> Path:
    return cache_dir() / "teachers" / teacher_key(cfg)


def check_pair(cfg: Config, teacher_tokenizer, student_tokenizer) -> None:
    """Distillation compares outputs position by position: the vocabularies must agree."""
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise KDError(
            f"`kd.teacher` = {cfg.kd.teacher!r} and `model.name` = "
            f"{cfg.model.name!r} have different tokenizers "
            f"({len(teacher_tokenizer)} vs {len(student_tokenizer)} tokens); "
            "distillation needs the same vocabulary (choose a teacher of the same "
            "family)"
        )


def ensure_teacher(cfg: Config) -> Path:
    """The trained teacher's folder: from the cache, or trained now on the public slice."""
    target = teacher_dir(cfg)
    if (target / "config.json").exists():
        return target
    tcfg = teacher_config(cfg)
    check_pair(cfg, M.load_tokenizer(tcfg.model.name), M.load_tokenizer(cfg.model.name))
    test, _, _, public = tasks.load_task_data(cfg, with_public=True)
    tokenizer = M.load_tokenizer(tcfg.model.name)
    examples = tasks.encode(public, tokenizer, tcfg)
    model = M.load_model(tcfg)
    t0 = time.perf_counter()
    log.info(
        f"training the KD teacher {tcfg.model.name} on the public slice ({len(public)} "
        f"samples, {cfg.kd.teacher_epochs:g} epochs) -> {target}"
    )
    res = train_local(
        model,
        examples,
        tcfg.train,
        lr=tcfg.train.lr,
        proximal_mu=0.0,
        seed=cfg.train.seed,
        pad_id=tokenizer.pad_token_id,
        log_every=max(1, len(examples) // (4 * tcfg.train.batch_size)),
        log_prefix="teacher ",
    )
    seconds = time.perf_counter() - t0
    # how good is the teacher? (on the server's test split)
    test_metrics = evaluate_task(model, tokenizer, tcfg, *tasks.encode_test(test, tokenizer, tcfg))
    log.info(
        f"teacher trained in {seconds:.0f}s: "
        + " ".join(f"{k[5:]} {v:.4f}" for k, v in test_metrics.items() if k != "eval_seconds")
    )
    with atomic_folder(target, replace=False) as tmp:  # a concurrent trainer's is identical
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "fedtune-teacher.json").write_text(
            json.dumps(
                {
                    "key": teacher_key(cfg),
                    "teacher": tcfg.model.name,
                    "public_samples": len(public),
                    "steps": res.steps,
                    "train_loss": res.loss,
                    "seconds": seconds,
                    "test_metrics": test_metrics,
                },
                indent=2,
            )
            + "\n"
        )
    return target


def load_teacher(cfg: Config):
    """The teacher model (frozen, eval mode) for a client's distillation loss."""
    folder = ensure_teacher(cfg)
    tcfg = C.updated(teacher_config(cfg), "model", name=str(folder))
    teacher = M.load_model(tcfg).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
