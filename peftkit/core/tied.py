"""The input embedding and the layers that share its weight (tied weights).

With ``tie_word_embeddings`` the output head's weight *is* the input embedding's; T5 and BART
go further: their encoder and decoder call ``embed_tokens`` modules of their own whose weight is
``shared.weight``::

    shared ──weight──┬── encoder.embed_tokens     (called on the encoder's input ids)
                     ├── decoder.embed_tokens     (called on the decoder's input ids)
                     └── lm_head                  (logits = h . weight^T)

A change to the rows of that one weight (trainable tokens, a merge) must be seen by every one of
them. :func:`tied_paths` finds them by the weight's identity, the same modules Hugging Face PEFT
finds through transformers' ``_tied_weights_keys``, and :func:`warn_tied_targets` gives PEFT's
warning when an adapter targets such a layer on its own.
"""
from __future__ import annotations

import re
import warnings
from typing import Optional

from torch import nn

from .copies import ModuleCopy
from .inject import iter_candidates
from .site import Site

#: Module names PEFT treats as the token embeddings (its ``EMBEDDING_LAYER_NAMES``).
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def unwrap(module: nn.Module) -> nn.Module:
    """The base layer of a Site, or the module itself."""
    return module.base_layer if isinstance(module, Site) else module


def path_of(model: nn.Module, module: nn.Module) -> Optional[str]:
    """The first path (under the names before wrapping) at which ``module`` sits, or None."""
    for path, m in iter_candidates(model):
        if m is module or unwrap(m) is module:
            return path
    return None


def input_embedding_path(model: nn.Module, default: str = "embed_tokens") -> str:
    """Dotted path of ``model.get_input_embeddings()`` (``default`` when the model has none)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = None
    if get is not None:
        try:
            emb = unwrap(get())
        except (NotImplementedError, AttributeError):
            emb = None
    path = path_of(model, emb) if emb is not None else None
    return path or default


def tied_paths(model: nn.Module) -> list[str]:
    """Paths of the modules, other than the input embedding, whose weight *is* the input
    embedding's (the output head, T5's encoder/decoder ``embed_tokens``); a ``modules_to_save``
    copy runs weights of its own and is not listed."""
    try:
        emb = unwrap(model.get_input_embeddings())
    except (AttributeError, NotImplementedError):
        return []
    weight = getattr(emb, "weight", None)
    emb_path = path_of(model, emb) if weight is not None else None
    if emb_path is None:
        return []
    out = []
    for path, m in iter_candidates(model):
        if path == emb_path or (isinstance(m, Site) and m.copies and any(
                type(d) is ModuleCopy for _, d in m.deltas.modules_only())):
            continue
        base = unwrap(m)
        if isinstance(base, (nn.Embedding, nn.Linear)) and getattr(base, "weight", None) is weight:
            out.append(path)
    return out


def names_embedding(spec, model: Optional[nn.Module] = None) -> bool:
    """Whether a ``target_modules``/``modules_to_save`` spec names ``embed_tokens`` or ``lm_head``
    (PEFT's test: a list entry's last component, or a regex matching the bare name); with
    ``model``, also whether a list holds that model's input embedding's full path
    (``transformer.wte``), as PEFT's ``ensure_weight_tying`` rewrite writes it into a saved config."""
    if isinstance(spec, str):
        return any(re.fullmatch(spec, name) for name in EMBEDDING_LAYER_NAMES)
    path = input_embedding_path(model) if model is not None else None
    return any(str(m).split(".")[-1] in EMBEDDING_LAYER_NAMES or m == path for m in spec or ())


def warn_tied_targets(config, model: nn.Module) -> None:
    """PEFT's warnings about tied layers, on the user's config (before a method fills in
    defaults), as PEFT checks it:

    - ``target_modules`` or ``modules_to_save`` names ``embed_tokens`` or ``lm_head`` on a model
      whose embedding weight is tied: an adapter on one tied layer is not applied to the others,
      which matters when merging or converting (LoRA's message names ``ensure_weight_tying``);
    - ``ensure_weight_tying=True`` with nothing to tie, in the model or in the config.
    """
    ensure = getattr(config, "ensure_weight_tying", False)
    on = model if ensure else None  # ensure_weight_tying also ties an embedding named by its path
    named = names_embedding(getattr(config, "target_modules", None), on) or \
        names_embedding(getattr(config, "modules_to_save", None), on)
    tied = bool(tied_paths(model))
    if ensure:
        if not tied:
            msg = "You have requested `ensure_weight_tying`, but no tied modules were found in the model"
        elif not named:
            msg = ("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                   "`modules_to_save` or `target_modules`")
        else:
            return
        warnings.warn(msg, UserWarning, stacklevel=5)
        return
    if not named or not tied:
        return
    why = "`ensure_weight_tying` is not set to True" if hasattr(config, "ensure_weight_tying") \
        else "no implementation exists to tie the adapters"
    warnings.warn(
        f"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but {why}. This can "
        "lead to complications, for example when merging the adapter or converting your model to formats "
        "other than safetensors. Check the discussion here: https://github.com/huggingface/peft/issues/2777",
        UserWarning, stacklevel=5)
