"""Site: the wrapper that takes a targeted module's place in the model.

A Site keeps the original module as ``base_layer`` and a ``deltas`` dict (adapter name -> Delta).
It alone knows which adapters are active, which are merged into the base weight, how inputs are
cast to each adapter's dtype, and how a batch whose rows use different adapters is routed.

The per-call work is kept minimal: the list of deltas to run is recomputed only when the
active/merged/disabled state changes, so a forward with one active adapter is one base call plus
one delta call.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .method import Delta
from .packed import DeltaDict

BASE = "__base__"  # row name meaning "no adapter" in mixed batches

_ROUTING: contextvars.ContextVar[Optional["Routing"]] = contextvars.ContextVar("peftkit_routing", default=None)
# How many routing blocks are open in any thread. Site.forward reads this plain global first:
# torch.compile traces a global but not a ContextVar, so the common (unrouted) path has no graph
# break; only inside a routing block is the thread-safe ContextVar consulted.
_OPEN_ROUTINGS = 0


class Routing:
    """Per-row adapter names for one mixed-adapter forward, with row indices cached per device."""

    def __init__(self, names: Sequence[str], reuse: bool = False):
        self.names = list(names)
        self._groups: dict[tuple, dict[str, torch.Tensor]] = {}
        #: True when the same rows run many times (generate's decode steps): methods may then
        #: keep per-site gathered weights in :attr:`memo` for the block's lifetime.
        self.reuse = reuse
        self.memo: dict = {}

    def groups(self, device: torch.device, batch: int) -> dict[str, torch.Tensor]:
        """Adapter name -> LongTensor of the batch rows that use it, on ``device``.

        A batch ``k`` times longer than ``names`` (beam search, ``num_return_sequences``) repeats
        each name ``k`` times in place, as generate() expands its inputs.
        """
        key = (device, batch)
        g = self._groups.get(key)
        if g is None:
            n = len(self.names)
            if batch % n:
                raise ValueError(f"adapter_names has {n} entries but the batch has {batch} rows")
            k = batch // n
            rows: dict[str, list[int]] = {}
            for i, name in enumerate(self.names):
                rows.setdefault(name, []).extend(range(i * k, (i + 1) * k))
            g = {name: torch.tensor(r, dtype=torch.long, device=device) for name, r in rows.items()}
            self._groups[key] = g
        return g


def current_routing() -> Optional[Routing]:
    """The routing of the enclosing :func:`adapter_routing` block, if any."""
    return _ROUTING.get()


@contextlib.contextmanager
def adapter_routing(names: Optional[Sequence[str]], reuse: bool = False):
    """Within this block, row ``i`` of every batch uses adapter ``names[i]`` (``"__base__"``: none).

    ``reuse=True`` (generation) lets methods cache per-row gathered weights until the block ends.
    """
    global _OPEN_ROUTINGS
    token = _ROUTING.set(Routing(names, reuse) if names is not None else None)
    _OPEN_ROUTINGS += 1
    try:
        yield
    finally:
        _OPEN_ROUTINGS -= 1
        _ROUTING.reset(token)


def _param_dtype(module: nn.Module) -> Optional[torch.dtype]:
    for p in module._parameters.values():  # the module's own first: no recursive walk
        if p is not None and p.is_floating_point():
            return p.dtype
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


class BaseLayerPassthrough(nn.Module):
    """A wrapper whose unknown attributes are read from ``self.base_layer``.

    Code that reads e.g. ``layer.weight`` or ``attn.num_heads`` keeps working after the layer
    is wrapped (by a Site, or by a method's own wrapper).
    """

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self._modules["base_layer"], name)


#: Site attributes that cache what the adapters' state implies. They hold references to Deltas
#: that already are children (under ``deltas``) or views that must not be (packed adapters), so
#: they are kept out of nn.Module's registries: registering them would list each active Delta
#: twice in ``state_dict()`` and ``named_modules()``.
_CACHES = frozenset({"_run", "_pre", "_replace", "_whole", "_views"})


class Site(BaseLayerPassthrough):
    """Wraps one targeted module and applies the active adapters' Deltas to its output."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.deltas = DeltaDict()  # Delta modules and packed adapters (core/packed.py)
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self._run: list[tuple[Delta, Optional[torch.dtype]]] = []
        self._pre: list[tuple[Delta, Optional[torch.dtype]]] = []
        self._replace: Optional[Delta] = None
        #: the one active delta when it can compute base and update together
        #: (``forward_whole``), else None; see :meth:`_refresh`
        self._whole: Optional[Delta] = None
        #: views over the packed weights of active packed adapters (core/packed.py), kept so
        #: that refreshing the run list does not rebuild them; only active ones are held
        self._views: dict[str, Delta] = {}
        #: how many Deltas here are full copies (``modules_to_save``); kept so that walking the
        #: model does not scan every adapter of every site
        self.copies = 0

    def __setattr__(self, name, value):
        if name in _CACHES:  # plain attributes: a cached Delta must not become a child module
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)
        if name == "base_layer":  # a plain reference too: skips nn.Module's slow attribute path
            object.__setattr__(self, "_base", value)

    # ----- adapter bookkeeping ------------------------------------------------------
    def add(self, name: str, delta: Delta) -> None:
        """Attach ``delta`` under ``name`` (inactive until :meth:`set_active`)."""
        if name in self.deltas:
            raise ValueError(f"adapter {name!r} already exists at this site")
        self.deltas[name] = delta
        self.copies += bool(delta.replaces_base)
        self._refresh()

    def remove(self, name: str) -> None:
        """Detach adapter ``name`` (unmerging it first if it is merged)."""
        if name in self.merged:
            self.unmerge(until=name)
        module = self.deltas._modules.get(name)  # a packed adapter is never a full copy
        self.copies -= bool(module is not None and module.replaces_base)
        del self.deltas[name]
        self._views.pop(name, None)
        self.active = [a for a in self.active if a != name]
        self._refresh()

    def set_active(self, names: Iterable[str]) -> None:
        """Make exactly the adapters in ``names`` (those present here) active, in that order."""
        self.active = [n for n in names if n in self.deltas]
        self._refresh()

    def _apply(self, fn, recurse=True):
        """Convert as nn.Module does, then rebuild the cached run list: its dtypes, and the
        views over packed weights, belong to the tensors before conversion."""
        out = super()._apply(fn, recurse)
        self._views = {}
        self._refresh()
        return out

    def train(self, mode: bool = True):
        """As nn.Module's; views over packed weights (not children) are rebuilt in the new mode."""
        out = super().train(mode)
        if self.deltas.npacked:
            self._views = {}
            self._refresh()
        return out

    def _active_delta(self, name: str, views: dict) -> Delta:
        d = self.deltas._modules.get(name)
        if d is None:  # packed: reuse this adapter's view if it has one
            d = views[name] = self._views.get(name) or self.deltas[name]
        return d

    def _refresh(self) -> None:
        run, pre, replace, views = [], [], None, {}
        if not self.disabled:
            for n in self.active:
                if n in self.merged:
                    continue
                d = self._active_delta(n, views)
                if d.replaces_base:
                    replace = d
                else:
                    run.append((d, _param_dtype(d)))
                    if d.transforms_input:
                        pre.append((d, _param_dtype(d)))
        self._run, self._pre, self._replace, self._views = run, pre, replace, views
        # A single delta that can run the base product itself (plain LoRA on nn.Linear) gets the
        # call whole: it adds its update in place into a base output it owns, saving a copy.
        whole = run[0][0] if len(run) == 1 and not pre and replace is None else None
        self._whole = whole if whole is not None and hasattr(whole, "forward_whole") else None

    def _base_with(self, x, pre, *args, **kwargs):
        for d, dtype in pre:
            xt = x if dtype is None or x.dtype == dtype else x.to(dtype)
            x = d.transform_input(xt).to(x.dtype)
        return self.base_layer(x, *args, **kwargs)

    # ----- forward ------------------------------------------------------------------
    def forward(self, x, *args, **kwargs):
        if _OPEN_ROUTINGS:
            routing = _ROUTING.get()
            if routing is not None:
                return self._forward_mixed(routing, x, *args, **kwargs)
        if self._whole is not None and not args and not kwargs:
            y = self._whole.forward_whole(x, self._base)
            if y is not None:
                return y
        if self._replace is not None:
            y = self._replace.replace(x, *args, **kwargs)
        elif self._pre:
            y = self._base_with(x, self._pre, *args, **kwargs)
        else:
            y = self._base(x, *args, **kwargs)
        for delta, dtype in self._run:
            y = self._run_delta(delta, dtype, x, y)
        return y

    def _run_delta(self, delta: Delta, dtype, x, y):
        if dtype is None or x.dtype == dtype or not x.is_floating_point():
            out = delta(x, y, self._base)
        else:
            out = delta(x.to(dtype), y, self._base)
        return out if out.dtype == y.dtype else out.to(y.dtype)

    def _forward_mixed(self, routing: Routing, x, *args, **kwargs):
        if self.merged:
            raise RuntimeError(
                f"adapters {self.merged} are merged into the base weights; unmerge them "
                "(model.unmerge_adapter()) before running mixed-adapter batches"
            )
        groups = [(self._routed(n, routing), idx) for n, idx in routing.groups(x.device, x.shape[0]).items()
                  if n in self.deltas]
        replacing = [(d, i) for d, i in groups if d.replaces_base]
        if replacing:
            y = self.base_layer(x, *args, **kwargs)
            for d, idx in replacing:
                y = y.index_copy(0, idx, d.replace(x[idx], *args, **kwargs).to(y.dtype))
            return y
        y = self.base_layer(x, *args, **kwargs)
        if not groups:
            return y
        by_cls: dict[type, list] = {}
        for d, idx in groups:
            by_cls.setdefault(type(d), []).append((d, idx))
        out = y
        for cls, items in by_cls.items():
            res = None
            if len(items) > 1:
                res = cls.forward_mixed([d for d, _ in items], [i for _, i in items], x, out, self.base_layer)
            if res is not None:
                out = res
                continue
            for d, idx in items:
                dt = _param_dtype(d)
                y_rows = self._base_with(x[idx], [(d, dt)], *args, **kwargs) if d.transforms_input else y[idx]
                part = self._run_delta(d, dt, x[idx], y_rows)
                out = out.index_copy(0, idx, part)  # row groups are disjoint
        return out

    def _routed(self, name: str, routing: Routing) -> Delta:
        """Adapter ``name``'s Delta for a mixed batch. A packed adapter's view is kept in the
        routing block's memo, so each is built once per block and keeps one identity in it."""
        d = self.deltas._modules.get(name)
        if d is not None:
            return d
        key = ("packed", id(self), name)
        d = routing.memo.get(key)
        if d is None:
            d = routing.memo[key] = self.deltas[name]
        return d

    # ----- merging ------------------------------------------------------------------
    def merge(self, names: Iterable[str], safe_merge: bool = False) -> None:
        """Fold the named adapters present here into the base weight, in order."""
        _refuse_quantized(self.base_layer, names, self.deltas, self.merged)
        for n in names:
            if n not in self.deltas or n in self.merged:
                continue
            d = self.deltas[n]
            if not d.mergeable:
                d.delta_weight(self.base_layer)  # raises the method's explanation
            if safe_merge:
                backup = {k: v.detach().clone() for k, v in self.base_layer.state_dict().items()}
                d.merge(self.base_layer)
                bad = [k for k, v in self.base_layer.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
                if bad:
                    self.base_layer.load_state_dict(backup)
                    raise ValueError(f"merging adapter {n!r} produced NaN/inf in {bad}; base weights left unchanged")
            else:
                d.merge(self.base_layer)
            self.merged.append(n)
        self._refresh()

    def unmerge(self, until: Optional[str] = None) -> None:
        """Undo merges in reverse order (all of them, or down to and including ``until``)."""
        while self.merged:
            n = self.merged.pop()
            self.deltas[n].unmerge(self.base_layer)
            if n == until:
                break
        self._refresh()

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}, disabled={self.disabled}"


def _refuse_quantized(base: nn.Module, names: Iterable[str], deltas, merged) -> None:
    """Packed quantised storage cannot absorb an update in place: say what to do instead."""
    if not any(n in deltas and n not in merged for n in names):
        return
    from ..quant.backend import is_quantized

    if is_quantized(base):
        raise TypeError(
            f"cannot merge into the quantised layer {type(base).__name__} in place. Use "
            "peftkit.quant.merge_and_unload_quantized(model) (dense or re-quantised result, error "
            "reported), or peftkit.quant.dequantize_sites(model) first to merge reversibly."
        )
