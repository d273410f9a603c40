"""Bad updates never reach the global model: every rejection rule, clipping, late clients
and Flower's robust strategies, each checked against a hand computation on the replies
that were really sent (in-process clients, no Ray)."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedtune import config as C, guard
from fedtune.errors import RunError
from fedtune.federation import run_federation
from fedtune.nodes import NodeDirectory
from fedtune.results import read_metrics
from fedtune.simulation import set_task_identity
from grids import RecordingGrid, SilentGrid, TamperingGrid
from test_federation import make_cfg

ATTACKER = 2


def cfg3(tiny_model_dir, code_jsonl, out, *extra):
    return make_cfg(tiny_model_dir, code_jsonl, out, "federation.num_clients=3", *extra)


def honest_mean(grid, rnd: int, skip=(ATTACKER,)) -> dict:
    """The example-weighted mean of the round's recorded replies, attacker left out."""
    replies = [(n, a) for pid, n, a in grid.replies[rnd] if pid not in skip]
    total = sum(n for n, _ in replies)
    return {k: sum(n * a[k].astype(np.float64) for n, a in replies) / total for k in replies[0][1]}


def assert_global_is(grid, rnd: int, expected: dict):
    """The global model the server sent in round rnd + 1 is `expected`."""
    for k, v in expected.items():
        np.testing.assert_allclose(grid.sent[rnd + 1][k], v, rtol=1e-5, atol=1e-7)


def first_key(arrays):
    return sorted(arrays)[0]


def with_nan(arrays, metrics, sent):
    arrays[first_key(arrays)].flat[3] = np.nan
    return arrays, metrics


def with_inf(arrays, metrics, sent):
    arrays[first_key(arrays)].flat[0] = -np.inf
    return arrays, metrics


def missing_key(arrays, metrics, sent):
    arrays.pop(first_key(arrays))
    return arrays, metrics


def extra_key(arrays, metrics, sent):
    return arrays | {"backdoor.weight": np.zeros(3, np.float32)}, metrics


def wrong_shape(arrays, metrics, sent):
    k = first_key(arrays)
    arrays[k] = arrays[k].reshape(-1)[:-1].copy()
    return arrays, metrics


def wrong_dtype(arrays, metrics, sent):
    k = first_key(arrays)
    arrays[k] = arrays[k].astype(np.float64)
    return arrays, metrics


def scaled_x100(arrays, metrics, sent):
    return {k: sent[k] + 100 * (v - sent[k]) for k, v in arrays.items()}, metrics


def negative_weight(arrays, metrics, sent):
    return arrays, metrics | {"num-examples": -5}


@pytest.mark.parametrize(
    "tamper, reason, extra",
    [
        (with_nan, "non-finite values (NaN/Inf)", []),
        (with_inf, "non-finite values (NaN/Inf)", []),
        (missing_key, "keys: 1 missing", []),
        (extra_key, "1 unexpected (e.g. ['backdoor.weight'])", []),
        (wrong_shape, "shape of", []),
        (wrong_dtype, "dtype of", []),
        (scaled_x100, "> robust.max_update_norm = 1", ["robust.max_update_norm=1.0"]),
        (negative_weight, "num-examples = -5", []),
    ],
)
def test_a_bad_reply_is_rejected_and_the_others_are_averaged(
    tmp_path, tiny_model_dir, code_jsonl, tamper, reason, extra
):
    cfg = cfg3(tiny_model_dir, code_jsonl, tmp_path, *extra)
    grid = TamperingGrid(cfg, ATTACKER, tamper)
    run_federation(grid, cfg)
    rows = read_metrics(tmp_path)
    for row in rows[1:]:
        assert (row["clients_ok"], row["clients_failed"]) == (2, 1)
        [failure] = row["failures"]
        assert failure["partition"] == ATTACKER and failure["error"].startswith("rejected: ")
        assert reason in failure["error"], failure["error"]
    assert_global_is(grid, 1, honest_mean(grid, 1))
    assert math.isfinite(rows[-1]["eval_loss"])


def test_honest_updates_pass_the_norm_limit(tmp_path, tiny_model_dir, code_jsonl):
    """The limit that rejects the x100 update above lets the honest ones through."""
    cfg = cfg3(tiny_model_dir, code_jsonl, tmp_path, "robust.max_update_norm=1.0")
    grid = RecordingGrid(cfg)
    run_federation(grid, cfg)
    rows = read_metrics(tmp_path)
    assert [r["clients_ok"] for r in rows[1:]] == [3, 3]
    assert 0 < rows[1]["update_norm_max"] < 1.0 < 100 * rows[1]["update_norm_max"]
    assert_global_is(grid, 1, honest_mean(grid, 1, skip=()))


def test_rejected_clients_count_as_failed_for_min_clients(tmp_path, tiny_model_dir, code_jsonl):
    cfg = cfg3(tiny_model_dir, code_jsonl, tmp_path, "federation.min_clients=3")
    with pytest.raises(RunError, match=r"round 1: 2 of 3 .* rejected: non-finite"):
        run_federation(TamperingGrid(cfg, ATTACKER, with_nan), cfg)
    lines = read_metrics(tmp_path, failed=True)
    assert [(x["round"], x.get("status")) for x in lines] == [
        (0, None),
        (1, "failed"),
        (1, "failed"),
    ]


def test_clipping_scales_each_update_to_the_norm(tmp_path, tiny_model_dir, code_jsonl):
    clip = 0.004
    cfg = cfg3(tiny_model_dir, code_jsonl, tmp_path, f"robust.clip_update_norm={clip}")
    grid = RecordingGrid(cfg)
    run_federation(grid, cfg)
    sent, replies = grid.sent[1], grid.replies[1]
    total, expected, scales = sum(n for _, n, _ in replies), {}, []
    for _, n, arrays in replies:
        norm = math.sqrt(
            sum(float(((arrays[k] - sent[k]).astype(np.float64) ** 2).sum()) for k in sent)
        )
        scales.append(min(1.0, clip / norm))
        for k in sent:
            clipped = sent[k] + scales[-1] * (arrays[k].astype(np.float64) - sent[k])
            expected[k] = expected.get(k, 0) + n * clipped / total
    assert min(scales) < 1  # the test clips something
    assert_global_is(grid, 1, expected)
    assert read_metrics(tmp_path)[1]["clients_clipped"] == sum(s < 1 for s in scales)


def test_a_client_that_never_replies_is_dropped_as_late(tmp_path, tiny_model_dir, code_jsonl):
    cfg = cfg3(tiny_model_dir, code_jsonl, tmp_path, "federation.round_timeout_s=0.5")
    grid = SilentGrid(cfg, ATTACKER)
    run_federation(grid, cfg)
    rows = read_metrics(tmp_path)
    for row in rows[1:]:
        assert (row["clients_ok"], row["clients_failed"]) == (2, 1)
        assert row["failures"][0]["partition"] == ATTACKER
        assert row["failures"][0]["error"].startswith("late: no reply within")
    assert_global_is(grid, 1, honest_mean(grid, 1))


ROBUST = [
    ("fedmedian", {}),
    ("fedtrimmedavg", {"beta": 0.34}),
    ("krum", {}),
    ("multikrum", {"num_nodes_to_select": 2}),
    ("bulyan", {}),  # f = 0 of 3 replies: Bulyan averages all three, no protection
]


@pytest.mark.parametrize("name, params", ROBUST)
def test_robust_strategies_aggregate_as_flower_does(
    tmp_path, tiny_model_dir, code_jsonl, name, params
):
    """fedtune holds the round's replies and hands them to Flower's class: its result on
    the replies the clients really sent, one of them scaled x100."""
    sets = [f"strategy.name={name}", "federation.min_clients=3"]
    sets += [f"strategy.params.{k}={v}" for k, v in params.items()]
    cfg = cfg3(tiny_model_dir, code_jsonl, tmp_path, *sets)
    grid = TamperingGrid(cfg, ATTACKER, scaled_x100)
    run_federation(grid, cfg)
    strategy = C.strategy_class(name)(**params)
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in a.items()}),
                    "metrics": MetricRecord({"num-examples": n}),
                }
            ),
            dst_node_id=1,
            message_type="train",
        )
        for _, n, a in grid.replies[1]
    ]
    expected, _ = strategy.aggregate_train(1, replies)
    assert_global_is(grid, 1, {k: a.numpy() for k, a in expected.items()})
    attacker = next(a for pid, _, a in grid.replies[1] if pid == ATTACKER)
    far = max(np.abs(attacker[k] - grid.sent[1][k]).max() for k in attacker)
    moved = max(np.abs(grid.sent[2][k] - grid.sent[1][k]).max() for k in attacker)
    if name != "bulyan":
        assert moved < far / 10  # the x100 update did not get in
    else:
        assert moved > far / 10


def test_screen_norm_and_clip_scale_by_hand():
    sent = {"a": torch.zeros(2), "b": torch.ones(1)}
    reply = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([5.0])}  # update (3, 0, 4)
    verdict = guard.screen(reply, sent, C.RobustConfig(clip_update_norm=2.5))
    assert verdict.reason is None and verdict.norm == pytest.approx(5.0)
    assert verdict.scale == pytest.approx(0.5)
    assert guard.screen(reply, sent, C.RobustConfig(clip_update_norm=6)).scale == 1.0
    over = guard.screen(reply, sent, C.RobustConfig(max_update_norm=4.99))
    assert over.reason == "update norm 5 > robust.max_update_norm = 4.99"


@pytest.mark.parametrize(
    "sets, message",
    [
        (["strategy.name=fedtrimmedavg", "strategy.params.beta=0.5"], "must be in [0, 0.5)"),
        (
            ["strategy.name=krum", "strategy.params.num_malicious_nodes=1"],
            "needs at least 2 f + 3 = 5 replies per round, but only 3",
        ),
        (["strategy.name=bulyan"], "`federation.min_clients` = 1 lets a round aggregate"),
        (
            ["strategy.name=multikrum", "strategy.params.num_nodes_to_select=4"],
            "num_nodes_to_select` = 4 exceeds the 3 honest",
        ),
        (["robust.clip_update_norm=-1"], "robust.clip_update_norm"),
        (["federation.round_timeout_s=-2"], "federation.round_timeout_s"),
    ],
)
def test_robust_settings_are_checked_before_anything_runs(sets, message):
    with pytest.raises(C.ConfigError) as err:
        C.load(None, ["federation.num_clients=3", *sets], check_paths=False)
    assert message in str(err.value)


def test_an_error_the_superlink_sends_for_a_dead_node_names_that_node():
    """Flower's SuperLink answers a message to a node that stopped its heartbeat with an
    error whose source is the SuperLink (node 1), not the client: the failure belongs to
    the node the message was sent to, once, not to node 1 plus a `late` entry."""
    set_task_identity(run_id=1)
    directory = NodeDirectory(grid=None, num_clients=2)
    for pid, node in [(0, 70), (1, 71)]:
        directory.learn(node, pid)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (70, 71)]
    for i, m in enumerate(messages):
        m.metadata.__dict__["_message_id"] = f"m{i}"
    error = Message(Error(code=0, reason="node failed to report a heartbeat"), reply_to=messages[1])
    error.metadata.__dict__["_src_node_id"] = 1  # as the SuperLink sends it
    failures = directory.failures(messages, [error], [], {70}, 20.0)
    assert failures == [{"partition": 1, "node": 71, "error": "node failed to report a heartbeat"}]
