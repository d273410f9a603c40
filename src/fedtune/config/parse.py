"""Recipe TOML and `--set a.b=value` overrides into a typed Config, every problem collected.

Why one generic decoder: the types in `schema.py` (`Literal` choices, typed lists, nested
sections) are the whole specification, so a new key or choice needs no parsing code, and a
typo fails in the first second with the key's name instead of after a model has loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import typing
from dataclasses import MISSING, fields
from typing import Literal, get_args, get_origin

from fedtune.config.schema import ALIASES, SECTIONS, Config
from fedtune.errors import ConfigError

_PLAIN = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    list: lambda v: isinstance(v, list),
    dict: lambda v: isinstance(v, dict),
}


def choices(typ) -> tuple | None:
    """The allowed values of a `Literal` type (nested Literals flattened), else None."""
    if get_origin(typ) is not Literal:
        return None
    out = []
    for arg in get_args(typ):
        out += choices(arg) or [arg]
    return tuple(out)


def _show(values) -> str:
    return ", ".join(v if v else '""' for v in values)


def in_range(value: float, rng: str) -> bool:
    """Whether `value` lies in a range written "> 0", ">= 1" or "[0, 1)"."""
    if rng.startswith(">"):
        low = float(rng.lstrip(">= "))
        return value >= low if rng.startswith(">=") else value > low
    low, high = (float(x) for x in rng[1:-1].split(","))
    return (value >= low if rng[0] == "[" else value > low) and (
        value <= high if rng[-1] == "]" else value < high
    )


def _range_text(rng: str) -> str:
    return rng if rng.startswith(">") else f"in {rng}"


def _coerce(value, typ, key: str, problems: list[str]):
    """`value` as `typ` (int -> float widened), or None after recording a problem."""
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            problems.append(f"`{key}` must be a table, got {type(value).__name__} {value!r}")
            return None
        return _build(typ, value, key, problems, set())
    allowed = choices(typ)
    if allowed is not None:
        if value in allowed and isinstance(value, type(allowed[0])):
            return value
        problems.append(f"`{key}` = {value!r} is not one of {_show(allowed)}")
        return None
    if get_origin(typ) is list:
        if not isinstance(value, list):
            hint = ""
            if isinstance(value, str) and value.startswith("["):  # --set k=[a,b]: TOML wants quotes
                items = [x.strip().strip("'\"") for x in value.strip("[]").split(",") if x.strip()]
                quoted = ",".join(f"'{x}'" for x in items)
                hint = f"; quote the items: {key}=[{quoted}]"
            problems.append(f"`{key}` must be list, got {type(value).__name__} {value!r}{hint}")
            return None
        (item,) = get_args(typ)
        allowed, bad = choices(item), []
        for x in value:
            if allowed is not None and x not in allowed:
                problems.append(
                    f"`{key}`: unknown {key.split('.')[-1].removesuffix('s')} "
                    f"{x!r}; known: {_show(allowed)}"
                )
                bad.append(x)
            elif allowed is None and not _PLAIN[item](x):
                problems.append(f"`{key}` must be a list of {item.__name__}, got {x!r}")
                bad.append(x)
        return None if bad else list(value)
    if not _PLAIN[typ](value):
        problems.append(f"`{key}` must be {typ.__name__}, got {type(value).__name__} {value!r}")
        return None
    return float(value) if typ is float else value


def _build(cls, raw: dict, prefix: str, problems: list[str], failed: set):
    """One section (or nested table) from a dict; bad keys are skipped and recorded."""
    hints, kwargs = typing.get_type_hints(cls), {}
    field_of = {f.name: f for f in fields(cls)}
    for key, value in raw.items():
        attr = ALIASES.get((prefix, key), key)
        if attr not in hints:
            known = ", ".join(
                next((k for (s, k), a in ALIASES.items() if s == prefix and a == f.name), f.name)
                for f in fields(cls)
            )
            close = difflib.get_close_matches(key, known.split(", "), n=1, cutoff=0.6)
            guess = f"did you mean `{prefix}.{close[0]}`? " if close else ""
            problems.append(f"unknown key `{prefix}.{key}`; {guess}known: {known}")
            continue
        if (prefix, key) == ("output", "keep_best") and isinstance(value, str):
            problems.append(
                "`output.keep_best` is true or false; the metric that picks the "
                f"best round is `eval.metric` (e.g. eval.metric = "
                f'"{value or "eval_loss"}" and keep_best = true)'
            )
            continue
        n = len(problems)
        coerced = _coerce(value, hints[attr], f"{prefix}.{key}", problems)
        rng = field_of[attr].metadata.get("range")
        if len(problems) == n and rng and not in_range(coerced, rng):
            problems.append(f"`{prefix}.{key}` must be {_range_text(rng)}, got {value}")
        if len(problems) == n:
            kwargs[attr] = coerced
        else:
            failed.add(f"{prefix}.{key}")
    return cls(**kwargs)


def from_dict(raw: dict, problems: list[str] | None = None, failed: set | None = None) -> Config:
    """A Config from nested dicts (a parsed recipe); unknown keys and wrong types are
    problems (raised together unless the caller collects them in `problems`, and the keys
    that kept their default in `failed`)."""
    own = problems is None
    problems = [] if own else problems
    sections = {}
    for section, sub in raw.items():
        if section not in SECTIONS:
            problems.append(f"unknown section `{section}`; known: {', '.join(SECTIONS)}")
        elif not isinstance(sub, dict):
            problems.append(f"`{section}` must be a table")
        else:
            sections[section] = _build(
                SECTIONS[section], sub, section, problems, set() if failed is None else failed
            )
    if own and problems:
        raise ConfigError(problems)
    return Config(**sections)


def from_json(text: str) -> Config:
    return from_dict(json.loads(text))


def _is_text(typ) -> bool:
    allowed = choices(typ)
    return typ is str or (allowed is not None and all(isinstance(c, str) for c in allowed))


def parse_override(item: str) -> tuple[list[str], object]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4); values are TOML, bare words are strings."""
    if "=" not in item:
        raise ConfigError([f"override `{item}` is not KEY=VALUE (e.g. train.lr=1e-4)"])
    key, text = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: model names, paths
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Merge `a.b=v` overrides into a nested dict; a string field keeps the literal text."""
    raw = json.loads(json.dumps(raw))  # deep copy
    for item in overrides:
        path, value = parse_override(item)
        if len(path) == 2 and path[0] in SECTIONS:
            attr = ALIASES.get((path[0], path[1]), path[1])
            hint = typing.get_type_hints(SECTIONS[path[0]]).get(attr)
            if _is_text(hint) and not isinstance(value, str):
                value = item.split("=", 1)[1].strip()  # output.dir=123 stays the string "123"
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override `{item}`: `{part}` is not a table"])
        node[path[-1]] = value
    return raw


def _toml(value) -> str:
    """A TOML value on one line: JSON's strings, numbers and lists are TOML's; a table is
    written inline ({ key = value })."""
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in value.items())
        return f"{{ {items} }}" if items else "{}"
    if isinstance(value, list | tuple):
        return f"[{', '.join(_toml(v) for v in value)}]"
    return json.dumps(value)


def describe(cfg: Config | None = None) -> str:
    """Every key with its value, its choices and its help line: the defaults (`fedtune
    keys`), or a recipe's values with each changed default named (`fedtune init --from`)."""
    lines = []

    def walk(cls, prefix: str, indent: str, obj):
        hints = typing.get_type_hints(cls)
        names = {attr: key for (sec, key), attr in ALIASES.items() if sec == prefix}
        for f in fields(cls):
            key, typ = names.get(f.name, f.name), hints[f.name]
            if dataclasses.is_dataclass(typ):
                walk(typ, f"{prefix}.{key}", indent, getattr(obj, f.name, None))
                continue
            default = f.default if f.default is not MISSING else f.default_factory()
            value = default if obj is None else getattr(obj, f.name)
            allowed = choices(typ) or (
                choices(get_args(typ)[0]) if get_origin(typ) is list else None
            )
            what = (
                f" [{'items: ' if get_origin(typ) is list else ''}{_show(allowed)}]"
                if allowed
                else ""
            )
            if f.metadata.get("range"):
                what += f" [{_range_text(f.metadata['range'])}]"
            if _toml(value) != _toml(default):
                what += f" (default {_toml(default)})"
            label = key if prefix in SECTIONS else f"{prefix.split('.', 1)[1]}.{key}"
            lines.append(f"{indent}{label} = {_toml(value)}  # {f.metadata['help']}{what}")

    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        walk(cls, section, "  ", None if cfg is None else getattr(cfg, section))
    return "\n".join(lines)
