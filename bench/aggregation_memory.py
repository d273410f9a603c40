"""Server memory of one aggregation step: fedtune's streaming fold vs Flower's stock path.

    python bench/aggregation_memory.py                  # OPT-350M-sized model, N = 2, 4, 8
    python bench/aggregation_memory.py --clients 2 4 --strategies fedavg --small

A ~331 M-parameter full model is built from OPT-350M's config with random weights (no hub):
1.33 GB of fp32 tensors that train and travel. Each (path, strategy, N) runs in a fresh
process so the peaks do not mix. Both paths start from the same state (the server's torch
model and the global ArrayRecord that was sent), and the step's peak is measured above that
baseline, as multiples of the model's fp32 size:

- stock:   `grid.send_and_receive` returns all N replies, then `strategy.aggregate_train`;
- fedtune: `aggregation.pull_as_they_arrive` hands over each reply as it lands (built here
           when pulled), `RunningMean` folds it in place, `aggregation.aggregate` hands the
           strategy one reply with the mean.

FedAvgM runs with server_momentum = 0.9 in a round after the first, so its momentum buffer
(one more model) already exists and is counted in its baseline. It
also prints the size of the strategy's checkpointed server state (`server_state.pt`) as a
multiple of the model. Not a test: the figures depend on the allocator and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = 2**30


def rss_now() -> int:
    return _status("VmRSS")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


OPT_350M = dict(  # facebook/opt-350m's shape, for models built from a config
    hidden_size=1024,
    ffn_dim=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    word_embed_proj_dim=512,
    vocab_size=50272,
    max_position_embeddings=2048,
    do_layer_norm_before=False,
)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def child(path: str, strategy_name: str, n: int, small: bool) -> dict:
    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from transformers import OPTConfig, OPTForCausalLM

    from fedtune import aggregation, checkpoint, config as C
    from fedtune.rounds import build_strategy
    from fedtune.simulation import set_task_identity

    torch.manual_seed(0)
    size = dict(hidden_size=256, ffn_dim=1024, num_hidden_layers=4) if small else {}
    model = OPTForCausalLM(OPTConfig(**(OPT_350M | size)))
    state = {k: v.detach() for k, v in model.named_parameters()}
    model_bytes = sum(t.numel() * 4 for t in state.values())
    momentum = ["strategy.params.server_momentum=0.9"] if strategy_name == "fedavgm" else []
    cfg = C.load(
        None,
        [f"strategy.name={strategy_name}", f"federation.num_clients={n}", *momentum],
        check_paths=False,
    )
    strategy = build_strategy(cfg)
    set_task_identity(run_id=1)
    global_arrays = ArrayRecord(state)

    class Grid:
        """N nodes; a reply is built when it is pulled (a client finishing), one per call."""

        def __init__(self):
            self.pending = {}

        def get_node_ids(self):
            return set(range(1, n + 1))

        def push_messages(self, messages):
            for i, m in enumerate(messages):
                m.metadata.__dict__["_message_id"] = f"m{i}"
                self.pending[f"m{i}"] = (i, m)
            return list(self.pending)

        def pull_messages(self, ids):
            key = next(k for k in ids if k in self.pending)
            return [reply(*self.pending.pop(key))]

        def send_and_receive(self, messages):
            ids = self.push_messages(messages)
            return [reply(*self.pending.pop(k)) for k in ids]

    def reply(i: int, message) -> Message:
        """A client's reply as it lands: one serialized copy of the model (built tensor by
        tensor, as a deserialized message is, so no second full copy exists meanwhile)."""
        arrays = ArrayRecord()
        for k, v in state.items():
            arrays[k] = Array((v * (1.0 + 1e-3 * (i + 1))).numpy())
        metrics = MetricRecord({"num-examples": 100 + i})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)

    grid = Grid()
    if strategy_name == "fedavgm":  # a later round: the momentum buffer of round 1 exists
        strategy.momentum_vector = [
            np.zeros(tuple(v.shape), np.float32) + 1e-6 for v in state.values()
        ]
    messages = list(strategy.configure_train(2, global_arrays, ConfigRecord({}), grid))
    base = rss_now()
    reset_peak()
    if path == "stock":
        replies = grid.send_and_receive(messages)
        new_arrays, _ = strategy.aggregate_train(2, replies)
        del replies
    else:
        folded = aggregation.RunningMean()
        for r in aggregation.pull_as_they_arrive(grid, messages, poll_s=0.0):
            folded.add(r.content["arrays"], float(r.content["metrics"]["num-examples"]))
            del r
        new_arrays = aggregation.aggregate(strategy, 2, folded, messages[0])
    peak = _status("VmHWM")
    assert new_arrays is not None and new_arrays.keys() == global_arrays.keys()
    with tempfile.TemporaryDirectory() as d:
        torch.save(checkpoint.strategy_state(strategy), Path(d) / "server_state.pt")
        ckpt = (Path(d) / "server_state.pt").stat().st_size
    return {
        "path": path,
        "strategy": strategy_name,
        "clients": n,
        "model_gb": model_bytes / GIB,
        "baseline_x": base / model_bytes,
        "step_peak_x": (peak - base) / model_bytes,
        "server_state_x": ckpt / model_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--strategies", nargs="+", default=["fedavg", "fedavgm"])
    ap.add_argument("--small", action="store_true", help="a 4-layer model: a quick check")
    ap.add_argument("--child", nargs=3, metavar=("PATH", "STRATEGY", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, name, n = args.child
        print(json.dumps(child(path, name, int(n), args.small)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    rows = []
    for name in args.strategies:
        for n in args.clients:
            for path in ("stock", "fedtune"):
                cmd = [sys.executable, __file__, "--child", path, name, str(n)]
                out = subprocess.run(
                    cmd + (["--small"] if args.small else []),
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                r = rows[-1]
                print(
                    f"  {name} N={n} {path}: step peak {r['step_peak_x']:.2f} x model",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"model: {rows[0]['model_gb']:.2f} GiB of fp32 tensors; baseline (server model + "
        f"global ArrayRecord) {rows[0]['baseline_x']:.2f} x model\n"
    )
    print(
        "| strategy | clients | baseline | stock step peak | fedtune step peak | "
        "stock / fedtune | server_state.pt |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.strategies:
        for n in args.clients:
            s, f = (
                next(r for r in rows if (r["strategy"], r["clients"], r["path"]) == (name, n, p))
                for p in ("stock", "fedtune")
            )
            print(
                f"| {name} | {n} | {f['baseline_x']:.2f} x | {s['step_peak_x']:.2f} x | "
                f"{f['step_peak_x']:.2f} x | "
                f"{s['step_peak_x'] / f['step_peak_x']:.1f} | {f['server_state_x']:.2f} x |"
            )
    print("\n(step peak: the aggregation step's peak RSS above the baseline, in model sizes)")


if __name__ == "__main__":
    main()
