"""The end of a run: the final model (the best round's after early stopping) saved with
`save_pretrained`, summary.json and the report, in the order that makes a run folder look
finished only when it is (summary.json last but the report)."""

from __future__ import annotations

import time

from fedtune import checkpoint, model as M
from fedtune.report import fmt, write_model_card, write_report
from fedtune.results import manifest, summarize


def finish(loop) -> dict:
    """Final model (the best round's after early stopping), summary, report. `loop`: the
    run's `federation.ServerLoop`, whose state this reads."""
    cfg, run = loop.cfg, loop.run
    stopped = loop.stopper.should_stop()
    final_round = run.rows[-1]["round"]
    best = loop.best.row["round"] if loop.best and loop.best.row else None
    if stopped and best is not None and best != final_round:
        best_dir = run.dir / "checkpoints" / "best"
        checkpoint.load_weights(loop.model, best_dir, cfg.model.finetune)
        if loop.fedex:
            total = checkpoint.load_server_state(best_dir)["fedex_total"]
            loop.fedex.restore(loop.model, total)
        final_round = best
        loop.log.info(f"final model = best checkpoint (round {final_round})")
    if cfg.output.save_final:
        M.save_final(loop.model, loop.tokenizer, run.dir / "final", cfg.model.name)
        if loop.fedex:  # the adapter belongs on the corrected frozen weights
            M.save_base(loop.model, loop.tokenizer, run.dir / "final" / "base")
        loop.log.info(
            f"final model (round {final_round}) saved with save_pretrained in {run.dir / 'final'}"
        )
    summary = summarize(
        run.rows,
        loop.elapsed_before + time.perf_counter() - loop.t_start,
        loop.metric,
        {
            "config_hash": cfg.hash(),
            "model": cfg.model.name,
            "finetune": cfg.model.finetune,
            "strategy": cfg.strategy.name,
            "lora_aggregation": cfg.lora.aggregation if cfg.model.finetune == "lora" else None,
            "trainable_parameters": loop.trainable,
            "compression": f"uplink {cfg.comm.uplink}, downlink {cfg.comm.downlink}",
            "privacy": loop.ledger.summary() if loop.ledger else None,
            "client_failures": sum(r.get("clients_failed", 0) for r in run.rows),
            "final_model": str(run.dir / "final") if cfg.output.save_final else None,
            "final_model_round": final_round,
            "stopped_early": stopped or loop.budget.should_stop(),
            "stop_reason": loop.stopper.reason()
            if stopped
            else (loop.budget.reason() if loop.budget.should_stop() else None),
            "resumed_from_round": loop.start_round - 1 if cfg.output.resume else None,
            "manifest": manifest(cfg, loop.parts),
        },
    )
    if cfg.output.save_final:  # before summary.json: a finished-looking run has its card
        write_model_card(cfg, summary, run.dir / "final")
    run.write_summary(summary)
    if cfg.output.plots:
        try:
            loop.log.info(f"report: {write_report(run.dir)[1]}")
        except Exception as err:  # noqa: BLE001
            loop.log.warning(f"could not write the report: {err!r}")
    best_text = (
        f"best round {summary['best_round']} ({loop.metric} "
        f"{fmt(summary['best_value'], missing='n/a')})"
    )
    loop.log.info(
        f"done: {summary['rounds_completed']} rounds in "
        f"{summary['total_wall_seconds']:.0f}s; {best_text}; communicated "
        f"{(summary['total_bytes_down'] + summary['total_bytes_up']) / 2**20:.1f}"
        f" MiB; results in {run.dir}"
    )
    return summary
