"""PeftModel: the user-facing wrapper (forward, generate, adapters, merging, save/load).

The structure mirrors Hugging Face PEFT so that parameter paths and habits carry over:
``peft_model.base_model`` is the host (:mod:`peftkit.core.adapter_host`: ``AdapterHost`` for layer
methods, ``PromptHost`` for prompt methods) and ``peft_model.base_model.model`` the user's model.
PeftModel only forwards to the host, which owns the adapter lifecycle. Task subclasses only add
task defaults (classification heads trained in full).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from .config import PeftConfig, PeftType, TaskType
from .core.host import IncompatibleKeys, host_for
from .core.packed import packed_numel
from .core.site import Site
from .io.checkpoint import load_tensors


class PeftModel(nn.Module):
    """A base model with one or more adapters.

    Args:
        model: any ``nn.Module`` (a transformers model or not).
        peft_config: the first adapter's configuration.
        adapter_name: its name (``"default"``, as Hugging Face PEFT names it).
    """

    #: modules trained in full by default for this task (classification heads)
    task_heads: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False, **_: Any):
        super().__init__()
        self.base_model = host_for(peft_config)(model)  # prompt methods: core/prompt.py
        self.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage,
                         autocast_adapter_dtype=autocast_adapter_dtype)

    # ----- passthrough ----------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)  # the host, then the user's model (PEFT's order)

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
    def active_peft_config(self) -> PeftConfig:
        """The (first) active adapter's configuration."""
        a = self.base_model.active_adapters
        return self.peft_config[a[0] if a else next(iter(self.peft_config))]

    @property
    def base_model_torch_dtype(self) -> Optional[torch.dtype]:
        """The base model's ``dtype`` attribute (transformers models have one), else None."""
        return getattr(self.base_model.model, "dtype", None)

    def get_layer_status(self) -> list:
        """Every adapted layer's adapters and their state (PEFT's ``TunerLayerStatus`` list)."""
        from .status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self):
        """The adapters' state over the whole model (PEFT's ``TunerModelStatus``)."""
        from .status import get_model_status

        return get_model_status(self)

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """Names of the modules kept as trainable full copies by any adapter (None if none)."""
        names = {m for c in self.peft_config.values() for m in (getattr(c, "modules_to_save", None) or ())}
        return names or None

    # ----- running --------------------------------------------------------------------
    def forward(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        """Run the model; ``adapter_names[i]`` picks row ``i``'s adapter for a mixed batch."""
        return self.base_model(*args, adapter_names=adapter_names, **kwargs)

    def generate(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        """The base model's ``generate`` with the adapters applied (per row with ``adapter_names``)."""
        return self.base_model.generate(*args, adapter_names=adapter_names, **kwargs)

    # ----- adapters ---------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new adapter (inactive unless it is the first one).

        ``autocast_adapter_dtype``: over float16/bfloat16 layers the adapter is kept in float32
        (True, PEFT's default) or in the layer's dtype (False). ``low_cpu_mem_usage``: its
        tensors are created on the meta device, to be filled by ``set_peft_model_state_dict``.
        """
        self.base_model.inject(adapter_name, peft_config, task_heads=self.task_heads,
                               autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage)

    def set_adapter(self, adapter_name: Union[str, Iterable[str]], inference_mode: bool = False) -> None:
        """Activate the named adapter(s); only active adapters train (none with ``inference_mode``)."""
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: Union[str, Iterable[str]], requires_grad: bool = True) -> None:
        """Switch gradients of the named adapters' parameters, active or not (PEFT's method)."""
        self.base_model.set_requires_grad(adapter_names, requires_grad)

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
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo :meth:`merge_adapter`."""
        self.base_model.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None,
                         progressbar: bool = False) -> nn.Module:
        """Merge and return the plain base model with the original module types."""
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names)

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
        self.base_model.check_known(adapter_name)
        return self.base_model.adapter_state_dict(adapter_name)

    def save_pretrained(self, save_directory: str, selected_adapters: Optional[list[str]] = None,
                        safe_serialization: bool = True, **kwargs: Any) -> None:
        """Write each adapter as ``adapter_config.json`` + ``adapter_model.safetensors`` (``.bin``
        with ``safe_serialization=False``), and the model card ``README.md``, as PEFT does.

        The adapter named ``default`` goes to ``save_directory`` itself, any other to
        ``save_directory/<name>`` (Hugging Face PEFT's layout). Each file is replaced atomically.
        ``save_embedding_layers`` (``"auto"``, ``True``, ``False``): also write the base's token
        embeddings, as PEFT does when the vocabulary was resized or ``embed_tokens``/``lm_head`` is
        a target (:mod:`peftkit.io.embedding_layers`).
        ``path_initial_model_for_weight_conversion``: for PiSSA/OLoRA adapters, the folder where the
        adapter was saved right after initialisation; the file written is then a plain LoRA of
        rank 2r that applies to the original, unmodified base model (as in Hugging Face PEFT).
        """
        from .functional import get_peft_model_state_dict
        from .io.checkpoint import save_weights
        from .io.model_card import write_model_card
        from .io.saved_config import config_for_save

        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory!r} is a file; save_pretrained needs a folder path.")
        names = selected_adapters or list(self.peft_config)
        for name in names:
            self.base_model.check_known(name)
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            # state_dict: gathered elsewhere (accelerate + FSDP), as in PEFT; save_embedding_layers:
            # the base's resized token embeddings too (io/embedding_layers.py)
            tensors = get_peft_model_state_dict(self, kwargs.get("state_dict"), adapter_name=name,
                                                save_embedding_layers=kwargs.get("save_embedding_layers", "auto"))
            if not kwargs.get("is_main_process", True):
                continue
            cfg = self.peft_config[name]
            base = getattr(getattr(self.base_model.model, "config", None), "_name_or_path", None)
            cfg = dataclasses.replace(cfg, inference_mode=True,
                                      base_model_name_or_path=cfg.base_model_name_or_path or base or None)
            initial = kwargs.get("path_initial_model_for_weight_conversion")
            if initial is not None:  # PiSSA/OLoRA: write a plain LoRA for the original base
                from .core.registry import get_method

                tensors, cfg = get_method(cfg.peft_type).convert_for_original_base(tensors, load_tensors(initial), cfg)
            save_weights(folder, tensors, safe_serialization)  # .safetensors, or .bin as PEFT writes it
            config_for_save(self, name, cfg).save_pretrained(folder)  # all-linear expanded, auto_mapping
        if kwargs.get("is_main_process", True):
            write_model_card(self, save_directory)  # README.md as PEFT writes it (io/model_card.py)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: Optional[dict[str, str]] = None, *, config: Optional[PeftConfig] = None,
                     **kwargs: Any) -> IncompatibleKeys:
        """Load a saved adapter (peftkit's or Hugging Face PEFT's) under ``adapter_name``.

        Weights are read and checked before the model changes; on any mismatch the model is
        left exactly as it was and the error names the first offending tensor. An adapter loaded
        for inference (``is_trainable=False``) puts the model in eval mode (as PEFT does) and is
        packed when its method allows (plain LoRA on linear layers): its weights stay in the one
        buffer the file was read into, with a record per layer instead of a module
        (peftkit/core/packed.py). ``packed=False`` keeps modules. Returns the load result
        (``missing_keys``, ``unexpected_keys``: both empty, since any mismatch is an error).
        ``torch_device`` and ``ephemeral_gpu_offload`` are accepted: adapter tensors always go to
        their layer's device.
        """
        return self._load(model_id, adapter_name, is_trainable, config, kwargs, key_mapping=key_mapping,
                          autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: Optional[dict[str, str]] = None,
                        **kwargs: Any) -> "PeftModel":
        """Wrap ``model`` with the adapter saved in ``model_id`` (a local folder): as
        :meth:`load_adapter`, so in eval mode and packed unless ``is_trainable`` or ``packed=False``."""
        config = config or PeftConfig.from_pretrained(model_id, subfolder=kwargs.get("subfolder"))
        if cls is PeftModel and config.task_type in TASK_CLASSES:
            cls = TASK_CLASSES[config.task_type]
        peft_model = cls.__new__(cls)
        nn.Module.__init__(peft_model)
        peft_model.base_model = host_for(config)(model)
        peft_model._load(model_id, adapter_name, is_trainable, config, kwargs, key_mapping=key_mapping,
                         autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage)
        return peft_model

    def _load(self, model_id: str, adapter_name: str, is_trainable: bool, config: Optional[PeftConfig],
              kwargs: dict, key_mapping: Optional[dict[str, str]] = None, **inject_kw: Any) -> IncompatibleKeys:
        """The one load routine: read config and tensors (before the model changes), inject
        without initialising, fill and check (rolled back on error), then eval mode for inference."""
        subfolder = kwargs.get("subfolder")
        folder = os.path.join(model_id, subfolder) if subfolder else model_id
        exists = adapter_name in self.base_model.peft_config
        if not exists:
            config = config or PeftConfig.from_pretrained(model_id, subfolder=subfolder)
            config = dataclasses.replace(config, inference_mode=not is_trainable)
        tensors = load_tensors(folder)
        if key_mapping:
            from .functional import _remap

            tensors = _remap(tensors, key_mapping)
        if exists:  # PEFT's rule: new weights for the adapter already there (checked, as any load)
            result = self.base_model.load_weights(adapter_name, tensors, folder, is_trainable=True,
                                                  packed=False, remove_on_error=False)
        else:
            result = self.base_model.add_saved(adapter_name, config, tensors, folder, is_trainable=is_trainable,
                                               packed=kwargs.get("packed", True), task_heads=self.task_heads,
                                               **inject_kw)
        if not is_trainable:
            self.eval()
        return result

    # ----- combining and hot-swapping (methods/lora/combine.py, methods/lora/hotswap.py) --
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", **kwargs: Any) -> None:
        """Add ``adapter_name`` combining LoRA ``adapters``; see :func:`peftkit.methods.lora.combine.add_weighted_adapter`."""
        from .methods.lora.combine import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, **kwargs)

    def hotswap_adapter(self, model_id: str, adapter_name: str = "default", **kwargs: Any) -> None:
        """Replace ``adapter_name``'s weights in place from a saved adapter; see :mod:`peftkit.methods.lora.hotswap`."""
        from .methods.lora.hotswap import hotswap_adapter

        hotswap_adapter(self, model_id, adapter_name, **kwargs)


def plan_adapter_load(host, adapter_name, tensors, source):
    """(destination, tensor) pairs that load ``tensors`` into adapter ``adapter_name`` of ``host``,
    checked by name and shape; ``source`` names them in errors."""
    return host.load_plan(adapter_name, tensors, source)


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
    if host_for(peft_config).kind == "site" and any(isinstance(m, Site) for m in model.modules()):
        warnings.warn("You are trying to modify a model with PEFT for a second time: it already holds adapters. "
                      "To reload it with another config, call .unload() on the first PeftModel; to add an "
                      "adapter, call its add_adapter(name, config).", UserWarning, stacklevel=2)
    cls = TASK_CLASSES.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)
