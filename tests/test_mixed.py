"""Mixed-adapter batches: each row runs its own adapter, in inference, generation and training."""
from __future__ import annotations

import pytest
import torch

from conftest import inputs_for, output_of, tiny_gpt2, tiny_llama
from peftkit import LoraConfig, get_peft_model


def many(base, n=5, ranks=(2, 4, 8), same_scale=False, **kw):
    """``n`` random LoRA adapters; ranks cycle through ``ranks``; scales differ unless
    ``same_scale`` (alpha = r for all: s = 1, the mixed path's one-alpha case)."""
    alpha = (lambda i, r: r) if same_scale else (lambda i, r: 3 + i if i else 8)
    model = get_peft_model(base, LoraConfig(r=ranks[0], lora_alpha=alpha(0, ranks[0]), target_modules="all-linear",
                                            init_lora_weights=False, **kw))
    for i in range(1, n):
        r = ranks[i % len(ranks)]
        model.add_adapter(f"a{i}", LoraConfig(r=r, lora_alpha=alpha(i, r), target_modules="all-linear",
                                              init_lora_weights=False, **kw))
    return model


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"use_rslora": True}, {"same_scale": True}])
def test_mixed_rows_equal_single_adapter_rows(factory, variant):
    model = many(factory(), **variant).eval()
    names = ["default", "a1", "a2", "a3", "a4", "__base__", "a2", "default"]
    batch = inputs_for(model.get_base_model(), batch=len(names))
    single = {}
    for n in set(names) - {"__base__"}:
        model.set_adapter(n)
        single[n] = output_of(model, batch)
    with model.disable_adapter():
        single["__base__"] = output_of(model, batch)
    mixed = output_of(model, {**batch, "adapter_names": names})
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], single[n][i], atol=1e-5, rtol=1e-5)


def test_mixed_generation_equals_per_adapter_generation():
    model = many(tiny_llama(), n=3).eval()
    ids = torch.randint(2, 128, (3, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    names = ["a2", "default", "a1"]
    mixed = model.generate(input_ids=ids, adapter_names=names, **kw)
    for i, n in enumerate(names):
        model.set_adapter(n)
        alone = model.generate(input_ids=ids[i:i + 1], **{**kw, "attention_mask": kw["attention_mask"][i:i + 1]})
        assert torch.equal(mixed[i], alone[0]), n


def test_mixed_batch_trains_each_rows_own_adapter():
    model = many(tiny_llama(), n=3, ranks=(4,))
    model.train()
    model.base_model.set_adapter(["default", "a1", "a2"])
    names = ["a1", "a1", "__base__", "default"]
    batch = inputs_for(model.get_base_model(), batch=4)
    out = model(**batch, adapter_names=names, labels=batch["input_ids"])
    out.loss.backward()
    grads = {n: 0.0 for n in ("default", "a1", "a2")}
    for pname, p in model.named_parameters():
        if ".deltas." in pname and p.grad is not None:
            grads[pname.split(".deltas.")[1].split(".")[0]] += p.grad.abs().sum().item()
    assert grads["a1"] > 0 and grads["default"] > 0
    assert grads["a2"] == 0.0  # no row used it


def test_merged_adapters_refuse_mixed_batches_and_bad_lengths():
    model = many(tiny_llama(), n=2).eval()
    batch = inputs_for(model.get_base_model(), batch=2)
    with pytest.raises(ValueError, match="2 rows"):
        model(**batch, adapter_names=["default", "a1", "a1"])
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge"):
        model(**batch, adapter_names=["default", "a1"])
