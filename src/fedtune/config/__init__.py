"""Typed, validated experiment config: `load(recipe, overrides)` is the one entry point.

Why a package: the schema (`schema.py`: every key, default, choice and range), decoding
(`parse.py`), cross-field rules (`checks.py`) and file-system checks (`sources.py`) are four
concerns; callers only see `config.load` and the names re-exported here. All problems of a
recipe are reported together in one `ConfigError`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from fedtune.config.checks import (
    LOWER_IS_BETTER,
    MANAGED_STRATEGY_ARGS,
    ROBUST_STRATEGIES,
    clients_per_round,
    config_warnings,
    headline_metric,
    metric_mode,
    strategy_class,
    validate,
)
from fedtune.config.parse import (
    apply_overrides,
    choices,
    describe,
    from_dict,
    from_json,
    parse_override,
)
from fedtune.config.schema import (
    CLASSIFICATION_TASKS,
    FIXED_ARMS,
    PARTITIONERS,
    SECTIONS,
    STRATEGIES,
    SUITES,
    TASKS,
    TRACKERS,
    CommConfig,
    Config,
    DataConfig,
    DpConfig,
    EarlyStoppingConfig,
    EvalConfig,
    FederationConfig,
    KDConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    PrivacyConfig,
    RobustConfig,
    StrategyConfig,
    TaskConfig,
    TrainConfig,
    updated,
)
from fedtune.config.sources import (
    DATA_SUFFIXES,
    check_data_file,
    hub_unreachable,
    looks_local,
    offline_hub_problems,
)
from fedtune.errors import ConfigError


def load(
    recipe: str | Path | None = None, overrides: list[str] | None = None, check_paths: bool = True
) -> Config:
    """Read a recipe TOML (or only defaults), apply overrides, validate everything."""
    raw: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError([f"recipe file not found: {path}"])
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError([f"{path} is not valid TOML: {err}"]) from None
    raw = apply_overrides(raw, overrides or [])
    problems: list[str] = []
    failed: set = set()
    cfg = from_dict(raw, problems, failed)
    problems += validate(cfg, check_paths=check_paths, failed=frozenset(failed))
    if problems:
        raise ConfigError(problems)
    return cfg


__all__ = [
    "CLASSIFICATION_TASKS",
    "DATA_SUFFIXES",
    "FIXED_ARMS",
    "LOWER_IS_BETTER",
    "MANAGED_STRATEGY_ARGS",
    "ROBUST_STRATEGIES",
    "PARTITIONERS",
    "SECTIONS",
    "STRATEGIES",
    "SUITES",
    "TASKS",
    "TRACKERS",
    "Config",
    "ConfigError",
    "CommConfig",
    "DataConfig",
    "EarlyStoppingConfig",
    "EvalConfig",
    "FederationConfig",
    "KDConfig",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "RobustConfig",
    "DpConfig",
    "PrivacyConfig",
    "StrategyConfig",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "check_data_file",
    "choices",
    "clients_per_round",
    "config_warnings",
    "describe",
    "from_dict",
    "from_json",
    "headline_metric",
    "hub_unreachable",
    "load",
    "looks_local",
    "metric_mode",
    "offline_hub_problems",
    "parse_override",
    "strategy_class",
    "updated",
    "validate",
]
