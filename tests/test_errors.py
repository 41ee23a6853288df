"""Bad input gets a clear error, and nothing is lost or half-changed."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import TinyConvNet, inputs_for, output_of, tiny_gpt2, tiny_llama
from peftkit import CheckpointError, ConfigError, LoraConfig, PeftConfig, PeftModel, get_peft_model
from peftkit.core.method import UnsupportedSite
from peftkit.core.site import Site


def test_unknown_target_names_what_exists():
    with pytest.raises(ValueError) as e:
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["qkv"]))
    msg = str(e.value)
    assert "['qkv']" in msg and "q_proj" in msg and "down_proj" in msg


def test_unsupported_layer_type_names_type_and_supported():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(x)

    net = Net()
    with pytest.raises(UnsupportedSite) as e:
        get_peft_model(net, LoraConfig(target_modules=["norm"]))
    assert "LayerNorm" in str(e.value) and "nn.Linear" in str(e.value)
    assert isinstance(net.norm, torch.nn.LayerNorm)  # nothing left half-injected


def test_half_failed_injection_is_undone():
    net = TinyConvNet()
    net.conv2 = torch.nn.Conv2d(1, 4, 3, padding=1, groups=1)
    net.unfold = torch.nn.Unfold(2)
    net.bad = torch.nn.Conv1d(9, 9, 3, groups=3)  # rank 8 is no multiple of 3 groups
    with pytest.raises(ValueError, match="groups=3"):
        get_peft_model(net, LoraConfig(target_modules=["head", "conv1", "bad"]))
    assert not any(isinstance(m, Site) for m in net.modules())
    with pytest.raises(UnsupportedSite, match="Unfold"):
        get_peft_model(net, LoraConfig(target_modules=["head", "conv1", "unfold"]))
    assert not any(isinstance(m, Site) for m in net.modules())


def test_adapter_for_another_architecture(tmp_path):
    get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"])).save_pretrained(str(tmp_path))
    base = tiny_llama()
    with pytest.raises(ValueError, match="c_attn"):
        PeftModel.from_pretrained(base, str(tmp_path))
    assert not any(isinstance(m, Site) for m in base.modules())


def test_adapter_with_wrong_shapes_names_first_mismatch(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(tmp_path))
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(CheckpointError, match=r"shape \(4, 32\) but this model needs \(4, 64\)"):
        PeftModel.from_pretrained(wider, str(tmp_path))
    assert not any(isinstance(m, Site) for m in wider.modules())


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path))
    f = tmp_path / "adapter_model.safetensors"
    sd = load_file(f)
    first = sorted(sd)[0]
    save_file({k: v for k, v in sd.items() if k != first}, f)
    with pytest.raises(CheckpointError, match="missing tensor"):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    save_file({**sd, "base_model.model.model.nonsense.lora_A.weight": torch.zeros(1)}, f)
    with pytest.raises(CheckpointError, match="nonsense.*has no place"):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_corrupt_safetensors_leaves_model_untouched(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path / "a"))
    f = tmp_path / "a" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])  # truncated
    batch = inputs_for(tiny_llama())
    before = output_of(model, batch)
    adapters = dict(model.peft_config)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        model.load_adapter(str(tmp_path / "a"), "second")
    assert dict(model.peft_config) == adapters
    torch.testing.assert_close(output_of(model, batch), before)


def test_config_unknown_keys_warn_missing_or_wrong_types_error(tmp_path):
    good = LoraConfig(r=4, target_modules=["q_proj"]).to_dict()
    (tmp_path / "adapter_config.json").write_text(json.dumps({**good, "future_option": 3}))
    with pytest.warns(UserWarning, match="future_option"):
        cfg = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(cfg, LoraConfig) and cfg.r == 4
    (tmp_path / "adapter_config.json").write_text(json.dumps({k: v for k, v in good.items() if k != "peft_type"}))
    with pytest.raises(ConfigError, match="peft_type"):
        PeftConfig.from_pretrained(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({**good, "r": "eight"}))
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        PeftConfig.from_pretrained(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({**good, "lora_dropout": "x"}))
    with pytest.raises(ConfigError):
        PeftConfig.from_pretrained(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({**good, "layer_replication": [[0, 2]]}))
    with pytest.raises(ConfigError, match="layer_replication"):
        PeftConfig.from_pretrained(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PeftConfig.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        PeftConfig.from_pretrained(str(tmp_path / "nowhere"))
    for bad in (dict(r=0), dict(bias="some"), dict(init_lora_weights="magic"), dict(lora_dropout=1.5)):
        with pytest.raises(ConfigError):
            LoraConfig(**bad)


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path))
    good = (tmp_path / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    import peftkit.io.checkpoint as ck

    real_fsync = os.fsync

    def crash(fd):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ck.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(str(tmp_path))
    monkeypatch.setattr(ck.os, "fsync", real_fsync)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    PeftModel.from_pretrained(tiny_llama(), str(tmp_path))  # still loads


def test_legacy_bin_loads_weights_only(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "adapter_model.safetensors")
    os.remove(tmp_path / "adapter_model.safetensors")
    torch.save(sd, tmp_path / "adapter_model.bin")
    batch = inputs_for(tiny_llama())
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(output_of(loaded, batch), output_of(model, batch))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_save_load_identity_and_trainable_resume(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", use_dora=True,
                                                    init_lora_weights=False))
    batch = inputs_for(tiny_llama())
    ref = output_of(model, batch)
    model.save_pretrained(str(tmp_path))
    frozen = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(output_of(frozen, batch), ref, atol=0, rtol=0)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_already_wrapped_and_duplicate_names():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already a PeftModel"):
        get_peft_model(model, LoraConfig())
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="Unknown adapter"):
        model.set_adapter("missing")
    for reserved in ("__base__", "__packs__"):
        with pytest.raises(ValueError, match="reserved"):
            model.add_adapter(reserved, LoraConfig(r=2, target_modules=["v_proj"]))
    assert list(model.peft_config) == ["default"]


def test_mergeable_unmerge_of_merged_adapter_on_delete():
    base = tiny_llama()
    w = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.merge_adapter()
    with pytest.raises(ValueError, match="while they are merged"):  # PEFT refuses too; nothing changes
        model.delete_adapter("default")
    assert "default" in model.peft_config
    model.unmerge_adapter()
    model.delete_adapter("default")
    torch.testing.assert_close(base.model.layers[0].self_attn.q_proj.weight, w, atol=1e-6, rtol=0)
    assert isinstance(base.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_wrapped_model_moves_with_to_and_files_are_readable(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.to("cpu").to(torch.float64).to(torch.float32)  # nn.Module._apply must not be shadowed
    assert model.get_base_model().model.layers[0].self_attn.q_proj.deltas["default"].lora_A.dtype == torch.float32
    model.save_pretrained(str(tmp_path))
    umask = os.umask(0)
    os.umask(umask)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask  # as open() would make it
