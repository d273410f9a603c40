"""The server's round loop, built from a Flower strategy's own configure/aggregate steps.

Why not `strategy.start()`: it offers no place to count bytes per round, write metrics as
each round ends, save checkpoints, resume, retry a round or stop early. `ServerLoop` calls
the same strategy methods in the same order (configure_train -> send_and_receive ->
aggregate_train -> centralized evaluation), so FedAvgM's momentum, FedProx's `proximal-mu`
and FedAdam's moments behave exactly as in Flower. It reads as four steps: setup
(`__init__`), `run_round`, `finish_round`, `finish`.
"""

from __future__ import annotations

import contextlib
import random
import time
from typing import NoReturn

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedtune import (
    aggregation,
    checkpoint,
    closing,
    comm,
    compress,
    config as C,
    guard,
    lora_agg,
    model as M,
    partition,
    privacy,
    tasks,
    tracking,
)
from fedtune.errors import ModelError, RunError
from fedtune.evaluate import evaluate_task, run_suites
from fedtune.nodes import NodeDirectory
from fedtune.report import write_plots
from fedtune.results import (
    RunFolder,
    partition_report,
    peak_rss_mb,
)
from fedtune.rounds import (
    BestTracker,
    CommBudget,
    EarlyStopping,
    build_strategy,
    eta_text,
    payload_bytes,
    round_line,
    round_row,
)
from fedtune.train import lr_for_round, sampling_seed


class ServerLoop:
    """One run on `grid`: setup here, then `run()` = rounds until done or stopped early."""

    def __init__(self, grid, cfg: C.Config, run: RunFolder):
        self.t_start = time.perf_counter()
        self.grid, self.cfg, self.run = grid, cfg, run
        self.nodes = NodeDirectory(grid, cfg.federation.num_clients)
        self.nodes.ask()  # partition ids arrive while the model loads (deployment: spawns)
        self.log = run.log
        torch.manual_seed(cfg.train.seed)
        self.log.info(f"run folder {run.dir} (config hash {cfg.hash()})")
        self.log.info(f"loading the model ({cfg.model.name}) and the data ({cfg.data.source})")
        self.tokenizer = M.load_tokenizer(cfg.model.name)
        self.model = M.load_model(cfg)
        test, self.parts, column = tasks.load_task_data(cfg)
        names = cfg.task.label_names if column == cfg.task.label_column else None
        run.write_json(
            "partitions.json",
            partition_report(self.parts, column, names, partition.describe(cfg.data)),
        )
        self.test_rows, self.test_examples = tasks.encode_test(test, self.tokenizer, cfg)
        self.strategy = build_strategy(cfg)
        self.accumulate = getattr(torch, cfg.strategy.accumulate)
        initial = comm.needs_initial(cfg) and {
            k: v.float().clone() for k, v in M.trainable_state(self.model).items()
        }
        self.channel = comm.ServerChannel(cfg, initial or None)
        self.fedex = (
            lora_agg.FedEx(self.model, comm.codec_of(cfg.lora.fedex_dtype, cfg))
            if cfg.lora.aggregation == "fedex"
            else None
        )
        self.metric = C.headline_metric(cfg)
        self.stopper = EarlyStopping(cfg.train.early_stopping, self.metric)
        self.budget = CommBudget(cfg.comm.budget_mb, cfg.comm.budget_stop)
        self.ledger = privacy.Ledger(cfg) if cfg.privacy.dp.mode else None
        keep = cfg.output.keep_best or self.stopper.patience
        self.best = BestTracker(self.metric) if keep else None
        self.start_round, self.elapsed_before, self.saved_round = 1, 0.0, 0
        if cfg.output.resume:
            self._resume()
        self.arrays = M.to_arrays(self.model)
        trainable, total = M.count_parameters(self.model)
        self.trainable = trainable
        self.log.info(
            f"model {cfg.model.name}: {trainable:,} of {total:,} parameters train and travel "
            f"({cfg.model.finetune}); {self.arrays.count_bytes() / 2**20:.2f} MiB per client "
            f"per direction; task {cfg.task.type}; server test split {len(test)} samples -> "
            f"{len(self.test_examples)} examples (<= {cfg.data.seq_len} tokens); strategy "
            f"{cfg.strategy.name} {cfg.strategy.params or ''}; precision {cfg.train.precision} "
            f"-> {M.resolved_precision(cfg.train.precision, self.model.device)} here"
        )

    def _resume(self) -> None:
        """Weights, strategy state and metric lines of the latest checkpoint."""
        rnd, folder = checkpoint.check_resumable(self.run.dir, self.cfg)
        state = checkpoint.load_server_state(folder)
        checkpoint.load_weights(self.model, folder, self.cfg.model.finetune)
        checkpoint.restore_strategy(self.strategy, state["strategy"])
        if self.fedex:  # the frozen weights the checkpoint's adapter was trained on
            self.fedex.restore(self.model, state["fedex_total"])
        self.run.reset_lines(state["rows"])
        for row in self.run.rows:
            self.stopper.update(row)
            self.budget.update(row)
            if self.ledger:
                self.ledger.replay(row)
            if self.best:
                self.best.update(row)
        self.start_round, self.saved_round = rnd + 1, rnd
        self.elapsed_before = float(state.get("elapsed_seconds", 0.0))
        self.log.info(f"resumed from {folder} (round {rnd} of {self.cfg.federation.rounds})")

    # ------------------------------------------------------------------------- the loop
    def run_all(self) -> dict:
        rounds = self.cfg.federation.rounds
        with contextlib.ExitStack() as stack:
            self.trackers = [
                stack.enter_context(contextlib.closing(t))
                for t in tracking.open_trackers(self.run.dir, self.cfg)
            ]
            if self.start_round == 1:
                self.finish_round(self.evaluate(0) | {"server_peak_rss_mb": peak_rss_mb()})
            for rnd in range(self.start_round, rounds + 1):
                if self.stopper.should_stop() or self.budget.should_stop():
                    break
                self.finish_round(self.run_round(rnd))
            return self.finish()

    def run_round(self, rnd: int) -> dict:
        """configure -> send/receive (folding replies as they arrive) -> aggregate ->
        evaluate."""
        t_round = time.perf_counter()
        lr = lr_for_round(rnd, self.cfg.federation.rounds, self.cfg.train)
        state = M.trainable_state(self.model)
        fixed = {k: v for k, v in M.lora_factors(self.model).items() if k not in state}
        lora = lora_agg.LoraRound(self.cfg.lora, state, rnd, fixed)
        messages, folded, received, head = self.send_and_receive(rnd, lr, lora)
        clipping_norm = getattr(self.strategy, "clipping_norm", None)  # before it adapts
        new_arrays = aggregation.aggregate(
            self.strategy, rnd, folded, messages[0], self.channel.correction
        )
        if new_arrays is not None and self.ledger:
            head |= self.ledger.release(len(received), clipping_norm)
        t_train = time.perf_counter() - t_round
        if new_arrays is not None:
            new_state = M.from_arrays(new_arrays) | lora.keep | lora.merged()
            M.load_trainable_state(self.model, new_state)
            if self.fedex and lora.stack is not None:  # the exact mean: fold the residual in
                head["lora_fedex_residual"] = self.fedex.add(
                    lora.stack, self.model, M.trainable_state(self.model), lora.scaling
                )
            # The next round sends the model's own tensors: FedAdam/FedYogi return float64
            # (a numpy scalar in their step), which would double every later message and
            # make a resumed run (restarted from the model) differ from an uninterrupted one.
            self.arrays = M.to_arrays(self.model)
            if isinstance(getattr(self.strategy, "current_arrays", None), ArrayRecord):
                self.strategy.current_arrays = self.arrays  # FedAvgM: one copy, not two
        del new_arrays, folded
        row = head | round_row(rnd, lr, messages, received, t_train) | lora.metrics()
        row |= self.evaluate(rnd)
        return row | {
            "round_seconds": time.perf_counter() - t_round,
            "server_peak_rss_mb": peak_rss_mb(),
        }

    def send_and_receive(self, rnd: int, lr: float, lora: lora_agg.LoraRound):
        """(messages, the folded replies, what each reply said, the row's head) of a round:
        replies are screened and folded as they arrive, never held together (except for
        the robust strategies). A round with fewer than `federation.min_clients` accepted
        replies is recorded and retried, then the run stops."""
        fed = self.cfg.federation
        for attempt in range(fed.max_round_retries + 1):
            messages = self.configure(rnd, attempt, lr, lora)
            sent = self.channel.view if not self.channel.plain else M.trainable_state(self.model)
            folded = aggregation.collector(self.strategy, self.accumulate, sent)
            received, errors, rejected = [], [], []
            arrivals = aggregation.pull_as_they_arrive(
                self.grid, messages, 0.05, fed.round_timeout_s
            )
            self.log.info(f"round {rnd}/{fed.rounds}: {len(messages)} clients training")
            for reply in arrivals:
                node = reply.metadata.src_node_id
                mine = lora.sent_to(self.nodes.partition_of.get(node), sent)  # svd: its rank
                verdict, arrays = self.screen(reply, lora.expected(mine))
                if reply.has_error():
                    errors.append(reply)
                elif verdict.reason:
                    rejected.append({"node": node, "error": f"rejected: {verdict.reason}"})
                else:
                    metrics = dict(reply.content["metrics"])
                    received.append(metrics | {"bytes": payload_bytes(reply), "node": node})
                    received[-1] |= {"update_norm": verdict.norm, "clip_scale": verdict.scale}
                    weight = float(metrics[aggregation.WEIGHT_KEY])
                    pid = self.nodes.partition_of.get(node)
                    arrays = lora.complete(arrays, mine, weight, verdict.scale, pid)
                    folded.add(arrays, weight, verdict.scale)
                    self.log.info(f"round {rnd}: {len(received)}/{len(messages)} clients done")
                del reply, arrays
            head = {
                "round": rnd,
                "attempt": attempt,
                "sampled_partitions": self.nodes.partitions(
                    m.metadata.dst_node_id for m in messages
                ),
                "failures": self.nodes.failures(
                    messages, errors, rejected, {r["node"] for r in received}, fed.round_timeout_s
                ),
            }
            if len(received) >= fed.min_clients:
                return messages, folded, received, head
            self.run.append(
                head
                | {
                    "status": "failed",
                    "clients_sampled": len(messages),
                    "clients_ok": len(received),
                }
            )
            self.log.info(
                f"round {rnd} attempt {attempt + 1}: {len(received)} of {len(messages)} "
                f"clients replied (federation.min_clients = {fed.min_clients})"
            )
        self.fail(rnd, head["failures"], len(received), len(messages))

    def screen(self, reply, sent: dict) -> tuple[guard.Verdict, object]:
        """(the verdict on a reply, its arrays as the client trained them)."""
        if reply.has_error():
            return guard.Verdict(None), None
        reason = guard.malformed(reply.content)
        if reason:
            return guard.Verdict(reason), None
        self.nodes.learn(reply.metadata.src_node_id, int(reply.content["metrics"]["partition_id"]))
        try:
            arrays = compress.unbundle(reply.content["arrays"])
        except ModelError as err:
            return guard.Verdict(f"cannot decode the update: {err}"), None
        if self.channel.plain:
            wire = {k: a.dtype for k, a in self.arrays.items()}
            return guard.screen(arrays, sent, self.cfg.robust, wire), arrays
        try:
            arrays = self.channel.decode_reply(arrays)
        except (ModelError, KeyError, ValueError) as err:
            return guard.Verdict(f"cannot decode the update: {err}"), None
        return guard.screen(arrays, sent, self.cfg.robust), arrays

    def configure(self, rnd: int, attempt: int, lr: float, lora: lora_agg.LoraRound) -> list:
        """The strategy's own messages, over nodes sorted by partition id with `random`
        seeded by (seed, round, attempt): the same clients in every process and on resume."""
        self.nodes.wait()
        random.seed(sampling_seed(self.cfg.train.seed, rnd, attempt))  # Flower samples with it
        train_config = ConfigRecord({"lr": lr, "num-rounds": self.cfg.federation.rounds})
        messages = list(
            self.strategy.configure_train(rnd, self.arrays, train_config, self.nodes.sorted_view())
        )
        if not messages:
            return messages
        record = (  # the strategy keeps the exact arrays; clients get the channel's view
            messages[0].content["arrays"]
            if self.channel.plain
            else self.channel.downlink(M.trainable_state(self.model))
        )
        record = compress.bundle(record)  # one record, shared: Flower sends it once per node
        pids = [self.nodes.partition_of.get(m.metadata.dst_node_id) for m in messages]
        for m, arrays in zip(messages, lora_agg.downlink_records(lora, pids, record), strict=True):
            m.content = RecordDict(dict(m.content.items()))  # Flower shares one among messages
            m.content["arrays"] = arrays
            if self.fedex and self.fedex.record is not None:  # the dense correction, counted
                m.content[lora_agg.FedEx.RECORD] = self.fedex.record
        return messages

    def fail(self, rnd: int, failures: list[dict], n_ok: int, n_sampled: int) -> NoReturn:
        """Stop the run: keep a checkpoint of the last good round, raise one clear line."""
        last = self.run.rows[-1]
        if self.cfg.output.save_every and last["round"] > self.saved_round:
            self.save_checkpoint(last)
        who = "; ".join(f"client {f['partition']}: {f['error']}" for f in failures) or "none"
        resume = (
            f"; resume from round {self.saved_round} with: fedtune run --resume {self.run.dir}"
            if self.saved_round
            else ""
        )
        raise RunError(
            f"round {rnd}: {n_ok} of {n_sampled} sampled clients replied "
            f"(federation.min_clients = {self.cfg.federation.min_clients}) in "
            f"{self.cfg.federation.max_round_retries + 1} attempt(s); failures: "
            f"{who}{resume}"
        )

    def evaluate(self, rnd: int) -> dict:
        """The server's metrics after round `rnd`, where `eval.every` (and for the suites
        `eval.suites_every`) asks for them; a round it skips has none."""
        cfg, last, res = self.cfg, self.cfg.federation.rounds, {"round": rnd}
        every, suites_every = cfg.eval.every, cfg.eval.suites_every
        if rnd == last or (every and rnd % every == 0):
            self.log.info(f"round {rnd}: evaluating ({len(self.test_examples)} test examples)")
            t0 = time.perf_counter()
            res |= evaluate_task(
                self.model, self.tokenizer, cfg, self.test_rows, self.test_examples
            )
            res["eval_seconds"] = time.perf_counter() - t0
        if cfg.eval.suites and (rnd in (0, last) or (suites_every and rnd % suites_every == 0)):
            res |= run_suites(self.model, self.tokenizer, cfg, self.run.dir / "eval", rnd)
        return res

    def finish_round(self, row: dict) -> None:
        """Best model, checkpoint, metrics line, trackers, plots: in that order, so a
        checkpoint of round k always exists when metrics.jsonl shows round k."""
        cfg, rnd = self.cfg, row["round"]
        if self.best and self.best.update(row):
            checkpoint.save_best(
                self.run.dir,
                rnd,
                self.model,
                self.tokenizer,
                self.metric,
                row.get(self.metric),
                {"fedex_total": self.fedex.total} if self.fedex else None,
            )
        self.stopper.update(row)
        if self.budget.update(row):
            self.log.warning(self.budget.reason())
        row["comm_mb_cumulative"] = self.budget.total / 2**20
        stop = self.stopper.should_stop() or self.budget.should_stop()
        every = cfg.output.save_every
        if every and rnd and (rnd % every == 0 or rnd == cfg.federation.rounds or stop):
            self.save_checkpoint(row)
        self.run.append(row)
        for t in self.trackers:
            t.log(row)
        if cfg.output.plots:
            self._plots()
        elapsed = time.perf_counter() - self.t_start
        done, left = rnd - self.start_round + 1, cfg.federation.rounds - rnd
        self.log.info(round_line(row, cfg.federation.rounds, eta_text(elapsed, done, left)))
        if self.stopper.should_stop():
            self.log.info(self.stopper.reason())

    def save_checkpoint(self, row: dict) -> None:
        lines = self.run.lines + ([row] if row not in self.run.lines else [])
        state = {
            "round": row["round"],
            "rows": lines,
            "config": self.cfg.to_dict(),
            "strategy": checkpoint.strategy_state(self.strategy),
            "elapsed_seconds": self.elapsed_before + time.perf_counter() - self.t_start,
            "fedex_total": self.fedex.total if self.fedex else None,
        }
        checkpoint.save_round(
            self.run.dir, row["round"], self.model, self.tokenizer, state, self.cfg.output.keep_last
        )
        self.saved_round = row["round"]

    def _plots(self) -> None:
        """Refresh plots/*.png; a plotting problem is logged, never fatal to the run."""
        try:
            write_plots(self.run.dir)
        except Exception as err:  # noqa: BLE001 - results matter more than pictures
            self.log.warning(f"could not write plots: {err!r}")

    def finish(self) -> dict:
        """Final model, summary.json, report (`closing.finish`)."""
        return closing.finish(self)


def run_federation(grid, cfg: C.Config) -> dict:
    """Run (or resume) every round against `grid`; return the summary in summary.json."""
    run = RunFolder(cfg)
    try:
        return ServerLoop(grid, cfg, run).run_all()
    except Exception as err:
        run.record_failure(err)
        raise
