"""Hot-swapping: swapped weights equal a fresh load; no recompilation under torch.compile."""
from __future__ import annotations


import pytest
import torch
from conftest import inputs_for, output_of, tiny_gpt2, tiny_llama

from peftkit import CheckpointError, LoraConfig, PeftModel, get_peft_model
from peftkit.methods.lora.hotswap import prepare_for_hotswap
from peftkit.methods import IA3Config


def _save(make, folder, seed, **cfg):
    torch.manual_seed(seed)
    model = get_peft_model(make(), LoraConfig(init_lora_weights=False, **cfg))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    qv = ["q_proj", "v_proj"]
    return {
        "first": _save(tiny_llama, str(root / "first"), 1, r=4, lora_alpha=8, target_modules=qv),
        "same": _save(tiny_llama, str(root / "same"), 2, r=4, lora_alpha=16, target_modules=qv),
        "smaller": _save(tiny_llama, str(root / "smaller"), 3, r=2, lora_alpha=3, target_modules=qv, use_rslora=True),
        "subset": _save(tiny_llama, str(root / "subset"), 4, r=4, lora_alpha=4, target_modules=["q_proj"]),
        "larger": _save(tiny_llama, str(root / "larger"), 5, r=8, lora_alpha=8, target_modules=qv),
        "wider": _save(tiny_llama, str(root / "wider"), 6, r=4, lora_alpha=8, target_modules=qv + ["o_proj"]),
    }


def _fresh(folder, batch):
    return output_of(PeftModel.from_pretrained(tiny_llama(), folder), batch)


@pytest.mark.parametrize("which", ["same", "smaller", "subset"])
def test_swap_equals_fresh_load_and_keeps_parameters(files, which):
    model = PeftModel.from_pretrained(tiny_llama(), files["first"])
    batch = inputs_for(model)
    before = output_of(model, batch)
    params = {n: p for n, p in model.named_parameters()}
    model.hotswap_adapter(files[which], "default")
    after = output_of(model, batch)
    torch.testing.assert_close(after, _fresh(files[which], batch), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after, before)
    assert all(p is params[n] for n, p in model.named_parameters())  # same objects: nothing rebuilt
    model.hotswap_adapter(files["first"], "default")
    torch.testing.assert_close(output_of(model, batch), before, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Conv1D layers")
def test_swap_on_gpt2_conv1d(tmp_path):
    first = _save(tiny_gpt2, str(tmp_path / "a"), 1, r=4, target_modules=["c_attn"])
    other = _save(tiny_gpt2, str(tmp_path / "b"), 2, r=2, lora_alpha=5, target_modules=["c_attn"])
    model = PeftModel.from_pretrained(tiny_gpt2(), first)
    batch = inputs_for(model)
    model.hotswap_adapter(other)
    torch.testing.assert_close(output_of(model, batch), output_of(PeftModel.from_pretrained(tiny_gpt2(), other), batch),
                               atol=1e-5, rtol=1e-5)


def test_bad_swaps_are_refused_and_change_nothing(files):
    model = PeftModel.from_pretrained(tiny_llama(), files["first"])
    batch = inputs_for(model)
    before = output_of(model, batch)
    with pytest.raises(CheckpointError, match="prepare_for_hotswap"):
        model.hotswap_adapter(files["larger"])
    with pytest.raises(CheckpointError, match="no place"):
        model.hotswap_adapter(files["wider"])
    with pytest.raises(ValueError, match="Unknown adapter"):
        model.hotswap_adapter(files["same"], "nope")
    model.add_adapter("ia3", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="supports LoRA"):
        model.hotswap_adapter(files["same"], "ia3")
    model.delete_adapter("ia3")
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        model.hotswap_adapter(files["same"])
    model.unmerge_adapter()
    torch.testing.assert_close(output_of(model, batch), before)


def test_prepare_for_hotswap_pads_without_changing_outputs(files, tmp_path):
    model = PeftModel.from_pretrained(tiny_llama(), files["smaller"])
    batch = inputs_for(model)
    before = output_of(model, batch)
    prepare_for_hotswap(model, target_rank=8)
    torch.testing.assert_close(output_of(model, batch), before, atol=1e-6, rtol=1e-6)
    model.save_pretrained(str(tmp_path))
    torch.testing.assert_close(_fresh(str(tmp_path), batch), before, atol=1e-6, rtol=1e-6)
    model.hotswap_adapter(files["larger"])
    torch.testing.assert_close(output_of(model, batch), _fresh(files["larger"], batch), atol=1e-5, rtol=1e-5)


def counting_backend():
    """(list of compiled graphs' node counts, a torch.compile backend that appends to it)."""
    import torch._dynamo

    torch._dynamo.reset()
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(len(gm.graph.nodes))
        return gm.forward

    return compiles, backend


def test_no_recompilation_after_swap(files):
    import torch._dynamo

    compiles, backend = counting_backend()
    model = PeftModel.from_pretrained(tiny_llama(), files["first"])
    prepare_for_hotswap(model, target_rank=8)
    batch = inputs_for(model)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(**batch)
        n = len(compiles)
        assert n > 0
        with torch._dynamo.config.patch(error_on_recompile=True):
            for which in ("same", "smaller", "subset", "larger"):
                model.hotswap_adapter(files[which])
                got = compiled(**batch).logits
                torch.testing.assert_close(got, _fresh(files[which], batch), atol=1e-5, rtol=1e-5)
    assert len(compiles) == n
    torch._dynamo.reset()


def test_no_recompilation_after_swap_into_a_packed_adapter(files):
    """An inference load is packed (core/packed.py): its layers run views of one flat tensor,
    which a swap overwrites in place, so the compiled graph stays valid."""
    import torch._dynamo

    from peftkit.core.packed import is_packed

    compiles, backend = counting_backend()
    model = PeftModel.from_pretrained(tiny_llama(), files["first"])
    assert is_packed(model.base_model, "default")
    batch = inputs_for(model)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(**batch)
        n = len(compiles)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for which in ("same", "smaller", "subset"):
                model.hotswap_adapter(files[which])
                got = compiled(**batch).logits
                torch.testing.assert_close(got, _fresh(files[which], batch), atol=1e-5, rtol=1e-5)
    assert len(compiles) == n and is_packed(model.base_model, "default")
    torch._dynamo.reset()


def test_swap_peft_saved_classifier_with_modules_to_save(tmp_path):
    """Adapters written by Hugging Face PEFT (with a trained head in modules_to_save) swap in exactly."""
    import peft
    from conftest import tiny_bert_cls

    refs = {}
    for seed in (1, 2):
        torch.manual_seed(seed)
        ref = peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                                                   init_lora_weights=False))
        with torch.no_grad():
            ref.base_model.model.classifier.modules_to_save["default"].weight.normal_()
        ref.save_pretrained(str(tmp_path / str(seed)))
        refs[seed] = ref.eval()
    model = PeftModel.from_pretrained(tiny_bert_cls(), str(tmp_path / "1"))
    batch = inputs_for(model)
    torch.testing.assert_close(output_of(model, batch), output_of(refs[1], batch), atol=1e-5, rtol=1e-5)
    model.hotswap_adapter(str(tmp_path / "2"))
    torch.testing.assert_close(output_of(model, batch), output_of(refs[2], batch), atol=1e-5, rtol=1e-5)
