"""Run the server round loop with clients called in this process: no Ray, no SuperLink.

Why: baselines that are not federated (the pretrained model, centralized training on the
union of client data, each client alone) should not pay for a federation engine, and tests
of the round loop should not either. The messages, the ClientApp handler and the strategy
are Flower's own; only the transport is a function call.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message, RecordDict

from fedtune import config as C


class InProcessGrid:
    """Hands each message straight to fedtune's ClientApp handler, as a SuperNode would."""

    def __init__(self, cfg: C.Config, fail_node: int | None = None):
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        # what Flower's runtimes set before a ServerApp builds messages
        TaskIdentity.task_id, TaskIdentity.run_id = 1, 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        n = cfg.federation.num_clients
        self.fail_node = fail_node
        self.contexts = {
            node: Context(run_id=1, node_id=node, state=RecordDict(),
                          node_config={"partition-id": node - 1, "num-partitions": n},
                          run_config={"config-json": cfg.to_json()})
            for node in range(1, n + 1)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from fedtune.apps import client

        replies = []
        for m in messages:
            if m.metadata.dst_node_id == self.fail_node:
                replies.append(Message(Error(code=1, reason="client crashed"), reply_to=m))
            else:
                replies.append(client.train(m, self.contexts[m.metadata.dst_node_id]))
        return replies


def run_inprocess(cfg: C.Config) -> dict:
    """`run_federation` with in-process clients; returns the summary."""
    from fedtune.federation import run_federation
    from fedtune.simulation import prepare

    prepare(cfg)
    return run_federation(InProcessGrid(cfg), cfg)
