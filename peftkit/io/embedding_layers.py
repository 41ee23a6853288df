"""The base model's token embeddings in an adapter file (PEFT's ``save_embedding_layers``).

An adapter normally holds only its own tensors. When the vocabulary was resized for new tokens
(``model.resize_token_embeddings``), the new rows of the base's input and output embeddings are
part of what was trained, and an adapter without them gives other outputs on a freshly resized
base. Hugging Face PEFT therefore writes the base embedding weights into the adapter file:

- ``save_embedding_layers=True``: the input and output embeddings' weights, under the model's
  own keys (``base_model.model.model.embed_tokens.weight``, ``base_model.model.lm_head.weight``);
  an embedding that holds an adapter is written as ``<path>.base_layer.weight``, and then only
  adapted embeddings are written;
- ``"auto"`` (the default): ``True``, with a warning, when ``target_modules`` names
  ``embed_tokens`` or ``lm_head`` (and the adapter does not use trainable tokens), or when the
  vocabulary size differs from the base's saved ``config.json``; otherwise ``False``.

Loading puts such tensors into the base model (as PEFT's non-strict ``load_state_dict`` does),
after checking their shapes: a base that was not resized gets a clear error, not a partial load.
peftkit never contacts the Hub: a base named by a Hub id is treated as PEFT treats it offline.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Optional, Union

import torch
from torch import nn

from ..core.site import Site
from ..core.tied import EMBEDDING_LAYER_NAMES
from .peft_format import PREFIX



def _embedding_is_targeted(config, model: nn.Module) -> bool:
    tm = getattr(config, "target_modules", None)
    if isinstance(tm, str) and tm != "all-linear":
        return any(re.fullmatch(tm, path) for path, _ in model.named_modules()
                   if any(re.match(rf"(.*\.)?{e}$", path) for e in EMBEDDING_LAYER_NAMES))
    if tm and not isinstance(tm, str):
        return any(k in tm for k in EMBEDDING_LAYER_NAMES)
    return False


def _vocab_was_resized(config, model: nn.Module) -> bool:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    model_id = getattr(config, "base_model_name_or_path", None) or getattr(getattr(model, "config", None),
                                                                           "_name_or_path", None)
    if not (vocab and model_id):
        return False
    if not os.path.isfile(os.path.join(model_id, "config.json")):
        warnings.warn(f"Could not find a config file in {model_id} - will assume that the vocabulary was not "
                      "modified.", UserWarning, stacklevel=4)
        return False
    try:
        saved = type(model.config).from_pretrained(model_id).vocab_size
    except Exception:  # an unreadable config: as PEFT, assume the vocabulary is unchanged
        return False
    return vocab != saved


def should_save(save_embedding_layers: Union[bool, str], config, model: nn.Module) -> bool:
    """PEFT's decision for ``save_embedding_layers`` (``True``, ``False`` or ``"auto"``)."""
    if save_embedding_layers not in (True, False, "auto"):
        raise ValueError(f"save_embedding_layers must be True, False or 'auto', got {save_embedding_layers!r}.")
    if save_embedding_layers != "auto":
        return bool(save_embedding_layers)
    tokens = str(getattr(config, "peft_type", "")) == "TRAINABLE_TOKENS" \
        or getattr(config, "trainable_token_indices", None) is not None
    if _embedding_is_targeted(config, model) and not tokens:
        warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
                      UserWarning, stacklevel=3)
        return True
    if _vocab_was_resized(config, model):
        warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
                      "finetuning.", UserWarning, stacklevel=3)
        return True
    return False


def _embedding_modules(model: nn.Module) -> list[tuple[nn.Module, nn.Module, str]]:
    """(layer, module holding the weights, its path) for the input and output embeddings; the
    module is a Site's base layer when the embedding holds an adapter."""
    paths = {id(m): p for p, m in model.named_modules()}
    out = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(model, getter)()
        except Exception:  # not a transformers model, or no such layer
            layer = None
        if layer is None or id(layer) not in paths or any(layer is seen for seen, _, _ in out):
            continue
        path = paths[id(layer)]
        out.append((layer, layer.base_layer, f"{path}.base_layer") if isinstance(layer, Site) else (layer, layer, path))
    return out


def embedding_tensors(config, model: nn.Module) -> dict[str, torch.Tensor]:
    """The base embedding tensors PEFT writes with ``save_embedding_layers=True``, under
    ``base_model.model.``-prefixed keys; tensors that share storage are written as copies."""
    if not hasattr(model, "get_input_embeddings"):
        warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.",
                      UserWarning, stacklevel=3)
        return {}
    targeted = _embedding_is_targeted(config, model)
    out, seen = {}, set()
    for layer, module, path in _embedding_modules(model):
        if isinstance(layer, Site) and not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        if targeted and not isinstance(layer, Site):  # PEFT writes only the adapted embeddings then
            continue
        for name, t in module.state_dict().items():
            t = t.detach()
            if t.data_ptr() in seen:  # tied input and output embeddings: one file cannot alias
                t = t.clone()
            seen.add(t.data_ptr())
            out[f"{PREFIX}{path}.{name}"] = t
    return out


def embedding_destinations(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keys (``base_model.model.``-prefixed) under which a file may carry base embedding tensors,
    each with the tensor of ``model`` it loads into."""
    return {f"{PREFIX}{path}.{name}": t for _, module, path in _embedding_modules(model)
            for name, t in module.state_dict(keep_vars=True).items()}


def check_shape(key: str, dest: torch.Tensor, value: torch.Tensor, source: str) -> Optional[str]:
    """An error message when a saved embedding tensor does not fit the base, else None."""
    if tuple(dest.shape) == tuple(value.shape):
        return None
    return (f"{source}: {key!r} is the base model's embedding weight saved with the adapter "
            f"(save_embedding_layers), shape {tuple(value.shape)}, but this base has {tuple(dest.shape)}. "
            f"The adapter was trained with a resized vocabulary: call "
            f"model.resize_token_embeddings({value.shape[0]}) on the base before loading it.")
