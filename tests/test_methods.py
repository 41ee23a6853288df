"""The survey's other methods, what is their own: clear errors, parameter counts, AdaLoRA's schedule.

Each method over the model families (identity, merging, several adapters, mixed batches,
training, save/load, PEFT parity) is a row of the table in tests/matrix.py, run by
tests/test_matrix.py. Hugging Face PEFT specifics live in test_methods_peft.py, the hybrids in
test_methods_hybrid.py.
"""
from __future__ import annotations

import pytest
import torch

from conftest import inputs_for, output_of
from peftkit import (AdaLoraConfig, BitFitConfig, BottleneckConfig, IA3Config, LNTuningConfig, LoHaConfig,
                     LoKrConfig, PeftModel, VeraConfig, get_peft_model)
from peftkit.config import ConfigError
from peftkit.core.site import Site

BAD_CONFIGS = [
    (lambda: LoHaConfig(r=0), "r must be a positive integer"),
    (lambda: LoKrConfig(init_weights="zeros"), "init_weights must be one of"),
    (lambda: LoHaConfig(rank_dropout=1.5), "probability"),
    (lambda: IA3Config(target_modules=["k"], feedforward_modules=["wo"]), "not in target_modules"),
    (lambda: VeraConfig(bias="all"), "only 'none'"),
    (lambda: AdaLoraConfig(), "total_step"),
    (lambda: AdaLoraConfig(total_step=10, tinit=8, tfinal=5), "no pruning phase"),
    (lambda: AdaLoraConfig(total_step=10, target_r=20), "cannot exceed init_r"),
    (lambda: AdaLoraConfig(total_step=10, use_dora=True), "DoRA"),
    (lambda: BottleneckConfig(adapter_type="sideways"), "adapter_type"),
    (lambda: BottleneckConfig(non_linearity="softmax"), "non_linearity"),
    (lambda: BottleneckConfig(reduction_factor=0), "positive integer"),
]


@pytest.mark.parametrize("make,match", BAD_CONFIGS)
def test_bad_configs_error_clearly(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_bad_placements_error_clearly():
    from conftest import tiny_bert_cls, tiny_llama, tiny_neox

    with pytest.raises(ConfigError, match="no biased"):
        get_peft_model(tiny_llama(), BitFitConfig())
    with pytest.raises(ConfigError, match="no default placement"):
        get_peft_model(tiny_bert_cls(), BottleneckConfig(adapter_type="parallel"))
    with pytest.raises(TypeError, match="supports"):
        get_peft_model(tiny_llama(), LoHaConfig(target_modules=["embed_tokens"]))
    with pytest.raises(TypeError, match="not a normalisation layer"):
        get_peft_model(tiny_llama(), LNTuningConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no default for model type 'gpt_neox'"):  # the table names its norms
        get_peft_model(tiny_neox(), LNTuningConfig())
    with pytest.raises(ValueError, match="matched no module"):
        get_peft_model(tiny_llama(), IA3Config(target_modules=["nope"]))
    with pytest.raises(ValueError, match="no default"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), IA3Config())


def test_trainable_counts_match_formulas():
    from conftest import tiny_llama

    # q: 32->32, v: 32->16 (GQA), down: 64->32; two layers
    shapes = [(32, 32), (16, 32), (32, 64)] * 2
    cases = {
        "ia3": (IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
                2 * (32 + 16 + 64)),
        "loha": (LoHaConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]),
                 sum(2 * 2 * (o + i) for o, i in shapes)),
        "vera": (VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]), sum(8 + o for o, _ in shapes)),
        "adalora": (AdaLoraConfig(init_r=4, target_r=2, total_step=5, target_modules=["q_proj", "v_proj", "down_proj"]),
                    sum(4 * (o + i) + 4 for o, i in shapes)),
        "houlsby": (BottleneckConfig(bottleneck_size=4), 2 * 2 * (32 * 4 + 4 + 4 * 32 + 32)),
    }
    for name, (cfg, expected) in cases.items():
        assert get_peft_model(tiny_llama(), cfg).get_nb_trainable_parameters()[0] == expected, name


def test_adalora_schedule_prunes_to_target_and_keeps_the_mask(tmp_path):
    from conftest import tiny_llama

    cfg = AdaLoraConfig(init_r=6, target_r=2, tinit=1, tfinal=3, deltaT=1, total_step=8,
                        target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(), cfg)
    batch = inputs_for(model.get_base_model())
    with pytest.raises(RuntimeError, match="after loss.backward"):
        model.base_model.update_and_allocate(0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    kept = []
    for step in range(cfg.total_step):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
        pattern = model.peft_config["default"].rank_pattern
        kept.append(sum(sum(v) for v in pattern.values()) if pattern else 4 * 6)
    assert kept[0] == kept[1] == 24  # warm-up: nothing pruned
    assert all(a >= b for a, b in zip(kept, kept[1:]))  # the budget only shrinks
    assert kept[-1] == 4 * 2  # target_r per layer, 4 layers
    for _, site in model.base_model.model.named_modules():
        if isinstance(site, Site):
            d = site.deltas["default"]
            assert torch.all(d.lora_E[~d.mask] == 0)  # re-applied after Adam moved them
    assert model.base_model.orth_regularization().item() >= 0
    model.save_pretrained(str(tmp_path))
    back = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    ranks = [s.deltas["default"].lora_A.shape[0] for _, s in back.base_model.model.named_modules() if isinstance(s, Site)]
    assert sum(ranks) == 8
    model.eval()
    torch.testing.assert_close(output_of(back, batch), output_of(model, batch), atol=1e-5, rtol=1e-5)
