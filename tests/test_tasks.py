"""Task encodings: which tokens carry loss, truncation, chat records, padding per batch."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, GPT2Tokenizer

from fedtune import config as C, data, tasks
from fedtune.tasks import IGNORE

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer_dir):
    t = GPT2Tokenizer.from_pretrained(gpt2_tokenizer_dir)
    t.pad_token = t.eos_token
    return t


def cfg_for(*overrides):
    return C.load(None, list(overrides), check_paths=False)


def labelled(ex):
    return [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]


def test_alpaca_loss_mask_covers_exactly_the_response_and_eos(tok):
    cfg = cfg_for("task.type=instruction", "data.seq_len=256")
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."}
    [ex] = tasks.encode(Dataset.from_list([row]), tok, cfg)
    prompt = tasks.alpaca_prompt("Add the numbers.", "2 and 3")
    n_prompt = len(tok(prompt)["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert labelled(ex) == tok(" The sum is 5.".lstrip())["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ex["input_ids"][:n_prompt]) == prompt
    assert "### Input:" in prompt
    # no input column value -> the no-input template
    [ex2] = tasks.encode(Dataset.from_list([{**row, "input": ""}]), tok, cfg)
    assert "### Input:" not in tok.decode(ex2["input_ids"])


def test_truncation_keeps_the_response_and_its_header(tok):
    cfg = cfg_for("task.type=instruction", "data.seq_len=64")
    long_instr = "word " * 300
    out = "alpha beta gamma delta " * 20  # ~80 tokens: longer than half the budget
    [ex] = tasks.encode(
        Dataset.from_list([{"instruction": long_instr, "input": "", "output": out}]), tok, cfg
    )
    assert len(ex["input_ids"]) == 64
    assert len(labelled(ex)) == 32  # seq_len // 2 response tokens survive
    text = tok.decode(ex["input_ids"])
    assert "### Response:\n" in text and text.index("### Response:") < text.index("alpha")
    short = "Yes."
    [ex] = tasks.encode(
        Dataset.from_list([{"instruction": long_instr, "input": "", "output": short}]), tok, cfg
    )
    assert labelled(ex) == tok(short)["input_ids"] + [tok.eos_token_id]  # all of it
    assert ex["input_ids"][-1] == tok.eos_token_id and len(ex["input_ids"]) == 64


def test_rows_with_empty_responses_are_dropped_and_none_left_is_an_error(tok):
    cfg = cfg_for("task.type=instruction", "data.seq_len=64")
    rows = [
        {"instruction": "x", "input": "", "output": " "},
        {"instruction": "y", "input": "", "output": "ok"},
    ]
    assert len(tasks.encode(Dataset.from_list(rows), tok, cfg)) == 1
    with pytest.raises(data.DataError, match="none of the 1 rows"):
        tasks.encode(Dataset.from_list(rows[:1]), tok, cfg)


def test_sharegpt_chat_with_chat_template_labels_only_assistant_turns(tok):
    tok = GPT2Tokenizer.from_pretrained(tok.name_or_path)
    tok.chat_template = CHATML
    cfg = cfg_for(
        "task.type=instruction",
        "task.template=chat",
        "task.messages_column=conversations",
        "data.seq_len=256",
    )
    conv = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "2+2?"},
        {"from": "gpt", "value": "4"},
    ]
    [ex] = tasks.encode(Dataset.from_list([{"conversations": conv}]), tok, cfg)
    assert tok.decode(labelled(ex)) == "Hello!<|im_end|>\n4<|im_end|>\n"
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(
        [
            {
                "role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]),
                "content": t["value"],
            }
            for t in conv
        ],
        tokenize=False,
    )


def test_chat_records_with_the_alpaca_template_and_bad_turns(tok):
    cfg = cfg_for("task.type=instruction", "task.messages_column=messages", "data.seq_len=256")
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}]
    [ex] = tasks.encode(Dataset.from_list([{"messages": msgs}]), tok, cfg)
    assert tok.decode(labelled(ex)) == "Blue" + tok.eos_token
    assert "### Instruction:\nName a colour." in tok.decode(ex["input_ids"])
    with pytest.raises(data.DataError, match="known role"):
        tasks.encode(Dataset.from_list([{"messages": [{"speaker": "x", "text": "y"}]}]), tok, cfg)
    with pytest.raises(data.DataError, match="no chat template"):
        tasks.encode(
            Dataset.from_list([{"messages": msgs}]),
            tok,
            cfg_for("task.type=instruction", "task.messages_column=messages", "task.template=chat"),
        )


PROMPT_CLS = [
    "task.type=prompt-classification",
    'task.prompt="Sentence 1: {sentence1}\\nSentence 2: {sentence2}\\nEquivalent?\\nOutput:"',
    "task.label_names=['not equivalent', 'equivalent']",
]


def test_prompt_classification_loss_only_on_the_label_words(tok):
    cfg = cfg_for(*PROMPT_CLS)
    [a] = tasks.encode(
        Dataset.from_list(
            [{"sentence1": "A cat sat.", "label": 1, "sentence2": "A cat was sitting."}]
        ),
        tok,
        cfg,
    )
    [b] = tasks.encode(
        Dataset.from_list(
            [{"sentence1": "It rains.", "label": "not equivalent", "sentence2": "Stocks fell."}]
        ),
        tok,
        cfg,
    )
    assert labelled(a) == tok(" equivalent")["input_ids"] + [tok.eos_token_id]
    assert labelled(b) == tok(" not equivalent")["input_ids"] + [tok.eos_token_id]
    assert (a["class_label"], b["class_label"]) == (1, 0)
    assert tok.decode(a["input_ids"]).startswith("Sentence 1: A cat sat.\nSentence 2:")
    assert tasks.required_columns(cfg) == ("sentence1", "sentence2", "label")


def test_unlabelled_rows_are_a_clear_error(tok):
    cfg = cfg_for(*PROMPT_CLS)
    row = {"sentence1": "a", "sentence2": "b", "label": -1}
    with pytest.raises(data.DataError, match="outside 0..1.*labelled split"):
        tasks.encode(Dataset.from_list([row]), tok, cfg)
    with pytest.raises(data.DataError, match="not one of `task.label_names`"):
        tasks.encode(Dataset.from_list([{**row, "label": "maybe"}]), tok, cfg)


def test_sequence_pairs_and_padding_per_batch():
    from fedtune.assets import resolve_model

    bert = AutoTokenizer.from_pretrained(resolve_model("offline:all-minilm-l6-v2"))
    cfg = cfg_for(
        "task.type=sequence-classification",
        "task.text_columns=['sentence1','sentence2']",
        "task.label_names=['no','yes']",
        "data.seq_len=32",
    )
    rows = [
        {"sentence1": "short", "sentence2": "pair", "label": 0},
        {"sentence1": "a much longer first sentence " * 10, "sentence2": "x", "label": 1},
        {"sentence1": "tiny", "sentence2": "one", "label": 1},
    ]
    ex = tasks.encode(Dataset.from_list(rows), bert, cfg)
    assert [e["class_label"] for e in ex] == [0, 1, 1]
    assert len(ex[1]["input_ids"]) == 32  # truncated to seq_len
    assert set(ex[0]["token_type_ids"]) == {0, 1}  # a real sentence pair
    batch = tasks.collate([ex[0], ex[2]], bert.pad_token_id)
    width = max(len(ex[0]["input_ids"]), len(ex[2]["input_ids"]))
    assert batch["input_ids"].shape == (2, width) < (2, 32)  # not padded to the maximum
    assert batch["labels"].tolist() == [0, 1]
    assert batch["attention_mask"].sum().item() == len(ex[0]["input_ids"]) + len(ex[2]["input_ids"])


def test_collate_masks_padding_out_of_the_loss(tok):
    ex = [{"input_ids": [5, 6, 7]}, {"input_ids": [8]}]
    b = tasks.collate(ex, pad_id=tok.eos_token_id)
    assert b["labels"].tolist() == [[5, 6, 7], [8, IGNORE, IGNORE]]
    ex = [
        {"input_ids": [5, 6], "labels": [IGNORE, 6]},
        {"input_ids": [9, 9, 9], "labels": [IGNORE, 9, 9]},
    ]
    b = tasks.collate(ex, pad_id=0)
    assert b["labels"].tolist() == [[IGNORE, 6, IGNORE], [IGNORE, 9, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_missing_task_column_names_the_columns_the_file_has(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "q", "reply": "r"}) + "\n")
    cfg = C.load(None, [f"data.source={f}", "task.type=instruction"])
    with pytest.raises(data.DataError, match="'instruction'.*columns are: question, reply"):
        data.load_source(cfg.data, tasks.required_columns(cfg))


def test_instruction_training_loss_ignores_the_prompt(tiny_model_dir):
    """The trained loss equals a hand computation over response tokens only."""
    from fedtune import model as M
    from fedtune.evaluate import eval_lm

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = C.load(
        None, [f"model.name={tiny_model_dir}", "task.type=instruction", "model.finetune=full"]
    )
    model = M.load_model(cfg).eval()
    rows = [
        {"instruction": "Say hi", "input": "", "output": "hi there"},
        {"instruction": "Count to three please", "input": "now", "output": "1 2 3"},
    ]
    ex = tasks.encode(Dataset.from_list(rows), tok, cfg)
    got = eval_lm(model, ex, batch_size=2, pad_id=tok.eos_token_id)["eval_loss"]
    total, n = 0.0, 0
    for e in ex:  # unpadded, one by one
        ids = torch.tensor([e["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        for pos, lab in enumerate(e["labels"][1:]):
            if lab != IGNORE:
                total -= logp[pos, lab].item()
                n += 1
    assert n == len(labelled(ex[0])) + len(labelled(ex[1]))
    assert got == pytest.approx(total / n, rel=1e-4)
