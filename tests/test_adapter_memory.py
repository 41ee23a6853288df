"""Memory of loaded adapters: one buffer per adapter file, slim Deltas (issue 6).

A loaded adapter's parameters live in the one buffer its file was read into: views of one
storage when it is loaded for inference, slices with storages of their own when it may train.
These tests check that layout, that it trains, saves, reloads, converts and frees, and that the
Deltas' lazily created nn.Module hook containers behave like nn.Module's own.
"""
from __future__ import annotations

import copy
import gc
import json
import os
import struct
import weakref

import pytest
import torch

from conftest import VOCAB, tiny_llama
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.core.inject import sites
from peftkit.core.method import Delta
from peftkit.io.checkpoint import WEIGHTS_NAME, CheckpointError, load_tensors
from peftkit.methods.lora.delta import LoraLinear

TARGETS = ["q_proj", "v_proj", "down_proj"]


def saved_adapter(tmp_path, name="a", seed=1):
    """A random (non-identity) LoRA saved to ``tmp_path/name``; returns (folder, base, ids, logits)."""
    base = tiny_llama()
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    folder = str(tmp_path / name)
    model.save_pretrained(folder)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.eval()(ids).logits
    return folder, base, ids, out


def adapter_params(model, name):
    """Adapter ``name``'s tensors at every site: its parameters, or for a packed adapter (an
    inference load, core/packed.py) the views of its packed weights."""
    return [t for _, site in sites(model.base_model.model) if name in site.deltas
            for t in site.deltas[name].state_dict(keep_vars=True).values()]


def assert_one_allocation(params):
    """The parameters tile one contiguous block of memory: separate allocations never touch
    (each malloc chunk carries a header), so exact adjacency means one buffer."""
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in params)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start == end
    return spans[0][0], spans[-1][1]


@pytest.mark.parametrize("packed", [True, False])
def test_frozen_load_is_views_of_one_storage(tmp_path, packed):
    folder, base, ids, out = saved_adapter(tmp_path)
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder, adapter_name="x", packed=packed).eval()
    model.load_adapter(folder, "y", packed=packed)
    site = model.base_model.model.model.layers[0].self_attn.q_proj
    assert sorted(k for k, _ in site.deltas.modules_only()) == ([] if packed else ["x", "y"])
    for name in ("x", "y"):
        params = adapter_params(model, name)
        assert len(params) == 2 * 3 * 2  # A and B at 3 targets in 2 layers
        storages = {p.untyped_storage().data_ptr() for p in params}
        assert len(storages) == 1
        nbytes = sum(p.numel() * p.element_size() for p in params)
        assert params[0].untyped_storage().nbytes() == nbytes  # nothing else kept in the buffer
        assert not any(p.requires_grad for p in params)
    assert {p.untyped_storage().data_ptr() for p in adapter_params(model, "x")} != \
           {p.untyped_storage().data_ptr() for p in adapter_params(model, "y")}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, out)
        model.set_adapter("y")
        torch.testing.assert_close(model(ids).logits, out)


def test_trainable_load_trains_saves_and_reloads(tmp_path):
    from safetensors.torch import save_file

    folder, base, ids, out = saved_adapter(tmp_path)
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True)
    params = adapter_params(model, "default")
    assert params and all(p.requires_grad for p in params)
    # one allocation, but a storage per parameter, so any tool can save them
    assert_one_allocation(params)
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        model.train()(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert_one_allocation(params)  # the optimizer updated the buffer in place
    with torch.no_grad():
        trained = model.eval()(ids).logits
    assert not torch.allclose(trained, out)
    model.save_pretrained(str(tmp_path / "trained"))
    save_file(model.get_adapter_state_dict(), str(tmp_path / "plain.safetensors"))
    again = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "trained")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, trained, rtol=0, atol=0)


def test_saving_a_frozen_load_writes_each_tensor(tmp_path):
    folder, base, ids, out = saved_adapter(tmp_path)
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    model.save_pretrained(str(tmp_path / "copy"))
    first, second = load_tensors(folder), load_tensors(str(tmp_path / "copy"))
    assert sorted(first) == sorted(second)
    for k in first:
        assert torch.equal(first[k], second[k])


def test_hotswap_into_a_frozen_load_copies_in_place(tmp_path):
    folder, base, ids, _ = saved_adapter(tmp_path, "a", seed=1)
    other, _, _, other_out = saved_adapter(tmp_path, "b", seed=2)
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    params = adapter_params(model, "default")
    ptrs = [p.data_ptr() for p in params]
    model.hotswap_adapter(other)
    assert [p.data_ptr() for p in params] == ptrs
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, other_out)


def test_delete_adapter_frees_its_buffer(tmp_path):
    folder, base, _, _ = saved_adapter(tmp_path)
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder, adapter_name="keep")
    refs = {}
    for name, trainable in (("frozen", False), ("trainable", True)):
        model.load_adapter(folder, name, is_trainable=trainable)
        # a storage's Python object lives exactly as long as the storage (torch preserves it)
        refs[name] = [weakref.ref(p.untyped_storage()) for p in adapter_params(model, name)]
        gc.collect()
        assert all(r() is not None for r in refs[name])
    for name in ("frozen", "trainable"):
        model.delete_adapter(name)
        gc.collect()
        assert all(r() is None for r in refs[name]), name
    assert adapter_params(model, "keep")


def test_dtype_conversion_at_load_packs_one_buffer(tmp_path):
    """A file in fp16 loaded into an fp32 adapter: cast once into one fp32 buffer."""
    from safetensors.torch import save_file

    folder, base, ids, _ = saved_adapter(tmp_path)
    half = {k: v.to(torch.float16) for k, v in load_tensors(folder).items()}
    save_file(half, os.path.join(folder, WEIGHTS_NAME))
    for trainable in (False, True):
        model = PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=trainable)
        params = adapter_params(model, "default")
        assert all(p.dtype == torch.float32 for p in params)
        if trainable:
            assert_one_allocation(params)
        else:
            assert len({p.untyped_storage().data_ptr() for p in params}) == 1
        sd = model.get_adapter_state_dict()
        for k, v in half.items():
            assert torch.equal(sd[k], v.float())


def test_model_to_after_load(tmp_path):
    folder, base, ids, out = saved_adapter(tmp_path)
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in adapter_params(model, "default"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), out, atol=1e-4, rtol=1e-4)


def test_legacy_bin_is_packed_into_one_buffer(tmp_path):
    folder, base, ids, out = saved_adapter(tmp_path)
    tensors = load_tensors(folder)
    os.remove(os.path.join(folder, WEIGHTS_NAME))
    torch.save({k: v.clone() for k, v in tensors.items()}, os.path.join(folder, "adapter_model.bin"))
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    assert len({p.untyped_storage().data_ptr() for p in adapter_params(model, "default")}) == 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, out)


def write_safetensors(path, entries, pad=0):
    """A safetensors file by hand: ``entries`` is [(name, dtype name, shape, raw bytes)], laid
    out in order with no alignment (the format allows it; the reference writer aligns)."""
    header, payload = {}, b""
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(payload), len(payload) + len(raw)]}
        payload += raw
    text = json.dumps(header).encode() + b" " * pad
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text + payload)


def test_reader_handles_unaligned_tensors(tmp_path):
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.tensor([1.5, -2.0], dtype=torch.float16)
    entries = [("flag", "U8", [1], b"\x07"), ("a", "F32", [2, 3], a.numpy().tobytes()),
               ("b", "F16", [2], b.numpy().tobytes()), ("s", "I64", [], struct.pack("<q", -3))]
    write_safetensors(tmp_path / WEIGHTS_NAME, entries)
    got = load_tensors(str(tmp_path))
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
    assert got["flag"].tolist() == [7] and got["s"].item() == -3 and got["s"].shape == ()


@pytest.mark.parametrize("damage", ["truncated", "gap", "size", "header"])
def test_reader_rejects_broken_files(tmp_path, damage):
    raw = torch.ones(4).numpy().tobytes()
    path = tmp_path / WEIGHTS_NAME
    if damage == "gap":
        write_safetensors(path, [("a", "F32", [4], raw)])
        data = path.read_bytes()
        path.write_bytes(data + b"\0\0\0\0")  # payload longer than its tensors
    elif damage == "size":
        write_safetensors(path, [("a", "F32", [5], raw)])
    elif damage == "header":
        path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    else:
        write_safetensors(path, [("a", "F32", [4], raw)])
        path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_tensors(str(tmp_path))


def make_delta():
    return LoraLinear(6, 5, r=2, alpha=2, dropout=0.0, use_rslora=False, use_dora=False)


def test_deltas_get_hook_containers_only_when_used():
    a, b = make_delta(), make_delta()
    assert "_forward_hooks" not in a.__dict__ and not a._forward_hooks
    x, y = torch.randn(3, 6), torch.zeros(3, 5)
    seen = []
    handle = a.register_forward_hook(lambda mod, args, out: seen.append(mod))
    a.register_forward_pre_hook(lambda mod, args: seen.append("pre"))
    a(x, y.clone(), None)
    b(x, y.clone(), None)
    assert seen == ["pre", a]
    assert "_forward_hooks" in a.__dict__ and "_forward_hooks" not in b.__dict__
    assert not Delta._forward_hooks and not b._forward_hooks
    handle.remove()
    a(x, y.clone(), None)
    assert seen == ["pre", a, "pre"]
    # backward hooks, state_dict hooks and buffers work as on any nn.Module
    grads = []
    b.register_full_backward_hook(lambda mod, gin, gout: grads.append(gout[0].shape))
    b(x, torch.zeros(3, 5, requires_grad=True), None).sum().backward()
    assert grads == [(3, 5)]
    b.register_state_dict_post_hook(lambda mod, sd, prefix, local: sd.__setitem__(prefix + "extra", torch.ones(1)))
    b.register_buffer("scratch", torch.zeros(2), persistent=False)
    assert sorted(b.state_dict()) == ["extra", "lora_A", "lora_B"]
    assert sorted(make_delta().state_dict()) == ["lora_A", "lora_B"]
    # writing to a shared container directly is refused, never shared between Deltas
    with pytest.raises(TypeError, match="shared empty hook container"):
        make_delta()._forward_hooks[0] = print
    c = copy.deepcopy(a)
    assert c(x, y.clone(), None).shape == (3, 5)
    assert seen[-1] == "pre"
