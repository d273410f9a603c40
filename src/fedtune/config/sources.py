"""Whether the recipe's model and data exist, known before anything heavy is imported.

Why apart from the schema: these checks touch the file system (and, offline, the hub
cache), so `fedtune keys` and parsing stay pure; `load(..., check_paths=False)` skips them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedtune import assets
from fedtune.config.schema import Config
from fedtune.errors import FedtuneError

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def looks_local(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """A name the user meant as a local path: it exists (relative to the working directory
    too), starts like a path, has more parts than a hub id (`org/name`) or ends in one of
    `suffixes` (a data file). Everything else is a hub id."""
    return (
        Path(name).expanduser().exists()
        or name.startswith(("/", "./", "../", "~"))
        or name.count("/") >= 2
        or "\\" in name
        or (bool(suffixes) and name.lower().endswith(suffixes))
    )


EAGER_CHECK_BYTES = 64 * 2**20  # local data files up to this size are checked at load time


def check_data_file(path: Path, limit: int | None = EAGER_CHECK_BYTES) -> str | None:
    """Why a local data file cannot be read, in one sentence (None if nothing is found):
    empty, not UTF-8, the first malformed line of a .jsonl. Cheap enough to run while the
    recipe is validated for files up to `limit` bytes (larger ones are diagnosed only if
    `datasets` fails to read them)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return f"data file {path} is empty: no rows to train on"
    if path.suffix == ".parquet" or (limit is not None and size > limit):
        return None
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        return (
            f"data file {path} is not UTF-8 text (line {line}, byte {err.start}); "
            "re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8"
        )
    if not text.strip():
        return f"data file {path} holds only whitespace: no rows to train on"
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as err:
                return (
                    f"data file {path} line {number} is not valid JSON ({err.msg}, "
                    f"column {err.colno}); fix or remove that line"
                )
            if not isinstance(obj, dict):
                return (
                    f"data file {path} line {number} is a JSON {type(obj).__name__}, "
                    "not an object with named columns"
                )
    return None


def hub_unreachable(name: str, what: str = "model.name") -> str:
    """The one sentence for a hub id that cannot be fetched, with the fix."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    local_hint = f" (there is no local folder {name!r} either)" if "/" in name else ""
    return (
        f"cannot load `{what}` = {name!r}: the Hugging Face hub is "
        f"{'switched off (HF_HUB_OFFLINE=1)' if offline else 'unreachable or has no such model'}"
        f" and the model is not in the local cache{local_hint}; use a local folder "
        "(save_pretrained format, e.g. ./models/mine) or a packaged offline:NAME "
        f"({', '.join(assets.PREFIX + k for k in assets.OFFLINE_MODELS)})"
    )


def offline_hub_problems(cfg: Config) -> list[str]:
    """With HF_HUB_OFFLINE=1, hub model ids that are not in the local cache: known in a
    fraction of a second, without importing transformers."""
    names = [("model.name", cfg.model.name)]
    if cfg.kd.enabled and cfg.kd.teacher:
        names.append(("kd.teacher", cfg.kd.teacher))
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        return []
    from huggingface_hub import try_to_load_from_cache

    return [
        hub_unreachable(name, key)
        for key, name in names
        if not assets.is_offline(name)
        and not looks_local(name)
        and not isinstance(try_to_load_from_cache(name, "config.json"), str)
    ]


def check_sources(cfg: Config) -> list[str]:
    p = []
    name = cfg.model.name
    if assets.is_offline(name):
        try:
            assets.check_offline_model(name)
        except FedtuneError as err:
            p.append(f"`model.name`: {err}")
    elif looks_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            p.append(
                f"`model.name`: {name!r} looks like a local folder but does not exist "
                f"(relative to {Path.cwd()}); fix the path, or use a hub id (org/name) "
                "or offline:NAME"
            )
        elif not (path / "config.json").exists():
            p.append(f"`model.name`: {name!r} has no config.json (not a save_pretrained folder)")
    src = cfg.data.source
    if assets.is_offline(src):
        try:
            assets.check_offline_data(src)
        except FedtuneError as err:
            p.append(f"`data.source`: {err}")
    elif looks_local(src, DATA_SUFFIXES):
        path = Path(src).expanduser()
        if not path.exists():
            p.append(
                f"`data.source`: {src!r} looks like a local path but does not exist "
                f"(relative to {Path.cwd()}); fix the path, or use a hub dataset id "
                "(org/name) or offline:NAME"
            )
        elif path.is_file() and path.suffix not in DATA_SUFFIXES:
            p.append(
                f"`data.source`: {src!r} has suffix {path.suffix!r}; "
                f"supported: {', '.join(DATA_SUFFIXES)}"
            )
        elif path.is_file() and (problem := check_data_file(path)):
            p.append(f"`data.source`: {problem}")
    return p
