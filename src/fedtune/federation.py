"""The server's round loop, built from a Flower strategy's own configure/aggregate steps.

Why not `strategy.start()`: it offers no place to count bytes per round, write metrics as
each round ends, save checkpoints or stop early. This loop calls the same strategy methods
in the same order (configure_train -> send_and_receive -> aggregate_train -> centralized
evaluation), so FedAvgM's momentum, FedProx's `proximal-mu` and FedAdam's moments behave
exactly as in Flower.
"""

from __future__ import annotations

import math
import time

import torch
from flwr.app import ConfigRecord

from fedtune import __version__, config as C, data, model as M
from fedtune.evaluate import eval_causal_lm
from fedtune.results import RunFolder, peak_rss_mb, summarize
from fedtune.train import lr_for_round


def build_strategy(cfg: C.Config):
    """A Flower strategy by name; federation settings fill the sampling arguments."""
    fed = cfg.federation
    return C.strategy_class(cfg.strategy.name)(
        fraction_train=fed.fraction,
        fraction_evaluate=0.0,          # centralized evaluation only: no extra round trip
        min_train_nodes=1,
        min_evaluate_nodes=0,
        min_available_nodes=fed.num_clients,  # wait until every SuperNode is connected
        **cfg.strategy.params,
    )


def payload_bytes(message) -> int:
    """Bytes of the ArrayRecords a message carries (what dominates the wire)."""
    return sum(rec.count_bytes() for rec in message.content.array_records.values())


def run_federation(grid, cfg: C.Config) -> dict:
    """Run every round against `grid`; return the summary written to summary.json."""
    t_start = time.perf_counter()
    run = RunFolder(cfg)
    log = run.log
    torch.manual_seed(cfg.train.seed)
    log.info(f"run folder {run.dir} (config hash {cfg.hash()})")

    tokenizer = M.load_tokenizer(cfg.model.name)
    model = M.load_model(cfg)
    trainable, total = M.count_parameters(model)
    _, test = data.client_and_test(cfg.data, cfg.federation.num_clients, cfg.train.seed, None)
    test_blocks = data.pack_blocks(test, tokenizer, cfg.data.text_column, cfg.data.seq_len)
    if cfg.eval.max_blocks:
        test_blocks = test_blocks[: cfg.eval.max_blocks]
    strategy = build_strategy(cfg)
    arrays = M.to_arrays(model)
    log.info(f"model {cfg.model.name}: {trainable:,} of {total:,} parameters train and travel "
             f"({cfg.model.finetune}); {arrays.count_bytes() / 2**20:.2f} MiB per client "
             f"per direction; server test split {len(test)} samples -> {len(test_blocks)} "
             f"blocks of {cfg.data.seq_len} tokens; strategy {cfg.strategy.name} "
             f"{cfg.strategy.params or ''}")

    def evaluate() -> dict:
        return eval_causal_lm(model, test_blocks, cfg.eval.batch_size, cfg.train.precision)

    t0 = time.perf_counter()
    row = {"round": 0, **evaluate(), "eval_seconds": time.perf_counter() - t0,
           "server_peak_rss_mb": peak_rss_mb()}
    run.append(row)
    log.info(f"round 0/{cfg.federation.rounds} eval_loss {row['eval_loss']:.4f} "
             f"ppl {row['eval_ppl']:.2f}")

    failures_total = 0
    for rnd in range(1, cfg.federation.rounds + 1):
        t_round = time.perf_counter()
        lr = lr_for_round(rnd, cfg.federation.rounds, cfg.train)
        train_config = ConfigRecord({"lr": lr, "num-rounds": cfg.federation.rounds})
        messages = list(strategy.configure_train(rnd, arrays, train_config, grid))
        bytes_down = sum(payload_bytes(m) for m in messages)
        replies = list(grid.send_and_receive(messages))
        ok = [r for r in replies if not r.has_error()]
        failed = [r for r in replies if r.has_error()]
        failures_total += len(failed) + (len(messages) - len(replies))
        for r in failed:
            log.info(f"round {rnd}: client node {r.metadata.src_node_id} failed: "
                     f"{r.error.reason}")
        bytes_up = sum(payload_bytes(r) for r in ok)
        new_arrays, agg = strategy.aggregate_train(rnd, replies)
        t_train = time.perf_counter() - t_round
        if new_arrays is not None:
            arrays = new_arrays
            M.load_trainable_state(model, M.from_arrays(arrays))
        else:
            log.info(f"round {rnd}: no client succeeded; the global model is unchanged")
        t0 = time.perf_counter()
        row = {"round": rnd, "lr": lr, **evaluate(), "eval_seconds": time.perf_counter() - t0}
        cm = [r.content["metrics"] for r in ok]
        n = sum(m["num-examples"] for m in cm)
        train_seconds = max((m["train_seconds"] for m in cm), default=0.0)
        row.update({
            "train_loss": (sum(m["train_loss"] * m["num-examples"] for m in cm) / n
                           if n else None),
            "clients_sampled": len(messages),
            "clients_ok": len(ok),
            "clients_failed": len(messages) - len(ok),
            "train_samples": sum(int(m["train_samples"]) for m in cm),
            "train_tokens": sum(int(m["train_tokens"]) for m in cm),
            # throughput of local training: all clients' samples over the slowest client
            "samples_per_s": (sum(m["train_samples"] for m in cm) / train_seconds
                              if train_seconds else 0.0),
            "tokens_per_s": (sum(m["train_tokens"] for m in cm) / train_seconds
                             if train_seconds else 0.0),
            "client_train_seconds_max": train_seconds,
            "client_train_seconds_sum": sum(m["train_seconds"] for m in cm),
            "client_setup_seconds_max": max((m["setup_seconds"] for m in cm), default=0.0),
            "client_model_loads": sum(int(m["model_loaded"]) for m in cm),
            "bytes_down": bytes_down,
            "bytes_up": bytes_up,
            "train_phase_seconds": t_train,
            "round_seconds": time.perf_counter() - t_round,
            "server_peak_rss_mb": peak_rss_mb(),
            "client_peak_rss_mb": max((m["peak_rss_mb"] for m in cm), default=0.0),
        })
        run.append(row)
        log.info(
            f"round {rnd}/{cfg.federation.rounds} eval_loss {row['eval_loss']:.4f} "
            f"ppl {row['eval_ppl']:.2f} train_loss {_fmt(row['train_loss'])} lr {lr:.2e} | "
            f"{row['round_seconds']:.1f}s, {row['tokens_per_s']:.0f} tok/s, "
            f"down {bytes_down / 2**20:.2f} MiB up {bytes_up / 2**20:.2f} MiB, "
            f"clients {len(ok)}/{len(messages)}")

    if cfg.output.save_final:
        M.save_final(model, tokenizer, run.dir / "final")
        log.info(f"final model saved with save_pretrained in {run.dir / 'final'}")
    summary = summarize(run.rows, time.perf_counter() - t_start, {
        "fedtune_version": __version__,
        "config_hash": cfg.hash(),
        "model": cfg.model.name,
        "finetune": cfg.model.finetune,
        "strategy": cfg.strategy.name,
        "trainable_parameters": trainable,
        "client_failures": failures_total,
        "final_model": str(run.dir / "final") if cfg.output.save_final else None,
    })
    run.write_summary(summary)
    log.info(f"done: {summary['rounds_completed']} rounds in "
             f"{summary['total_wall_seconds']:.0f}s; eval_loss "
             f"{summary['initial']['eval_loss']:.4f} -> {summary['final']['eval_loss']:.4f} "
             f"(best round {summary['best_round']}); communicated "
             f"{(summary['total_bytes_down'] + summary['total_bytes_up']) / 2**20:.1f} MiB; "
             f"results in {run.dir}")
    return summary


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"
