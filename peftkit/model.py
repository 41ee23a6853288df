"""PeftModel: the user-facing wrapper (forward, generate, adapters, merging, save/load).

The structure mirrors Hugging Face PEFT so that parameter paths and habits carry over:
``peft_model.base_model`` is the :class:`~peftkit.core.host.AdapterHost` and
``peft_model.base_model.model`` the user's model. Task subclasses only add task defaults
(classification heads trained in full).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from .config import PeftConfig, PeftType, TaskType
from .core.host import AdapterHost
from .core.method import weights_from_checkpoint
from .core.packed import packed_numel
from .core.prompt import PromptHost, is_prompt_config
from .core.site import BASE, adapter_routing
from .io.checkpoint import WEIGHTS_NAME, atomic_save_tensors, load_tensors
from .io.peft_format import adapter_state_dict, apply_plan, load_plan


class PeftModel(nn.Module):
    """A base model with one or more adapters.

    Args:
        model: any ``nn.Module`` (a transformers model or not).
        peft_config: the first adapter's configuration.
        adapter_name: its name (``"default"``, as Hugging Face PEFT names it).
    """

    #: modules trained in full by default for this task (classification heads)
    task_heads: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **_: Any):
        super().__init__()
        # prompt methods (virtual tokens) have their own host: core/prompt.py
        self.base_model = PromptHost(model) if is_prompt_config(peft_config) else AdapterHost(model)
        self.add_adapter(adapter_name, peft_config)

    # ----- passthrough ----------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model.model, name)

    def get_base_model(self) -> nn.Module:
        """The user's model (with the adapter Sites inside it)."""
        return self.base_model.model

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        """Adapter name -> its configuration."""
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        """Names of the active adapters."""
        return list(self.base_model.active_adapters)

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        """The active adapter's name (a list when several are active)."""
        a = self.base_model.active_adapters
        return a[0] if len(a) == 1 else list(a)

    @property
    def peft_type(self):
        """The active adapter's method (``PeftType``), as Hugging Face PEFT's attribute."""
        a = self.base_model.active_adapters
        t = self.peft_config[a[0] if a else next(iter(self.peft_config))].peft_type
        return PeftType(t) if t in PeftType._value2member_map_ else t  # peftkit-only methods: their name

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """Names of the modules kept as trainable full copies by any adapter (None if none)."""
        names = {m for c in self.peft_config.values() for m in (getattr(c, "modules_to_save", None) or ())}
        return names or None

    # ----- running --------------------------------------------------------------------
    def _routing(self, adapter_names: Optional[list[str]], reuse: bool = False):
        if adapter_names is None:
            return contextlib.nullcontext()
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names contains unknown adapters {unknown}; loaded: "
                             f"{sorted(self.peft_config)} (use '{BASE}' for the base model alone).")
        return adapter_routing(adapter_names, reuse=reuse)

    def forward(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        """Run the model; ``adapter_names[i]`` picks row ``i``'s adapter for a mixed batch."""
        if isinstance(self.base_model, PromptHost):
            _no_mixed_prompts(adapter_names)
            return self.base_model(*args, **kwargs)
        with self._routing(adapter_names):
            return self.base_model.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        """The base model's ``generate`` with the adapters applied (per row with ``adapter_names``)."""
        if isinstance(self.base_model, PromptHost):
            _no_mixed_prompts(adapter_names)
            return self.base_model.generate(*args, **kwargs)
        with self._routing(adapter_names, reuse=True):  # the same rows at every decode step
            return self.base_model.model.generate(*args, **kwargs)

    # ----- adapters ---------------------------------------------------------------------
    def _with_task_heads(self, config: PeftConfig) -> PeftConfig:
        if not self.task_heads or not hasattr(config, "modules_to_save"):
            return config
        present = {p.rsplit(".", 1)[-1] for p, _ in self.base_model.model.named_modules()}
        heads = [h for h in self.task_heads if h in present]
        extra = list(config.modules_to_save or [])
        for h in heads:
            if h not in extra:
                extra.append(h)
        return dataclasses.replace(config, modules_to_save=extra or None)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a new adapter (inactive unless it is the first one)."""
        if is_prompt_config(peft_config) != isinstance(self.base_model, PromptHost):
            raise ValueError(f"A {peft_config.peft_type} adapter cannot be added to a model holding "
                             f"{sorted({c.peft_type for c in self.peft_config.values()})} adapters: prompt methods "
                             "and layer methods do not mix in one PeftModel. Wrap a fresh base model instead.")
        self.base_model.inject(adapter_name, self._with_task_heads(peft_config))

    def set_adapter(self, adapter_name: Union[str, Iterable[str]]) -> None:
        """Activate the named adapter(s); only active adapters train."""
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its weights."""
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self):
        """``with model.disable_adapter():`` runs the base model alone."""
        with self.base_model.disabled():
            yield

    # ----- merging ----------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Fold the active (or named) adapters into the base weights; exact and reversible."""
        self.base_model.merge(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo :meth:`merge_adapter`."""
        self.base_model.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None,
                         progressbar: bool = False) -> nn.Module:
        """Merge and return the plain base model with the original module types."""
        return self.base_model.unload(merge=True, names=adapter_names, safe_merge=safe_merge)

    def unload(self) -> nn.Module:
        """Remove every adapter and return the original base model unchanged."""
        return self.base_model.unload(merge=False)

    # ----- parameters -------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), each shared tensor counted once; packed
        adapters' weights (frozen, held outside any module's parameters) count in the total."""
        trainable, total = 0, packed_numel(self.base_model)
        seen = set()
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print the trainable parameter count and share."""
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")

    # ----- save / load ------------------------------------------------------------------
    def get_adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """Adapter tensors under Hugging Face PEFT's keys (what save_pretrained writes)."""
        if isinstance(self.base_model, PromptHost):
            return self.base_model.adapter_state_dict(adapter_name)
        return adapter_state_dict(self.base_model, adapter_name)

    def save_pretrained(self, save_directory: str, selected_adapters: Optional[list[str]] = None,
                        safe_serialization: bool = True, **kwargs: Any) -> None:
        """Write each adapter as ``adapter_config.json`` + ``adapter_model.safetensors``.

        The adapter named ``default`` goes to ``save_directory`` itself, any other to
        ``save_directory/<name>`` (Hugging Face PEFT's layout). Each file is replaced atomically.
        ``path_initial_model_for_weight_conversion``: for PiSSA/OLoRA adapters, the folder where the
        adapter was saved right after initialisation; the file written is then a plain LoRA of
        rank 2r that applies to the original, unmodified base model (as in Hugging Face PEFT).
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory!r} is a file; save_pretrained needs a folder path.")
        names = selected_adapters or list(self.peft_config)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Unknown adapter {name!r}; loaded: {sorted(self.peft_config)}")
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            tensors = self.get_adapter_state_dict(name)
            cfg = self.peft_config[name]
            base = getattr(getattr(self.base_model.model, "config", None), "_name_or_path", None)
            cfg = dataclasses.replace(cfg, inference_mode=True,
                                      base_model_name_or_path=cfg.base_model_name_or_path or base or None)
            initial = kwargs.get("path_initial_model_for_weight_conversion")
            if initial is not None:  # PiSSA/OLoRA: write a plain LoRA for the original base
                from .core.registry import get_method

                tensors, cfg = get_method(cfg.peft_type).convert_for_original_base(tensors, load_tensors(initial), cfg)
            atomic_save_tensors(os.path.join(folder, WEIGHTS_NAME), tensors)
            cfg.save_pretrained(folder)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     config: Optional[PeftConfig] = None, **kwargs: Any) -> None:
        """Load a saved adapter (peftkit's or Hugging Face PEFT's) under ``adapter_name``.

        Weights are read and checked before the model changes; on any mismatch the model is
        left exactly as it was and the error names the first offending tensor. An adapter loaded
        for inference (``is_trainable=False``) is packed when its method allows (plain LoRA on
        linear layers): its weights stay in the one buffer the file was read into, with a record
        per layer instead of a module (peftkit/core/packed.py). ``packed=False`` keeps modules.
        """
        config = config or PeftConfig.from_pretrained(model_id, subfolder=kwargs.get("subfolder"))
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        folder = os.path.join(model_id, kwargs["subfolder"]) if kwargs.get("subfolder") else model_id
        tensors = load_tensors(folder)
        with weights_from_checkpoint():
            self.add_adapter(adapter_name, config)
        try:
            plan = plan_adapter_load(self.base_model, adapter_name, tensors, folder)
            apply_plan(plan, source=tensors, frozen=not is_trainable)
        except BaseException:
            self.base_model.delete_adapter(adapter_name)
            raise
        _maybe_pack(self.base_model, adapter_name, is_trainable, kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        **kwargs: Any) -> "PeftModel":
        """Wrap ``model`` with the adapter saved in ``model_id`` (a local folder); packed as in
        :meth:`load_adapter` unless ``is_trainable`` or ``packed=False``."""
        config = config or PeftConfig.from_pretrained(model_id, subfolder=kwargs.get("subfolder"))
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        folder = os.path.join(model_id, kwargs["subfolder"]) if kwargs.get("subfolder") else model_id
        tensors = load_tensors(folder)  # read before touching the model
        if cls is PeftModel and config.task_type in TASK_CLASSES:
            cls = TASK_CLASSES[config.task_type]
        with weights_from_checkpoint():
            peft_model = cls(model, config, adapter_name)
        try:
            plan = plan_adapter_load(peft_model.base_model, adapter_name, tensors, folder)
            apply_plan(plan, source=tensors, frozen=not is_trainable)
        except BaseException:
            peft_model.base_model.unload()
            raise
        _maybe_pack(peft_model.base_model, adapter_name, is_trainable, kwargs)
        return peft_model

    # ----- combining and hot-swapping (peftkit/combine.py, peftkit/hotswap.py) ----------
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", **kwargs: Any) -> None:
        """Add ``adapter_name`` combining LoRA ``adapters``; see :func:`peftkit.combine.add_weighted_adapter`."""
        from .combine import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, **kwargs)

    def hotswap_adapter(self, model_id: str, adapter_name: str = "default", **kwargs: Any) -> None:
        """Replace ``adapter_name``'s weights in place from a saved adapter; see :mod:`peftkit.hotswap`."""
        from .hotswap import hotswap_adapter

        hotswap_adapter(self, model_id, adapter_name, **kwargs)


def plan_adapter_load(host, adapter_name, tensors, source):
    """(destination, tensor) pairs that load ``tensors`` into adapter ``adapter_name`` of ``host``
    (a prompt method's host or a layer host), checked by name and shape; ``source`` names them in
    errors."""
    if isinstance(host, PromptHost):
        return host.load_plan(adapter_name, tensors, source)
    return load_plan(host, adapter_name, tensors, source)


def _maybe_pack(host, adapter_name: str, is_trainable: bool, kwargs: dict) -> None:
    """Pack an adapter loaded for inference (core/packed.py) unless ``packed=False`` was given."""
    if not is_trainable and kwargs.get("packed", True) and isinstance(host, AdapterHost):
        host.pack(adapter_name)


def _no_mixed_prompts(adapter_names) -> None:
    if adapter_names is not None:
        raise ValueError("adapter_names (mixed-adapter batches) is not supported with prompt methods; "
                         "set_adapter() one adapter and run the batch with it.")


class PeftModelForCausalLM(PeftModel):
    """Causal language modelling (``TaskType.CAUSAL_LM``)."""


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder generation (``TaskType.SEQ_2_SEQ_LM``)."""


class PeftModelForSequenceClassification(PeftModel):
    """Sequence classification; the new head (``classifier``/``score``) trains in full."""

    task_heads = ("classifier", "score")


class PeftModelForTokenClassification(PeftModel):
    """Token classification; the new head (``classifier``/``score``) trains in full."""

    task_heads = ("classifier", "score")


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive question answering; the span head (``qa_outputs``) trains in full."""

    task_heads = ("qa_outputs",)


class PeftModelForFeatureExtraction(PeftModel):
    """Embeddings / hidden states (``TaskType.FEATURE_EXTRACTION``)."""


TASK_CLASSES: dict[str, type[PeftModel]] = {
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   mixed: bool = False, autocast_adapter_dtype: bool = True,
                   low_cpu_mem_usage: bool = False, **kwargs: Any) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config``.

    Returns the task-specific PeftModel for ``peft_config.task_type`` (plain PeftModel when
    it is None). Only the adapter's parameters are trainable afterwards.
    """
    if isinstance(model, PeftModel):
        raise ValueError("model is already a PeftModel; use model.add_adapter(name, config) to add another adapter.")
    cls = TASK_CLASSES.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name)
