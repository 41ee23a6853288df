"""Hugging Face PEFT specifics of the non-LoRA methods: VeRA's projections, AdaLoRA's pruning, conv layers.

Files both ways with equal logits for every method x family that PEFT also has is the ``peft``
mode of the table in tests/matrix.py (tests/test_matrix.py).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import FAMILIES, inputs_for, output_of, perturb
from peftkit import AdaLoraConfig, LoHaConfig, LoKrConfig, PeftModel, VeraConfig, get_peft_model

peft = pytest.importorskip("peft")


def test_vera_projection_saved_or_regenerated(tmp_path):
    from safetensors.torch import load_file

    factory = FAMILIES["llama"][0]
    for save in (True, False):
        folder = tmp_path / str(save)
        model = get_peft_model(factory(), VeraConfig(r=8, target_modules=["q_proj", "v_proj"], save_projection=save))
        model.save_pretrained(str(folder))
        keys = set(load_file(str(folder / "adapter_model.safetensors")))
        assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) is save
        assert json.load(open(folder / "adapter_config.json"))["save_projection"] is save
    # the same key in peft draws the same matrices
    pm = peft.get_peft_model(factory(), peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ours = get_peft_model(factory(), VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    site = ours.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(site.deltas["default"].vera_A, pm.base_model.vera_A["default"], atol=0, rtol=0)
    torch.testing.assert_close(site.deltas["default"].vera_B, pm.base_model.vera_B["default"], atol=0, rtol=0)


def test_adalora_pruned_adapter_round_trips_with_peft(tmp_path):
    """Train with pruning in both libraries from identical weights; masks, files and logits agree."""
    factory = FAMILIES["llama"][0]
    kw = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=6, lora_alpha=6,
              target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")  # PEFT adds orth reg only then
    base = factory()
    batch = inputs_for(base)
    pm = peft.get_peft_model(base, peft.AdaLoraConfig(**kw))
    ours = get_peft_model(factory(), AdaLoraConfig(**kw))
    perturb(pm, 9, 0.2)
    theirs_sd = peft.get_peft_model_state_dict(pm)
    for path, site in ((p, s) for p, s in ours.named_modules() if hasattr(s, "deltas")):
        d = site.deltas["default"]
        prefix = path[len("base_model."):] if path.startswith("base_model.") else path
        for name in ("lora_A", "lora_B", "lora_E"):
            d.get_parameter(name).data.copy_(theirs_sd[f"base_model.{prefix}.{name}"])
    labels = batch["input_ids"]
    for model, is_peft in ((pm, True), (ours, False)):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        for step in range(kw["total_step"]):
            out = model(**batch, labels=labels)
            out.loss.backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
    pm.eval(), ours.eval()
    theirs_pattern = {k.removesuffix(".default"): v for k, v in pm.peft_config["default"].rank_pattern.items()}
    assert theirs_pattern == ours.peft_config["default"].rank_pattern
    torch.testing.assert_close(output_of(ours, batch), output_of(pm, batch), atol=1e-5, rtol=1e-5)
    kept = sum(sum(v) for v in ours.peft_config["default"].rank_pattern.values())
    assert kept == 2 * 2 * 2  # target_r per layer x 4 layers
    ours.save_pretrained(str(tmp_path / "ours"))
    pm.save_pretrained(str(tmp_path / "theirs"))
    ref = output_of(ours, batch)
    for folder in ("ours", "theirs"):
        back = PeftModel.from_pretrained(factory(), str(tmp_path / folder)).eval()
        torch.testing.assert_close(output_of(back, batch), ref, atol=1e-5, rtol=1e-5)
        again = peft.PeftModel.from_pretrained(factory(), str(tmp_path / folder)).eval()
        torch.testing.assert_close(output_of(again, batch), ref, atol=1e-5, rtol=1e-5)
    assert os.path.getsize(tmp_path / "ours" / "adapter_model.safetensors") > 0


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_conv_layers_match_peft_both_ways(method, tmp_path):
    from conftest import TinyConvNet

    targets = ["conv1", "conv2", "head"]
    ours_cfg = {"loha": LoHaConfig, "lokr": LoKrConfig}[method](r=2, alpha=3, target_modules=targets)
    theirs_cfg = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}[method](r=2, alpha=3, target_modules=targets)
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    pm = peft.get_peft_model(TinyConvNet(), theirs_cfg)
    perturb(pm, 11, 0.2)
    ref = pm.eval()(ids)
    pm.save_pretrained(str(tmp_path / "theirs"))
    ours = PeftModel.from_pretrained(TinyConvNet(), str(tmp_path / "theirs")).eval()
    torch.testing.assert_close(ours(ids), ref, atol=1e-5, rtol=1e-5)
    ours.merge_adapter()
    torch.testing.assert_close(ours(ids), ref, atol=1e-5, rtol=1e-5)
    ours.unmerge_adapter()
    mine = get_peft_model(TinyConvNet(), ours_cfg)
    perturb(mine, 12, 0.2)
    expected = mine.eval()(ids)
    mine.save_pretrained(str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(TinyConvNet(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(back(ids), expected, atol=1e-5, rtol=1e-5)
