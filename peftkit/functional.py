"""Hugging Face PEFT's top-level functions on adapter state, for scripts written against ``peft``.

``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` move one adapter's tensors in and
out of a model under PEFT's on-disk keys (the same dict ``save_pretrained`` writes and
``PeftModel.from_pretrained`` reads), ``load_peft_weights`` reads such a dict from a local
folder, and ``inject_adapter_in_model`` adds an adapter's sites to a plain ``nn.Module`` with no
PeftModel around it. Names, arguments and results follow PEFT 0.21.

Nothing here re-implements the format: keys, checks and copies come from
:mod:`peftkit.io.peft_format` and :mod:`peftkit.io.checkpoint`, injection from
:class:`peftkit.core.adapter_host.AdapterHost`, checks and errors from the host.

Keys: on a :class:`~peftkit.model.PeftModel` they read ``base_model.model.<path>.<suffix>``
(prompt methods: ``prompt_embeddings``, as PEFT writes them). On a model returned by
:func:`inject_adapter_in_model` the ``base_model.model.`` prefix is absent, as in PEFT, because
the model's own parameter paths do not have it; :func:`set_peft_model_state_dict` accepts both
spellings there.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from .config import PeftConfig
from .core.adapter_host import AdapterHost
from .core.host import Host, IncompatibleKeys, method_kind
from .io.checkpoint import CheckpointError, load_tensors
from .io.peft_format import HOST_PREFIX, PREFIX, apply_plan
from .model import PeftModel

#: Where :func:`inject_adapter_in_model` keeps the AdapterHost on the user's model. It is stored
#: in the instance ``__dict__`` directly, not registered as a submodule: the host holds the model,
#: so registering it would put a cycle in the module tree (and in ``state_dict``).
_HOST_ATTR = "_peftkit_adapter_host"


# ===== which host, which key spelling ==================================================
def _host_and_prefix(model: nn.Module) -> tuple[Host, str]:
    """The host that owns ``model``'s adapters, and the prefix its keys carry (PEFT's rule)."""
    if isinstance(model, PeftModel):
        return model.base_model, PREFIX
    host = model.__dict__.get(_HOST_ATTR) if isinstance(model, nn.Module) else None
    if host is not None:
        return host, ""
    raise TypeError(
        f"Expected a peftkit PeftModel (from get_peft_model / PeftModel.from_pretrained) or a model "
        f"returned by peftkit.inject_adapter_in_model, got {type(model).__name__} without peftkit "
        "adapters. If the model is wrapped (DDP, FSDP, DeepSpeed), pass the unwrapped model "
        "(model.module); after torch.compile pass unwrap_compiled=True."
    )


def _to_user_key(key: str, prefix: str) -> str:
    """A PeftModel-form key (``base_model.model.x``) as the model's own paths spell it."""
    if prefix == PREFIX or not key.startswith(PREFIX):
        return key
    return key[len(PREFIX):]


def _from_user_key(key: str, prefix: str) -> str:
    """The inverse of :func:`_to_user_key`; PEFT also accepts prefixed keys on a plain model."""
    if prefix == PREFIX or key.startswith(PREFIX):
        return key
    return PREFIX + key


# ===== reading ===========================================================================
def get_peft_model_state_dict(model: nn.Module, state_dict: Optional[Mapping[str, torch.Tensor]] = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: Union[bool, str] = "auto") -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s tensors under Hugging Face PEFT's keys, as ``save_pretrained`` writes them.

    No adapter name appears in the keys; ``modules_to_save`` copies, DoRA magnitudes, trained
    biases and prompt embeddings are included exactly as in the saved file.

    Args:
        model: a peftkit ``PeftModel``, or a model returned by :func:`inject_adapter_in_model`
            (its keys then lack the ``base_model.model.`` prefix, as in PEFT).
        state_dict: optional ``model.state_dict()`` gathered elsewhere (DeepSpeed, FSDP); stored
            adapter tensors are then taken from it instead of the live parameters.
        adapter_name: which adapter.
        unwrap_compiled: take ``model._orig_mod`` (a ``torch.compile`` wrapper's model).
        save_embedding_layers: also return the base model's token embeddings, as PEFT does:
            ``True``, ``False``, or ``"auto"`` (when ``target_modules`` names ``embed_tokens`` /
            ``lm_head``, or the vocabulary was resized); see :mod:`peftkit.io.embedding_layers`.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    from .io import embedding_layers

    host, prefix = _host_and_prefix(model)
    host.check_known(adapter_name)
    tensors = host.adapter_state_dict(adapter_name)
    if embedding_layers.should_save(save_embedding_layers, host.peft_config[adapter_name], host.model):
        tensors.update(embedding_layers.embedding_tensors(host.peft_config[adapter_name], host.model))
    if state_dict is not None:
        tensors = _values_from(model, tensors, state_dict)
    return {_to_user_key(k, prefix): v for k, v in tensors.items()}


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def _values_from(model: nn.Module, tensors: dict[str, torch.Tensor],
                 state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each adapter tensor that is a stored tensor of ``model`` by ``state_dict``'s entry
    under that tensor's own key. Tensors the method derives on saving (P-tuning's computed prompt
    embeddings) are not in any state dict and keep their live value."""
    where = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if t.numel():
            where.setdefault(_storage_key(t), key)
    out = {}
    for k, v in tensors.items():
        own = where.get(_storage_key(v)) if v.numel() else None
        if own is None:
            out[k] = v
        elif own in state_dict:
            out[k] = state_dict[own]
        else:
            raise KeyError(f"state_dict has no entry {own!r}, which holds the adapter tensor {k!r}. Pass the "
                           "full state dict of this same model (model.state_dict(), gathered when sharded), or "
                           "state_dict=None to read the live parameters.")
    return out


# ===== writing ===========================================================================
def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: Mapping[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> IncompatibleKeys:
    """Load a dict from :func:`get_peft_model_state_dict` (or a saved adapter file) into adapter ``adapter_name``.

    The adapter must already be in the model (``get_peft_model``, ``add_adapter`` or
    :func:`inject_adapter_in_model`), with the configuration the dict was saved from; the adapter
    name in the model may differ from the one used in training. Every tensor's name and shape is
    checked before anything is copied: a missing, unexpected or wrongly shaped tensor raises
    :class:`~peftkit.io.checkpoint.CheckpointError` naming the first one, and the model is left
    unchanged.

    Returns:
        ``(missing_keys, unexpected_keys)`` like torch's ``load_state_dict(strict=False)`` as PEFT
        returns it: ``missing_keys`` lists the model's own keys the dict did not set (the base
        weights); ``unexpected_keys`` is always empty, since an unexpected tensor is an error.

    ``ignore_mismatched_sizes=True`` is refused (a wrongly shaped tensor is always an error);
    ``low_cpu_mem_usage`` needs nothing extra: an adapter added with ``low_cpu_mem_usage=True``
    (tensors on the meta device) is given the dict's tensors on its layers' device either way.
    """
    if ignore_mismatched_sizes:
        raise ValueError("ignore_mismatched_sizes=True is not supported: peftkit refuses a tensor whose shape "
                         "does not fit rather than leaving that part of the adapter untrained. Fix the config "
                         "(r, target_modules) so that it matches the saved adapter.")
    if not isinstance(peft_model_state_dict, Mapping):
        raise TypeError(f"peft_model_state_dict must be a dict of name -> tensor, got "
                        f"{type(peft_model_state_dict).__name__}.")
    host, prefix = _host_and_prefix(model)
    host.check_known(adapter_name)
    tensors = {}
    for key, value in peft_model_state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"peft_model_state_dict[{key!r}] is a {type(value).__name__}, expected a tensor.")
        tensors[_from_user_key(key, prefix)] = value
    source = "set_peft_model_state_dict"
    try:
        plan = host.load_plan(adapter_name, tensors, source)
    except CheckpointError as e:
        if prefix == PREFIX:
            raise
        # name the tensors as this model's keys spell them (no base_model.model. prefix)
        raise CheckpointError(str(e).replace(f"'{PREFIX}", "'")) from None
    plan = host.materialize(plan, adapter_name)  # meta (low_cpu_mem_usage) and sharded (FSDP2) destinations
    apply_plan(plan)
    loaded = {id(dest) for dest, _ in plan}
    missing = [k for k, t in model.state_dict(keep_vars=True).items() if id(t) not in loaded]
    return IncompatibleKeys(missing_keys=missing, unexpected_keys=[])


def load_peft_weights(model_id: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None,
                      key_mapping: Optional[dict[str, str]] = None, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (else the old ``adapter_model.bin``) from a local folder.

    The ``.bin`` file is read with ``torch.load(weights_only=True)`` only; nothing is unpickled.
    Hub ids are not downloaded: pass the folder the adapter was saved or downloaded to.

    Args:
        model_id: the adapter folder (``str`` or ``os.PathLike``); ``subfolder=`` as in PEFT.
        device: where the tensors go; by default CUDA when available, else the CPU (PEFT's rule).
        key_mapping: regex -> replacement applied, as in PEFT, to each key without its
            ``base_model.model.`` (or ``base_model.``) prefix; the first pattern that matches wins.
    """
    path = os.fspath(model_id)
    if kwargs.get("subfolder"):
        path = os.path.join(path, kwargs["subfolder"])
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a local folder. peftkit does not download adapters: pass "
                                "the folder the adapter was saved to (or downloaded to, e.g. with "
                                "huggingface_hub.snapshot_download).")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors = load_tensors(path)
    out = {k: v.to(device) for k, v in tensors.items()}
    return _remap(out, key_mapping) if key_mapping else out


def _remap(tensors: dict[str, torch.Tensor], key_mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        prefix = PREFIX if key.startswith(PREFIX) else HOST_PREFIX if key.startswith(HOST_PREFIX) else None
        if prefix is None:
            raise ValueError(f"key_mapping needs keys that start with {PREFIX!r} or {HOST_PREFIX!r}, as PEFT "
                             f"writes them; got {key!r}.")
        rest = key[len(prefix):]
        for pattern, replacement in key_mapping.items():
            new, n = re.subn(pattern, replacement, rest)
            if n:
                rest = new
                break
        out[prefix + rest] = value
    return out


# ===== injecting without a wrapper =========================================================
def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False,
                            state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> nn.Module:
    """Add adapter ``adapter_name`` to ``model`` in place and return ``model`` itself (no PeftModel).

    As :func:`~peftkit.get_peft_model` does, but the result is the user's own module with the
    targeted layers wrapped: the base parameters are frozen, the adapter's train unless
    ``peft_config.inference_mode``, and ``model.peft_config`` maps adapter names to configs.
    A second call on the same model adds another adapter (the first stays active). Save and load
    its weights with :func:`get_peft_model_state_dict` / :func:`set_peft_model_state_dict`.

    Prompt methods (virtual tokens, prefixes, adaption prompts) and methods with state shared by
    the whole model (VeRA's saved projections) need the wrapper: use ``get_peft_model``.

    Args:
        state_dict: optional PEFT-keyed adapter dict; only its keys are used, to find the layers
            to adapt when the config's ``target_modules`` is not known (PEFT's meaning).
        low_cpu_mem_usage: create the adapter's tensors on the meta device (to be filled by
            :func:`set_peft_model_state_dict`), as PEFT does.
    """
    if isinstance(model, PeftModel):
        raise ValueError("model is already a PeftModel; use model.add_adapter(name, config) instead.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a peftkit config (LoraConfig(...) ...), got "
                        f"{type(peft_config).__name__}.")
    if method_kind(peft_config) == "prompt":
        raise ValueError(f"inject_adapter_in_model does not support {peft_config.peft_type}: prompt methods add "
                         "virtual tokens or attention prefixes at the model's input, which needs the wrapper. "
                         "Use get_peft_model(model, config).")
    if state_dict is not None:
        peft_config = _targets_from_keys(peft_config, model, state_dict)
    host = model.__dict__.get(_HOST_ATTR) or AdapterHost(model)
    trainable = [(p, p.requires_grad) for p in model.parameters()]  # to restore on refusal
    host.inject(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
    shared = [k for k in host.adapter_state_dict(adapter_name)
              if k.startswith(HOST_PREFIX) and not k.startswith(PREFIX)]
    if shared:
        host.delete_adapter(adapter_name)
        if not host.peft_config:
            host.unload()
        for p, flag in trainable:
            p.requires_grad_(flag)
        raise ValueError(f"inject_adapter_in_model does not support {peft_config.peft_type} with this config: it "
                         f"keeps state shared by the whole model ({shared[0]!r}), which lives on the wrapper. "
                         "Use get_peft_model(model, config).")
    model.__dict__[_HOST_ATTR] = host
    model.peft_config = host.peft_config
    return model


def _targets_from_keys(config: PeftConfig, model: nn.Module, keys: Mapping[str, Any]) -> PeftConfig:
    """``config`` with ``target_modules`` set to the layers that ``keys`` adapt.

    A module is adapted when some key is ``<its path>.<name>`` with ``<name>`` neither one of its
    submodules nor one of its own parameters or buffers (so ``lora_A.weight`` marks ``q_proj``,
    while a ``modules_to_save`` copy's ``lm_head.weight`` marks nothing).
    """
    if not hasattr(config, "target_modules"):
        raise ValueError(f"{config.peft_type} has no target_modules; state_dict= cannot select its layers.")
    rests: dict[str, set[str]] = {}
    for key in keys:
        key = key[len(PREFIX):] if key.startswith(PREFIX) else key
        parts = key.split(".")
        for i in range(1, len(parts)):
            rests.setdefault(".".join(parts[:i]), set()).add(parts[i])
    paths = []
    for path, module in model.named_modules():
        if path not in rests:
            continue
        own = {n for n, _ in module.named_children()}
        own |= {n for n, _ in module.named_parameters(recurse=False)}
        own |= {n for n, _ in module.named_buffers(recurse=False)}
        if rests[path] - own:
            paths.append(path)
    if not paths:
        raise ValueError("state_dict names no layer of this model (its keys should read "
                         "'<module path>.lora_A.weight' and the like, with or without 'base_model.model.').")
    return dataclasses.replace(config, target_modules="|".join(re.escape(p) for p in paths))
