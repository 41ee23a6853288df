"""LoRA+ and LoRA-FA against Hugging Face PEFT's own optimizers.

The same adapter (saved by PEFT, loaded trainable into peftkit) is trained for a few steps by each
library's optimizer on the same batches; the adapted logits must stay equal.
"""
from __future__ import annotations

import pytest
import torch

from conftest import inputs_for, output_of, tiny_llama
from peftkit import PeftModel
from peftkit.optimizers import LoraFAOptimizer, create_lorafa_optimizer, create_loraplus_optimizer

peft = pytest.importorskip("peft")


def _pair(tmp_path, **lora):
    """(peft model, peftkit model) holding the same LoRA adapter, both trainable."""
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False)
    cfg.update(lora)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg))
    theirs.save_pretrained(str(tmp_path))
    ours = PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    return theirs, ours


def _train(model, opt, steps: int = 3) -> torch.Tensor:
    model.train()
    for k in range(steps):
        batch = inputs_for(model, seed=10 + k)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        return output_of(model, inputs_for(model, seed=99))


def test_loraplus_groups_and_training_match_peft(tmp_path):
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    theirs, ours = _pair(tmp_path, modules_to_save=["lm_head"])
    kw = dict(lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-4, loraplus_weight_decay=0.01)
    opt_t = peft_loraplus(theirs, torch.optim.AdamW, **kw)
    opt_o = create_loraplus_optimizer(ours, torch.optim.AdamW, **kw)
    sizes = lambda opt: [(g["lr"], g["weight_decay"], sorted(p.numel() for p in g["params"])) for g in opt.param_groups]
    assert sizes(opt_o) == sizes(opt_t)
    assert opt_o.param_groups[2]["lr"] == 16 * opt_o.param_groups[0]["lr"]
    before = output_of(ours.eval(), inputs_for(ours, seed=99)).detach()
    out_t, out_o = _train(theirs, opt_t), _train(ours, opt_o)
    assert (out_o - before).abs().max() > 1e-3
    torch.testing.assert_close(out_o, out_t, atol=1e-5, rtol=1e-5)


def test_loraplus_bad_input():
    model = tiny_llama()
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=0)
    with pytest.raises(ValueError, match="no trainable"):
        create_loraplus_optimizer(model.requires_grad_(False), torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4)


@pytest.mark.parametrize("rslora", [False, True])
def test_lorafa_matches_peft(tmp_path, monkeypatch, rslora):
    import peft.optimizers.lorafa as lorafa

    monkeypatch.setattr(lorafa, "is_bf16_available", lambda *a, **k: False)  # PEFT's fp32 path
    theirs, ours = _pair(tmp_path, target_modules=["q_proj", "v_proj"], use_rslora=rslora,
                         rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3})
    opt_t = lorafa.create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.1)
    a0 = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_A" in n}
    opt_o = create_lorafa_optimizer(ours, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.1)
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "lora_A" in n)
    before = output_of(ours.eval(), inputs_for(ours, seed=99)).detach()
    out_t, out_o = _train(theirs, opt_t), _train(ours, opt_o)
    assert (out_o - before).abs().max() > 1e-3
    torch.testing.assert_close(out_o, out_t, atol=1e-5, rtol=1e-4)
    for n, p in ours.named_parameters():  # A never moved
        if n in a0:
            assert torch.equal(p, a0[n])


def test_lorafa_projection_is_the_papers():
    """s * g_B' A = g_W A^T (A A^T)^-1 A: the change of W = s B A is the full-weight gradient
    projected onto the row space of the frozen A (g_W read off the base weight's own gradient)."""
    from peftkit import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    opt = create_lorafa_optimizer(pm, r=4, lora_alpha=8, lr=1e-3)
    site = pm.base_model.model.model.layers[0].self_attn.q_proj
    site.base_layer.weight.requires_grad_(True)
    batch = inputs_for(pm)
    pm(**batch, labels=batch["input_ids"]).loss.backward()
    delta = site.deltas["default"]
    a, s = delta.lora_A.detach(), delta.scaling
    g_w = site.base_layer.weight.grad
    projector = a.T @ torch.linalg.inv(a @ a.T) @ a
    torch.testing.assert_close(s * opt.projected_grad(delta.lora_B) @ a, g_w @ projector, atol=1e-6, rtol=1e-4)


def test_lorafa_needs_lora():
    with pytest.raises(ValueError, match="LoRA adapters"):
        create_lorafa_optimizer(tiny_llama(), r=4, lora_alpha=8, lr=1e-3)


@pytest.mark.parametrize("optim", ["loraplus", "lorafa"])
def test_train_command_uses_the_optimizer(optim, tmp_path, monkeypatch):
    """``peftkit train --optim loraplus|lorafa`` hands Trainer peftkit's optimizer (LoRA+'s B group
    at ratio x lr under Trainer's scheduler) and the run saves the adapter."""
    from safetensors.torch import load_file

    from peftkit.cli import main
    from peftkit.train import optim as O
    from test_train_data import tiny_chat_model, write_jsonl

    made = []
    real = O.build_optimizer
    monkeypatch.setattr(O, "build_optimizer", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    model_dir = tiny_chat_model(str(tmp_path / "model"))
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": f"order {i}: {i % 7} lamps to city {i % 5}"} for i in range(12)])
    argv = ["train", "--model", model_dir, "--data", data, "-o", str(tmp_path / "out"), "--threads", "1",
            "--batch-size", "4", "--lr", "5e-3", "--max-steps", "2", "--save-every", "2", "--optim", optim,
            "--loraplus-ratio", "8", "--set", "init_lora_weights=false"]
    assert main(argv) == 0
    (opt,) = made
    if optim == "loraplus":
        lrs = [g["initial_lr"] for g in opt.param_groups]
        assert lrs[2] == 8 * lrs[0] and opt.param_groups[2]["params"]
    else:
        assert isinstance(opt, LoraFAOptimizer)
    saved = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_A.weight") for k in saved)


def test_lorafa_refuses_other_methods():
    from peftkit import IA3Config, get_peft_model
    from peftkit.config import ConfigError
    from peftkit.train.optim import build_optimizer

    pm = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with pytest.raises(ConfigError, match="LoRA"):
        build_optimizer("lorafa", pm, 1e-3)
    assert build_optimizer("adamw", pm, 1e-3) is None


def test_train_refuses_lora_optimizers_for_other_methods_before_loading():
    from peftkit.cli import build_parser
    from peftkit.config import ConfigError
    from peftkit.train.options import parse_train_args

    parser, sub = build_parser()
    with pytest.raises(ConfigError, match="made for LoRA"):
        parse_train_args(parser, sub.choices["train"], ["train", "--method", "ia3", "--optim", "lorafa"])
    args = parse_train_args(parser, sub.choices["train"], ["train", "--optim", "loraplus", "--loraplus-ratio", "4"])
    assert args.trainer_optim == "adamw_torch_fused" and args.loraplus_ratio == 4.0
