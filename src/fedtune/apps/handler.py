"""What a train message does on a client: receive the global trainable tensors, train
locally, reply with them.

It runs in the ClientApp's process (simulation, or deployment without a worker) or in a
`fedtune worker` beside the SuperNode; either way it only turns a Message into plain calls
(`fedtune.train.train_local` does the work), and what must outlive one message lives in
`apps.cache.CACHE`.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from fedtune import comm, compress, kd, lora_agg, model as M, privacy, tasks
from fedtune.apps import config_from_run_config, partition_id, process_age_seconds
from fedtune.apps.cache import CACHE, model_key
from fedtune.console import quiet_flower, to_terminal
from fedtune.data import source_stamp
from fedtune.results import peak_rss_mb
from fedtune.train import client_seed, train_local


def handle_train(msg: Message, context: Context) -> Message:
    """A train message through `privacy.dp`'s client mod (if any), then `train`. The mods
    see the arrays as `compress.bundle` was given them, on the way in and out."""
    content = RecordDict(dict(msg.content.items()))  # the server's may be shared by nodes
    content["arrays"] = compress.unbundle(content["arrays"])
    msg = copy.copy(msg)  # in-process engines hand over the server's own message
    msg.content = content
    reply = dp_mod(msg, context, train)
    if not reply.has_error():
        reply.content["arrays"] = compress.bundle(reply.content["arrays"])
    return reply


def dp_mod(msg: Message, context: Context, call_next) -> Message:
    """`privacy.dp` on the client: Flower's own mod for the run's mode (clip, or clip and
    noise the reply), if it has one."""
    mod = privacy.client_mod(config_from_run_config(context.run_config).privacy.dp)
    return mod(msg, context, call_next) if mod else call_next(msg, context)


def train(msg: Message, context: Context) -> Message:
    cfg = config_from_run_config(context.run_config)
    pid = partition_id(context, cfg)
    cfg = lora_agg.for_client(cfg, pid)  # svd: this client's own LoRA rank
    process_age = process_age_seconds()  # in deployment: spawn + imports of this process
    model, tokenizer, initial, examples, loss_fn, setup = client_setup(cfg, pid, context)
    received = comm.client_receive(msg.content["arrays"], initial)
    if cfg.lora.aggregation == "svd":
        received = lora_agg.revive(model, received)
    M.load_trainable_state(model, received)
    lora_agg.receive_fedex(model, msg.content)
    conf = msg.content["config"]
    rnd, mu = int(conf["server-round"]), float(conf.get("proximal-mu", 0.0))
    with M.frozen(model, lora_agg.frozen_this_round(received, cfg.lora.aggregation, rnd)):
        result = train_local(
            model,
            examples,
            cfg.train,
            lr=float(conf["lr"]),
            proximal_mu=mu,
            seed=client_seed(cfg.train.seed, rnd, pid),
            pad_id=tokenizer.pad_token_id,
            loss_fn=loss_fn,
            log_every=max(1, cfg.train.local_steps // 4) if cfg.train.local_steps else 10,
            log_prefix=f"[client {pid}] round {rnd} ",
        )
        state = M.trainable_state(model)  # what trained this round, and only that, travels
    metrics = reply_metrics(result, len(examples), mu, process_age, pid, setup)
    arrays = comm.client_reply(cfg, state, {k: received[k] for k in state}, context)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def reply_metrics(result, num_examples: int, mu: float, process_age: float, pid: int, setup):
    """What the server records per client and round (and FedAvg weighs by)."""
    return MetricRecord(
        {
            "num-examples": num_examples,  # FedAvg weight: the client's data size in examples
            "train_loss": result.loss,
            "train_steps": result.steps,
            "train_samples": result.samples,
            "train_tokens": result.tokens,
            "train_positions": result.positions,
            "train_seconds": result.seconds,
            "proximal_mu": mu,
            "process_age_seconds": process_age,
            "worker": 0,  # 1: a warm `fedtune worker` trained it (set by the ClientApp)
            "worker_fallback": 0,  # 1: a worker was configured but did not answer
            "peak_rss_mb": peak_rss_mb(),
            "partition_id": pid,
            **setup,
        }
    )


def client_setup(cfg, pid: int, context: Context):
    """(model, tokenizer, initial weights, examples, loss_fn, timing metrics), from the
    process cache."""
    to_terminal()  # Flower started this process, not the CLI: fedtune's log lines need it
    quiet_flower()
    if cfg.federation.client_threads:
        torch.set_num_threads(cfg.federation.client_threads)
    t0 = time.perf_counter()
    (model, tokenizer, initial), loaded = CACHE.get(
        "model",
        (model_key(cfg), comm.needs_initial(cfg)),
        lambda: with_initial(cfg, M.load_model(cfg)),
    )
    t1 = time.perf_counter()
    data_path = str(context.node_config.get("data-path", ""))
    src = dataclasses.replace(cfg.data, source=data_path) if data_path else cfg.data
    examples, _ = CACHE.get(
        "examples",
        (
            model_key(cfg),
            repr(cfg.data),
            repr(cfg.task),
            repr(cfg.kd),
            cfg.federation.num_clients,
            pid,
            data_path,
            source_stamp(src),
        ),
        lambda: tasks.client_examples(cfg, pid, tokenizer, data_path),
        keep=64,
    )
    t2 = time.perf_counter()
    loss_fn = None
    if cfg.kd.enabled:
        teacher, _ = CACHE.get("teacher", kd.teacher_key(cfg), lambda: kd.load_teacher(cfg))
        loss_fn = kd.loss_fn(teacher, cfg)
    return (
        model,
        tokenizer,
        initial,
        examples,
        loss_fn,
        {
            "setup_seconds": t2 - t0,
            "model_load_seconds": t1 - t0,
            "data_seconds": t2 - t1,
            "model_loaded": int(loaded),
        },
    )  # 0 when the process kept the model of an earlier round


def with_initial(cfg, model):
    """(model, tokenizer, a copy of its initial trainable weights if the downlink sends the
    difference from them: the model itself changes every round)."""
    initial = None
    if comm.needs_initial(cfg):
        initial = {k: v.float().clone() for k, v in M.trainable_state(model).items()}
    return model, M.load_tokenizer(cfg.model.name), initial
