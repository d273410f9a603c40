"""Checks that need the model's config or the data, run once before any process starts.

Why: config validation catches bad keys in a second, but some mistakes only show against
the model or the data (a LoRA target that matches nothing, a sequence longer than the
position embeddings, a malformed data file, a client whose partition cannot fill one
block). Found in round 1, each would cost Ray's start-up, a model load per client and a
traceback from deep inside torch; found here, each is one line before anything heavy. The
clients' encoded examples are written to the on-disk cache on the way, so the check costs
the clients nothing later.
"""

from __future__ import annotations

from fedtune import config as C, model as M, tasks
from fedtune.errors import ConfigError, DataError, HubDataError, HubModelError


def check_model(cfg: C.Config) -> tuple[object, list[str]]:
    """(tokenizer, warnings): the model's positions and LoRA targets from its files (no
    weights, no transformers config class), then its tokenizer."""
    M.check_runtime(cfg)
    warnings = []
    config = M.config_json(cfg.model.name)
    limit, rope = M.position_limit(config)
    if limit and cfg.data.seq_len > limit:
        if rope:
            warnings.append(
                f"`data.seq_len` = {cfg.data.seq_len} exceeds {cfg.model.name}'s "
                f"{limit} trained positions; its rotary embeddings will "
                "extrapolate (quality may drop)"
            )
        else:
            raise ConfigError(
                [
                    f"`data.seq_len` = {cfg.data.seq_len} exceeds the {limit} "
                    f"positions {cfg.model.name} can embed; set data.seq_len <= "
                    f"{limit}"
                ]
            )
    if cfg.model.finetune == "lora":
        M.check_lora_targets(M.module_names(cfg, config), cfg.lora.target_modules, cfg.model.name)
    return M.load_tokenizer(cfg.model.name), warnings


def check_encoding(cfg: C.Config, tokenizer, test, parts) -> None:
    """Encode the test split and every client's partition (into the examples cache)."""
    try:
        tasks.encode(test, tokenizer, cfg)
    except DataError as err:
        raise DataError(f"the server's test split: {err}") from None
    for pid in sorted(range(len(parts)), key=lambda i: len(parts[i])):  # likely failures first
        try:
            tasks.client_examples(cfg, pid, tokenizer, part=parts[pid])
        except DataError as err:
            raise DataError(
                f"client {pid}'s partition ({len(parts[pid])} samples): {err}; use "
                "fewer clients, more data or a smaller `data.seq_len`"
            ) from None


def preflight(cfg: C.Config, strict: bool = True) -> list[str]:
    """Every check above; returns warnings. `strict=False` (fedtune validate) turns a hub
    that cannot be reached into a warning: the recipe may be right for a machine online."""
    warnings = C.config_warnings(cfg)
    loaded = tokenizer = None
    try:  # the model first: its checks need only config.json and the tokenizer
        tokenizer, more = check_model(cfg)
        warnings += more
    except HubModelError as err:
        if strict:
            raise
        warnings.append(f"not checked against the model: {err}")
    try:
        loaded = tasks.load_task_data(cfg)
    except HubDataError as err:
        if strict:
            raise
        warnings.append(f"not checked against the data: {err}")
    if loaded and tokenizer is not None:
        check_encoding(cfg, tokenizer, loaded[0], loaded[1])
    return warnings
