"""The running rows' KV cache: one left-padded batched transformers cache that rows join and leave.

Every layer holds keys and values of shape ``(rows, kv_heads, T, head_dim)``; row ``i``'s real
positions are the last ones, ``mask[i] == 1`` where they are::

    row 0   . . K K K K K        mask 0 0 1 1 1 1 1     (a longer prompt, or joined earlier)
    row 1   . . . . . K K        mask 0 0 0 0 0 1 1
            <----- T ----->

A decode step appends one column to every row (the model's own ``update``). New rows, prefilled
in their own cache, join by :meth:`RowCache.join`: the shorter of the two caches is left-padded
with zeros (masked out) to the other's ``T`` and the rows are stacked. Finished rows leave by
:meth:`RowCache.keep`, which also drops leading columns that no remaining row uses, so ``T`` is
always the longest remaining row. Each join or leave copies the cache once; a decode step copies
it as any ``generate`` with a dynamic cache does.

Only caches whose layers are all transformers' plain ``DynamicLayer`` are supported (the usual
full-attention decoder); :func:`check` says so before any request runs on another kind.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch


def cache_kwarg(model) -> str:
    """The name ``model.forward`` takes its cache under (``cache`` in transformers 5, else
    ``past_key_values``)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out):
    """The cache a forward returned (``out.cache`` or ``out.past_key_values``)."""
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def new_cache():
    """An empty cache for a prefill: transformers' DynamicCache of plain layers."""
    from transformers import DynamicCache

    return DynamicCache()


def check(cache) -> None:
    """Raise a clear error unless every layer of ``cache`` is a plain DynamicLayer."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or not all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in (layers or [])}) or [type(cache).__name__]
        raise NotImplementedError(
            f"the continuous scheduler needs a cache of plain DynamicLayer layers; this model's is {kinds}. "
            "Start the server with --scheduler static.")


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class RowCache:
    """A batched cache over the running rows plus their attention mask ``(rows, T)``."""

    def __init__(self, cache, mask: torch.Tensor):
        check(cache)
        self.cache, self.mask = cache, mask

    @property
    def rows(self) -> int:
        """How many rows the cache holds."""
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        """``T``: positions per row, padding included."""
        return self.mask.shape[1]

    def grow(self) -> torch.Tensor:
        """The mask for a decode step (one more real position per row); it becomes the cache's
        own once the step's forward appended that position."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask

    def join(self, other: "RowCache") -> None:
        """Append ``other``'s rows after this cache's rows (both left-padded to one ``T``)."""
        t = max(self.length, other.length)
        a, b = t - self.length, t - other.length
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, a, 2), _pad_left(theirs.keys, b, 2)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, a, 2), _pad_left(theirs.values, b, 2)], dim=0)
        self.mask = torch.cat([_pad_left(self.mask, a, 1), _pad_left(other.mask, b, 1)], dim=0)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order) and drop the leading columns none of them uses."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx.to(layer.keys.device))[:, :, start:]
            layer.values = layer.values.index_select(0, idx.to(layer.values.device))[:, :, start:]
        self.mask = mask[:, start:]


def positions(mask: torch.Tensor, last: Optional[int] = None) -> torch.Tensor:
    """Position ids for a left-padded ``mask``: 0, 1, ... over each row's real tokens (padding
    gets 1, as transformers' generate does); ``last``: only the last that many columns."""
    pos = mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(mask == 0, 1)
    return pos if last is None else pos[:, -last:]
