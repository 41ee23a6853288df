"""Small helpers shared by the layer methods (LoRA included): layer shapes, target defaults, config checks.

Kept here so each method file holds only its own math. Nothing in this module names a method.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import nn

from ..config import ConfigError
from ..core.inject import linear_types
from ..targets import default_targets


def is_conv1d_gpt2(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (a linear layer whose weight is stored in x out)."""
    return type(module).__name__ == "Conv1D" and isinstance(module, linear_types())


def linear_dims(module: nn.Module) -> Optional[tuple[int, int, bool]]:
    """(in_features, out_features, weight_is_in_by_out) of a linear-like layer, else None."""
    if is_conv1d_gpt2(module):
        i, o = module.weight.shape
        return int(i), int(o), True
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    return None


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in_flat): transposes Conv1D, flattens conv kernels."""
    if is_conv1d_gpt2(module):
        return module.weight.T
    return module.weight.reshape(module.weight.shape[0], -1)


def from_2d(w2: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Inverse of :func:`weight_2d`: an (out, in_flat) matrix in the layer's native layout."""
    if is_conv1d_gpt2(module):
        return w2.T
    return w2.reshape(module.weight.shape)


def embed_scale(base: nn.Module) -> Optional[torch.Tensor]:
    """The factor a scaled word embedding multiplies its lookups by (Gemma's and BART's
    ``...ScaledWordEmbedding``: ``E[x] * embed_scale``), or None. An adapter's rows added to such
    an output must carry the same factor, or the unmerged model differs from the merged one.
    A non-scalar ``embed_scale`` is not applied, with PEFT's warning."""
    scale = getattr(base, "embed_scale", None)
    if scale is None:
        return None
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
    if isinstance(scale, torch.Tensor):
        if scale.numel() == 1:
            return scale
        import warnings

        from ..errors import PeftWarning

        warnings.warn(f"Found embed_scale attribute with shape {scale.shape}, expected scalar. Embedding scaling "
                      "will not be applied. If this is unexpected, please open an issue at "
                      "https://github.com/huggingface/peft/issues", PeftWarning, stacklevel=3)
    return None


def adapter_dtype(module: nn.Module) -> torch.dtype:
    """Adapters train in fp32 over half-precision bases (PEFT's autocast does the same)."""
    w = getattr(module, "weight", None)
    if w is None or not w.is_floating_point() or w.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return w.dtype


def with_default_targets(config: Any, model: nn.Module, table: dict, method: str, **extra: Any) -> Any:
    """``config`` with ``target_modules`` filled from ``table`` when unset (clear error if no row)."""
    if getattr(config, "target_modules", None) is None:
        return dataclasses.replace(config, target_modules=default_targets(model, table, method), **extra)
    return dataclasses.replace(config, **extra) if extra else config


def normalise_targets(config: Any, *fields: str) -> None:
    """Sets and tuples of module names become sorted lists (JSON has neither)."""
    for f in fields or ("target_modules", "exclude_modules"):
        v = getattr(config, f, None)
        if isinstance(v, (set, tuple)):
            setattr(config, f, sorted(v))


def check_positive_int(config: Any, *names: str) -> None:
    """Each named field must be a positive int; the error names the field and the value."""
    for n in names:
        v = getattr(config, n)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{type(config).__name__}.{n} must be a positive integer, got {v!r}.")


def check_probability(config: Any, *names: str) -> None:
    """Each named field must lie in [0, 1)."""
    for n in names:
        v = getattr(config, n)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
            raise ConfigError(f"{type(config).__name__}.{n} must be a probability in [0, 1), got {v!r}.")


def check_layers(config: Any) -> None:
    """PEFT's rules for ``layers_to_transform`` / ``layers_pattern``, in its order and words."""
    regex = isinstance(getattr(config, "target_modules", None), str)
    name = type(config).__name__
    if regex and getattr(config, "layers_to_transform", None) is not None:
        raise ConfigError(f"`layers_to_transform` cannot be used when `target_modules` is a str ({name}: "
                          "put the layer indices in the regex instead).")
    if regex and getattr(config, "layers_pattern", None):
        raise ConfigError(f"`layers_pattern` cannot be used when `target_modules` is a str ({name}: "
                          "a regex names the layers itself).")
    if getattr(config, "layers_pattern", None) and getattr(config, "layers_to_transform", None) is None:
        raise ConfigError(f"When `layers_pattern` is specified, `layers_to_transform` must also be specified "
                          f"({name}: give the layer indices the pattern's layers are picked by).")
