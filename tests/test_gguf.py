"""GGUF export for llama.cpp: metadata, tensor names and shapes, the Q/K row permutation, scale
folding, base-file validation; and (slow) the adapter's effect inside llama.cpp itself."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from peftkit import LoraConfig, get_peft_model
from peftkit.io.gguf import GGUFExportError, export_gguf

gguf = pytest.importorskip("gguf")
from conftest import tiny_llama  # noqa: E402


def _adapter(tmp_path, **cfg):
    model = tiny_llama()
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj", "embed_tokens"])
    kw.update(cfg)
    pm = get_peft_model(model, LoraConfig(**kw))
    torch.manual_seed(2)
    for n, p in pm.named_parameters():
        if "lora_B" in n or "lora_embedding" in n:
            torch.nn.init.normal_(p, std=0.2)
    folder = str(tmp_path / "adapter")
    pm.save_pretrained(folder)
    return pm, model.config, folder


def _read(path):
    r = gguf.GGUFReader(path)
    meta = {k: r.fields[k].contents() for k in ("general.architecture", "general.type", "adapter.type",
                                                 "adapter.lora.alpha")}
    tensors = {t.name: np.array(t.data).reshape(tuple(reversed([int(s) for s in t.shape]))) for t in r.tensors}
    return meta, tensors


def _hand_permuted(b, n_head):
    """llama.cpp's Q/K order written out index by index: per head, row 2j+k <- row k*d/2+j."""
    out = torch.empty_like(b)
    d = b.shape[0] // n_head
    for h in range(n_head):
        for j in range(d // 2):
            for k in range(2):
                out[h * d + 2 * j + k] = b[h * d + k * (d // 2) + j]
    return out


def _site(pm, path):
    return pm.base_model.model.get_submodule(path).deltas["default"]


def test_metadata_names_shapes_and_permutation(tmp_path):
    pm, config, folder = _adapter(tmp_path)
    out = str(tmp_path / "a.gguf")
    summary = export_gguf(folder, out, base_config=config)
    meta, t = _read(out)
    assert meta == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
                    "adapter.lora.alpha": 8.0}
    expected = {f"blk.{i}.{n}.weight.lora_{ab}" for i in range(2) for n in ("attn_q", "attn_k", "attn_v", "ffn_down")
                for ab in "ab"} | {"token_embd.weight.lora_a", "token_embd.weight.lora_b"}
    assert set(t) == expected and set(summary["tensors"]) == expected
    for i in range(2):
        q = _site(pm, f"model.layers.{i}.self_attn.q_proj")
        k = _site(pm, f"model.layers.{i}.self_attn.k_proj")
        v = _site(pm, f"model.layers.{i}.self_attn.v_proj")
        assert t[f"blk.{i}.attn_q.weight.lora_a"].shape == (4, 32)
        assert np.allclose(t[f"blk.{i}.attn_q.weight.lora_a"], q.lora_A.detach().numpy())
        assert np.allclose(t[f"blk.{i}.attn_q.weight.lora_b"], _hand_permuted(q.lora_B.detach(), 4).numpy())
        assert np.allclose(t[f"blk.{i}.attn_k.weight.lora_b"], _hand_permuted(k.lora_B.detach(), 2).numpy())
        assert not np.allclose(t[f"blk.{i}.attn_q.weight.lora_b"], q.lora_B.detach().numpy())
        assert np.allclose(t[f"blk.{i}.attn_v.weight.lora_b"], v.lora_B.detach().numpy())
    e = _site(pm, "model.embed_tokens")
    assert np.allclose(t["token_embd.weight.lora_a"], e.lora_embedding_A.detach().T.numpy())
    assert np.allclose(t["token_embd.weight.lora_b"], e.lora_embedding_B.detach().numpy())


def test_rslora_scale_folded_into_lora_b(tmp_path):
    pm, config, folder = _adapter(tmp_path, use_rslora=True, target_modules=["v_proj"])
    out = str(tmp_path / "a.gguf")
    export_gguf(folder, out, base_config=config, dtype="f16")
    _, t = _read(out)
    b = _site(pm, "model.layers.0.self_attn.v_proj").lora_B.detach()
    # llama.cpp uses alpha / r; rsLoRA means alpha / sqrt(r): B carries the ratio sqrt(r) = 2
    assert t["blk.0.attn_v.weight.lora_b"].dtype == np.float16
    assert np.allclose(t["blk.0.attn_v.weight.lora_b"], (b * math.sqrt(4)).numpy(), atol=2e-3)


def _fake_base(path, config, bad_shape=False, tied=False):
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", config.num_hidden_layers)
    w.add_uint32("llama.attention.head_count", config.num_attention_heads)
    w.add_uint32("llama.attention.head_count_kv", config.num_key_value_heads)
    h, kv = config.hidden_size, config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    w.add_tensor("token_embd.weight", np.zeros((config.vocab_size, h), np.float32))
    if not tied:  # a tied base has no output.weight: llama.cpp reuses token_embd for the output
        w.add_tensor("output.weight", np.zeros((config.vocab_size, h), np.float32))
    for i in range(config.num_hidden_layers):
        w.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((h, h + (8 if bad_shape else 0)), np.float32))
        w.add_tensor(f"blk.{i}.attn_k.weight", np.zeros((kv, h), np.float32))
        w.add_tensor(f"blk.{i}.attn_v.weight", np.zeros((kv, h), np.float32))
        w.add_tensor(f"blk.{i}.ffn_down.weight", np.zeros((h, config.intermediate_size), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_base_gguf_gives_heads_and_checks_shapes(tmp_path):
    pm, config, folder = _adapter(tmp_path)
    base = str(tmp_path / "base.gguf")
    _fake_base(base, config)
    a, b = str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")
    export_gguf(folder, a, base_gguf=base)
    export_gguf(folder, b, base_config=config)
    ta, tb = _read(a)[1], _read(b)[1]
    assert all(np.array_equal(ta[k], tb[k]) for k in tb)
    _fake_base(base, config, bad_shape=True)
    with pytest.raises(GGUFExportError, match="wrong base model"):
        export_gguf(folder, str(tmp_path / "c.gguf"), base_gguf=base)
    assert not os.path.exists(tmp_path / "c.gguf")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_unexportable_adapters_say_why(tmp_path):
    _, config, folder = _adapter(tmp_path, use_dora=True, target_modules=["q_proj"])
    with pytest.raises(GGUFExportError, match="DoRA"):
        export_gguf(folder, str(tmp_path / "d.gguf"), base_config=config)
    _, _, folder = _adapter(tmp_path, target_modules=["q_proj"])
    with pytest.raises(GGUFExportError, match="base_gguf"):
        export_gguf(folder, str(tmp_path / "e.gguf"))


def test_embedding_lora_refused_on_tied_output(tmp_path):
    # llama.cpp would apply token_embd's LoRA to the tied output matmul too and abort the process
    _, config, folder = _adapter(tmp_path, target_modules=["embed_tokens", "v_proj"])
    base = str(tmp_path / "base.gguf")
    _fake_base(base, config, tied=True)
    with pytest.raises(GGUFExportError, match="ties its output layer"):
        export_gguf(folder, str(tmp_path / "t.gguf"), base_gguf=base)
    tied_cfg = config.to_dict() | {"tie_word_embeddings": True}
    with pytest.raises(GGUFExportError, match="ties its output layer"):
        export_gguf(folder, str(tmp_path / "t.gguf"), base_config=tied_cfg)
    _, _, folder = _adapter(tmp_path, target_modules=["v_proj"])  # without embed_tokens it exports
    assert set(export_gguf(folder, str(tmp_path / "t.gguf"), base_gguf=base)["tensors"]) == {
        f"blk.{i}.attn_v.weight.lora_{ab}" for i in range(2) for ab in "ab"}
