"""The server round loop with Flower's strategies, clients called in-process (no Ray)."""

import json
import random

import numpy as np
import pytest

from fedtune import config as C, data, federation, model as M, tasks
from fedtune.checkpoint import latest, load_weights
from fedtune.errors import RunError
from fedtune.federation import run_federation
from fedtune.inprocess import InProcessGrid
from fedtune.nodes import short_reason
from fedtune.results import read_metrics
from fedtune.rounds import EarlyStopping, build_strategy
from fedtune.train import sampling_seed
from grids import FailingGrid, RecordingGrid


def make_cfg(tiny_model_dir, code_jsonl, out, *extra):
    return C.load(
        None,
        [
            f"model.name={tiny_model_dir}",
            f"data.source={code_jsonl}",
            "data.test_samples=4",
            "data.seq_len=32",
            "federation.num_clients=2",
            "federation.rounds=2",
            "train.local_steps=2",
            "train.batch_size=2",
            "train.lr=5e-3",
            "lora.target_modules=['q_proj','v_proj']",
            "eval.max_blocks=8",
            "output.save_final=false",
            f"output.dir={out}",
            *extra,
        ],
    )


def rows_of(out):
    return read_metrics(out)


@pytest.mark.parametrize("name", C.STRATEGIES)
def test_every_strategy_builds_with_federation_settings(name):
    sets = [f"strategy.name={name}", "federation.fraction=0.5", "federation.num_clients=6"]
    if name == "bulyan":  # Flower's Bulyan needs 4 f + 3 replies: 3 with f = 0
        sets.append("federation.min_clients=3")
    cfg = C.load(None, sets, check_paths=False)
    strategy = build_strategy(cfg)
    assert strategy.fraction_train == 0.5 and strategy.fraction_evaluate == 0.0
    assert strategy.min_available_nodes == cfg.federation.num_clients


def test_fedavgm_momentum_changes_round_two_only(tmp_path, tiny_model_dir, code_jsonl):
    avg = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "avg")
    avgm = make_cfg(
        tiny_model_dir,
        code_jsonl,
        tmp_path / "avgm",
        "strategy.name=fedavgm",
        "strategy.params.server_momentum=0.9",
    )
    run_federation(InProcessGrid(avg), avg)
    run_federation(InProcessGrid(avgm), avgm)
    a, m = rows_of(tmp_path / "avg"), rows_of(tmp_path / "avgm")
    assert a[0]["eval_loss"] == m[0]["eval_loss"]
    # round 1: the momentum buffer is the first pseudo-gradient itself, so FedAvgM == FedAvg
    assert a[1]["eval_loss"] == pytest.approx(m[1]["eval_loss"], rel=1e-6)
    # round 2: 0.9 x the previous update is added on top
    assert abs(a[2]["eval_loss"] - m[2]["eval_loss"]) > 1e-6


def weighted_mean(replies):
    """Hand computation of FedAvg: sum_i n_i w_i / sum_i n_i, per tensor."""
    total = sum(n for _, n, _ in replies)
    return {k: sum(n * arrays[k] for _, n, arrays in replies) / total for k in replies[0][2]}


def test_fedavg_weights_clients_by_their_number_of_examples(tmp_path, tiny_model_dir, code_jsonl):
    cfg = make_cfg(
        tiny_model_dir,
        code_jsonl,
        tmp_path / "run",
        "federation.num_clients=3",
        "federation.rounds=1",
        "output.save_final=true",
    )
    grid = RecordingGrid(cfg)
    run_federation(grid, cfg)
    replies = grid.replies[1]
    sizes = [n for _, n, _ in replies]
    assert len(set(sizes)) > 1, f"partitions must be unequal for this test: {sizes}"
    expected = weighted_mean(replies)
    model = M.load_model(cfg)
    load_weights(model, tmp_path / "run" / "final", "lora")
    final = {k: v.numpy() for k, v in M.trainable_state(model).items()}
    for k, v in expected.items():
        np.testing.assert_allclose(final[k], v, rtol=1e-5, atol=1e-7)
    # and it is not the unweighted mean (the weights matter here)
    plain = {k: sum(a[k] for _, _, a in replies) / len(replies) for k in expected}
    assert any(not np.allclose(plain[k], expected[k], rtol=1e-4, atol=1e-6) for k in expected)


def test_fedavgm_server_learning_rate_scales_the_step(tmp_path, tiny_model_dir, code_jsonl):
    """Round 1 of FedAvgM: w1 = w0 - lr_s * (w0 - mean_i w_i) (the buffer starts at the
    first pseudo-gradient), so lr_s = 0.5 lands halfway between w0 and the clients' mean."""
    cfg = make_cfg(
        tiny_model_dir,
        code_jsonl,
        tmp_path / "run",
        "federation.rounds=2",
        "strategy.name=fedavgm",
        "strategy.params.server_learning_rate=0.5",
        "strategy.params.server_momentum=0.9",
    )
    grid = RecordingGrid(cfg)
    run_federation(grid, cfg)
    w0, avg, w1 = grid.sent[1], weighted_mean(grid.replies[1]), grid.sent[2]
    for k in w0:
        np.testing.assert_allclose(w1[k], w0[k] - 0.5 * (w0[k] - avg[k]), rtol=1e-5, atol=1e-7)
    assert any(np.abs(w1[k] - avg[k]).max() > 1e-6 for k in w0)  # not plain FedAvg


def test_fedprox_with_mu_zero_is_exactly_fedavg(tmp_path, tiny_model_dir, code_jsonl):
    avg = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "avg")
    prox = make_cfg(
        tiny_model_dir,
        code_jsonl,
        tmp_path / "prox",
        "strategy.name=fedprox",
        "strategy.params.proximal_mu=0.0",
    )
    run_federation(InProcessGrid(avg), avg)
    run_federation(InProcessGrid(prox), prox)
    a, p = rows_of(tmp_path / "avg"), rows_of(tmp_path / "prox")
    assert [r["eval_loss"] for r in a] == [r["eval_loss"] for r in p]
    assert [r["client_proximal_mu"] for r in p[1:]] == [0.0, 0.0]


def test_fedprox_sends_mu_and_changes_the_result(tmp_path, tiny_model_dir, code_jsonl):
    avg = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "avg")
    prox = make_cfg(
        tiny_model_dir,
        code_jsonl,
        tmp_path / "prox",
        "strategy.name=fedprox",
        "strategy.params.proximal_mu=100.0",
    )
    run_federation(InProcessGrid(avg), avg)
    run_federation(InProcessGrid(prox), prox)
    a, p = rows_of(tmp_path / "avg"), rows_of(tmp_path / "prox")
    assert p[1]["client_proximal_mu"] == 100.0  # the clients used the server's mu
    assert abs(a[1]["eval_loss"] - p[1]["eval_loss"]) > 1e-6


def test_a_failing_client_is_reported_and_the_others_aggregate(
    tmp_path, tiny_model_dir, code_jsonl
):
    cfg = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "run", "strategy.name=fedadam")
    summary = run_federation(FailingGrid(cfg, partitions=[1]), cfg)
    rows = rows_of(tmp_path / "run")
    assert [r["clients_failed"] for r in rows[1:]] == [1, 1]
    assert [r["clients_ok"] for r in rows[1:]] == [1, 1]
    assert rows[1]["failures"][0]["partition"] == 1
    assert rows[1]["failures"][0]["error"] == "RuntimeError: client crashed"
    assert rows[2]["eval_loss"] != rows[0]["eval_loss"]  # the surviving client's update landed
    assert summary["client_failures"] == 2
    assert "client 1 (node" in (tmp_path / "run" / "run.log").read_text()


def test_sampling_is_a_function_of_seed_round_and_partitions(tmp_path, tiny_model_dir, code_jsonl):
    """10 clients, fraction 0.3: two runs whose nodes get different random ids pick the
    same partitions every round, the ones `random.sample` draws from the sorted partition
    ids with the round's seed; different rounds pick different clients."""
    extra = (
        "federation.num_clients=10",
        "federation.fraction=0.3",
        "federation.rounds=3",
        "train.local_steps=1",
        "eval.max_blocks=2",
        "data.test_samples=2",
        "output.plots=false",
    )
    picked = []
    for name in ("a", "b"):
        cfg = make_cfg(tiny_model_dir, code_jsonl, tmp_path / name, *extra)
        grid = InProcessGrid(cfg)
        run_federation(grid, cfg)
        picked.append([r["sampled_partitions"] for r in rows_of(tmp_path / name)[1:]])
    assert picked[0] == picked[1]
    expected = []
    for rnd in (1, 2, 3):
        random.seed(sampling_seed(0, rnd))
        expected.append(sorted(random.sample(range(10), 3)))
    assert picked[0] == expected
    assert len({tuple(p) for p in picked[0]}) > 1


def test_a_round_below_min_clients_is_retried_then_the_run_stops(
    tmp_path, tiny_model_dir, code_jsonl
):
    cfg = make_cfg(
        tiny_model_dir,
        code_jsonl,
        tmp_path / "run",
        "federation.rounds=3",
        "federation.min_clients=2",
        "federation.max_round_retries=1",
        "output.save_every=2",
        "output.plots=false",
    )
    with pytest.raises(RunError) as err:
        run_federation(FailingGrid(cfg, partitions=[0], rounds={2}, error="out of memory"), cfg)
    msg = str(err.value)
    assert "\n" not in msg and "round 2: 1 of 2 sampled clients replied" in msg
    assert "client 0: RuntimeError: out of memory" in msg and "--resume" in msg
    lines = read_metrics(tmp_path / "run", failed=True)
    assert [(x["round"], x.get("status")) for x in lines] == [
        (0, None),
        (1, None),
        (2, "failed"),
        (2, "failed"),
    ]
    assert [x["attempt"] for x in lines[2:]] == [0, 1]
    assert [r["round"] for r in rows_of(tmp_path / "run")] == [0, 1]  # a failed round is no round
    # the last good round is checkpointed (save_every=2 would have skipped round 1)
    assert latest(tmp_path / "run")[0] == 1
    assert not (tmp_path / "run" / "summary.json").exists()


def test_every_client_failing_stops_the_run(tmp_path, tiny_model_dir, code_jsonl):
    cfg = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "run", "federation.max_round_retries=0")
    with pytest.raises(RunError, match="round 1: 0 of 2 sampled clients replied"):
        run_federation(FailingGrid(cfg, partitions=[0, 1]), cfg)
    assert [r["round"] for r in rows_of(tmp_path / "run")] == [0]


def test_a_supernode_can_bring_its_own_data(tmp_path, tiny_model_dir, code_jsonl):
    """node config `data-path=...` replaces the partition of the shared source."""
    import sysconfig
    from pathlib import Path

    own = tmp_path / "own"
    own.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("csv.py", "calendar.py"):
        (own / name).write_text((stdlib / name).read_text())
    cfg = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "run")
    tok = M.load_tokenizer(cfg.model.name)
    mine = tasks.client_examples(cfg, 1, tok, str(own))
    shared = tasks.client_examples(cfg, 1, tok)
    rows = data.load_source(C.load(None, [f"data.source={own}"]).data)
    expected = tasks.pack_blocks(rows, tok, "text", cfg.data.seq_len).tolist()
    assert [e["input_ids"] for e in mine] == expected and len(mine) != len(shared)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no files match"):
        tasks.client_examples(cfg, 1, tok, str(tmp_path / "empty"))
    with pytest.raises(data.DataError, match="does not exist"):
        tasks.client_examples(cfg, 1, tok, str(tmp_path / "missing.jsonl"))


RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'"
    "ray::ClientAppActor.run() (pid=4242, ip=127.0.0.1)\n"
    '  File "ray_actor.py", line 65, in run\n'
    "    raise ClientAppException(str(ex)) from ex\n"
    "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: out of memory'>"
)


@pytest.mark.parametrize(
    "reason, line",
    [
        ("<class 'MemoryError'>:<'out of memory'>", "MemoryError: out of memory"),
        (
            "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException "
            "ClientAppException occurred. Message: out of memory'>",
            "out of memory",
        ),
        (RAY_REASON, "out of memory"),
        ("", "unknown error"),
    ],
)
def test_a_flower_error_reason_becomes_one_readable_line(reason, line):
    """The Ray-wrapped form is what the Simulation Engine sent in stop 18's test run: the
    first version of short_reason left "'>" on its end."""
    assert short_reason(reason) == line


def test_the_best_round_follows_the_headline_metric_everywhere(
    tmp_path, tiny_model_dir, code_jsonl, monkeypatch
):
    """Loss and accuracy disagree on the best round (loss: 2, accuracy: 1). summary.json and
    checkpoints/best must both follow the recipe's metric; summary.json used to follow
    eval_loss whatever output.keep_best said."""
    evals = iter(
        [
            {"eval_loss": 1.0, "eval_accuracy": 0.5},
            {"eval_loss": 0.9, "eval_accuracy": 0.8},
            {"eval_loss": 0.8, "eval_accuracy": 0.6},
        ]
    )
    monkeypatch.setattr(federation, "evaluate_task", lambda *a, **k: dict(next(evals)))
    cfg = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "r", "output.keep_best=true")
    # a causal LM has no eval_accuracy (config checks refuse it); the patched evaluation has
    cfg = C.updated(C.updated(cfg, "eval", metric="eval_accuracy"), "output", plots=False)
    summary = run_federation(InProcessGrid(cfg), cfg)
    assert (summary["best_metric"], summary["best_round"], summary["best_value"]) == (
        "eval_accuracy",
        1,
        0.8,
    )
    assert json.loads((tmp_path / "r" / "checkpoints" / "best.json").read_text())["round"] == 1


@pytest.mark.parametrize("every, evaluated", [(2, [0, 2, 3]), (0, [3])])
def test_eval_every_thins_server_evaluation_and_changes_nothing_else(
    tmp_path, tiny_model_dir, code_jsonl, every, evaluated
):
    """`eval.every = k`: round 0, every k-th and the last round are evaluated, with the
    same numbers as evaluating every round (evaluation does not touch training)."""
    runs = {}
    for k in (1, every):
        out = tmp_path / f"every{k}"
        cfg = make_cfg(tiny_model_dir, code_jsonl, out, "federation.rounds=3", f"eval.every={k}")
        run_federation(InProcessGrid(cfg), cfg)
        runs[k] = rows_of(out)
    full, thin = runs[1], runs[every]
    assert [r["round"] for r in thin if "eval_loss" in r] == evaluated
    assert all("eval_seconds" not in r for r in thin if r["round"] not in evaluated)
    # not bit-equal: replies fold into the mean in arrival order, which follows Flower's
    # random node ids, and a float32 fold (a fused multiply-add) rounds by order at 1 ulp
    for a, b in zip(full, thin):
        if a["round"] == 0:
            assert "train_loss" not in b or b["train_loss"] is None
        else:
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
        if b["round"] in evaluated:
            assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-6)
    summary = json.loads((tmp_path / f"every{every}" / "summary.json").read_text())
    assert summary["best_round"] in evaluated


def test_early_stopping_counts_evaluations_not_rounds():
    stop = EarlyStopping(C.EarlyStoppingConfig(patience=1), "eval_loss")
    for row in [{"round": 0, "eval_loss": 2.0}, {"round": 1}, {"round": 2, "eval_loss": 1.5}]:
        stop.update(row)
        assert not stop.should_stop(), row  # round 1 was not evaluated: nothing to count
    stop.update({"round": 3, "eval_loss": 1.6})
    assert stop.should_stop()


def test_a_setup_failure_is_written_to_run_log(tmp_path, tiny_model_dir, code_jsonl):
    """In deployment the ServerApp's own output lives in a container: run.log must say why
    the run died (it ended at "loading the model" when the model was unreadable)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    cfg = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "out", f"model.name={model}")
    with pytest.raises(Exception) as caught:
        run_federation(InProcessGrid(cfg), cfg)
    log = (tmp_path / "out" / "run.log").read_text()
    assert f"the run failed: {type(caught.value).__name__}" in log
    assert "Traceback (most recent call last)" in log
    assert not (tmp_path / "out" / "summary.json").exists()
