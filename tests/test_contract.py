"""PeftModel's behavioural contract beyond the happy path, checked against the real ``peft`` on the
same tiny models: warnings, exception types, return values, dtypes and train/eval state."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import peftkit
import peftkit.utils

peft = pytest.importorskip("peft")
LIBS = (peft, peftkit)


class MLP(nn.Module):
    """A custom (non-transformers) model with dropout, as a new user would write it."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(16, 4)

    def forward(self, x):
        return self.lin1(self.drop(torch.relu(self.lin0(x))))


def mlp(dtype=torch.float32) -> MLP:
    torch.manual_seed(0)
    return MLP().to(dtype)


def lora(lib, **kw):
    return lib.LoraConfig(r=2, target_modules=["lin0"], **kw)


def wrapped(lib, model=None, **kw):
    """The same LoRA model in ``lib`` (non-zero B so that the adapter changes the output)."""
    return lib.get_peft_model(model if model is not None else mlp(), lora(lib, init_lora_weights=False, **kw))


X = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


def out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def caught(fn):
    """(result or exception, [(category, message)]) of ``fn()``."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - the exception is the result compared
            result = e
    return result, [(x.category, str(x.message)) for x in w]


def trainable(model) -> list[str]:
    """Names of the trainable tensors, spelled alike in both libraries (``lin0.lora_A.default``)."""
    names = []
    for n, p in model.named_parameters():
        if p.requires_grad:
            n = n.replace(".deltas.", ".").replace(".weight", "")
            parts = n.split(".")
            if len(parts) >= 2 and parts[-1].startswith("lora_"):  # ours: ...lin0.<name>.lora_A
                parts[-2], parts[-1] = parts[-1], parts[-2]
            names.append(".".join(parts))
    return sorted(names)


# ----- merging -----------------------------------------------------------------------------
def test_merging_twice_warns_and_changes_nothing():
    for lib in LIBS:
        model = wrapped(lib).eval()
        model.merge_adapter()
        once = out(model)
        result, warned = caught(model.merge_adapter)
        assert result is None and [c for c, _ in warned] == [UserWarning], lib.__name__
        assert "All adapters are already merged" in warned[0][1]
        torch.testing.assert_close(out(model), once)
        model.unmerge_adapter()
        result, warned = caught(model.unmerge_adapter)
        assert result is None and "Already unmerged" in warned[0][1], lib.__name__


def test_merge_adapter_names_merges_only_those():
    for lib in LIBS:
        model = wrapped(lib)
        model.add_adapter("b", lora(lib, init_lora_weights=False))
        model.merge_adapter(adapter_names=["b"])
        assert [s.merged_adapters for s in model.get_layer_status()] == [["b"]], lib.__name__


def test_delete_unknown_adapter_raises_value_error():
    for lib in LIBS:
        err, _ = caught(lambda: wrapped(lib).delete_adapter("nope"))
        assert type(err) is ValueError and "does not exist" in str(err), lib.__name__
        err, _ = caught(lambda: wrapped(lib).set_adapter("nope"))
        assert type(err) is ValueError and "not found" in str(err), lib.__name__


def test_unknown_adapter_is_one_error_everywhere(tmp_path):
    model = wrapped(peftkit)
    messages = set()
    for call in (lambda: model.delete_adapter("x"), lambda: model.set_adapter("x"),
                 lambda: model.get_adapter_state_dict("x"), lambda: model.save_pretrained(str(tmp_path), ["x"]),
                 lambda: peftkit.get_peft_model_state_dict(model, adapter_name="x"),
                 lambda: model.set_requires_grad("x")):
        err, _ = caught(call)
        assert type(err) is ValueError
        messages.add(str(err))
    assert len(messages) == 1 and "'x'" in messages.pop()


def test_deleting_a_merged_adapter_raises_and_leaves_the_model_as_it_was():
    for lib in LIBS:
        model = wrapped(lib).eval()
        model.add_adapter("b", lora(lib))
        model.merge_adapter()
        before = out(model)
        err, _ = caught(lambda: model.delete_adapter("default"))
        assert type(err) is ValueError and "while they are merged" in str(err), lib.__name__
        assert sorted(model.peft_config) == ["b", "default"]
        torch.testing.assert_close(out(model), before)


# ----- disabling ----------------------------------------------------------------------------
def test_nested_disable_adapter_is_reentrant_and_restores_after_an_exception():
    results = {}
    for lib in LIBS:
        model = wrapped(lib).eval()
        on = out(model)
        with model.disable_adapter():
            off = out(model)
            with pytest.raises(KeyError):
                with model.disable_adapter():
                    raise KeyError("inner")
            torch.testing.assert_close(out(model), off)  # still off after the inner block
        torch.testing.assert_close(out(model), on)
        with pytest.raises(RuntimeError):
            with model.disable_adapter():
                raise RuntimeError("outer")
        torch.testing.assert_close(out(model), on)
        results[lib] = (on, off)
    torch.testing.assert_close(results[peftkit][1], results[peft][1])
    assert not torch.allclose(results[peftkit][0], results[peftkit][1])


def test_disabled_adapters_do_not_train_and_train_again_afterwards():
    for lib in LIBS:
        model = wrapped(lib)
        before = trainable(model)
        with model.disable_adapter():
            assert trainable(model) == [], lib.__name__
        assert trainable(model) == before


def test_enable_and_disable_adapter_layers_on_the_tuner():
    for lib in LIBS:
        model = wrapped(lib).eval()
        on = out(model)
        model.base_model.disable_adapter_layers()
        assert not torch.allclose(out(model), on)
        assert model.get_model_status().enabled is False
        model.base_model.enable_adapter_layers()
        torch.testing.assert_close(out(model), on)


# ----- layers and parameters -----------------------------------------------------------------
def test_adapted_layer_keeps_in_and_out_features():
    for lib in LIBS:
        layer = wrapped(lib).base_model.model.lin0
        assert (layer.in_features, layer.out_features) == (8, 16)


def test_lora_name_filters_find_exactly_the_adapter_parameters():
    trained = {}
    for lib in LIBS:
        model = wrapped(lib)
        chosen = [p for n, p in model.named_parameters() if "lora_" in n]
        assert chosen and all(p.requires_grad for p in chosen)
        assert {id(p) for p in chosen} == {id(p) for p in model.parameters() if p.requires_grad}
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
        opt = torch.optim.SGD(chosen, lr=0.1)
        model.train()
        torch.manual_seed(3)
        model(X).pow(2).mean().backward()
        opt.step()
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if "lora_" not in n)
        trained[lib] = sorted((tuple(p.shape), round(float(p.detach().sum()), 4)) for p in chosen)
    assert trained[peftkit] == trained[peft]


def test_active_adapter_on_the_model_and_on_the_tuner():
    for lib in LIBS:
        model = wrapped(lib)
        model.add_adapter("b", lora(lib))
        got = (model.active_adapter, model.active_adapters, model.base_model.active_adapters)
        assert got == ("default", ["default"], ["default"]), lib.__name__
        # PEFT's tuner returns whatever was last set (here a list); ours is PeftModel's rule
        assert model.base_model.active_adapter in ("default", ["default"])
        assert type(model.active_peft_config).__name__ == "LoraConfig"
        assert model.base_model_torch_dtype is None  # a custom module has no dtype attribute


def test_set_requires_grad_and_set_adapter_inference_mode_match_peft():
    got = {}
    for lib in LIBS:
        model = wrapped(lib)
        model.add_adapter("b", lora(lib))
        model.set_requires_grad("b", True)
        first = trainable(model)
        model.set_adapter("b", inference_mode=True)
        got[lib] = (first, trainable(model), model.peft_config["b"].inference_mode)
    assert got[peftkit] == got[peft]


def test_layer_and_model_status_match_peft():
    got = {}
    for lib in LIBS:
        model = wrapped(lib)
        model.add_adapter("b", lora(lib, init_lora_weights=False))
        states = [model.get_layer_status(), model.get_model_status()]
        model.merge_adapter(["b"])
        states.append(model.get_model_status())
        model.unmerge_adapter()
        model.base_model.disable_adapter_layers()
        states.append(model.get_model_status())
        for s in states[1:]:
            s.adapter_model_type = None  # LoraModel vs AdapterHost: the tuner's class name
        got[lib] = [[vars(x) for x in s] if isinstance(s, list) else vars(s) for s in states]
    assert got[peftkit] == got[peft]


def test_print_trainable_parameters_prints_peft_line(capsys):
    lines = []
    for lib in LIBS:
        wrapped(lib).print_trainable_parameters()
        lines.append(capsys.readouterr().out)
    assert lines[0] == lines[1] and lines[0].startswith("trainable params: ")


# ----- dtypes ----------------------------------------------------------------------------
METHOD_CONFIGS = {
    "lora": lambda lib: lib.LoraConfig(r=2, target_modules=["lin0"]),
    "loha": lambda lib: lib.LoHaConfig(r=2, target_modules=["lin0"]),
    "lokr": lambda lib: lib.LoKrConfig(r=2, target_modules=["lin0"]),
    "ia3": lambda lib: lib.IA3Config(target_modules=["lin0"], feedforward_modules=[]),
    "adalora": lambda lib: lib.AdaLoraConfig(r=2, target_modules=["lin0"], total_step=10),
    "vera": lambda lib: lib.VeraConfig(r=2, target_modules=["lin0"]),
    "oft": lambda lib: lib.OFTConfig(r=2, oft_block_size=0, target_modules=["lin0"]),
    "boft": lambda lib: lib.BOFTConfig(boft_block_size=2, target_modules=["lin0"]),
}


def adapter_dtypes(model, name: str) -> list[str]:
    """dtypes of adapter ``name``'s parameters (``...lora_A.<name>.weight`` / ``...deltas.<name>...``)."""
    return sorted({str(p.dtype) for n, p in model.named_parameters() if f".{name}." in n or n.endswith("." + name)})


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_matches_peft(method, dtype, autocast):
    got = {}
    for lib in LIBS:
        model = lib.get_peft_model(mlp(dtype), METHOD_CONFIGS[method](lib), autocast_adapter_dtype=autocast)
        other = METHOD_CONFIGS[method](lib)
        other.inference_mode = True  # AdaLoRA trains one adapter at a time
        model.add_adapter("other", other, autocast_adapter_dtype=not autocast)
        got[lib] = (adapter_dtypes(model, "default"), adapter_dtypes(model, "other"))
    assert got[peftkit] == got[peft]
    assert got[peftkit][0 if autocast else 1] == ["torch.float32"]
    assert got[peftkit][1 if autocast else 0] == [str(dtype)]


def test_half_adapter_in_the_layer_dtype_gives_peft_outputs():
    got = {}
    for lib in LIBS:
        model = lib.get_peft_model(mlp(torch.bfloat16), lora(lib, init_lora_weights=False),
                                   autocast_adapter_dtype=False).eval()
        with torch.no_grad():
            got[lib] = model(X.bfloat16())
    assert got[peftkit].dtype == torch.bfloat16
    torch.testing.assert_close(got[peftkit], got[peft])


# ----- loading ----------------------------------------------------------------------------
def saved(lib, tmp_path):
    folder = str(tmp_path / lib.__name__)
    wrapped(lib).save_pretrained(folder)
    return folder


def test_from_pretrained_for_inference_is_in_eval_mode_and_trainable_is_not(tmp_path):
    got = {}
    for lib in LIBS:
        folder = saved(lib, tmp_path)
        base = mlp().train()
        model = lib.PeftModel.from_pretrained(base, folder)
        state = [model.training, base.drop.training]
        torch.testing.assert_close(model(X), model(X))  # dropout is off
        base2 = mlp().eval()
        model2 = lib.PeftModel.from_pretrained(base2, folder, is_trainable=True)
        state += [model2.training, base2.drop.training, trainable(model2)]
        got[lib] = state
    assert got[peftkit] == got[peft]
    assert got[peftkit][:2] == [False, False]


def test_set_requires_grad_trains_an_adapter_loaded_for_inference(tmp_path):
    """An inference load is packed in peftkit; set_requires_grad gives it parameters again, so the
    same tensors train as in PEFT (and get gradients). set_adapter alone leaves it frozen in
    peftkit, where PEFT unfreezes it (a documented difference)."""
    got = {}
    for lib in LIBS:
        folder = saved(lib, tmp_path)
        model = lib.PeftModel.from_pretrained(mlp(), folder)
        model.set_adapter("default")
        after_set = trainable(model)
        model.set_requires_grad("default")
        model(X).sum().backward()
        grads = all(p.grad is not None for p in model.parameters() if p.requires_grad)
        got[lib] = (after_set, trainable(model), grads)
    assert got[peftkit][1:] == got[peft][1:] and got[peft][1] and got[peft][2]
    assert got[peftkit][0] == [] and got[peft][0] == got[peft][1]


def test_load_adapter_returns_the_load_result_and_sets_eval_like_peft(tmp_path):
    got = {}
    for lib in LIBS:
        folder = saved(lib, tmp_path)
        model = wrapped(lib, mlp()).train()
        result = model.load_adapter(folder, "other")
        assert list(result.unexpected_keys) == []
        assert not [k for k in result.missing_keys if "other" in k]  # PEFT filters by adapter name
        state = [model.training, model.base_model.model.drop.training]
        model.train()
        result = model.load_adapter(folder, "third", is_trainable=True)
        state += [model.training, list(result.missing_keys), list(result.unexpected_keys)]
        got[lib] = state
    assert got[peftkit] == got[peft]


def test_low_cpu_mem_usage_builds_on_meta_then_loads(tmp_path):
    got = {}
    for lib in LIBS:
        source = wrapped(lib).eval()
        folder = str(tmp_path / lib.__name__)
        source.save_pretrained(folder)
        model = lib.get_peft_model(mlp(), lora(lib))
        model.add_adapter("lazy", lora(lib), low_cpu_mem_usage=True)
        lazy = [p for n, p in model.named_parameters() if ".lazy." in n or "lazy" in n.split(".")]
        assert lazy and all(p.is_meta for p in lazy), lib.__name__
        sd = lib.get_peft_model_state_dict(source)
        lib.set_peft_model_state_dict(model, sd, adapter_name="lazy", low_cpu_mem_usage=True)
        assert not any(p.is_meta for p in model.parameters())
        model.set_adapter("lazy")
        torch.testing.assert_close(out(model.eval()), out(source))
        loaded = lib.PeftModel.from_pretrained(mlp(), folder, low_cpu_mem_usage=True)
        loaded.load_adapter(folder, "again", low_cpu_mem_usage=True)
        torch.testing.assert_close(out(loaded), out(source))
        loaded.set_adapter("again")
        torch.testing.assert_close(out(loaded), out(source))
        got[lib] = out(source)
    torch.testing.assert_close(got[peftkit], got[peft])


def test_from_pretrained_takes_a_config(tmp_path):
    for lib in LIBS:
        folder = saved(lib, tmp_path)
        model = lib.PeftModel.from_pretrained(mlp(), folder, config=lora(lib, init_lora_weights=False))
        assert model.peft_config["default"].inference_mode is True
        assert trainable(model) == []


def test_failed_load_leaves_the_model_as_it_was(tmp_path):
    folder = saved(peftkit, tmp_path)
    model = wrapped(peftkit)
    before = (sorted(model.peft_config), trainable(model), out(model.eval()))
    other = peftkit.LoraConfig(r=4, target_modules=["lin0"])  # does not fit the saved r=2 tensors
    with pytest.raises(peftkit.CheckpointError):
        model.load_adapter(folder, "bad", config=other)
    assert (sorted(model.peft_config), trainable(model)) == before[:2]
    torch.testing.assert_close(out(model), before[2])


# ----- peft.utils names --------------------------------------------------------------------
UTIL_NAMES = ["_get_submodules", "get_base_model_state_dict", "set_base_model_state_dict", "get_peft_model_state_dict",
              "set_peft_model_state_dict", "load_peft_weights", "prepare_model_for_kbit_training", "infer_device",
              "transpose", "PeftType", "TaskType", "CONFIG_NAME", "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME"]


def test_peft_utils_names_exist_and_mean_the_same():
    import peft.utils as theirs

    for name in UTIL_NAMES:
        assert hasattr(theirs, name) and hasattr(peftkit.utils, name), name
    for name in ("CONFIG_NAME", "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME"):
        assert getattr(peftkit.utils, name) == getattr(theirs, name)
    assert peftkit.utils.infer_device() == theirs.infer_device()


def test_base_model_state_dict_and_get_submodules_match_peft():
    got = {}
    for lib, utils in ((peft, __import__("peft.utils").utils), (peftkit, peftkit.utils)):
        model = lib.get_peft_model(mlp(), lora(lib, modules_to_save=["lin1"]))
        sd = utils.get_base_model_state_dict(model)
        zeros = {k: torch.zeros_like(v) for k, v in sd.items()}
        result = utils.set_base_model_state_dict(model, zeros)
        parent, target, name = utils._get_submodules(model.base_model.model, "lin0")
        got[lib] = ({k: v.clone() for k, v in sd.items()}, list(result.missing_keys), list(result.unexpected_keys),
                    parent is model.base_model.model, name, float(target.base_layer.weight.abs().sum()))
    assert sorted(got[peftkit][0]) == sorted(got[peft][0])
    for k in got[peft][0]:
        torch.testing.assert_close(got[peftkit][0][k], got[peft][0][k])
    assert got[peftkit][1:] == got[peft][1:]


def test_deleting_the_active_adapter_warns_and_activates_another():
    for lib in LIBS:
        model = wrapped(lib)
        model.add_adapter("b", lora(lib))
        model.set_adapter("b")
        result, warned = caught(lambda: model.delete_adapter("b"))
        assert result is None and len(warned) == 1, lib.__name__
        assert "Adapter b was active which is now deleted" in warned[0][1]
        assert model.active_adapters == ["default"] and trainable(model)
        result, warned = caught(lambda: model.delete_adapter("default"))  # the last one: no warning left to give
        assert result is None and model.active_adapters == [] and list(model.peft_config) == []
        if lib is peftkit:  # PEFT leaves an empty lora.Linear; peftkit puts the original back
            assert type(model.base_model.model.lin0) is nn.Linear


def test_merge_adapter_names_must_be_a_list():
    for lib in LIBS:
        err, _ = caught(lambda: wrapped(lib).merge_adapter(adapter_names="default"))
        assert type(err) is TypeError and "should be a list of strings" in str(err), lib.__name__
        err, _ = caught(lambda: wrapped(lib).merge_and_unload(adapter_names="default"))
        assert type(err) is TypeError, lib.__name__


def test_wrapping_an_adapted_model_again_warns():
    for lib in LIBS:
        base = mlp()
        lib.get_peft_model(base, lora(lib))
        _, warned = caught(lambda: lib.get_peft_model(base, lib.LoraConfig(r=2, target_modules=["lin1"])))
        assert any("for a second time" in m for _, m in warned), lib.__name__


def test_load_adapter_key_mapping_renames_keys_as_peft(tmp_path):
    from safetensors.torch import load_file, save_file

    got = {}
    for lib in LIBS:
        source = wrapped(lib).eval()
        folder = tmp_path / lib.__name__
        source.save_pretrained(str(folder))
        file = folder / "adapter_model.safetensors"
        save_file({k.replace(".lin0.", ".old0."): v for k, v in load_file(str(file)).items()}, str(file))
        model = lib.get_peft_model(mlp(), lora(lib))
        model.load_adapter(str(folder), "renamed", key_mapping={r"^old0": "lin0"})
        model.set_adapter("renamed")
        torch.testing.assert_close(out(model), out(source))
        got[lib] = out(model)
    torch.testing.assert_close(got[peftkit], got[peft])


def test_attributes_resolve_through_the_tuner_first():
    from transformers import LlamaConfig, LlamaForCausalLM

    for lib in LIBS:
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
        model = lib.get_peft_model(base, lib.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
        assert model.model is base, lib.__name__  # PEFT: peft_model.model is the tuner's model
        assert model.config is base.config and model.targeted_module_names == ["model.layers.0.self_attn.q_proj"]
        assert model.base_model.targeted_module_names == model.targeted_module_names


def test_load_adapter_into_an_existing_name_replaces_its_weights(tmp_path):
    got = {}
    for lib in LIBS:
        source = wrapped(lib).eval()
        folder = str(tmp_path / lib.__name__)
        source.save_pretrained(folder)
        model = lib.get_peft_model(mlp(), lora(lib)).eval()
        assert not torch.allclose(out(model), out(source))
        result = model.load_adapter(folder, "default")
        torch.testing.assert_close(out(model), out(source))
        got[lib] = (list(model.peft_config), list(result.unexpected_keys), trainable(model), model.training)
    assert got[peftkit] == got[peft]


def test_prompt_adapter_loads_in_eval_mode_and_disables_reentrantly(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, vocab_size=64))

    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    got = {}
    for lib in LIBS:
        folder = str(tmp_path / lib.__name__)
        lib.get_peft_model(llama(), lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(folder)
        base = llama().train()
        model = lib.PeftModel.from_pretrained(base, folder)
        with torch.no_grad():
            on = model(input_ids=ids).logits
            with model.disable_adapter():
                with pytest.raises(KeyError):
                    with model.disable_adapter():
                        raise KeyError("inner")
                off = model(input_ids=ids).logits
            again = model(input_ids=ids).logits
        torch.testing.assert_close(off, base(input_ids=ids).logits)
        torch.testing.assert_close(again, on)
        got[lib] = (model.training, base.training, on)
    assert got[peftkit][:2] == got[peft][:2] == (False, False)
    torch.testing.assert_close(got[peftkit][2], got[peft][2])


@pytest.mark.parametrize("autocast", [True, False])
def test_loading_into_a_half_model_follows_autocast_adapter_dtype(tmp_path, autocast):
    got = {}
    for lib in LIBS:
        folder = str(tmp_path / lib.__name__)
        wrapped(lib, mlp(torch.bfloat16)).save_pretrained(folder)
        extra = {"packed": False} if lib is peftkit else {}  # packed adapters hold no parameters to list
        model = lib.PeftModel.from_pretrained(mlp(torch.bfloat16), folder, autocast_adapter_dtype=autocast, **extra)
        model.load_adapter(folder, "other", autocast_adapter_dtype=autocast, **extra)
        with torch.no_grad():
            y = model(X.bfloat16())
        got[lib] = (adapter_dtypes(model, "default"), adapter_dtypes(model, "other"), y)
    assert got[peftkit][:2] == got[peft][:2] == ((["torch.float32"],) * 2 if autocast else (["torch.bfloat16"],) * 2)
    torch.testing.assert_close(got[peftkit][2], got[peft][2])
