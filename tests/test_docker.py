"""The Docker deployment for real: the fedtune image built offline (deploy/build-local-image.sh),
then `fedtune deploy compose` files brought up with Docker Compose: 1 SuperLink, 3 SuperNodes,
their ClientApp SuperExecs and workers, the ServerApp SuperExec, all from that image, on the
host network with TLS and SuperNode authentication; `flwr run` from the host.

Needs a Docker daemon (`.ci/run` starts one where it can). Without one every test here is
skipped, and the reason is printed. Everything a test started is torn down (containers,
networks, volumes) even when it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from fedtune.config import load
from fedtune.deploy import Connection, free_port
from fedtune.results import read_metrics
from test_simulation_e2e import ROOT, read_rows, run_cli, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.docker]
IMAGE = "fedtune:local"
CLIENTS = 3
APP_UID = 49999  # the image's user (and the official Flower images')


def docker_problem() -> str | None:
    """Why Docker cannot be used here (None if it can)."""
    if not shutil.which("docker"):
        return "no `docker` command"
    proc = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return "no Docker daemon reachable: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    if compose_command() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    if os.geteuid() != 0:
        return "not root: the SuperNode keys cannot be handed to the containers' uid 49999"
    return None


def compose_command() -> list[str] | None:
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
    if v2.returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.fixture(scope="module")
def image():
    """The image, built without any image registry (seconds when nothing changed)."""
    problem = docker_problem()
    if problem:
        pytest.skip(problem)
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(ROOT / "deploy/build-local-image.sh"), IMAGE],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"\ndeploy/build-local-image.sh: {time.perf_counter() - t0:.0f} s")
    return IMAGE


class Compose:
    """A Compose project of `fedtune deploy compose` files; `down -v` whatever happens."""

    def __init__(self, work: Path, port: int):
        self.work, self.port = work, port
        self.files = work / "compose"
        self.certs = work / "certs"
        self.name = f"fedtune-test-{uuid.uuid4().hex[:8]}"
        self.env = os.environ | {
            "FEDTUNE_IMAGE": IMAGE,
            "SUPERLINK_IMAGE": IMAGE,  # the fedtune image holds flower-superlink/-supernode too
            "SUPERNODE_IMAGE": IMAGE,
            "CERTS_DIR": str(self.certs),
            "COMPOSE_PROJECT_NAME": self.name,
            **{f"CLIENT{i}_DATA": str(work / f"data-{i}") for i in range(1, CLIENTS + 1)},
        }

    def run(self, *args: str, check: bool = True, timeout: float = 300):
        cmd = [*compose_command(), "-f", "compose.yml", "-f", "compose.tls.yml", *args]
        proc = subprocess.run(
            cmd, cwd=self.files, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check:
            assert proc.returncode == 0, f"{' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr}"
        return proc

    def __enter__(self):
        subprocess.run(
            [sys.executable, "-m", "fedtune.cli", "deploy", "compose", "--clients", str(CLIENTS),
             "--network", "host", "--port", str(self.port), "--tls",
             "--mount", f"{self.work}:{self.work}", "--out", str(self.files)],
            check=True,
        )  # fmt: skip
        subprocess.run(
            ["bash", str(ROOT / "deploy/certs.sh"), "-o", str(self.certs), "-n", str(CLIENTS)],
            check=True,
            capture_output=True,
        )
        for key in [self.certs / "server.key", *self.certs.glob("supernode-*.key")]:
            os.chown(key, APP_UID, APP_UID)  # mode 600: the containers' user must own them
        for i in range(1, CLIENTS + 1):
            (self.work / f"data-{i}").mkdir(exist_ok=True)
        self.conn = Connection(
            self.work / "flwr", f"127.0.0.1:{self.port}", self.certs / "ca.crt", os.environ
        )
        try:
            self.run("up", "-d", "--no-build", timeout=600)
            self.healthy()
            for i in range(1, CLIENTS + 1):
                self.conn.register(self.certs / f"supernode-{i}.pub")
        except BaseException:
            self.__exit__()
            raise
        return self

    def healthy(self, timeout: float = 120) -> None:
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(
                    f"https://127.0.0.1:{self.port}/health", timeout=2, context=ctx
                ) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise AssertionError(f"SuperLink not healthy:\n{self.logs('superlink')}")

    def logs(self, *services: str) -> str:
        proc = self.run("logs", "--no-color", "--tail", "40", *services, check=False)
        return proc.stdout[-4000:]

    def wait(self, run_id: int, timeout: float) -> dict:
        deadline, info = time.time() + timeout, {}
        while time.time() < deadline:
            info = self.conn.status(run_id)
            if str(info.get("status", "")).startswith("finished"):
                return info
            time.sleep(5)
        raise AssertionError(f"run {run_id}: {info}\n{self.logs()}")

    def __exit__(self, *exc):
        self.run("down", "-v", "--remove-orphans", "--timeout", "10", check=False)


@pytest.fixture
def work(tmp_path_factory, tiny_model_dir, code_jsonl) -> Path:
    """One folder every container mounts at the same path: the model, the data, the runs
    (writable by the containers' uid)."""
    work = tmp_path_factory.mktemp("docker")
    shutil.copytree(tiny_model_dir, work / "model")
    shutil.copy(code_jsonl, work / "code.jsonl")
    for path in [work, *work.rglob("*")]:  # copies keep the 0600/0700 of their sources
        path.chmod(0o777 if path.is_dir() else 0o644)
    return work


def recipe(work: Path, out: Path, *extra: str) -> list[str]:
    return tiny_overrides(
        work / "model",
        work / "code.jsonl",
        out,
        f"federation.num_clients={CLIENTS}",
        "federation.client_threads=1",
        "output.plots=false",
        *extra,
    )


def test_compose_deployment_gives_the_simulation_metrics(image, work):
    sets = recipe(work, work / "run")
    run_cli(recipe(work, work / "sim"))
    with Compose(work, free_port()) as project:
        run_id = project.conn.submit(load(str(ROOT / "recipes/demo.toml"), sets))
        info = project.wait(run_id, 600)
        assert info["status"] == "finished:completed", f"{info}\n{project.logs()}"
    a, b = read_rows(work / "sim"), read_metrics(work / "run")
    assert [r["round"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b, strict=True):
        assert rb["eval_loss"] == pytest.approx(ra["eval_loss"], rel=1e-5), ra["round"]
        if ra["round"]:
            assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5), ra["round"]
            assert rb["bytes_up"] == ra["bytes_up"] and rb["clients_ok"] == CLIENTS
            assert rb["client_workers"] == CLIENTS  # each trained by its warm worker
    assert json.loads((work / "run" / "summary.json").read_text())["rounds_completed"] == 2


def test_a_killed_supernode_container_is_reported_and_the_run_completes(image, work):
    """supernode-2 (partition 1) is killed during round 2: that round goes on with the other
    two once `round_timeout_s` passes, its row names partition 1 and why, and the run ends
    completed."""
    out = work / "run"
    sets = recipe(
        work,
        out,
        "federation.rounds=3",
        "federation.min_clients=2",
        "federation.round_timeout_s=45",
    )
    with Compose(work, free_port()) as project:
        run_id = project.conn.submit(load(str(ROOT / "recipes/demo.toml"), sets))
        deadline = time.time() + 300
        while len(read_metrics(out)) < 2:  # round 1 done: round 2 under way
            assert time.time() < deadline, project.logs()
            time.sleep(1)
        project.run("kill", "supernode-2")
        info = project.wait(run_id, 600)
        assert info["status"] == "finished:completed", f"{info}\n{project.logs()}"
    rows = read_metrics(out)
    assert [r["round"] for r in rows if r.get("status") != "failed"] == [0, 1, 2, 3]
    hit = [r for r in rows[1:] if r.get("failures")]
    assert hit, rows
    for r in hit:
        assert [f["partition"] for f in r["failures"]] == [1], r["failures"]
        assert r["failures"][0]["error"], r["failures"]  # the reason, in words
        assert (r["clients_ok"], r["clients_failed"]) == (2, 1)
    assert (out / "summary.json").exists()
