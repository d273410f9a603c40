"""LoRA aggregation against brute force: the mean of what clients learned is
sum_i w_i s B_i A_i / sum_i w_i, computed here client by client in float64 numpy."""

import copy
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fedtune import lora_agg as L

WEIGHTS = [1.0, 3.0, 0.5]  # unequal: examples per client


def tiny_gpt2(r=2, alpha=4):
    """GPT-2's c_attn is a Conv1D: its weight is (in, out), PEFT's fan_in_fan_out."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    cfg.bos_token_id = cfg.eos_token_id = 0
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=["c_attn"], fan_in_fan_out=True)
    return get_peft_model(GPT2LMHeadModel(cfg), lora)


def tiny_llama(r=2, alpha=4):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
    )
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
    return get_peft_model(LlamaForCausalLM(cfg), lora)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def client_states(model, n=3, share=None, seed=1) -> list[dict[str, torch.Tensor]]:
    """Random factors per client; `share` ("A" or "B") keeps that factor identical."""
    gen = torch.Generator().manual_seed(seed)
    base = trainable(model)
    states = []
    for _ in range(n):
        state = {}
        for k, v in base.items():
            frozen = share and f".lora_{share}." in k
            state[k] = v.clone() if frozen else torch.randn(v.shape, generator=gen)
        states.append(state)
    if share:  # the shared factor must not be zero (PEFT inits B to 0)
        tag = f".lora_{share}."
        shared = {k: torch.randn(v.shape, generator=gen) for k, v in base.items() if tag in k}
        for s in states:
            s.update(shared)
    return states


def brute_mean_update(states, pair, scaling) -> np.ndarray:
    total = sum(WEIGHTS)
    return (
        sum(
            w * scaling * (s[pair.b].double().numpy() @ s[pair.a].double().numpy())
            for w, s in zip(WEIGHTS, states, strict=True)
        )
        / total
    )


def elementwise_mean(states) -> dict[str, torch.Tensor]:
    total = sum(WEIGHTS)
    return {
        k: sum(w * s[k] for w, s in zip(WEIGHTS, states, strict=True)) / total for k in states[0]
    }


def scaling_of(model) -> float:
    (s,) = {m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A")}
    return s


@pytest.mark.parametrize("share", ["A", "B"])  # ffa (A frozen), rolora (either, by round)
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_a_frozen_shared_factor_makes_the_elementwise_mean_exact(make, share):
    model = make()
    states = client_states(model, share=share)
    mean, s = elementwise_mean(states), scaling_of(model)
    for pair in L.pairs(mean):
        got = L.delta(mean, pair, s).numpy()
        np.testing.assert_allclose(got, brute_mean_update(states, pair, s), rtol=1e-5, atol=1e-6)


def test_naive_is_not_exact_and_its_error_is_measured():
    model = tiny_llama()
    states = client_states(model)
    s = scaling_of(model)
    stack = L.FactorStack()
    for w, st in zip(WEIGHTS, states, strict=True):
        stack.add(st, w, s)
    mean = elementwise_mean(states)
    num = den = 0.0
    for pair in L.pairs(mean):
        ref = brute_mean_update(states, pair, s)
        np.testing.assert_allclose(stack.update(pair.module).numpy(), ref, rtol=1e-5, atol=1e-6)
        naive = s * (mean[pair.b].double().numpy() @ mean[pair.a].double().numpy())
        num += ((ref - naive) ** 2).sum()
        den += (ref**2).sum()
    assert L.naive_error(stack) == pytest.approx((num / den) ** 0.5, rel=1e-6)
    assert L.naive_error(stack) > 0.1  # independent random clients drift apart


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_fedex_residual_folded_into_the_base_makes_the_merged_model_exact(make):
    """The server loads mean(A), mean(B) and adds the residual to the frozen weights: PEFT's
    own merge of that model must equal W0 + mean_i(s B_i A_i) (transposed for Conv1D)."""
    model = make()
    states = client_states(model)
    s = scaling_of(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stack = L.FactorStack()
    for w, st in zip(WEIGHTS, states, strict=True):
        stack.add(st, w, s)
    mean = elementwise_mean(states)
    fixes = L.residual(stack, mean, s)
    server = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in server.named_parameters():
            if name in mean:
                p.copy_(mean[name])
    modules = dict(server.named_modules())
    for module, fix in fixes.items():
        layer = modules[module]
        L.fold(layer.base_layer.weight, fix, layer.fan_in_fan_out)
    merged = dict(server.merge_and_unload().named_parameters())
    checked = 0
    for pair in L.pairs(mean):
        key = pair.module.removeprefix("base_model.model.") + ".weight"
        w0 = before[pair.module + ".base_layer.weight"].double().numpy()
        update = brute_mean_update(states, pair, s)
        want = w0 + (update.T if make is tiny_gpt2 else update)
        np.testing.assert_allclose(merged[key].double().numpy(), want, rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked == len(fixes) == 2 * (1 if make is tiny_gpt2 else 2)


def test_svd_at_full_rank_equals_the_mean_update_and_truncation_is_the_best_rank_r():
    model = tiny_llama(r=2, alpha=4)
    states = client_states(model)
    s = scaling_of(model)
    stack = L.FactorStack()
    for w, st in zip(WEIGHTS, states, strict=True):
        stack.add(st, w, s)
    pair = L.pairs(states[0])[0]
    update = brute_mean_update(states, pair, s)  # rank <= 3 clients x r 2 = 6
    full = L.refactor(*stack.factors(pair.module), rank=6, scaling=s)
    np.testing.assert_allclose(s * (full.b @ full.a).double().numpy(), update, atol=1e-5)
    assert full.dropped == pytest.approx(0.0, abs=1e-9)
    u, sv, vh = np.linalg.svd(update)  # the Eckart-Young reference, numpy's own SVD
    best2 = (u[:, :2] * sv[:2]) @ vh[:2]
    cut = L.refactor(*stack.factors(pair.module), rank=2, scaling=s)
    np.testing.assert_allclose(s * (cut.b @ cut.a).double().numpy(), best2, atol=1e-5)
    assert cut.dropped == pytest.approx((sv[2:] ** 2).sum() / (sv**2).sum(), rel=1e-6)
    assert 0 < cut.dropped < 1


def test_the_scaling_is_applied_once_and_heterogeneous_ranks_round_trip():
    """Clients of ranks 2, 2, 4 (alpha 8: scalings 4, 4, 2): the mean of their updates has
    rank <= 8; refactored for a rank-8 client (scaling 1) it comes back exactly, for a
    rank-2 client (scaling 4) as the best rank-2 approximation: s_k B A, not s_k^2 B A."""
    models = [tiny_llama(r=r, alpha=8) for r in (2, 2, 4)]
    states = [client_states(m, n=1, seed=i + 1)[0] for i, m in enumerate(models)]
    stack = L.FactorStack()
    for w, st, m in zip(WEIGHTS, states, models, strict=True):
        stack.add(st, w, scaling_of(m))
    pair = L.pairs(states[0])[0]
    total = sum(WEIGHTS)
    want = (
        sum(
            w * scaling_of(m) * (st[pair.b].double().numpy() @ st[pair.a].double().numpy())
            for w, st, m in zip(WEIGHTS, states, models, strict=True)
        )
        / total
    )
    np.testing.assert_allclose(stack.update(pair.module).numpy(), want, rtol=1e-5, atol=1e-6)
    wide = L.refactor(*stack.factors(pair.module), rank=8, scaling=8 / 8)
    assert wide.b.shape == (want.shape[0], 8) and wide.a.shape == (8, want.shape[1])
    np.testing.assert_allclose((wide.b @ wide.a).double().numpy(), want, atol=1e-5)
    narrow = L.refactor(*stack.factors(pair.module), rank=2, scaling=8 / 2)
    u, sv, vh = np.linalg.svd(want)
    np.testing.assert_allclose(
        4 * (narrow.b @ narrow.a).double().numpy(), (u[:, :2] * sv[:2]) @ vh[:2], atol=1e-5
    )


def test_a_factor_without_its_partner_is_refused():
    with pytest.raises(ValueError, match="without their partner"):
        L.pairs(["m.lora_A.default.weight", "m.lora_B.default.weight", "n.lora_A.default.weight"])
    assert L.pairs(["head.weight"]) == []


# ---- the modes in a federation (in-process clients) ------------------------------------


def test_ffa_sends_only_b_keeps_a_at_its_seeded_init_and_its_mean_is_exact(
    tmp_path, tiny_model_dir, code_jsonl
):
    from fedtune import model as M
    from fedtune.federation import run_federation
    from fedtune.results import read_metrics
    from grids import RecordingGrid
    from test_federation import make_cfg

    rows = {}
    for mode in ("naive", "ffa"):
        cfg = make_cfg(tiny_model_dir, code_jsonl, tmp_path / mode, f"lora.aggregation={mode}")
        grid = RecordingGrid(cfg)
        run_federation(grid, cfg)
        rows[mode] = read_metrics(tmp_path / mode)
    fresh = M.load_model(cfg)  # the seeded init every side builds
    init = {n: p.detach() for n, p in fresh.named_parameters() if ".lora_A." in n}
    s = scaling_of(fresh)
    assert init and all(".lora_B." in k for k in grid.sent[1])
    assert len(grid.sent[1]) == len(init)
    for rnd in (1, 2):
        replies = grid.replies[rnd]
        assert len(replies) == 2 and all(r[2].keys() == grid.sent[1].keys() for r in replies)
    # round 2's message is round 1's global model: s B_global A0 = brute-force mean of s B_i A0
    global_b, total = grid.sent[2], sum(n for _, n, _ in grid.replies[1])
    for key_a, a0 in init.items():
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        want = sum(n * s * (arr[key_b] @ a0.numpy()) for _, n, arr in grid.replies[1]) / total
        np.testing.assert_allclose(s * (global_b[key_b] @ a0.numpy()), want, rtol=1e-5, atol=1e-7)
    up = {m: rows[m][1]["bytes_up"] for m in rows}
    assert up["ffa"] < 0.6 * up["naive"], up  # A (r x in) no longer travels
    # the server measures how far element-wise averaging is from the exact mean: 0 for ffa
    assert all(r["lora_naive_error"] < 1e-6 for r in rows["ffa"][1:]), rows["ffa"]
    assert all(r["lora_naive_error"] > 1e-4 for r in rows["naive"][2:]), rows["naive"]


def test_rolora_alternates_the_factor_that_travels_and_each_mean_is_exact(
    tmp_path, tiny_model_dir, code_jsonl
):
    """Round 1 trains B (A frozen: PEFT's B starts at 0), round 2 A, round 3 B; only the
    trained factor comes back, the other stays the server's, and s B A of the global model
    equals the brute-force weighted mean of the clients' s B_i A_i."""
    from fedtune.federation import run_federation
    from fedtune.results import read_metrics
    from grids import RecordingGrid
    from test_federation import make_cfg

    cfg = make_cfg(
        tiny_model_dir, code_jsonl, tmp_path, "lora.aggregation=rolora", "federation.rounds=3"
    )
    grid = RecordingGrid(cfg)
    run_federation(grid, cfg)
    rows = read_metrics(tmp_path)
    s = cfg.lora.alpha / cfg.lora.r
    for rnd, trained in ((1, "B"), (2, "A")):
        before, after = grid.sent[rnd], grid.sent[rnd + 1]
        replies = grid.replies[rnd]
        assert len(replies) == 2
        for _, _, arrays in replies:
            assert arrays and all(f".lora_{trained}." in k for k in arrays), sorted(arrays)[:2]
        total = sum(n for _, n, _ in replies)
        for key_a in [k for k in before if ".lora_A." in k]:
            key_b = key_a.replace(".lora_A.", ".lora_B.")
            frozen = key_a if trained == "B" else key_b
            np.testing.assert_array_equal(after[frozen], before[frozen])
            want = (
                sum(
                    n * s * (arr.get(key_b, before[key_b]) @ arr.get(key_a, before[key_a]))
                    for _, n, arr in replies
                )
                / total
            )
            got = s * (after[key_b] @ after[key_a])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
            assert np.abs(got).max() > 0  # B left zero would make this vacuous
        assert rows[rnd]["bytes_up"] < 0.6 * rows[rnd]["bytes_down"]
        assert rows[rnd]["lora_naive_error"] < 1e-6  # one factor shared: the mean is exact


def test_rolora_refuses_a_reply_that_changes_the_frozen_factor(
    tmp_path, tiny_model_dir, code_jsonl
):
    from fedtune.federation import run_federation
    from fedtune.results import read_metrics
    from grids import TamperingGrid
    from test_federation import make_cfg

    def also_send_a(arrays, metrics, sent):
        arrays |= {k: v + 1.0 for k, v in sent.items() if ".lora_A." in k}
        return arrays, metrics

    cfg = make_cfg(
        tiny_model_dir,
        code_jsonl,
        tmp_path,
        "lora.aggregation=rolora",
        "federation.rounds=1",
        "federation.min_clients=1",
    )
    run_federation(TamperingGrid(cfg, 0, also_send_a), cfg)
    (row,) = read_metrics(tmp_path)[1:]
    assert row["clients_ok"] == 1
    assert [f["partition"] for f in row["failures"]] == [0]
    assert "unexpected" in row["failures"][0]["error"], row["failures"]


@pytest.mark.parametrize(
    ("sets", "says"),
    [
        (["lora.aggregation=ffa", "model.finetune=full"], 'needs `model.finetune = "lora"`'),
        (["lora.aggregation=rolora", "comm.uplink=int8"], "delta uplink"),
        (["lora.aggregation=rolora", "privacy.dp.mode=client-fixed"], "not supported yet"),
        (["lora.aggregation=svd", "strategy.name=fedavgm"], "plain weighted mean"),
        (["lora.aggregation=svd", "comm.downlink=fp16"], "own rank's factors"),
        (["lora.client_ranks=[4,8]"], 'needs `lora.aggregation = "svd"`'),
        (["lora.aggregation=svd", "lora.client_ranks=[0,8]"], "positive ranks"),
    ],
)
def test_modes_that_cannot_run_say_so_before_anything_starts(sets, says):
    from fedtune import config as C

    with pytest.raises(C.ConfigError) as err:
        C.load(None, sets, check_paths=False)
    assert any(says in line for line in err.value.problems), err.value.problems


def test_fedex_server_and_client_hold_one_model(tmp_path):
    """The server folds the residual into W0 (Conv1D too) and encodes the total; a fresh
    client model that receives it merges to the same weights, and a cached client model
    that later gets a message without it goes back to W0."""
    from flwr.app import RecordDict

    from fedtune import compress

    server, client = tiny_gpt2(), tiny_gpt2()
    states = client_states(server)
    s = scaling_of(server)
    stack = L.FactorStack()
    for w, st in zip(WEIGHTS, states, strict=True):
        stack.add(st, w, s)
    mean = elementwise_mean(states)
    for model in (server, client):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in mean:
                    p.copy_(mean[name])
    w0 = {n: p.detach().clone() for n, p in client.named_parameters() if "base_layer" in n}
    fedex = L.FedEx(server, compress.Codec("fp32", 0.01, 64))
    rel = fedex.add(stack, server, mean, s)
    assert rel == pytest.approx(L.naive_error(stack), rel=1e-6)  # float32 mean vs float64
    L.receive_fedex(client, RecordDict({"fedex": fedex.record}))
    merged = [
        dict(copy.deepcopy(m).merge_and_unload().named_parameters()) for m in (server, client)
    ]
    for pair in L.pairs(mean):
        key = pair.module.removeprefix("base_model.model.") + ".weight"
        want = w0[pair.module + ".base_layer.weight"].double().numpy()
        want = want + brute_mean_update(states, pair, s).T  # Conv1D: (in, out)
        for m in merged:
            np.testing.assert_allclose(m[key].double().numpy(), want, rtol=1e-5, atol=1e-5)
    L.receive_fedex(client, RecordDict({}))
    for n, p in client.named_parameters():
        if n in w0:
            assert torch.equal(p, w0[n]), n


def test_fedex_in_a_federation_is_the_exact_mean_and_counts_its_bytes(
    tmp_path, tiny_model_dir, code_jsonl
):
    from fedtune import compress
    from fedtune.federation import run_federation
    from fedtune.results import read_metrics
    from grids import RecordingGrid
    from test_federation import make_cfg

    class FedexGrid(RecordingGrid):
        def push_messages(self, messages):
            messages = list(messages)
            if messages and "fedex" in messages[0].content.array_records:
                rnd = int(messages[0].content["config"]["server-round"])
                self.fedex[rnd] = compress.decode(messages[0].content["fedex"])
            return super().push_messages(messages)

    cfg = make_cfg(
        tiny_model_dir, code_jsonl, tmp_path, "lora.aggregation=fedex", "federation.rounds=2"
    )
    grid = FedexGrid(cfg)
    grid.fedex = {}
    run_federation(grid, cfg)
    rows = read_metrics(tmp_path)
    s = cfg.lora.alpha / cfg.lora.r
    assert 1 not in grid.fedex and 2 in grid.fedex  # round 1 has no correction yet
    replies, glob, total = grid.replies[1], grid.sent[2], sum(n for _, n, _ in grid.replies[1])
    for key_a in [k for k in glob if ".lora_A." in k]:
        key_b, module = key_a.replace(".lora_A.", ".lora_B."), key_a.split(".lora_A.")[0]
        want = sum(n * s * (arr[key_b] @ arr[key_a]) for _, n, arr in replies) / total
        got = s * (glob[key_b] @ glob[key_a]) + grid.fedex[2][module].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert rows[1]["lora_fedex_residual"] == pytest.approx(rows[1]["lora_naive_error"], rel=1e-6)
    dense = sum(t.numel() * 4 for t in grid.fedex[2].values())
    assert rows[2]["bytes_down"] - rows[1]["bytes_down"] >= 2 * dense  # 2 clients, counted


def test_fedex_resume_equals_the_uninterrupted_run_and_final_loads_on_its_base(
    tmp_path, tiny_model_dir, code_jsonl
):
    """The correction is server state: a resumed run restores it (else its model differs),
    and final/ is a PEFT adapter for final/base (the corrected frozen weights), loaded by
    stock transformers + PEFT to the model the server evaluated last."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune import checkpoint, compress, model as M
    from fedtune.federation import run_federation
    from fedtune.results import read_metrics
    from grids import InProcessGrid, Killed, KilledInRound
    from test_federation import make_cfg

    common = ("lora.aggregation=fedex", "federation.rounds=3", "output.save_every=1")
    full = make_cfg(
        tiny_model_dir, code_jsonl, tmp_path / "full", *common, "output.save_final=true"
    )
    run_federation(InProcessGrid(full), full)
    cut = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "cut", *common)
    with pytest.raises(Killed):
        run_federation(KilledInRound(cut, 3), cut)
    again = make_cfg(tiny_model_dir, code_jsonl, tmp_path / "cut", *common, "output.resume=true")
    run_federation(InProcessGrid(again), again)
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["round"] for r in b] == [0, 1, 2, 3]
    for key in ("eval_loss", "train_loss", "lora_fedex_residual"):
        assert b[3][key] == pytest.approx(a[3][key], rel=1e-5), key

    # final/ on final/base is the server's last model (rebuilt as resume rebuilds it: the
    # recipe's model, the last checkpoint's adapter and correction); on plain W0 it is not
    final, (_, last) = tmp_path / "full" / "final", checkpoint.latest(tmp_path / "full")
    server = M.load_model(full)
    checkpoint.load_weights(server, last, "lora")
    fedex = L.FedEx(server, compress.Codec("fp32", 0.01, 64))
    fedex.restore(server, checkpoint.load_server_state(last)["fedex_total"])
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        want = server.eval()(ids).logits
        got = [
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(b), final)
            .eval()(ids)
            .logits
            for b in (final / "base", tiny_model_dir)
        ]
    assert (got[0] - want).abs().max() < 1e-5
    assert (got[1] - want).abs().max() > 1e-3  # the correction matters at this scale


def best_rank(dense: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Eckart-Young by numpy: the best rank-k approximation and the energy share it drops."""
    u, sv, vh = np.linalg.svd(dense)
    return (u[:, :k] * sv[:k]) @ vh[:k], float((sv[k:] ** 2).sum() / (sv**2).sum())


def test_svd_with_heterogeneous_client_ranks_keeps_the_best_rank_r_of_the_exact_mean(
    tmp_path, tiny_model_dir, code_jsonl
):
    """Clients of ranks 2 and 4 (server rank 4): the server's s B A after round 1 is the best
    rank-4 approximation of the brute-force weighted mean of the clients' s_i B_i A_i, each
    client receives the best approximation at its own rank, the row reports the energy cut,
    and round 1's all-zero downlink still trains (A restarts from the seeded init)."""
    from flwr.app import MessageType

    from fedtune.federation import run_federation
    from fedtune.results import read_metrics
    from grids import RecordingGrid, arrays_of
    from test_federation import make_cfg

    class EveryMessage(RecordingGrid):
        def push_messages(self, messages):
            messages = list(messages)
            if messages and messages[0].metadata.message_type == MessageType.TRAIN:
                rnd = int(messages[0].content["config"].get("server-round", 0))
                self.each[rnd] = [
                    arrays_of(L.compress.unbundle(m.content["arrays"])) for m in messages
                ]
            return super().push_messages(messages)

    cfg = make_cfg(
        tiny_model_dir,
        code_jsonl,
        tmp_path,
        "lora.aggregation=svd",
        "lora.r=4",
        "lora.alpha=8",
        "lora.client_ranks=[2,4]",
        "output.save_final=true",
    )
    grid = EveryMessage(cfg)
    grid.each = {}
    run_federation(grid, cfg)
    rows = read_metrics(tmp_path)

    def rank_of(arrays):
        return next(v.shape[0] for k, v in arrays.items() if ".lora_A." in k)

    replies = grid.replies[1]
    assert sorted(rank_of(a) for _, _, a in replies) == [2, 4]
    for sent in grid.each[1]:  # round 1: the global update is zero at every rank
        assert all(not v.any() for k, v in sent.items() if ".lora_" in k)
    for _, _, arrays in replies:  # ... yet B trained: A was revived from the seeded init
        assert all(np.abs(v).max() > 0 for k, v in arrays.items() if ".lora_B." in k)
    sent2 = {rank_of(a): a for a in grid.each[2]}
    total, cut = sum(n for _, n, _ in replies), {2: [0.0, 0.0], 4: [0.0, 0.0]}
    for key_a in [k for k in sent2[4] if ".lora_A." in k]:
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        mean = (
            sum(
                n * (cfg.lora.alpha / rank_of(a)) * (a[key_b].astype(np.float64) @ a[key_a])
                for _, n, a in replies
            )
            / total
        )
        held = mean  # the server keeps rank 4 of the mean, and sends rank 2 of what it keeps
        for rank in (4, 2):
            want, dropped = best_rank(held, rank)
            got = (cfg.lora.alpha / rank) * (sent2[rank][key_b] @ sent2[rank][key_a])
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
            energy = float((held**2).sum())
            cut[rank] = [cut[rank][0] + dropped * energy, cut[rank][1] + energy]
            held = want
    assert cut[4][0] > 0  # ranks 2 + 4 = 6 > 4: the server's truncation drops something
    assert rows[1]["lora_svd_dropped"] == pytest.approx(cut[4][0] / cut[4][1], rel=1e-3)
    assert rows[2]["lora_svd_dropped_down"] == pytest.approx(cut[2][0] / cut[2][1], rel=1e-3)
    assert "lora_naive_error" not in rows[1]  # undefined across ranks
    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert config["r"] == 4  # the server's adapter: a stock PEFT one at lora.r
