"""LLaMA-Adapter's adaption prompts (Zhang et al., 2023, "LLaMA-Adapter: Efficient Fine-tuning
of Language Models with Zero-init Attention", arXiv:2303.16199). Family: additive (soft prompts
inside attention).

Equation: in each of the top ``adapter_layers`` attention layers, the queries of the real tokens
also attend to ``adapter_len`` learned prompt vectors P_l, with their own softmax and a gate g_l
that starts at zero ("zero-init attention"), so training starts exactly at the base model:

    K_p = W_k P_l,  V_p = W_v P_l                      (the layer's own frozen projections)
    out = Attn(x) + W_o( g_l * softmax(q K_p^T / sqrt(d_h)) V_p )

q carries the layer's rotary position embedding; the prompt keys carry none (as in the paper).
Initialisation: P_l ~ N(0, 1), g_l = 0. The gate is one scalar per layer multiplying the
softmax, as Hugging Face PEFT implements and saves it (``adaption_gate`` of shape (1,)); the
paper's official code uses tanh(g) per head. peftkit follows PEFT so that adapters load in both
libraries with equal logits. GPT-2 (fused ``c_attn``) adds the prompt output without ``c_proj``,
again as PEFT does.

Shapes::

    P_l: (1, L_p, d) -> K_p, V_p: (1, kv_heads, L_p, d_h) -> repeated to (1, heads, L_p, d_h)
    q: (B, heads, T, d_h);  scores: (B, heads, T, L_p);  prompt output: (B, T, d)

Design: why not a Site/Delta. A Delta sees (x, y) of a module called with one positional input;
the prompt attention needs the rotary embedding and transformers calls attention modules with
keyword arguments only. So this method wraps each chosen attention module in
:class:`AdaptedAttention` (placed with ``setattr``, removed on unload, nothing patched) that runs
the original module and adds the gated prompt term. It belongs to the prompt interface
(core/prompt.py) like the other soft-prompt methods; core/ knows nothing of it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, PeftConfig, PeftType
from ..core.prompt import PromptMethod
from ..core.registry import register_method
from ..core.site import BaseLayerPassthrough
from ..io.checkpoint import CheckpointError

#: model_type -> (default attention module name, layout): the families whose attention math is known
SUPPORTED = {"llama": ("self_attn", "llama"), "mistral": ("self_attn", "llama"), "gpt2": ("attn", "gpt2")}
PREFIX = "base_model.model."


@dataclasses.dataclass
class AdaptionPromptConfig(PeftConfig):
    """LLaMA-Adapter (Hugging Face PEFT's ``AdaptionPromptConfig`` fields).

    Args:
        adapter_len: number of prompt vectors per layer.
        adapter_layers: how many attention layers, counted from the top, get prompts.
        target_modules: the attention modules' attribute name (default: ``self_attn``, GPT-2 ``attn``).
    """

    target_modules: Optional[str] = None
    adapter_len: Optional[int] = None
    adapter_layers: Optional[int] = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.ADAPTION_PROMPT.value
        super().__post_init__()
        for field in ("adapter_len", "adapter_layers"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"AdaptionPromptConfig.{field} must be a positive integer, got {v!r}.")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ConfigError("AdaptionPromptConfig.target_modules is one attribute name such as 'self_attn'.")

    @property
    def is_adaption_prompt(self) -> bool:
        return True


class AdaptionPrompt(nn.Module):
    """One adapter's prompt and gate at one layer (Hugging Face PEFT's parameter names)."""

    def __init__(self, adapter_len: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.adaption_prompt = nn.Parameter(torch.empty(1, adapter_len, hidden, dtype=dtype).normal_())
        self.adaption_gate = nn.Parameter(torch.zeros(1, dtype=dtype))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AdaptedAttention(BaseLayerPassthrough):
    """An attention module plus the gated prompt attention of the active adapters."""

    def __init__(self, base_layer: nn.Module, layout: str):
        super().__init__()
        self.base_layer = base_layer
        self.layout = layout
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if not self.active:
            return out
        # transformers passes hidden_states first (Llama by keyword, GPT-2 positionally) and
        # Llama's rotary (cos, sin) as position_embeddings, its second parameter
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError("Adaption prompts are not supported in cross-attention.")
        attn, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        for name in self.active:
            a = self.adapters[name]
            if self.layout == "llama":
                cos_sin = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
                attn = attn + self._llama(a, hidden, cos_sin, attn.dtype)
            else:
                attn = attn + self._gpt2(a, hidden, attn.dtype)
        return (attn, *rest) if isinstance(out, tuple) else attn

    def _scores(self, a: AdaptionPrompt, q, k, v, dtype):
        scores = torch.matmul(q, k.transpose(2, 3).to(q.dtype)) / math.sqrt(q.shape[-1])
        scores = a.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        b, _, t, _ = q.shape
        return torch.matmul(scores, v).transpose(1, 2).reshape(b, t, -1)

    def _llama(self, a: AdaptionPrompt, hidden, cos_sin, dtype):
        base = self.base_layer
        hd, heads = base.head_dim, base.config.num_attention_heads
        kv = base.k_proj.out_features // hd
        b, t, _ = hidden.shape
        n = a.adaption_prompt.shape[1]
        # materialised per row (not expand): batched matmul then rounds exactly as PEFT's does
        k = base.k_proj(a.adaption_prompt).view(1, n, kv, hd).repeat(b, 1, 1, 1).transpose(1, 2)
        v = base.v_proj(a.adaption_prompt).view(1, n, kv, hd).repeat(b, 1, 1, 1).transpose(1, 2)
        k = torch.repeat_interleave(k, heads // kv, dim=1)
        v = torch.repeat_interleave(v, heads // kv, dim=1)
        q = base.q_proj(hidden).view(b, t, heads, hd).transpose(1, 2)
        if cos_sin is None:
            raise ValueError("LLaMA-style attention was called without position_embeddings; this transformers "
                             "version passes rotary embeddings differently and is not supported here.")
        cos, sin = cos_sin[0].unsqueeze(1), cos_sin[1].unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        return base.o_proj(self._scores(a, q, k, v.to(q.dtype), dtype)).to(dtype)

    def _gpt2(self, a: AdaptionPrompt, hidden, dtype):
        base = self.base_layer
        hd, width = base.head_dim, base.split_size
        b, t, _ = hidden.shape
        n = a.adaption_prompt.shape[1]
        _, k, v = base.c_attn(a.adaption_prompt).split(width, dim=2)
        k = k.view(1, n, -1, hd).repeat(b, 1, 1, 1).transpose(1, 2)
        v = v.view(1, n, -1, hd).repeat(b, 1, 1, 1).transpose(1, 2)
        q = base.c_attn(hidden).split(width, dim=2)[0].view(b, t, -1, hd).transpose(1, 2)
        return self._scores(a, q, k, v, dtype).to(dtype)


def _wrappers(model: nn.Module):
    return [(p, m) for p, m in model.named_modules() if isinstance(m, AdaptedAttention)]


@register_method
class AdaptionPromptMethod(PromptMethod):
    """LLaMA-Adapter: gated prompt attention in the top attention layers."""

    name = "ADAPTION_PROMPT"
    config_cls = AdaptionPromptConfig
    supports_many_active = True

    def prepare(self, config: AdaptionPromptConfig, model: nn.Module) -> AdaptionPromptConfig:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        if mt not in SUPPORTED:
            raise ConfigError(f"Adaption prompts support model types {sorted(SUPPORTED)}, got {mt!r} "
                              f"({type(model).__name__}); their attention math is written per family.")
        if config.target_modules is None:
            config = dataclasses.replace(config, target_modules=SUPPORTED[mt][0])
        return config

    def _targets(self, config, model):
        found = [(p, m) for p, m in model.named_modules() if p.endswith("." + config.target_modules)]
        if not found:
            raise ConfigError(f"No module named {config.target_modules!r} in {type(model).__name__}.")
        if config.adapter_layers > len(found):
            raise ConfigError(f"adapter_layers={config.adapter_layers} but the model has only {len(found)} "
                              f"{config.target_modules!r} modules; use at most {len(found)}.")
        return found[-config.adapter_layers:]

    def attach(self, host, name, config) -> None:
        model = host.model
        layout = SUPPORTED[model.config.model_type][1]
        for path, module in self._targets(config, model):
            if not isinstance(module, AdaptedAttention):
                parent, _, child = path.rpartition(".")
                module = AdaptedAttention(module, layout)
                setattr(model.get_submodule(parent), child, module)
            ref = module.base_layer.q_proj if layout == "llama" else module.base_layer.c_proj
            dtype = ref.weight.dtype if ref.weight.is_floating_point() else torch.float32
            module.adapters[name] = AdaptionPrompt(config.adapter_len, model.config.hidden_size, dtype).to(
                ref.weight.device)

    def detach(self, host, name) -> None:
        for path, module in _wrappers(host.model):
            if name in module.adapters:
                del module.adapters[name]
                module.active = [a for a in module.active if a != name]
            if not len(module.adapters):
                parent, _, child = path.rpartition(".")
                setattr(host.model.get_submodule(parent), child, module.base_layer)

    def set_active(self, host, names) -> None:
        for _, module in _wrappers(host.model):
            module.active = [n for n in names if n in module.adapters]

    def adapter_parameters(self, host, name):
        for _, module in _wrappers(host.model):
            if name in module.adapters:
                yield from module.adapters[name].parameters()

    def _entries(self, host, name):
        for path, module in _wrappers(host.model):
            if name in module.adapters:
                for k, v in module.adapters[name].named_parameters():
                    yield f"{PREFIX}{path}.{k}", v

    def state_to_save(self, host, name):
        return {k: v.detach() for k, v in self._entries(host, name)}

    def load_plan(self, host, name, tensors, source):
        expected = dict(self._entries(host, name))
        plan = []
        for k, v in tensors.items():
            if k not in expected:
                raise CheckpointError(f"{source}: tensor {k!r} has no place here; adaption prompts sit at "
                                      f"{sorted(expected)[:2]} ... (another model, or other adapter_layers?).")
            if tuple(expected[k].shape) != tuple(v.shape):
                raise CheckpointError(f"{source}: tensor {k!r} has shape {tuple(v.shape)} but this model needs "
                                      f"{tuple(expected[k].shape)} (another hidden size or adapter_len).")
            plan.append((expected[k], v))
        missing = [k for k in expected if k not in tensors]
        if missing:
            raise CheckpointError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing).")
        return plan

    def forward(self, host, name, config, kwargs):
        return host.model(**kwargs)

    def generate(self, host, name, config, kwargs):
        # The prompt keys carry no position while the queries do, so absolute positions matter:
        # number real tokens from the mask, and a left-padded row decodes as it does alone.
        mask = kwargs.get("attention_mask")
        if mask is not None and kwargs.get("position_ids") is None and mask.dim() == 2:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return host.model.generate(**kwargs)
