"""Flower's Deployment Engine for real: a SuperLink and SuperNodes as processes on loopback."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.config import load
from fedtune.deploy import DeployError, LocalDeployment, make_tls
from fedtune.interrupt import descendants
from fedtune.results import read_metrics
from fedtune.simulation import prepare
from test_simulation_e2e import ROOT, read_rows, run_cli, tiny_overrides

FLOWER = (
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr-clientapp",
    "flwr-serverapp",
)


def flower_processes(marker: str) -> list:
    """Flower processes whose command line mentions `marker` (this test's tmp folder)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(name in cmd for name in FLOWER) and marker in cmd:
            found.append(cmd)
    return found


def wait_for_refusal(dep):
    with pytest.raises(DeployError) as err:
        for _ in range(90):
            dep.check_nodes()
            time.sleep(1)
    return str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "tls, workers, mode",
    [
        (False, True, ["naive"]),
        (True, False, ["naive"]),
        (False, True, ["rolora"]),
        (False, True, ["svd", "lora.r=4", "lora.client_ranks=[2,4]"]),
        (False, False, ["fedex"]),
    ],
    ids=["insecure-workers", "tls-no-workers", "rolora-workers", "svd-workers", "fedex-no-workers"],
)
def test_deployment_gives_the_simulation_metrics(
    tmp_path, tiny_model_dir, code_jsonl, tls, workers, mode
):
    """Same metrics as simulation, whether a warm `fedtune worker` beside each SuperNode
    trains (the default) or every per-message ClientApp process loads model and data; with
    RoLoRA, whose workers keep one model and freeze a different factor each round; with
    FlexLoRA's per-client ranks (one record per rank through Flower's wire); and with
    FedEx-LoRA, whose fresh ClientApp processes rebuild W0 + the correction every round."""
    sim, dep = tmp_path / "sim", tmp_path / "dep"
    same = (  # client_threads: no thread adjustment
        "output.plots=false",
        "federation.client_threads=1",
        f"lora.aggregation={mode[0]}",
        *mode[1:],
    )
    run_cli(tiny_overrides(tiny_model_dir, code_jsonl, sim, *same))
    args = (
        [
            sys.executable,
            "-m",
            "fedtune.cli",
            "deploy",
            "local",
            str(ROOT / "recipes/demo.toml"),
            "--clients",
            "2",
        ]
        + (["--tls"] if tls else [])
        + ([] if workers else ["--no-workers"])
    )
    for o in tiny_overrides(tiny_model_dir, code_jsonl, dep, *same):
        args += ["--set", o]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "round 2: eval_loss" in proc.stderr  # progress (logged) while it runs
    a, b = read_rows(sim), read_rows(dep)
    assert [r["round"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b):
        assert rb["eval_loss"] == pytest.approx(ra["eval_loss"], rel=1e-5), ra["round"]
        if ra["round"]:
            assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)
            assert rb["bytes_up"] == ra["bytes_up"] and rb["clients_ok"] == 2
            for key in ("lora_naive_error", "lora_fedex_residual", "lora_svd_dropped"):
                if key in ra:  # (each mode writes its own)
                    assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key
    if workers:  # the workers loaded the model in round 1 and kept it
        assert [r["client_model_loads"] for r in b[1:]] == [2, 0]
        assert all((r["client_workers"], r["client_worker_fallbacks"]) == (2, 0) for r in b[1:])
    else:  # every message started a fresh ClientApp process that loaded the model; the
        # tokenized partition came from the on-disk cache written by the simulation run
        assert all(r["client_model_loads"] == 2 and r["client_workers"] == 0 for r in b[1:])
    assert (dep / "summary.json").exists() and (dep / "final" / "adapter_config.json").exists()
    assert not flower_processes(str(dep)), "processes left running after the deployment"


@pytest.mark.slow
def test_unregistered_key_and_wrong_certificate_are_refused(tmp_path):
    class OneUnregistered(LocalDeployment):
        def register(self, public_key):
            if "supernode-1" not in str(public_key):  # node 1 never gets registered
                super().register(public_key)

    with OneUnregistered(tmp_path / "auth", 2, auth=True) as dep:
        message = wait_for_refusal(dep)
    assert "supernode-1 exited" in message
    assert "No SuperNode found with the given public key" in message

    with LocalDeployment(tmp_path / "tls", 1, tls=True) as dep:
        other_ca = make_tls(tmp_path / "other-ca", 0)["ca"]
        dep.start_supernode(0, root_cert=other_ca, name="supernode-wrong-ca")
        message = wait_for_refusal(dep)
    assert "supernode-wrong-ca exited" in message
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert not flower_processes(str(tmp_path))


@pytest.mark.slow
def test_a_killed_supernode_is_dropped_then_rejoins_and_is_sampled_again(
    tmp_path, tiny_model_dir, code_jsonl
):
    """One of three SuperNodes is SIGKILLed while a round is under way: that round goes on
    with the other two (late after round_timeout_s, or Flower's error reply), the node is
    restarted with a new node id, learned again, and later rounds sample it."""
    out = tmp_path / "run"
    sets = tiny_overrides(tiny_model_dir, code_jsonl, out, "output.plots=false")
    sets += ["federation.num_clients=3", "federation.rounds=5", "federation.min_clients=2"]
    sets += ["federation.round_timeout_s=60", "federation.client_threads=1"]
    cfg = load(str(ROOT / "recipes/demo.toml"), sets)
    prepare(cfg)
    with LocalDeployment(tmp_path / "deployment", 3) as dep:
        run_id = dep.submit(cfg)
        wait_until(lambda: len(read_metrics(out)) >= 2, 300)  # round 1 done, round 2 on
        victim = dict(dep.procs)["supernode-2"]
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        dep.procs = [(n, p) for n, p in dep.procs if p is not victim]
        wait_until(lambda: any(r.get("failures") for r in read_metrics(out)), 120)
        dep.start_supernode(2, name="supernode-2-restarted")
        wait_until(lambda: str(dep.status(run_id).get("status")).startswith("finished"), 400)
        assert dep.status(run_id)["status"] == "finished:completed"
    rows = read_metrics(out)
    assert [r["round"] for r in rows if r.get("status") != "failed"] == [0, 1, 2, 3, 4, 5]
    hit = [r for r in rows[1:] if r.get("failures") and r.get("status") != "failed"]
    seen = [(r["round"], r.get("sampled_partitions"), r.get("failures")) for r in rows[1:]]
    assert hit and all(f["partition"] == 2 for r in hit for f in r["failures"]), seen
    assert all((r["clients_ok"], r["clients_failed"]) == (2, 1) for r in hit)
    later = [r for r in rows[1:] if r["round"] > hit[-1]["round"]]
    assert later and later[-1]["clients_ok"] == 3, seen  # the restarted node was sampled again
    per_client = rows[1]["bytes_up"] / rows[1]["clients_ok"]
    assert all(r["bytes_up"] == per_client * r["clients_ok"] for r in rows[1:])
    assert all(math.isfinite(r["eval_loss"]) for r in rows)
    assert (out / "summary.json").exists()


@pytest.mark.slow
def test_a_killed_worker_costs_one_cold_round_and_is_restarted(
    tmp_path, tiny_model_dir, code_jsonl
):
    """worker-1 is SIGKILLed after round 1: in round 2 its SuperNode's ClientApp trains
    in-process (and the row says so), `check_nodes` restarts the worker, and the last round
    is warm on both nodes again; every loss equals simulation's."""
    sim, out = tmp_path / "sim", tmp_path / "run"
    sets = ["output.plots=false", "federation.rounds=4", "federation.client_threads=1"]
    run_cli(tiny_overrides(tiny_model_dir, code_jsonl, sim, *sets))
    cfg = load(
        str(ROOT / "recipes/demo.toml"), tiny_overrides(tiny_model_dir, code_jsonl, out, *sets)
    )
    prepare(cfg)
    with LocalDeployment(tmp_path / "deployment", 2, workers=True) as dep:
        run_id = dep.submit(cfg)
        wait_until(lambda: len(read_metrics(out)) >= 2, 300)  # round 1 done
        victim = dict(dep.procs)["worker-1"]
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        wait_until(lambda: len(read_metrics(out)) >= 3, 300)  # round 2 done, cold on node 1
        dep.check_nodes()  # restarts worker-1
        assert victim not in [p for _, p in dep.procs] and "worker-1" in dict(dep.procs)
        wait_until(lambda: str(dep.status(run_id).get("status")).startswith("finished"), 300)
        assert dep.status(run_id)["status"] == "finished:completed"
    rows, expected = read_metrics(out), read_rows(sim)
    warm = [(r["client_workers"], r["client_worker_fallbacks"]) for r in rows[1:]]
    assert warm[0] == (2, 0) and warm[1] == (1, 1) and warm[3] == (2, 0), warm
    for a, b in zip(expected, rows, strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5), a["round"]
        if a["round"]:
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5), a["round"]


def wait_until(condition, timeout: float, poll: float = 0.2) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(poll)


def follow(dep, run_dir, rows, monkeypatch, running=lambda: None):
    """Run `dep.wait` while a thread writes `rows` metrics lines, then summary.json; returns
    how many times `flwr ls` was asked. Sleeps are shortened to 10 ms."""
    import json
    import threading

    real_sleep, asked, done = time.sleep, [], threading.Event()
    monkeypatch.setattr(time, "sleep", lambda s: real_sleep(min(s, 0.01)))
    monkeypatch.setattr(dep, "serverapp_running", running)

    def status(run_id):
        asked.append(run_id)
        return {"status": "finished:completed" if done.is_set() else "running"}

    monkeypatch.setattr(dep, "status", status)

    def write():
        pause = threading.Event()
        for r in range(rows):
            with (run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"round": r, "eval_loss": 1.0}) + "\n")
            pause.wait(0.1)
        (run_dir / "summary.json").write_text("{}")
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    info = dep.wait(7, run_dir, timeout=30)
    writer.join()
    assert info["status"] == "finished:completed"
    return len(asked)


def test_wait_asks_flwr_ls_when_the_run_looks_finished_not_every_poll(tmp_path, monkeypatch):
    """Each `flwr ls` is a Python process of ~2 CPU-s; asked every poll it took half a core
    from the clients of a local deployment."""
    dep = LocalDeployment(tmp_path / "work", 1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert follow(dep, run_dir, 10, monkeypatch) <= 2  # at start, then once summary.json is there


def test_wait_asks_when_the_serverapp_process_is_gone(tmp_path, monkeypatch):
    """A ServerApp that crashed writes no summary.json: its process vanishing is the signal."""
    dep = LocalDeployment(tmp_path / "work", 1)
    dep.status_every_s = 3600
    states = iter([None, True, True, True, False])  # not started yet, running x3, gone
    real_sleep, asked = time.sleep, []
    monkeypatch.setattr(time, "sleep", lambda s: real_sleep(min(s, 0.01)))
    monkeypatch.setattr(dep, "serverapp_running", lambda: next(states, False))

    def status(run_id):
        asked.append(run_id)
        return {"status": "finished:failed" if len(asked) > 1 else "running"}

    monkeypatch.setattr(dep, "status", status)
    assert dep.wait(7, tmp_path, timeout=30)["status"] == "finished:failed"
    assert len(asked) == 2  # at start, then when the process had gone


def test_serverapp_running_finds_the_process_under_the_superlink(tmp_path):
    """The real /proc walk: a stand-in SuperLink whose child is named flwr-serverapp."""
    dep = LocalDeployment(tmp_path / "work", 1)
    parent = subprocess.Popen(["bash", "-c", "(exec -a flwr-serverapp sleep 30) & wait"])
    try:
        dep.procs.append(("superlink", parent))
        wait_until(lambda: dep.serverapp_running() is True, timeout=10, poll=0.05)
        for pid in descendants(parent.pid):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: dep.serverapp_running() is False, timeout=10, poll=0.05)
    finally:
        parent.kill()
        parent.wait()
