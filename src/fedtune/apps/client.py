"""Flower ClientApp: relay a train message to this node's warm `fedtune worker`, or train here.

Flower's deployment runtime starts this process for every message, so it imports no torch:
when the SuperNode's node config names a `worker-socket`, the message and the node's
context go to the worker, which keeps model and data across rounds (`apps.link`). With no
worker configured (simulation, or deployment without workers) the handler runs here, as
it would in the worker; a configured worker that does not answer is reported in the reply
(`worker_fallback`) and the message is trained here instead.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.apps import config_from_run_config, link, partition_id, process_age_seconds
from fedtune.console import to_terminal

app = ClientApp()
log = logging.getLogger(__name__)


@app.train()
def train(msg: Message, context: Context) -> Message:
    path = str(context.node_config.get("worker-socket", "") or "")
    if path:
        age = process_age_seconds()  # spawn + imports of this relay, not of the worker
        try:
            content, state = link.call(path, msg, context)
        except link.WorkerUnavailable as e:
            to_terminal()
            log.warning(f"{e}; training in the ClientApp process instead")
        else:
            for key in list(context.state.keys()):
                del context.state[key]
            for key, record in state.items():
                context.state[key] = record
            content["metrics"]["worker"], content["metrics"]["process_age_seconds"] = 1, age
            return Message(content, reply_to=msg)
    # Imported here, not at the top: with a worker, this process must start without torch.
    from fedtune.apps.handler import handle_train

    reply = handle_train(msg, context)
    if path:
        reply.content["metrics"]["worker_fallback"] = 1
    return reply


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The server asks every node its partition once, to sample clients reproducibly."""
    pid = partition_id(context, config_from_run_config(context.run_config))
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)
