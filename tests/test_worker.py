"""`fedtune worker` and its wire (apps.link): records cross it unchanged, failures come back
as failures, a missing or dying worker means training in the ClientApp, and a worker gives
the results of in-process training."""

import math
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)

from fedtune.apps import link, worker
from fedtune.config import load
from fedtune.errors import DeployError
from fedtune.federation import run_federation
from fedtune.inprocess import InProcessGrid
from fedtune.results import read_metrics
from fedtune.simulation import prepare
from test_simulation_e2e import ROOT, tiny_overrides


@pytest.fixture
def sock_dir():
    with tempfile.TemporaryDirectory(prefix="ft-") as d:  # short: Unix paths <= 107 bytes
        yield Path(d)


def records() -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord(
                {
                    "w": Array(np.arange(6, dtype=np.float32).reshape(2, 3) / 7),
                    "idx": Array(np.array([3, -1, 2**40], dtype=np.int64)),
                    "packed": Array(np.frombuffer(b"\x00\xffzlib", dtype=np.uint8)),
                    "empty": Array(np.zeros((0, 4), dtype=np.float16)),
                }
            ),
            "metrics": MetricRecord({"n": 7, "loss": 0.1 + 0.2, "nan": math.nan, "v": [1.5, 2.0]}),
            "config": ConfigRecord(
                {"s": "a 'quoted' \"x\"", "flag": True, "b": b"\x00\x01", "bl": [b"x", b""]}
            ),
        }
    )


def assert_same(a: RecordDict, b: RecordDict) -> None:
    assert list(a.keys()) == list(b.keys())
    for key in a["arrays"].keys():
        x, y = a["arrays"][key], b["arrays"][key]
        assert (x.dtype, x.shape, x.stype, x.data) == (y.dtype, y.shape, y.stype, y.data), key
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    for name in ("metrics", "config"):
        for key, value in a[name].items():
            other = b[name][key]
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(other)
            else:
                assert other == value and type(other) is type(value), (name, key)


def test_records_cross_the_wire_unchanged():
    blobs: list[bytes] = []
    entries = link.pack(records(), blobs)
    left, right = socket.socketpair()
    with left, right:
        sender = threading.Thread(target=link.send_frame, args=(left, {"e": entries}, blobs))
        sender.start()
        header, got = link.recv_frame(right)
        sender.join()
    assert_same(records(), link.unpack(header["e"], got))


def double(msg: Message, context: Context) -> Message:
    """A stand-in handler: doubles `w`, counts calls in the node state, echoes the node."""
    w = msg.content["arrays"]["w"].numpy() * 2
    calls = int(context.state["seen"]["calls"]) + 1 if "seen" in context.state else 1
    context.state["seen"] = ConfigRecord({"calls": calls})
    metrics = MetricRecord({"partition": int(context.node_config["partition-id"])})
    content = RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "metrics": metrics})
    return Message(content, reply_to=msg)


def serve_in_thread(path: str, handle, requests: int) -> threading.Thread:
    sock = link.listen(path)

    def loop():
        with sock:
            for _ in range(requests):
                conn, _ = sock.accept()
                with conn:
                    link.serve_one(conn, handle)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def node_context(**node_config) -> Context:
    config = {"partition-id": 1, "num-partitions": 2, **node_config}
    return Context(run_id=5, node_id=9, node_config=config, state=RecordDict(), run_config={})


def train_message() -> Message:
    meta = {k: 0 for k in link.METADATA} | {"message_id": "m1", "group_id": "1", "ttl": 60.0}
    meta["created_at"] = time.time()
    return Message(
        records(),
        metadata=Metadata(**meta, reply_to_message_id="", message_type="train"),
    )


def test_the_worker_runs_the_handler_and_keeps_the_node_state(sock_dir):
    path = str(sock_dir / "w.sock")
    t = serve_in_thread(path, double, 2)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # this user only
    context = node_context()
    for calls in (1, 2):
        content, state = link.call(path, train_message(), context)
        context.state = state  # what the ClientApp writes back
        np.testing.assert_array_equal(
            content["arrays"]["w"].numpy(), np.arange(6, dtype=np.float32).reshape(2, 3) / 7 * 2
        )
        assert content["metrics"]["partition"] == 1
        assert state["seen"]["calls"] == calls
    t.join(5)


def test_a_failure_in_the_worker_comes_back_as_a_failure(sock_dir):
    path = str(sock_dir / "w.sock")

    def broken(msg, context):
        raise ValueError("partition 1 has no examples")

    t = serve_in_thread(path, broken, 1)
    with pytest.raises(link.WorkerError, match="ValueError: partition 1 has no examples"):
        link.call(path, train_message(), node_context())
    t.join(5)


def test_no_worker_or_a_worker_that_dies_is_unavailable(sock_dir):
    with pytest.raises(link.WorkerUnavailable, match="No such file"):
        link.call(str(sock_dir / "none.sock"), train_message(), node_context())
    path = str(sock_dir / "dies.sock")
    sock = link.listen(path)

    def die():  # reads the request, then goes away without a reply
        conn, _ = sock.accept()
        link.recv_frame(conn)
        conn.close()

    t = threading.Thread(target=die, daemon=True)
    t.start()
    with pytest.raises(link.WorkerUnavailable, match="connection closed"):
        link.call(path, train_message(), node_context())
    t.join(5)
    sock.close()


def test_a_socket_path_too_long_for_unix_is_one_clear_error(tmp_path):
    with pytest.raises(DeployError, match="longer than 100 bytes"):
        link.listen(str(tmp_path / ("x" * 120) / "w.sock"))


def test_the_clientapp_process_imports_no_torch():
    code = "import sys, fedtune.apps.client; print({'torch', 'transformers'} & set(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "set()"


def test_a_worker_gives_in_process_results_and_a_dead_one_falls_back(
    tmp_path, sock_dir, tiny_model_dir, code_jsonl
):
    """Client 0 is served by a worker (the real handler, in a thread here), client 1 names a
    socket nobody listens on: both rounds equal plain in-process training, and the rows
    count one warm client and one fallback."""
    sets = ["output.plots=false", "output.save_every=0"]
    runs = {}
    for name in ("plain", "worker"):
        cfg = load(
            str(ROOT / "recipes/demo.toml"),
            tiny_overrides(tiny_model_dir, code_jsonl, tmp_path / name, *sets),
        )
        prepare(cfg)
        grid = InProcessGrid(cfg)
        if name == "worker":
            t = threading.Thread(
                target=worker.serve, args=(str(sock_dir / "0.sock"), 2), daemon=True
            )
            t.start()
            for context in grid.contexts.values():
                pid = context.node_config["partition-id"]
                context.node_config["worker-socket"] = str(sock_dir / f"{pid}.sock")
        run_federation(grid, cfg)
        runs[name] = read_metrics(tmp_path / name)
    t.join(10)
    plain, warm = runs["plain"], runs["worker"]
    assert [r["round"] for r in warm] == [0, 1, 2]
    for a, b in zip(plain, warm):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
        if a["round"]:
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
            assert (a["client_workers"], a["client_worker_fallbacks"]) == (0, 0)
            assert (b["client_workers"], b["client_worker_fallbacks"]) == (1, 1)
            # each client's own numbers add up to the round's
            clients = b["clients"]
            assert [c["partition"] for c in clients] == [0, 1]
            assert [c["steps"] for c in clients] == [3, 3]  # train.local_steps
            weighted = sum(c["train_loss"] * c["examples"] for c in clients)
            assert weighted / sum(c["examples"] for c in clients) == pytest.approx(b["train_loss"])
