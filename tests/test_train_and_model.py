import math

import pytest
import torch

from fedtune import config as C, model as M
from fedtune.errors import HubModelError
from fedtune.evaluate import eval_lm
from fedtune.train import (
    MEGABATCH,
    epoch_order,
    lr_for_round,
    num_local_steps,
    proximal_term,
    train_local,
)


def make_cfg(tiny_model_dir, *overrides):
    return C.load(
        None,
        [
            f"model.name={tiny_model_dir}",
            "lora.r=4",
            "lora.target_modules=['q_proj','v_proj']",
            "train.local_steps=3",
            "train.batch_size=2",
            "train.lr=1e-2",
            *overrides,
        ],
    )


def blocks(n=8, t=16, seed=0):
    return torch.randint(0, 500, (n, t), generator=torch.Generator().manual_seed(seed))


def examples(n=8, t=16, seed=0):
    return [{"input_ids": row} for row in blocks(n, t, seed).tolist()]


def flat(model):
    return torch.cat([p.flatten() for p in M.trainable_state(model).values()])


def test_cosine_schedule_goes_from_max_to_min_across_rounds():
    cfg = C.TrainConfig(lr=1e-3, lr_min=1e-5, lr_schedule="cosine")
    lrs = [lr_for_round(r, 5, cfg) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-5)
    assert lrs[2] == pytest.approx((1e-3 + 1e-5) / 2)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lr_for_round(3, 5, C.TrainConfig(lr=1e-3)) == 1e-3
    lin = C.TrainConfig(lr=1e-3, lr_min=0.0, lr_schedule="linear")
    assert [lr_for_round(r, 5, lin) for r in range(1, 6)] == pytest.approx(
        [1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0]
    )


def test_local_steps_or_epochs():
    assert num_local_steps(100, C.TrainConfig(local_steps=7)) == 7
    assert num_local_steps(10, C.TrainConfig(local_epochs=2, batch_size=4)) == 6
    assert num_local_steps(10, C.TrainConfig(local_epochs=1, batch_size=2, grad_accum=5)) == 1


def test_proximal_term_is_squared_l2_distance():
    p, a = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])], [torch.zeros(2), torch.ones(1, 1)]
    assert proximal_term(p, a).item() == pytest.approx(1 + 4 + 4)


def test_lora_only_adapters_train_and_travel(tiny_model_dir):
    model = M.load_model(make_cfg(tiny_model_dir))
    names = list(M.trainable_state(model))
    assert names and all("lora_" in n for n in names)
    record = M.to_arrays(model)
    assert set(record.keys()) == set(names)
    # wire size ~ 4 bytes per fp32 parameter plus a small header per array
    n_params = sum(p.numel() for p in M.trainable_state(model).values())
    assert 4 * n_params < record.count_bytes() < 4 * n_params + 200 * len(names)


def test_full_mode_sends_every_parameter_once(tiny_model_dir):
    model = M.load_model(make_cfg(tiny_model_dir, "model.finetune=full"))
    state = M.trainable_state(model)
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in model.parameters())
    assert "lm_head.weight" not in state  # tied to the embeddings: sent once


def test_arrays_round_trip_reproduces_the_model(tiny_model_dir):
    cfg = make_cfg(tiny_model_dir)
    a = M.load_model(cfg)
    train_local(a, examples(), cfg.train, lr=1e-2, proximal_mu=0.0, seed=0)
    b = M.load_model(cfg)
    a.eval(), b.eval()  # no LoRA dropout
    x = blocks(2, seed=5)
    assert not torch.allclose(a(input_ids=x).logits, b(input_ids=x).logits)
    M.load_trainable_state(b, M.from_arrays(M.to_arrays(a)))
    assert torch.equal(a(input_ids=x).logits, b(input_ids=x).logits)


def test_bf16_weights_travel_as_fp32(tiny_model_dir):
    model = M.load_model(make_cfg(tiny_model_dir, "model.dtype=bfloat16", "model.finetune=full"))
    record = M.to_arrays(model)
    assert {a.dtype for a in record.values()} == {"float32"}
    M.load_trainable_state(model, M.from_arrays(record))


def test_mismatched_arrays_are_a_clear_error(tiny_model_dir):
    model = M.load_model(make_cfg(tiny_model_dir))
    state = M.trainable_state(model)
    state.pop(next(iter(state)))
    with pytest.raises(M.ModelError, match="1 missing"):
        M.load_trainable_state(model, state)


def test_unknown_lora_target_is_a_clear_error(tiny_model_dir):
    with pytest.raises(M.ModelError, match="match no module"):
        M.load_model(make_cfg(tiny_model_dir, "lora.target_modules=['c_attn']"))


def test_fedprox_term_adds_mu_times_the_distance_to_the_global_weights(tiny_model_dir):
    """Hand computation with SGD (no clipping, no dropout): step 1 starts at w_global, where
    the proximal gradient is 0, so both runs reach the same w1; at step 2 the term adds
    mu * (w1 - w_global) to the gradient, so w2(mu) - w2(0) = -lr * mu * (w1 - w_global)."""
    cfg = make_cfg(
        tiny_model_dir,
        "train.optimizer=sgd",
        "train.max_grad_norm=0",
        "lora.dropout=0.0",
        "model.finetune=full",
    )
    start = M.trainable_state(M.load_model(cfg))
    lr, mu = 0.05, 2.0

    def trained(steps, proximal_mu):
        model = M.load_model(cfg)
        M.load_trainable_state(model, start)
        c = C.TrainConfig(**{**cfg.train.__dict__, "local_steps": steps})
        train_local(model, examples(), c, lr=lr, proximal_mu=proximal_mu, seed=3)
        return flat(model)

    w0 = torch.cat([t.flatten() for t in start.values()])
    w1 = trained(1, 0.0)
    assert torch.equal(trained(1, mu), w1)  # no pull at w_global itself
    diff = trained(2, mu) - trained(2, 0.0)
    expected = -lr * mu * (w1 - w0)
    assert expected.abs().max() > 1e-4  # the check has something to see
    torch.testing.assert_close(diff, expected, rtol=1e-3, atol=1e-6)


def instruction_examples():
    """Masked examples with different numbers of target tokens (prompt labelled -100)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for n_prompt, n_target in [(3, 9), (8, 2), (2, 12), (10, 1)]:
        ids = torch.randint(0, 500, (n_prompt + n_target,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    return out


def test_grad_accumulation_gives_the_gradient_of_the_token_mean(tiny_model_dir):
    """batch 4 x accumulation 1 and batch 2 x accumulation 2 over the same four masked
    examples must take the same step: the loss is the mean over every target token of the
    window, not the mean of the micro-batches' means (their target counts differ)."""
    cfg = make_cfg(
        tiny_model_dir,
        "train.optimizer=sgd",
        "train.max_grad_norm=0",
        "lora.dropout=0.0",
        "model.finetune=full",
        "train.local_steps=1",
    )
    start = M.trainable_state(M.load_model(cfg))
    exs = instruction_examples()

    def step(batch, accum):
        model = M.load_model(cfg)
        M.load_trainable_state(model, start)
        c = C.TrainConfig(**{**cfg.train.__dict__, "batch_size": batch, "grad_accum": accum})
        # lr 1: the change of the weights is minus the gradient; order fixed by the seed
        res = train_local(model, exs, c, lr=1.0, proximal_mu=0.0, seed=0)
        return flat(model), res.loss

    (one, loss_one), (two, loss_two) = step(4, 1), step(2, 2)
    torch.testing.assert_close(two, one, rtol=0, atol=1e-6)
    assert loss_two == pytest.approx(loss_one, rel=1e-6)


def test_float16_full_finetuning_is_refused_with_the_fix():
    with pytest.raises(C.ConfigError, match="bfloat16.*train.precision"):
        C.load(None, ["model.dtype=float16", "model.finetune=full"], check_paths=False)
    C.load(None, ["model.dtype=float16", "model.finetune=lora"], check_paths=False)


def test_lora_targets_must_each_match_a_module(tiny_model_dir):
    with pytest.raises(M.ModelError, match=r"\['qproj_typo'\] match no module"):
        M.load_model(make_cfg(tiny_model_dir, "lora.target_modules=['q_proj','qproj_typo']"))
    names = [n for n, _ in M.load_model(make_cfg(tiny_model_dir)).named_modules()]
    M.check_lora_targets(names, ["q_proj", "self_attn.v_proj"], "tiny")  # suffix paths match


def test_module_names_from_the_files_are_the_models_own(tiny_model_dir):
    """Preflight reads module names from safetensors headers (no model built): every module
    that holds a weight must be there, the tied lm_head (saved under the embedding's
    name) included, or a valid target would be refused."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with_weights = {
        n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))
    }
    assert model.config.tie_word_embeddings and "lm_head" in with_weights
    names = M.module_names(make_cfg(tiny_model_dir), M.config_json(tiny_model_dir))
    assert with_weights <= set(names)
    M.check_lora_targets(names, ["lm_head"], "tiny")


def test_client_model_cache_is_keyed_by_the_task(tiny_model_dir):
    """Two experiments in one long-lived process that differ only in the task must not
    share a model: a classifier has another class and head."""
    from fedtune.apps.cache import CACHE, model_key

    lm = make_cfg(tiny_model_dir)
    cls = make_cfg(
        tiny_model_dir,
        "task.type=sequence-classification",
        "task.text_columns=['text']",
        "task.label_names=['neg','pos']",
    )
    CACHE.clear()
    a, built_a = CACHE.get("model", model_key(lm), lambda: M.load_model(lm))
    b, built_b = CACHE.get("model", model_key(cls), lambda: M.load_model(cls))
    assert built_a and built_b
    assert "CausalLM" in type(a.get_base_model()).__name__
    assert "SequenceClassification" in type(b.get_base_model()).__name__
    again, built = CACHE.get("model", model_key(cls), lambda: pytest.fail("rebuilt"))
    assert again is b and not built
    CACHE.clear()


def test_training_lowers_the_loss_on_the_trained_blocks(tiny_model_dir):
    cfg = make_cfg(tiny_model_dir, "model.finetune=full", "train.local_steps=20", "train.lr=3e-3")
    model = M.load_model(cfg)
    b = [{"input_ids": x} for x in blocks(4).tolist()]
    before = eval_lm(model, b, batch_size=2, pad_id=0)["eval_loss"]
    res = train_local(model, examples(4), cfg.train, lr=3e-3, proximal_mu=0.0, seed=0)
    assert res.tokens == 20 * 2 * 16 and res.samples == 40
    after = eval_lm(model, b, batch_size=2, pad_id=0)
    assert after["eval_loss"] < before - 0.5
    assert after["eval_ppl"] == pytest.approx(math.exp(after["eval_loss"]))


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    """On an AVX2-only CPU bf16 is emulated (a matmul ran 190x slower than fp32): "auto"
    must pick fp32 there, and an explicit "bf16" gets a warning before the run."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert M.resolved_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert M.resolved_precision("bf16", "cpu") == "bf16"
    assert M.resolved_precision("fp32", "cpu") == "fp32"
    with M.autocast("auto", "cpu"):
        dtype = (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    assert dtype == (torch.bfloat16 if native else torch.float32)
    warned = C.config_warnings(C.load(None, ["train.precision=bf16"], check_paths=False))
    assert any("emulated" in w for w in warned) is not native


def test_group_by_length_keeps_packed_blocks_in_the_permutations_order():
    a = epoch_order([16] * 300, 4, torch.Generator().manual_seed(3), group=True)
    b = epoch_order([16] * 300, 4, torch.Generator().manual_seed(3), group=False)
    assert a == b == torch.randperm(300, generator=torch.Generator().manual_seed(3)).tolist()


def padding(lengths, order, batch_size):
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    width = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths) / width


def test_group_by_length_batches_similar_lengths_in_a_random_batch_order():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (1000,), generator=g).tolist()
    order = epoch_order(lengths, 4, torch.Generator().manual_seed(1), group=True)
    plain = epoch_order(lengths, 4, torch.Generator().manual_seed(1), group=False)
    assert sorted(order) == list(range(1000))  # every example once per epoch
    batches = [order[i : i + 4] for i in range(0, 1000, 4)]
    size = 4 * MEGABATCH  # each batch comes from one window of the permutation, sorted
    windows = [set(plain[i : i + size]) for i in range(0, 1000, size)]
    for b in batches:
        assert any(set(b) <= w for w in windows)
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert padding(lengths, order, 4) < 0.1 < 0.3 < padding(lengths, plain, 4)
    # the first 10 batches (a short round) are not just the longest examples
    first = [lengths[i] for b in batches[:10] for i in b]
    assert min(first) < 100 < max(first)
    again = epoch_order(lengths, 4, torch.Generator().manual_seed(1), group=True)
    assert again == order


def test_train_local_counts_padding_positions(tiny_model_dir):
    """Lengths 3, 5, 2, 6, batch 2, one epoch, grouped: batches [6, 5] and [3, 2] (in
    either order), so 16 tokens in 2*6 + 2*3 positions."""
    cfg = make_cfg(tiny_model_dir, "train.local_steps=2", "train.group_by_length=true")
    model = M.load_model(cfg)
    ex = [{"input_ids": list(range(1, n + 1))} for n in (3, 5, 2, 6)]
    r = train_local(model, ex, cfg.train, 1e-3, 0.0, seed=0)
    assert (r.tokens, r.positions) == (16, 2 * 6 + 2 * 3)


@pytest.mark.slow
def test_compiled_step_trains_like_eager(tiny_model_dir, monkeypatch):
    """train.compile: the same losses and weights as eager, to float rounding (without
    dropout: compiled code draws its masks from another random stream)."""
    compiled_fns, real = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **kw: compiled_fns.append(f) or real(f, **kw))
    runs = {}
    for compiled in (False, True):
        cfg = make_cfg(tiny_model_dir, "lora.dropout=0", f"train.compile={str(compiled).lower()}")
        model = M.load_model(cfg, seed=0)
        r = train_local(model, examples(), cfg.train, 1e-2, 0.0, seed=0)
        runs[compiled] = (r.loss, flat(model))
    assert len(compiled_fns) == 1  # the compiled run really compiled
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-4, atol=1e-5)
    assert not torch.equal(runs[False][1], flat(M.load_model(make_cfg(tiny_model_dir), seed=0)))


def test_an_uncached_hub_model_offline_is_unreachable_not_missing():
    """huggingface_hub 1.x raises LocalEntryNotFoundError (a subclass of EntryNotFoundError)
    for a file that is neither cached nor downloadable: that is an unreachable hub, which
    `fedtune validate` only warns about, not a model without config.json."""
    with pytest.raises(HubModelError, match="facebook/opt-350m"):
        M.config_json("facebook/opt-350m")
