"""The prompt interface: methods that add tokens or attention instead of a weight update.

Prompt tuning, p-tuning and prefix tuning never change a module of the base model: they put
learned vectors in front of the real tokens, as input embeddings or as key/value pairs already in
every attention layer's cache. LLaMA-Adapter adds a gated attention over learned prompts to the
top attention layers. None of them is "math at a site" with a (x, y) -> y' contract, so they get
their own interface here:

- :class:`PromptLearningConfig`, the fields the virtual-token methods share, and
  :func:`fill_model_dims`, which reads them from the model (KV prefixes take
  ``num_key_value_heads`` heads, so grouped-query attention works);
- :class:`PromptMethod`, the hooks a method implements: build and remove one adapter's state,
  activation, its trainable parameters, its saved form, ``forward`` and ``generate``;
- :class:`PromptHost`, which stands where :class:`~peftkit.core.adapter_host.AdapterHost` stands for
  site methods (``peft_model.base_model``) and offers the same management calls (inject,
  set_adapter, delete_adapter, disabled, unload, save/load plans), plus task heads
  (``modules_to_save``) as Sites.

The virtual-token mechanics (attention masks, ``-100`` labels, position ids, the KV cache, and
``generate`` adding the prompt once at prefill) are shared by three methods and live in
``methods/virtual_tokens.py``; LLaMA-Adapter's attention wrapper in ``methods/adaption_prompt.py``.
``PeftModel`` routes a config here when its registered Method has ``kind == "prompt"``; no other
core file knows about this module.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Iterable, Iterator, Optional

import torch
from torch import nn

from ..config import ConfigError, PeftConfig, TaskType
from .host import Host, method_kind
from .inject import sites
from .method import Method
from .registry import get_method

SEQ2SEQ = TaskType.SEQ_2_SEQ_LM.value


@dataclasses.dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by the virtual-token methods (Hugging Face PEFT's names and meanings).

    Args:
        num_virtual_tokens: V, the number of virtual tokens.
        token_dim: width of one virtual token (filled from the model: hidden size, or
            ``num_key_value_heads * head_dim`` for a KV prefix).
        num_transformer_submodules: 2 for encoder-decoders (one prompt per stack), else 1.
        num_attention_heads: heads of a KV prefix (``num_key_value_heads`` under GQA).
        num_layers: transformer layers (filled from the model).
        modules_to_save: modules trained in full (the classification head for SEQ_CLS).
    """

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        v = self.num_virtual_tokens
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{type(self).__name__}.num_virtual_tokens must be a positive integer "
                              f"(e.g. 20), got {v!r}.")

    @property
    def is_prompt_learning(self) -> bool:
        return True


def _first_attr(cfg, names: Iterable[str]):
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _model_dims(config: PromptLearningConfig, mc, kv_heads: bool) -> dict[str, int]:
    dims: dict[str, Any] = {}
    for field, names in (("num_layers", ("num_hidden_layers", "num_layers", "n_layer")),
                         ("token_dim", ("hidden_size", "n_embd", "d_model")),
                         ("num_attention_heads", ("num_attention_heads", "n_head", "num_heads"))):
        dims[field] = _first_attr(mc, names)
        if dims[field] is None and getattr(config, field) is None:
            raise ConfigError(f"Could not read {field} from {type(mc).__name__}; set {field} in the config.")
    kv = getattr(mc, "num_key_value_heads", None)
    if kv_heads and isinstance(kv, int) and None not in dims.values() and kv != dims["num_attention_heads"]:
        head_dim = getattr(mc, "head_dim", None) or dims["token_dim"] // dims["num_attention_heads"]
        dims.update(token_dim=head_dim * kv, num_attention_heads=kv)
    return dims


def fill_model_dims(config: PromptLearningConfig, model: nn.Module, kv_heads: bool = False) -> PromptLearningConfig:
    """Copy of ``config`` with the model-dependent fields filled in (as Hugging Face PEFT fills them).

    With ``kv_heads`` (a KV prefix) the width and head count follow the key/value projections,
    ``num_key_value_heads * head_dim``, so grouped-query models get prefixes of the right shape.
    Values already set (a loaded adapter's) must agree with the model: an adapter made for
    another model is refused here, before any tensor is read.
    """
    mc = getattr(model, "config", None)
    if mc is None:
        raise ConfigError(f"{config.peft_type} needs a transformers model with a `.config`; got "
                          f"{type(model).__name__}. Pass token_dim, num_layers and num_attention_heads.")
    if hasattr(mc, "get_text_config"):
        mc = mc.get_text_config()
    changes: dict[str, Any] = {}
    for field, value in _model_dims(config, mc, kv_heads).items():
        given = getattr(config, field)
        if given is None:
            changes[field] = value
        elif value is not None and given != value:
            raise ConfigError(f"{config.peft_type} adapter has {field}={given} but {type(model).__name__} needs "
                              f"{value}: it was made for another base model. Load it onto that model, or leave "
                              f"{field} unset to fill it from this one.")
    if config.num_transformer_submodules is None:
        changes["num_transformer_submodules"] = 2 if config.task_type == SEQ2SEQ else 1
    config = dataclasses.replace(config, **changes) if changes else config
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config = dataclasses.replace(config, encoder_hidden_size=config.token_dim)
    return config


class PromptMethod(Method, metaclass=abc.ABCMeta):
    """A method of the prompt interface. Subclasses set ``name``/``config_cls`` and build encoders.

    The default hooks keep one encoder per adapter in ``host.prompt_encoder``; the virtual-token
    mechanics (masks, labels, caches, generate) are in ``methods/virtual_tokens.py``.
    """

    kind: ClassVar[str] = "prompt"
    #: True when several adapters of this method can be active together.
    supports_many_active: ClassVar[bool] = False

    def make_encoder(self, config, model: nn.Module) -> nn.Module:
        """The module producing this adapter's virtual tokens (used by the default :meth:`attach`)."""
        raise TypeError(f"{type(self).__name__} keeps no prompt encoder; it must override attach().")

    # ----- bookkeeping hooks ---------------------------------------------------------
    def attach(self, host: "PromptHost", name: str, config) -> None:
        """Create adapter ``name``'s state on ``host``."""
        enc = self.make_encoder(config, host.model)
        dev = next((p.device for p in host.model.parameters() if p.device.type != "meta"), None)
        host.prompt_encoder[name] = enc.to(dev) if dev is not None else enc

    def detach(self, host: "PromptHost", name: str) -> None:
        """Remove adapter ``name``'s state from ``host``."""
        if name in host.prompt_encoder:
            del host.prompt_encoder[name]

    def set_active(self, host: "PromptHost", names: list[str]) -> None:
        """Called whenever the active adapters change (empty while disabled)."""

    def adapter_parameters(self, host: "PromptHost", name: str) -> Iterator[nn.Parameter]:
        """Parameters that train with adapter ``name``."""
        return host.prompt_encoder[name].parameters()

    # ----- the saved form and running (see methods/virtual_tokens.py for virtual tokens) ------
    @abc.abstractmethod
    def state_to_save(self, host: "PromptHost", name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors under Hugging Face PEFT's keys."""

    @abc.abstractmethod
    def load_plan(self, host: "PromptHost", name: str, tensors: dict[str, torch.Tensor], source: str):
        """(destination, value) pairs for a saved adapter; raises CheckpointError naming the problem."""

    @abc.abstractmethod
    def forward(self, host: "PromptHost", name: str, config, kwargs: dict):
        """Run the base model with adapter ``name`` applied."""

    @abc.abstractmethod
    def generate(self, host: "PromptHost", name: str, config, kwargs: dict):
        """The base model's ``generate`` with adapter ``name`` applied."""


# ===== the host ======================================================================
class PromptHost(Host):
    """``peft_model.base_model`` for prompt methods: the user's model plus the prompt encoders.

    The lifecycle is :class:`~peftkit.core.host.Host`'s; this strategy keeps the adapters' state
    where their :class:`PromptMethod` puts it (``prompt_encoder``, or wrappers in the model).
    """

    kind = "prompt"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.prompt_encoder = nn.ModuleDict()

    @property
    def is_disabled(self) -> bool:
        """True while the adapters are switched off (``disable_adapter()``)."""
        return self._off is not None

    def method(self, name: str) -> PromptMethod:
        """The PromptMethod of adapter ``name``."""
        return get_method(self.peft_config[name].peft_type)

    # ----- strategy hooks ------------------------------------------------------------
    def check_new(self, name: str, config) -> None:
        """As the base host's, and one prompt method per model."""
        super().check_new(name, config)
        if self.peft_config:
            first = next(iter(self.peft_config.values()))
            if first.peft_type != config.peft_type:
                raise ValueError(f"This model holds {first.peft_type} adapters; a {config.peft_type} adapter "
                                 "cannot be added beside them. Wrap a fresh base model instead.")

    def _add(self, name: str, config, method) -> list:
        self.peft_config[name] = config  # the method's attach reads it
        method.attach(self, name, config)
        return []

    def _drop(self, name: str, config) -> None:
        method = get_method(config.peft_type)
        method.detach(self, name)
        if set(self.peft_config) <= {name}:  # the last one: the method's switches go off
            method.set_active(self, [])

    def _check_active(self, names: list[str]) -> None:
        if len(names) > 1 and not self.method(names[0]).supports_many_active:
            raise ValueError(f"{self.peft_config[names[0]].peft_type} runs one adapter at a time; "
                             f"set_adapter() one of {names}.")

    def _activate(self, names: list[str]) -> None:
        names = [] if self.is_disabled else names
        super()._activate(names)
        if self.peft_config:
            self.method(next(iter(self.peft_config))).set_active(self, names)

    def _switch_off(self):
        self._off = True  # read by _activate
        self._activate([])
        self.apply_trainability()
        return True

    def _switch_on(self, state) -> None:
        self._activate(self.active_adapters)
        self.apply_trainability()

    def _adapter_params(self, name: str) -> list[nn.Parameter]:
        params = list(self.method(name).adapter_parameters(self, name))
        for _, site in sites(self.model):
            if name in site.deltas:
                params += list(site.deltas[name].parameters())
        return params

    def apply_trainability(self) -> None:
        """Only the active, trainable adapters' parameters (and their task heads) get gradients."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.prompt_encoder.parameters():
            p.requires_grad_(False)
        for name in self.peft_config:
            train = name in self.active_adapters and not self.peft_config[name].inference_mode
            for p in self.method(name).adapter_parameters(self, name):
                p.requires_grad_(train)
        for _, site in sites(self.model):
            for n, d in site.deltas.items():
                d.requires_grad_(n in self.active_adapters and not self.peft_config[n].inference_mode)

    _apply_trainability = apply_trainability

    def merge(self, names=None, safe_merge: bool = False) -> None:
        """Prompt methods have no weight update to fold in."""
        raise TypeError("Prompt methods (virtual tokens, KV prefixes, adaption prompts) cannot be merged into "
                        "the base weights: they add tokens or attention, not a weight update. Keep the adapter "
                        "loaded (it runs unmerged), or use a mergeable method such as LoRA.")

    def unmerge(self) -> None:
        """Nothing is ever merged for prompt methods."""

    @property
    def merged(self) -> bool:
        """Always False: prompt methods cannot be merged."""
        return False

    # ----- save / load --------------------------------------------------------------
    def _heads_state(self, name: str, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for path, site in sites(self.model):
            if name in site.deltas:
                for k, v in site.deltas[name].module.state_dict(keep_vars=keep_vars).items():
                    out[f"base_model.{path}.{k}"] = v
        return out

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors under Hugging Face PEFT's keys."""
        out = dict(self.method(name).state_to_save(self, name))
        out.update({k: v.detach() for k, v in self._heads_state(name).items()})
        return out

    def load_plan(self, name: str, tensors: dict[str, torch.Tensor], source: str):
        """Check ``tensors`` against adapter ``name`` and return (destination, value) pairs."""
        from ..io.checkpoint import CheckpointError

        heads = self._heads_state(name, keep_vars=True)
        rest = {k: v for k, v in tensors.items() if k not in heads}
        plan = self.method(name).load_plan(self, name, rest, source)
        for k, dest in heads.items():
            if k not in tensors:
                raise CheckpointError(f"{source}: missing tensor {k!r} (the trained task head).")
            if tuple(dest.shape) != tuple(tensors[k].shape):
                raise CheckpointError(f"{source}: tensor {k!r} has shape {tuple(tensors[k].shape)}, "
                                      f"this model needs {tuple(dest.shape)}.")
            plan.append((dest, tensors[k]))
        return plan

    # ----- running ------------------------------------------------------------------
    def _active(self, adapter_names):
        if adapter_names is not None:
            raise ValueError("adapter_names (mixed-adapter batches) is not supported with prompt methods; "
                             "set_adapter() one adapter and run the batch with it.")
        if self.is_disabled or not self.active_adapters:
            return None
        name = self.active_adapters[0]
        return name, self.peft_config[name]

    def forward(self, *args, adapter_names=None, **kwargs):
        """The model's forward with the active adapter's prompt (the base alone when disabled)."""
        if args:
            kwargs = _positional(args, kwargs)
        act = self._active(adapter_names)
        if act is None:
            return self.model(**kwargs)
        return self.method(act[0]).forward(self, act[0], act[1], kwargs)

    def generate(self, *args, adapter_names=None, **kwargs):
        """The model's ``generate`` with the active adapter's prompt."""
        if args:
            kwargs = _positional(args, kwargs)
        act = self._active(adapter_names)
        if act is None:
            return self.model.generate(**kwargs)
        return self.method(act[0]).generate(self, act[0], act[1], kwargs)


def _positional(args: tuple, kwargs: dict) -> dict:
    """Only input_ids may come positionally (as the first argument of a transformers forward)."""
    if len(args) > 1 or "input_ids" in kwargs:
        raise TypeError("Pass input_ids as the only positional argument and everything else by keyword "
                        "(attention_mask=..., labels=...).")
    return {"input_ids": args[0], **kwargs}


def is_prompt_config(config) -> bool:
    """True when ``config`` belongs to a method of the prompt interface (routes to PromptHost)."""
    return method_kind(config) == "prompt"
