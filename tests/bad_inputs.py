"""The bad-input table: each case must stop `fedtune run` with one line and exit code 2,
before any process starts and without a run folder. Shared by tests/test_bad_input.py (in
process) and bench/bad_input.py (real subprocesses, timed)."""

from __future__ import annotations

import json
from pathlib import Path

import tinymodels

# id -> (what to change, a phrase the one-line message must contain)
TABLE = {
    "hub model while offline": (
        ["model.name=facebook/opt-350m"],
        "hub is switched off (HF_HUB_OFFLINE=1)",
    ),
    "hub-like name that is no folder": (
        ["model.name=models/mine"],
        "there is no local folder 'models/mine' either",
    ),
    "missing relative data path": (
        ["data.source=mydata/missing.jsonl"],
        "looks like a local path but does not exist",
    ),
    "empty jsonl": (["data.source={tmp}/empty.jsonl"], "is empty: no rows"),
    "empty txt": (["data.source={tmp}/empty.txt"], "is empty: no rows"),
    "non-UTF-8 txt": (["data.source={tmp}/latin1.txt"], "is not UTF-8 text (line 2"),
    "malformed jsonl line": (["data.source={tmp}/broken.jsonl"], "line 3 is not valid JSON"),
    "seq_len beyond positions": (
        ["model.name={gpt2}", "data.seq_len=128", "lora.target_modules=['c_attn']"],
        "exceeds the 64 positions",
    ),
    "LoRA target that matches nothing": (
        ["lora.target_modules=['q_proj','qproj_typo']"],
        "['qproj_typo'] match no module",
    ),
    "partition too small for a block": (
        [
            "data.source={tmp}/uneven.jsonl",
            "data.partitioner=natural",
            "data.partition_by=site",
            "data.test_samples=2",
        ],
        "client 1's partition (3 samples)",
    ),
    "negative proximal_mu": (
        ["strategy.name=fedprox", "strategy.params.proximal_mu=-0.1"],
        "must be >= 0",
    ),
    "FedAvgM momentum of 1": (
        ["strategy.name=fedavgm", "strategy.params.server_momentum=1.0"],
        "must be in [0, 1)",
    ),
    "FedAdam eta of 0": (["strategy.name=fedadam", "strategy.params.eta=0.0"], "must be > 0"),
    "float16 full fine-tuning": (
        ["model.dtype=float16", "model.finetune=full"],
        "AdamW turns into NaN",
    ),
    "min_clients above the sample": (["federation.min_clients=3"], "can never be met"),
    "unknown key": (["train.lrr=1"], "unknown key `train.lrr`; did you mean `train.lr`?"),
    "list items without quotes": (
        ["lora.target_modules=[q_proj,v_proj]"],
        "quote the items: lora.target_modules=['q_proj','v_proj']",
    ),
    "a metric the task never produces": (
        ["eval.metric=eval_accuracy"],
        "`eval.metric` = 'eval_accuracy': a causal-lm run does not produce it",
    ),
    "a misspelt metric": (["eval.metric=eval_los"], "did you mean 'eval_loss'?"),
    "resume a folder that is no run": (["--resume", "{tmp}/not-a-run"], "not a fedtune run folder"),
    "resume a run without checkpoints": (
        ["--resume", "{tmp}/run-without-checkpoints"],
        "nothing to resume",
    ),
    "recipe that is not TOML": (["--recipe", "{tmp}/broken.toml"], "(at line 2, column"),
}


def write_inputs(tmp: Path, tiny_llama: Path, tiny_gpt2: Path) -> Path:
    """The files the cases point at; returns the base recipe (valid on its own)."""
    tmp.mkdir(parents=True, exist_ok=True)
    code = tinymodels.code_jsonl(tmp / "code.jsonl")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "empty.txt").write_text("")
    (tmp / "latin1.txt").write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    (tmp / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",\n')
    with (tmp / "uneven.jsonl").open("w") as f:
        long = code.read_text().splitlines()
        for line in long:
            f.write(json.dumps({"text": json.loads(line)["text"], "site": "a"}) + "\n")
        for i in range(3):
            f.write(json.dumps({"text": f"x = {i}", "site": "b"}) + "\n")
    (tmp / "not-a-run").mkdir(exist_ok=True)
    run = tmp / "run-without-checkpoints"
    run.mkdir(exist_ok=True)
    recipe = tmp / "base.toml"
    recipe.write_text(
        f'[model]\nname = "{tiny_llama}"\n[lora]\ntarget_modules = ["q_proj", "v_proj"]\n'
        f'[data]\nsource = "{code}"\ntest_samples = 4\nseq_len = 32\n'
        "[federation]\nnum_clients = 2\nrounds = 1\n[train]\nlocal_steps = 1\n"
        f'[output]\ndir = "{tmp}/out"\n'
    )
    (run / "config.toml").write_text(recipe.read_text())
    (tmp / "broken.toml").write_text('[model]\nname "x"\n')
    (tmp / "mydata").mkdir(exist_ok=True)
    return recipe


def argv(case: str, tmp: Path, gpt2: Path, recipe: Path) -> list[str]:
    """`fedtune run` arguments of one case."""
    items = [x.format(tmp=tmp, gpt2=gpt2) for x in TABLE[case][0]]
    if items[0] == "--resume":
        return ["run", *items]
    if items[0] == "--recipe":
        return ["run", items[1]]
    out = ["run", str(recipe)]
    for item in items:
        out += ["--set", item]
    return out
