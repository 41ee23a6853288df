"""LoftQ and EVA initialisations against Hugging Face PEFT's own results on tiny models.

PEFT 0.21 runs LoftQ's quantiser through bitsandbytes on a CUDA/XPU device; here its
``loftq_init`` runs unchanged on CPU tensors (``cuda_as_cpu`` maps the device it asks for to the
CPU, where bitsandbytes 0.50 has the same NF4 / int8 kernels).
"""
from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

from conftest import inputs_for, output_of, perturb, tiny_llama
from peftkit import (ConfigError, EvaConfig, LoftQConfig, LoraConfig, PeftModel, get_eva_state_dict, get_peft_model,
                     initialize_lora_eva_weights, replace_lora_weights_loftq)
from peftkit.methods.lora.loftq import loftq_init, nf4_levels

peft = pytest.importorskip("peft")
EVA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _cpu_device(args, kwargs):
    def fix(d):
        if isinstance(d, str) and d.split(":")[0] in ("cuda", "xpu"):
            return "cpu"
        if isinstance(d, torch.device) and d.type in ("cuda", "xpu"):
            return torch.device("cpu")
        return d
    return tuple(fix(a) for a in args), {k: fix(v) if k == "device" else v for k, v in kwargs.items()}


@contextlib.contextmanager
def cuda_as_cpu(monkeypatch):
    """Run PEFT's LoftQ code, which moves tensors to "cuda", on this CPU-only machine."""
    bnb = pytest.importorskip("bitsandbytes")
    t_to, p_to = torch.Tensor.to, bnb.nn.Params4bit.to

    def tensor_to(self, *a, **k):
        a, k = _cpu_device(a, k)
        return t_to(self, *a, **k)

    def params_to(self, *a, **k):
        a, k = _cpu_device(a, k)
        return p_to(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", tensor_to)
    monkeypatch.setattr(bnb.nn.Params4bit, "to", params_to)
    find = importlib.util.find_spec  # PEFT's LoraConfig asks for scipy, which LoftQ itself does not use
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: True if name == "scipy" else find(name, *a))
    yield
    monkeypatch.undo()


# ----- LoftQ -------------------------------------------------------------------------------------
def test_nf4_levels_are_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(64, 8)
    p = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
    torch.testing.assert_close(nf4_levels(), p.quant_state.code.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits,iters", [(4, 1), (4, 3), (8, 1), (8, 2)])
def test_loftq_init_matches_peft(bits, iters, monkeypatch):
    from peft.utils.loftq_utils import loftq_init as peft_loftq

    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(bits + iters))
    with cuda_as_cpu(monkeypatch):
        q_ref, a_ref, b_ref = peft_loftq(w, num_bits=bits, reduced_rank=4, num_iter=iters)
    q, a, b = loftq_init(w, bits, 4, iters)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(b @ a, b_ref @ a_ref, atol=1e-4, rtol=1e-4)
    assert (w - q - b @ a).norm() < (w - q).norm()  # the adapter removes part of the quantisation error


def test_loftq_model_matches_peft_and_reloads(monkeypatch, tmp_path):
    kw = dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="loftq")
    with cuda_as_cpu(monkeypatch):
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kw, loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=2)))
    ours = get_peft_model(tiny_llama(), LoraConfig(**kw, loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2)))
    assert ours.peft_config["default"].loftq_config == {"loftq_bits": 4, "loftq_iter": 2}
    batch = inputs_for(ours)
    full = output_of(tiny_llama(), batch)
    ref = output_of(theirs.eval(), batch)
    mine = output_of(ours.eval(), batch)
    torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)
    q_only = ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(q_only, tiny_llama().model.layers[0].self_attn.q_proj.weight)  # the base is now Q
    with ours.disable_adapter():
        assert (output_of(ours, batch) - full).abs().max() > (mine - full).abs().max()  # Q + BA is closer to W
    perturb(ours, 2)
    after = output_of(ours, batch)
    ours.save_pretrained(str(tmp_path))
    again = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()  # the base is quantised again on load
    torch.testing.assert_close(output_of(again, batch), after, atol=1e-5, rtol=1e-5)


def test_loftq_config_errors():
    with pytest.raises(ConfigError, match="loftq_config"):
        LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ConfigError, match="4 or 8"):
        LoftQConfig(loftq_bits=2)
    with pytest.raises(ConfigError, match="loftq_iter"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 0})
    with pytest.warns(UserWarning, match="ignored"):
        assert LoraConfig(loftq_config=LoftQConfig()).loftq_config == {}
    with pytest.raises(ValueError, match="nn.Linear"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens"], init_lora_weights="loftq",
                                                loftq_config=LoftQConfig()))


def test_replace_lora_weights_loftq_on_a_quantised_base(tmp_path):
    from peftkit.quant import all_modes, dequantize, quantize_model

    if "4bit" not in all_modes():
        pytest.skip("no 4-bit backend here")
    tiny_llama().save_pretrained(str(tmp_path))  # the unquantised weights, as model.safetensors
    model = quantize_model(tiny_llama(), "4bit")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    site = pm.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="model_path"):
        replace_lora_weights_loftq(pm)
    calls = []
    replace_lora_weights_loftq(pm, model_path=str(tmp_path), callback=lambda m, name: calls.append(name) or name.endswith("q_proj"))
    assert len(calls) == 4 and calls[0] == "model.layers.0.self_attn.q_proj"
    w = tiny_llama().model.layers[0].self_attn.q_proj.weight
    res = w - dequantize(site.base_layer).float()
    d = site.deltas["default"]
    u, s, vh = torch.linalg.svd(res)
    torch.testing.assert_close(d.lora_B @ d.lora_A, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=1e-4)
    v_site = pm.base_model.model.model.layers[0].self_attn.v_proj
    assert torch.count_nonzero(v_site.deltas["default"].lora_B) == 0  # the callback said no: left as it was


# ----- EVA ---------------------------------------------------------------------------------------
def _loader(n: int = 6, b: int = 4, t: int = 16):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 128, (b, t), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _a_factors(model, suffix):
    return {n[: -len(suffix)]: p.detach() for n, p in model.named_parameters() if n.endswith(suffix)}


# whiten only on layers that see inputs of their own: PEFT 0.21 whitens the shared SVD's components
# in place once per layer that shares them (q/k/v: three times); peftkit whitens each layer once
@pytest.mark.parametrize("eva,targets", [
    (dict(), EVA_TARGETS), (dict(rho=1.0), EVA_TARGETS), (dict(whiten=True, rho=1.5, tau=0.95), ["o_proj", "down_proj"]),
    (dict(adjust_scaling_factors=False, use_label_mask=False), EVA_TARGETS)])
def test_eva_matches_peft(eva, targets, tmp_path):
    from peft.tuners.lora.config import EvaConfig as PeftEva
    from peft.tuners.lora.eva import initialize_lora_eva_weights as peft_eva

    kw = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva")
    data = _loader()
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kw, eva_config=PeftEva(**eva)))
    peft_eva(theirs, data, show_progress_bar=False)
    ours = get_peft_model(tiny_llama(), LoraConfig(**kw, eva_config=EvaConfig(**eva)))
    batch = inputs_for(ours)
    before = output_of(ours, batch)
    assert initialize_lora_eva_weights(ours, data, show_progress_bar=False) is ours
    ct, co = theirs.peft_config["default"], ours.peft_config["default"]
    assert co.rank_pattern == ct.rank_pattern and co.alpha_pattern == ct.alpha_pattern
    assert sorted(co.target_modules) == sorted(ct.target_modules)
    a_t, a_o = _a_factors(theirs, ".lora_A.default.weight"), _a_factors(ours, ".deltas.default.lora_A")
    assert sorted(a_t) == sorted(a_o)
    for name in a_t:
        torch.testing.assert_close(a_o[name], a_t[name], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(output_of(ours, batch), before)  # B = 0: the model is unchanged
    if eva.get("rho", 2.0) > 1:
        assert len(set(co.rank_pattern.values())) > 1  # the ranks were redistributed
    # the result is an ordinary LoRA adapter in PEFT's format
    perturb(ours, 5)
    ours.eval()
    ref = output_of(ours, batch)
    ours.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(output_of(loaded, batch), ref, atol=1e-5, rtol=1e-5)
    back = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(output_of(back, batch), ref, atol=1e-5, rtol=1e-5)


def test_eva_state_dict_of_a_plain_model_then_load():
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=EVA_TARGETS, init_lora_weights="eva", eva_config=EvaConfig())
    data = _loader()
    state = get_eva_state_dict(tiny_llama(), data, peft_config=cfg, show_progress_bar=False)
    assert set(state) and all(not k.startswith("base_model") for k in state)
    direct = get_peft_model(tiny_llama(), cfg)
    initialize_lora_eva_weights(direct, data, show_progress_bar=False)
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=EVA_TARGETS, init_lora_weights="eva"))
    initialize_lora_eva_weights(pm, eva_state_dict=state)
    a1, a2 = _a_factors(direct, "lora_A"), _a_factors(pm, "lora_A")
    assert sorted(a1) == sorted(a2)
    for k in a1:
        torch.testing.assert_close(a1[k], a2[k])
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for n, p in pm.named_parameters() if "deltas.default" in n)


def test_eva_whitens_shared_inputs_once(monkeypatch):
    """q, k and v share one SVD; each layer's A is its components / sqrt(singular values), once."""
    from peftkit.methods.lora import eva as eva_mod

    hooks = {}

    class Recording(eva_mod._Capture):
        def __init__(self, name, *a, **k):
            super().__init__(name, *a, **k)
            if self.svd is not None:
                hooks[name] = self

    monkeypatch.setattr(eva_mod, "_Capture", Recording)
    targets = ["q_proj", "k_proj", "v_proj"]
    runs = {}
    for whiten in (False, True):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva",
                         eva_config=EvaConfig(whiten=whiten))
        runs[whiten] = get_eva_state_dict(tiny_llama(), _loader(), peft_config=cfg, show_progress_bar=False)
    assert sorted(hooks) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]  # one SVD per block
    for name, a in runs[False].items():
        svd = hooks[name.rsplit(".", 1)[0] + ".q_proj"].svd
        want = a / svd.singular_values_[: a.shape[0]].sqrt().reshape(-1, 1)
        torch.testing.assert_close(runs[True][name], want)


def test_eva_with_low_cpu_mem_usage_equals_without():
    """PEFT advises low_cpu_mem_usage=True for EVA (the factors start on the meta device)."""
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="eva")
    runs = []
    for low in (False, True):
        pm = get_peft_model(tiny_llama(), LoraConfig(**cfg, eva_config=EvaConfig()), low_cpu_mem_usage=low)
        initialize_lora_eva_weights(pm, _loader(), show_progress_bar=False)
        runs.append(pm)
    for (n, a), (_, b) in zip(runs[0].named_parameters(), runs[1].named_parameters()):
        assert not b.is_meta, n
        if "lora_A" in n:
            torch.testing.assert_close(a, b)
    batch = inputs_for(runs[1])
    torch.testing.assert_close(output_of(runs[1], batch), output_of(tiny_llama(), batch))


def test_eva_errors():
    with pytest.raises(ConfigError, match="rho"):
        EvaConfig(rho=0.5)
    with pytest.raises(ConfigError, match="tau"):
        EvaConfig(tau=1.5)
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        initialize_lora_eva_weights(pm, _loader())
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights="eva", eva_config=EvaConfig()))
    with pytest.raises(ValueError, match="dataloader"):
        initialize_lora_eva_weights(pm)
    with pytest.raises(ValueError, match="empty"):
        initialize_lora_eva_weights(pm, [])
    assert LoraConfig.from_dict(pm.peft_config["default"].to_dict()).eva_config == EvaConfig()


def _train_argv(tmp_path, *extra):
    from test_train_data import tiny_chat_model, write_jsonl

    model_dir = tiny_chat_model(str(tmp_path / "model"))
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": f"order {i}: {i % 7} lamps to city {i % 5}"} for i in range(12)])
    return ["train", "--model", model_dir, "--data", data, "-o", str(tmp_path / "out"), "--threads", "1",
            "--batch-size", "4", "--lr", "5e-3", "--max-steps", "2", "--save-every", "2", *extra]


def test_train_command_with_eva_and_loftq(tmp_path):
    """``peftkit train --set init_lora_weights=eva`` runs EVA on the training batches first; the saved
    config describes the redistributed ranks, and the adapter loads in PEFT. LoftQ runs from --set too."""
    import json

    from peftkit.cli import main

    argv = _train_argv(tmp_path, "--target", "q_proj,v_proj,o_proj", "--r", "4", "--set", "init_lora_weights=eva",
                       "--set", 'eva_config={"rho": 2.0, "tau": 0.9}')
    assert main(argv) == 0
    with open(tmp_path / "out" / "adapter" / "adapter_config.json") as fh:
        cfg = json.load(fh)
    assert cfg["init_lora_weights"] == "eva" and cfg["eva_config"]["tau"] == 0.9 and cfg["rank_pattern"]
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    ranks = {k[len("base_model.model."):-len(".lora_A.weight")]: int(v.shape[0])
             for k, v in saved.items() if k.endswith("lora_A.weight")}
    assert all(ranks[name] == r for name, r in cfg["rank_pattern"].items())
    assert sum(ranks.values()) <= 4 * len(ranks)  # the budget is redistributed, never grown
    argv = _train_argv(tmp_path / "lq", "--target", "q_proj", "--r", "4", "--alpha", "4", "--set",
                       "init_lora_weights=loftq", "--set", 'loftq_config={"loftq_bits": 4, "loftq_iter": 1}')
    assert main(argv) == 0


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM

    from peftkit.models import ModelLoadError, resolve

    try:
        path = resolve(None, log=lambda *_: None)
    except ModelLoadError as e:
        pytest.skip(str(e))
    return lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.slow
def test_smollm2_loftq_and_eva_match_peft(smollm2, monkeypatch):
    """On the real model (GQA shapes, 576 -> 192 k/v projections): LoftQ's logits and EVA's ranks
    and A equal PEFT's."""
    from peft.tuners.lora.config import EvaConfig as PeftEva
    from peft.tuners.lora.eva import initialize_lora_eva_weights as peft_eva

    batch = {"input_ids": torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))}
    kw = dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1, 2],
              init_lora_weights="loftq")
    with cuda_as_cpu(monkeypatch):
        theirs = peft.get_peft_model(smollm2(), peft.LoraConfig(**kw, loftq_config=peft.LoftQConfig(loftq_bits=4)))
    ours = get_peft_model(smollm2(), LoraConfig(**kw, loftq_config=LoftQConfig(loftq_bits=4)))
    torch.testing.assert_close(output_of(ours, batch), output_of(theirs, batch), atol=1e-3, rtol=1e-3)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 49152, (2, 48), generator=g)} for _ in range(4)]
    kw = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
              layers_to_transform=[0, 1], init_lora_weights="eva")
    theirs = peft.get_peft_model(smollm2(), peft.LoraConfig(**kw, eva_config=PeftEva(tau=0.9)))
    peft_eva(theirs, data, show_progress_bar=False)
    ours = get_peft_model(smollm2(), LoraConfig(**kw, eva_config=EvaConfig(tau=0.9)))
    initialize_lora_eva_weights(ours, data, show_progress_bar=False)
    assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern
    a_t, a_o = _a_factors(theirs, ".lora_A.default.weight"), _a_factors(ours, ".deltas.default.lora_A")
    assert sorted(a_t) == sorted(a_o)
    for name in a_t:
        torch.testing.assert_close(a_o[name], a_t[name], atol=1e-4, rtol=1e-3)
