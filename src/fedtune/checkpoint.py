"""Checkpoints: the global model in save_pretrained format plus what the server needs to resume.

Layout under RUN_DIR/checkpoints/:
    round-0004/        save_pretrained model (adapter or full) + tokenizer + server_state.pt
    best/              the same for the best round by `output.keep_best`
    latest.json        {"round": 4, "path": "round-0004"}: the newest complete checkpoint

Why atomic: a run killed mid-write (OOM, Ctrl-C, exit 137) must never leave a corrupt
"latest". Each checkpoint is written to a temporary folder and renamed into place; only then
does latest.json (itself written to a temp file and renamed) point at it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from fedtune.errors import ConfigError, ModelError
from fedtune.files import atomic_folder, atomic_write_json

# Flower's strategies' own server state. Not `current_arrays`: it is the global model itself
# (FedAvgM, which fedtune points at the arrays it sends) or re-read from the sent arrays every
# round (FedOpt); a resumed run rebuilds it from the checkpoint's weights, never stores it twice.
STRATEGY_STATE = ("momentum_vector", "m_t", "v_t", "clipping_norm")  # + a DP wrapper's inner


def _dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _write_folder(target: Path, model, tokenizer, server_state: dict | None) -> None:
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if server_state is not None:
            torch.save(server_state, tmp / "server_state.pt")


def _round_of(folder: Path) -> int | None:
    try:
        return int(folder.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


def save_round(run_dir, rnd: int, model, tokenizer, server_state: dict, keep_last: int) -> Path:
    """Checkpoint round `rnd`, point latest.json at it, then prune: keep the `keep_last`
    newest rounds up to `rnd` (by round number, never the one latest.json names) and drop
    any round after `rnd` (left by a run this one replaced)."""
    root = _dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"round-{rnd:04d}"
    _write_folder(target, model, tokenizer, server_state)
    atomic_write_json(root / "latest.json", {"round": rnd, "path": target.name})
    saved = sorted(
        (r, p) for p in root.glob("round-*") if p.is_dir() and (r := _round_of(p)) is not None
    )
    kept = [r for r, _ in saved if r <= rnd][-keep_last:]
    for r, folder in saved:
        if r != rnd and r not in kept:
            shutil.rmtree(folder, ignore_errors=True)
    return target


def save_best(
    run_dir, rnd: int, model, tokenizer, metric: str, value: float, extra: dict | None = None
) -> Path:
    """checkpoints/best: the model, and in its server state what else defines it (`extra`:
    FedEx-LoRA's correction of the frozen weights)."""
    root = _dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _write_folder(root / "best", model, tokenizer, {"round": rnd, metric: value, **(extra or {})})
    atomic_write_json(root / "best.json", {"round": rnd, "metric": metric, "value": value})
    return root / "best"


def latest(run_dir) -> tuple[int, Path] | None:
    """The newest complete checkpoint, or None."""
    pointer = _dir(run_dir) / "latest.json"
    if not pointer.exists():
        return None
    info = json.loads(pointer.read_text())
    folder = _dir(run_dir) / info["path"]
    if not (folder / "server_state.pt").is_file():
        raise ConfigError(
            [f"{pointer} names {folder}, which holds no checkpoint: cannot resume from it"]
        )
    return int(info["round"]), folder


def load_weights(model, folder: Path, finetune: str) -> None:
    """Put the checkpoint's weights into an already built model (same recipe)."""
    from safetensors.torch import load_file

    if finetune == "lora":
        from peft import load_peft_weights, set_peft_model_state_dict

        set_peft_model_state_dict(model, load_peft_weights(str(folder)))
        return
    state = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ModelError(f"checkpoint {folder} does not fit the model: {unexpected[:3]}")


def strategy_state(strategy) -> dict:
    """Server-side optimizer state of a Flower strategy (FedAvgM momentum, FedOpt moments)."""
    from flwr.app import ArrayRecord

    out = {}
    for name in STRATEGY_STATE:
        value = getattr(strategy, name, None)
        if isinstance(value, ArrayRecord):
            value = {"__arrayrecord__": {k: a.numpy() for k, a in value.items()}}
        out[name] = _as_tensors(value)
    wrapped = getattr(strategy, "strategy", None)  # a DP wrapper: the strategy inside it
    if wrapped is not None:
        out["wrapped"] = strategy_state(wrapped)
    return out


def _as_tensors(value):
    """numpy arrays (in lists and dicts) as torch tensors: torch.save writes tensors as raw
    bytes, but pickles numpy arrays as latin-1 text (~1.4x their size)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, list):
        return [_as_tensors(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_tensors(v) for k, v in value.items()}
    return value


def _as_numpy(value):
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, list):
        return [_as_numpy(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_numpy(v) for k, v in value.items()}
    return value


def restore_strategy(strategy, state: dict) -> None:
    from flwr.app import Array, ArrayRecord

    for name, value in state.items():
        if name == "wrapped":
            restore_strategy(strategy.strategy, value)
            continue
        if not hasattr(strategy, name) or value is None:
            continue
        value = _as_numpy(value)
        if isinstance(value, dict) and "__arrayrecord__" in value:
            value = ArrayRecord(
                {k: Array(np.asarray(a)) for k, a in value["__arrayrecord__"].items()}
            )
        setattr(strategy, name, value)


def check_resumable(run_dir, cfg) -> tuple[int, Path]:
    """(round, folder) of the checkpoint `fedtune run --resume` continues from, or a
    ConfigError before anything starts: no checkpoint, or a recipe that changed since."""
    found = latest(run_dir)
    if found is None:
        raise ConfigError(
            [
                f"nothing to resume in {run_dir}: it has no checkpoints/latest.json "
                "(a run checkpoints when `output.save_every` > 0)"
            ]
        )
    rnd, folder = found
    saved, now = load_server_state(folder)["config"], cfg.to_dict()
    free = {"output": None, "federation": ("rounds",)}  # may change on resume
    changed = [
        f"{s}.{k}"
        for s in saved
        for k in saved[s]
        if not (s in free and (free[s] is None or k in free[s]))
        and saved[s][k] != now.get(s, {}).get(k)
    ]
    if changed:
        raise ConfigError(
            [
                f"cannot resume with a changed `{k}` (checkpoint has "
                f"{saved[k.split('.')[0]][k.split('.')[1]]!r})"
                for k in changed
            ]
        )
    return rnd, folder


def load_server_state(folder: Path) -> dict:
    return torch.load(Path(folder) / "server_state.pt", weights_only=False)
