"""Flower apps: a thin ServerApp and ClientApp that turn Messages into plain calls.

Both read the experiment from Flower's run config, which carries either `config-json` (the
resolved config, as `fedtune run` sends it) or `recipe` + `set` (as `flwr run .` sends it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fedtune import config as C
from fedtune.errors import DataError

APP_PYPROJECT = """[project]
name = "fedtune-run"
version = "1.0.0"

[tool.flwr.app]
publisher = "fedtune"

[tool.flwr.app.components]
serverapp = "fedtune.apps.server:app"
clientapp = "fedtune.apps.client:app"

[tool.flwr.app.config]
config-json = ""
"""


def write_app_folder(folder: Path) -> Path:
    """A minimal Flower app folder whose apps are the installed fedtune's; its one run-config
    key, `config-json`, carries the resolved experiment (no project checkout needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    return folder


def find_recipe(path: str) -> Path:
    """A relative recipe path is looked up in the working directory, then in the Flower app
    folder (which Flower puts on sys.path while it loads the app)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    for entry in sys.path:
        candidate = Path(entry or ".") / p
        if candidate.is_file():
            return candidate
    raise C.ConfigError(
        [
            f"recipe file not found: {path} (looked in the working directory "
            "and the Flower app folder)"
        ]
    )


def config_from_run_config(run_config) -> C.Config:
    """Decode the experiment from a Flower run config (keys: config-json | recipe, set)."""
    text = str(run_config.get("config-json", "") or "")
    if text:
        return C.from_json(text)
    recipe = str(run_config.get("recipe", "") or "")
    overrides = str(run_config.get("set", "") or "").split()  # KEY=VALUE items, no spaces
    return C.load(find_recipe(recipe) if recipe else None, overrides)


def partition_id(context, cfg: C.Config) -> int:
    """This node's partition, checked against the recipe (node config `partition-id`)."""
    pid = int(context.node_config["partition-id"])
    n = int(context.node_config.get("num-partitions", cfg.federation.num_clients))
    if n != cfg.federation.num_clients:
        raise DataError(
            f"this SuperNode says num-partitions={n} but the recipe has "
            f"federation.num_clients={cfg.federation.num_clients}"
        )
    if not 0 <= pid < n:
        raise DataError(f"partition-id {pid} is outside 0..{n - 1}")
    return pid


def process_age_seconds() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0
