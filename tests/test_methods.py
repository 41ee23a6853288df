"""The survey's other families over the tiny model matrix: identity, merging, training, save/load.

One row per method (x family where it applies). Hugging Face PEFT interop lives in
test_methods_peft.py, AdaLoRA's schedule and the hybrids in test_methods_extra.py.
"""
from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, inputs_for, output_of
from peftkit import (AdaLoraConfig, BitFitConfig, BottleneckConfig, IA3Config, LNTuningConfig, LoHaConfig,
                     LoKrConfig, PeftModel, VeraConfig, get_peft_model)
from peftkit.config import ConfigError
from peftkit.core.site import Site

LINEAR_TARGETS = {fam: targets for fam, (_, targets) in FAMILIES.items()}

# method -> (config factory taking the family, families, mergeable)
METHODS = {
    "ia3": (lambda fam: IA3Config(), ["llama", "gpt2", "bert", "t5"], True),
    "loha": (lambda fam: LoHaConfig(r=2, alpha=4, target_modules=LINEAR_TARGETS[fam]), ["llama", "gpt2", "bert", "t5"], True),
    "lokr": (lambda fam: LoKrConfig(r=2, alpha=4, target_modules=LINEAR_TARGETS[fam]), ["llama", "gpt2", "bert", "t5"], True),
    "lokr_both": (lambda fam: LoKrConfig(r=1, decompose_both=True, target_modules=LINEAR_TARGETS[fam]), ["llama"], True),
    "vera": (lambda fam: VeraConfig(r=8, target_modules=LINEAR_TARGETS[fam]), ["llama", "gpt2", "bert", "t5"], True),
    "adalora": (lambda fam: AdaLoraConfig(init_r=4, target_r=2, total_step=20, target_modules=LINEAR_TARGETS[fam]),
                ["llama", "gpt2", "bert", "t5"], True),
    "ln_tuning": (lambda fam: LNTuningConfig(), ["llama", "gpt2", "bert", "t5"], True),
    "bitfit": (lambda fam: BitFitConfig(), ["gpt2", "bert"], True),
    "houlsby": (lambda fam: BottleneckConfig(adapter_type="houlsby", reduction_factor=4), ["llama", "gpt2", "bert", "t5"], False),
    "pfeiffer": (lambda fam: BottleneckConfig(adapter_type="pfeiffer", bottleneck_size=4, use_layernorm=True),
                 ["llama", "gpt2", "bert", "t5"], False),
    "parallel": (lambda fam: BottleneckConfig(adapter_type="parallel", bottleneck_size=4, scaling=4.0),
                 ["llama", "gpt2", "t5"], False),
}
CASES = [(m, f) for m, (_, fams, _) in METHODS.items() for f in fams]
MERGEABLE = [(m, f) for m, f in CASES if METHODS[m][2]]


def build(method: str, family: str):
    base = FAMILIES[family][0]()
    return base, METHODS[method][0](family)


@torch.no_grad()
def perturb(model, seed: int = 0, scale: float = 0.1) -> None:
    """Give every trainable adapter tensor non-trivial values (deterministically)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("method,family", CASES)
def test_identity_at_init_and_only_adapter_trainable(method, family):
    base, cfg = build(method, family)
    batch = inputs_for(base)
    ref = output_of(base, batch)
    model = get_peft_model(base, cfg).eval()
    torch.testing.assert_close(output_of(model, batch), ref, atol=1e-5, rtol=1e-5)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".deltas.default." in n for n in names), names


@pytest.mark.parametrize("method,family", MERGEABLE)
def test_merge_equals_unmerged_and_unmerge_restores(method, family):
    base, cfg = build(method, family)
    batch = inputs_for(base)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, cfg).eval()
    ref = output_of(model, batch)
    perturb(model)
    unmerged = output_of(model, batch)
    change = (unmerged - ref).abs().max().item()
    tol = dict(atol=change * 1e-3, rtol=0)  # BERT's logits are tiny: compare against the effect size
    assert change > 1e-4 * ref.abs().max().item()  # the perturbed adapter really changes the output
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, batch), unmerged, **tol)
    model.unmerge_adapter()
    torch.testing.assert_close(output_of(model, batch), unmerged, **tol)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(output_of(model, batch), ref, **tol)
    model.unmerge_adapter()
    restored = model.unload().state_dict()
    for k, v in weights.items():
        torch.testing.assert_close(restored[k], v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["houlsby", "parallel"])
def test_non_mergeable_says_so(method):
    base, cfg = build(method, "llama")
    model = get_peft_model(base, cfg)
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_adapter()


@pytest.mark.parametrize("method,family", CASES)
def test_training_lowers_loss_and_touches_only_the_adapter(method, family):
    base, cfg = build(method, family)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, cfg)
    model.eval()  # the base models' own dropout (T5's is functional) would make the loss noisy
    for m in model.modules():
        if isinstance(m, Site):
            m.deltas.train()
    batch = inputs_for(base, batch=4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-2)
    g = torch.Generator().manual_seed(3)
    target = torch.randn(output_of(model, batch).shape, generator=g)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(output_of(model, batch), target)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in params)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    after = model.unload().state_dict()
    for k, v in frozen.items():
        torch.testing.assert_close(after[k], v)


@pytest.mark.parametrize("method,family", [(m, fams[0]) for m, (_, fams, _) in METHODS.items()])
def test_save_load_identity_and_multiple_adapters(method, family, tmp_path):
    factory = FAMILIES[family][0]
    base, cfg = build(method, family)
    batch = inputs_for(base, batch=3)
    ref = output_of(base, batch)
    model = get_peft_model(base, cfg).eval()
    perturb(model, seed=1)
    model.add_adapter("second", METHODS[method][0](family))
    model.set_adapter("second")
    perturb(model, seed=2)
    outs = {}
    for name in ("default", "second"):
        model.set_adapter(name)
        outs[name] = output_of(model, batch)
    assert not torch.allclose(outs["default"], outs["second"])
    # one batch, one adapter per row
    mixed = output_of(model, {**batch, "adapter_names": ["second", "__base__", "default"]})
    for i, name in enumerate(["second", "__base__", "default"]):
        torch.testing.assert_close(mixed[i], (ref if name == "__base__" else outs[name])[i], atol=1e-5, rtol=1e-5)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
    torch.testing.assert_close(output_of(loaded, batch), outs["default"], atol=1e-6, rtol=1e-6)
    loaded.load_adapter(str(tmp_path / "second"), "second")
    loaded.set_adapter("second")
    torch.testing.assert_close(output_of(loaded, batch), outs["second"], atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())


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
    from conftest import tiny_bert_cls, tiny_llama

    with pytest.raises(ConfigError, match="no biased"):
        get_peft_model(tiny_llama(), BitFitConfig())
    with pytest.raises(ConfigError, match="no default placement"):
        get_peft_model(tiny_bert_cls(), BottleneckConfig(adapter_type="parallel"))
    with pytest.raises(TypeError, match="supports"):
        get_peft_model(tiny_llama(), LoHaConfig(target_modules=["embed_tokens"]))
    with pytest.raises(TypeError, match="not a normalisation layer"):
        get_peft_model(tiny_llama(), LNTuningConfig(target_modules=["q_proj"]))
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
