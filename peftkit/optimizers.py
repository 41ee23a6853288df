"""Optimizers made for LoRA, under Hugging Face PEFT's names and signatures.

LoRA+ (Hayou, Ghosh & Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models",
arXiv:2402.12354). In ``W + s B A`` the two factors play different roles at large width, and one
learning rate for both is inefficient; LoRA+ gives ``B`` a larger one::

    eta_B = loraplus_lr_ratio * eta_A          (eta_A = lr; ratio >= 1, the paper suggests 2^4)

:func:`create_loraplus_optimizer` builds any torch optimizer over four parameter groups, as PEFT
does: ``A`` (and every other trainable matrix) at ``lr``; LoRA factors of embeddings at
``loraplus_lr_embedding`` (default 1e-6); ``B`` and 1-D tensors at ``lr * ratio`` (those that
PEFT would decay, with ``loraplus_weight_decay``; biases and LayerNorm weights without decay).

LoRA-FA (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language
Models Fine-tuning", arXiv:2308.03303). ``A`` (r x in) stays frozen at its initial value, so the
input activations need not be kept for its gradient; only ``B`` (out x r) trains, with its
gradient projected so that the update of ``W`` follows the full-rank gradient's projection onto
the row space of ``A``::

    g_B' = (1 / s^2) * g_B @ (A A^T + 1e-8 I)^+          (out x r) @ (r x r)
    B   <- AdamW step with g_B'  (decoupled decay B <- B - lr * wd * B after the step)

Every other trainable tensor (a task head, DoRA magnitudes) takes a plain AdamW step.
:func:`create_lorafa_optimizer` freezes every ``lora_A`` of the model and returns the optimizer.
PEFT's own step runs the projection under bfloat16 autocast when the machine supports bf16; this
one computes it in the gradient's dtype (PEFT's result with bf16 switched off, to rounding).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Optional

import torch
from torch import nn

__all__ = ["create_loraplus_optimizer", "create_lorafa_optimizer", "LoraFAOptimizer"]


def _lora_deltas(model: nn.Module):
    """Every LoRA Delta of ``model`` with its parameter path prefix."""
    from .methods.lora.delta import LoraDelta

    for name, mod in model.named_modules():
        if isinstance(mod, LoraDelta):
            yield name, mod


def _decayed_names(model: nn.Module) -> set[str]:
    """Parameter names outside ``nn.LayerNorm`` modules and without "bias" in their name
    (transformers' rule for which parameters get weight decay)."""
    out = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.LayerNorm):
            continue
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if "bias" not in full:
                out.add(full)
    return out


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, **kwargs) -> torch.optim.Optimizer:
    """An ``optimizer_cls`` over ``model``'s trainable parameters with LoRA+'s learning rates.

    Args:
        model: a peftkit PeftModel (or any module holding peftkit LoRA adapters).
        optimizer_cls: e.g. ``torch.optim.AdamW``.
        lr: learning rate of ``A`` (and of other trainable matrices).
        loraplus_lr_ratio: ``eta_B / eta_A`` (>= 1 in the paper).
        kwargs: ``loraplus_weight_decay`` (default 0.0), ``loraplus_lr_embedding`` (default 1e-6),
            everything else goes to ``optimizer_cls``.
    """
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr < 0:
        raise ValueError(f"lr must be a non-negative number, got {lr!r}")
    if not isinstance(loraplus_lr_ratio, (int, float)) or isinstance(loraplus_lr_ratio, bool) or loraplus_lr_ratio <= 0:
        raise ValueError(f"loraplus_lr_ratio must be a positive number (>= 1 in the paper), got {loraplus_lr_ratio!r}")
    from .methods.lora.delta import LoraEmbedding

    embedding_params = {id(p) for _, d in _lora_deltas(model) if isinstance(d, LoraEmbedding)
                        for p in d.parameters(recurse=False)}
    decayed = _decayed_names(model)
    group_a, group_emb, group_b, group_b_nd = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding_params:
            group_emb.append(p)
        elif "lora_B" in name or p.ndim == 1:
            (group_b if name in decayed else group_b_nd).append(p)
        else:
            group_a.append(p)
    wd = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_emb = kwargs.pop("loraplus_lr_embedding", 1e-6)
    groups = [
        {"params": group_a, "weight_decay": wd, "lr": lr},
        {"params": group_emb, "weight_decay": wd, "lr": lr_emb},
        {"params": group_b, "weight_decay": wd, "lr": lr * loraplus_lr_ratio},
        {"params": group_b_nd, "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameter: create the optimizer after get_peft_model, "
                         "with the adapter active and not in inference mode")
    return optimizer_cls(groups, lr=lr, **kwargs)


class LoraFAOptimizer(torch.optim.Optimizer):
    """AdamW in which each LoRA ``B`` steps on its LoRA-FA-projected gradient (module docstring).

    Args:
        params: the trainable parameters (or param groups).
        lora_pairs: ``{id(B): (A, scaling)}`` for every LoRA factor pair among ``params``.
        lr, betas, eps, weight_decay, correct_bias: as transformers' original AdamW
            (decoupled decay applied after the step; bias correction on by default).
    """

    def __init__(self, params: Iterable, lora_pairs: dict[int, tuple[torch.Tensor, float]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True):
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        for b in betas:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))
        self._pairs = lora_pairs

    def projected_grad(self, b: torch.Tensor) -> torch.Tensor:
        """``B``'s gradient after LoRA-FA's projection (its plain gradient when not a LoRA ``B``)."""
        pair = self._pairs.get(id(b))
        if pair is None:
            return b.grad
        a, s = pair
        a2 = a.detach().reshape(a.shape[0], -1)                 # r x in_flat
        g2 = b.grad.reshape(b.shape[0], -1) if b.dim() == 2 else b.grad.reshape(b.shape[0], b.shape[1])
        gram = a2 @ a2.T + 1e-8 * torch.eye(a2.shape[0], dtype=a2.dtype, device=a2.device)
        out = (g2 @ torch.linalg.pinv(gram).to(g2.dtype)) / (s * s)
        return out.reshape(b.grad.shape).to(b.grad.dtype)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """One AdamW step; LoRA ``B`` factors use :meth:`projected_grad`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = self.projected_grad(p)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def create_lorafa_optimizer(model: nn.Module, r: int, lora_alpha: float, lr: float, weight_decay: float = 0.0,
                            use_rslora: Optional[bool] = None) -> LoraFAOptimizer:
    """Freeze every LoRA ``A`` of ``model`` and return a :class:`LoraFAOptimizer` for the rest.

    Each pair uses its own layer's scale ``s`` (rank/alpha patterns, rsLoRA as configured); ``r``,
    ``lora_alpha`` (and the deprecated ``use_rslora``) are PEFT's arguments, checked against the
    adapters: a ``use_rslora`` that differs from an active adapter's config is an error.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer (the LoRA rank), got {r!r}")
    configs = getattr(model, "peft_config", None)
    configs = configs if isinstance(configs, dict) else {}
    active = [a for a in (model.active_adapters if configs else []) if a in configs]
    if use_rslora is not None:
        bad = [a for a in active if bool(getattr(configs[a], "use_rslora", False)) != use_rslora]
        if bad:
            raise ValueError(f"use_rslora={use_rslora} differs from the LoraConfig of the active adapters {bad}; "
                             "configure rsLoRA in LoraConfig and drop the deprecated use_rslora argument.")
        warnings.warn("create_lorafa_optimizer(use_rslora=...) is deprecated in PEFT; set it in LoraConfig.",
                      FutureWarning, stacklevel=2)
    pairs: dict[int, tuple[torch.Tensor, float]] = {}
    for _, d in _lora_deltas(model):
        a, b = (d.lora_embedding_A, d.lora_embedding_B) if hasattr(d, "lora_embedding_A") else (d.lora_A, d.lora_B)
        a.requires_grad_(False)
        pairs[id(b)] = (a, float(d.scaling))
    if not pairs:
        raise ValueError("create_lorafa_optimizer needs a model with LoRA adapters (get_peft_model with a LoraConfig)")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameter is left: activate the adapter in training mode first")
    return LoraFAOptimizer([{"params": params, "lr": lr, "weight_decay": weight_decay}], pairs, lr=lr,
                           weight_decay=weight_decay)
