"""The saved-config contract of Hugging Face PEFT 0.21, checked against files the real ``peft`` writes:
``all-linear`` written as the module paths it matched, ``peft_version``, ``auto_mapping``,
``peft_type``/``task_type`` in memory, ``safe_serialization=False`` (adapter_model.bin) and the
model card (README.md)."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from torch import nn

import peftkit
from conftest import inputs_for, output_of, perturb, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
yaml = pytest.importorskip("yaml")

LIBS = (peft, peftkit)


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def _saved_config(folder) -> dict:
    with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _wrapped(lib, model, config_name="LoraConfig", **kw):
    return _quiet(lib.get_peft_model, model, getattr(lib, config_name)(**kw))


def _comparable(d: dict) -> dict:
    """A saved config with PEFT's unordered lists (written from sets) sorted."""
    return {k: sorted(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else v for k, v in d.items()}


# ----- all-linear ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [tiny_llama, tiny_gpt2])
def test_all_linear_is_written_as_the_module_paths_peft_writes(family, tmp_path):
    written = {}
    for lib in LIBS:
        model = _wrapped(lib, family(), target_modules="all-linear", task_type="CAUSAL_LM")
        model.save_pretrained(str(tmp_path / lib.__name__))
        written[lib] = _saved_config(str(tmp_path / lib.__name__))["target_modules"]
    assert isinstance(written[peftkit], list) and written[peftkit] == sorted(written[peftkit])
    assert set(written[peftkit]) == set(written[peft])
    assert all("." in name for name in written[peftkit])  # full paths, not the shorthand
    # each library loads the other's file onto the same layers, with the same outputs
    batch = inputs_for(family())
    for writer, reader in ((peft, peftkit), (peftkit, peft)):
        model = _wrapped(writer, family(), target_modules="all-linear", task_type="CAUSAL_LM")
        perturb(model)
        folder = str(tmp_path / f"{writer.__name__}_perturbed")
        model.save_pretrained(folder)
        loaded = _quiet(reader.PeftModel.from_pretrained, family(), folder)
        with torch.no_grad():
            torch.testing.assert_close(output_of(loaded, batch), output_of(model, batch), rtol=0, atol=1e-5)


def test_all_linear_with_exclusions_lists_only_the_adapted_layers(tmp_path):
    """peftkit lists the layers that hold the adapter; PEFT lists every linear layer and lets
    exclude_modules drop some again on load. Both files select the same layers."""
    kw = dict(target_modules="all-linear", exclude_modules=["k_proj", "down_proj"], task_type="CAUSAL_LM")
    paths = {}
    for lib in LIBS:
        model = _wrapped(lib, tiny_llama(), **kw)
        folder = str(tmp_path / lib.__name__)
        model.save_pretrained(folder)
        paths[lib] = set(_saved_config(folder)["target_modules"])
    assert paths[peftkit] < paths[peft]
    assert not any(p.endswith(("k_proj", "down_proj")) for p in paths[peftkit])
    for writer in LIBS:  # both readers adapt the same layers from both files
        adapted = []
        for reader in LIBS:
            loaded = _quiet(reader.PeftModel.from_pretrained, tiny_llama(), str(tmp_path / writer.__name__))
            keys = (peft.get_peft_model_state_dict(loaded) if reader is peft else loaded.get_adapter_state_dict())
            adapted.append({k.rsplit(".lora_", 1)[0] for k in keys})
        assert adapted[0] == adapted[1] == {"base_model.model." + p for p in paths[peftkit]}


def test_a_loaded_all_linear_file_keeps_its_paths(tmp_path):
    _wrapped(peft, tiny_llama(), target_modules="all-linear").save_pretrained(str(tmp_path))
    cfg = peftkit.PeftConfig.from_pretrained(str(tmp_path))
    assert sorted(cfg.target_modules) == sorted(_saved_config(str(tmp_path))["target_modules"])


# ----- peft_version, auto_mapping, whole files ---------------------------------------------------
def test_peft_version_is_the_peft_format_written(tmp_path):
    for lib in LIBS:
        _wrapped(lib, tiny_llama(), target_modules=["q_proj"]).save_pretrained(str(tmp_path / lib.__name__))
    ours, theirs = (_saved_config(str(tmp_path / lib.__name__))["peft_version"] for lib in (peftkit, peft))
    assert ours == theirs == peft.__version__ == peftkit.config.PEFT_FORMAT_VERSION
    assert peftkit.LoraConfig().peft_version == peft.LoraConfig().peft_version


def test_a_files_peft_version_is_kept_on_reload_as_peft_keeps_it(tmp_path):
    _wrapped(peftkit, tiny_llama(), target_modules=["q_proj"]).save_pretrained(str(tmp_path / "a"))
    data = _saved_config(str(tmp_path / "a"))
    data["peft_version"] = "0.17.0"
    with open(tmp_path / "a" / "adapter_config.json", "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    for lib in LIBS:
        model = _quiet(lib.PeftModel.from_pretrained, tiny_llama(), str(tmp_path / "a"))
        assert model.peft_config["default"].peft_version == "0.17.0"
        model.save_pretrained(str(tmp_path / lib.__name__))
        assert _saved_config(str(tmp_path / lib.__name__))["peft_version"] == "0.17.0"


def test_auto_mapping_is_written_for_adapters_without_a_task_type(tmp_path):
    from transformers import LlamaConfig, LlamaModel

    def bare():
        torch.manual_seed(0)
        return LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128))

    got = {}
    for lib in LIBS:
        for task in (None, "FEATURE_EXTRACTION"):
            folder = str(tmp_path / f"{lib.__name__}{task}")
            _wrapped(lib, bare(), target_modules=["q_proj"], task_type=task).save_pretrained(folder)
            got[lib, task] = _saved_config(folder)["auto_mapping"]
    assert got[peftkit, None] == got[peft, None] == {"base_model_class": "LlamaModel",
                                                      "parent_library": "transformers.models.llama.modeling_llama"}
    assert got[peftkit, "FEATURE_EXTRACTION"] is None and got[peft, "FEATURE_EXTRACTION"] is None


METHOD_CONFIGS = {
    "IA3Config": dict(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "LoHaConfig": dict(target_modules=["q_proj"], r=4, alpha=8, use_effective_conv2d=True),
    "LoKrConfig": dict(target_modules=["q_proj"], r=2, decompose_both=True),
    "VeraConfig": dict(target_modules=["q_proj", "v_proj"], r=4),
    "PromptTuningConfig": dict(num_virtual_tokens=3),
}


@pytest.mark.parametrize("config_name", list(METHOD_CONFIGS))
def test_saved_config_equals_the_file_peft_writes(config_name, tmp_path):
    files = {}
    for lib in LIBS:
        model = _wrapped(lib, tiny_llama(), config_name, task_type="CAUSAL_LM", **METHOD_CONFIGS[config_name])
        model.save_pretrained(str(tmp_path / lib.__name__))
        files[lib] = _comparable(_saved_config(str(tmp_path / lib.__name__)))
    assert files[peftkit] == files[peft]


def test_lora_config_writes_peft_values_for_every_field_it_writes(tmp_path):
    """LoRA: every key peftkit writes is PEFT's with PEFT's value (PEFT has more LoRA fields)."""
    files = {}
    for lib in LIBS:
        model = _wrapped(lib, tiny_llama(), target_modules="all-linear", r=4, task_type="CAUSAL_LM")
        model.save_pretrained(str(tmp_path / lib.__name__))
        files[lib] = _comparable(_saved_config(str(tmp_path / lib.__name__)))
    assert set(files[peftkit]) <= set(files[peft])
    assert {k: files[peft][k] for k in files[peftkit]} == files[peftkit]


# ----- peft_type / task_type in memory -------------------------------------------------------------
@pytest.mark.parametrize("config_name", ["LoraConfig", *METHOD_CONFIGS])
def test_peft_type_is_an_enum_member_also_after_loading(config_name, tmp_path):
    got = {}
    for lib in LIBS:
        cfg = getattr(lib, config_name)(task_type="CAUSAL_LM", **METHOD_CONFIGS.get(config_name, {}))
        model = _wrapped(lib, tiny_llama(), config_name, task_type="CAUSAL_LM", **METHOD_CONFIGS.get(config_name, {}))
        model.save_pretrained(str(tmp_path / lib.__name__))
        loaded = lib.PeftConfig.from_pretrained(str(tmp_path / lib.__name__))
        reloaded = _quiet(lib.PeftModel.from_pretrained, tiny_llama(), str(tmp_path / lib.__name__))
        for c in (cfg, loaded, reloaded.peft_config["default"]):
            assert isinstance(c.peft_type, lib.PeftType) and c.peft_type == c.peft_type.value
        got[lib] = (cfg.peft_type.value, loaded.peft_type.value, type(loaded.task_type).__name__,
                    _saved_config(str(tmp_path / lib.__name__))["peft_type"])
    assert got[peftkit] == got[peft]


def test_task_type_keeps_what_was_given_as_peft_does():
    for given in ("CAUSAL_LM", "TaskType"):
        kinds = []
        for lib in LIBS:
            task = lib.TaskType.CAUSAL_LM if given == "TaskType" else given
            c = lib.LoraConfig(task_type=task)
            kinds.append((type(c.task_type).__name__, c.task_type == "CAUSAL_LM", json.dumps(c.to_dict()["task_type"])))
        assert kinds[0] == kinds[1]
    assert f"{peftkit.PeftType.LORA}" == str(peftkit.PeftType.LORA) == "LORA"  # PEFT: "PeftType.LORA"
    assert peftkit.PeftType.LORA.value == "LORA" and {"LORA": 1}[peftkit.PeftType.LORA] == 1


# ----- safe_serialization=False --------------------------------------------------------------------
def test_safe_serialization_false_writes_adapter_model_bin_both_ways(tmp_path):
    batch = inputs_for(tiny_llama())
    ours = _wrapped(peftkit, tiny_llama(), target_modules=["q_proj", "v_proj"])
    perturb(ours)
    with torch.no_grad():
        want = output_of(ours, batch)
    folder = str(tmp_path / "ours")
    ours.save_pretrained(folder, safe_serialization=False)
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    tensors = torch.load(os.path.join(folder, "adapter_model.bin"), weights_only=True)
    assert tensors.keys() == ours.get_adapter_state_dict().keys()
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors.values())
    for lib in LIBS:
        loaded = _quiet(lib.PeftModel.from_pretrained, tiny_llama(), folder)
        with torch.no_grad():
            torch.testing.assert_close(output_of(loaded, batch), want, rtol=0, atol=1e-5)
    theirs = _wrapped(peft, tiny_llama(), target_modules=["q_proj", "v_proj"])
    perturb(theirs)
    theirs.save_pretrained(str(tmp_path / "theirs"), safe_serialization=False)
    assert "adapter_model.bin" in os.listdir(tmp_path / "theirs")
    loaded = peftkit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "theirs"))
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, batch), output_of(theirs, batch), rtol=0, atol=1e-5)


def test_switching_format_removes_the_stale_weights_file(tmp_path):
    """A stale adapter_model.safetensors beside a new .bin would be read first (by both libraries)."""
    batch = inputs_for(tiny_llama())
    model = _wrapped(peftkit, tiny_llama(), target_modules=["q_proj"])
    model.save_pretrained(str(tmp_path))
    perturb(model)
    model.save_pretrained(str(tmp_path), safe_serialization=False)
    assert "adapter_model.safetensors" not in os.listdir(tmp_path)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    loaded = peftkit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, batch), output_of(model, batch), rtol=0, atol=1e-6)
    model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


# ----- the model card ---------------------------------------------------------------------------
def _card(folder):
    text = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("kind", ["causal_named", "causal_unnamed", "ia3", "plain"])
def test_model_card_front_matter_equals_peft(kind, tmp_path):
    cards = {}
    for lib in LIBS:
        if kind == "plain":
            model = _wrapped(lib, Plain(), target_modules=["lin"])
        else:
            base = tiny_llama()
            if kind != "causal_unnamed":
                base.config._name_or_path = base.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
                base.model_tags = ["sft"]
            name, kw = ("IA3Config", dict(feedforward_modules=[])) if kind == "ia3" else ("LoraConfig", {})
            model = _wrapped(lib, base, name, target_modules=["q_proj"], task_type="CAUSAL_LM", **kw)
        model.save_pretrained(str(tmp_path / lib.__name__))
        cards[lib] = _card(str(tmp_path / lib.__name__))
    assert cards[peftkit][0] == cards[peft][0]
    assert cards[peftkit][0]["library_name"] == "peft"
    ours, theirs = (cards[lib][1].splitlines() for lib in (peftkit, peft))
    assert ours[-1] == f"- peftkit {peftkit.__version__} (PEFT {peft.__version__} format)"
    assert ours[:-1] == theirs[:-1] and theirs[-1] == f"- PEFT {peft.__version__}"


def test_model_card_keeps_an_existing_readme_as_peft_does(tmp_path):
    readme = "---\nlicense: apache-2.0\ntags:\n- mine\n---\n\n# My adapter\n\nTrained on my data.\n"
    cards = {}
    for lib in LIBS:
        folder = tmp_path / lib.__name__
        folder.mkdir()
        (folder / "README.md").write_text(readme, encoding="utf-8")
        model = _wrapped(lib, tiny_llama(), target_modules=["q_proj"], task_type="CAUSAL_LM")
        model.save_pretrained(str(folder))
        model.save_pretrained(str(folder))  # a second save adds nothing more
        cards[lib] = _card(str(folder))
    assert cards[peftkit][0] == cards[peft][0]
    assert cards[peftkit][0]["license"] == "apache-2.0"
    ours, theirs = (cards[lib][1] for lib in (peftkit, peft))
    assert "# My adapter\n\nTrained on my data." in ours
    assert ours.count("### Framework versions") == 1 and ours.count("- peftkit ") == 1
    assert ours.replace(f"- peftkit {peftkit.__version__} (PEFT {peft.__version__} format)",
                        f"- PEFT {peft.__version__}") == theirs


def test_no_model_card_from_other_processes(tmp_path):
    model = _wrapped(peftkit, tiny_llama(), target_modules=["q_proj"])
    model.save_pretrained(str(tmp_path), is_main_process=False)
    assert not (tmp_path / "README.md").exists()
