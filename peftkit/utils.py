"""``peft.utils``-style helpers that scripts written for Hugging Face PEFT import.

``from peft.utils import _get_submodules, get_peft_model_state_dict, ...`` becomes
``from peftkit.utils import ...`` with the same names, arguments and results (PEFT 0.21):

- :func:`_get_submodules`: ``(parent, target, target_name)`` for a dotted module path;
- :func:`get_base_model_state_dict` / :func:`set_base_model_state_dict`: the base model's own
  weights under the keys the model had before any adapter (no ``base_layer`` infix, no adapter
  tensors), e.g. to load base weights after FSDP wrapping;
- :func:`cast_mixed_precision_params`: frozen parameters to float16/bfloat16, trainable ones to
  float32 (PEFT's recipe for mixed-precision training on a half-precision base);
- :func:`shift_tokens_right`: decoder inputs from labels (seq2seq), ``-100`` replaced by the pad id;
- re-exports: the state-dict functions, ``load_peft_weights``, ``prepare_model_for_kbit_training``,
  ``PeftType``, ``TaskType``, ``PeftError``, ``NoMatchingPeftModuleError``, file names, :func:`infer_device`, :func:`transpose`.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .config import CONFIG_NAME, PeftType, TaskType
from .core.host import IncompatibleKeys
from .core.site import Site
from .errors import NoMatchingPeftModuleError, PeftError, PeftWarning
from .functional import _host_and_prefix, get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from .io.checkpoint import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME as SAFETENSORS_WEIGHTS_NAME
from .quant import prepare_model_for_kbit_training

#: PEFT's ``WEIGHTS_NAME`` is the legacy pickle file name; the safetensors one is separate.
WEIGHTS_NAME = LEGACY_WEIGHTS_NAME

__all__ = ["NoMatchingPeftModuleError", "PeftError", "CONFIG_NAME", "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME", "PeftType", "TaskType", "_get_submodules",
           "get_base_model_state_dict", "set_base_model_state_dict", "cast_mixed_precision_params", "shift_tokens_right",
           "PeftWarning", "get_peft_model_state_dict",
           "set_peft_model_state_dict", "load_peft_weights", "prepare_model_for_kbit_training", "infer_device",
           "transpose"]


def _get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """``(parent, target, target_name)`` of the module at dotted path ``key`` in ``model``."""
    parent_path, _, target_name = key.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return parent, model.get_submodule(key), target_name


def infer_device() -> str:
    """``"cuda"``, ``"mps"``, ``"xpu"`` or ``"cpu"``: where PEFT would put new tensors."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "cpu"


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``weight.T`` when the layer stores it (in, out) (GPT-2's Conv1D), else ``weight``."""
    return weight.T if fan_in_fan_out else weight


def _original_keys(model: nn.Module) -> dict[str, str]:
    """Own state-dict key -> the key before any adapter, for the base model's tensors only.

    A Site's ``base_layer`` step is dropped from the path; anything under its ``deltas`` (the
    adapters) is left out.
    """
    out = {}
    for key in model.state_dict(keep_vars=True):
        module, parts, kept = model, key.split("."), []
        for part in parts[:-1]:
            if isinstance(module, Site):
                if part == "deltas":
                    kept = None
                    break
                if part == "base_layer":
                    module = module.base_layer
                    continue
            module = module._modules.get(part) if isinstance(module, nn.Module) else None
            kept.append(part)
        if kept is not None:
            out[key] = ".".join(kept + parts[-1:])
    return out


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under its original keys (no adapter tensors), as PEFT returns them."""
    host, _ = _host_and_prefix(model)
    own = host.model.state_dict()
    return {orig: own[key] for key, orig in _original_keys(host.model).items()}


def set_base_model_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load base weights keyed as the original model spells them into the adapted model.

    Returns ``(missing_keys, unexpected_keys)`` in original spelling; with ``strict`` a missing or
    unexpected key raises a RuntimeError that names them, before anything is loaded.
    """
    host, _ = _host_and_prefix(model)
    to_own = {orig: key for key, orig in _original_keys(host.model).items()}
    missing = [k for k in to_own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in to_own]
    if strict and (missing or unexpected):
        raise RuntimeError(f"set_base_model_state_dict: missing keys {missing[:5]}, unexpected keys "
                           f"{unexpected[:5]} ({len(missing)} and {len(unexpected)} in all). Pass the base model's "
                           "own state dict (original keys), or strict=False.")
    host.model.load_state_dict({to_own[k]: v for k, v in state_dict.items() if k in to_own}, strict=False)
    return IncompatibleKeys(missing, unexpected)


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s frozen parameters to ``dtype`` (float16 or bfloat16) and its trainable
    ones to float32, in place: the base takes half the memory while the adapter's weights and
    optimizer updates stay in full precision under autocast (PEFT's function of the same name)."""
    for p in model.parameters():
        p.data = p.data.to(dtype) if not p.requires_grad else p.data.to(torch.float32)


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs for ``input_ids`` (B x T): one step to the right, ``decoder_start_token_id``
    first, and ``-100`` (ignored label positions) replaced by ``pad_token_id``."""
    if pad_token_id is None:
        raise ValueError("self.model.config.pad_token_id has to be defined.")
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill_(shifted == -100, pad_token_id)
