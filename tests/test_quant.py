"""LoRA/DoRA on quantised bases (bitsandbytes 4-bit/8-bit, torchao int8), kbit preparation,
the AVX512-BF16 repacking trap, and merging into a quantised base."""
from __future__ import annotations

import pytest
import torch

from peftkit import LoraConfig, get_peft_model

bnb = pytest.importorskip("bitsandbytes")
from peftkit.quant import (backend_for, dequantize, guard_quantized, merge_and_unload_quantized,  # noqa: E402
                           prepare_model_for_kbit_training, quantize_linear, quantize_model)


def llama64():
    """A tiny Llama whose projections have 32-multiple widths (bitsandbytes' CPU repacking needs them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def _modes():
    from peftkit.quant import all_modes

    return [m for m in ("nf4", "fp4", "8bit", "int8-ao") if m in all_modes()]


def _randomise_b(model, std=0.1):
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=std)


def _grads(pm):
    pm.train()
    pm.zero_grad(set_to_none=True)
    pm(input_ids=IDS, labels=IDS).loss.backward()
    return {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", _modes())
def test_lora_site_output_on_quantised_base(mode):
    """The Site hands the quantised layer's output to the unchanged LoRA delta: y = q(W)x + s*BAx."""
    model = quantize_model(llama64(), mode)
    q = model.model.layers[0].self_attn.q_proj
    assert backend_for(q) is not None
    x = torch.randn(3, 64)
    y_base = q(x)
    w = dequantize(q).float()
    assert torch.allclose(y_base, x @ w.T, atol=0.05 if mode == "8bit" else 1e-4)  # int8 path quantises x too
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    _randomise_b(pm)
    site = pm.base_model.model.model.layers[0].self_attn.q_proj
    d = site.deltas["default"]
    expected = y_base + 2.0 * (x @ d.lora_A.T @ d.lora_B.T)
    assert torch.allclose(site(x), expected, atol=1e-5)
    g = _grads(pm)
    assert g and all(v is not None and v.abs().sum() > 0 for v in g.values())


def test_dora_on_4bit_starts_at_base_and_trains():
    """DoRA reads the dequantised weight for its norms: at init the model equals the 4-bit base."""
    model = quantize_model(llama64(), "nf4")
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    with torch.no_grad():
        out = pm(input_ids=IDS).logits
    assert torch.allclose(out, ref, atol=1e-5)
    g = _grads(pm)
    assert any("magnitude" in n for n in g) and all(v is not None for v in g.values())


def _force_avx512bf16(model):
    """Make bitsandbytes believe this CPU has AVX512-BF16 (it repacks on eval where it does)."""
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = True
    return layers


def _repacked(layers):
    return sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers)


def _train_eval_train(pm, layers):
    g1 = _grads(pm)
    pm.eval()
    with torch.no_grad():
        pm(input_ids=IDS)
    packed = _repacked(layers)
    g2 = _grads(pm)
    return g1, g2, packed


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _unguarded_llama():
    model = llama64()
    for name, mod in list(model.named_modules()):
        if type(mod) is torch.nn.Linear and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantize_linear(mod, "nf4"))
    return model


def _simulated_avx512bf16_llama():
    """A 4-bit model as bitsandbytes builds it on an AVX512-BF16 CPU: each layer's flag is set at
    construction (from ``has_avx512bf16()``), so forcing it here is that CPU's state on any CPU."""
    model = _unguarded_llama()
    layers = _force_avx512bf16(model)
    return model, layers


def test_avx512bf16_trap_is_real_in_peft():
    """Control: Hugging Face PEFT on the same model gets wrong gradients after one eval forward."""
    peft = pytest.importorskip("peft")
    model, layers = _simulated_avx512bf16_llama()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    _randomise_b(pm)
    g1, g2, packed = _train_eval_train(pm, layers)
    assert packed == len(layers)
    bad = [n for n in g1 if g2[n] is None or _rel(g2[n], g1[n]) > 0.1]
    assert bad, "the repacking trap did not reproduce; the guard tests below would prove nothing"


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_get_peft_model_guards_quantised_layers_by_itself(targets):
    """No prepare_model_for_kbit_training: wrapping alone keeps training after an eval exact,
    for targeted and untargeted quantised layers alike."""
    model, layers = _simulated_avx512bf16_llama()
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    _randomise_b(pm)
    g1, g2, packed = _train_eval_train(pm, layers)
    assert packed == 0 and _repacked(layers) == 0
    assert g1 and all(g2[n] is not None and _rel(g2[n], g1[n]) < 1e-6 for n in g1)


def test_from_pretrained_trainable_guards_quantised_layers(tmp_path):
    """PeftModel.from_pretrained(..., is_trainable=True) on a quantised base is guarded too."""
    from peftkit import PeftModel

    pm = get_peft_model(llama64(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomise_b(pm)
    pm.save_pretrained(str(tmp_path))
    model, layers = _simulated_avx512bf16_llama()
    pm = PeftModel.from_pretrained(model, str(tmp_path), is_trainable=True)
    g1, g2, packed = _train_eval_train(pm, layers)
    assert packed == 0
    assert g1 and all(g2[n] is not None and _rel(g2[n], g1[n]) < 1e-6 for n in g1)


@pytest.mark.parametrize("fast_eval", [False, True])
def test_training_after_eval_keeps_every_adapter_gradient(fast_eval):
    """Train, evaluate (bitsandbytes would repack), train again: every adapter still gets its gradient."""
    model = _unguarded_llama()
    layers = _force_avx512bf16(model)
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False, allow_packed_eval=fast_eval)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    _randomise_b(pm)
    _force_avx512bf16(pm) if fast_eval else None
    g1, g2, packed = _train_eval_train(pm, layers)
    assert packed == (len(layers) if fast_eval else 0)
    assert _repacked(layers) == 0  # the training forward restored the differentiable layout
    for n in g1:
        assert g2[n] is not None and g2[n].abs().sum() > 0, n
        # fast_eval: bitsandbytes' unpacking re-quantises the block scales (bf16 round trip)
        assert _rel(g2[n], g1[n]) < (0.02 if fast_eval else 1e-6), n


def test_prepare_changes_no_dtype_and_freezes_base():
    model = llama64().to(torch.bfloat16)
    quantize_model(model, "nf4")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    prepare_model_for_kbit_training(model)
    assert {n: p.dtype for n, p in model.named_parameters()} == dtypes  # no fp32 upcast
    assert not any(p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomise_b(pm)
    emb_out = []
    h = model.get_input_embeddings().register_forward_hook(lambda m, i, o: emb_out.append(o))
    g = _grads(pm)
    h.remove()
    assert not emb_out[0].requires_grad  # non-reentrant checkpointing: no gradient down to embeddings
    assert all(v is not None and v.abs().sum() > 0 for v in g.values())


def test_merge_into_quantised_base_dense_and_requantised():
    pm = get_peft_model(quantize_model(llama64(), "nf4"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomise_b(pm, std=0.5)
    with pytest.raises(TypeError, match="merge_and_unload_quantized"):
        pm.merge_adapter()
    with torch.no_grad():
        ref = pm(input_ids=IDS).logits
    import copy

    pm2 = copy.deepcopy(pm)
    dense, errs = merge_and_unload_quantized(pm)
    with torch.no_grad():
        assert torch.allclose(dense(input_ids=IDS).logits, ref, atol=1e-4)
    assert len(errs) == 4 and all(e["weight_rel_err"] == 0.0 for e in errs.values())
    requant, errs = merge_and_unload_quantized(pm2, requantize=True)
    q = requant.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_state.quant_type == "nf4"
    for e in errs.values():
        assert 0.0 < e["weight_rel_err"] < 0.2  # NF4's own error on a random matrix is ~0.1
        assert 0.0 < e["update_rel_err"]
    with torch.no_grad():
        out = requant(input_ids=IDS).logits
    assert (out - ref).norm() / ref.norm() < 0.2


def test_unknown_mode_and_guard_count():
    with pytest.raises(ValueError, match="known modes"):
        quantize_model(llama64(), "3bit")
    model = quantize_model(llama64(), "8bit")
    assert guard_quantized(model) == 14
