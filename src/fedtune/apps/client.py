"""Flower ClientApp: receive the global trainable tensors, train locally, reply with them.

The base model and the client's tokenized blocks are cached per process, keyed by what they
depend on: Ray keeps simulation actors alive across rounds, so each client loads weights
once, not every round. (Flower's deployment runtime starts a fresh process per message;
there the cache simply misses.)
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune import data, model as M
from fedtune.apps import config_from_run_config
from fedtune.results import peak_rss_mb
from fedtune.train import train_local

log = logging.getLogger("fedtune")
app = ClientApp()

_MODELS: dict[str, tuple] = {}  # model+lora json -> (model, tokenizer)
_BLOCKS: dict[tuple, torch.Tensor] = {}  # (data json, tokenizer, seed, clients, pid) -> blocks


def _model_and_tokenizer(cfg):
    """(model, tokenizer, loaded_now): loaded once per process and experiment."""
    key = f"{cfg.model}{cfg.lora}{cfg.train.seed}"
    loaded_now = key not in _MODELS
    if loaded_now:
        _MODELS.clear()  # one model per process: a new experiment replaces the old one
        _MODELS[key] = (M.load_model(cfg), M.load_tokenizer(cfg.model.name))
    return (*_MODELS[key], loaded_now)


def _client_blocks(cfg, pid: int, tokenizer) -> torch.Tensor:
    key = (repr(cfg.data), cfg.model.name, cfg.train.seed, cfg.federation.num_clients, pid)
    if key not in _BLOCKS:
        part, _ = data.client_and_test(cfg.data, cfg.federation.num_clients, cfg.train.seed, pid)
        _BLOCKS[key] = data.pack_blocks(part, tokenizer, cfg.data.text_column, cfg.data.seq_len)
    return _BLOCKS[key]


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
    t0 = time.perf_counter()
    model, tokenizer, loaded_now = _model_and_tokenizer(cfg)
    blocks = _client_blocks(cfg, pid, tokenizer)
    setup_s = time.perf_counter() - t0

    M.load_trainable_state(model, M.from_arrays(msg.content["arrays"]))
    conf = msg.content["config"]
    rnd = int(conf["server-round"])
    result = train_local(
        model, blocks, cfg.train, lr=float(conf["lr"]),
        proximal_mu=float(conf.get("proximal-mu", 0.0)),
        seed=cfg.train.seed * 100_003 + rnd * 1_009 + pid,
        log_every=max(1, cfg.train.local_steps // 4) if cfg.train.local_steps else 10,
        log=lambda s: print(f"[client {pid}] round {rnd} {s}", flush=True),
    )
    metrics = MetricRecord({
        "num-examples": len(blocks),  # FedAvg weight: the client's data size in blocks
        "train_loss": result.loss,
        "train_steps": result.steps,
        "train_samples": result.samples,
        "train_tokens": result.tokens,
        "train_seconds": result.seconds,
        "setup_seconds": setup_s,
        "model_loaded": int(loaded_now),  # 0 when the process kept the model from an earlier round
        "peak_rss_mb": peak_rss_mb(),
        "partition_id": pid,
    })
    content = RecordDict({"arrays": M.to_arrays(model), "metrics": metrics})
    return Message(content=content, reply_to=msg)
