"""Golden losses: a tiny model, 2 rounds, fixed seed; any silent change in training,
aggregation or evaluation moves these numbers (torchtune's recipe tests do the same).

The stored values were written by this test with FEDTUNE_WRITE_GOLDEN=1 (on the 2-core CI
machine type, torch 2.13.0 CPU); rewrite them only for an intended change, and say why in
the commit.
"""

import json
import os
from pathlib import Path

import pytest

from fedtune.federation import run_federation
from fedtune.inprocess import InProcessGrid
from test_federation import make_cfg, rows_of

GOLDEN = Path(__file__).parent / "golden" / "losses.json"
CASES = {
    "lora-fedavg": (),
    "full-fedavgm": (
        "model.finetune=full",
        "strategy.name=fedavgm",
        "strategy.params.server_momentum=0.9",
        "train.lr=1e-3",
    ),
    "lora-fedprox-accum": (
        "strategy.name=fedprox",
        "strategy.params.proximal_mu=0.5",
        "train.grad_accum=2",
        "train.batch_size=1",
    ),
}
KEYS = ("eval_loss", "train_loss")


@pytest.mark.parametrize("case", list(CASES))
def test_losses_match_the_stored_values(case, tmp_path, tiny_model_dir, code_jsonl):
    cfg = make_cfg(tiny_model_dir, code_jsonl, tmp_path / case, "output.plots=false", *CASES[case])
    run_federation(InProcessGrid(cfg), cfg)
    got = [{k: r.get(k) for k in KEYS} for r in rows_of(tmp_path / case)]
    stored = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("FEDTUNE_WRITE_GOLDEN") == "1":
        stored[case] = got
        GOLDEN.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
    want = stored[case]
    assert [r["eval_loss"] for r in got] == pytest.approx([r["eval_loss"] for r in want], rel=1e-5)
    assert [r["train_loss"] for r in got[1:]] == pytest.approx(
        [r["train_loss"] for r in want[1:]], rel=1e-5
    )
