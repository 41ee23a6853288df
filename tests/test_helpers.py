"""``peft.helpers`` and the smaller top-level names (get_peft_config, PEFT_TYPE_TO_CONFIG_MAPPING,
cast_mixed_precision_params, shift_tokens_right, PeftWarning, get_layer_status/get_model_status),
each checked against the real ``peft`` package on the same tiny model and weights."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from conftest import inputs_for, output_of, peft_twins, tiny_llama
import peftkit

peft = pytest.importorskip("peft")
import peft.helpers  # noqa: E402
import peft.utils  # noqa: E402

LIBS = (peft, peftkit)
NAMES = ["PeftWarning", "PEFT_TYPE_TO_CONFIG_MAPPING", "get_peft_config", "PromptEncoderReparameterizationType",
         "get_layer_status", "get_model_status", "cast_mixed_precision_params", "get_base_model_state_dict",
         "set_base_model_state_dict", "helpers"]
HELPERS = ["check_if_peft_model", "rescale_adapter_scale", "disable_input_dtype_casting",
           "update_forward_signature", "update_generate_signature", "update_signature"]


def test_names_exist_where_peft_has_them():
    assert not [n for n in NAMES if not hasattr(peftkit, n)]
    assert not [n for n in HELPERS if not hasattr(peftkit.helpers, n)]
    assert hasattr(peftkit.utils, "shift_tokens_right") and hasattr(peftkit.utils, "cast_mixed_precision_params")
    assert issubclass(peftkit.PeftWarning, UserWarning)
    assert [m.value for m in peftkit.PromptEncoderReparameterizationType] == \
        [m.value for m in peft.PromptEncoderReparameterizationType]


def _pair(**kw):
    """The same LoRA weights in both libraries (PEFT's, copied in)."""
    return peft_twins(tiny_llama, lambda L: L.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kw),
                      seed=3)


@pytest.mark.parametrize("multiplier", [0.0, 0.5, 2])
def test_rescale_adapter_scale_as_peft(multiplier):
    theirs, ours = _pair()
    batch = inputs_for(ours)
    plain = output_of(ours, batch)
    got = {}
    for lib, model in ((peft, theirs), (peftkit, ours)):
        with lib.helpers.rescale_adapter_scale(model, multiplier):
            got[lib] = output_of(model, batch)
    torch.testing.assert_close(got[peftkit], got[peft], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output_of(ours, batch), plain, atol=0, rtol=0)  # restored
    if multiplier == 0.0:
        torch.testing.assert_close(got[peftkit], output_of(tiny_llama(), batch), atol=1e-6, rtol=0)


def test_rescale_adapter_scale_on_packed_inference_adapters(tmp_path):
    """An adapter loaded for inference is packed (one flat buffer, records): the block rescales it
    and restores it, in views built before and inside the block."""
    theirs, _ = _pair()
    theirs.save_pretrained(str(tmp_path))
    loaded = peftkit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert loaded.base_model.model.model.layers[0].self_attn.q_proj.deltas.npacked == 1
    batch = inputs_for(loaded)
    plain = output_of(loaded, batch)
    with peft.helpers.rescale_adapter_scale(theirs, 0.25):
        ref = output_of(theirs, batch)
    with peftkit.helpers.rescale_adapter_scale(loaded, 0.25):
        torch.testing.assert_close(output_of(loaded, batch), ref, atol=1e-5, rtol=1e-5)
        loaded.eval()  # views rebuilt from the records inside the block
        torch.testing.assert_close(output_of(loaded, batch), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output_of(loaded, batch), plain, atol=0, rtol=0)
    loaded.base_model.model.to(torch.float32)  # new views after the block: the restored scale
    torch.testing.assert_close(output_of(loaded, batch), plain, atol=0, rtol=0)


def test_rescale_adapter_scale_errors_as_peft():
    theirs, ours = _pair()
    for bad, model_of in (("0.5", lambda lib: theirs if lib is peft else ours),
                          (0.5, lambda lib: tiny_llama())):
        errs = {}
        for lib in LIBS:
            with pytest.raises((TypeError, ValueError)) as e:
                with lib.helpers.rescale_adapter_scale(model_of(lib), bad):
                    pass
            errs[lib] = (type(e.value), str(e.value))
        assert errs[peftkit] == errs[peft]
    ia3 = peftkit.get_peft_model(tiny_llama(), peftkit.IA3Config())  # not LoRA: nothing to rescale, as in PEFT
    with pytest.raises(ValueError, match="LoraLayer"):
        with peftkit.helpers.rescale_adapter_scale(ia3, 0.5):
            pass


def test_disable_input_dtype_casting_as_peft():
    """bf16 base, fp32 adapter (PEFT's autocast default): inputs are cast to the adapter's dtype,
    except inside the block, where both libraries hand the bf16 input on (and torch refuses the
    mixed matmul); the flag is restored after, and active=False changes nothing."""
    got = {}
    for lib in LIBS:
        model = lib.get_peft_model(tiny_llama().to(torch.bfloat16), lib.LoraConfig(r=2, target_modules=["q_proj"]))
        batch = inputs_for(model)
        before = output_of(model, batch)
        with pytest.raises(RuntimeError):
            with lib.helpers.disable_input_dtype_casting(model):
                output_of(model, batch)
        with lib.helpers.disable_input_dtype_casting(model, active=False):
            inactive = output_of(model, batch)
        torch.testing.assert_close(output_of(model, batch), before, atol=0, rtol=0)
        torch.testing.assert_close(inactive, before, atol=0, rtol=0)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        got[lib] = (before, layer.cast_input_dtype_enabled)
    torch.testing.assert_close(got[peftkit][0], got[peft][0], atol=1e-2, rtol=1e-2)
    assert got[peftkit][1] is got[peft][1] is True


def test_check_if_peft_model_as_peft(tmp_path):
    peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(target_modules=["q_proj"])).save_pretrained(str(tmp_path / "a"))
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "a", tmp_path / "empty"):
        assert peftkit.helpers.check_if_peft_model(str(path)) == peft.helpers.check_if_peft_model(str(path))
    assert peftkit.helpers.check_if_peft_model(str(tmp_path / "a")) is True


def test_update_signature_shows_the_base_models_parameters():
    got = {}
    for lib in LIBS:
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=2, target_modules=["q_proj"]))
        lib.helpers.update_signature(model)
        params = inspect.signature(model.forward).parameters
        got[lib] = ("input_ids" in params, "labels" in params, model.forward.__doc__ == type(model.get_base_model()).forward.__doc__)
        with pytest.raises(ValueError, match="not supported please choose one of"):
            lib.helpers.update_signature(model, "bogus")
        batch = inputs_for(model)
        assert output_of(model, batch).shape[-1] == model.config.vocab_size  # still calls the PeftModel
    assert got[peftkit] == got[peft] == (True, True, True)
    fresh = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    assert "input_ids" not in inspect.signature(fresh.forward).parameters  # per instance, not the class


def test_get_peft_config_and_mapping_as_peft():
    data = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
    ours, theirs = peftkit.get_peft_config(data), peft.get_peft_config(data)
    assert type(ours).__name__ == type(theirs).__name__ == "LoraConfig"
    assert (ours.r, ours.lora_alpha, set(ours.target_modules)) == (theirs.r, theirs.lora_alpha, theirs.target_modules)
    assert peftkit.PEFT_TYPE_TO_CONFIG_MAPPING["LORA"] is peftkit.LoraConfig
    assert peftkit.PEFT_TYPE_TO_CONFIG_MAPPING[peftkit.PeftType.OFT] is peftkit.OFTConfig
    shared = set(peft.PEFT_TYPE_TO_CONFIG_MAPPING) & set(peftkit.PEFT_TYPE_TO_CONFIG_MAPPING)
    assert len(shared) >= 14
    assert all(peftkit.PEFT_TYPE_TO_CONFIG_MAPPING[t].__name__ == peft.PEFT_TYPE_TO_CONFIG_MAPPING[t].__name__
               for t in shared)
    with pytest.raises(peftkit.ConfigError, match="peft_type"):
        peftkit.get_peft_config({"r": 4})


def test_cast_mixed_precision_params_as_peft():
    got = {}
    for lib in LIBS:
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=2, target_modules=["q_proj"]))
        lib.cast_mixed_precision_params(model, torch.bfloat16)
        got[lib] = sorted((p.requires_grad, str(p.dtype)) for p in model.parameters())
        batch = inputs_for(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(output_of(model, batch).float()).all()
    assert got[peftkit] == got[peft]


def test_shift_tokens_right_as_peft():
    ids = torch.tensor([[5, 6, -100, 7], [8, -100, -100, 9]])
    torch.testing.assert_close(peftkit.utils.shift_tokens_right(ids, 0, 2), peft.utils.shift_tokens_right(ids, 0, 2))
    errs = []
    for lib in LIBS:
        with pytest.raises(ValueError) as e:
            lib.utils.shift_tokens_right(ids, None, 2)
        errs.append(str(e.value))
    assert errs[0] == errs[1]


def test_lora_bias_warning_is_a_peft_warning():
    got = {}
    for lib in LIBS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
        got[lib] = [(w.category.__name__, str(w.message)) for w in caught if "lora_bias" in str(w.message)]
    assert got[peftkit] == got[peft] and got[peft]
    with warnings.catch_warnings():
        warnings.simplefilter("error", peftkit.PeftWarning)
        with pytest.raises(peftkit.PeftWarning):
            peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))


def test_top_level_status_functions():
    got = {}
    for lib in LIBS:
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=2, target_modules=["q_proj"]))
        status = lib.get_model_status(model)
        layers = lib.get_layer_status(model)
        got[lib] = (status.num_adapter_layers, status.active_adapters, status.merged_adapters,
                    [s.module_type for s in layers][:1] and len(layers))
    assert got[peftkit] == got[peft]
