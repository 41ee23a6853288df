"""PEFT's everyday top-level API (state dicts, load_peft_weights, inject_adapter_in_model, AutoPeftModel*),
checked against the real ``peft`` package on tiny local models."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from conftest import inputs_for, output_of, perturb, tiny_llama
import peftkit
from peftkit.io.checkpoint import CheckpointError

peft = pytest.importorskip("peft")

NAMES = ["get_peft_model_state_dict", "set_peft_model_state_dict", "load_peft_weights", "inject_adapter_in_model",
         "prepare_model_for_kbit_training", "AutoPeftModel", "AutoPeftModelForCausalLM",
         "AutoPeftModelForSequenceClassification", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForTokenClassification",
         "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction", "PromptTuningInit"]

LORA_CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "bias_all": dict(r=2, lora_alpha=4, target_modules=["o_proj"], bias="all"),
}
MODEL_KW = {"bias_all": dict(attention_bias=True)}  # biases to train


def _assert_same_dict(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k].to(ours[k].dtype)), k


def test_every_name_is_exported():
    missing = [n for n in NAMES if not hasattr(peftkit, n)]
    assert not missing
    assert set(NAMES) <= set(peftkit.__all__)
    assert peftkit.prepare_model_for_kbit_training is peftkit.quant.prepare_model_for_kbit_training
    assert peftkit.PromptTuningInit("TEXT") is peftkit.PromptTuningInit.TEXT


# ----- get / set state dict ---------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_state_dict_round_trip_matches_peft(case, tmp_path):
    kw, mkw = LORA_CASES[case], MODEL_KW.get(case, {})
    batch = inputs_for(tiny_llama())
    theirs = peft.get_peft_model(tiny_llama(**mkw), peft.LoraConfig(**kw)).eval()
    perturb(theirs)
    sd = peft.get_peft_model_state_dict(theirs)
    ours = peftkit.get_peft_model(tiny_llama(**mkw), peftkit.LoraConfig(**kw)).eval()
    before = output_of(ours, batch)
    result = peftkit.set_peft_model_state_dict(ours, sd)
    assert result.unexpected_keys == []
    assert all(".deltas." not in k for k in result.missing_keys)  # only base weights are "missing"
    assert any(k.endswith("proj.base_layer.weight") for k in result.missing_keys)
    expected = output_of(theirs, batch)
    assert not torch.allclose(before, expected, atol=1e-4)
    torch.testing.assert_close(output_of(ours, batch), expected, atol=1e-5, rtol=0)
    got = peftkit.get_peft_model_state_dict(ours)
    _assert_same_dict(got, sd)
    # exactly what save_pretrained writes
    ours.save_pretrained(str(tmp_path))
    _assert_same_dict(got, peftkit.load_peft_weights(str(tmp_path), device="cpu"))


def test_state_dict_prompt_tuning_matches_peft():
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=4)
    batch = inputs_for(tiny_llama())
    theirs = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(**kw)).eval()
    perturb(theirs)
    sd = peft.get_peft_model_state_dict(theirs)
    assert list(sd) == ["prompt_embeddings"]
    ours = peftkit.get_peft_model(tiny_llama(), peftkit.PromptTuningConfig(**kw)).eval()
    assert not torch.equal(peftkit.get_peft_model_state_dict(ours)["prompt_embeddings"], sd["prompt_embeddings"])
    peftkit.set_peft_model_state_dict(ours, sd)
    _assert_same_dict(peftkit.get_peft_model_state_dict(ours), sd)
    torch.testing.assert_close(output_of(ours, batch), output_of(theirs, batch), atol=1e-5, rtol=0)


def test_other_adapter_name_and_given_state_dict():
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj"])
    ours = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(**cfg))
    ours.add_adapter("second", peftkit.LoraConfig(**cfg, init_lora_weights=False))
    second = peftkit.get_peft_model_state_dict(ours, adapter_name="second")
    default = peftkit.get_peft_model_state_dict(ours)
    assert sorted(second) == sorted(default)
    assert not torch.equal(second[sorted(second)[1]], default[sorted(default)[1]])  # lora_B: random vs zeros
    # loading "second"'s tensors under another name, as PEFT allows
    peftkit.set_peft_model_state_dict(ours, second, adapter_name="default")
    _assert_same_dict(peftkit.get_peft_model_state_dict(ours), second)
    # values come from a state dict passed in (as gathered by DeepSpeed/FSDP), looked up by the model's own keys
    shifted = {k: v + 1 for k, v in ours.state_dict().items()}
    got = peftkit.get_peft_model_state_dict(ours, state_dict=shifted)
    _assert_same_dict(got, {k: v + 1 for k, v in second.items()})  # "default" now holds second's values


# ----- bad input ---------------------------------------------------------------------------
def _lora_model():
    return peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))


def test_wrong_shape_is_refused_and_model_unchanged():
    ours = _lora_model()
    sd = peftkit.get_peft_model_state_dict(ours)
    good = {k: v.clone() for k, v in sd.items()}
    bad = {k: v + 1 for k, v in sd.items()}
    key = sorted(bad)[0]
    bad[key] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"has shape \(3, 3\)") as e:
        peftkit.set_peft_model_state_dict(ours, bad)
    assert key in str(e.value)
    _assert_same_dict(peftkit.get_peft_model_state_dict(ours), good)


def test_missing_unexpected_and_non_tensor_entries():
    ours = _lora_model()
    sd = peftkit.get_peft_model_state_dict(ours)
    first = sorted(sd)[0]
    with pytest.raises(CheckpointError, match="missing tensor"):
        peftkit.set_peft_model_state_dict(ours, {k: v for k, v in sd.items() if k != first})
    with pytest.raises(CheckpointError, match="has no place in this model"):
        peftkit.set_peft_model_state_dict(ours, {**sd, "base_model.model.nope.lora_A.weight": torch.zeros(1)})
    with pytest.raises(TypeError, match="expected a tensor"):
        peftkit.set_peft_model_state_dict(ours, {**sd, first: [1.0]})
    with pytest.raises(TypeError, match="dict of name -> tensor"):
        peftkit.set_peft_model_state_dict(ours, list(sd.items()))
    with pytest.raises(ValueError, match="ignore_mismatched_sizes"):
        peftkit.set_peft_model_state_dict(ours, sd, ignore_mismatched_sizes=True)


def test_unknown_adapter_and_wrong_model():
    ours = _lora_model()
    with pytest.raises(ValueError, match=r"Unknown adapter 'other'.*\['default'\]"):
        peftkit.get_peft_model_state_dict(ours, adapter_name="other")
    with pytest.raises(ValueError, match="Unknown adapter 'other'"):
        peftkit.set_peft_model_state_dict(ours, peftkit.get_peft_model_state_dict(ours), adapter_name="other")
    with pytest.raises(TypeError, match="without peftkit adapters"):
        peftkit.get_peft_model_state_dict(tiny_llama())


# ----- load_peft_weights -------------------------------------------------------------------
def test_load_peft_weights_safetensors_bin_and_key_mapping(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "st")
    _assert_same_dict(peftkit.load_peft_weights(tmp_path / "st", device="cpu"),
                      peft.load_peft_weights(str(tmp_path / "st"), device="cpu"))
    theirs.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert os.path.isfile(tmp_path / "bin" / "adapter_model.bin")
    _assert_same_dict(peftkit.load_peft_weights(str(tmp_path / "bin"), device="cpu"),
                      peft.get_peft_model_state_dict(theirs))
    mapping = {r"^model\.layers\.(\d+)\.self_attn": r"model.blocks.\1.attn"}
    _assert_same_dict(peftkit.load_peft_weights(str(tmp_path / "st"), device="cpu", key_mapping=mapping),
                      peft.load_peft_weights(str(tmp_path / "st"), device="cpu", key_mapping=mapping))
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        peftkit.load_peft_weights("someone/some-adapter")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        peftkit.load_peft_weights(str(tmp_path))


# ----- inject_adapter_in_model -------------------------------------------------------------
def test_inject_matches_get_peft_model_and_peft():
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    batch = inputs_for(tiny_llama())
    base_out = output_of(tiny_llama(), batch)
    model = tiny_llama()
    plain = peftkit.inject_adapter_in_model(peftkit.LoraConfig(**cfg), model)
    assert plain is model and type(plain).__name__ == "LlamaForCausalLM"
    assert list(plain.peft_config) == ["default"]
    wrapped = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(**cfg))
    torch.testing.assert_close(output_of(plain, batch), output_of(wrapped, batch), atol=0, rtol=0)
    assert not torch.allclose(output_of(plain, batch), base_out, atol=1e-4)
    trainable = sorted(n for n, p in plain.named_parameters() if p.requires_grad)
    assert trainable and all(".deltas.default." in n for n in trainable)
    # keys as PEFT spells them for an injected model: no base_model.model. prefix
    ours_sd = peftkit.get_peft_model_state_dict(plain)
    theirs_model = peft.inject_adapter_in_model(peft.LoraConfig(**cfg), tiny_llama())
    perturb(theirs_model)
    theirs_sd = peft.get_peft_model_state_dict(theirs_model)
    assert sorted(ours_sd) == sorted(theirs_sd)
    assert sorted(ours_sd) == sorted(k[len("base_model.model."):] for k in peftkit.get_peft_model_state_dict(wrapped))
    peftkit.set_peft_model_state_dict(plain, theirs_sd)
    torch.testing.assert_close(output_of(plain, batch), output_of(theirs_model, batch), atol=1e-5, rtol=0)
    # errors name keys as this model spells them
    bad = dict(theirs_sd)
    bad[sorted(bad)[0]] = torch.zeros(1, 1)
    with pytest.raises(CheckpointError, match=f"tensor '{sorted(bad)[0]}' has shape"):
        peftkit.set_peft_model_state_dict(plain, bad)
    # a deep copy keeps its own adapters
    twin = copy.deepcopy(plain)
    with torch.no_grad():
        next(p for n, p in twin.named_parameters() if p.requires_grad).add_(1)
    assert sorted(peftkit.get_peft_model_state_dict(twin)) == sorted(ours_sd)
    _assert_same_dict(peftkit.get_peft_model_state_dict(plain), theirs_sd)
    # the prefixed spelling (a saved file) loads on a plain model too, as in PEFT
    peftkit.set_peft_model_state_dict(plain, peftkit.get_peft_model_state_dict(wrapped))
    torch.testing.assert_close(output_of(plain, batch), output_of(wrapped, batch), atol=0, rtol=0)


def test_inject_second_adapter_and_targets_from_state_dict():
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj"])
    model = peftkit.inject_adapter_in_model(peftkit.LoraConfig(**cfg), tiny_llama())
    peftkit.inject_adapter_in_model(peftkit.LoraConfig(**cfg), model, adapter_name="two")
    assert sorted(model.peft_config) == ["default", "two"]
    assert peftkit.get_peft_model_state_dict(model, adapter_name="two").keys() == \
        peftkit.get_peft_model_state_dict(model).keys()
    # PEFT's state_dict=: the layers to adapt come from the keys
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["k_proj", "down_proj"],
                                                          modules_to_save=["lm_head"]), tiny_llama())
    sd = peft.get_peft_model_state_dict(theirs)
    ours = peftkit.inject_adapter_in_model(peftkit.LoraConfig(r=2, modules_to_save=["lm_head"]), tiny_llama(),
                                           state_dict=sd)
    assert sorted(peftkit.get_peft_model_state_dict(ours)) == sorted(sd)


def test_inject_refuses_prompt_methods_and_peft_models():
    with pytest.raises(ValueError, match="prompt methods"):
        peftkit.inject_adapter_in_model(peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
                                        tiny_llama())
    model = tiny_llama()
    with pytest.raises(ValueError, match="shared by the whole model.*get_peft_model"):
        peftkit.inject_adapter_in_model(peftkit.VeraConfig(r=4, target_modules=["q_proj"], save_projection=True), model)
    assert not hasattr(model, "peft_config")  # left as it was: no sites, no adapter bookkeeping
    assert all(type(m).__name__ != "Site" for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="already a PeftModel"):
        peftkit.inject_adapter_in_model(peftkit.LoraConfig(target_modules=["q_proj"]), _lora_model())


# ----- AutoPeftModel* ----------------------------------------------------------------------
def _saved_adapter(tmp_path, base_path: str, task_type="CAUSAL_LM"):
    ours = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                    task_type=task_type)).eval()
    perturb(ours)
    adapter = tmp_path / "adapter"
    ours.save_pretrained(str(adapter))
    cfg_file = adapter / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = base_path
    cfg_file.write_text(json.dumps(cfg))
    return ours, str(adapter)


def test_auto_causal_lm_loads_local_base(tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    ours, adapter = _saved_adapter(tmp_path, str(base_dir))
    batch = inputs_for(tiny_llama())
    loaded = peftkit.AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    assert isinstance(loaded, peftkit.PeftModelForCausalLM)
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(output_of(loaded, batch), output_of(ours, batch), atol=1e-5, rtol=0)
    trainable = peftkit.AutoPeftModelForCausalLM.from_pretrained(adapter, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())
    with pytest.raises(TypeError, match="from_pretrained"):
        peftkit.AutoPeftModelForCausalLM()


def test_auto_refuses_hub_ids_and_wrong_task(tmp_path):
    _, adapter = _saved_adapter(tmp_path, "meta-llama/Llama-2-7b-hf")
    with pytest.raises(ValueError, match="not a local folder.*never downloads"):
        peftkit.AutoPeftModelForCausalLM.from_pretrained(adapter)
    with pytest.raises(ValueError, match="Use AutoPeftModelForCausalLM"):
        peftkit.AutoPeftModelForSequenceClassification.from_pretrained(adapter)
    with pytest.raises(ValueError, match="Use AutoPeftModelForCausalLM"):
        peftkit.AutoPeftModel.from_pretrained(adapter)


def test_auto_peft_model_uses_peft_auto_mapping(tmp_path):
    """An adapter PEFT saved on a bare LlamaModel (no task type) records the base class in auto_mapping."""
    from transformers import LlamaModel

    base_dir = tmp_path / "base"
    LlamaModel(tiny_llama().config).save_pretrained(base_dir)
    theirs = peft.get_peft_model(LlamaModel.from_pretrained(base_dir), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["auto_mapping"]
    loaded = peftkit.AutoPeftModel.from_pretrained(str(tmp_path / "adapter"), base_model_name_or_path=str(base_dir))
    assert type(loaded.get_base_model()).__name__ == "LlamaModel"
    batch = inputs_for(tiny_llama())
    torch.testing.assert_close(loaded(**batch).last_hidden_state, theirs.eval()(**batch).last_hidden_state,
                               atol=1e-5, rtol=0)


def test_auto_sequence_classification_and_grown_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast

    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    LlamaForSequenceClassification(tiny_llama(num_labels=3, pad_token_id=0).config).save_pretrained(base_dir)
    ours = peftkit.get_peft_model(LlamaForSequenceClassification.from_pretrained(base_dir),
                                  peftkit.LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS")).eval()
    perturb(ours)
    adapter = tmp_path / "adapter"
    ours.save_pretrained(str(adapter))
    vocab = {f"t{i}": i for i in range(140)}  # 12 more tokens than the base's 128 embeddings
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")))
    tok.save_pretrained(adapter)
    loaded = peftkit.AutoPeftModelForSequenceClassification.from_pretrained(
        str(adapter), base_model_name_or_path=str(base_dir)).eval()
    assert isinstance(loaded, peftkit.PeftModelForSequenceClassification)
    assert loaded.get_input_embeddings().weight.shape[0] == 140
    batch = inputs_for(tiny_llama())
    torch.testing.assert_close(output_of(loaded, batch), output_of(ours, batch), atol=1e-5, rtol=0)
