"""Prompt-method specifics against Hugging Face PEFT: p-tuning's encoder output, the keys and config we write.

Files both ways with equal logits, and equal parameter counts, for every prompt method x family
is the ``peft`` mode of the table in tests/matrix.py (tests/test_matrix.py)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import FAMILIES, perturb
from matrix import ROWS_BY_NAME, peft_twin
from peftkit import PeftModel
from test_prompts import batch_for

peft = pytest.importorskip("peft")


def peft_model(family, method):
    """Hugging Face PEFT's model of the table's ``method`` row on ``family``."""
    torch.manual_seed(0)
    return peft.get_peft_model(FAMILIES[family][0](), peft_twin(ROWS_BY_NAME[method].config(family)))


def test_peft_ptuning_file_resumes_on_its_output(tmp_path):
    theirs = peft_model("llama", "p_mlp")
    perturb(theirs, 0, 0.5)
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
