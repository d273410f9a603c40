"""The fused head + loss equals transformers' own `model(**batch).loss`, value and gradients."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from fedtune import losses
from fedtune.tasks import IGNORE

VOCAB = 300
# dropout draws differ in order between the two paths: off, so the comparison is exact
NO_DROPOUT_GPT2 = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def llama(tied: bool):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
            **NO_DROPOUT_GPT2,
        )
    )


def opt():
    """OPT-350M's shape: the decoder projects 32 -> 16 before the head (project_out)."""
    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        word_embed_proj_dim=16,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        do_layer_norm_before=False,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return OPTForCausalLM(cfg)


def lora(model, targets):
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    peft_model = get_peft_model(model, cfg)
    for name, p in peft_model.named_parameters():  # B = 0 at init: make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return peft_model


def batch(masked: bool):
    """Two rows, the second right-padded; with `masked`, only a 'response' carries labels."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0
    labels = ids.masked_fill(attn == 0, IGNORE)
    if masked:
        labels[0, :7] = IGNORE
        labels[1, :4] = IGNORE
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def loss_and_grads(model, b, fn):
    model.zero_grad(set_to_none=True)
    loss = fn(model, b)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


CASES = {
    "llama-tied-full": lambda: llama(tied=True),
    "llama-untied-full": lambda: llama(tied=False),
    "llama-lora": lambda: lora(llama(tied=False), ["q_proj", "v_proj", "down_proj"]),
    "gpt2-lora-conv1d": lambda: lora(gpt2(), ["c_attn"]),
    "gpt2-full": gpt2,
    "opt-project-out-full": opt,
}


@pytest.mark.parametrize("masked", [False, True], ids=["every-token", "response-only"])
@pytest.mark.parametrize("case", CASES)
def test_fused_loss_equals_model_loss(case, masked):
    model = CASES[case]().train()
    b = batch(masked)
    assert losses.split_head(model) is not None  # the fused path ran, not the fallback
    ref, ref_grads = loss_and_grads(model, b, lambda m, x: m(**x).loss)
    got, got_grads = loss_and_grads(model, b, losses.causal_lm_loss)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == ref_grads.keys() and len(got_grads) > 0
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


def test_chunks_and_bias_match_plain_cross_entropy(monkeypatch):
    """Several chunks (3 rows each), a bias, fp64 reference: value and all three grads."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 3 * 50)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(10, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (10,), generator=g)
    got = losses.linear_cross_entropy(h, w, b, y)
    got.mul(0.5).backward()  # grad_output != 1 must scale every gradient
    mine = [t.grad.clone() for t in (h, w, b)]
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    ref = F.cross_entropy(h64 @ w64.T + b64, y, reduction="sum")
    ref.mul(0.5).backward()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-6, atol=1e-5)
    for m, r in zip(mine, (h64.grad, w64.grad, b64.grad)):
        torch.testing.assert_close(m.double(), r, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_stays_close_to_the_model_path():
    """Under bf16 autocast both paths round the head's matmul to bf16: close, not equal."""
    model = lora(llama(tied=False), ["q_proj", "v_proj"]).train()
    b = batch(masked=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(**b).loss
        got = losses.causal_lm_loss(model, b)
    fp32 = losses.causal_lm_loss(model, b).detach()
    assert abs(got.item() - ref.item()) < 0.02 * ref.item()
    assert got.dtype == torch.float32 and got.item() != fp32.item()  # bf16 really ran


def test_no_targets_is_a_zero_loss_not_nan():
    model = llama(tied=True).train()
    b = batch(masked=False)
    b["labels"][:] = IGNORE
    loss = losses.causal_lm_loss(model, b)
    loss.backward()
    assert loss.item() == 0.0


def test_head_that_is_not_plain_linear_falls_back():
    """Soft-capped logits (Gemma 2) or a LoRA-wrapped head: the model's own loss runs."""
    capped = llama(tied=True)
    capped.config.final_logit_softcapping = 30.0
    assert losses.split_head(capped) is None
    wrapped = lora(llama(tied=False), ["q_proj", "lm_head"])
    assert losses.split_head(wrapped) is None
    b = batch(masked=True)
    torch.testing.assert_close(losses.causal_lm_loss(wrapped, b), wrapped(**b).loss)


def test_evaluation_computes_no_gradients_even_for_a_trainable_head(monkeypatch):
    """Under no_grad the loss is the same number and no [V, d] gradient is allocated."""
    model = llama(tied=True).eval()
    b = batch(masked=True)
    seen = []
    real = losses._chunked
    monkeypatch.setattr(losses, "_chunked", lambda *a: seen.append(a[-1]) or real(*a))
    with torch.no_grad():
        got = losses.causal_lm_loss(model, b)
        ref = model(**b).loss
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert seen == [(False, False, False)]
