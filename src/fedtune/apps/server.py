"""Flower ServerApp: decode the experiment, then run the federated rounds."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.apps import config_from_run_config
from fedtune.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(context.run_config)
    run_federation(grid, cfg)
