"""Attention over a packed row, example by example, instead of one dense block-diagonal mask.

transformers handles a packed row (``position_ids`` restarting per example, no mask) under SDPA
by building a ``(T, T)`` block-diagonal mask and running dense attention over the whole row:
``T^2`` scores for ``sum(n_i^2)`` useful ones (8 examples of 100 tokens: 8x the work), and on
CPU a masked SDPA keeps the probabilities for backward. This attention function, registered
with transformers' ``AttentionInterface`` as ``"peftkit_packed"``, cuts the row at the
positions where ``position_ids`` do not continue by one (transformers' own packed-sequence
rule, ``find_packed_sequence_indices``) and runs causal SDPA on each example alone:

    q, k, v  (1, H, T, D)  ->  [SDPA(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], causal) for each example]
             -> concatenated (1, T, H, D), the layout transformers' attention functions return

Anything else (padded batches, a KV cache, a single example) goes to transformers' SDPA function
unchanged, with the mask transformers builds for it; for packed rows the mask builder
registered alongside returns no mask at all. It is used only for models whose config asks for
SDPA and has no sliding window, and ``peftkit train`` still checks the result against the
examples run alone before training (``packing.packing_mismatch``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

NAME = "peftkit_packed"


def segment_bounds(position_ids: Optional[torch.Tensor], length: int) -> Optional[list[int]]:
    """[0, s1, ..., T]: where the examples of a one-row packed batch start; None unless packed."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] != length:
        return None
    row = position_ids[0]
    cuts = (torch.diff(row) != 1).nonzero().flatten().add(1).tolist()
    return [0, *cuts, length] if cuts else None


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: Optional[float] = None, **kwargs):
    """transformers attention-function signature; per-example causal SDPA on a packed row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    bounds = None
    if attention_mask is None and key.shape[2] == length and query.shape[0] == 1:
        bounds = segment_bounds(kwargs.get("position_ids"), length)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: each KV head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                           dropout_p=dropout, is_causal=True, scale=scaling)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def packed_mask(**kw):
    """transformers mask-builder signature: no mask where :func:`packed_attention` needs none, else SDPA's."""
    from transformers.masking_utils import sdpa_mask

    if kw.get("attention_mask") is None and not kw.get("q_offset") and kw.get("kv_length") == kw.get("q_length"):
        return None
    return sdpa_mask(**kw)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, packed_mask)


def use_packed_attention(model) -> Optional[str]:
    """Switch ``model`` (a transformers model, or one that wraps it) to :func:`packed_attention`.

    Returns the attention implementation it replaced (to restore with :func:`restore_attention`),
    or None when the model is left alone: not SDPA, or a sliding window in its config.
    """
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    config = getattr(base, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current != "sdpa" or getattr(config, "sliding_window", None) or getattr(config, "layer_types", None) \
            and any(t != "full_attention" for t in config.layer_types):
        return None
    _register()
    config._attn_implementation = NAME
    return current


def restore_attention(model, previous: Optional[str]) -> None:
    """Undo :func:`use_packed_attention` (no-op for None)."""
    if previous is None:
        return
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    base.config._attn_implementation = previous
