"""Streaming aggregation: replies folded one at a time give what Flower's strategies
compute from all replies at once, and the server never holds two replies."""

import gc
import weakref

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as S
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedtune import aggregation
from fedtune.federation import run_federation
from fedtune.inprocess import InProcessGrid
from fedtune.simulation import set_task_identity
from test_federation import make_cfg


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity(run_id=1)  # Flower's runtimes set it before a ServerApp builds messages


class ThreeNodeGrid:
    def get_node_ids(self):
        return {11, 22, 33}


def replies_for(messages, seed, scale=1.0):
    """One random reply per message: arrays near the sent ones, unequal example counts."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, m in enumerate(messages):
        arrays = {
            k: torch.from_numpy(v.numpy()) + scale * torch.randn(v.shape, generator=gen)
            for k, v in m.content["arrays"].items()
        }
        content = RecordDict(
            {"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 10 + 7 * i})}
        )
        m.metadata.__dict__["_message_id"] = f"m{seed}-{i}"
        out.append(Message(content, reply_to=m))
    return out


def folded(replies, dtype=torch.float32):
    acc = aggregation.RunningMean(dtype)
    for r in replies:
        acc.add(r.content["arrays"], float(r.content["metrics"]["num-examples"]))
    return acc


def initial():
    gen = torch.Generator().manual_seed(0)
    return ArrayRecord({"w": torch.randn(5, 7, generator=gen), "b": torch.randn(7, generator=gen)})


def test_running_mean_is_flowers_weighted_mean():
    msgs = list(S.FedAvg().configure_train(1, initial(), ConfigRecord({}), ThreeNodeGrid()))
    replies = replies_for(msgs, seed=1)
    stock = aggregate_arrayrecords([r.content for r in replies], "num-examples")
    ours = folded(replies).mean()
    for k in stock:
        np.testing.assert_allclose(ours[k].numpy(), stock[k].numpy(), rtol=1e-6, atol=1e-6)
    # float64 accumulation against a float64 brute force, by hand
    w = np.array([10.0, 17.0, 24.0])
    brute = (
        sum(wi * r.content["arrays"]["w"].numpy().astype(np.float64) for wi, r in zip(w, replies))
        / w.sum()
    )
    acc64 = folded(replies, torch.float64)
    assert acc64.wire["w"] == torch.float32
    np.testing.assert_allclose(acc64.mean()["w"].numpy(), brute, rtol=1e-7)


@pytest.mark.parametrize(
    "make",
    [
        lambda: S.FedAvgM(server_learning_rate=0.7, server_momentum=0.9),
        lambda: S.FedAdam(eta=1e-2),
        lambda: S.FedYogi(eta=1e-2),
        lambda: S.FedAdagrad(eta=1e-2),
        lambda: S.FedProx(proximal_mu=0.1),
        lambda: S.FedAvg(),
    ],
    ids=["fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "fedavg"],
)
def test_one_mean_reply_gives_the_strategys_own_result_over_rounds(make):
    """Two copies of a strategy, one fed all replies (stock), one the folded mean: their
    server steps (momentum, Adam moments) agree over three rounds."""
    stock, ours = make(), make()
    a_stock = a_ours = initial()
    for rnd in (1, 2, 3):
        msgs_s = list(stock.configure_train(rnd, a_stock, ConfigRecord({}), ThreeNodeGrid()))
        msgs_o = list(ours.configure_train(rnd, a_ours, ConfigRecord({}), ThreeNodeGrid()))
        a_stock, _ = stock.aggregate_train(rnd, replies_for(msgs_s, seed=rnd))
        a_ours = aggregation.aggregate(ours, rnd, folded(replies_for(msgs_o, seed=rnd)), msgs_o[0])
        for k in a_stock:
            np.testing.assert_allclose(a_ours[k].numpy(), a_stock[k].numpy(), rtol=1e-5, atol=1e-6)
    # the three rounds moved the weights (the comparison is not of two untouched inputs)
    assert not np.allclose(a_stock["w"].numpy(), initial()["w"].numpy(), atol=1e-3)


def test_fedavg_result_is_the_strategy_on_the_mean_reply_bitwise():
    strategy = S.FedAvg()
    msgs = list(strategy.configure_train(1, initial(), ConfigRecord({}), ThreeNodeGrid()))
    acc = folded(replies_for(msgs, seed=5))
    weight = acc.weight
    mean = acc.mean()
    via_strategy, _ = strategy.aggregate_train(1, [aggregation.mean_reply(mean, weight, msgs[0])])
    shortcut = aggregation.aggregate(S.FedAvg(), 1, folded(replies_for(msgs, seed=5)), msgs[0])
    for k in mean:
        assert np.array_equal(shortcut[k].numpy(), via_strategy[k].numpy())


class CountingGrid(InProcessGrid):
    """Counts how many train replies are still alive each time a new one is pulled."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.live, self.alive_at_pull = weakref.WeakSet(), []

    def pull_messages(self, message_ids):
        gc.collect()
        self.alive_at_pull.append(len(self.live))
        replies = super().pull_messages(message_ids)
        for r in replies:
            if not r.has_error() and "arrays" in r.content.array_records:
                self.live.add(r)
        return replies


def test_the_server_holds_no_earlier_reply_when_it_pulls_the_next(
    tmp_path, tiny_model_dir, code_jsonl
):
    cfg = make_cfg(
        tiny_model_dir,
        code_jsonl,
        tmp_path / "run",
        "federation.num_clients=4",
        "federation.rounds=1",
    )
    grid = CountingGrid(cfg)
    run_federation(grid, cfg)
    assert len(grid.alive_at_pull) >= 4 and max(grid.alive_at_pull) == 0


def test_fedavgm_step_is_flowers_fedavgm_bitwise_over_rounds():
    """fedtune's tensor-by-tensor FedAvgM step against Flower's own aggregate_train on the
    same mean reply: identical weights and momentum buffer, round after round."""
    stock = S.FedAvgM(server_learning_rate=0.7, server_momentum=0.9)
    ours = S.FedAvgM(server_learning_rate=0.7, server_momentum=0.9)
    a_stock = a_ours = initial()
    for rnd in (1, 2, 3):
        msgs_s = list(stock.configure_train(rnd, a_stock, ConfigRecord({}), ThreeNodeGrid()))
        msgs_o = list(ours.configure_train(rnd, a_ours, ConfigRecord({}), ThreeNodeGrid()))
        acc = folded(replies_for(msgs_s, seed=rnd))
        weight = acc.weight
        a_stock, _ = stock.aggregate_train(
            rnd, [aggregation.mean_reply(acc.mean(), weight, msgs_s[0])]
        )
        a_ours = aggregation.aggregate(ours, rnd, folded(replies_for(msgs_o, seed=rnd)), msgs_o[0])
        for k in a_stock:
            assert np.array_equal(a_ours[k].numpy(), a_stock[k].numpy())
        for m_s, m_o in zip(stock.momentum_vector, ours.momentum_vector):
            assert np.array_equal(m_s, m_o)
        assert ours.current_arrays is a_ours
    assert not np.allclose(a_stock["w"].numpy(), initial()["w"].numpy(), atol=1e-3)
