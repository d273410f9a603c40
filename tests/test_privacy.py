"""Differential privacy (`privacy.dp`): Flower's wrappers and mods clip and noise what the
clients really sent, with the noise of the stated size; the accountant agrees with
published values and with the exact Gaussian bound; the spent budget is in every row."""

import math
import re

import numpy as np
import pytest
from flwr.serverapp import strategy as S

from fedtune import checkpoint, config as C, privacy
from fedtune.federation import run_federation
from fedtune.report import write_report
from fedtune.results import read_metrics
from grids import RecordingGrid
from test_federation import make_cfg


def cfg3(tiny_model_dir, code_jsonl, out, *extra):
    return make_cfg(tiny_model_dir, code_jsonl, out, "federation.num_clients=3", *extra)


def update(arrays: dict, sent: dict) -> dict:
    return {k: arrays[k].astype(np.float64) - sent[k] for k in sent}


def norm(u: dict) -> float:
    return math.sqrt(sum(float((v**2).sum()) for v in u.values()))


def clipped(u: dict, c: float) -> dict:
    s = min(1.0, c / norm(u))
    return {k: v * s for k, v in u.items()}


def residual(grid, rnd: int, updates: list[dict]) -> np.ndarray:
    """What the server's new global model adds to sent + the unweighted mean of `updates`:
    the DP noise, flattened."""
    sent, new = grid.sent[rnd], grid.sent[rnd + 1]
    mean = {k: sum(u[k] for u in updates) / len(updates) for k in sent}
    return np.concatenate([(new[k] - sent[k] - mean[k]).ravel() for k in sorted(sent)])


def ledger(num_clients: int, fraction: float, *sets) -> privacy.Ledger:
    cfg = C.load(
        None,
        [
            f"federation.num_clients={num_clients}",
            f"federation.fraction={fraction}",
            "privacy.dp.mode=central-fixed",
            *sets,
        ],
        check_paths=False,
    )
    return privacy.Ledger(cfg)


@pytest.mark.parametrize(
    "n, batch, z, epochs, delta, published",
    [  # tensorflow/privacy compute_dp_sgd_privacy_test.py, Test0 and Test1 (RDP, Poisson)
        (60000, 150, 1.3, 15, 1e-5, 0.7242234026109595),
        (100000, 100, 1.0, 30, 1e-7, 1.4154988495444842),
    ],
)
def test_poisson_accounting_matches_tf_privacy(n, batch, z, epochs, delta, published):
    """A round = one DP-SGD step: population n, k = batch sampled, every one replying."""
    book = ledger(
        n,
        batch / n,
        "privacy.dp.accounting=poisson",
        f"privacy.dp.noise_multiplier={z}",
        f"privacy.dp.delta={delta}",
    )
    steps = epochs * n // batch
    book.accountant.compose(privacy.GaussianPrivacyEvent(z, batch, n), steps - 1)
    book.releases = steps - 1
    row = book.release(batch)  # the last round through the public path
    assert row["dp_noise_multiplier"] == z
    assert row["dp_epsilon"] == pytest.approx(published, rel=1e-9)
    assert book.releases == steps


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The tight epsilon of a Gaussian mechanism with sensitivity / stddev = mu (Balle and
    Wang 2018, Theorem 8), by bisection."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))
    d = lambda e: phi(mu / 2 - e / mu) - math.exp(e) * phi(-mu / 2 - e / mu)
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("replied", [3, 2])
def test_full_participation_is_a_gaussian_of_sensitivity_2c_over_n(replied):
    """k = N (no sampling): T rounds compose to one Gaussian with mu = sqrt(T) / z_eff,
    z_eff = z n / (2 k) (replace-one: two clipped updates differ by up to 2 C; n of the
    k sampled clients in the mean). RDP is an upper bound, and a close one."""
    z, rounds = 4.0, 5
    book = ledger(3, 1.0, f"privacy.dp.noise_multiplier={z}")
    for _ in range(rounds):
        row = book.release(replied)
    z_eff = z * replied / (2 * 3)
    assert row["dp_noise_multiplier"] == pytest.approx(z_eff)
    exact = exact_gaussian_epsilon(math.sqrt(rounds) / z_eff, 1e-5)
    assert exact <= row["dp_epsilon"] <= 1.2 * exact


def test_sampling_fewer_clients_spends_less():
    rows = [ledger(20, f).release(int(20 * f)) for f in (1.0, 0.25)]
    assert rows[1]["dp_epsilon"] < 0.9 * rows[0]["dp_epsilon"]


def test_the_ledger_replays_metric_rows_on_resume():
    a, b = ledger(4, 0.5), ledger(4, 0.5)
    rows = [a.release(r) for r in (2, 1, 2)]
    for row in rows:
        b.replay(row)
    assert (b.epsilon, b.releases) == (a.epsilon, a.releases)
    assert b.release(2) == a.release(2)


def dp_run(out, tiny_model_dir, code_jsonl, mode: str, c: float, *sets):
    """(the recording grid, round 1's updates as the clients sent them) of a 3-client run."""
    sets = [f"privacy.dp.mode={mode}", f"privacy.dp.clipping_norm={c}", *sets]
    cfg = cfg3(tiny_model_dir, code_jsonl, out, *sets)
    grid = RecordingGrid(cfg)
    run_federation(grid, cfg)
    return grid, [update(a, grid.sent[1]) for _, _, a in grid.replies[1]]


def test_central_fixed_clips_each_reply_and_adds_noise_of_z_c_over_k(
    tmp_path, tiny_model_dir, code_jsonl
):
    """The server clips every update to C, averages them unweighted and adds N(0, (zC/k)^2)."""
    c, z = 2e-3, 1.0
    run = (tmp_path, tiny_model_dir, code_jsonl, "central-fixed", c)
    grid, ups = dp_run(*run, f"privacy.dp.noise_multiplier={z}")
    assert min(norm(u) for u in ups) > c  # every update is clipped
    noise = residual(grid, 1, [clipped(u, c) for u in ups])
    assert noise.size > 3000  # the std is estimated within ~1.2 % (5 % is 4 sigma)
    assert noise.std() == pytest.approx(z * c / 3, rel=0.05)
    assert abs(noise.mean()) < 4 * z * c / 3 / math.sqrt(noise.size)
    rows = read_metrics(tmp_path)
    expected = ledger(3, 1.0, f"privacy.dp.noise_multiplier={z}")
    for row in rows[1:]:
        assert row["dp_epsilon"] == pytest.approx(expected.release(3)["dp_epsilon"])
    assert rows[2]["dp_epsilon"] > rows[1]["dp_epsilon"] > 0
    summary = (tmp_path / "summary.json").read_text()
    assert '"mode": "central-fixed"' in summary
    md, _ = write_report(tmp_path)
    text = md.read_text()
    assert f"epsilon {rows[2]['dp_epsilon']:.3f} at delta 1e-05" in text
    assert f"{rows[1]['dp_epsilon']:.4f}" in text  # the per-round column


def test_client_fixed_clients_clip_and_the_server_adds_the_noise(
    tmp_path, tiny_model_dir, code_jsonl
):
    c, z = 2e-3, 0.5
    run = (tmp_path, tiny_model_dir, code_jsonl, "client-fixed", c)
    grid, ups = dp_run(*run, f"privacy.dp.noise_multiplier={z}")
    assert [norm(u) for u in ups] == pytest.approx([c] * 3, rel=1e-4)  # clipped on the client
    assert residual(grid, 1, ups).std() == pytest.approx(z * c / 3, rel=0.05)


def test_local_dp_noises_each_reply_and_the_budgets_add_up(tmp_path, tiny_model_dir, code_jsonl):
    c, eps, delta = 1e-3, 0.5, 1e-5
    sets = [f"privacy.dp.local_epsilon={eps}", f"privacy.dp.local_delta={delta}"]
    _, ups = dp_run(tmp_path, tiny_model_dir, code_jsonl, "local", c, *sets)
    sigma = 2 * c * math.sqrt(2 * math.log(1.25 / delta)) / eps  # Gaussian mechanism, Δ = 2C
    for up in ups:
        u = np.concatenate([v.ravel() for v in up.values()])
        assert u.std() == pytest.approx(sigma, rel=0.05)
    rows = read_metrics(tmp_path)
    assert [r["dp_epsilon"] for r in rows[1:]] == pytest.approx([eps, 2 * eps])
    assert [r["dp_delta"] for r in rows[1:]] == pytest.approx([delta, 2 * delta])


def test_adaptive_clipping_norm_and_the_wrapped_state_survive_a_checkpoint():
    sets = ["privacy.dp.mode=central-adaptive", "privacy.dp.noise_multiplier=0.1"]
    cfg = C.load(None, sets, check_paths=False)
    wrapped = privacy.wrap(S.FedAvgM(server_momentum=0.9), cfg)
    wrapped.clipping_norm, wrapped.strategy.momentum_vector = 0.37, [np.ones(2, np.float32)]
    state = checkpoint.strategy_state(wrapped)
    fresh = privacy.wrap(S.FedAvgM(server_momentum=0.9), cfg)
    checkpoint.restore_strategy(fresh, state)
    assert fresh.clipping_norm == 0.37
    np.testing.assert_array_equal(fresh.strategy.momentum_vector[0], np.ones(2))


@pytest.mark.parametrize(
    "sets, message",
    [
        (["privacy.dp.mode=central-fixed", "comm.uplink=int8"], "set both to fp32"),
        (["privacy.dp.mode=client-fixed", "strategy.name=krum"], "does not average"),
        (
            ["privacy.dp.mode=central-adaptive", "privacy.dp.noise_multiplier=1.0"],
            "needs `privacy.dp.clipped_count_stddev` above 0.5",
        ),
        (["privacy.dp.mode=local", "privacy.dp.local_epsilon=2"], "local_epsilon"),
        (["privacy.dp.mode=laplace"], "privacy.dp.mode"),
    ],
)
def test_privacy_settings_are_checked_before_anything_runs(sets, message):
    with pytest.raises(C.ConfigError, match=re.escape(message)):
        C.load(None, sets, check_paths=False)
