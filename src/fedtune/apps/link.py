"""The wire between a ClientApp process and a `fedtune worker`: one request, one reply.

Why: Flower 1.41 starts a fresh ClientApp process for every message (a persistent ClientApp
is Flower request #3670), so in deployment each client paid imports, model load and data
preparation every round. A worker beside each SuperNode keeps all of that warm; the
per-message process imports no torch and only relays the message over a Unix socket.
A frame is a JSON header plus the arrays' raw bytes: no pickle, so nothing that arrives
can run code, and the socket file is readable by its owner only.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

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

from fedtune.errors import DeployError

MAGIC = b"FTW1"
METADATA = ("run_id", "message_id", "src_node_id", "dst_node_id", "group_id", "created_at", "ttl")
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes on Linux
KINDS = {"arrays": ArrayRecord, "metrics": MetricRecord, "configs": ConfigRecord}


class WorkerUnavailable(Exception):
    """No worker answered (none listening, or it died before replying): train in-process."""


class WorkerError(RuntimeError):
    """The worker ran the message and it failed there, as it would have in-process."""


# -- records <-> header + blobs --------------------------------------------------------
def _plain(value):
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _typed(value):
    if isinstance(value, dict):
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return value


def pack(records: RecordDict, blobs: list[bytes]) -> list:
    """A RecordDict as JSON-able entries; array bytes are appended to `blobs`."""
    out = []
    for name, record in records.items():
        kind = next(k for k, cls in KINDS.items() if isinstance(record, cls))
        if kind == "arrays":
            items = []
            for key, arr in record.items():
                items.append([key, arr.dtype, list(arr.shape), arr.stype, len(blobs)])
                blobs.append(arr.data)
        else:
            items = [[key, _plain(value)] for key, value in record.items()]
        out.append([name, kind, items])
    return out


def unpack(entries: list, blobs: list[bytes]) -> RecordDict:
    records = RecordDict()
    for name, kind, items in entries:
        if kind == "arrays":
            records[name] = ArrayRecord(
                {
                    key: Array(dtype=dtype, shape=tuple(shape), stype=stype, data=blobs[i])
                    for key, dtype, shape, stype, i in items
                }
            )
        else:
            records[name] = KINDS[kind]({key: _typed(value) for key, value in items})
    return records


# -- frames ----------------------------------------------------------------------------
def send_frame(sock: socket.socket, header: dict, blobs: list[bytes]) -> None:
    head = json.dumps({**header, "sizes": [len(b) for b in blobs]}).encode()
    sock.sendall(MAGIC + struct.pack("!Q", len(head)) + head)
    for blob in blobs:
        sock.sendall(blob)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket) -> tuple[dict, list[bytes]]:
    start = _recv_exact(sock, len(MAGIC) + 8)
    if start[: len(MAGIC)] != MAGIC:
        raise ConnectionError("not a fedtune worker frame")
    header = json.loads(_recv_exact(sock, struct.unpack("!Q", start[len(MAGIC) :])[0]))
    return header, [_recv_exact(sock, n) for n in header.pop("sizes")]


# -- the ClientApp side ----------------------------------------------------------------
def call(path: str, msg: Message, context: Context) -> tuple[RecordDict, RecordDict]:
    """Send a message and the node's context to the worker at `path`; return the reply's
    content and the context state the worker left. Raises WorkerUnavailable (fall back to
    in-process) or WorkerError (the message failed, as it would have in-process)."""
    blobs: list[bytes] = []
    header = {
        "metadata": {k: getattr(msg.metadata, k) for k in METADATA},
        "message_type": msg.metadata.message_type,
        "run_id": context.run_id,
        "node_id": context.node_id,
        "node_config": dict(context.node_config),
        "run_config": dict(context.run_config),
        "content": pack(msg.content, blobs),
        "state": pack(context.state, blobs),
    }
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)  # to connect; then as long as training takes
            sock.connect(path)
            sock.settimeout(None)
            send_frame(sock, header, blobs)
            reply, reply_blobs = recv_frame(sock)
    except OSError as e:  # refused, missing socket, or the worker died mid-request
        raise WorkerUnavailable(f"worker at {path}: {e}") from e
    if "error" in reply:
        raise WorkerError(f"in the fedtune worker: {reply['error']}")
    return unpack(reply["content"], reply_blobs), unpack(reply["state"], reply_blobs)


# -- the worker side -------------------------------------------------------------------
def listen(path: str) -> socket.socket:
    """A Unix socket at `path`, readable and writable by this user only."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise DeployError(
            f"worker socket path is longer than {MAX_SOCKET_PATH} bytes (a Unix socket "
            f"limit): {path}; use a shorter one, e.g. /tmp/fedtune/worker-0.sock"
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).unlink(missing_ok=True)  # a stale socket from a worker that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(8)
    return sock


def serve_one(conn: socket.socket, handle: Callable[[Message, Context], Message]) -> None:
    """Answer one request on `conn`: rebuild the Message and Context, run `handle`, reply
    with its content and the state it left (or the error, for the ClientApp to raise)."""
    header, blobs = recv_frame(conn)
    context = Context(
        run_id=header["run_id"],
        node_id=header["node_id"],
        node_config=header["node_config"],
        state=unpack(header["state"], blobs),
        run_config=header["run_config"],
    )
    meta = Metadata(
        **header["metadata"], reply_to_message_id="", message_type=header["message_type"]
    )
    msg = Message(unpack(header["content"], blobs), metadata=meta)
    out: list[bytes] = []
    try:
        reply = handle(msg, context)
        head = {"content": pack(reply.content, out), "state": pack(context.state, out)}
    except Exception as e:  # noqa: BLE001 - it travels back and is raised in the ClientApp
        out, head = [], {"error": f"{type(e).__name__}: {e}"}
    send_frame(conn, head, out)
