"""One hostile client out of four against each defence: final eval loss in one table.

    python bench/robustness.py                     # the offline demo, 4 clients, 3 rounds
    python bench/robustness.py --set federation.rounds=2 --set train.local_steps=4

Client 3 attacks in every round by replacing its update u (its weights - the global
weights it received) with (a) NaN, (b) 100 u, (c) Gaussian noise of the norm of u, or
(d) -u. Defences: FedAvg (replies with NaN/Inf, wrong keys, shapes or dtypes are always
rejected), FedAvg with `robust.clip_update_norm` and `robust.max_update_norm` (set from
the honest run's largest update norm: clip at 1x, reject above 5x), and Flower's FedMedian,
FedTrimmedAvg (beta 0.25: one reply cut at each end) and Krum (f = 0: the single reply
closest to the others). Every run has the same seed, partitions and clients (in-process,
early stopping off); the attacker is injected by a grid wrapper here, never in fedtune.
Prints the final eval loss of each (defence, attack) and its change from the no-attacker
FedAvg run. Not a test: one seed, this machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, MessageType

from fedtune import config as C
from fedtune.federation import run_federation
from fedtune.inprocess import InProcessGrid
from fedtune.results import read_metrics

ROOT = Path(__file__).resolve().parents[1]
ATTACKER = 3


def nan(u, rng):
    return np.full_like(u, np.nan)


def x100(u, rng):
    return 100 * u


def noise(u, rng):
    return rng.standard_normal(u.shape).astype(u.dtype)  # scaled to |u| over all tensors


def flip(u, rng):
    return -u


ATTACKS = {"none": None, "NaN": nan, "x100": x100, "noise": noise, "sign-flip": flip}


class AttackerGrid(InProcessGrid):
    """Partition ATTACKER's train replies carry `attack(update)` instead of its update."""

    def __init__(self, cfg, attack):
        super().__init__(cfg)
        self.attack, self.rng = attack, np.random.default_rng(0)

    def handle(self, message):
        reply = super().handle(message)
        pid = self.contexts[message.metadata.dst_node_id].node_config["partition-id"]
        is_train = message.metadata.message_type == MessageType.TRAIN
        if self.attack is None or not is_train or pid != ATTACKER or reply.has_error():
            return reply
        sent = {k: v.numpy() for k, v in message.content["arrays"].items()}
        update = {k: v.numpy() - sent[k] for k, v in reply.content["arrays"].items()}
        bad = {k: self.attack(u, self.rng) for k, u in update.items()}
        if self.attack is noise:  # Gaussian noise with the norm of the real update
            scale = _norm(update) / _norm(bad)
            bad = {k: v * scale for k, v in bad.items()}
        reply.content["arrays"] = ArrayRecord({k: Array(sent[k] + bad[k]) for k in bad})
        return reply


def _norm(arrays: dict) -> float:
    return math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in arrays.values()))


def run(recipe, extra, defence: list[str], attack, out: Path) -> dict:
    sets = [
        "federation.num_clients=4",
        f"output.dir={out}",
        "output.plots=false",
        "output.save_every=0",
        "output.save_final=false",
        "output.keep_best=false",
        "train.early_stopping={}",
        *extra,
        *defence,
    ]
    cfg = C.load(recipe, sets)
    t0 = time.perf_counter()
    run_federation(AttackerGrid(cfg, attack), cfg)
    rows = read_metrics(out)
    return {
        "final_eval_loss": rows[-1]["eval_loss"],
        "rejected": sum(
            f["error"].startswith("rejected") for r in rows for f in r.get("failures", [])
        ),
        "update_norm_max": max(r.get("update_norm_max", 0.0) for r in rows[1:]),
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.toml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS)[1:], choices=list(ATTACKS)[1:])
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:

        def one(name, defence, attack_name):
            out = Path(tmp) / f"run{len(results)}"
            r = run(args.recipe, args.set, defence, ATTACKS[attack_name], out)
            results[(name, attack_name)] = r
            print(
                f"  {name} / {attack_name}: eval loss {r['final_eval_loss']:.4f}, "
                f"{r['rejected']} rejected ({r['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            return r

        honest = one("fedavg", [], "none")
        norm = honest["update_norm_max"]  # the largest honest update seen
        defences = {
            "fedavg": [],
            "fedavg + clip/limit": [
                f"robust.clip_update_norm={norm:.6g}",
                f"robust.max_update_norm={5 * norm:.6g}",
            ],
            "fedmedian": ["strategy.name=fedmedian"],
            "fedtrimmedavg": ["strategy.name=fedtrimmedavg", "strategy.params.beta=0.25"],
            "krum": ["strategy.name=krum"],
        }
        for name, defence in defences.items():
            for attack_name in ["none", *args.attacks]:
                if (name, attack_name) not in results:
                    one(name, defence, attack_name)
    base = honest["final_eval_loss"]
    print(
        f"{Path(args.recipe).name}, 4 clients, client {ATTACKER} attacking every round; final "
        f"eval loss (change from the no-attacker FedAvg run, {base:.4f}); clip/limit at "
        f"{norm:.4g} / {5 * norm:.4g}\n"
    )
    attacks = ["none", *args.attacks]
    print("| defence | " + " | ".join(attacks) + " |")
    print("|---|" + "---|" * len(attacks))
    for name in defences:
        cells = []
        for a in attacks:
            loss = results[(name, a)]["final_eval_loss"]
            change = 100 * (loss - base) / base if math.isfinite(loss) else math.nan
            cells.append(f"{loss:.4f} ({change:+.1f} %)" if math.isfinite(loss) else "NaN")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        rows = [{"defence": d, "attack": a, **r} for (d, a), r in results.items()]
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
