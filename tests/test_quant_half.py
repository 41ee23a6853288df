"""16-bit storage of the frozen base with fp32 compute (``quantize_model(model, "bf16")``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.quant import backend_for, dequantize, merge_and_unload_quantized, quantize_linear, quantize_model
from peftkit.quant.half import HalfLinear

IDS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("mode,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_linear_is_fp32_math_on_the_rounded_weight(mode, dtype):
    """y = x W16^T + b and dL/dx = g W16 computed in fp32, the weight stored in 16 bits, no weight grad."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 12)
    q = quantize_linear(lin, mode)
    assert isinstance(q, HalfLinear) and q.weight.dtype == dtype and q.bias.dtype == torch.float32
    assert backend_for(q).mode_of(q) == (mode, False)
    w = lin.weight.detach().to(dtype).float()
    torch.testing.assert_close(dequantize(q), w, rtol=0, atol=0)
    x = torch.randn(3, 5, 24, requires_grad=True)
    y = q(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x.detach(), w, lin.bias.detach()), rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w, rtol=0, atol=1e-5)
    assert q.weight.grad is None


def test_backward_keeps_the_16_bit_weight_not_a_widened_copy():
    """The fp32 copy of the weight must not live until backward: only 16-bit tensors of the
    weight's shape may be saved for it."""
    q = quantize_linear(torch.nn.Linear(32, 16), "bf16")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q(torch.randn(4, 32, requires_grad=True)).sum().backward()
    weight_like = [t for t in saved if t.shape == (16, 32)]
    assert weight_like and all(t.dtype == torch.bfloat16 for t in weight_like)


def test_trainable_half_weight_is_refused():
    q = quantize_linear(torch.nn.Linear(8, 8), "bf16")
    q.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen 16-bit weight"):
        q(torch.randn(2, 8))


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}])
def test_lora_trains_on_a_bf16_stored_base_and_round_trips(variant, tmp_path):
    """LoRA (and DoRA, which reads the widened weight for its norms) trains on a bf16-stored
    llama: every adapter parameter gets a gradient, the loss falls, the base weights stay put and
    in 16 bits, and the saved adapter reloads with identical logits."""
    model = quantize_model(tiny_llama(), "bf16")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, HalfLinear) and isinstance(model.lm_head, torch.nn.Linear)  # the head stays dense
    before = q.weight.detach().clone()
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **variant))
    with torch.no_grad():
        at_init = pm(input_ids=IDS).logits
        with pm.disable_adapter():
            torch.testing.assert_close(pm(input_ids=IDS).logits, at_init, rtol=0, atol=1e-5)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    pm.train()
    for _ in range(8):
        loss = pm(input_ids=IDS, labels=IDS).loss
        loss.backward()
        if len(losses) == 1:  # second step: B moved off zero, so A gets gradients too
            grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
            assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(q.weight, before) and q.weight.dtype == torch.bfloat16
    pm.eval()
    pm.save_pretrained(tmp_path)
    with torch.no_grad():
        want = pm(input_ids=IDS).logits
        again = PeftModel.from_pretrained(quantize_model(tiny_llama(), "bf16"), tmp_path)
        torch.testing.assert_close(again(input_ids=IDS).logits, want, rtol=0, atol=1e-6)


def test_merge_into_bf16_base_dense_or_restored_to_16_bits():
    """Kept dense, the merged model computes what the adapted one did; stored back in bf16 the
    error is bf16 rounding of the merged weight, and it is reported."""
    pm = get_peft_model(quantize_model(tiny_llama(), "bf16"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                         init_lora_weights=False))
    with torch.no_grad():
        want = pm(input_ids=IDS).logits
    dense_pm = get_peft_model(quantize_model(tiny_llama(), "bf16"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    dense_pm.load_state_dict(pm.state_dict())
    merged, errors = merge_and_unload_quantized(dense_pm)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert all(e == {"weight_rel_err": 0.0, "update_rel_err": 0.0} for e in errors.values())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, want, rtol=0, atol=1e-4)
    requant, errors = merge_and_unload_quantized(pm, requantize=True)
    assert isinstance(requant.model.layers[0].self_attn.q_proj, HalfLinear)
    assert len(errors) == 4 and all(0 < e["weight_rel_err"] < 1e-2 for e in errors.values())
