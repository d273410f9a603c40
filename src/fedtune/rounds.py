"""The pieces of one round that the server loop composes: the strategy, the round's metrics
line from the clients' replies, and the best-round and early-stopping bookkeeping.

Why apart from the loop: each piece is a plain function or a small class fed metric rows,
testable without a grid, so `federation.ServerLoop` reads as its four steps.
"""

from __future__ import annotations

import math

from fedtune import config as C, privacy
from fedtune.report import fmt
from fedtune.results import best_round


def build_strategy(cfg: C.Config):
    """A Flower strategy by name, federation settings filling its sampling arguments,
    inside Flower's DP wrapper if `privacy.dp` asks for one."""
    fed = cfg.federation
    strategy = C.strategy_class(cfg.strategy.name)(
        fraction_train=fed.fraction,
        fraction_evaluate=0.0,  # centralized evaluation only: no extra round trip
        min_train_nodes=1,
        min_evaluate_nodes=0,
        min_available_nodes=fed.num_clients,  # wait until every SuperNode is connected
        **cfg.strategy.params,
    )
    return privacy.wrap(strategy, cfg)


def payload_bytes(message) -> int:
    """Bytes of the ArrayRecords a message carries (what dominates the wire)."""
    return sum(rec.count_bytes() for rec in message.content.array_records.values())


class BestTracker:
    """The best round so far by one metric (`results.best_round`'s rule)."""

    def __init__(self, metric: str):
        self.metric, self.row = metric, None

    def update(self, row: dict) -> bool:
        """Feed a round's row; True when it is the new best."""
        best = best_round([r for r in (self.row, row) if r is not None], self.metric)
        if best is row:
            self.row = row
            return True
        return False


class EarlyStopping:
    """Patience on a centralized metric; its whole state is derivable from the metric rows."""

    def __init__(self, spec: C.EarlyStoppingConfig, metric: str):
        self.metric = metric
        self.patience, self.min_delta = spec.patience, spec.min_delta
        self.sign = 1.0 if C.metric_mode(metric) == "min" else -1.0
        self.best, self.best_round, self.bad = math.inf, None, 0

    def update(self, row: dict) -> None:
        """Count one evaluation (a row without the metric, e.g. a round `eval.every`
        skipped or a failed attempt, is none)."""
        value = row.get(self.metric)
        if value is None:
            return
        if math.isfinite(value) and self.sign * value < self.best - self.min_delta:
            self.best, self.best_round, self.bad = self.sign * value, row["round"], 0
        else:
            self.bad += 1

    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad >= self.patience

    def reason(self) -> str:
        return (
            f"early stopping: {self.metric} did not improve by more than {self.min_delta} "
            f"for {self.patience} rounds (best round {self.best_round})"
        )


class CommBudget:
    """`comm.budget_mb`: the run's MB so far (up + down, as counted on the wire); warns once
    when crossed and, with `comm.budget_stop`, ends the run after that round. Like
    `EarlyStopping`, its state is derivable from the metric rows (resume replays them)."""

    def __init__(self, budget_mb: float, stop: bool):
        self.limit, self.stop = budget_mb * 2**20, stop
        self.total, self.crossed_round = 0, None

    def update(self, row: dict) -> bool:
        """Count a round's bytes; True when this round crossed the budget."""
        self.total += row.get("bytes_up", 0) + row.get("bytes_down", 0)
        if self.limit and self.crossed_round is None and self.total > self.limit:
            self.crossed_round = row["round"]
            return True
        return False

    def should_stop(self) -> bool:
        return self.stop and self.crossed_round is not None

    def reason(self) -> str:
        return (
            f"communication budget: {self.total / 2**20:.1f} MB after round "
            f"{self.crossed_round} exceed comm.budget_mb = {self.limit / 2**20:g}"
            + ("" if self.stop else " (warning only; comm.budget_stop = true stops the run)")
        )


def round_row(rnd, lr, messages, received: list[dict], t_train: float) -> dict:
    """A round's metrics line from the messages sent and the metrics of each reply."""
    cm = received
    n = sum(m["num-examples"] for m in cm)

    def most(key):
        return max((m[key] for m in cm), default=0.0)

    samples = sum(int(m["train_samples"]) for m in cm)
    tokens = sum(int(m["train_tokens"]) for m in cm)
    positions = sum(int(m.get("train_positions", m["train_tokens"])) for m in cm)
    return {
        "round": rnd,
        "lr": lr,
        "train_loss": sum(m["train_loss"] * m["num-examples"] for m in cm) / n if n else None,
        "clients_sampled": len(messages),
        "clients_ok": len(cm),
        "clients_failed": len(messages) - len(cm),
        "train_samples": samples,
        "train_tokens": tokens,
        "train_padding": 1 - tokens / positions if positions else 0.0,  # share of positions
        # throughput of the training phase as the server's clock sees it (clients in
        # parallel or one after another, setup and transfer included)
        "samples_per_s": samples / t_train if t_train else 0.0,
        "tokens_per_s": tokens / t_train if t_train else 0.0,
        "client_train_seconds_max": most("train_seconds"),
        "client_train_seconds_sum": sum(m["train_seconds"] for m in cm),
        "client_setup_seconds_max": most("setup_seconds"),
        "client_model_load_seconds_max": most("model_load_seconds"),
        "client_data_seconds_max": most("data_seconds"),
        "client_process_age_seconds_max": most("process_age_seconds"),
        "client_model_loads": sum(int(m["model_loaded"]) for m in cm),
        "client_workers": sum(int(m.get("worker", 0)) for m in cm),  # warm `fedtune worker`s
        "client_worker_fallbacks": sum(int(m.get("worker_fallback", 0)) for m in cm),
        "client_proximal_mu": most("proximal_mu"),  # what the clients added (FedProx)
        "update_norm_max": most("update_norm"),  # of the accepted updates, before clipping
        "clients_clipped": sum(m["clip_scale"] < 1 for m in cm),
        "bytes_down": sum(payload_bytes(m) for m in messages),
        "bytes_up": sum(m["bytes"] for m in cm),
        "train_phase_seconds": t_train,
        "client_peak_rss_mb": most("peak_rss_mb"),
        "clients": per_client(cm),
    }


def per_client(received: list[dict]) -> list[dict]:
    """Each replying client's own numbers, by partition (non-IID studies need them)."""
    return [
        {
            "partition": int(m["partition_id"]),
            "train_loss": m["train_loss"],
            "examples": int(m["num-examples"]),
            "steps": int(m["train_steps"]),
            "train_seconds": m["train_seconds"],
            "bytes_up": int(m["bytes"]),
        }
        for m in sorted(received, key=lambda m: m["partition_id"])
    ]


HEADLINE = (
    "eval_loss",
    "eval_ppl",
    "eval_accuracy",
    "eval_gen_accuracy",
    "eval_rougeL",
    "eval_f1_macro",
    "eval_mcc",
    "eval_mmlu_accuracy",
)


def clock(seconds: float) -> str:
    """3725 -> '1h02m', 192 -> '3m12s', 9.4 -> '9s'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def eta_text(elapsed: float, done: int, left: int) -> str:
    """'elapsed 3m12s, ETA 6m24s' from the mean of the rounds this process ran."""
    if done <= 0:
        return f"elapsed {clock(elapsed)}"
    return f"elapsed {clock(elapsed)}, ETA {clock(elapsed / done * left)}"


def headline(row: dict) -> str:
    """The round's centralized metrics in one short line."""
    return " ".join(f"{k[5:]} {row[k]:.4f}" for k in HEADLINE if row.get(k) is not None)


def round_line(row: dict, rounds: int, eta: str) -> str:
    """The progress line of a finished round."""
    rnd = row["round"]
    if not rnd:
        return f"round 0/{rounds} {headline(row)} | {eta}"
    return (
        f"round {rnd}/{rounds} {headline(row)} train_loss "
        f"{fmt(row['train_loss'], missing='n/a')} lr {row['lr']:.2e} | "
        f"{row['round_seconds']:.1f}s, {row['tokens_per_s']:.0f} tok/s, down "
        f"{row['bytes_down'] / 2**20:.2f} MiB up {row['bytes_up'] / 2**20:.2f} MiB, "
        f"clients {row['clients_ok']}/{row['clients_sampled']} | {eta}"
    )
