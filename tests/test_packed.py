"""Packed adapters (peftkit/core/packed.py, issue 6): an inference load of a plain LoRA keeps its
weights in one flat tensor with a record per site, and no Delta module per site.

Every behaviour is checked against the same adapter loaded with ``packed=False`` (ordinary
modules), which the rest of the suite covers against the equations and against Hugging Face
PEFT.
"""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from conftest import VOCAB, tiny_gpt2, tiny_llama
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.core.inject import sites
from peftkit.core.packed import STORE_KEY, is_packed
from peftkit.io.checkpoint import load_tensors

TARGETS = ["q_proj", "v_proj", "down_proj"]


def save(tmp_path, name, seed, base, **kw):
    torch.manual_seed(seed)
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    cfg.update(kw)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    folder = str(tmp_path / name)
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def two(tmp_path):
    """A tiny Llama, two saved adapters (the second with another rank and dropout), and ids."""
    base = tiny_llama()
    a = save(tmp_path, "a", 1, base)
    b = save(tmp_path, "b", 2, base, r=6, lora_alpha=3, lora_dropout=0.3, use_rslora=True)
    ids = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(0))
    return base, a, b, ids


def load_both(base, a, b, packed):
    model = PeftModel.from_pretrained(copy.deepcopy(base), a, adapter_name="a", packed=packed)
    model.load_adapter(b, "b", packed=packed)
    return model


def module_count(model) -> int:
    return sum(len(list(site.deltas.modules_only())) for _, site in sites(model.base_model.model))


def test_packed_loads_keep_no_module_per_site(two):
    base, a, b, _ = two
    packed, plain = load_both(base, a, b, True), load_both(base, a, b, False)
    assert is_packed(packed.base_model, "a") and is_packed(packed.base_model, "b")
    assert module_count(packed) == 0 and module_count(plain) == 12  # 2 adapters x 3 targets x 2 layers
    for (_, s1), (_, s2) in zip(sites(packed.base_model.model), sites(plain.base_model.model)):
        assert sorted(s1.deltas) == sorted(s2.deltas) == ["a", "b"]
        assert len(s1.deltas) == 2 and "a" in s1.deltas and "zzz" not in s1.deltas
    assert packed.get_nb_trainable_parameters() == plain.get_nb_trainable_parameters()
    # state_dict lists packed adapters under the keys and values of unpacked ones, each key once
    keys = list(packed.state_dict())
    assert len(keys) == len(set(keys)) and keys == list(plain.state_dict())
    for k, v in plain.state_dict().items():
        assert torch.equal(packed.state_dict()[k], v), k
    assert not any("_into" in k or "_replace" in k or "__packs__" in k for k in keys)


def test_packed_state_dict_loads_both_ways(two):
    """model.load_state_dict writes through to the packed weights (and from packed to plain)."""
    base, a, b, ids = two
    packed, plain = load_both(base, a, b, True), load_both(base, a, b, False)
    sd = {k: v + 0.01 if ".deltas." in k else v for k, v in plain.state_dict().items()}
    packed.load_state_dict(sd)
    plain.load_state_dict(sd)
    assert is_packed(packed.base_model, "a")
    with torch.no_grad():
        torch.testing.assert_close(packed.eval()(ids).logits, plain.eval()(ids).logits, rtol=0, atol=0)
    missing = {k: v for k, v in sd.items() if ".deltas.a." not in k}
    with pytest.raises(RuntimeError, match="Missing key"):
        packed.load_state_dict(missing)
    fresh = load_both(base, a, b, False)
    fresh.load_state_dict(packed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids).logits, plain(ids).logits, rtol=0, atol=0)


def test_packed_outputs_equal_modules_everywhere(two):
    base, a, b, ids = two
    packed, plain = load_both(base, a, b, True), load_both(base, a, b, False)
    for m in (packed, plain):
        m.eval()

    def outputs(m):
        out = []
        with torch.no_grad():
            for active in ("a", "b", ["a", "b"]):
                m.set_adapter(active)
                out.append(m(ids).logits)
            out.append(m(ids, adapter_names=["a", "b", "__base__", "b"]).logits)
            out.append(m.generate(input_ids=ids[:3, :4], adapter_names=["b", "a", "b"], max_new_tokens=4,
                                  do_sample=False, pad_token_id=0))
            m.set_adapter("b")
            m.merge_adapter()
            out.append(m(ids).logits)
            m.unmerge_adapter()
            out.append(m(ids).logits)
            m.train()  # frozen adapters still apply their dropout in training mode, as in PEFT
            torch.manual_seed(5)
            out.append(m(ids).logits)
            m.eval()
        return out

    for x, y in zip(outputs(packed), outputs(plain)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert module_count(packed) == 0


def test_save_merge_and_unload_from_packed(two, tmp_path):
    base, a, b, ids = two
    packed, plain = load_both(base, a, b, True), load_both(base, a, b, False)
    packed.save_pretrained(str(tmp_path / "again"), selected_adapters=["b"])
    for k, v in load_tensors(b).items():
        assert torch.equal(load_tensors(str(tmp_path / "again" / "b"))[k], v)
    packed.set_adapter("b")
    plain.set_adapter("b")
    with torch.no_grad():
        m1 = packed.merge_and_unload().eval()(ids).logits
        m2 = plain.merge_and_unload().eval()(ids).logits
    torch.testing.assert_close(m1, m2, rtol=0, atol=0)


def test_delete_frees_the_flat_tensor_and_restores_modules(two):
    base, a, b, _ = two
    model = load_both(base, a, b, True)
    store = model.base_model._pack_store
    ref = weakref.ref(store.flat("b").untyped_storage())
    model.delete_adapter("b")
    gc.collect()
    assert ref() is None and list(store.packs) == ["a"]
    assert all(site.deltas.npacked == 1 for _, site in sites(model.base_model.model))
    model.delete_adapter("a")
    assert not list(sites(model.base_model.model))  # the original layers are back
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_dtype_and_train_mode_follow_the_model(two):
    base, a, b, ids = two
    packed, plain = load_both(base, a, b, True), load_both(base, a, b, False)
    packed.to(torch.float64)
    plain.to(torch.float64)
    assert packed.base_model._pack_store.flat("a").dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(packed.eval()(ids).logits, plain.eval()(ids).logits, rtol=0, atol=0)
    site = packed.base_model.model.model.layers[0].self_attn.q_proj
    active = site.deltas[site.active[0]]
    packed.train()
    assert active.training and site.deltas[site.active[0]] is active  # one stable Delta while in use
    packed.eval()
    assert not active.training


@pytest.mark.parametrize("kw", [dict(is_trainable=True), dict(packed=False)])
def test_trainable_or_opted_out_loads_keep_modules(two, kw):
    base, a, _, _ = two
    model = PeftModel.from_pretrained(copy.deepcopy(base), a, **kw)
    assert not is_packed(model.base_model, "default") and module_count(model) == 6


@pytest.mark.parametrize("make, extra", [
    (tiny_llama, dict(use_dora=True)), (tiny_llama, dict(modules_to_save=["lm_head"])),
    (tiny_llama, dict(target_modules=["q_proj", "embed_tokens"])),
    (tiny_gpt2, dict(target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only")),
])
def test_what_cannot_be_packed_stays_modules(tmp_path, make, extra):
    base = make()
    folder = save(tmp_path, "x", 3, base, **extra)
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    assert not is_packed(model.base_model, "default")
    assert module_count(model) > 0


def test_gpt2_conv1d_packs_and_matches(tmp_path):
    base = tiny_gpt2()
    folder = save(tmp_path, "g", 4, base, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    packed = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    plain = PeftModel.from_pretrained(copy.deepcopy(base), folder, packed=False).eval()
    assert is_packed(packed.base_model, "default")
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, plain(ids).logits, rtol=0, atol=0)


def test_hotswap_writes_into_packed_weights_and_padding_unpacks(two):
    from peftkit.methods.lora.hotswap import prepare_for_hotswap

    base, a, b, ids = two
    model = PeftModel.from_pretrained(copy.deepcopy(base), a).eval()
    flat = model.base_model._pack_store.flat("default")
    ptr = flat.data_ptr()
    other = PeftModel.from_pretrained(copy.deepcopy(base), a.replace("/a", "/b")).eval()
    model.hotswap_adapter(a)  # same weights: a no-op, but through the packed views
    assert model.base_model._pack_store.flat("default").data_ptr() == ptr
    prepare_for_hotswap(model, target_rank=8)
    assert not is_packed(model.base_model, "default") and module_count(model) == 6
    model.hotswap_adapter(b)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, other(ids).logits)


def test_gating_a_packed_adapter_unpacks_it(two):
    from peftkit.methods.gates import add_gates

    base, a, _, ids = two
    model = PeftModel.from_pretrained(copy.deepcopy(base), a).eval()
    with torch.no_grad():
        before = model(ids).logits
    assert add_gates(model, "default") == 6
    assert not is_packed(model.base_model, "default")
    with torch.no_grad():
        model(ids)  # runs; the gates' own equations are tested in test_methods_hybrid.py
    assert before.shape == model(ids).logits.shape


def test_per_site_memory_does_not_grow_with_packed_adapters(tmp_path):
    """Loading more packed adapters adds Python objects per adapter, none per site."""
    base = tiny_llama(num_hidden_layers=8)
    folder = save(tmp_path, "m", 5, base, target_modules="all-linear")
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder, adapter_name="a0")
    n_sites = len(list(sites(model.base_model.model)))
    assert n_sites == 56
    for k in range(1, 4):
        model.load_adapter(folder, f"a{k}")
    gc.collect()
    before = len(gc.get_objects())
    for k in range(4, 14):
        model.load_adapter(folder, f"a{k}")
    gc.collect()
    per_adapter = (len(gc.get_objects()) - before) / 10
    assert per_adapter < n_sites / 2, per_adapter
    for _, site in sites(model.base_model.model):
        assert list(site.deltas._modules) == [STORE_KEY] and len(site.deltas._views) == 1  # the active one


def test_deepcopy_keeps_one_store_per_copy(two):
    base, a, b, ids = two
    model = load_both(base, a, b, True).eval()
    twin = copy.deepcopy(model)
    store = twin.base_model._pack_store
    assert store is not model.base_model._pack_store
    assert all(site.deltas._modules[STORE_KEY] is store for _, site in sites(twin.base_model.model))
    assert store.flat("a").data_ptr() != model.base_model._pack_store.flat("a").data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, model(ids).logits, rtol=0, atol=0)
        twin.delete_adapter("a")
        model(ids)  # the original keeps both adapters
    assert sorted(model.peft_config) == ["a", "b"]
