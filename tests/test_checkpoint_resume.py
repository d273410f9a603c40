"""Checkpoints, resume to the same metrics, early stopping, trackers (clients in-process)."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedtune import checkpoint, config as C
from fedtune.federation import run_federation
from fedtune.results import read_metrics
from grids import InProcessGrid, Killed, KilledInRound
from test_federation import make_cfg, rows_of

KEYS = ("eval_loss", "train_loss", "bytes_up", "bytes_down", "lr", "sampled_partitions")


def run_until_killed(cfg, rnd):
    """Run `cfg` until the server 'dies' as round `rnd` starts (after round rnd-1 ended)."""
    with pytest.raises(Killed):
        run_federation(KilledInRound(cfg, rnd), cfg)


def test_resume_after_a_stop_gives_the_same_metrics(tmp_path, tiny_model_dir, code_jsonl):
    """FedAvgM keeps server momentum: resume must restore it, not only the weights."""
    common = (
        "federation.rounds=4",
        "strategy.name=fedavgm",
        "strategy.params.server_momentum=0.9",
        "output.save_every=1",
        "train.lr_schedule=cosine",
        "train.lr_min=1e-4",
        "output.plots=false",
    )
    full = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "full", *common)
    run_federation(InProcessGrid(full), full)

    cut = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "cut", *common)
    run_until_killed(cut, 3)
    assert not (tmp_path / "cut" / "summary.json").exists()
    # a kill in the middle of writing round 3's checkpoint leaves only a temp folder behind
    ckpts = tmp_path / "cut" / "checkpoints"
    shutil.copytree(ckpts / "round-0002", ckpts / ".tmp-round-0003")
    (ckpts / ".tmp-round-0003" / "server_state.pt").write_bytes(b"truncated")
    assert checkpoint.latest(tmp_path / "cut")[0] == 2

    resumed = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "cut", *common, "output.resume=true")
    summary = run_federation(InProcessGrid(resumed), resumed)
    a, b = rows_of(tmp_path / "full"), rows_of(tmp_path / "cut")
    assert [r["round"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a[3:], b[3:]):
        for k in KEYS:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5), (ra["round"], k)
    assert summary["resumed_from_round"] == 2
    assert summary["final"]["eval_loss"] == pytest.approx(a[-1]["eval_loss"], rel=1e-5)
    # the server state holds the momentum (one model's worth), not a second copy of the
    # weights the checkpoint already has
    state = checkpoint.load_server_state(checkpoint.latest(tmp_path / "full")[1])["strategy"]
    assert state["momentum_vector"] is not None
    assert "current_arrays" not in state
    _, folder = checkpoint.latest(tmp_path / "full")
    trainable = sum(t.numel() * 4 for t in load_file(folder / "adapter_model.safetensors").values())
    assert sum(m.nbytes for m in state["momentum_vector"]) == trainable


def test_resume_without_momentum_state_would_differ(tmp_path, tiny_model_dir, code_jsonl):
    """The comparison above can fail: dropping the strategy state changes round 3."""
    common = (
        "federation.rounds=3",
        "strategy.name=fedavgm",
        "strategy.params.server_momentum=0.9",
        "output.save_every=1",
        "output.plots=false",
    )
    full = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "full", *common)
    run_federation(InProcessGrid(full), full)
    cut = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "cut", *common)
    run_until_killed(cut, 3)
    state_file = tmp_path / "cut" / "checkpoints" / "round-0002" / "server_state.pt"
    state = torch.load(state_file, weights_only=False)
    state["strategy"] = {k: None for k in state["strategy"]}
    torch.save(state, state_file)
    resumed = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "cut", *common, "output.resume=true")
    run_federation(InProcessGrid(resumed), resumed)
    a, b = rows_of(tmp_path / "full"), rows_of(tmp_path / "cut")
    assert abs(a[3]["eval_loss"] - b[3]["eval_loss"]) > 1e-6


def test_resume_refuses_a_changed_recipe_and_a_folder_without_checkpoints(
    tmp_path, tiny_model_dir, code_jsonl
):
    cfg = make_cfg(
        tiny_model_dir, code_jsonl, tmp_path / "r", "output.save_every=1", "output.plots=false"
    )
    run_until_killed(cfg, 2)
    changed = make_cfg(
        tiny_model_dir,
        code_jsonl,
        tmp_path / "r",
        "output.save_every=1",
        "output.resume=true",
        "train.lr=0.5",
        "output.plots=false",
    )
    with pytest.raises(C.ConfigError, match="changed `train.lr`"):
        checkpoint.check_resumable(tmp_path / "r", changed)
    more_rounds = make_cfg(
        tiny_model_dir,
        code_jsonl,
        tmp_path / "r",
        "output.save_every=1",
        "output.resume=true",
        "output.plots=false",
        "federation.rounds=5",
    )
    assert checkpoint.check_resumable(tmp_path / "r", more_rounds)[0] == 1
    empty = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "empty", "output.resume=true")
    with pytest.raises(C.ConfigError, match="nothing to resume"):
        checkpoint.check_resumable(tmp_path / "empty", empty)


def test_retention_keeps_the_last_checkpoints_and_the_best(tmp_path, tiny_model_dir, code_jsonl):
    cfg = make_cfg(
        tiny_model_dir,
        code_jsonl,
        tmp_path / "r",
        "federation.rounds=4",
        "output.save_every=1",
        "output.keep_last=2",
        "output.keep_best=true",
        "output.plots=false",
    )
    run_federation(InProcessGrid(cfg), cfg)
    ck = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in ck.glob("round-*")) == ["round-0003", "round-0004"]
    best = json.loads((ck / "best.json").read_text())
    rows = rows_of(tmp_path / "r")
    assert best["round"] == min(rows, key=lambda r: r["eval_loss"])["round"]
    assert (ck / "best" / "adapter_model.safetensors").exists()


def test_early_stopping_keeps_the_best_model_as_final(tmp_path, tiny_model_dir, code_jsonl):
    # a huge learning rate makes the eval loss rise from round 1 on
    cfg = make_cfg(
        tiny_model_dir,
        code_jsonl,
        tmp_path / "es",
        "federation.rounds=6",
        "train.lr=3.0",
        "train.max_grad_norm=0",
        "train.local_steps=3",
        "train.early_stopping={metric='eval_loss', patience=2, min_delta=0.0}",
        "output.plots=false",
        "output.save_final=true",
    )
    summary = run_federation(InProcessGrid(cfg), cfg)
    rows = rows_of(tmp_path / "es")
    assert rows[1]["eval_loss"] > rows[0]["eval_loss"]
    assert [r["round"] for r in rows] == [0, 1, 2]  # stopped after `patience` rounds
    assert summary["stopped_early"] and "did not improve" in summary["stop_reason"]
    assert summary["final_model_round"] == 0
    final = load_file(tmp_path / "es" / "final" / "adapter_model.safetensors")
    best = load_file(tmp_path / "es" / "checkpoints" / "best" / "adapter_model.safetensors")
    assert final.keys() == best.keys()
    assert all(torch.equal(final[k], best[k]) for k in final)
    # round 0's LoRA B matrices are zero: the final model is the untrained one
    assert all(not v.any() for k, v in final.items() if "lora_B" in k)


def test_early_stopping_config_is_checked():
    with pytest.raises(C.ConfigError, match="needs `patience`"):
        C.load(None, ["train.early_stopping={metric='eval_loss'}"], check_paths=False)
    with pytest.raises(C.ConfigError, match="unknown key `train.early_stopping.wait`"):
        C.load(None, ["train.early_stopping={patience=2, wait=1}"], check_paths=False)
    with pytest.raises(C.ConfigError, match="'train_loss': a causal-lm run does not produce it"):
        C.load(None, ["train.early_stopping={patience=2, metric='train_loss'}"], check_paths=False)


def test_trackers_are_optional_and_checked(monkeypatch):
    with pytest.raises(C.ConfigError, match="unknown tracker 'comet'"):
        C.load(None, ["output.trackers=['comet']"], check_paths=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(C.ConfigError, match="needs the `mlflow` package"):
        C.load(None, ["output.trackers=['mlflow']"], check_paths=False)


def test_tensorboard_event_files_hold_every_round(tmp_path, tiny_model_dir, code_jsonl):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(
        tiny_model_dir, code_jsonl, tmp_path / "tb", "output.tensorboard=true", "output.plots=false"
    )
    run_federation(InProcessGrid(cfg), cfg)
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("eval_loss")
    rows = rows_of(tmp_path / "tb")
    assert [e.step for e in events] == [0, 1, 2]
    assert [e.value for e in events] == pytest.approx([r["eval_loss"] for r in rows], rel=1e-6)


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_resume_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, code_jsonl, strategy):
    """FedAdam/FedYogi/FedAdagrad keep server moments (m_t, v_t): a resume must restore them."""
    common = (
        "federation.rounds=3",
        f"strategy.name={strategy}",
        "strategy.params.eta=0.01",
        "output.save_every=1",
        "output.plots=false",
    )
    full = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "full", *common)
    run_federation(InProcessGrid(full), full)
    cut = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "cut", *common)
    run_until_killed(cut, 3)
    state = torch.load(
        tmp_path / "cut" / "checkpoints" / "round-0002" / "server_state.pt", weights_only=False
    )
    assert state["strategy"]["v_t"] is not None  # the moments are in the checkpoint
    resumed = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "cut", *common, "output.resume=true")
    run_federation(InProcessGrid(resumed), resumed)
    a, b = rows_of(tmp_path / "full"), rows_of(tmp_path / "cut")
    assert [r["round"] for r in b] == [0, 1, 2, 3]
    for k in KEYS:
        assert b[3][k] == pytest.approx(a[3][k], rel=1e-5), k
    # the global model travels in the model's dtype every round (FedOpt's step is float64)
    assert a[1]["bytes_down"] == a[2]["bytes_down"] == a[3]["bytes_down"]


def test_a_rerun_into_a_used_folder_starts_clean(tmp_path, tiny_model_dir, code_jsonl):
    """overwrite: no checkpoint, plot or summary of the old run survives, latest.json names
    a folder that exists, and retention counts only the new run's rounds."""
    out = tmp_path / "r"
    old = make_cfg(
        tiny_model_dir,
        code_jsonl,
        out,
        "federation.rounds=4",
        "output.save_every=1",
        "output.keep_last=2",
        "output.keep_best=true",
    )
    run_federation(InProcessGrid(old), old)
    assert sorted(p.name for p in (out / "checkpoints").glob("round-*")) == [
        "round-0003",
        "round-0004",
    ]
    new = make_cfg(
        tiny_model_dir,
        code_jsonl,
        out,
        "federation.rounds=2",
        "output.save_every=1",
        "output.keep_last=2",
        "train.lr=1e-3",
    )
    run_until_killed(new, 2)  # round 1 done, then killed: nothing of the old run may remain
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.json", "round-0001"]
    rnd, folder = checkpoint.latest(out)
    assert rnd == 1 and folder.is_dir()
    assert not (out / "summary.json").exists() and not (out / "report.md").exists()
    assert [r["round"] for r in read_metrics(out)] == [0, 1]
    run_federation(InProcessGrid(new), new)  # the same recipe again, to the end
    assert sorted(p.name for p in (out / "checkpoints").glob("round-*")) == [
        "round-0001",
        "round-0002",
    ]
    assert checkpoint.latest(out)[1].is_dir()


def test_a_used_folder_is_refused_without_overwrite(tmp_path, tiny_model_dir, code_jsonl):
    out = tmp_path / "r"
    cfg = make_cfg(tiny_model_dir, code_jsonl, out, "federation.rounds=1")
    run_federation(InProcessGrid(cfg), cfg)
    again = make_cfg(
        tiny_model_dir, code_jsonl, out, "federation.rounds=1", "output.overwrite=false"
    )
    with pytest.raises(C.ConfigError, match="holds an earlier run.*--resume"):
        run_federation(InProcessGrid(again), again)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not fedtune's")  # other files are kept
    other = make_cfg(
        tiny_model_dir,
        code_jsonl,
        tmp_path / "mine",
        "federation.rounds=1",
        "output.overwrite=false",
    )
    run_federation(InProcessGrid(other), other)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not fedtune's"


def test_pruning_never_deletes_the_checkpoint_latest_names(tmp_path, tiny_model_dir):
    """A stale higher-numbered folder (left by another run) must not win over the new one."""
    from fedtune import model as M

    cfg = C.load(None, [f"model.name={tiny_model_dir}", "lora.target_modules=['q_proj']"])
    model, tok = M.load_model(cfg), M.load_tokenizer(cfg.model.name)
    ck = tmp_path / "checkpoints"
    (ck / "round-0009").mkdir(parents=True)
    (ck / "round-0009" / "server_state.pt").write_bytes(b"stale")
    for rnd in (1, 2, 3):
        checkpoint.save_round(tmp_path, rnd, model, tok, {"round": rnd}, keep_last=2)
        assert checkpoint.latest(tmp_path)[1].name == f"round-{rnd:04d}"
    assert sorted(p.name for p in ck.glob("round-*")) == ["round-0002", "round-0003"]


def test_server_state_stores_momentum_once_as_raw_bytes(tmp_path):
    """torch.save pickles numpy arrays as latin-1 text (~1.4x); the server state must cost
    one model's worth per buffer it keeps, and come back as the numpy arrays Flower uses."""

    class FedAvgMLike:
        current_arrays = "the global model: never stored (it is the checkpoint's weights)"
        momentum_vector = [np.random.default_rng(0).standard_normal(2**20).astype(np.float32)]
        m_t = v_t = None

    state = checkpoint.strategy_state(FedAvgMLike())
    torch.save(state, tmp_path / "s.pt")
    assert (tmp_path / "s.pt").stat().st_size < 1.02 * 4 * 2**20
    restored = FedAvgMLike()
    restored.momentum_vector = None
    checkpoint.restore_strategy(restored, torch.load(tmp_path / "s.pt", weights_only=False))
    assert isinstance(restored.momentum_vector[0], np.ndarray)
    assert np.array_equal(restored.momentum_vector[0], FedAvgMLike.momentum_vector[0])
