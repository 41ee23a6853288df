"""LayerNorm tuning: train only the normalisation layers' affine parameters.

Zhao et al. 2023, "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning"
(arXiv:2312.11420). Family: selective (Lialin et al. 2023, section 7).

Equation, for a normalisation layer with gain ``g`` and bias ``b`` (RMSNorm has no ``b``)::

    y = g' ⊙ norm(x) + b',      g', b': trainable copies of g, b (d each)

    x ──► norm ──► ⊙ g' ──► + b' ──► y        (the frozen g, b stay untouched beside it)

Initialisation: ``g' = g`` and ``b' = b`` (a deep copy), so the model starts at the base.
The copy stands in for the layer while its adapter is active (a replacing Delta), so several
LN-tuning adapters can live on one model; only one of them should be active at a time.
Merging copies the trained values into the layer (unmerging restores the originals). On disk:
``<layer>.ln_tuning_layers.<param>`` as Hugging Face PEFT writes it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
from torch import nn

from ..config import PeftConfig, PeftType
from ..core.copies import ModuleCopy
from ..core.method import Delta, Method, UnsupportedSite
from ..core.registry import register_method
from ._shared import normalise_targets, with_default_targets

LN_TARGETS = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"], "qwen3": ["post_attention_layernorm"],
    "t5": ["layer_norm", "final_layer_norm"], "mt5": ["layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"], "gptj": ["ln_1", "ln_f"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "bert": ["LayerNorm"], "roberta": ["LayerNorm"],
}
_PREFIX = "ln_tuning_layers."


@dataclasses.dataclass
class LNTuningConfig(PeftConfig):
    """Configuration of LayerNorm tuning (Hugging Face PEFT's fields).

    Args:
        target_modules: normalisation layers to tune (names, dotted suffixes or a regex); None
            picks the model family's default.
        exclude_modules: same forms; matching modules are skipped.
        modules_to_save: modules trained in full and saved with the adapter.
    """

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[Union[list[str], str]] = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LN_TUNING.value
        super().__post_init__()
        normalise_targets(self)


class LNTuningDelta(ModuleCopy):
    """A trainable copy of one normalisation layer, saved under PEFT's ``ln_tuning_layers``."""

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {_PREFIX + k: v for k, v in self.module.state_dict().items()}

    def local_name(self, peft_suffix: str) -> str:
        return "module." + peft_suffix[len(_PREFIX):]


@register_method
class LNTuningMethod(Method):
    """LayerNorm tuning at any normalisation layer (LayerNorm, RMSNorm, ...)."""

    name = "LN_TUNING"
    key_roots = ("ln_tuning_layers",)
    config_cls = LNTuningConfig

    def prepare(self, config, model):
        return with_default_targets(config, model, LN_TARGETS, "LN tuning")

    def supported_sites(self):
        return ["any layer with parameters (LayerNorm, RMSNorm, GroupNorm ...)"]

    def make_delta(self, config: LNTuningConfig, path: str, module: nn.Module, adapter_name: str) -> Delta:
        if not any(True for _ in module.parameters()):
            raise UnsupportedSite(f"{type(module).__name__} has no parameters to tune.")
        if isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D":
            raise UnsupportedSite(f"{type(module).__name__} is not a normalisation layer; LN tuning copies "
                                  "whole layers, use modules_to_save to train it in full.")
        return LNTuningDelta(module)
