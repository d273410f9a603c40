"""The offline demo recipe on its real pretrained model and real code: it must learn."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_recipe_lowers_eval_loss_with_the_real_model(tmp_path):
    out = tmp_path / "demo"
    # one short round: same model, data, LoRA and optimizer as the demo, fewer steps
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "run", str(ROOT / "recipes/demo.toml"),
         "--set", "federation.rounds=1", "--set", "train.local_steps=4",
         "--set", "eval.max_blocks=16", "--set", f"output.dir={out}"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    # SmolLM2-135M-Instruct already knows Python: its loss starts far below log(49152) = 10.8
    assert rows[0]["eval_loss"] < 4.0
    assert rows[1]["eval_loss"] < rows[0]["eval_loss"] - 0.01
    assert rows[1]["clients_ok"] == 3
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["final_eval_loss"] == pytest.approx(rows[1]["eval_loss"])
