"""End to end: `fedtune run` on Flower's Simulation Engine, then check the run folder."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import independent
from fedtune import config as C, model as M, tasks
from fedtune.compress import bundle
from fedtune.results import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(model_dir, data_file, out, *extra):
    return [
        f"model.name={model_dir}",
        f"data.source={data_file}",
        "data.max_samples=0",
        "data.test_samples=4",
        "data.seq_len=32",
        "federation.num_clients=2",
        "federation.rounds=2",
        "train.local_steps=3",
        "train.batch_size=2",
        "lora.target_modules=['q_proj','v_proj']",
        "eval.max_blocks=16",
        f"output.dir={out}",
        *extra,
    ]


def cli_args(overrides, recipe=str(ROOT / "recipes/demo.toml")):
    args = [sys.executable, "-m", "fedtune.cli", "run", *([recipe] if recipe else [])]
    for o in overrides:
        args += ["--set", o]
    return args


def run_cli(overrides, timeout=400):
    proc = subprocess.run(cli_args(overrides), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_lora_simulation_writes_a_complete_run_folder(tmp_path, tiny_model_dir, code_jsonl):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir, code_jsonl, out)
    proc = run_cli(overrides)
    cfg = C.load(ROOT / "recipes/demo.toml", overrides)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert "round 2/2" in proc.stderr + proc.stdout  # progress on the terminal
    assert "[client 1] round 2 step 3/3" in proc.stderr + proc.stdout
    # a line per phase, each round with its ETA; into a pipe: no colour or cursor codes
    for line in (
        "round 0: evaluating",
        "round 1/2: 2 clients training",
        "round 1: 2/2 clients done",
    ):
        assert line in proc.stderr, line
    assert re.search(r"round 1/2 .*\| elapsed \d+s, ETA \d+s", proc.stderr)
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", proc.stderr + proc.stdout)
    assert "fraction_evaluate is set to 0.0" not in proc.stderr  # what fedtune chose itself
    assert "configure_train: Sampled" not in proc.stderr  # fedtune says "2 clients training"
    assert "(ClientAppActor pid=" not in proc.stderr  # clients' lines without Ray's prefix
    assert (
        proc.stderr.index("starting Flower's Simulation Engine")
        < proc.stderr.index("loading the model")
        < proc.stderr.index("round 0: evaluating")
    )  # no silence before round 0
    assert re.search(r"best round [0-2]: eval_loss", proc.stdout)  # the end-of-run table

    # bytes on the wire: the adapter's ArrayRecord, once per client and direction
    adapter_bytes = bundle(M.to_arrays(M.load_model(cfg))).count_bytes()
    for r in rows[1:]:
        assert r["bytes_down"] == r["bytes_up"] == 2 * adapter_bytes
        assert r["clients_ok"] == 2 and r["train_loss"] > 0 and r["tokens_per_s"] > 0
        assert r["train_tokens"] == 2 * 3 * 2 * 32  # clients x steps x batch x seq
        assert r["round_seconds"] > 0 and r["client_peak_rss_mb"] > 0
    assert all(r["eval_loss"] > 0 for r in rows)
    # simulation keeps client processes warm: the base model is loaded once, not per round
    assert rows[1]["client_model_loads"] >= 1 and rows[2]["client_model_loads"] == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert summary["total_bytes_down"] == 4 * adapter_bytes
    assert (out / "config.toml").exists() and (out / "run.log").read_text()
    assert "round 2/2" in (out / "run.log").read_text()

    # the saved adapter is a standard PEFT adapter that reproduces the final eval loss
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (out / "final" / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    test = tasks.load_task_data(cfg)[0]
    blocks = [
        {"input_ids": b}
        for b in tasks.pack_blocks(test, tok, "text", cfg.data.seq_len)[
            : cfg.eval.max_blocks
        ].tolist()
    ]
    loss = independent.token_loss(peft_model, blocks, M.resolved_precision(cfg.train.precision))
    assert loss == pytest.approx(rows[-1]["eval_loss"], rel=1e-5)
    # and differs from the base model: the adapter carries what was learned
    base_loss = independent.token_loss(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        blocks,
        M.resolved_precision(cfg.train.precision),
    )
    assert abs(base_loss - loss) > 1e-4


@pytest.mark.slow
def test_full_finetuning_with_fedprox_in_simulation(tmp_path, tiny_model_dir, code_jsonl):
    """Full mode ships every weight; FedProx reaches the client as `proximal-mu`."""
    out = tmp_path / "full"
    overrides = tiny_overrides(
        tiny_model_dir,
        code_jsonl,
        out,
        "model.finetune=full",
        "strategy.name=fedprox",
        "strategy.params.proximal_mu=0.1",
        "train.lr=1e-3",
        "output.save_final=true",
    )
    run_cli(overrides)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = C.load(ROOT / "recipes/demo.toml", overrides)
    full_bytes = bundle(M.to_arrays(M.load_model(cfg))).count_bytes()
    assert rows[1]["bytes_up"] == 2 * full_bytes
    # the strategy's mu reached every client, which added mu/2 ||w - w_global||^2
    assert [r["client_proximal_mu"] for r in rows[1:]] == [0.1, 0.1]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")  # a full save_pretrained model


@pytest.mark.slow
def test_compressed_updates_travel_through_the_simulation_engine(
    tmp_path, tiny_model_dir, code_jsonl
):
    """topk-int8 up, int8 down, through Ray and Flower's message serialization: the bytes
    are what the codecs produce for these shapes: at most their size before zlib packing,
    and at least the all-zero update, which packs best), and the run trains."""
    from fedtune import compress

    out = tmp_path / "comp"
    overrides = tiny_overrides(
        tiny_model_dir, code_jsonl, out, "comm.uplink=topk-int8", "comm.downlink=int8"
    )
    run_cli(overrides)
    rows = read_rows(out)
    cfg = C.load(ROOT / "recipes/demo.toml", overrides)
    zeros = {k: v.float() * 0 for k, v in M.trainable_state(M.load_model(cfg)).items()}
    up, _ = compress.encode(zeros, compress.Codec("topk-int8"), reference=zeros)
    down, _ = compress.encode(zeros, compress.Codec("int8"), reference=zeros)
    # the bundle's zlib-packed index holds each Array's size: a few bytes either way
    slack = 16
    for r in rows[1:]:
        for key, record in (("bytes_up", up), ("bytes_down", down)):
            least = compress.bundle(record).count_bytes()
            most = compress.bundle(independent.unpacked(record)).count_bytes()
            assert 2 * (least - slack) <= r[key] <= 2 * (most + slack)
    assert rows[1]["bytes_down"] == 2 * compress.bundle(down).count_bytes()  # initial weights
    assert rows[2]["bytes_down"] > rows[1]["bytes_down"]  # round 2: a real global update
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def read_rows(out):
    return read_metrics(out)


@pytest.mark.slow
def test_a_killed_simulation_resumes_to_the_same_metrics_and_clients(
    tmp_path, tiny_model_dir, code_jsonl
):
    """Three processes on the real Simulation Engine (10 clients, 3 sampled per round): an
    uninterrupted run, a run SIGKILLed after round 2, and its resume. Flower's node ids are
    random in every process, yet each round samples the same partitions, and the resumed
    run continues with the uninterrupted run's clients and metrics."""
    extra = (
        "federation.rounds=4",
        "output.save_every=1",
        "strategy.name=fedavgm",
        "strategy.params.server_momentum=0.5",
        "output.plots=false",
        "federation.num_clients=10",
        "federation.fraction=0.3",
        "data.test_samples=2",
        "train.local_steps=2",
        "eval.max_blocks=4",
        "train.early_stopping={}",
    )
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_cli(tiny_overrides(tiny_model_dir, code_jsonl, full, *extra))

    proc = subprocess.Popen(
        cli_args(tiny_overrides(tiny_model_dir, code_jsonl, cut, *extra)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not any(r["round"] == 2 for r in read_rows(cut)):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # like an OOM kill: no chance to clean up
    proc.wait()
    killed_at = max(r["round"] for r in read_rows(cut))
    assert 2 <= killed_at < 4 and not (cut / "summary.json").exists()
    before_resume = [r["sampled_partitions"] for r in read_rows(cut)[1:]]

    resumed = subprocess.run(
        cli_args([], recipe=None) + ["--resume", str(cut)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = read_rows(full), read_rows(cut)
    assert [r["round"] for r in b] == [0, 1, 2, 3, 4]
    picks = [r["sampled_partitions"] for r in a[1:]]
    assert all(len(p) == 3 for p in picks) and len({tuple(p) for p in picks}) > 1
    assert before_resume == picks[: len(before_resume)]  # a second process, same picks
    assert [r["sampled_partitions"] for r in b[1:]] == picks  # and the resumed one too
    for ra, rb in zip(a, b):
        assert rb["eval_loss"] == pytest.approx(ra["eval_loss"], rel=1e-5), ra["round"]
        if ra["round"]:
            assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["resumed_from_round"] >= 2


FAILING_CLIENTS = """
# Fault injection for tests/test_simulation_e2e.py: every client's local training raises,
# in the CLI process and in every Ray worker (they inherit PYTHONPATH). Not part of fedtune.
import fedtune.train

def _fail(*args, **kwargs):
    raise MemoryError("injected: client ran out of memory")

fedtune.train.train_local = _fail
"""


@pytest.mark.slow
def test_every_client_failing_stops_the_simulation_with_one_line(
    tmp_path, tiny_model_dir, code_jsonl
):
    """A run where every client raises must not look finished: two attempts of round 1 are
    recorded as failed, the command exits 1 and its last line names the clients' errors."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAILING_CLIENTS)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "inject")}
    proc = subprocess.run(
        cli_args(tiny_overrides(tiny_model_dir, code_jsonl, out, "output.plots=false")),
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedtune: round 1: 0 of 2 sampled clients replied"), last
    # the Simulation Engine keeps the message, not the class (Ray wraps it twice)
    assert last.count("injected: client ran out of memory") == 2, last
    lines = read_metrics(out, failed=True)
    assert [(x["round"], x.get("status")) for x in lines] == [
        (0, None),
        (1, "failed"),
        (1, "failed"),
    ]
    assert not (out / "summary.json").exists() and not (out / "final").exists()


HANGING_CLIENT = """
# Fault injection: client 1 hangs for 90 s in round 1, in every Ray worker (PYTHONPATH).
import time
import fedtune.train

_train = fedtune.train.train_local

def _hang(*args, **kwargs):
    if kwargs.get("log_prefix", "").startswith("[client 1] round 1 "):
        time.sleep(90)
    return _train(*args, **kwargs)

fedtune.train.train_local = _hang
"""


@pytest.mark.slow
def test_a_hanging_client_is_dropped_as_late_and_the_run_completes(
    tmp_path, tiny_model_dir, code_jsonl
):
    """federation.round_timeout_s on the Simulation Engine: round 1 goes on without the
    client that hangs, records it as late, and the run finishes without waiting for it."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(HANGING_CLIENT)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "inject")}
    # two actors: the hanging client keeps its own busy for 90 s (Ray cannot take a task
    # back), and round 2's messages run on the other one
    overrides = tiny_overrides(
        tiny_model_dir,
        code_jsonl,
        out,
        "federation.round_timeout_s=30",
        "federation.client_cpus=1",
        "federation.client_threads=1",
        "output.plots=false",
    )
    t0 = time.monotonic()
    proc = subprocess.run(cli_args(overrides), capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert (rows[1]["clients_ok"], rows[1]["clients_failed"]) == (1, 1)
    [late] = rows[1]["failures"]
    assert late["partition"] == 1
    assert late["error"] == "late: no reply within federation.round_timeout_s = 30 s"
    assert rows[1]["round_seconds"] < 80  # it did not wait for the 90 s hang
    assert json.loads((out / "summary.json").read_text())["rounds_completed"] == 2
    print(f"wall {time.monotonic() - t0:.0f} s")
