"""Run the server round loop with clients called in this process: no Ray, no SuperLink.

Why: baselines that are not federated (the pretrained model, centralized training on the
union of client data, each client alone) should not pay for a federation engine, and tests
of the round loop should not either. The messages, the ClientApp handlers and the strategy
are Flower's own; only the transport is a function call. Node ids are random, as Flower's
are, so nothing may depend on them.
"""

from __future__ import annotations

import random
import uuid

from flwr.app import Context, Error, Message, MessageType, RecordDict

from fedtune import config as C
from fedtune.apps import client
from fedtune.federation import run_federation
from fedtune.simulation import CLIENT_APP_RAISED_EXCEPTION, prepare, set_task_identity


class InProcessGrid:
    """Hands each message straight to fedtune's ClientApp handlers, as a SuperNode would.
    An exception in a handler becomes an error reply, as Flower's runtimes do."""

    def __init__(self, cfg: C.Config):
        set_task_identity(run_id=1)
        n = cfg.federation.num_clients
        ids = random.Random().sample(range(1, 2**63), n)
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                state=RecordDict(),
                node_config={"partition-id": pid, "num-partitions": n},
                run_config={"config-json": cfg.to_json()},
            )
            for pid, node in enumerate(ids)
        }
        self._pending: dict[str, Message] = {}

    def get_node_ids(self):
        return set(self.contexts)

    def handle(self, message: Message) -> Message:
        """The ClientApp itself (its mods included) handles the message."""
        try:
            return client.app(message, self.contexts[message.metadata.dst_node_id])
        except Exception as ex:  # noqa: BLE001 - a client's failure is a reply, not a crash
            return error_reply(message, ex)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self._pending[m.metadata.message_id] = m
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        """Train replies one per call, computed when pulled (clients that finish one after
        another: a server that folds replies as they arrive never holds two); the small
        query replies all at once."""
        mine = [i for i in message_ids if i in self._pending]
        queries = [i for i in mine if self._pending[i].metadata.message_type == MessageType.QUERY]
        return [self.handle(self._pending.pop(i)) for i in (queries or mine[:1])]

    def send_and_receive(self, messages, timeout=None):
        ids, replies = set(self.push_messages(messages)), []
        while ids:
            for reply in self.pull_messages(ids):
                ids.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
        return replies


def error_reply(message: Message, ex: Exception) -> Message:
    """The reply Flower's runtimes send when a ClientApp raises."""
    return Message(
        Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex)}:<'{ex}'>"), reply_to=message
    )


def run_inprocess(cfg: C.Config) -> dict:
    """`run_federation` with in-process clients; returns the summary."""
    prepare(cfg)
    return run_federation(InProcessGrid(cfg), cfg)
