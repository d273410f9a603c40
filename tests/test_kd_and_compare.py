"""FedKD-LoRA (loss, public slice, teacher cache) and the data the baseline arms see."""

import json
import math
import sys

import pytest
import torch

from fedtune import config as C, kd, model as M, tasks
from fedtune.compress import bundle
from fedtune.federation import run_federation
from fedtune.inprocess import InProcessGrid
from fedtune.results import best_round
from fedtune.tasks import IGNORE, load_task_data
from test_federation import rows_of


def test_kd_loss_equals_a_hand_computation_for_classification():
    s = torch.tensor([[2.0, 0.0], [0.5, 1.5]])
    t = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 1])
    T, lam = 2.0, 0.3
    ce = (
        -(
            math.log(math.exp(2) / (math.exp(2) + 1))
            + math.log(math.exp(1.5) / (math.exp(0.5) + math.exp(1.5)))
        )
        / 2
    )

    def soft(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    kl = 0.0
    for sv, tv in zip(s.tolist(), t.tolist()):
        ps, pt = soft(sv), soft(tv)
        kl += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    kl /= 2
    expected = (1 - lam) * ce + lam * T * T * kl
    got = kd.kd_loss(s, t, y, T, lam, causal=False).item()
    assert got == pytest.approx(expected, rel=1e-6)
    # lambda = 0 is plain cross-entropy; identical teacher and student leave only CE
    assert kd.kd_loss(s, t, y, T, 0.0, False).item() == pytest.approx(ce, rel=1e-6)
    assert kd.kd_loss(s, s, y, T, 0.5, False).item() == pytest.approx(0.5 * ce, rel=1e-6)


def test_causal_kd_counts_only_labelled_next_tokens():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 4, 5, generator=g), torch.randn(1, 4, 5, generator=g)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 1]])  # positions 1 and 2 predict tokens 3 and 1
    got = kd.kd_loss(s, t, labels, 1.0, 0.5, causal=True)
    rows_s, rows_t, targets = s[0, 1:3], t[0, 1:3], torch.tensor([3, 1])
    ce = torch.nn.functional.cross_entropy(rows_s, targets)
    kl = (rows_t.softmax(-1) * (rows_t.log_softmax(-1) - rows_s.log_softmax(-1))).sum(-1).mean()
    assert got.item() == pytest.approx((0.5 * ce + 0.5 * kl).item(), rel=1e-5)


def kd_cfg(model_dir, source, out, *extra):
    return C.load(
        None,
        [
            f"model.name={model_dir}",
            f"data.source={source}",
            "data.test_samples=10",
            "data.seq_len=32",
            "federation.num_clients=2",
            "federation.rounds=1",
            "train.local_steps=2",
            "train.batch_size=4",
            "kd.teacher_data_pct=0.25",
            "kd.teacher_epochs=1",
            "kd.teacher_lr=1e-3",
            "output.save_final=false",
            f"output.dir={out}",
            *extra,
        ],
    )


def texts(ds):
    return sorted(ds["text"])


def test_public_slice_is_disjoint_from_every_client_and_the_test_split(
    tmp_path, tiny_model_dir, reviews_jsonl
):
    cfg = kd_cfg(tiny_model_dir, reviews_jsonl, tmp_path, "federation.num_clients=3")
    test, parts, _, public = load_task_data(cfg, with_public=True)
    assert len(public) == round(0.25 * (60 - 10))
    pub = set(public["text"])
    assert pub.isdisjoint(test["text"])
    for p in parts:
        assert pub.isdisjoint(p["text"])
    assert len(pub) + sum(len(p) for p in parts) + len(test) == 60
    # the KD switch does not move data: every arm of a comparison trains on the same clients
    on = kd_cfg(
        tiny_model_dir, reviews_jsonl, tmp_path, "federation.num_clients=3", "kd.enabled=true"
    )
    assert [texts(p) for p in load_task_data(on)[1]] == [texts(p) for p in parts]


def test_centralized_sees_exactly_the_union_and_local_only_one_client(
    tmp_path, tiny_model_dir, reviews_jsonl
):
    cfg = kd_cfg(
        tiny_model_dir,
        reviews_jsonl,
        tmp_path,
        "federation.num_clients=3",
        "data.partitioner=dirichlet",
        "data.dirichlet_alpha=0.5",
        "task.type=sequence-classification",
        "task.text_columns=['text']",
        "task.label_names=['negative','positive']",
    )
    _, parts, _ = load_task_data(cfg)
    union = kd_cfg(
        tiny_model_dir,
        reviews_jsonl,
        tmp_path,
        "federation.num_clients=1",
        "data.partitioner=dirichlet",
        "data.dirichlet_alpha=0.5",
        "task.type=sequence-classification",
        "task.text_columns=['text']",
        "task.label_names=['negative','positive']",
        "data.merge_partitions=[0,1,2]",
        "data.split_clients=3",
    )
    [merged] = load_task_data(union)[1]
    assert texts(merged) == sorted(t for p in parts for t in p["text"])
    alone = kd_cfg(
        tiny_model_dir,
        reviews_jsonl,
        tmp_path,
        "federation.num_clients=1",
        "data.partitioner=dirichlet",
        "data.dirichlet_alpha=0.5",
        "task.type=sequence-classification",
        "task.text_columns=['text']",
        "task.label_names=['negative','positive']",
        "data.merge_partitions=[2]",
        "data.split_clients=3",
    )
    assert texts(load_task_data(alone)[1][0]) == texts(parts[2])


def teacher_accuracy_by_hand(folder, cfg, kind) -> float:
    """The trained teacher's test accuracy from its save_pretrained folder, row by row."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import independent
    from fedtune.tasks import classification_prompt

    tok = AutoTokenizer.from_pretrained(folder)
    test, t, right = load_task_data(cfg)[0], cfg.task, 0
    if kind == "causal":
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        labels = [
            tok(t.label_prefix + n, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for n in t.label_names
        ]
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    for row in test:
        if kind == "causal":
            p = independent.prompt_ids(tok, classification_prompt(row, t))
            scores = [independent.completion_logprob(model, p, c) for c in labels]
            pred = max(range(len(scores)), key=scores.__getitem__)
        else:
            with torch.no_grad():
                enc = tok(
                    row["text"], truncation=True, max_length=cfg.data.seq_len, return_tensors="pt"
                )
                pred = int(model(**enc).logits.argmax(-1))
        right += pred == row[t.label_column]
    return right / len(test)


@pytest.mark.parametrize("kind", ["sequence-classification", "causal"])
def test_fedkd_round_trains_the_teacher_once_and_distils_into_lora(
    tmp_path, monkeypatch, kind, tiny_model_dir, tiny_bert_dir, reviews_jsonl
):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    if kind == "causal":
        extra = [
            f"model.name={tiny_model_dir}",
            "task.type=prompt-classification",
            'task.prompt="Review: {text}\\nSentiment:"',
            "eval.generate=false",
            "lora.target_modules=['q_proj','v_proj']",
        ]
    else:
        extra = [
            f"model.name={tiny_bert_dir}",
            "task.type=sequence-classification",
            "task.text_columns=['text']",
            "lora.target_modules=['query','value']",
        ]
    cfg = kd_cfg(
        tiny_model_dir,
        reviews_jsonl,
        tmp_path / "run",
        *extra,
        "kd.enabled=true",
        "task.label_names=['negative','positive']",
    )
    folder = kd.ensure_teacher(cfg)
    info = json.loads((folder / "fedtune-teacher.json").read_text())
    assert info["public_samples"] == round(0.25 * 50) and info["steps"] >= 1
    # the teacher was scored on the test split: recompute its accuracy row by row
    assert info["test_metrics"]["eval_accuracy"] == pytest.approx(
        teacher_accuracy_by_hand(folder, cfg, kind), abs=1e-9
    )
    stamp = (folder / "config.json").stat().st_mtime_ns
    monkeypatch.setattr(kd, "train_local", lambda *a, **k: pytest.fail("retrained"))
    assert kd.ensure_teacher(cfg) == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    run_federation(InProcessGrid(cfg), cfg)
    rows = rows_of(tmp_path / "run")
    assert rows[1]["clients_ok"] == 2 and rows[1]["train_loss"] > 0
    # only the student's LoRA (+ head) travels: the bytes equal a plain LoRA run's
    plain = bundle(M.to_arrays(M.load_model(cfg))).count_bytes()
    assert rows[1]["bytes_up"] == 2 * plain


def test_teacher_with_another_tokenizer_is_a_clear_error(
    tmp_path, monkeypatch, tiny_model_dir, tiny_bert_dir, reviews_jsonl
):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    cfg = kd_cfg(
        tiny_model_dir,
        reviews_jsonl,
        tmp_path / "run",
        "kd.enabled=true",
        f"kd.teacher={tiny_bert_dir}",
        "task.type=instruction",
        "task.instruction_column=text",
        "task.output_column=text",
    )
    with pytest.raises(kd.KDError, match="different tokenizers"):
        kd.ensure_teacher(cfg)


@pytest.mark.slow
def test_compare_reports_a_failing_arm_and_finishes_the_others(
    tmp_path, tiny_model_dir, tiny_bert_dir, reviews_jsonl
):
    import subprocess

    recipe = tmp_path / "study.toml"
    recipe.write_text(f"""
[model]
name = "{tiny_model_dir}"
[lora]
target_modules = ["q_proj", "v_proj"]
[data]
source = "{reviews_jsonl}"
test_samples = 10
seq_len = 32
[task]
type = "prompt-classification"
prompt = "Review: {{text}}\\nSentiment:"
label_names = ["negative", "positive"]
[federation]
num_clients = 2
rounds = 2
[train]
local_steps = 2
batch_size = 4
lr = 5e-3
[kd]
teacher = "{tiny_bert_dir}"
teacher_data_pct = 0.2
[eval]
generate = false
[output]
dir = "{tmp_path / "cmp"}"
save_final = false
[compare]
arms = ["pretrained", "centralized", "local-only", "fedkd-lora"]
""")
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "compare", str(recipe)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "FEDTUNE_CACHE": str(tmp_path / "c")},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    c = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    arms = c["arms"]
    assert arms["fedkd-lora"]["status"] == "failed"
    assert "different tokenizers" in arms["fedkd-lora"]["error"]
    for arm in ("pretrained", "centralized", "local-only"):
        assert arms[arm]["status"] == "ok", arms[arm]
    assert [r for r, _ in arms["pretrained"]["seeds"][0]["curve"]] == [0]
    assert [r for r, _ in arms["centralized"]["seeds"][0]["curve"]] == [0, 1, 2]
    assert arms["local-only"]["worst_client_mean"] is not None
    assert arms["centralized"]["megabytes_mean"] == 0.0
    # centralized: one client, 2 clients' worth of steps per round
    cent = [
        json.loads(x)
        for x in (tmp_path / "cmp" / "centralized-seed0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert cent[1]["clients_ok"] == 1 and cent[1]["train_samples"] == 2 * 2 * 4
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "**failed**" in md and "| centralized | " in md and "n/a | n/a" not in md
    assert (tmp_path / "cmp" / "plots" / "comparison_metric.png").exists()
    assert (tmp_path / "cmp" / "plots" / "comparison_cost.png").exists()
    # `fedtune report` on a comparison folder rewrites the table and plots from the JSON
    (tmp_path / "cmp" / "comparison.md").write_text("stale")
    from fedtune.cli import main

    assert main(["report", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "comparison.md").read_text() == md


def test_comparison_summaries_mean_worst_client_and_rounds_to_best():
    from fedtune import compare
    from fedtune.report import study_markdown

    def run(values, seconds=10.0, mb=1.0):
        return {
            "rows": [
                {"round": i, "eval_accuracy": v, "eval_loss": 1 - v} for i, v in enumerate(values)
            ],
            "seconds": seconds,
            "megabytes": mb,
            "run_dir": "x",
        }

    # local-only: two clients alone; the table shows their mean and the worst one
    s = compare._summarize_seed(
        [run([0.5, 0.7, 0.6]), run([0.5, 0.9, 0.8])], "eval_accuracy", "max"
    )
    assert s["final"] == pytest.approx(0.7) and s["worst_client"] == pytest.approx(0.6)
    assert s["best_round"] == 1 and s["best"] == pytest.approx(0.8)
    assert s["seconds"] == 20.0 and s["final_metrics"]["eval_loss"] == pytest.approx(0.3)
    one = compare._summarize_seed([run([0.6, 0.6, 0.7])], "eval_loss", "min")
    assert one["worst_client"] is None and one["best_round"] == 2  # lower loss is better
    ties = [{"round": r, "eval_loss": v} for r, v in [(0, 1.0), (1, 0.5), (2, 0.5)]]
    assert best_round(ties, "eval_loss")["round"] == 1  # earliest on ties
    table = study_markdown(
        {
            "task": "t",
            "model": "m",
            "num_clients": 2,
            "rounds": 2,
            "seeds": 2,
            "metric": "eval_accuracy",
            "mode": "max",
            "teacher": {},
            "arms": {
                "fedlora": {
                    "status": "ok",
                    "final_mean": 0.7,
                    "final_std": 0.05,
                    "best_mean": 0.75,
                    "best_round_mean": 1.5,
                    "worst_client_mean": None,
                    "seconds_mean": 12.0,
                    "megabytes_mean": 3.5,
                    "final_metrics_mean": {"eval_accuracy": 0.7},
                },
                "fedkd-lora": {"status": "failed", "error": "KDError: boom"},
            },
        }
    )
    assert "| fedlora | 0.7000 ± 0.0500 | 0.7500 | 1.5 | 12 | 3.5 | ok |" in table
    assert "| fedkd-lora | — | — | — | — | — | **failed**: KDError: boom |" in table


def test_arm_configs_share_data_and_seed_and_differ_only_where_named(tmp_path):
    from fedtune import compare

    base = C.load(
        "recipes/compare-encoder-fedkd.toml", [f"output.dir={tmp_path}"], check_paths=False
    )
    cfgs = {
        arm: [C.from_dict(raw) for _, raw, _ in compare.arm_runs(base, arm, 0, tmp_path)]
        for arm in C.FIXED_ARMS
    }
    full, lora, fkd = cfgs["fedavg-full"][0], cfgs["fedlora"][0], cfgs["fedkd-lora"][0]
    assert (full.model.finetune, lora.model.finetune, fkd.model.finetune) == (
        "full",
        "lora",
        "lora",
    )
    assert fkd.kd.enabled and not lora.kd.enabled and lora.train.lr == 3e-3  # per-arm override
    for c in [full, lora, fkd, *cfgs["centralized"], *cfgs["pretrained"]]:
        assert c.data == base.data or c.data.merge_partitions  # same data, same split
        assert c.kd.teacher_data_pct == 0.2 and c.train.seed == 0
    [cent] = cfgs["centralized"]
    assert cent.data.merge_partitions == [0, 1, 2, 3] and cent.federation.num_clients == 1
    assert cent.train.local_steps == 4 * base.train.local_steps
    assert [c.data.merge_partitions for c in cfgs["local-only"]] == [[0], [1], [2], [3]]
    assert cfgs["pretrained"][0].federation.rounds == 0


def test_client_example_cache_tells_apart_runs_with_and_without_a_public_slice(
    tmp_path, monkeypatch, tiny_model_dir, reviews_jsonl
):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    tok = M.load_tokenizer(str(tiny_model_dir))
    with_public = kd_cfg(
        tiny_model_dir,
        reviews_jsonl,
        tmp_path,
        "task.type=instruction",
        "task.instruction_column=text",
        "task.output_column=domain",
    )
    without = kd_cfg(
        tiny_model_dir,
        reviews_jsonl,
        tmp_path,
        "task.type=instruction",
        "task.instruction_column=text",
        "task.output_column=domain",
        "kd.teacher_data_pct=0.0",
    )
    a = tasks.client_examples(with_public, 0, tok)  # examples cached on disk
    b = tasks.client_examples(without, 0, tok)
    assert len(a) == len(load_task_data(with_public)[1][0])
    assert len(b) == len(load_task_data(without)[1][0]) and len(b) > len(a)
