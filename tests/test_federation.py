"""The server round loop with Flower's strategies, clients called in-process (no Ray)."""

import json

import pytest

from fedtune import config as C
from fedtune.apps import client
from fedtune.federation import build_strategy, run_federation
from fedtune.inprocess import InProcessGrid


def make_cfg(tiny_model_dir, code_jsonl, out, *extra):
    return C.load(None, [f"model.name={tiny_model_dir}", f"data.source={code_jsonl}",
                         "data.test_samples=4", "data.seq_len=32", "federation.num_clients=2",
                         "federation.rounds=2", "train.local_steps=2", "train.batch_size=2",
                         "train.lr=5e-3", "lora.target_modules=['q_proj','v_proj']",
                         "eval.max_blocks=8", "output.save_final=false",
                         f"output.dir={out}", *extra])


def rows_of(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", C.STRATEGIES)
def test_every_strategy_builds_with_federation_settings(name):
    cfg = C.load(None, [f"strategy.name={name}", "federation.fraction=0.5"], check_paths=False)
    strategy = build_strategy(cfg)
    assert strategy.fraction_train == 0.5 and strategy.fraction_evaluate == 0.0
    assert strategy.min_available_nodes == cfg.federation.num_clients


def test_fedavgm_momentum_changes_round_two_only(tmp_path, tiny_model_dir, code_jsonl):
    avg = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "avg")
    avgm = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "avgm", "strategy.name=fedavgm",
                    "strategy.params.server_momentum=0.9")
    run_federation(InProcessGrid(avg), avg)
    run_federation(InProcessGrid(avgm), avgm)
    a, m = rows_of(tmp_path / "avg"), rows_of(tmp_path / "avgm")
    assert a[0]["eval_loss"] == m[0]["eval_loss"]
    # round 1: the momentum buffer is the first pseudo-gradient itself, so FedAvgM == FedAvg
    assert a[1]["eval_loss"] == pytest.approx(m[1]["eval_loss"], rel=1e-6)
    # round 2: 0.9 x the previous update is added on top
    assert abs(a[2]["eval_loss"] - m[2]["eval_loss"]) > 1e-6


def test_fedprox_sends_mu_and_changes_the_result(tmp_path, tiny_model_dir, code_jsonl):
    avg = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "avg")
    prox = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "prox", "strategy.name=fedprox",
                    "strategy.params.proximal_mu=100.0")
    run_federation(InProcessGrid(avg), avg)
    run_federation(InProcessGrid(prox), prox)
    a, p = rows_of(tmp_path / "avg"), rows_of(tmp_path / "prox")
    assert abs(a[1]["eval_loss"] - p[1]["eval_loss"]) > 1e-6


def test_a_failing_client_is_reported_and_the_others_aggregate(tmp_path, tiny_model_dir,
                                                               code_jsonl):
    cfg = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "run", "strategy.name=fedadam")
    summary = run_federation(InProcessGrid(cfg, fail_node=2), cfg)
    rows = rows_of(tmp_path / "run")
    assert [r["clients_failed"] for r in rows[1:]] == [1, 1]
    assert [r["clients_ok"] for r in rows[1:]] == [1, 1]
    assert rows[2]["eval_loss"] != rows[0]["eval_loss"]  # the surviving client's update landed
    assert summary["client_failures"] == 2
    assert "client node 2 failed: client crashed" in (tmp_path / "run" / "run.log").read_text()


def test_a_supernode_can_bring_its_own_data(tmp_path, tiny_model_dir, code_jsonl):
    """node config `data-path=...` replaces the partition of the shared source."""
    import sysconfig
    from pathlib import Path

    from fedtune import data, model as M

    own = tmp_path / "own"
    own.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("csv.py", "calendar.py"):
        (own / name).write_text((stdlib / name).read_text())
    cfg = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "run")
    tok = M.load_tokenizer(cfg.model.name)
    mine = client._client_examples(cfg, 1, tok, str(own))
    shared = client._client_examples(cfg, 1, tok)
    rows = data.load_source(C.load(None, [f"data.source={own}"]).data)
    expected = data.pack_blocks(rows, tok, "text", cfg.data.seq_len).tolist()
    assert [e["input_ids"] for e in mine] == expected and len(mine) != len(shared)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no files match"):
        client._client_examples(cfg, 1, tok, str(tmp_path / "empty"))
    with pytest.raises(data.DataError, match="does not exist"):
        client._client_examples(cfg, 1, tok, str(tmp_path / "missing.jsonl"))
