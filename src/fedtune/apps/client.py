"""Flower ClientApp: receive the global trainable tensors, train locally, reply with them.

The base model and the client's encoded examples are cached per process, keyed by what they
depend on: Ray keeps simulation actors alive across rounds, so each client loads weights
once, not every round. (Flower's deployment runtime starts a fresh process per message;
there the cache simply misses.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from pathlib import Path

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune import data, model as M, tasks
from fedtune.assets import cache_dir
from fedtune.apps import config_from_run_config
from fedtune.results import peak_rss_mb
from fedtune.train import train_local

log = logging.getLogger("fedtune")
app = ClientApp()

_MODELS: dict[str, tuple] = {}  # model+lora json -> (model, tokenizer)
_TEACHERS: dict[str, object] = {}  # teacher key -> frozen teacher (FedKD)
_EXAMPLES: dict[tuple, list] = {}  # (data, task, tokenizer, seed, clients, pid) -> examples


def _model_and_tokenizer(cfg):
    """(model, tokenizer, loaded_now): loaded once per process and experiment."""
    key = f"{cfg.model}{cfg.lora}{cfg.train.seed}"
    loaded_now = key not in _MODELS
    if loaded_now:
        _MODELS.clear()  # one model per process: a new experiment replaces the old one
        _MODELS[key] = (M.load_model(cfg), M.load_tokenizer(cfg.model.name))
    return (*_MODELS[key], loaded_now)


def _client_examples(cfg, pid: int, tokenizer, data_path: str = "") -> list[dict]:
    """This client's encoded examples: its partition of the shared source, or all of its
    own `data-path` (a SuperNode's local data). Cached in memory and on disk, because
    Flower's deployment runtime starts a fresh process for every message."""
    src = Path(cfg.data.source).expanduser()
    stamp = (src.stat().st_mtime_ns, src.stat().st_size) if src.exists() else None
    key = (repr(cfg.data), repr(cfg.task), stamp, cfg.model.name, cfg.train.seed,
           cfg.federation.num_clients, pid, data_path,
           cfg.kd.teacher_data_pct)  # the public slice is cut from the pool before partitioning
    if key not in _EXAMPLES:
        disk = cache_dir() / "examples" / (hashlib.sha256(repr(key).encode()).hexdigest()[:24]
                                         + ".pt")
        if disk.exists() and not data_path:  # a local folder may change; a partition won't
            _EXAMPLES[key] = torch.load(disk)
        else:
            required = tasks.required_columns(cfg)
            if data_path:
                part = data.load_source(dataclasses.replace(cfg.data, source=data_path),
                                        required)
                if len(part) == 0:
                    raise data.DataError(f"data-path {data_path} holds no samples")
            else:
                _, parts, _ = data.load_data(cfg)
                part = parts[pid]
            examples = tasks.encode(part, tokenizer, cfg)
            if not data_path:
                disk.parent.mkdir(parents=True, exist_ok=True)
                tmp = disk.with_suffix(f".tmp{os.getpid()}")
                torch.save(examples, tmp)
                os.replace(tmp, disk)
            _EXAMPLES[key] = examples
    return _EXAMPLES[key]


def process_age_seconds() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = config_from_run_config(context.run_config)
    pid = int(context.node_config["partition-id"])
    n = int(context.node_config.get("num-partitions", cfg.federation.num_clients))
    if n != cfg.federation.num_clients:
        raise ValueError(f"this SuperNode says num-partitions={n} but the recipe has "
                         f"federation.num_clients={cfg.federation.num_clients}")
    if cfg.federation.client_threads:
        torch.set_num_threads(cfg.federation.client_threads)
    process_age = process_age_seconds()  # in deployment: spawn + imports of this process
    t0 = time.perf_counter()
    model, tokenizer, loaded_now = _model_and_tokenizer(cfg)
    t1 = time.perf_counter()
    if not 0 <= pid < n:
        raise data.DataError(f"partition-id {pid} is outside 0..{n - 1}")
    examples = _client_examples(cfg, pid, tokenizer,
                                str(context.node_config.get("data-path", "")))
    t2 = time.perf_counter()

    loss_fn = None
    if cfg.kd.enabled:
        from fedtune import kd

        key = kd.teacher_key(cfg)
        if key not in _TEACHERS:
            _TEACHERS.clear()
            _TEACHERS[key] = kd.load_teacher(cfg)
        loss_fn = kd.loss_fn(_TEACHERS[key], cfg)
    M.load_trainable_state(model, M.from_arrays(msg.content["arrays"]))
    conf = msg.content["config"]
    rnd = int(conf["server-round"])
    result = train_local(
        model, examples, cfg.train, lr=float(conf["lr"]),
        proximal_mu=float(conf.get("proximal-mu", 0.0)),
        seed=cfg.train.seed * 100_003 + rnd * 1_009 + pid, pad_id=tokenizer.pad_token_id,
        loss_fn=loss_fn,
        log_every=max(1, cfg.train.local_steps // 4) if cfg.train.local_steps else 10,
        log=lambda s: print(f"[client {pid}] round {rnd} {s}", flush=True),
    )
    metrics = MetricRecord({
        "num-examples": len(examples),  # FedAvg weight: the client's data size in examples
        "train_loss": result.loss,
        "train_steps": result.steps,
        "train_samples": result.samples,
        "train_tokens": result.tokens,
        "train_seconds": result.seconds,
        "setup_seconds": t2 - t0,
        "model_load_seconds": t1 - t0,
        "data_seconds": t2 - t1,
        "process_age_seconds": process_age,
        "model_loaded": int(loaded_now),  # 0 when the process kept the model from an earlier round
        "peak_rss_mb": peak_rss_mb(),
        "partition_id": pid,
    })
    content = RecordDict({"arrays": M.to_arrays(model), "metrics": metrics})
    return Message(content=content, reply_to=msg)
