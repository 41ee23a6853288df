"""``save_embedding_layers``: the base's resized token embeddings in the adapter file, written
and read as PEFT does (checked against the real ``peft`` on a tiny Llama with new tokens)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from conftest import tiny_llama

peft = pytest.importorskip("peft")
X = torch.tensor([[130, 131, 5]])  # two of the new tokens


def resized(seed: int = 3):
    """tiny_llama with 12 new tokens whose embedding rows depend on ``seed`` (as after training)."""
    model = tiny_llama()
    model.resize_token_embeddings(140, mean_resizing=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.get_input_embeddings().weight[128:] = torch.randn(12, 32)
    return model


def saved(lib, folder, targets, choice, lora=None):
    """Save a LoRA on ``resized()`` with ``save_embedding_layers=choice``; (tensors, warnings, logits)."""
    torch.manual_seed(0)
    model = lib.get_peft_model(resized(), lib.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=targets,
                                                         init_lora_weights=False))
    if lora is not None:
        lib.set_peft_model_state_dict(model, lora)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(folder, save_embedding_layers=choice)
    said = sorted(str(w.message) for w in caught if "save_embedding_layers" in str(w.message))
    with torch.no_grad():
        logits = model(input_ids=X).logits
    return load_file(os.path.join(folder, "adapter_model.safetensors")), said, logits


@pytest.mark.parametrize("targets", [["q_proj"], ["q_proj", "embed_tokens"], ["q_proj", "lm_head"]],
                         ids=["linear", "embed_tokens", "lm_head"])
@pytest.mark.parametrize("choice", [True, "auto", False])
def test_files_warnings_and_loads_equal_peft(tmp_path, targets, choice):
    theirs, their_warnings, logits = saved(peft, tmp_path / "peft", targets, choice)
    lora = {k: v for k, v in theirs.items() if "lora_" in k}  # the same adapter in both libraries
    ours, our_warnings, _ = saved(peftkit, tmp_path / "peftkit", targets, choice, lora)
    assert sorted(ours) == sorted(theirs) and our_warnings == their_warnings
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    for folder in ("peft", "peftkit"):
        got = {}
        for lib in (peft, peftkit):  # onto a base resized with other random rows
            base = tiny_llama()
            base.resize_token_embeddings(140, mean_resizing=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = lib.PeftModel.from_pretrained(base, str(tmp_path / folder))
            with torch.no_grad():
                got[lib] = model(input_ids=X).logits
        torch.testing.assert_close(got[peftkit], got[peft], rtol=0, atol=1e-6)
        # the new tokens' rows come back where the input embeddings were written (not for an
        # adapted lm_head: then PEFT writes only that layer's base weight)
        kept = choice is True and "lm_head" not in targets or choice == "auto" and "embed_tokens" in targets
        assert torch.allclose(got[peftkit], logits, atol=1e-5) == kept


def test_the_new_tokens_survive_save_and_load(tmp_path):
    model = peftkit.get_peft_model(resized(), peftkit.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path), save_embedding_layers=True)
    base = tiny_llama()
    base.resize_token_embeddings(140, mean_resizing=False)
    for trainable in (False, True):  # packed for inference, and as modules
        loaded = peftkit.PeftModel.from_pretrained(base, str(tmp_path), is_trainable=trainable)
        torch.testing.assert_close(loaded.get_input_embeddings().weight, resized().get_input_embeddings().weight)
        loaded.unload()


def test_a_base_that_was_not_resized_is_refused_with_what_to_do(tmp_path):
    peftkit.get_peft_model(resized(), peftkit.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path), save_embedding_layers=True)
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(peftkit.CheckpointError, match=r"resize_token_embeddings\(140\)"):
        peftkit.PeftModel.from_pretrained(base, str(tmp_path))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # nothing was written


def test_state_dict_function_and_injected_models_use_the_model_keys():
    model = peftkit.get_peft_model(resized(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    keys = set(peftkit.get_peft_model_state_dict(model, save_embedding_layers=True))
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys
    injected = peftkit.inject_adapter_in_model(peftkit.LoraConfig(r=2, target_modules=["q_proj"]), resized())
    assert "model.embed_tokens.weight" in peftkit.get_peft_model_state_dict(injected, save_embedding_layers=True)
    with pytest.raises(ValueError, match="save_embedding_layers must be True, False or 'auto'"):
        peftkit.get_peft_model_state_dict(model, save_embedding_layers="yes")
