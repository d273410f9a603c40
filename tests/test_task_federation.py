"""Each task through the server round loop (clients in-process): metrics, partitions, heads."""

import json

import pytest
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

import independent
from fedtune import config as C, model as M
from fedtune.federation import run_federation
from fedtune.inprocess import InProcessGrid
from fedtune.tasks import classification_prompt, load_task_data
from test_federation import rows_of

PROMPT = 'task.prompt="Review: {text}\\nSentiment:"'


def base(model_dir, source, out, *extra):
    return C.load(
        None,
        [
            f"model.name={model_dir}",
            f"data.source={source}",
            "data.test_samples=12",
            "data.seq_len=48",
            "federation.num_clients=3",
            "federation.rounds=1",
            "train.local_steps=2",
            "train.batch_size=4",
            "train.lr=5e-3",
            "output.save_final=true",
            f"output.dir={out}",
            *extra,
        ],
    )


def prompt_metrics_by_hand(cfg, base_dir, final) -> dict:
    """Label log-likelihood accuracy/F1/MCC and greedy-generation accuracy/ROUGE of the saved
    adapter, one test row at a time with stock PEFT and plain torch (no fedtune scoring)."""
    from peft import PeftModel
    from rouge_score import rouge_scorer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), final)
    model.eval()
    tok = AutoTokenizer.from_pretrained(final)
    t = cfg.task
    labels = [
        tok(t.label_prefix + n, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for n in t.label_names
    ]
    longest = max(map(len, labels))
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"])
    preds, golds, hits, rouge = [], [], 0, {k: 0.0 for k in scorer.rouge_types}
    test = load_task_data(cfg)[0]
    for row in test:
        p = independent.prompt_ids(tok, classification_prompt(row, t))
        scores = [independent.completion_logprob(model, p, c) for c in labels]
        preds.append(max(range(len(scores)), key=scores.__getitem__))
        golds.append(row[t.label_column])
        text = tok.decode(
            independent.greedy(model, p, longest + 2, {tok.eos_token_id}), skip_special_tokens=True
        ).strip()
        ref = t.label_names[golds[-1]]
        hits += text.lower() == ref.lower()
        for k, v in scorer.score(ref, text).items():
            rouge[k] += v.fmeasure
    n = len(golds)
    return {
        "eval_accuracy": accuracy_score(golds, preds),
        "eval_f1_macro": f1_score(golds, preds, average="macro"),
        "eval_mcc": matthews_corrcoef(golds, preds),
        "eval_gen_accuracy": hits / n,
        **{f"eval_{k}": v / n for k, v in rouge.items()},
    }


def classifier_predictions_by_hand(cfg, base_dir, final):
    """argmax of the saved classifier (stock PEFT), one test row at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base_model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    model = PeftModel.from_pretrained(base_model, final).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    preds, golds = [], []
    for row in load_task_data(cfg)[0]:
        enc = tok(row["text"], truncation=True, max_length=cfg.data.seq_len, return_tensors="pt")
        with torch.no_grad():
            preds.append(int(model(**enc).logits.argmax(-1)))
        golds.append(row[cfg.task.label_column])
    return preds, golds


def test_prompt_classification_round_reports_scoring_generation_and_label_histograms(
    tmp_path, tiny_model_dir, reviews_jsonl
):
    cfg = base(
        tiny_model_dir,
        reviews_jsonl,
        tmp_path / "run",
        "task.type=prompt-classification",
        PROMPT,
        "task.label_names=['negative','positive']",
        "lora.target_modules=['q_proj','v_proj']",
        "data.partitioner=dirichlet",
        "data.dirichlet_alpha=0.3",
        "data.min_partition_size=2",
    )
    summary = run_federation(InProcessGrid(cfg), cfg)
    rows = rows_of(tmp_path / "run")
    expected = prompt_metrics_by_hand(cfg, tiny_model_dir, tmp_path / "run" / "final")
    for key, value in expected.items():
        assert rows[-1][key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    assert summary["rounds_completed"] == 1
    parts = json.loads((tmp_path / "run" / "partitions.json").read_text())
    assert parts["column"] == "label" and parts["groups"] == ["negative", "positive"]
    assert sum(sum(c["histogram"].values()) for c in parts["clients"]) == 60 - 12
    assert (tmp_path / "run" / "plots" / "partitions.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()


def test_sequence_classification_lora_sends_the_classifier_head(
    tmp_path, tiny_bert_dir, reviews_jsonl
):
    cfg = base(
        tiny_bert_dir,
        reviews_jsonl,
        tmp_path / "run",
        "task.type=sequence-classification",
        "task.text_columns=['text']",
        "task.label_names=['negative','positive']",
        "lora.target_modules=['query','value']",
        "data.partitioner=natural",
        "data.partition_by=domain",
    )
    model = M.load_model(cfg)
    names = list(M.trainable_state(model))
    assert any("classifier" in n for n in names) and any("lora_" in n for n in names)
    # the seeded head is identical in every process that builds the model
    again = M.trainable_state(M.load_model(cfg))
    assert all((again[n] == t).all() for n, t in M.trainable_state(model).items())
    run_federation(InProcessGrid(cfg), cfg)
    rows = rows_of(tmp_path / "run")
    preds, golds = classifier_predictions_by_hand(cfg, tiny_bert_dir, tmp_path / "run" / "final")
    assert rows[1]["eval_accuracy"] == pytest.approx(accuracy_score(golds, preds))
    assert rows[1]["eval_mcc"] == pytest.approx(matthews_corrcoef(golds, preds), abs=1e-9)
    assert rows[1]["eval_f1_macro"] == pytest.approx(f1_score(golds, preds, average="macro"))
    parts = json.loads((tmp_path / "run" / "partitions.json").read_text())
    assert [list(c["histogram"]) for c in parts["clients"]] == [["movies"], ["news"], ["shop"]]
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base_model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    loaded = PeftModel.from_pretrained(base_model, tmp_path / "run" / "final")
    head = {
        n: p for n, p in loaded.named_parameters() if "classifier" in n and "modules_to_save" in n
    }
    assert head, "the trained head is saved with the adapter"


def test_instruction_round_uses_response_loss_and_group_partitions(tmp_path, tiny_model_dir):
    src = tmp_path / "instr.jsonl"
    with src.open("w") as f:
        for i in range(40):
            f.write(
                json.dumps(
                    {
                        "instruction": f"Repeat the number {i}",
                        "input": "",
                        "output": f"{i} {i} {i}",
                        "topic": f"t{i % 4}",
                    }
                )
                + "\n"
            )
    cfg = base(
        tiny_model_dir,
        src,
        tmp_path / "run",
        "task.type=instruction",
        "lora.target_modules=['q_proj','v_proj']",
        "data.partitioner=shards",
        "data.partition_by=topic",
        "data.shards_per_client=1",
        "federation.num_clients=2",
        "data.test_samples=8",
    )
    run_federation(InProcessGrid(cfg), cfg)
    rows = rows_of(tmp_path / "run")
    assert rows[1]["eval_loss"] < rows[0]["eval_loss"]  # 2 steps at 5e-3 on a trivial task
    parts = json.loads((tmp_path / "run" / "partitions.json").read_text())
    a, b = (c["histogram"] for c in parts["clients"])
    assert "t3" not in a and "t0" not in b  # label-sorted shards: different topics per client


def test_qlora_without_cuda_is_a_clear_error_before_anything_loads():
    import torch

    cfg = C.load("recipes/alpaca-qlora-fedavg.toml", check_paths=False)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the error is about machines without it
    with pytest.raises(M.ModelError, match="needs a CUDA GPU"):
        M.check_runtime(cfg)


def test_fedtune_eval_reproduces_the_runs_final_metrics_and_runs_mmlu(
    tmp_path, tiny_model_dir, reviews_jsonl
):
    from fedtune.cli import main

    cfg = base(
        tiny_model_dir,
        reviews_jsonl,
        tmp_path / "run",
        "task.type=prompt-classification",
        PROMPT,
        "task.label_names=['negative','positive']",
        "lora.target_modules=['q_proj','v_proj']",
        "eval.generate=false",
    )
    run_federation(InProcessGrid(cfg), cfg)
    last = rows_of(tmp_path / "run")[-1]
    questions = tmp_path / "mc.jsonl"
    with questions.open("w") as f:
        for i in range(6):
            f.write(
                json.dumps(
                    {
                        "question": f"What is {i} + 1?",
                        "subject": "elementary_mathematics",
                        "choices": [str(i), str(i + 1), str(i + 2), "none"],
                        "answer": "B",
                    }
                )
                + "\n"
            )
    code = main(
        [
            "eval",
            str(tmp_path / "run"),
            "--suite",
            "task,mmlu",
            "--set",
            f"eval.mmlu_source={questions}",
        ]
    )
    assert code == 0
    got = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    assert got["trained"] is True
    for key in ("eval_loss", "eval_accuracy", "eval_mcc"):
        assert got["task"][key] == pytest.approx(last[key], rel=1e-5), key
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune import mmlu

    qs = mmlu.load_questions(str(questions))
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "run" / "final"
    ).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    assert got["eval_mmlu_accuracy"] == pytest.approx(
        independent.letter_accuracy(model, tok, qs, [mmlu.format_prompt(q) for q in qs]), abs=1e-9
    )
    detail = json.loads((tmp_path / "run" / "eval" / "mmlu-round-final.json").read_text())
    assert detail["num_questions"] == 6 and "STEM" in detail["by_category"]
    # a base model by path: evaluated untrained, results in --out
    assert (
        main(
            [
                "eval",
                str(tiny_model_dir),
                "--suite",
                "mmlu",
                "--out",
                str(tmp_path / "base"),
                "--set",
                f"eval.mmlu_source={questions}",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "base" / "eval" / "summary.json").read_text())["trained"] is False
