"""estimate_memory: its parts agree with what a real CPU run allocates on a tiny model, and the
`peftkit estimate` / `peftkit export` commands run. (Accuracy on SmolLM2 against measured peak
RSS is a benchmark: benchmarks/estimate_vs_measured.py.)"""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import tiny_llama
from peftkit import LoraConfig, get_peft_model
from peftkit.estimate import estimate_memory, method_config


def _real_saved_bytes(pm, ids):
    """Distinct storages autograd saves in a real forward, excluding the model's own tensors."""
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return t

    pm.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = pm(input_ids=ids, labels=ids).loss
    for t in list(pm.parameters()) + list(pm.buffers()):
        saved.pop(t.untyped_storage().data_ptr(), None)
    loss.backward()
    return sum(saved.values())


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_parts_match_a_real_run(method):
    model = tiny_llama()
    b, s = 2, 16
    est = estimate_memory(model, method, (b, s), runtime_bytes=0)
    real_weights = sum(p.numel() * p.element_size() for p in model.parameters())
    real_weights += sum(t.numel() * t.element_size() for t in model.buffers())
    assert est.weights == real_weights
    pm = get_peft_model(model, method_config(method))
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert est.trainable_params == trainable and est.adapter == 4 * trainable == est.gradients
    assert est.optimizer == 2 * est.adapter
    transient = 2 * b * s * model.config.vocab_size * 4
    ids = torch.randint(2, 128, (b, s), generator=torch.Generator().manual_seed(0))
    assert est.activations - transient == _real_saved_bytes(pm, ids)
    assert est.total == sum(getattr(est, k) for k in ("runtime", "weights", "adapter", "gradients", "optimizer",
                                                        "activations"))


def test_qlora_weights_are_packed_and_scale_with_batch():
    cfg = tiny_llama().config
    lora = estimate_memory(cfg, "lora", (2, 16), runtime_bytes=0)
    qlora = estimate_memory(cfg, "qlora", (2, 16), runtime_bytes=0)
    linear = sum(m.in_features * m.out_features for m in tiny_llama().modules()
                 if type(m) is torch.nn.Linear and m.out_features != cfg.vocab_size)
    # fp32 -> 4 bit: 4 bytes become half a byte plus (double-quantised) block scales
    saved = lora.weights - qlora.weights
    assert 3.4 * linear < saved < 3.5 * linear
    assert qlora.activations == lora.activations
    big = estimate_memory(cfg, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), (4, 16), runtime_bytes=0)
    assert big.activations > 1.9 * lora.activations


def test_bad_method_and_optimizer():
    cfg = tiny_llama().config
    with pytest.raises(ValueError, match="Unknown method"):
        estimate_memory(cfg, "fullft", (1, 8))
    with pytest.raises(ValueError, match="adamw or sgd"):
        estimate_memory(cfg, "lora", (1, 8), optimizer="lion")


def test_cli_estimate_and_export(tmp_path, capsys):
    from peftkit.cli import main

    model = tiny_llama()
    folder = str(tmp_path / "base")
    model.save_pretrained(folder)
    assert main(["estimate", "--model", folder, "--method", "lora", "--batch-size", "2", "--seq-len", "8",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["total"] > out["weights"] > 0 and out["trainable_params"] > 0
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path / "ad"))
    gg = str(tmp_path / "ad.gguf")
    assert main(["export", "--adapter", str(tmp_path / "ad"), "--gguf", gg, "--base-config", folder]) == 0
    assert os.path.getsize(gg) > 0 and "wrote" in capsys.readouterr().out
