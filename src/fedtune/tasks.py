"""Tasks: turn dataset rows into training examples, and batches of them into model inputs.

Why one place: the client trains and the server evaluates on exactly the same encoding, and
the loss mask is decided here, once. Every example is a dict of plain lists/ints:

- `causal-lm`: packed blocks, `input_ids` only (loss on every token);
- `instruction` and `prompt-classification`: `input_ids` + `labels`, where prompt tokens are
  -100 so the loss covers only the response (or the verbal label, plus EOS so the model
  learns to stop); prompt-classification also keeps the class index in `class_label`;
- `sequence-classification`: `input_ids` (+ `token_type_ids`) + `class_label` for an
  encoder with a classifier head.

Batches are padded to their own longest example, not to a global maximum.
"""

from __future__ import annotations

import dataclasses
import hashlib
import string

import torch

from fedtune import assets, data
from fedtune.config import Config, TaskConfig
from fedtune.errors import DataError
from fedtune.files import atomic_path

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)

ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}


# ---------------------------------------------------------------- tokenization rules
# Why one rule for training and scoring: a prompt and its completion are tokenized
# separately and concatenated, so the tokens scored at evaluation are exactly the tokens
# trained on, whatever merges the tokenizer would have made across the boundary.


def _appends_eos(tokenizer) -> bool:
    """Does the tokenizer add an EOS after the text (most do not; some Llama setups do)?"""
    cached = getattr(tokenizer, "_fedtune_appends_eos", None)
    if cached is None:  # probed once per tokenizer: encode_prompt runs for every example
        eos = tokenizer.eos_token_id
        probe = tokenizer("a")["input_ids"]
        cached = eos is not None and bool(probe) and probe[-1] == eos
        try:
            tokenizer._fedtune_appends_eos = cached
        except AttributeError:
            pass
    return cached


def encode_prompt(tokenizer, text: str) -> list[int]:
    """The tokenizer's own leading specials (e.g. Llama's BOS) + the text, never a final EOS:
    the completion follows the prompt, so the prompt must not look finished."""
    ids = list(tokenizer(text, verbose=False)["input_ids"])
    if ids and _appends_eos(tokenizer):
        ids = ids[:-1]
    return ids


def encode_completion(tokenizer, text: str, add_eos: bool) -> list[int]:
    """The completion's tokens without specials (+ EOS, so the model learns to stop)."""
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("add_eos is set but the tokenizer has no eos_token_id")
        ids.append(tokenizer.eos_token_id)
    return ids


def pack_blocks(ds, tokenizer, text_column: str, seq_len: int) -> torch.Tensor:
    """Tokenize, join documents with EOS, cut into [n_blocks, seq_len] (remainder dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in ds[text_column]:
        if text:
            ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
            if eos is not None:
                ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"{len(ids)} tokens do not fill one block of `data.seq_len` = {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def prompt_fields(template: str) -> list[str]:
    """The {column} names a format string uses."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def required_columns(cfg: Config) -> tuple[str, ...]:
    """Columns the task reads; `load_source` checks them against the data at start."""
    t = cfg.task
    if t.type == "causal-lm":
        return (cfg.data.text_column,)
    if t.type == "instruction":
        if t.messages_column:
            return (t.messages_column,)
        return (t.instruction_column, t.output_column)  # `input` is optional
    if t.type == "prompt-classification":
        return (*dict.fromkeys(prompt_fields(t.prompt)), t.label_column)
    return (*t.text_columns, t.label_column)


def load_task_data(cfg: Config, with_public: bool = False):
    """`data.load_data` with the columns this task reads (see there for what it returns)."""
    return data.load_data(cfg, required_columns(cfg), with_public)


def class_index(value, label_names: list[str], where: str) -> int:
    """A label given as an index or as one of `label_names` -> its index."""
    if isinstance(value, str):
        if value in label_names:
            return label_names.index(value)
        if value.strip().lstrip("-").isdigit():
            value = int(value)
        else:
            raise DataError(
                f"{where}: label {value!r} is not one of `task.label_names` {label_names}"
            )
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(label_names):
        raise DataError(
            f"{where}: label {value!r} is outside 0..{len(label_names) - 1} "
            f"(`task.label_names` = {label_names}); unlabelled rows (e.g. GLUE "
            "test splits use -1) cannot train or evaluate: use a labelled split"
        )
    return value


# ---------------------------------------------------------------- token sequences


def build_sequence(
    tokenizer, segments: list[tuple[str, bool]], seq_len: int, eos_after_response: bool = True
) -> dict | None:
    """Tokens and labels of (text, is_response) segments; None if no response token fits.

    Prompt tokens get label -100. Too long: cut the first prompt from the left (its end,
    the response header, stays) so that the first response keeps at least
    min(its length, seq_len // 2) tokens, then cut the end.
    """
    ids, labels, first_resp = [], [], None
    for i, (text, is_resp) in enumerate(segments):
        if i == 0 and not is_resp:
            seg = encode_prompt(tokenizer, text)
        else:
            seg = encode_completion(tokenizer, text, add_eos=is_resp and eos_after_response)
        if is_resp and first_resp is None:
            first_resp = (len(ids), len(seg))
        ids += seg
        labels += seg if is_resp else [IGNORE] * len(seg)
    if first_resp is None:
        return None
    if len(ids) > seq_len:
        start, length = first_resp
        keep = min(length, seq_len // 2)
        overflow = start + keep - seq_len  # prompt tokens to drop so `keep` fit
        if overflow > 0:
            head = 1 if ids and ids[0] == tokenizer.bos_token_id else 0  # keep a BOS
            ids = ids[:head] + ids[head + overflow :]
            labels = labels[:head] + labels[head + overflow :]
        ids, labels = ids[:seq_len], labels[:seq_len]
    if all(x == IGNORE for x in labels):
        return None
    return {"input_ids": ids, "labels": labels}


# ---------------------------------------------------------------- per-task rows -> segments


def alpaca_prompt(instruction: str, inp: str) -> str:
    return (ALPACA_INPUT if inp else ALPACA_NO_INPUT).format(instruction=instruction, input=inp)


def _chat_turns(turns, where: str) -> list[dict]:
    """[{role, content}] from OpenAI-style or ShareGPT-style ({from, value}) turns."""
    if not isinstance(turns, list):
        raise DataError(f"{where}: chat record must be a list of turns, got {type(turns).__name__}")
    out = []
    for turn in turns:
        role = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
        content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise DataError(
                f"{where}: a chat turn must have role/content or from/value with a "
                f"known role ({', '.join(sorted(ROLES))}); got {turn!r:.120}"
            )
        out.append({"role": ROLES[role], "content": content})
    return out


def instruction_segments(row: dict, t: TaskConfig, tokenizer, where: str):
    """(segments, eos_after_response) of one instruction or chat record."""
    if not t.messages_column:
        inp = row.get(t.input_column) or "" if t.input_column else ""
        instr, out = row[t.instruction_column] or "", row[t.output_column] or ""
        if t.template == "chat":
            turns = [
                {"role": "user", "content": f"{instr}\n\n{inp}" if inp else instr},
                {"role": "assistant", "content": out},
            ]
            return chat_template_segments(turns, tokenizer), False
        return [(alpaca_prompt(instr, inp), False), (out, True)], True
    turns = _chat_turns(row[t.messages_column], where)
    if t.template == "chat":
        return chat_template_segments(turns, tokenizer), False
    segs, system, first = [], "", True
    for turn in turns:
        if turn["role"] == "system":
            system = turn["content"] + "\n\n"
        elif turn["role"] == "user":
            text = (
                alpaca_prompt(turn["content"], "")
                if first
                else f"\n\n### Instruction:\n{turn['content']}\n\n### Response:\n"
            )
            segs.append((system + text if first else text, False))
            first = False
        else:
            segs.append((turn["content"], True))
    return segs, True


def chat_template_segments(turns: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Render with the tokenizer's chat template; each assistant reply (with the template's
    end-of-turn marker) is a response segment, everything else prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            '`task.template = "chat"` but this tokenizer has no chat template; '
            'use `task.template = "alpaca"`'
        )

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    segs, done = [], ""
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prefix, full = render(turns[:i], True), render(turns[: i + 1], False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise DataError(
                "the tokenizer's chat template does not render turns as a growing "
                'prefix; use `task.template = "alpaca"`'
            )
        segs += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
        done = full
    return segs


def classification_prompt(row: dict, t: TaskConfig) -> str:
    return t.prompt.format(**{k: row[k] for k in prompt_fields(t.prompt)})


def label_text(t: TaskConfig, index: int) -> str:
    """What the model must say for class `index` (label_prefix + name)."""
    return t.label_prefix + t.label_names[index]


# ---------------------------------------------------------------- dataset -> examples


def encode(ds, tokenizer, cfg: Config) -> list[dict]:
    """All examples of a dataset (a client partition or the server's test split)."""
    t, seq_len = cfg.task, cfg.data.seq_len
    if t.type == "causal-lm":
        blocks = pack_blocks(ds, tokenizer, cfg.data.text_column, seq_len)
        return [{"input_ids": b} for b in blocks.tolist()]
    examples, dropped = [], 0
    for i, row in enumerate(ds):
        where = f"row {i} of {cfg.data.source}"
        if t.type == "sequence-classification":
            texts = [row[c] for c in t.text_columns]
            enc = tokenizer(*texts, truncation=True, max_length=seq_len, verbose=False)
            ex = {
                "input_ids": list(enc["input_ids"]),
                "class_label": class_index(row[t.label_column], t.label_names, where),
            }
            if "token_type_ids" in enc:
                ex["token_type_ids"] = list(enc["token_type_ids"])
        elif t.type == "prompt-classification":
            k = class_index(row[t.label_column], t.label_names, where)
            ex = build_sequence(
                tokenizer,
                [(classification_prompt(row, t), False), (label_text(t, k), True)],
                seq_len,
            )
            if ex is None:  # rows and examples must stay aligned for evaluation
                raise DataError(f"{where}: the label does not fit in `data.seq_len` = {seq_len}")
            ex["class_label"] = k
        else:
            segs, eos = instruction_segments(row, t, tokenizer, where)
            if not any(resp and text.strip() for text, resp in segs):
                ex = None  # an empty answer teaches nothing
            else:
                ex = build_sequence(tokenizer, segs, seq_len, eos_after_response=eos)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    if not examples:
        raise DataError(
            f"none of the {len(ds)} rows gives a training example (no response "
            f"token fits in `data.seq_len` = {seq_len}, or empty responses)"
        )
    return examples


def encode_test(test, tokenizer, cfg: Config) -> tuple[object, list[dict]]:
    """(rows, examples) of the server's test split, cut to `eval.max_blocks`: the rows are
    the first len(examples) rows (their labels and references), as `evaluate_task` needs."""
    examples = encode(test, tokenizer, cfg)[: cfg.eval.max_blocks or None]
    return test.select(range(min(len(test), len(examples)))), examples


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example; model inputs only (`model(**batch).loss`)."""
    width = max(len(e["input_ids"]) for e in examples)

    def pad(key, value):
        return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples])

    batch = {
        "input_ids": pad("input_ids", pad_id),
        "attention_mask": torch.tensor(
            [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples]
        ),
    }
    if "token_type_ids" in examples[0]:
        batch["token_type_ids"] = pad("token_type_ids", 0)
    if "labels" in examples[0]:
        batch["labels"] = pad("labels", IGNORE)
    elif "class_label" in examples[0]:
        batch["labels"] = torch.tensor([e["class_label"] for e in examples])
    else:  # packed causal LM: every real token is a target, padding is not
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    return batch


# ---------------------------------------------------------------- one client's examples


def client_examples(cfg: Config, pid: int, tokenizer, data_path: str = "", part=None) -> list[dict]:
    """Client `pid`'s encoded examples: its partition of the shared source, or all of its
    own `data-path` (a SuperNode's local data), cached on disk under
    $FEDTUNE_CACHE/examples because Flower's deployment runtime starts a fresh process for
    every message. The key holds everything the examples depend on, the content of the
    source included: file sizes and times for local and packaged sources, the loaded
    dataset's fingerprint (which follows its revision) for hub datasets. `part`: the
    partition, when the caller has already loaded it."""
    src_cfg = dataclasses.replace(cfg.data, source=data_path) if data_path else cfg.data
    stamp = data.source_stamp(src_cfg)
    if stamp is None and part is None:  # a hub dataset: identify it by what was loaded
        part = _load_partition(cfg, pid, data_path)
    if stamp is None:
        stamp = part._fingerprint
    key = (
        repr(cfg.data),
        repr(cfg.task),
        stamp,
        cfg.model.name,
        cfg.train.seed,
        cfg.federation.num_clients,
        pid,
        data_path,
        cfg.kd.teacher_data_pct,
    )  # the public slice is cut from the pool before partitioning
    disk = (
        assets.cache_dir()
        / "examples"
        / (hashlib.sha256(repr(key).encode()).hexdigest()[:24] + ".pt")
    )
    if disk.exists():
        return torch.load(disk)
    examples = encode(
        part if part is not None else _load_partition(cfg, pid, data_path), tokenizer, cfg
    )
    disk.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(disk) as tmp:
        torch.save(examples, tmp)
    return examples


def _load_partition(cfg: Config, pid: int, data_path: str):
    if data_path:
        part = data.load_source(
            dataclasses.replace(cfg.data, source=data_path), required_columns(cfg)
        )
        if len(part) == 0:
            raise DataError(f"data-path {data_path} holds no samples")
        return part
    return load_task_data(cfg)[1][pid]
