"""Hybrid methods: several PEFT methods active together on one model, by composition.

Family: hybrid (Lialin et al. 2023, section 10). Nothing here adds math; a hybrid is a set of
existing adapters switched on together:

- Layer methods (LoRA, (IA)^3, bottleneck adapters, ...) already stack on one PeftModel:
  ``model.add_adapter("adapter", BottleneckConfig(...)); model.set_adapter(["default", "adapter"])``
  runs both, in that order, wherever they meet (a Site applies its active Deltas in turn).
- Virtual-token methods (prefix tuning) live on their own host (core/prompt.py) and do not mix
  with layer methods inside one PeftModel. :class:`HybridModel` therefore wraps the same base
  model twice: a layer PeftModel, and a prompt PeftModel over the model that already holds the
  layer adapters, and keeps the layer adapters active and trainable beside the prompt.

MAM adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning",
arXiv:2110.04366)::

    attention: prefix tuning (l virtual key/value pairs per layer)
    FFN:       y = FFN(x) + s * U σ(D x)        (parallel adapter, s = 4)

UniPELT (Mao et al. 2022, arXiv:2110.07577) combines LoRA (on W_q, W_v), prefix tuning and a
serial adapter after the feed-forward block. The paper also learns a sigmoid gate per module;
those gates are not implemented here (the gated variants would be new math, not a composition),
so :func:`unipelt` builds the ungated combination and says so in its docstring.

Saving writes one PEFT-format folder per part (``layers/<adapter>`` and ``prompts/``), so each
part also loads alone in peftkit or, where PEFT has the method, in Hugging Face PEFT.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from torch import nn

from ..config import PeftConfig


class HybridModel(nn.Module):
    """Layer adapters and (optionally) one prompt adapter, all active on one base model.

    Args:
        model: the base model.
        layer_configs: adapter name -> config of a layer method; applied in this order.
        prompt_config: a prompt-method config (prefix tuning) or None.
        prompt_name: the prompt adapter's name.
    """

    def __init__(self, model: nn.Module, layer_configs: dict[str, PeftConfig],
                 prompt_config: Optional[PeftConfig] = None, prompt_name: str = "prefix"):
        super().__init__()
        from ..model import get_peft_model

        if not layer_configs:
            raise ValueError("HybridModel needs at least one layer method in layer_configs; for a prompt "
                             "method alone use get_peft_model.")
        names = list(layer_configs)
        if prompt_name in names:
            raise ValueError(f"prompt_name {prompt_name!r} is also a layer adapter name; pick another.")
        self.layers = get_peft_model(model, layer_configs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.layers.add_adapter(name, layer_configs[name])
        self.prompts = None
        if prompt_config is not None:
            self.prompts = get_peft_model(self.layers.get_base_model(), prompt_config, adapter_name=prompt_name)
        self.layer_names = names
        self.prompt_name = prompt_name if prompt_config is not None else None
        self.set_trainable()

    def set_trainable(self) -> None:
        """Activate every part; each part's parameters train. The prompt host switches off the
        layer adapters it does not know when it activates its own, and the layer host only
        toggles what it believes changed, so their gradients are switched back on here."""
        from ..core.inject import sites

        self.layers.set_adapter(self.layer_names)
        host = self.layers.base_model
        for _, site in sites(host.model):
            for name, delta in site.deltas.items():
                if name in self.layer_names:
                    delta.requires_grad_(not host.peft_config[name].inference_mode)

    def forward(self, *args: Any, **kwargs: Any):
        """The base model's forward with every part applied."""
        return (self.prompts or self.layers)(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        """The base model's ``generate`` with every part applied."""
        return (self.prompts or self.layers).generate(*args, **kwargs)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameters over both hosts, each tensor counted once."""
        seen, t, a = set(), 0, 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                a += p.numel()
                t += p.numel() if p.requires_grad else 0
        return t, a

    def save_pretrained(self, save_directory: str) -> None:
        """``layers/<name>/`` per layer adapter and ``prompts/`` for the prompt, each in PEFT format."""
        for name in self.layer_names:
            self.layers.save_pretrained(os.path.join(save_directory, "layers"), selected_adapters=[name])
        if self.prompts is not None:
            self.prompts.save_pretrained(os.path.join(save_directory, "prompts"), selected_adapters=[self.prompt_name])

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str, is_trainable: bool = False) -> "HybridModel":
        """Rebuild a saved hybrid on ``model`` (the same base it was trained on)."""
        from ..io.checkpoint import load_tensors
        from ..io.peft_format import apply_plan, load_plan

        layers = _adapter_folders(os.path.join(directory, "layers"))
        if not layers:
            raise FileNotFoundError(f"{directory!r} has no layers/<adapter>/adapter_config.json; expected a "
                                    "folder written by HybridModel.save_pretrained.")
        prompts = _adapter_folders(os.path.join(directory, "prompts"))
        if len(prompts) > 1:
            raise ValueError(f"{directory}/prompts holds {len(prompts)} prompt adapters; a hybrid has one.")
        configs = {n: PeftConfig.from_pretrained(f, inference_mode=not is_trainable) for n, f in layers.items()}
        prompt_name, prompt_folder = next(iter(prompts.items())) if prompts else ("prefix", None)
        prompt_cfg = PeftConfig.from_pretrained(prompt_folder, inference_mode=not is_trainable) if prompt_folder else None
        hybrid = cls(model, configs, prompt_cfg, prompt_name=prompt_name)
        for name, folder in layers.items():
            apply_plan(load_plan(hybrid.layers.base_model, name, load_tensors(folder), folder))
        if prompt_folder is not None:
            host = hybrid.prompts.base_model
            apply_plan(host.load_plan(prompt_name, load_tensors(prompt_folder), prompt_folder))
        hybrid.set_trainable()
        return hybrid


def _adapter_folders(folder: str) -> dict[str, str]:
    """Adapter name -> folder under a save_pretrained folder (``default`` sits at its root)."""
    found = {}
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        found["default"] = folder
    if os.path.isdir(folder):
        for entry in sorted(os.listdir(folder)):
            if os.path.isfile(os.path.join(folder, entry, "adapter_config.json")):
                found[entry] = os.path.join(folder, entry)
    return found


def mam_adapter(model: nn.Module, num_virtual_tokens: int = 30, bottleneck_size: int = 512, scaling: float = 4.0,
                task_type: str = "CAUSAL_LM", **prefix_kwargs: Any) -> HybridModel:
    """MAM adapter: prefix tuning at attention + a scaled parallel adapter at every FFN block."""
    from .bottleneck import BottleneckConfig
    from .prefix_tuning import PrefixTuningConfig

    return HybridModel(model, {"parallel_adapter": BottleneckConfig(adapter_type="parallel", bottleneck_size=bottleneck_size,
                                                                    scaling=scaling, task_type=task_type)},
                       PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, task_type=task_type, **prefix_kwargs))


def unipelt(model: nn.Module, lora_r: int = 8, lora_alpha: int = 16, lora_targets: Optional[list[str]] = None,
            num_virtual_tokens: int = 10, reduction_factor: int = 16, task_type: str = "CAUSAL_LM") -> HybridModel:
    """UniPELT without its learned gates: LoRA (q, v) + prefix tuning + a serial FFN adapter."""
    from .bottleneck import BottleneckConfig
    from .lora import LoraConfig
    from .prefix_tuning import PrefixTuningConfig

    layers = {"lora": LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=lora_targets, task_type=task_type),
              "adapter": BottleneckConfig(adapter_type="pfeiffer", reduction_factor=reduction_factor, task_type=task_type)}
    return HybridModel(model, layers, PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, task_type=task_type))
