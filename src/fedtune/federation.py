"""The server's round loop, built from a Flower strategy's own configure/aggregate steps.

Why not `strategy.start()`: it offers no place to count bytes per round, write metrics as
each round ends, save checkpoints, resume or stop early. This loop calls the same strategy
methods in the same order (configure_train -> send_and_receive -> aggregate_train ->
centralized evaluation), so FedAvgM's momentum, FedProx's `proximal-mu` and FedAdam's
moments behave exactly as in Flower.
"""

from __future__ import annotations

import math
import random
import time

import torch
from flwr.app import ConfigRecord

from fedtune import checkpoint, config as C, model as M, tasks, tracking
from fedtune.data import load_data
from fedtune.evaluate import evaluate_task
from fedtune.results import RunFolder, manifest, partition_report, peak_rss_mb, summarize
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


class EarlyStopping:
    """Patience on a centralized metric; its whole state is derivable from the metric rows."""

    def __init__(self, spec: dict):
        self.metric = spec.get("metric", "eval_loss")
        self.patience = spec.get("patience", 0)
        self.min_delta = float(spec.get("min_delta", 0.0))
        self.sign = 1.0 if C.metric_mode(self.metric) == "min" else -1.0
        self.best, self.best_round, self.bad = math.inf, None, 0

    def update(self, row: dict) -> bool:
        """Feed a round's row; True when this round is the new best."""
        value = row.get(self.metric)
        if value is None or not math.isfinite(value):
            self.bad += 1
            return False
        if self.sign * value < self.best - self.min_delta:
            self.best, self.best_round, self.bad = self.sign * value, row["round"], 0
            return True
        self.bad += 1
        return False

    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad >= self.patience


def _round_row(rnd, lr, messages, replies, bytes_down, t_train) -> dict:
    ok = [r for r in replies if not r.has_error()]
    cm = [r.content["metrics"] for r in ok]
    n = sum(m["num-examples"] for m in cm)
    slowest = max((m["train_seconds"] for m in cm), default=0.0)
    samples = sum(int(m["train_samples"]) for m in cm)
    tokens = sum(int(m["train_tokens"]) for m in cm)
    return {
        "round": rnd, "lr": lr,
        "train_loss": sum(m["train_loss"] * m["num-examples"] for m in cm) / n if n else None,
        "clients_sampled": len(messages), "clients_ok": len(ok),
        "clients_failed": len(messages) - len(ok),
        "train_samples": samples, "train_tokens": tokens,
        # throughput of the training phase as the server's clock sees it (clients in
        # parallel or one after another, setup and transfer included)
        "samples_per_s": samples / t_train if t_train else 0.0,
        "tokens_per_s": tokens / t_train if t_train else 0.0,
        "client_train_seconds_max": slowest,
        "client_train_seconds_sum": sum(m["train_seconds"] for m in cm),
        "client_setup_seconds_max": max((m["setup_seconds"] for m in cm), default=0.0),
        "client_model_load_seconds_max": max((m["model_load_seconds"] for m in cm),
                                             default=0.0),
        "client_data_seconds_max": max((m["data_seconds"] for m in cm), default=0.0),
        "client_process_age_seconds_max": max((m["process_age_seconds"] for m in cm),
                                              default=0.0),
        "client_model_loads": sum(int(m["model_loaded"]) for m in cm),
        "bytes_down": bytes_down,
        "bytes_up": sum(payload_bytes(r) for r in ok),
        "train_phase_seconds": t_train,
        "client_peak_rss_mb": max((m["peak_rss_mb"] for m in cm), default=0.0),
    }


def run_federation(grid, cfg: C.Config, stop_after_round: int | None = None) -> dict:
    """Run (or resume) every round against `grid`; return the summary in summary.json.

    `stop_after_round` ends the loop early as if the process had been killed (for tests of
    resume): no final model, no summary.
    """
    t_start = time.perf_counter()
    run = RunFolder(cfg)
    log = run.log
    torch.manual_seed(cfg.train.seed)
    log.info(f"run folder {run.dir} (config hash {cfg.hash()})")

    tokenizer = M.load_tokenizer(cfg.model.name)
    model = M.load_model(cfg)
    trainable, total = M.count_parameters(model)
    test, parts, column = load_data(cfg)
    names = cfg.task.label_names if column == cfg.task.label_column else None
    from fedtune.partition import describe

    run.write_json("partitions.json", partition_report(parts, column, names,
                                                       describe(cfg.data)))
    test_examples = tasks.encode(test, tokenizer, cfg)
    if cfg.eval.max_blocks:
        test_examples = test_examples[: cfg.eval.max_blocks]
    test_rows = test.select(range(min(len(test), len(test_examples))))
    strategy = build_strategy(cfg)
    stopper = EarlyStopping(cfg.train.early_stopping)
    keep_best = cfg.output.keep_best or (stopper.metric if stopper.patience else "")
    best = EarlyStopping({"metric": keep_best}) if keep_best else None

    start_round, elapsed_before = 1, 0.0
    if cfg.output.resume:
        start_round, elapsed_before = _resume(run, cfg, model, strategy)
        for row in run.rows:
            stopper.update(row)
            if best:
                best.update(row)
    arrays = M.to_arrays(model)
    log.info(f"model {cfg.model.name}: {trainable:,} of {total:,} parameters train and travel "
             f"({cfg.model.finetune}); {arrays.count_bytes() / 2**20:.2f} MiB per client "
             f"per direction; task {cfg.task.type}; server test split {len(test)} samples "
             f"-> {len(test_examples)} examples (<= {cfg.data.seq_len} tokens); strategy "
             f"{cfg.strategy.name} "
             f"{cfg.strategy.params or ''}")
    trackers = tracking.open_trackers(run.dir, cfg)

    def evaluate(rnd: int) -> dict:
        t0 = time.perf_counter()
        res = evaluate_task(model, tokenizer, cfg, test_rows, test_examples)
        res["eval_seconds"] = time.perf_counter() - t0
        every = cfg.eval.suites_every
        if cfg.eval.suites and (rnd in (0, cfg.federation.rounds) or (every and rnd % every == 0)):
            res.update(run_suites(model, tokenizer, cfg, run.dir / "eval", rnd, log))
        return res

    def finish_round(row: dict) -> None:
        """Best model, checkpoint, metrics line, trackers, plots: in that order, so a
        checkpoint of round k always exists when metrics.jsonl shows round k."""
        if best and best.update(row):
            checkpoint.save_best(run.dir, row["round"], model, tokenizer, best.metric,
                                 row[best.metric])
        stopper.update(row)
        rnd = row["round"]
        if cfg.output.save_every and rnd and (rnd % cfg.output.save_every == 0
                                              or rnd == cfg.federation.rounds
                                              or stopper.should_stop()):
            state = {"round": rnd, "rows": run.rows + [row], "config": cfg.to_dict(),
                     "strategy": checkpoint.strategy_state(strategy),
                     "elapsed_seconds": elapsed_before + time.perf_counter() - t_start}
            checkpoint.save_round(run.dir, rnd, model, tokenizer, state, cfg.output.keep_last)
        run.append(row)
        for t in trackers:
            t.log(row)
        if cfg.output.plots:
            run.plots()

    if start_round == 1:
        row = {"round": 0, **evaluate(0), "server_peak_rss_mb": peak_rss_mb()}
        finish_round(row)
        log.info(f"round 0/{cfg.federation.rounds} {headline(row)}")

    stop_reason = None
    for rnd in range(start_round, cfg.federation.rounds + 1):
        if stopper.should_stop():
            break
        t_round = time.perf_counter()
        lr = lr_for_round(rnd, cfg.federation.rounds, cfg.train)
        random.seed(cfg.train.seed * 7_919 + rnd)  # Flower samples clients with `random`
        train_config = ConfigRecord({"lr": lr, "num-rounds": cfg.federation.rounds})
        messages = list(strategy.configure_train(rnd, arrays, train_config, grid))
        bytes_down = sum(payload_bytes(m) for m in messages)
        replies = list(grid.send_and_receive(messages))
        for r in replies:
            if r.has_error():
                log.info(f"round {rnd}: client node {r.metadata.src_node_id} failed: "
                         f"{r.error.reason}")
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
        t_train = time.perf_counter() - t_round
        if new_arrays is not None:
            arrays = new_arrays
            M.load_trainable_state(model, M.from_arrays(arrays))
        else:
            log.info(f"round {rnd}: no client succeeded; the global model is unchanged")
        row = _round_row(rnd, lr, messages, replies, bytes_down, t_train)
        del replies
        row.update(evaluate(rnd))
        row.update(round_seconds=time.perf_counter() - t_round,
                   server_peak_rss_mb=peak_rss_mb())
        finish_round(row)
        log.info(
            f"round {rnd}/{cfg.federation.rounds} {headline(row)} "
            f"train_loss {_fmt(row['train_loss'])} lr {lr:.2e} | "
            f"{row['round_seconds']:.1f}s, {row['tokens_per_s']:.0f} tok/s, "
            f"down {bytes_down / 2**20:.2f} MiB up {row['bytes_up'] / 2**20:.2f} MiB, "
            f"clients {row['clients_ok']}/{row['clients_sampled']}")
        if stopper.should_stop():
            stop_reason = (f"early stopping: {stopper.metric} did not improve by more than "
                           f"{stopper.min_delta} for {stopper.patience} rounds (best round "
                           f"{stopper.best_round})")
            log.info(stop_reason)
        if stop_after_round is not None and rnd >= stop_after_round:
            for t in trackers:
                t.close()
            return {}

    final_round = run.rows[-1]["round"]
    if stop_reason and best and best.best_round is not None and best.best_round != final_round:
        checkpoint.load_weights(model, run.dir / "checkpoints" / "best", cfg.model.finetune)
        final_round = best.best_round
        log.info(f"final model = best checkpoint (round {final_round})")
    if cfg.output.save_final:
        M.save_final(model, tokenizer, run.dir / "final")
        log.info(f"final model (round {final_round}) saved with save_pretrained in "
                 f"{run.dir / 'final'}")
    for t in trackers:
        t.close()
    summary = summarize(run.rows, elapsed_before + time.perf_counter() - t_start, {
        "config_hash": cfg.hash(), "model": cfg.model.name, "finetune": cfg.model.finetune,
        "strategy": cfg.strategy.name, "trainable_parameters": trainable,
        "client_failures": sum(r.get("clients_failed", 0) for r in run.rows),
        "final_model": str(run.dir / "final") if cfg.output.save_final else None,
        "final_model_round": final_round,
        "stopped_early": stop_reason is not None, "stop_reason": stop_reason,
        "resumed_from_round": start_round - 1 if cfg.output.resume else None,
        "manifest": manifest(cfg, parts),
    })
    run.write_summary(summary)
    if cfg.output.plots:
        run.report()
    log.info(f"done: {summary['rounds_completed']} rounds in "
             f"{summary['total_wall_seconds']:.0f}s; eval_loss "
             f"{summary['initial']['eval_loss']:.4f} -> {summary['final']['eval_loss']:.4f} "
             f"(best round {summary['best_round']}); communicated "
             f"{(summary['total_bytes_down'] + summary['total_bytes_up']) / 2**20:.1f} MiB; "
             f"results in {run.dir}")
    return summary


def _resume(run: RunFolder, cfg: C.Config, model, strategy) -> tuple[int, float]:
    """Load the latest checkpoint: weights, strategy state, metric rows. Returns next round."""
    found = checkpoint.latest(run.dir)
    if found is None:
        raise FileNotFoundError(f"nothing to resume in {run.dir}: no checkpoints/latest.json "
                                "(a run checkpoints when `output.save_every` > 0)")
    rnd, folder = found
    state = checkpoint.load_server_state(folder)
    saved = state["config"]
    now = cfg.to_dict()
    changed = [f"{s}.{k}" for s in saved for k in saved[s]
               if s not in ("output", "federation") and saved[s][k] != now[s].get(k)]
    changed += [f"federation.{k}" for k in saved["federation"]
                if k != "rounds" and saved["federation"][k] != now["federation"][k]]
    if changed:
        raise C.ConfigError([f"cannot resume with a changed `{k}` (checkpoint has "
                             f"{saved[k.split('.')[0]][k.split('.')[1]]!r})" for k in changed])
    checkpoint.load_weights(model, folder, cfg.model.finetune)
    checkpoint.restore_strategy(strategy, state["strategy"])
    run.reset_rows(state["rows"])
    run.log.info(f"resumed from {folder} (round {rnd} of {cfg.federation.rounds})")
    return rnd + 1, float(state.get("elapsed_seconds", 0.0))


def run_suites(model, tokenizer, cfg: C.Config, out_dir, rnd: int, log) -> dict:
    """Benchmarks beyond the task's own test split (MMLU); details to eval/*.json."""
    import json

    from fedtune import mmlu

    out = {}
    if "mmlu" in cfg.eval.suites:
        e = cfg.eval
        questions = mmlu.load_questions(e.mmlu_source, e.mmlu_subset, e.mmlu_split,
                                        e.mmlu_max_questions, cfg.train.seed)
        t0 = time.perf_counter()
        res = mmlu.evaluate_mmlu(model, tokenizer, questions, e.batch_size, e.mmlu_mode,
                                 cfg.train.precision)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"mmlu-round-{rnd}.json").write_text(json.dumps(res, indent=2) + "\n")
        out.update(eval_mmlu_accuracy=res["accuracy"],
                   eval_mmlu_seconds=time.perf_counter() - t0)
        for cat, v in res["by_category"].items():
            out[f"eval_mmlu_{cat.replace(' ', '_')}"] = v["accuracy"]
        log.info(f"round {rnd}: MMLU accuracy {res['accuracy']:.4f} on "
                 f"{res['num_questions']} questions ({e.mmlu_mode} scoring)")
    return out


HEADLINE = ("eval_loss", "eval_ppl", "eval_accuracy", "eval_gen_accuracy", "eval_rougeL",
            "eval_f1_macro", "eval_mcc", "eval_mmlu_accuracy")


def headline(row: dict) -> str:
    """The round's centralized metrics in one short line."""
    return " ".join(f"{k[5:]} {row[k]:.4f}" for k in HEADLINE if row.get(k) is not None)


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"
