"""Hugging Face PEFT interoperability: adapters cross between the libraries with equal logits."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import inputs_for, output_of, perturb, tiny_bert_cls, tiny_gpt2, tiny_llama
import peftkit

peft = pytest.importorskip("peft")

CASES = {
    "lora": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "dora": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True)),
    "rslora": (tiny_llama, dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True)),
    "embedding": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"])),
    "embedding_dora": (tiny_llama, dict(r=2, lora_alpha=4, target_modules=["embed_tokens"], use_dora=True)),
    "gpt2_conv1d": (tiny_gpt2, dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "gpt2_dora": (tiny_gpt2, dict(r=4, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)),
    "bias_all_seqcls": (tiny_bert_cls, dict(r=4, lora_alpha=8, target_modules=["query", "value"], bias="all",
                                            task_type="SEQ_CLS")),
    "bias_lora_only": (tiny_bert_cls, dict(r=4, lora_alpha=8, target_modules=["query"], bias="lora_only",
                                           task_type="SEQ_CLS")),
    "modules_to_save": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "patterns": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                                  alpha_pattern={"layers.1.self_attn.q_proj": 3}, layers_to_transform=[1])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_loads_in_peftkit(case, tmp_path):
    factory, kw = CASES[case]
    batch = inputs_for(factory())
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(**kw)).eval()
    perturb(theirs)
    expected = output_of(theirs, batch)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
    torch.testing.assert_close(output_of(ours, batch), expected, atol=1e-5, rtol=0)
    # and merging gives the same outputs as peft's merge
    torch.testing.assert_close(output_of(ours.merge_and_unload(), batch),
                               output_of(theirs.merge_and_unload(), batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_saved_loads_in_peft(case, tmp_path):
    factory, kw = CASES[case]
    batch = inputs_for(factory())
    ours = peftkit.get_peft_model(factory(), peftkit.LoraConfig(**kw)).eval()
    perturb(ours)
    expected = output_of(ours, batch)
    ours.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
    torch.testing.assert_close(output_of(theirs, batch), expected, atol=1e-5, rtol=0)
    # same file contents as peft would write: keys and shapes
    again = tmp_path / "again"
    theirs.save_pretrained(again)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "adapter_model.safetensors")
    b = load_file(again / "adapter_model.safetensors")
    # both write a targeted embedding's base weight (save_embedding_layers="auto"), so all keys compare
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items() if k in a}
    assert set(b) <= set(a) | {k for k in b if ".original_module." in k or ".modules_to_save." in k}


def test_multiple_adapters_round_trip_subfolders(tmp_path):
    ours = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=4, target_modules=["q_proj"]))
    ours.add_adapter("other", peftkit.LoraConfig(r=2, target_modules=["v_proj"], use_dora=True))
    perturb(ours)
    ours.set_adapter("other")  # perturb touched only the active adapter's tensors; do both
    perturb(ours, seed=3)
    ours.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "other" / "adapter_model.safetensors")
    batch = inputs_for(tiny_llama())
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    theirs.load_adapter(str(tmp_path / "other"), adapter_name="other")
    for name in ("default", "other"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(output_of(theirs.eval(), batch), output_of(ours.eval(), batch), atol=1e-5, rtol=0)
    back = peftkit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    back.load_adapter(str(tmp_path / "other"), "other")
    back.set_adapter("other")
    torch.testing.assert_close(output_of(back.eval(), batch), output_of(ours, batch), atol=1e-6, rtol=0)


def test_config_written_is_read_by_peft(tmp_path):
    ours = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"],
                                                                   lora_dropout=0.05, task_type="CAUSAL_LM"))
    ours.save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["r"] == 4 and data["task_type"] == "CAUSAL_LM"
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, list(cfg.target_modules)) == (4, 16, 0.05, ["q_proj"])
