"""Aggregation in O(model) memory: replies are folded into one running sum as they arrive.

Why: Flower's `send_and_receive` returns every reply at once and `aggregate_arrayrecords`
sums them, so the server holds N full models (the seed OPT-350M run died with exit 137).
Here the server pushes its messages, pulls replies as they land, adds each one's weighted
tensors into a float32 (or float64) accumulator in place and lets the reply go before the
next is pulled: the peak is the model, the accumulator and the replies in flight.

Why the strategy's result is unchanged: every strategy fedtune offers (FedAvg, FedProx,
FedAvgM, FedAdam, FedYogi, FedAdagrad) starts `aggregate_train` with Flower's
`aggregate_arrayrecords`, the example-weighted mean sum_i (n_i / N) x_i, and then uses only
that mean and its own state (momentum, moments). Handing it ONE reply that carries the mean
and weight N gives (N / N) * mean = the same mean, so its server step is the one it would
have computed from all N replies (up to float rounding of the sum's order).

Robust aggregators (FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan) need every reply
at once: `HeldReplies` keeps them and hands Flower's strategy the list, so their server
holds N replies, as Flower's own path does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as S

WEIGHT_KEY = "num-examples"  # Flower's default `weighted_by_key`, the clients' data size

# A strategy whose aggregate of one reply is that reply (the weight factor is 1.0 and
# x * 1.0 == x exactly): the folded mean is its result, with no further copies.
PLAIN_MEAN = (S.FedAvg, S.FedProx)


def tensors(arrays: ArrayRecord | dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of a reply one at a time: an ArrayRecord's Arrays are deserialized
    only when their turn comes, so a reply never exists twice in full."""
    for key, array in arrays.items():
        yield key, array if isinstance(array, torch.Tensor) else torch.from_numpy(array.numpy())


class RunningMean:
    """sum_i w_i x_i and sum_i w_i, folded one reply at a time, tensor by tensor.

    A clipped reply x' = anchor + s (x - anchor) (`anchor`: the weights the client started
    from) is folded as w s x plus w (1 - s) anchor, the latter kept as one number, so
    clipping costs no extra copy."""

    def __init__(self, dtype: torch.dtype = torch.float32, anchor: dict | None = None):
        self.dtype, self.sums, self.weight, self.count = dtype, {}, 0.0, 0
        self.anchor, self.anchor_weight = anchor, 0.0
        self.wire: dict[str, torch.dtype] = {}  # each tensor's dtype as the clients sent it

    def add(self, arrays, weight: float, scale: float = 1.0) -> None:
        """Fold one reply's arrays (an ArrayRecord, or tensors a codec decoded), its update
        scaled by `scale`."""
        if self.sums and arrays.keys() != self.sums.keys():
            raise ValueError("a reply's arrays have other keys than the first reply's")
        for key, value in tensors(arrays):
            if key in self.sums:
                self.sums[key].add_(value.to(self.dtype), alpha=weight * scale)
            else:
                self.sums[key] = value.to(self.dtype).mul_(weight * scale)
                self.wire[key] = value.dtype
        self.weight += weight
        self.anchor_weight += weight * (1.0 - scale)
        self.count += 1

    def mean(self, offset: dict[str, torch.Tensor] | None = None) -> ArrayRecord:
        """The weighted mean (+ `offset`) as an ArrayRecord, each tensor in the dtype it
        travelled in; the accumulator is released tensor by tensor while it is built."""
        out = ArrayRecord()
        for key in list(self.sums):
            value = self.sums.pop(key)
            if self.anchor_weight:
                value.add_(self.anchor[key].to(value.dtype), alpha=self.anchor_weight)
            value.div_(self.weight)
            if offset is not None:
                value.add_(offset[key].to(value.dtype))
            out[key] = Array(value.to(self.wire[key]).numpy())
            del value
        return out


class HeldReplies:
    """Every reply of a round, for the strategies that need them all (median, Krum, the DP
    wrappers, which clip each reply; `uniform`: every reply weighs 1)."""

    def __init__(self, anchor: dict | None = None, uniform: bool = False):
        self.anchor, self.records, self.weights, self.uniform = anchor, [], [], uniform
        self.weight, self.count = 0.0, 0

    def add(self, arrays, weight: float, scale: float = 1.0) -> None:
        if isinstance(arrays, ArrayRecord) and scale == 1.0:
            record = arrays  # Flower's own Arrays, as they arrived
        else:
            record = ArrayRecord()
            for key, value in tensors(arrays):
                if scale != 1.0:
                    anchor = self.anchor[key].to(value.dtype)
                    value = anchor + (value - anchor) * scale
                record[key] = Array(value.contiguous().numpy())
        self.records.append(record)
        self.weights.append(1.0 if self.uniform else weight)
        self.weight += weight
        self.count += 1

    def replies(self, reply_to: Message) -> list[Message]:
        return [mean_reply(r, w, reply_to) for r, w in zip(self.records, self.weights)]


# Flower's central-DP wrappers (`privacy.dp`): they clip each reply and calibrate the noise
# to an unweighted mean.
DP_WRAPPERS = (
    S.DifferentialPrivacyServerSideFixedClipping,
    S.DifferentialPrivacyClientSideFixedClipping,
    S.DifferentialPrivacyServerSideAdaptiveClipping,
)


def collector(strategy, dtype: torch.dtype, anchor: dict | None) -> RunningMean | HeldReplies:
    """Where a round's replies go: a running mean, or every reply for a robust strategy or
    a DP wrapper."""
    robust = (S.FedMedian, S.FedTrimmedAvg, S.Krum, S.MultiKrum, S.Bulyan)
    if isinstance(strategy, DP_WRAPPERS):
        return HeldReplies(anchor, uniform=True)
    return HeldReplies(anchor) if isinstance(strategy, robust) else RunningMean(dtype, anchor)


def fedavgm_step(strategy: S.FedAvgM, mean: ArrayRecord) -> ArrayRecord:
    """What Flower's FedAvgM.aggregate_train does after its weighted mean, tensor by tensor:
    the same float32 numpy expressions in the same order, so the result and the momentum
    buffer are bit-identical (tests/test_aggregation.py), but the mean, the pseudo-gradient
    and the new weights exist one tensor at a time instead of as ~3 extra copies of the
    model (bench/aggregation_memory.py). The state stays Flower's: `momentum_vector` (a list
    in key order) and `current_arrays`, so checkpoints and resume are unchanged."""
    if not strategy.server_opt:
        return mean
    first = strategy.momentum_vector is None
    momentum = [] if first else strategy.momentum_vector
    out = ArrayRecord()
    for i, key in enumerate(list(mean.keys())):
        old = strategy.current_arrays[key].numpy()
        pseudo_gradient = old - mean.pop(key).numpy()  # updates are opposite of gradients
        if strategy.server_momentum > 0.0:
            if first:
                momentum.append(pseudo_gradient)
            else:
                momentum[i] = strategy.server_momentum * momentum[i] + pseudo_gradient
            pseudo_gradient = momentum[i]
        out[key] = Array(np.asarray(old - strategy.server_learning_rate * pseudo_gradient))
        del old, pseudo_gradient
    if strategy.server_momentum > 0.0:
        strategy.momentum_vector = momentum
    strategy.current_arrays = out
    return out


def pull_as_they_arrive(
    grid, messages: list[Message], poll_s: float = 0.05, timeout_s: float = 0.0
) -> Iterator[Message]:
    """Push `messages`, then yield each reply once it has arrived, one at a time, so the
    caller can fold it and drop it before the next one is taken from the grid. With
    `timeout_s`, stop waiting that many seconds after the push: the rest are late."""
    waiting = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout_s if timeout_s else float("inf")
    wait = poll_s
    while waiting and time.monotonic() < deadline:
        arrived = list(grid.pull_messages(waiting))
        if not arrived:
            # back off to 1 s: in deployment each pull is a gRPC call to the SuperLink, and
            # 20 a second took CPU from a client training on the same cores
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            wait = min(1.0, wait * 1.5)
            continue
        wait = poll_s
        while arrived:
            reply = arrived.pop(0)
            waiting.discard(reply.metadata.reply_to_message_id)
            yield reply
            del reply


def mean_reply(arrays: ArrayRecord, weight: float, reply_to: Message) -> Message:
    """The one reply a mean-based strategy is handed: the mean, with the total weight."""
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({WEIGHT_KEY: weight})})
    return Message(content, reply_to=reply_to)


def aggregate(
    strategy, rnd: int, folded: RunningMean | HeldReplies, reply_to: Message, offset=None
) -> ArrayRecord | None:
    """The strategy's new global arrays from the folded replies (None if none arrived)."""
    if not folded.count:
        return None
    if isinstance(folded, HeldReplies):
        new_arrays, _ = strategy.aggregate_train(rnd, folded.replies(reply_to))
        if new_arrays is not None and offset is not None:  # the downlink's rounding
            new_arrays = ArrayRecord(
                {k: torch.from_numpy(a.numpy()) + offset[k] for k, a in new_arrays.items()}
            )
        return new_arrays
    arrays = folded.mean(offset)
    if type(strategy) in PLAIN_MEAN:
        return arrays
    if type(strategy) is S.FedAvgM and strategy.current_arrays is not None:
        return fedavgm_step(strategy, arrays)
    new_arrays, _ = strategy.aggregate_train(rnd, [mean_reply(arrays, folded.weight, reply_to)])
    return new_arrays
