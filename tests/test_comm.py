"""Compressed updates in a real round loop: bytes counted from what travels, error feedback
kept in the client's context.state, the downlink's rounding never absorbed by the global
model, and the communication budget."""

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from fedtune import compress, model as M
from fedtune.checkpoint import load_weights
from fedtune.comm import RESIDUAL_KEY
from fedtune.federation import run_federation
from fedtune.inprocess import InProcessGrid
from independent import unpacked_bytes
from test_federation import make_cfg, rows_of


class CapturingGrid(InProcessGrid):
    """Keeps the train records as they travel, per round: the one sent, each reply's."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.sent, self.replies, self.round = {}, {}, 0

    def push_messages(self, messages):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.round = int(messages[0].content["config"]["server-round"])
            self.sent[self.round] = messages[0].content["arrays"]
            self.replies[self.round] = []
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        out = super().pull_messages(message_ids)
        for r in out:
            if r.metadata.message_type == MessageType.TRAIN and not r.has_error():
                n = int(r.content["metrics"]["num-examples"])
                self.replies[self.round].append((n, r.content["arrays"]))
        return out


def state_shapes(cfg):
    return {k: v.float() for k, v in M.trainable_state(M.load_model(cfg)).items()}


@pytest.mark.parametrize("mode", ["fp16", "bf16", "int8", "topk", "topk-int8"])
def test_each_uplink_mode_runs_and_counts_the_bytes_that_travel(
    tmp_path, tiny_model_dir, code_jsonl, mode
):
    cfg = make_cfg(tiny_model_dir, code_jsonl, tmp_path / mode, f"comm.uplink={mode}")
    grid = CapturingGrid(cfg)
    summary = run_federation(grid, cfg)
    assert summary["compression"] == f"uplink {mode}, downlink fp32"  # the run says what ran
    rows = rows_of(tmp_path / mode)
    init = state_shapes(cfg)
    zeros = {k: torch.zeros_like(v) for k, v in init.items()}
    # before zlib packing, a record's size depends on the codec and the shapes only (k,
    # blocks), not values; packing only ever makes an Array smaller
    one_reply, _ = compress.encode(zeros, compress.Codec(mode), reference=zeros)
    for rnd in (1, 2):
        sizes = [rec.count_bytes() for _, rec in grid.replies[rnd]]
        assert rows[rnd]["bytes_up"] == sum(sizes)
        for _, rec in grid.replies[rnd]:
            assert unpacked_bytes(compress.unbundle(rec)) == unpacked_bytes(one_reply)
            assert list(rec.keys()) == [compress.BUNDLE]  # one Array travels, not one per tensor
        assert rows[rnd]["bytes_down"] == 2 * grid.sent[rnd].count_bytes()  # fp32 downlink
    fp32, _ = compress.encode(zeros, compress.Codec("fp32"))
    assert one_reply.count_bytes() < fp32.count_bytes()
    if mode == "fp16":  # the same Flower arrays, 2 bytes per value instead of 4
        numel = sum(v.numel() for v in init.values())
        assert fp32.count_bytes() - one_reply.count_bytes() == 2 * numel
    assert np.isfinite(rows[-1]["eval_loss"]) and rows[-1]["clients_ok"] == 2
    residuals = [c.state.get(RESIDUAL_KEY) for c in grid.contexts.values()]
    if mode in compress.DELTA_MODES:  # error feedback lives in each client's context.state
        assert all(r is not None for r in residuals)
        assert any(np.abs(a.numpy()).max() > 0 for r in residuals for a in r.values())
    else:
        assert residuals == [None, None]


def test_a_lossy_downlink_is_not_absorbed_by_the_global_model(tmp_path, tiny_model_dir, code_jsonl):
    """FedAvg with an int8 downlink: each round, new global = global + sum_i n_i (x_i - view)
    / N, where view is what the clients decoded (not the mean of x_i, which would keep the
    rounding). Round 1's downlink is exact for LoRA (B = 0: no difference from the initial
    weights yet), round 2's is not."""
    cfg = make_cfg(
        tiny_model_dir, code_jsonl, tmp_path / "run", "comm.downlink=int8", "output.save_final=true"
    )
    grid = CapturingGrid(cfg)
    run_federation(grid, cfg)
    init = state_shapes(cfg)
    g = dict(init)
    for rnd in (1, 2):
        view = compress.decode(compress.unbundle(grid.sent[rnd]), reference=init)
        replies = [(n, compress.decode(compress.unbundle(rec))) for n, rec in grid.replies[rnd]]
        total = sum(n for n, _ in replies)
        lossy = any(not torch.allclose(view[k], g[k], atol=1e-9, rtol=0) for k in g)
        assert lossy == (rnd == 2)
        g = {k: g[k] + sum(n * (x[k] - view[k]) for n, x in replies) / total for k in g}
    model = M.load_model(cfg)
    load_weights(model, tmp_path / "run" / "final", "lora")
    final = M.trainable_state(model)
    for k in init:
        np.testing.assert_allclose(final[k].numpy(), g[k].numpy(), rtol=1e-5, atol=1e-7)
    plain = {k: sum(n * x[k] for n, x in replies) / total for k in init}
    assert any(not np.allclose(plain[k].numpy(), g[k].numpy(), atol=1e-7) for k in init)
    assert grid.sent[2].count_bytes() < compress.encode(init, compress.Codec())[0].count_bytes()


def test_the_communication_budget_warns_and_can_stop_the_run(tmp_path, tiny_model_dir, code_jsonl):
    cfg = make_cfg(
        tiny_model_dir,
        code_jsonl,
        tmp_path / "warn",
        "federation.rounds=3",
        "comm.budget_mb=0.000001",
    )
    summary = run_federation(InProcessGrid(cfg), cfg)
    rows = rows_of(tmp_path / "warn")
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and not summary["stopped_early"]
    total = 0
    for r in rows:
        total += r.get("bytes_up", 0) + r.get("bytes_down", 0)
        assert r["comm_mb_cumulative"] == pytest.approx(total / 2**20)
    stop = make_cfg(
        tiny_model_dir,
        code_jsonl,
        tmp_path / "stop",
        "federation.rounds=3",
        "comm.budget_mb=0.000001",
        "comm.budget_stop=true",
    )
    summary = run_federation(InProcessGrid(stop), stop)
    assert [r["round"] for r in rows_of(tmp_path / "stop")] == [0, 1]
    assert summary["stopped_early"] and "communication budget" in summary["stop_reason"]
