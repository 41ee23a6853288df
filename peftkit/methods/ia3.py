"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (arXiv:2205.05638). Family: additive (Lialin et al. 2023, section 6), though the
vectors rescale existing activations rather than add a module.

Equations, for a frozen layer ``y = W x + b`` and a learned vector ``l``::

    attention keys/values (and any non-feed-forward target):  y' = l ⊙ (W x + b),  l: out
    feed-forward (``feedforward_modules``):                    y' = W (l ⊙ x) + b,  l: in

    x ──► W ──► ⊙ l ──► y'            x ──► ⊙ l ──► W ──► y'

On convolutions (nn.Conv2d, nn.Conv3d: the types PEFT 0.21 adapts; nn.Conv1d is refused, as
there) ``l`` scales channels, ``(1, C, 1, 1[, 1])`` on disk: output channels, or input channels for
feed-forward targets. Zero padding stays zero under the scaling, so both forms merge exactly;
for a grouped convolution input channel ``c`` of group ``g`` scales the weight's column
``c - g * in/groups`` in the rows of group ``g``::

    x: (N, C_in, *spatial) ──► conv_W ──► y: (N, C_out, *spatial) ──► ⊙ l[None, :, None, ...]

Initialisation: ``l = 1`` (the model starts exactly at the base). ``init_ia3_weights=False``
draws ``l ~ N(0, 1)`` (tests only).

Merging is exact and multiplicative: rows (or columns, feed-forward) of ``W`` are scaled by ``l``
and, for output scaling, the bias too; unmerging divides, so a zero in ``l`` cannot be undone
(the error says so). On disk: ``<module>.ia3_l`` of shape (out, 1), or (1, in) for feed-forward
layers, and (1, C, 1, ...) for convolutions, exactly as Hugging Face PEFT writes it.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Union

import torch
from torch import nn

from ..config import ConfigError, PeftConfig, PeftType
from ..core.method import Delta, Method, UnsupportedSite
from ..core.registry import register_method
from ._shared import adapter_dtype, from_2d, linear_dims, normalise_targets, weight_2d, with_default_targets

IA3_TARGETS = {
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
    "gemma": ["q_proj", "v_proj", "down_proj"], "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "mlp.c_proj"], "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "bert": ["key", "value", "output.dense"], "roberta": ["key", "value", "output.dense"],
    "t5": ["k", "v", "wo"], "opt": ["q_proj", "k_proj", "fc2"], "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"], "phi": ["q_proj", "v_proj", "fc2"],
}
IA3_FEEDFORWARD = {
    "llama": ["down_proj"], "mistral": ["down_proj"], "qwen2": ["down_proj"], "qwen3": ["down_proj"],
    "gemma": ["down_proj"], "gemma2": ["down_proj"], "gpt2": ["mlp.c_proj"], "gpt_neox": ["dense_4h_to_h"],
    "bert": ["output.dense"], "roberta": ["output.dense"], "t5": ["wo"], "opt": ["fc2"],
    "bloom": ["mlp.dense_4h_to_h"], "falcon": ["dense_4h_to_h"], "phi": ["fc2"],
}


@dataclasses.dataclass
class IA3Config(PeftConfig):
    """Configuration of an (IA)^3 adapter (Hugging Face PEFT's fields and defaults).

    Args:
        target_modules: layers whose output (or input, for feed-forward ones) is rescaled; names,
            dotted suffixes, a regex or ``"all-linear"``; None picks the model family's default.
        exclude_modules: same forms; matching modules are skipped.
        feedforward_modules: the subset of targets treated as feed-forward (input scaling).
        fan_in_fan_out: weights stored (in, out) as in GPT-2's Conv1D (detected automatically).
        modules_to_save: modules trained in full and saved with the adapter.
        init_ia3_weights: True starts the vectors at 1 (identity).
    """

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    feedforward_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        self.peft_type = PeftType.IA3.value
        super().__post_init__()
        normalise_targets(self, "target_modules", "exclude_modules", "feedforward_modules")
        tm, ff = self.target_modules, self.feedforward_modules
        if isinstance(tm, list) and isinstance(ff, list) and not set(ff) <= set(tm):
            raise ConfigError(
                f"IA3Config.feedforward_modules {sorted(set(ff) - set(tm))} are not in target_modules "
                f"{tm}; every feed-forward module must also be a target."
            )

    def is_feedforward(self, path: str) -> bool:
        """PEFT's rule: a regex is full-matched, a list entry matches as a suffix of the path."""
        ff = self.feedforward_modules
        if ff is None:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, path) is not None
        return any(path.endswith(t) for t in ff)


#: Convolutions PEFT 0.21 adapts with (IA)^3 (its IA3Model refuses nn.Conv1d)
CONV_TYPES = (nn.Conv2d, nn.Conv3d)


class IA3Delta(Delta):
    """One learned scaling vector at a linear (or Conv1D) layer, or per channel at a convolution
    (``spatial`` > 0: the number of the kernel's dimensions)."""

    mergeable = True
    peft_names = {"ia3_l": "ia3_l"}

    def __init__(self, in_features: int, out_features: int, feedforward: bool, init: bool, spatial: int = 0):
        super().__init__()
        self.feedforward = feedforward
        self.transforms_input = feedforward
        self.spatial = spatial
        if spatial:  # PEFT's conv layout: (1, channels, 1, ...)
            shape = (1, in_features if feedforward else out_features) + (1,) * spatial
        else:
            shape = (1, in_features) if feedforward else (out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape) if init else torch.randn(shape))

    def _channels(self) -> torch.Tensor:
        """``l`` shaped to broadcast over the channel axis: the last one for linear layers, the
        one before the spatial axes for convolutions (batched or not)."""
        return self.ia3_l.reshape((-1,) + (1,) * self.spatial)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._channels()

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.feedforward:  # already applied to the input by the Site
            return y
        return y * self._channels()

    def _weight_scale(self, base: nn.Module) -> torch.Tensor:
        """``l`` shaped to multiply ``base.weight`` in its native layout."""
        w = base.weight
        l = self.ia3_l.to(w.dtype)
        if not self.spatial:  # (out, 1) scales rows of the (out, in) view, (1, in) its columns
            return from_2d(l.expand_as(weight_2d(base)), base)
        ones = (1,) * self.spatial
        if not self.feedforward:
            return l.reshape((-1, 1) + ones)
        g, out, per_group = base.groups, w.shape[0], w.shape[1]
        return l.reshape(g, 1, per_group).expand(g, out // g, per_group).reshape((out, per_group) + ones)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        base.weight.data.mul_(self._weight_scale(base))
        if not self.feedforward and getattr(base, "bias", None) is not None:
            base.bias.data.mul_(self.ia3_l.reshape(-1).to(base.bias.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        if (self.ia3_l == 0).any():
            raise ValueError("an (IA)^3 vector has exact zeros, so its merge cannot be divided out; "
                             "reload the base weights instead of unmerging.")
        base.weight.data.div_(self._weight_scale(base))
        if not self.feedforward and getattr(base, "bias", None) is not None:
            base.bias.data.div_(self.ia3_l.reshape(-1).to(base.bias.dtype))


@register_method
class IA3Method(Method):
    """(IA)^3 at Linear, Conv1D, Conv2d and Conv3d sites."""

    name = "IA3"
    config_cls = IA3Config

    def prepare(self, config: IA3Config, model: nn.Module) -> IA3Config:
        if config.target_modules is None:
            extra: dict[str, Any] = {}
            if config.feedforward_modules is None:
                from ..targets import default_targets

                extra["feedforward_modules"] = default_targets(model, IA3_FEEDFORWARD, "(IA)^3")
            return with_default_targets(config, model, IA3_TARGETS, "(IA)^3", **extra)
        return config

    def supported_sites(self):
        return ["nn.Linear", "transformers Conv1D", "nn.Conv2d", "nn.Conv3d (grouped too)"]

    def make_delta(self, config: IA3Config, path: str, module: nn.Module, adapter_name: str) -> Delta:
        feedforward = config.is_feedforward(path)
        if isinstance(module, CONV_TYPES):
            delta = IA3Delta(module.in_channels, module.out_channels, feedforward, config.init_ia3_weights,
                             spatial=module.weight.dim() - 2)
            return delta.to(adapter_dtype(module))
        dims = linear_dims(module)
        if dims is None:
            hint = (" Hugging Face PEFT 0.21 has no (IA)^3 for nn.Conv1d either; use LoRA, LoHa or LoKr there."
                    if isinstance(module, nn.Conv1d) else "")
            raise UnsupportedSite(f"layer type {type(module).__name__} is not supported by (IA)^3.{hint}")
        in_f, out_f, _ = dims
        delta = IA3Delta(in_f, out_f, feedforward, config.init_ia3_weights)
        return delta.to(adapter_dtype(module))
