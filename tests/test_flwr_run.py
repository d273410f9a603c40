"""`flwr run .` on the project root: Flower's own CLI runs the same app (acceptance 3)."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fedtune.deploy import free_port, stop_group
from test_simulation_e2e import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def wait_healthy(port: int, proc, log_path: Path, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"flower-superlink exited: {log_path.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("SuperLink did not become healthy")


@pytest.mark.slow
def test_flwr_run_dot_runs_the_fedtune_app(tmp_path, tiny_model_dir, code_jsonl):
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    # the SuperLink starts `flower-superexec` and `flwr-simulation` by name: PATH must have them
    env = os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    pyproject_before = (ROOT / "pyproject.toml").read_text()
    log = (tmp_path / "superlink.log").open("w")
    link = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--simulation",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out = tmp_path / "run"
    try:
        wait_healthy(port, link, tmp_path / "superlink.log")
        # inside set='...' (a TOML literal string) lists must use double quotes
        overrides = " ".join(tiny_overrides(tiny_model_dir, code_jsonl, out)).replace("'", '"')
        proc = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(ROOT),
                "sim",
                "--format",
                "json",
                "--federation-config",
                "num-supernodes=2 client-resources-num-cpus=1",
                "--run-config",
                f"set='{overrides}'",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        reply = json.loads(proc.stdout)
        assert reply.get("success"), reply
        run_id = reply["run-id"]
        status, deadline = "", time.time() + 400
        while not status.startswith("finished") and time.time() < deadline:
            time.sleep(3)
            ls = subprocess.run(
                [str(BIN / "flwr"), "ls", "sim", "--run-id", str(run_id), "--format", "json"],
                env=env,
                capture_output=True,
                text=True,
            )
            status = json.loads(ls.stdout)["runs"][0]["status"]
        # flwr run's exit code says nothing about the ServerApp: judge by the run's status
        assert status == "finished:completed", (tmp_path / "superlink.log").read_text()[-4000:]
    finally:
        stop_group(link)
        log.close()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["clients_ok"] == 2 and rows[1]["bytes_up"] > 0
    assert (out / "final" / "adapter_config.json").exists()
    assert (ROOT / "pyproject.toml").read_text() == pyproject_before  # flwr left it alone
