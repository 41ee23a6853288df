"""BitFit: train only the bias terms.

Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models" (arXiv:2106.10199). Family: selective (Lialin et al. 2023, section 7).

Equation, for a frozen layer ``y = W x + b``::

    y' = W x + (b + Δb),      Δb: out (the output channels)

    x ──► W ──► + b ──► + Δb ──► y'

Initialisation: ``Δb = 0`` (the model starts at the base). The difference is what trains, not a
copy of ``b``, so several BitFit adapters can sit on one model, be switched per batch row and
be merged exactly (``b += Δb``; unmerging subtracts). Sites: nn.Linear, GPT-2 Conv1D,
nn.LayerNorm (channels last) and nn.Conv1d/Conv2d (channels in dimension 1), each only when it
has a bias. Hugging Face PEFT has no BitFit adapter type (its closest is LoRA's ``bias="all"``),
so the file format is peftkit's own: ``<layer>.bitfit_bias``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Union

import torch
from torch import nn

from ..config import ConfigError, PeftConfig, PeftType
from ..core.inject import iter_candidates, linear_types, matches_targets
from ..core.method import Delta, Method, UnsupportedSite
from ..core.registry import register_method
from ..core.site import Site
from ._shared import normalise_targets

_CHANNELS_LAST = linear_types() + (nn.LayerNorm,)
_CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d)


@dataclasses.dataclass
class BitFitConfig(PeftConfig):
    """Configuration of BitFit.

    Args:
        target_modules: layers whose bias trains (names, dotted suffixes, a regex); None: every
            supported layer that has a bias.
        exclude_modules: same forms; matching modules are skipped.
        modules_to_save: modules trained in full and saved with the adapter.
    """

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.BITFIT.value
        super().__post_init__()
        normalise_targets(self)


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


class BitFitDelta(Delta):
    """A trainable offset to one layer's bias."""

    mergeable = True
    peft_names = {"bitfit_bias": "bitfit_bias"}

    def __init__(self, bias: torch.Tensor, channel_dim: int):
        super().__init__()
        self.channel_dim = channel_dim
        self.bitfit_bias = nn.Parameter(torch.zeros_like(bias, dtype=torch.float32 if bias.dtype in (
            torch.float16, torch.bfloat16) else bias.dtype))

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        b = self.bitfit_bias
        if self.channel_dim == 1:
            b = b.view(-1, *([1] * (y.dim() - 2)))
        return y + b

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.bitfit_bias

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        base.bias.add_(self.bitfit_bias.to(base.bias.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        base.bias.sub_(self.bitfit_bias.to(base.bias.dtype))


@register_method
class BitFitMethod(Method):
    """BitFit at every biased Linear/Conv1D/LayerNorm/Conv layer (or the named ones)."""

    name = "BITFIT"
    config_cls = BitFitConfig

    def is_target(self, config, path, module, model) -> bool:
        if config.target_modules is not None:
            return matches_targets(config, path, module, model)
        base = module.base_layer if isinstance(module, Site) else module
        if not (isinstance(base, _CHANNELS_LAST + _CHANNELS_FIRST) and _has_bias(base)):
            return False
        ex = config.exclude_modules
        if ex is None:
            return True
        if isinstance(ex, str):
            return re.fullmatch(ex, path) is None
        return not any(path == t or path.endswith("." + t) for t in ex)

    def prepare(self, config, model):
        if config.target_modules is None and not any(
                self.is_target(config, p, m, model) for p, m in iter_candidates(model)):
            raise ConfigError(f"BitFit: {type(model).__name__} has no biased Linear/Conv1D/LayerNorm/Conv "
                              "layer (Llama-style models have no biases). Choose a method that adds "
                              "parameters, e.g. (IA)^3 or LoRA.")
        return config

    def supported_sites(self):
        return ["nn.Linear", "transformers Conv1D", "nn.LayerNorm", "nn.Conv1d", "nn.Conv2d (with a bias)"]

    def make_delta(self, config: BitFitConfig, path: str, module: nn.Module, adapter_name: str) -> Delta:
        if not _has_bias(module):
            raise UnsupportedSite(f"{type(module).__name__} has no bias to tune.")
        if isinstance(module, _CHANNELS_LAST):
            return BitFitDelta(module.bias, -1)
        if isinstance(module, _CHANNELS_FIRST):
            return BitFitDelta(module.bias, 1)
        raise UnsupportedSite(f"layer type {type(module).__name__} is not supported by BitFit.")
