"""Soft prompts and adaption prompts saved by Hugging Face PEFT load here, and ours load there."""
from __future__ import annotations

import json
import os

import pytest
import torch

from test_prompts import FAMILIES, METHODS, batch_for, cases, randomise
from peftkit import PeftModel

peft = pytest.importorskip("peft")

# Hugging Face PEFT 0.21 cannot run prefix tuning on BERT under transformers 5 ("Model does not
# support past key values"), so that pair is checked on the peftkit side only (test_prompts.py).
PAIRS = [c for c in cases() if c != ("bert", "prefix") and c != ("bert", "prefix_proj")]


def peft_config(family, method):
    """The same configuration as Hugging Face PEFT's config class."""
    cfg = METHODS[method](FAMILIES[family][1])
    data = {k: v for k, v in cfg.to_dict().items() if v is not None}
    data.pop("inference_mode", None)
    return peft.get_peft_config(data)


def peft_model(family, method):
    factory, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = peft.get_peft_model(factory(), peft_config(family, method))
    return model


@pytest.mark.parametrize("family,method", PAIRS)
def test_trainable_parameter_counts_equal_peft(family, method):
    from test_prompts import build

    _, ours = build(family, method)
    assert ours.get_nb_trainable_parameters() == peft_model(family, method).get_nb_trainable_parameters()


@pytest.mark.parametrize("family,method", PAIRS)
def test_peft_adapter_loads_here_with_equal_logits(family, method, tmp_path):
    theirs = peft_model(family, method)
    randomise(theirs)
    theirs.eval()
    b = batch_for(family, theirs)
    ref = theirs(**b).logits
    theirs.save_pretrained(str(tmp_path))
    ours = PeftModel.from_pretrained(FAMILIES[family][0](), str(tmp_path)).eval()
    assert (ours(**b).logits - ref).abs().max() <= 1e-5
    # inference-mode counts agree as well (p-tuning keeps only the encoder output then)
    loaded = peft.PeftModel.from_pretrained(FAMILIES[family][0](), str(tmp_path))
    assert ours.get_nb_trainable_parameters()[1] == loaded.get_nb_trainable_parameters()[1]


@pytest.mark.parametrize("family,method", PAIRS)
def test_our_adapter_loads_in_peft_with_equal_logits(family, method, tmp_path):
    from test_prompts import build

    _, ours = build(family, method)
    randomise(ours)
    ours.eval()
    b = batch_for(family, ours)
    ref = ours(**b).logits
    ours.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(FAMILIES[family][0](), str(tmp_path)).eval()
    assert (theirs(**b).logits - ref).abs().max() <= 1e-5


def test_peft_ptuning_file_resumes_on_its_output(tmp_path):
    theirs = peft_model("llama", "p_mlp")
    randomise(theirs)
    theirs.eval()
    b = batch_for("llama", theirs)
    ref = theirs(**b).logits
    theirs.save_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match="encoder output"):
        ours = PeftModel.from_pretrained(FAMILIES["llama"][0](), str(tmp_path), is_trainable=True)
    ours.eval()
    assert (ours(**b).logits - ref).abs().max() <= 1e-5
    ours.train()
    ours(**b).loss.backward()
    assert ours.base_model.prompt_encoder["default"].embedding.weight.grad is not None


def test_saved_encoder_keys_are_ignored_by_peft_and_config_is_peft_readable(tmp_path):
    from test_prompts import build

    _, ours = build("gpt2", "prefix_proj")
    ours.save_pretrained(str(tmp_path))
    with open(os.path.join(tmp_path, "adapter_config.json")) as fh:
        cfg = json.load(fh)
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["token_dim"] == 32 and cfg["inference_mode"] is True
    from safetensors.torch import load_file

    keys = set(load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
    assert "prompt_embeddings" in keys and "prompt_encoder.transform.0.weight" in keys
    theirs = peft.PeftModel.from_pretrained(FAMILIES["gpt2"][0](), str(tmp_path))
    assert theirs.prompt_encoder["default"].embedding.weight.shape == (3, 2 * 2 * 32)
