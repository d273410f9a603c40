"""Which SuperNode holds which partition, so that client sampling can be reproduced.

Why: Flower gives nodes random 64-bit ids (in simulation and deployment alike), returns
them as a set, and its strategies sample with `random.sample(list(node_ids), k)`. Seeding
`random` is therefore not enough: the same seed picks different partitions in every
process, and a resumed run differs from the uninterrupted one. The server asks every node
its `partition-id` once (a Flower `query` message, answered while the server loads its
model), then lets the strategy sample from nodes sorted by partition id: the choice of
clients becomes a pure function of (seed, round, sorted partition ids).
"""

from __future__ import annotations

import logging
import re
import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

log = logging.getLogger("fedtune")


def short_reason(reason: str) -> str:
    """One line of a Flower error reason -> "X: msg". Flower writes "<class 'X'>:<'msg'>";
    the Simulation Engine's X is Ray's "RayTaskError(ClientAppException)" and its msg a
    Ray traceback ending "Exception ClientAppException occurred. Message: msg"."""
    text, kind = str(reason or "").strip(), ""
    m = re.match(r"<class '([^']+)'>:<'(.*)'>$", text, re.S)
    if m:
        kind, text = m.group(1).rsplit(".", 1)[-1], m.group(2)
    inner = re.findall(r"Exception (\w+) occurred\. Message: (.*)", text, re.S)
    if inner:
        kind, text = inner[-1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else "unknown error"
    wrapper = kind.startswith(("ClientAppException", "RayTaskError"))
    return (f"{kind}: {line}" if kind and not wrapper else line)[:300]


class SortedNodes:
    """A Grid whose `get_node_ids()` lists only nodes of known partitions, in partition
    order (one node per partition: the latest that claimed it); the rest is the grid's."""

    def __init__(self, grid, node_of_partition: dict[int, int]):
        self._grid, self._order = grid, [node_of_partition[p] for p in sorted(node_of_partition)]

    def get_node_ids(self):
        connected = set(self._grid.get_node_ids())
        return [n for n in self._order if n in connected]

    def __getattr__(self, name):
        return getattr(self._grid, name)


class NodeDirectory:
    """node id <-> partition id, learned from `query` replies and from train replies."""

    def __init__(self, grid, num_clients: int):
        self.grid, self.n = grid, num_clients
        self.partition_of: dict[int, int] = {}
        self.node_of: dict[int, int] = {}
        self.pending: dict[str, int] = {}  # query message id -> node id
        self.asked: set[int] = set()

    def learn(self, node_id: int, partition_id: int) -> None:
        self.partition_of[node_id] = partition_id
        self.node_of[partition_id] = node_id  # a restarted SuperNode replaces its old id

    def partitions(self, node_ids) -> list:
        """Sorted partition ids of `node_ids` (None for a node not known yet)."""
        found = [self.partition_of.get(n) for n in node_ids]
        return sorted(p for p in found if p is not None) + [None] * found.count(None)

    def ask(self) -> None:
        """Push a query to every connected node not asked yet; replies are read later."""
        new = [n for n in self.grid.get_node_ids() if n not in self.asked]
        if not new:
            return
        msgs = [
            Message(
                RecordDict({"config": ConfigRecord({})}),
                message_type=MessageType.QUERY,
                dst_node_id=n,
            )
            for n in new
        ]
        ids = list(self.grid.push_messages(msgs))
        self.pending.update(zip(ids, new))
        self.asked.update(new)

    def _collect(self) -> None:
        if not self.pending:
            return
        for reply in self.grid.pull_messages(list(self.pending)):
            node = self.pending.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            if reply.has_error():
                log.info(
                    f"node {node} did not say its partition-id: {short_reason(reply.error.reason)}"
                )
                self.asked.discard(node)  # ask again later (it may have restarted)
            else:
                self.learn(node, int(reply.content["metrics"]["partition-id"]))

    def wait(self, poll: float = 0.2) -> None:
        """Block until `num_clients` connected nodes have said their partition id (the
        strategy's `min_available_nodes` waits for as many)."""
        last_note = time.monotonic()
        while True:
            self.ask()
            self._collect()
            connected = set(self.grid.get_node_ids())
            known = {p for p, n in self.node_of.items() if n in connected}
            if len(known) >= self.n:
                return
            if time.monotonic() - last_note > 30:
                log.info(
                    f"waiting for SuperNodes: {len(known)} of {self.n} known "
                    f"({len(connected)} connected)"
                )
                last_note = time.monotonic()
            time.sleep(poll)

    def sorted_view(self) -> SortedNodes:
        return SortedNodes(self.grid, self.node_of)

    def failures(
        self, messages, errors, rejected: list[dict], ok_nodes: set, timeout_s: float
    ) -> list[dict]:
        """Who failed in a round and why: error replies, rejected replies, and sampled
        clients that never replied (late, with `federation.round_timeout_s`)."""
        # An error reply may come from the SuperLink itself (a node that stopped its
        # heartbeat): its source is not the client, the message it answers names it.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        erred = [
            (sent_to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r) for r in errors
        ]
        answered = ok_nodes | {node for node, _ in erred} | {r["node"] for r in rejected}
        late = f"late: no reply within federation.round_timeout_s = {timeout_s:g} s"
        out = [{"node": node, "error": short_reason(r.error.reason)} for node, r in erred]
        out += rejected
        out += [
            {"node": m.metadata.dst_node_id, "error": late if timeout_s else "no reply"}
            for m in messages
            if m.metadata.dst_node_id not in answered
        ]
        out = [{"partition": self.partition_of.get(f["node"]), **f} for f in out]
        for f in out:
            log.info(f"client {f['partition']} (node {f['node']}) failed: {f['error']}")
        return sorted(out, key=lambda f: (f["partition"] is None, f["partition"] or 0))
