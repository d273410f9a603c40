"""Run an experiment on Flower's Simulation Engine inside this process (`fedtune run`).

Why not `flwr.simulation.run_simulation`: it is deprecated and hands the apps an empty run
config. We call the engine underneath it with a `Run` whose override config carries the
resolved experiment, and a tiny generated Flower app folder that declares that key, exactly
as `flwr run` would after fusing `[tool.flwr.app.config]` with `--run-config`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import ray
from flwr.app import Context, RecordDict

# Private Flower internals, checked against flwr 1.41.0 (tests/test_flower_internals.py
# fails loudly when an upgrade moves them); nowhere else in fedtune.
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES, ErrorCode
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType

from fedtune import config as C, kd
from fedtune.apps import client, server, write_app_folder
from fedtune.console import quiet_flower
from fedtune.errors import RunError

CLIENT_APP_RAISED_EXCEPTION = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
log = logging.getLogger(__name__)

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
}


def prepare(cfg: C.Config) -> None:
    """Work done once before any process starts, after `preflight.preflight` passed:
    quiet environment for the engine, the KD teacher trained (or found in its cache)."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("RAY_COLOR_PREFIX", "1" if sys.stderr.isatty() else "0")
    quiet_flower()
    if cfg.kd.enabled:  # train (or find) the teacher once, before any client needs it
        kd.ensure_teacher(cfg)


def start_ray() -> None:
    """Start Ray here rather than in Flower: Flower's backend config is JSON and cannot carry
    a `ray.LoggingConfig`, and only with one does Ray print the clients' lines without its
    "(ClientAppActor pid=...)" prefix. Otherwise as Flower's `RayBackend.init_ray` (the
    actors get this PYTHONPATH, no dashboard); Flower then finds Ray running, uses it and
    shuts it down at the end. The root logger's handler that the config adds passes
    warnings only (Flower's own logger does not propagate to it: `quiet_flower`).
    `--verbose` leaves Ray to Flower, prefix and all."""
    if ray.is_initialized() or os.environ.get("FEDTUNE_VERBOSE") == "1":
        return
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        logging_config=ray.LoggingConfig(encoding="TEXT", log_level="WARNING"),
    )


def set_task_identity(run_id: int) -> None:
    """What Flower's runtimes set before a ServerApp builds messages (private, 1.41)."""
    TaskIdentity.task_id, TaskIdentity.run_id = 1, run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def run_simulation(cfg: C.Config) -> dict:
    """Run all rounds with `federation.num_clients` simulated SuperNodes; return summary."""
    prepare(cfg)
    run_config = {"config-json": cfg.to_json()}
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = run_config
    set_task_identity(run_id)
    context = Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)
    )
    backend_config = {
        "client_resources": {
            "num_cpus": cfg.federation.client_cpus,
            "num_gpus": cfg.federation.client_gpus,
        },
        "init_args": {"include_dashboard": False},
    }
    app_dir = Path(tempfile.mkdtemp(prefix="fedtune-app-"))
    log.info(
        f"starting Flower's Simulation Engine: {cfg.federation.num_clients} simulated "
        f"clients, {cfg.federation.client_cpus} CPU(s) each"
    )
    try:
        write_app_folder(app_dir)
        start_ray()
        _run_simulation(
            num_supernodes=cfg.federation.num_clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client.app,
            server_app=server.app,
            backend_config=backend_config,
            server_app_context=context,
            app_dir=str(app_dir),
            run=run,
            is_app=True,
        )
    finally:
        shutil.rmtree(app_dir, ignore_errors=True)
    summary_path = Path(cfg.output.dir).expanduser().absolute() / "summary.json"
    if not summary_path.exists():
        raise RunError(
            f"the simulation ended without writing {summary_path}; see run.log in that folder"
        )
    return json.loads(summary_path.read_text())
