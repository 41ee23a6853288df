"""Stacking methods on one model: layer methods together, and with prefix tuning (MAM, UniPELT)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import inputs_for, output_of, perturb, tiny_gpt2, tiny_llama
from peftkit import BottleneckConfig, IA3Config, LoraConfig, PeftModel, VeraConfig, get_peft_model
from peftkit.core.inject import sites
from peftkit.core.site import Site
from peftkit.io.checkpoint import CheckpointError
from peftkit.methods.gates import GatedDelta, add_gates, gate_state_dict
from peftkit.methods.hybrids import HybridModel, mam_adapter, unipelt


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


def test_merging_a_mergeable_and_an_unmergeable_method_changes_nothing():
    """LoRA (mergeable) and a Houlsby adapter (not) active together: merging both is refused
    before any weight changes, at whichever site the refusal comes; LoRA alone then merges."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                    init_lora_weights=False)).eval()
    # the refusal comes at the last site, after LoRA's sites of layer 0
    model.add_adapter("second", BottleneckConfig(bottleneck_size=4, init_weights=False,
                                                 target_modules=["layers.1.mlp.down_proj"]))
    model.set_adapter(["default", "second"])
    batch = inputs_for(model)
    before = output_of(model, batch)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_adapter(["default", "second"])
    assert not model.base_model.merged
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(output_of(model, batch), before, atol=0, rtol=0)
    model.merge_adapter(["default"])
    torch.testing.assert_close(output_of(model, batch), before, atol=1e-5, rtol=1e-5)


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
    model = unipelt(base, lora_r=2, num_virtual_tokens=2, reduction_factor=8, gated=False).eval()
    assert set(model.layers.active_adapters) == {"lora", "adapter"}
    assert not any(isinstance(d, GatedDelta) for _, s in sites(base) for d in s.deltas.values())
    perturb([p for n, p in model.named_parameters() if p.requires_grad and "prompt_encoder" not in n], 4)
    out = model(**batch).logits
    assert (out - ref).abs().max() > 1e-4
    t, a = model.get_nb_trainable_parameters()
    assert 0 < t < a
    with pytest.raises(ValueError, match="at least one layer method"):
        HybridModel(tiny_llama(), {})




# ----- UniPELT's gates ---------------------------------------------------------------------------
def _gates(model) -> list:
    return [p for n, p in model.named_parameters() if ".gate." in n]


def test_unipelt_gates_train_and_round_trip(tmp_path):
    base = tiny_llama()
    batch = inputs_for(base)
    model = unipelt(base, lora_r=2, num_virtual_tokens=2, reduction_factor=8)
    gated = [(p, s.deltas[n]) for p, s in sites(base) for n in ("lora", "adapter") if n in s.deltas]
    assert gated and all(isinstance(d, GatedDelta) for _, d in gated)
    # LoRA reads x (q/v input), the serial FFN adapter reads the down projection's output
    assert {(p.rsplit(".", 1)[1], d.on_output) for p, d in gated} == {("q_proj", False), ("v_proj", False),
                                                                       ("down_proj", True)}
    gates = _gates(model)
    assert len(gates) == 2 * len(gated) and all(p.requires_grad for p in gates)
    start = [p.detach().clone() for p in gates]
    model.train()
    opt = torch.optim.Adam(_trainable(model), lr=1e-2)
    losses, grads = [], []
    for _ in range(6):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        grads.append(min(p.grad.abs().sum().item() for p in gates))
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert grads[-1] > 0  # every gate gets a gradient once its adapter's update is non-zero
    assert all(not torch.equal(a, b) for a, b in zip(start, gates))
    model.eval()
    expected = model(**batch).logits
    model.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "gates.safetensors")
    # the LoRA part's file is a plain PEFT LoRA file: the same keys as an ungated LoRA's, no gates
    lora_keys = set(load_file(str(tmp_path / "layers" / "lora" / "adapter_model.safetensors")))
    plain = get_peft_model(tiny_llama(), LoraConfig(r=2)).get_adapter_state_dict()
    assert lora_keys == set(plain)
    back = HybridModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert set(back.gated) == {"lora", "adapter"}
    assert torch.equal(back.eval()(**batch).logits, expected)


def test_gated_adapter_refuses_to_merge():
    base = tiny_llama()
    model = unipelt(base, lora_r=2, num_virtual_tokens=2, reduction_factor=8)
    before = {k: v.clone() for k, v in base.state_dict().items() if "base_layer.weight" in k}
    with pytest.raises(TypeError, match="gated .*cannot be folded"):
        model.layers.merge_adapter(["lora"])
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items() if k in before)
    assert not model.layers.base_model.merged


def test_gated_site_computes_the_paper_equations():
    torch.manual_seed(3)
    model = unipelt(tiny_llama(), lora_r=2, num_virtual_tokens=2, reduction_factor=8)
    perturb(_trainable(model), 5)
    layer = model.layers.base_model.model.model.layers[0]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        q = layer.self_attn.q_proj
        d = q.deltas["lora"]
        g = torch.sigmoid(x @ d.gate.weight.T + d.gate.bias)
        a_lora, b_lora = d.inner.factors()
        lora = x @ a_lora.T @ b_lora.T
        torch.testing.assert_close(q(x), x @ q.base_layer.weight.T + g * d.inner.scaling * lora)
        down = layer.mlp.down_proj
        a = down.deltas["adapter"]
        h = torch.randn(2, 5, 64)
        y = h @ down.base_layer.weight.T
        g = torch.sigmoid(y @ a.gate.weight.T + a.gate.bias)  # the adapter's gate reads its own input h_FN
        f = a.inner.adapter_up(F.relu(a.inner.adapter_down(y)))
        torch.testing.assert_close(down(h), y + g * f)


def test_gates_fixed_at_one_equal_the_ungated_model(tmp_path):
    base = tiny_llama()
    batch = inputs_for(base)
    ungated = unipelt(base, lora_r=2, num_virtual_tokens=2, reduction_factor=8, gated=False).eval()
    perturb(_trainable(ungated), 7)
    expected = ungated(**batch).logits
    ungated.save_pretrained(str(tmp_path))
    assert not os.path.exists(tmp_path / "gates.safetensors")
    model = HybridModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True).eval()
    assert add_gates(model.layers, "lora") == 4 and add_gates(model.layers, "adapter") == 2
    with torch.no_grad():
        for p in _gates(model):
            p.fill_(0.0 if p.dim() == 2 else 100.0)  # sigmoid(100) == 1 in float32
    torch.testing.assert_close(model(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for p in _gates(model):
            p.fill_(0.0)  # G = 0.5: the gate is really applied
    assert (model(**batch).logits - expected).abs().max() > 1e-4
    with pytest.raises(ValueError, match="already gated"):
        add_gates(model.layers, "lora")


def test_gates_follow_set_adapter_and_check_their_file(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2))
    model.add_adapter("other", LoraConfig(r=2))
    add_gates(model, "default")
    gates = _gates(model)
    assert gates and all(p.requires_grad for p in gates)
    model.set_adapter("other")
    assert not any(p.requires_grad for p in gates)
    model.set_adapter("default")
    assert all(p.requires_grad for p in gates)
    # a wrongly shaped gate in a hybrid's gates file is refused with the key named
    hybrid = unipelt(tiny_llama(), lora_r=2, num_virtual_tokens=2, reduction_factor=8)
    hybrid.save_pretrained(str(tmp_path))
    path = str(tmp_path / "gates.safetensors")
    flat = load_file(path)
    key = next(k for k in flat if k.startswith("lora/") and k.endswith("gate.weight"))
    flat[key] = torch.zeros(1, 7)
    save_file(flat, path)
    with pytest.raises(CheckpointError, match="gate.weight.*shape"):
        HybridModel.from_pretrained(tiny_llama(), str(tmp_path))
    with pytest.raises(ValueError, match="not layer adapters"):
        HybridModel(tiny_llama(), {"lora": LoraConfig(r=2)}, gated=["prefix"])
    assert set(gate_state_dict(model, "default")) == {f"{p}.gate.{k}" for p, s in sites(model.base_model.model)
                                                      if "default" in s.deltas for k in ("weight", "bias")}


# ----- layers inside a block-level adapter -----------------------------------------------------------
def _by_hand(model, batch):
    """Logits of a fresh base with each LoRA folded into up_proj and each parallel adapter hooked on."""
    ref = tiny_llama()
    hooks = []
    for i, layer in enumerate(ref.model.layers):
        mlp = model.base_model.model.model.layers[i].mlp
        lora = mlp.up_proj.deltas["lora"]
        par = mlp.deltas["par"]
        with torch.no_grad():
            a_lora, b_lora = lora.factors()
            layer.mlp.up_proj.weight += lora.scaling * b_lora @ a_lora

        def add(mod, args, out, par=par):
            x = args[0]
            return out + par.scaling * F.linear(F.relu(F.linear(x, par.adapter_down.weight, par.adapter_down.bias)),
                                                par.adapter_up.weight, par.adapter_up.bias)
        hooks.append(layer.mlp.register_forward_hook(add))
    with torch.no_grad():
        return output_of(ref, batch)


@pytest.mark.parametrize("parallel_first", [True, False])
def test_lora_inside_a_parallel_adapters_block(parallel_first, tmp_path):
    base = tiny_llama()
    batch = inputs_for(base)
    ref = output_of(base, batch)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    configs = [("par", BottleneckConfig(adapter_type="parallel", bottleneck_size=4, init_weights=False)),
               ("lora", LoraConfig(r=2, target_modules=["up_proj"], init_lora_weights=False))]
    if not parallel_first:
        configs.reverse()
    model = get_peft_model(base, configs[0][1], adapter_name=configs[0][0])
    model.add_adapter(*configs[1])
    model.set_adapter(["par", "lora"])
    paths = {p: set(s.deltas) for p, s in sites(base)}
    assert paths["model.layers.1.mlp"] == {"par"} and paths["model.layers.1.mlp.up_proj"] == {"lora"}
    assert isinstance(base.model.layers[0].mlp.base_layer.up_proj, Site)
    trained = {n.split(".deltas.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"par", "lora"}
    model.eval()
    out = output_of(model, batch)
    torch.testing.assert_close(out, _by_hand(model, batch), atol=1e-5, rtol=1e-5)
    # PEFT's key names: the original module path, no trace of the wrapping block
    assert "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight" in model.get_adapter_state_dict("lora")
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / configs[0][0]), adapter_name=configs[0][0])
    loaded.load_adapter(str(tmp_path / configs[1][0]), configs[1][0])
    loaded.set_adapter(["par", "lora"])
    torch.testing.assert_close(output_of(loaded.eval(), batch), out, atol=1e-6, rtol=1e-6)
    loaded.merge_adapter(["lora"])  # the inner LoRA still merges into its own layer
    torch.testing.assert_close(output_of(loaded, batch), out, atol=1e-5, rtol=1e-5)
    restored = model.unload()
    assert not any(isinstance(m, Site) for m in restored.modules())
    assert restored.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in restored.state_dict().items())
    assert torch.equal(output_of(restored, batch), ref)


def test_gated_unipelt_on_a_bfloat16_base():
    """Adapters and gates stay float32 on a bf16 base; the serial adapter reads the bf16 output."""
    base = tiny_llama().to(torch.bfloat16)
    batch = inputs_for(base)
    model = unipelt(base, lora_r=2, num_virtual_tokens=2, reduction_factor=8)
    perturb(_trainable(model), 9)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.grad is not None for p in _gates(model))
