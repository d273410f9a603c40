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
        [
            sys.executable,
            "-m",
            "fedtune.cli",
            "run",
            str(ROOT / "recipes/demo.toml"),
            "--set",
            "federation.rounds=1",
            "--set",
            "train.local_steps=4",
            "--set",
            "eval.max_blocks=16",
            "--set",
            "eval.batch_size=1",
            "--set",
            f"output.dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    # SmolLM2-135M-Instruct already knows Python: its loss starts far below log(49152) = 10.8
    assert rows[0]["eval_loss"] < 4.0
    assert rows[1]["eval_loss"] < rows[0]["eval_loss"] - 0.01
    assert rows[1]["clients_ok"] == 3
    # an independent recomputation: a fresh process loads final/ with stock PEFT and
    # computes the test loss example by example with plain torch. eval.batch_size=1 above
    # gives both the same bf16 shapes: batches of 8 against one block at a time differed by
    # 4.5e-4 relative under bf16 autocast (CI, stop 18), more than a float tolerance.
    check = subprocess.run(
        [sys.executable, "-c", RECOMPUTE, str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT / "tests",
    )
    assert check.returncode == 0, check.stderr[-3000:]
    assert float(check.stdout.split()[-1]) == pytest.approx(rows[1]["eval_loss"], rel=1e-4)

    # final/ names its base by hub id, carries a model card of the run, and loads in a fresh
    # process with the README's offline snippet, copied from the README as written
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (out / "final" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert f"| eval_loss, round 0 -> final | {rows[0]['eval_loss']:.4f} -> " in card
    snippet = readme_block('resolve_model("offline:smollm2-135m-instruct")')
    assert '"runs/demo/final"' in snippet
    code = snippet.replace('"runs/demo/final"', repr(str(out / "final")))
    code += "\nprint(sum(p.numel() for n, p in model.named_parameters() if 'lora_' in n))\n"
    load = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert load.returncode == 0, load.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert int(load.stdout.split()[-1]) == summary["trainable_parameters"]


def readme_block(marker: str) -> str:
    """The README's python code block that contains `marker`."""
    blocks = (ROOT / "README.md").read_text().split("```python\n")[1:]
    (block,) = [b.split("```", 1)[0] for b in blocks if marker in b.split("```", 1)[0]]
    return block


RECOMPUTE = """
import sys
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForCausalLM
from fedtune import assets, config as C, model as M, tasks
from fedtune.tasks import load_task_data
import independent
run = Path(sys.argv[1])
cfg = C.load(run / "config.toml")
base = AutoModelForCausalLM.from_pretrained(assets.resolve_model(cfg.model.name))
model = PeftModel.from_pretrained(base, run / "final")
test = load_task_data(cfg)[0]
examples = tasks.encode(test, M.load_tokenizer(cfg.model.name), cfg)[: cfg.eval.max_blocks]
print(independent.token_loss(model, examples, M.resolved_precision(cfg.train.precision)))
"""


def mmlu_by_hand(run) -> float:
    """The final model's MMLU-format accuracy, scored question by question with plain torch."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import independent
    from fedtune import assets, config as C, mmlu, model as M

    cfg = C.load(run / "config.toml")
    e = cfg.eval
    questions = mmlu.load_questions(
        e.mmlu_source, e.mmlu_subset, e.mmlu_split, e.mmlu_max_questions, cfg.train.seed
    )
    base = AutoModelForCausalLM.from_pretrained(assets.resolve_model(cfg.model.name))
    model = PeftModel.from_pretrained(base, run / "final").eval()
    tok = AutoTokenizer.from_pretrained(run / "final")
    return independent.letter_accuracy(
        model,
        tok,
        questions,
        [mmlu.format_prompt(q) for q in questions],
        M.resolved_precision(cfg.train.precision),
    )


# The three task demos, shortened (1 round, few steps, small test split): they must run from
# the CLI on their real packaged model and data, print their metric per round, and write
# partitions.json with a histogram. Full-length figures are in the README. The instruction
# demo goes through the Simulation Engine; the two classification demos use in-process
# clients (the same ClientApp code, without paying Ray's start-up twice more in CI).
ENGINE = {
    "demo-instruct.toml": "simulation",
    "demo-prompt-sentiment.toml": "inprocess",
    "demo-encoder-sentiment.toml": "inprocess",
}
TASK_DEMOS = {
    "demo-instruct.toml": (
        [
            "data.max_samples=160",
            "data.test_samples=16",
            "train.local_steps=3",
            "eval.mmlu_max_questions=16",
            "output.save_every=0",
        ],
        "eval_loss",
        "min",
    ),
    "demo-prompt-sentiment.toml": (
        [
            "data.max_samples=400",
            "data.test_samples=48",
            "data.min_partition_size=20",
            "train.local_steps=6",
        ],
        "eval_accuracy",
        "max",
    ),
    "demo-encoder-sentiment.toml": (
        ["data.max_samples=1600", "data.test_samples=200", "train.local_steps=20"],
        "eval_accuracy",
        "max",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(TASK_DEMOS))
def test_task_demo_runs_and_prints_its_metric(tmp_path, recipe):
    extra, metric, mode = TASK_DEMOS[recipe]
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "fedtune.cli",
        "run",
        str(ROOT / "recipes" / recipe),
        "--engine",
        ENGINE[recipe],
    ]
    for o in ["federation.rounds=1", f"output.dir={out}", *extra]:
        args += ["--set", o]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    short = metric[len("eval_") :]
    assert "round 0/1 loss" in text and "round 1/1 loss" in text and f" {short} " in text
    assert all(metric in r for r in rows)
    parts = json.loads((out / "partitions.json").read_text())
    assert all(c["histogram"] for c in parts["clients"]), parts
    assert (out / "plots" / "partitions.png").exists()
    if recipe == "demo-instruct.toml":
        assert (out / "eval" / "mmlu-round-1.json").exists()
        assert rows[1]["eval_mmlu_accuracy"] == pytest.approx(mmlu_by_hand(out), abs=1e-9)
        assert rows[1]["eval_loss"] < rows[0]["eval_loss"]
    if recipe == "demo-encoder-sentiment.toml":
        assert rows[1]["eval_accuracy"] > rows[0]["eval_accuracy"] + 0.05
