"""In-process grids for tests: faults and observations are injected here, never in src/."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, MessageType, MetricRecord

from fedtune.compress import unbundle
from fedtune.inprocess import InProcessGrid, error_reply


class Killed(BaseException):
    """Stands for the process dying (SIGKILL, OOM): nothing after it runs, not even except."""


class FailingGrid(InProcessGrid):
    """Clients of `partitions` raise in the rounds in `rounds` (all rounds if None)."""

    def __init__(self, cfg, partitions, rounds=None, error="client crashed"):
        super().__init__(cfg)
        self.partitions, self.rounds, self.error = set(partitions), rounds, error

    def handle(self, message):
        pid = self.contexts[message.metadata.dst_node_id].node_config["partition-id"]
        if message.metadata.message_type == MessageType.TRAIN and pid in self.partitions:
            rnd = int(message.content["config"]["server-round"])
            if self.rounds is None or rnd in self.rounds:
                return error_reply(message, RuntimeError(self.error))
        return super().handle(message)


class KilledInRound(InProcessGrid):
    """The server process 'dies' when round `rnd` starts sending (after round rnd-1 ended)."""

    def __init__(self, cfg, rnd):
        super().__init__(cfg)
        self.kill_round = rnd

    def push_messages(self, messages):
        messages = list(messages)
        if (
            messages
            and messages[0].metadata.message_type == MessageType.TRAIN
            and (int(messages[0].content["config"]["server-round"]) >= self.kill_round)
        ):
            raise Killed()
        return super().push_messages(messages)


class RecordingGrid(InProcessGrid):
    """Keeps a copy of every train reply (partition, num-examples, arrays) per round."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.replies: dict[int, list[tuple[int, int, dict]]] = {}
        self.sent: dict[int, dict] = {}
        self.round = 0

    def push_messages(self, messages):
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return super().push_messages(messages)
        self.round = rnd = int(messages[0].content["config"]["server-round"])
        self.sent[rnd] = arrays_of(unbundle(messages[0].content["arrays"]))
        self.replies[rnd] = []
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        for r in replies:
            if r.metadata.message_type == MessageType.TRAIN and not r.has_error():
                self.replies[self.round].append(
                    (
                        int(r.content["metrics"]["partition_id"]),
                        int(r.content["metrics"]["num-examples"]),
                        arrays_of(unbundle(r.content["arrays"])),
                    )
                )
        return replies


def arrays_of(record: ArrayRecord) -> dict:
    return {k: v.numpy().copy() for k, v in record.items()}


class TamperingGrid(RecordingGrid):
    """Partition `attacker`'s train replies pass through `tamper(arrays, metrics, sent)`
    (numpy dicts, changed in place or replaced) before the server sees them."""

    def __init__(self, cfg, attacker, tamper):
        super().__init__(cfg)
        self.attacker, self.tamper = attacker, tamper

    def handle(self, message):
        reply = super().handle(message)
        pid = self.contexts[message.metadata.dst_node_id].node_config["partition-id"]
        if message.metadata.message_type == MessageType.TRAIN and pid == self.attacker:
            sent = arrays_of(unbundle(message.content["arrays"]))
            arrays = arrays_of(unbundle(reply.content["arrays"]))
            metrics = dict(reply.content["metrics"])
            arrays, metrics = self.tamper(arrays, metrics, sent)
            reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
            reply.content["metrics"] = MetricRecord(metrics)
        return reply


class SilentGrid(RecordingGrid):
    """Partition `silent` never answers a train message (a client that hangs)."""

    def __init__(self, cfg, silent):
        super().__init__(cfg)
        self.silent = silent

    def pull_messages(self, message_ids):
        def speaks(i):
            m = self._pending.get(i)
            if m is None or m.metadata.message_type != MessageType.TRAIN:
                return True
            return self.contexts[m.metadata.dst_node_id].node_config["partition-id"] != self.silent

        return super().pull_messages([i for i in message_ids if speaks(i)])
