"""Stacking methods on one model: layer methods together, and with prefix tuning (MAM, UniPELT)."""
from __future__ import annotations

import pytest
import torch

from conftest import inputs_for, output_of, tiny_gpt2, tiny_llama
from peftkit import BottleneckConfig, IA3Config, LoraConfig, PeftModel, VeraConfig, get_peft_model
from peftkit.methods.hybrids import HybridModel, mam_adapter, unipelt


@torch.no_grad()
def perturb(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("second", ["houlsby", "ia3", "vera"])
def test_lora_plus_another_method_active_together(second, tmp_path):
    base = tiny_llama()
    batch = inputs_for(base)
    ref = output_of(base, batch)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)).eval()
    other = {"houlsby": BottleneckConfig(bottleneck_size=4, init_weights=False),
             "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                              init_ia3_weights=False),
             "vera": VeraConfig(r=4, target_modules=["v_proj", "down_proj"], init_weights=False)}[second]
    model.add_adapter("second", other)
    outs = {}
    for names in (["default"], ["second"], ["default", "second"]):
        model.set_adapter(names)
        outs[tuple(names)] = output_of(model, batch)
        trained = {n.split(".deltas.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert trained == set(names)
    both = outs[("default", "second")]
    for single in (("default",), ("second",)):
        assert (both - outs[single]).abs().max() > 1e-4
    assert (both - ref).abs().max() > 1e-4
    # both train in one step
    model.set_adapter(["default", "second"])
    before = [p.detach().clone() for p in _trainable(model)]
    loss = output_of(model, batch).pow(2).mean()
    loss.backward()
    torch.optim.Adam(_trainable(model), lr=1e-3).step()
    assert all(not torch.equal(a, b) for a, b in zip(before, _trainable(model)))
    expected = output_of(model, batch)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "second"), "second")
    loaded.set_adapter(["default", "second"])
    torch.testing.assert_close(output_of(loaded.eval(), batch), expected, atol=1e-5, rtol=1e-5)


def test_mam_adapter_trains_both_parts_and_round_trips(tmp_path):
    base = tiny_llama()
    batch = inputs_for(base)
    model = mam_adapter(base, num_virtual_tokens=3, bottleneck_size=4)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("prompt_encoder" in n for n in names) and any("parallel_adapter" in n for n in names)
    model.train()
    opt = torch.optim.Adam(_trainable(model), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in _trainable(model))
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    expected = model(**batch).logits
    model.save_pretrained(str(tmp_path))
    back = HybridModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(back(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    # each part alone: the adapter without the prefix differs from the hybrid
    alone = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "layers" / "parallel_adapter")).eval()
    assert (output_of(alone, batch) - expected).abs().max() > 1e-5


def test_unipelt_composes_three_methods():
    base = tiny_gpt2()
    batch = inputs_for(base)
    ref = output_of(base, batch)
    model = unipelt(base, lora_r=2, num_virtual_tokens=2, reduction_factor=8).eval()
    assert set(model.layers.active_adapters) == {"lora", "adapter"}
    perturb([p for n, p in model.named_parameters() if p.requires_grad and "prompt_encoder" not in n], 4)
    out = model(**batch).logits
    assert (out - ref).abs().max() > 1e-4
    t, a = model.get_nb_trainable_parameters()
    assert 0 < t < a
    with pytest.raises(ValueError, match="at least one layer method"):
        HybridModel(tiny_llama(), {})


def test_block_adapter_refuses_to_hide_inner_adapters():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["down_proj"]))
    with pytest.raises(TypeError, match="already holds adapters"):
        model.add_adapter("par", BottleneckConfig(adapter_type="parallel", bottleneck_size=4))
