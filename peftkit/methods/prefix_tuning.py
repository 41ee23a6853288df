"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation", arXiv:2101.00190). Family: additive (soft prompts in every layer).

Equation: every attention layer l attends over V learned keys and values before the real ones,

    head = softmax(q [K_l^P ; K_l]^T / sqrt(d_h)) [V_l^P ; V_l]

The prefixes enter through the model's KV cache, so the attention code is untouched. With
``prefix_projection`` they are reparametrised, ``[K^P ; V^P] = W2 tanh(W1 e)`` with e in R^{V x d}
(the paper's MLP, for stabler training); otherwise they are trained directly.
Initialisation: ``nn.Embedding``'s N(0, 1) and ``nn.Linear``'s defaults; ``init_weights="zero"``
zeroes the prefix (or the last projection), starting near the base model.
Grouped-query attention: prefixes have ``num_key_value_heads`` heads of ``head_dim`` (token_dim is
filled as their product), the shape the cache holds.

Shapes::

    encoder output: (V, L * 2 * kv_heads * d_h) -> (L*2, kv_heads, V, d_h)
    cache layer l:  K, V: (B, kv_heads, V, d_h); real tokens get position ids V, V+1, ...
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from ..config import ConfigError, PeftType
from ..core.prompt import PromptLearningConfig
from ..core.registry import register_method
from .prompt_tuning import PromptEmbedding
from .virtual_tokens import VirtualTokenMethod


@dataclasses.dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Hugging Face PEFT's ``PrefixTuningConfig`` fields and defaults).

    Args:
        num_virtual_tokens: V, the prefix length.
        prefix_projection: reparametrise the prefix through a two-layer MLP.
        encoder_hidden_size: the MLP's hidden width (default: token_dim).
        init_weights: None (random) or "zero".
    """

    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    init_weights: Optional[str] = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PREFIX_TUNING.value
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights must be None or 'zero', got {self.init_weights!r}.")


class PrefixEncoder(nn.Module):
    """e and the projection (parameter names as in Hugging Face PEFT: ``embedding``, ``transform``)."""

    direct = False

    def __init__(self, virtual: int, dim: int, hidden: int, out: int):
        super().__init__()
        self.embedding = nn.Embedding(virtual, dim)
        self.transform = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, out))

    def output(self) -> torch.Tensor:
        """The prefix, (V, L * 2 * token_dim)."""
        return self.transform(self.embedding.weight)


@register_method
class PrefixTuningMethod(VirtualTokenMethod):
    """Per-layer key/value prefixes through the KV cache."""

    name = "PREFIX_TUNING"
    config_cls = PrefixTuningConfig
    kv_prefix = True

    def make_encoder(self, config: PrefixTuningConfig, model: nn.Module) -> nn.Module:
        V, width = config.num_virtual_tokens, config.num_layers * 2 * config.token_dim
        if config.token_dim % config.num_attention_heads:
            raise ConfigError(f"token_dim={config.token_dim} is not a multiple of num_attention_heads="
                              f"{config.num_attention_heads}; leave both unset to read them from the model.")
        if config.prefix_projection and not config.inference_mode:
            enc = PrefixEncoder(V, config.token_dim, config.encoder_hidden_size, width)
            if config.init_weights == "zero":
                nn.init.zeros_(enc.transform[-1].weight)
                nn.init.zeros_(enc.transform[-1].bias)
            return enc
        enc = PromptEmbedding(V, width)
        if config.init_weights == "zero":
            nn.init.zeros_(enc.embedding.weight)
        return enc
