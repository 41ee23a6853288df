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
serial adapter after the feed-forward block, each scaled by a learned per-token gate
G_m = σ(W_G u) read from the submodule's input u (methods/gates.py)::

    LoRA:    y = W0 x + G_L(x) * s B A x
    adapter: h <- h + G_A(h) * U σ(D h)
    prefix:  ungated here (see below)

The LoRA and adapter gates are :class:`~peftkit.methods.gates.GatedDelta` wrappers around the
ordinary Deltas (``HybridModel(..., gated=[...])``), so the gated parts are still plain LoRA and
bottleneck adapters underneath. The prefix gate is not implemented: the paper scales the prefix
keys/values P_k, P_v by G_P(x_i) for each query token x_i, so token i attends over a differently
scaled prefix than token j. peftkit's prefix enters through the KV cache (virtual_tokens.py), one
(B, heads, V, d_h) tensor per layer shared by every query position, which cannot hold a
per-query factor; gating it would need a replacement attention forward per model family, which
the prompt interface deliberately avoids. ``unipelt(..., gated=False)`` builds the ungated form.

Saving writes one PEFT-format folder per part (``layers/<adapter>`` and ``prompts/``), so each
part also loads alone in peftkit or, where PEFT has the method, in Hugging Face PEFT (a gated
part then loads as its ungated adapter: PEFT has no gates). The gates themselves go to peftkit's
own ``gates.safetensors`` beside those folders, keys ``<adapter>/<module path>.gate.weight``.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional

from torch import nn

from ..config import PeftConfig

GATES_FILE = "gates.safetensors"


class HybridModel(nn.Module):
    """Layer adapters and (optionally) one prompt adapter, all active on one base model.

    Args:
        model: the base model.
        layer_configs: adapter name -> config of a layer method; applied in this order.
        prompt_config: a prompt-method config (prefix tuning) or None.
        prompt_name: the prompt adapter's name.
        gated: names of layer adapters whose update gets a learned per-token gate (UniPELT);
            see methods/gates.py.
    """

    def __init__(self, model: nn.Module, layer_configs: dict[str, PeftConfig],
                 prompt_config: Optional[PeftConfig] = None, prompt_name: str = "prefix",
                 gated: Iterable[str] = ()):
        super().__init__()
        from ..model import get_peft_model
        from .gates import add_gates

        if not layer_configs:
            raise ValueError("HybridModel needs at least one layer method in layer_configs; for a prompt "
                             "method alone use get_peft_model.")
        names = list(layer_configs)
        if prompt_name in names:
            raise ValueError(f"prompt_name {prompt_name!r} is also a layer adapter name; pick another.")
        gated = list(gated)
        unknown = [g for g in gated if g not in names]
        if unknown:
            raise ValueError(f"gated names {unknown} are not layer adapters of this hybrid ({names}); only "
                             "layer methods can be gated (the prefix gate is not implemented, see hybrids.py).")
        self.layers = get_peft_model(model, layer_configs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.layers.add_adapter(name, layer_configs[name])
        for name in gated:
            add_gates(self.layers, name)
        self.gated = gated
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
        """``layers/<name>/`` per layer adapter and ``prompts/`` for the prompt, each in PEFT format;
        the gates of gated adapters (no PEFT equivalent) in ``gates.safetensors``."""
        from ..io.checkpoint import atomic_save_tensors
        from .gates import gate_state_dict

        for name in self.layer_names:
            self.layers.save_pretrained(os.path.join(save_directory, "layers"), selected_adapters=[name])
        if self.prompts is not None:
            self.prompts.save_pretrained(os.path.join(save_directory, "prompts"), selected_adapters=[self.prompt_name])
        gates = os.path.join(save_directory, GATES_FILE)
        if self.gated:
            tensors = {f"{name}/{k}": v for name in self.gated for k, v in gate_state_dict(self.layers, name).items()}
            atomic_save_tensors(gates, tensors, {"format": "pt", "peftkit": "UniPELT gates"})
        elif os.path.exists(gates):  # a stale file from an earlier gated save would gate this one on load
            os.remove(gates)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str, is_trainable: bool = False) -> "HybridModel":
        """Rebuild a saved hybrid on ``model`` (the same base it was trained on)."""
        from ..io.checkpoint import load_tensors
        from ..io.peft_format import apply_plan, load_plan
        from .gates import load_gates

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
        gates = _read_gates(os.path.join(directory, GATES_FILE))
        hybrid = cls(model, configs, prompt_cfg, prompt_name=prompt_name, gated=list(gates))
        for name, folder in layers.items():
            apply_plan(load_plan(hybrid.layers.base_model, name, load_tensors(folder), folder))
        for name, tensors in gates.items():
            load_gates(hybrid.layers, name, tensors, os.path.join(directory, GATES_FILE))
        if prompt_folder is not None:
            host = hybrid.prompts.base_model
            apply_plan(host.load_plan(prompt_name, load_tensors(prompt_folder), prompt_folder))
        hybrid.set_trainable()
        return hybrid


def _read_gates(path: str) -> dict[str, dict]:
    """Adapter name -> its gate tensors, from a hybrid's ``gates.safetensors`` (empty if none)."""
    if not os.path.isfile(path):
        return {}
    from safetensors.torch import load_file

    from ..io.checkpoint import CheckpointError

    try:
        flat = load_file(path)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); save the "
                              "hybrid again.") from None
    out: dict[str, dict] = {}
    for key, value in flat.items():
        name, sep, rest = key.rpartition("/")  # module paths hold no "/", adapter names might
        if not sep:
            raise CheckpointError(f"{path}: key {key!r} is not '<adapter>/<module path>.gate.<param>'.")
        out.setdefault(name, {})[rest] = value
    return out


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
            num_virtual_tokens: int = 10, reduction_factor: int = 16, task_type: str = "CAUSAL_LM",
            gated: bool = True) -> HybridModel:
    """UniPELT: gated LoRA (q, v) + prefix tuning + a gated serial adapter after the FFN block.

    ``gated=False`` builds the ungated combination (then the LoRA part can be merged). The
    prefix is never gated (see the module docstring for why).
    """
    from .bottleneck import BottleneckConfig
    from .lora import LoraConfig
    from .prefix_tuning import PrefixTuningConfig

    layers = {"lora": LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=lora_targets, task_type=task_type),
              "adapter": BottleneckConfig(adapter_type="pfeiffer", reduction_factor=reduction_factor, task_type=task_type)}
    return HybridModel(model, layers, PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, task_type=task_type),
                       gated=list(layers) if gated else ())
