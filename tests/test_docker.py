"""The Docker deployment for real: the fedtune image built offline (deploy/build-local-image.sh),
then `fedtune deploy compose` files brought up with Docker Compose (fedtune.containers): 1
SuperLink, 3 SuperNodes, their ClientApp SuperExecs and workers, the ServerApp SuperExec, all
from that image, on the host network with TLS (deploy/certs.sh) and SuperNode
authentication; `flwr run` from the host.

Needs a Docker daemon (`.ci/run` starts one where it can). Without one every test here is
skipped, and the reason is printed. Everything a test started is torn down (containers,
networks, volumes) even when it fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fedtune.config import load
from fedtune.containers import ComposeDeployment, docker_problem
from fedtune.deploy import free_port
from fedtune.results import read_metrics
from test_simulation_e2e import ROOT, read_rows, run_cli, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.docker]
IMAGE = "fedtune:local"
CLIENTS = 3


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


@pytest.fixture
def work(tmp_path_factory, tiny_model_dir, code_jsonl) -> Path:
    """One folder every container mounts at the same path: the model, the data, the runs
    (readable and writable by the containers' uid), and deploy/certs.sh's certificates."""
    work = tmp_path_factory.mktemp("docker")
    shutil.copytree(tiny_model_dir, work / "model")
    shutil.copy(code_jsonl, work / "code.jsonl")
    for path in [work, *work.rglob("*")]:  # copies keep the 0600/0700 of their sources
        path.chmod(0o777 if path.is_dir() else 0o644)
    subprocess.run(
        ["bash", str(ROOT / "deploy/certs.sh"), "-o", str(work / "certs"), "-n", str(CLIENTS)],
        check=True,
        capture_output=True,
    )
    return work


def deployment(work: Path, image: str) -> ComposeDeployment:
    return ComposeDeployment(work, work / "certs", CLIENTS, image, free_port())


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
    with deployment(work, image) as project:
        run_id = project.conn.submit(load(str(ROOT / "recipes/demo.toml"), sets))
        info = project.wait(run_id, work / "run", 600)
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
    with deployment(work, image) as project:
        run_id = project.conn.submit(load(str(ROOT / "recipes/demo.toml"), sets))
        deadline = time.time() + 300
        while len(read_metrics(out)) < 2:  # round 1 done: round 2 under way
            assert time.time() < deadline, project.logs()
            time.sleep(1)
        project.compose("kill", "supernode-2")
        info = project.wait(run_id, out, 600)
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
