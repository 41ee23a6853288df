"""LoRA on bare parameters (``target_parameters``): fused MoE expert weights, against real PEFT."""
from __future__ import annotations

import pytest
import torch

from peftkit import LoraConfig, PeftModel, get_peft_model

peft = pytest.importorskip("peft")

TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
VOCAB = 100


def tiny_qwen3_moe():
    """Qwen3-MoE: experts stored (E, out, in)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, num_experts=4, num_experts_per_tok=2)).eval()


def tiny_gpt_oss():
    """gpt-oss: experts stored (E, in, out) (``is_transposed``), with biases."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    return GptOssForCausalLM(GptOssConfig(
        hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=VOCAB, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention", "full_attention"])).eval()


def tiny_mixtral():
    """Mixtral: experts stored (E, out, in)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=VOCAB, num_local_experts=4, num_experts_per_tok=2)).eval()


MODELS = {"qwen3_moe": tiny_qwen3_moe, "gpt_oss": tiny_gpt_oss, "mixtral": tiny_mixtral}


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, 8), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model):
    with torch.no_grad():
        return model(**batch()).logits


def cfg(**kw):
    return dict(dict(r=2, lora_alpha=4, target_modules=[], target_parameters=TARGETS, init_lora_weights=False), **kw)


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_peft_file_loads_here_with_same_logits(make, tmp_path):
    torch.manual_seed(3)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**cfg()))
    theirs.save_pretrained(tmp_path)
    expected = logits(theirs)
    ours = PeftModel.from_pretrained(make(), str(tmp_path))
    got = logits(ours)
    assert not torch.allclose(got, logits(make()), atol=1e-4)  # the adapter does change the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_our_file_loads_in_peft_with_same_logits(make, tmp_path):
    torch.manual_seed(4)
    ours = get_peft_model(make(), LoraConfig(**cfg(use_rslora=True)))
    ours.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path))
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)
    ref = peft.get_peft_model_state_dict(theirs)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(ref)
    assert all(saved[k].shape == ref[k].shape for k in ref)


def test_one_parameter_only_and_keys_match_peft(tmp_path):
    torch.manual_seed(5)
    c = cfg(target_parameters=["mlp.experts.down_proj"])
    theirs = peft.get_peft_model(tiny_qwen3_moe(), peft.LoraConfig(**c))
    ours = get_peft_model(tiny_qwen3_moe(), LoraConfig(**c))
    ours.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    ref = peft.get_peft_model_state_dict(theirs)
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.parametrize("make", [tiny_qwen3_moe, tiny_gpt_oss], ids=["qwen3_moe", "gpt_oss"])
def test_merge_and_unmerge(make):
    torch.manual_seed(6)
    base = make()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(**cfg()))
    adapted = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), adapted, atol=1e-5, rtol=1e-5)
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith(("gate_up_proj", "down_proj")) for k in changed)


def test_default_init_starts_at_the_base_and_trains_only_factors():
    model = get_peft_model(tiny_qwen3_moe(), LoraConfig(**cfg(init_lora_weights=True)))
    torch.testing.assert_close(logits(model), logits(tiny_qwen3_moe()))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    out = model(**batch(), labels=batch()["input_ids"])
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n)


def test_two_active_adapters_add_up_as_in_peft(tmp_path):
    files = []
    for seed, alpha in ((7, 4), (8, 8)):
        torch.manual_seed(seed)
        m = get_peft_model(tiny_qwen3_moe(), LoraConfig(**cfg(lora_alpha=alpha)))
        m.save_pretrained(str(tmp_path / str(seed)))
        files.append(str(tmp_path / str(seed)))
    ours = PeftModel.from_pretrained(tiny_qwen3_moe(), files[0])
    ours.load_adapter(files[1], adapter_name="b")
    theirs = peft.PeftModel.from_pretrained(tiny_qwen3_moe(), files[0])
    theirs.load_adapter(files[1], adapter_name="b")
    ours.base_model.set_adapter(["default", "b"])
    theirs.base_model.set_adapter(["default", "b"])
    both = logits(ours)
    torch.testing.assert_close(both, logits(theirs), atol=1e-5, rtol=1e-5)
    ours.set_adapter("b")
    assert not torch.allclose(both, logits(ours), atol=1e-4)


def test_mixed_batches_are_refused_clearly():
    model = get_peft_model(tiny_qwen3_moe(), LoraConfig(**cfg()))
    with pytest.raises(TypeError, match="mixed adapter batches"):
        model(**batch(), adapter_names=["default", "__base__"])


@pytest.mark.parametrize("bad", [dict(lora_dropout=0.1), dict(use_dora=True), dict(lora_bias=True),
                                 dict(target_parameters="experts.down_proj")])
def test_bad_configs_are_refused_before_any_work(bad):
    from peftkit import ConfigError

    with pytest.raises(ConfigError, match="target_parameters"):
        LoraConfig(**cfg(**bad))


def test_switching_adapters_under_compile_does_not_recompile():
    import torch._dynamo

    torch._dynamo.reset()
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(len(gm.graph.nodes))
        return gm.forward

    model = get_peft_model(tiny_qwen3_moe(), LoraConfig(**cfg()))
    torch.manual_seed(9)
    model.add_adapter("other", LoraConfig(**cfg()))
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = logits(model)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        model.set_adapter("default")
        compiled(**batch())
        n = len(compiles)
        assert n == 1  # one graph: no graph break at the experts either
        with torch._dynamo.config.patch(error_on_recompile=True):
            for name in ("other", "default", "other"):
                model.set_adapter(name)
                torch.testing.assert_close(compiled(**batch()).logits, expected[name], atol=1e-5, rtol=1e-5)
    assert len(compiles) == n
    torch._dynamo.reset()


def test_cli_set_expresses_target_parameters():
    import argparse

    from peftkit.train.options import method_config

    args = argparse.Namespace(method="lora", method_fields={}, set=['target_parameters=["experts.down_proj"]'])
    config = method_config(args, "CAUSAL_LM")
    assert config.target_parameters == ["experts.down_proj"] and config.target_modules is None
    model = get_peft_model(tiny_qwen3_moe(), config)
    deltas = [m for m in model.modules() if type(m).__name__ == "LoraParameters"]
    assert len(deltas) == 2 and all(d.names == ["down_proj"] for d in deltas)  # one owner per layer


def test_gradients_match_peft(tmp_path):
    from peftkit.methods.lora import LoraParameters

    torch.manual_seed(10)
    theirs = peft.get_peft_model(tiny_gpt_oss(), peft.LoraConfig(**cfg()))
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_gpt_oss(), str(tmp_path), is_trainable=True)
    for model in (theirs, ours):
        model.train()
        model(**batch(), labels=batch()["input_ids"]).loss.backward()
    ref = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    got = {}
    for path, m in ours.base_model.model.named_modules():  # each Delta's tensors under PEFT's keys
        if isinstance(m, LoraParameters):
            owner = path.rsplit(".deltas.", 1)[0]
            got.update({f"base_model.model.{owner}.{k}": p.grad for k, p in m.peft_state().items()})
    assert sorted(got) == sorted(ref) and len(ref) == 8  # 2 layers x 2 parameters x (A, B)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [tiny_qwen3_moe, tiny_gpt_oss], ids=["qwen3_moe", "gpt_oss"])
def test_rank_and_alpha_patterns_apply_per_parameter_as_in_peft(make, tmp_path):
    """PEFT matches rank_pattern/alpha_pattern against ``<owner>.<parameter>``: two parameters of
    one `experts` module get their own rank and scale; files and logits equal both ways."""
    kw = cfg(rank_pattern={"down_proj": 1}, alpha_pattern={"gate_up_proj": 8}, r=3)
    torch.manual_seed(5)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = PeftModel.from_pretrained(make(), str(tmp_path / "theirs"))
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)
    fresh = get_peft_model(make(), LoraConfig(**kw))
    shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items() if "lora_" in k}
    assert {s for k, s in shapes.items() if "down_proj.lora_A" in k} == {(4 * 1, 16)}  # E * r rows
    assert {s for k, s in shapes.items() if "gate_up_proj.lora_A" in k} == {(4 * 3, 32)}
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)


def test_hotswap_under_compile_without_recompiling(tmp_path):
    """hotswap_adapter copies another saved adapter of the same ranks into LoRA on parameters
    (its scale folded into B): the compiled model gives the new adapter's logits without a
    recompile; a file of another rank is refused and the model is left as it was."""
    import torch._dynamo
    from peftkit.io.checkpoint import CheckpointError
    from peftkit.methods.lora.hotswap import hotswap_adapter, prepare_for_hotswap

    torch.manual_seed(11)
    first = get_peft_model(tiny_qwen3_moe(), LoraConfig(**cfg(target_modules=["q_proj"])))
    first.save_pretrained(str(tmp_path / "a"))
    torch.manual_seed(12)
    second = get_peft_model(tiny_qwen3_moe(), LoraConfig(**cfg(target_modules=["q_proj"], lora_alpha=16,
                                                                alpha_pattern={"down_proj": 2})))
    second.save_pretrained(str(tmp_path / "b"))
    torch.manual_seed(13)
    get_peft_model(tiny_qwen3_moe(), LoraConfig(**cfg(r=3))).save_pretrained(str(tmp_path / "r3"))

    model = PeftModel.from_pretrained(tiny_qwen3_moe(), str(tmp_path / "a"))
    prepare_for_hotswap(model, target_rank=4)  # pads q_proj's LoRA, keeps the experts' ranks
    model.save_pretrained(str(tmp_path / "padded"))
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_qwen3_moe(), str(tmp_path / "padded"))),
                               logits(first), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**batch()).logits, logits(first), atol=1e-5, rtol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            hotswap_adapter(model, str(tmp_path / "b"), adapter_name="default")
            torch.testing.assert_close(compiled(**batch()).logits, logits(second), atol=1e-5, rtol=1e-5)
    before = logits(model)
    with pytest.raises(CheckpointError, match="same rank"):
        hotswap_adapter(model, str(tmp_path / "r3"), adapter_name="default")
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)
    torch._dynamo.reset()
