"""Site: the wrapper that takes a targeted module's place in the model.

A Site keeps the original module as ``base_layer`` and a ``deltas`` dict (adapter name -> Delta).
It alone knows which adapters are active, which are merged into the base weight, how inputs are
cast to each adapter's dtype, how a batch whose rows use different adapters is routed, and when
an update may be written into the base output in place.

One forward, in three steps:

1. ``_refresh`` (on every change of active/merged/disabled state, ``.to()``, a new or removed
   adapter) computes the run list: the Deltas to apply, each with the dtype its input is cast to,
   the one Delta that replaces the base (``modules_to_save``), those that transform the input.
2. ``forward`` calls the base layer as the model would (its hooks run and see its output), then
   hands ``(x, y, base)`` to each Delta of the run list.
3. The in-place rule: a Delta may write its update into ``y`` (``Delta.forward_into``) only when
   the Site owns ``y``: the base is of a type that returns a new tensor that its own backward does
   not keep (``nn.Linear``, transformers' ``Conv1D``, convolutions, embeddings) and no hook
   (module or global, forward or backward) can have seen or kept it. Otherwise the Delta returns a
   new tensor (``Delta.forward``). Linear bases that the Site owns are called on a 2-D view of the
   input, so that the in-place update is one ``addmm_`` on a tensor that is no view, also under
   autograd.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .method import Delta
from .packed import DeltaDict

try:  # transformers' GPT-2 Conv1D: a linear layer stored in x out
    from transformers.pytorch_utils import Conv1D as _Conv1D
except Exception:  # transformers absent: plain torch models still work
    _Conv1D = None

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

    def keep(self, groups) -> None:
        """Hold the block's Deltas for its lifetime: Deltas over packed storage are built on
        demand and cached weakly (core/packed.py), and memo keys use their ``id``."""
        for d, _ in groups:
            self.memo.setdefault(("kept", id(d)), d)


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


#: Base layer types whose forward returns a new tensor that their backward does not save: an
#: update may be added into it in place when no hook saw it (exact types: a subclass may differ).
_FRESH = frozenset(t for t in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, _Conv1D) if t is not None)
#: Of those, the ones computed token by token on the last dimension: called on a 2-D view of ``x``.
_TOKENWISE = frozenset(t for t in (nn.Linear, _Conv1D) if t is not None)
_M = nn.modules.module


def _hooked(base: nn.Module) -> bool:
    """Whether calling ``base`` runs a hook that may see or keep its output (module or global)."""
    return bool(base._forward_hooks or base._forward_pre_hooks or base._backward_hooks
                or base._backward_pre_hooks or _M._global_forward_hooks or _M._global_forward_pre_hooks
                or _M._global_backward_hooks or _M._global_backward_pre_hooks)


def _first_tensor(kwargs: dict) -> torch.Tensor:
    """The input of a layer called with keyword arguments only (``vision(pixel_values=...)``)."""
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"an adapted layer was called without a tensor argument (keywords: {sorted(kwargs)})")


#: Site attributes that cache what the adapters' state implies. They hold references to Deltas
#: that already are children (under ``deltas``) or are built over packed storage and must not be
#: children, so they are kept out of nn.Module's registries: registering them would list each
#: active Delta twice in ``state_dict()`` and ``named_modules()``.
_CACHES = frozenset({"_run", "_pre", "_replace", "_into"})


class Site(BaseLayerPassthrough):
    """Wraps one targeted module and applies the active adapters' Deltas to its output."""

    #: PEFT's ``cast_input_dtype_enabled`` (class default; set per Site by the property)
    _cast_input = True

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.deltas = DeltaDict()  # adapter name -> Delta, whatever the storage (core/packed.py)
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self._run: list[tuple[Delta, Optional[torch.dtype]]] = []
        self._pre: list[tuple[Delta, Optional[torch.dtype]]] = []
        self._replace: Optional[Delta] = None
        #: (delta, dtype) when exactly one Delta runs and it can accumulate into a ``y`` the Site owns
        self._into: Optional[tuple[Delta, Optional[torch.dtype]]] = None
        #: how many Deltas here are full copies (``modules_to_save``); kept so that walking the
        #: model does not scan every adapter of every site
        self.copies = 0

    @property
    def cast_input_dtype_enabled(self) -> bool:
        """Whether inputs are cast to each adapter's dtype before it runs (PEFT's layer flag)."""
        return self._cast_input

    @cast_input_dtype_enabled.setter
    def cast_input_dtype_enabled(self, value: bool) -> None:
        object.__setattr__(self, "_cast_input", bool(value))
        self._refresh()

    def _input_dtype(self, delta: Delta) -> Optional[torch.dtype]:
        """The dtype ``delta``'s input is cast to (None: not cast)."""
        return _param_dtype(delta) if self._cast_input else None

    def __setattr__(self, name, value):
        if name in _CACHES:  # plain attributes: a cached Delta must not become a child module
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)
        if name == "base_layer":  # plain references too: they skip nn.Module's slow attribute path
            object.__setattr__(self, "_base", value)
            object.__setattr__(self, "_fresh", type(value) in _FRESH)
            object.__setattr__(self, "_tokenwise", type(value) in _TOKENWISE)

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
        self.copies -= bool(self.deltas[name].replaces_base)
        del self.deltas[name]
        self.active = [a for a in self.active if a != name]
        self._refresh()

    def set_active(self, names: Iterable[str]) -> None:
        """Make exactly the adapters in ``names`` (those present here) active, in that order."""
        self.active = [n for n in names if n in self.deltas]
        self._refresh()

    def _apply(self, fn, recurse=True):
        """Convert as nn.Module does, then rebuild the run list: its dtypes (and Deltas over
        packed storage) belong to the tensors before conversion."""
        out = super()._apply(fn, recurse)
        self._refresh()
        return out

    def _refresh(self) -> None:
        run, pre, replace = [], [], None
        if not self.disabled:
            for n in self.active:
                if n in self.merged:
                    continue
                d = self.deltas[n]
                if d.replaces_base:
                    replace = d
                else:
                    run.append((d, self._input_dtype(d)))
                    if d.transforms_input:
                        pre.append((d, self._input_dtype(d)))
        self._run, self._pre, self._replace = run, pre, replace
        single = len(run) == 1 and not pre and replace is None and run[0][0].accumulates
        self._into = run[0] if single else None

    def _base_with(self, x, pre, *args, **kwargs):
        for d, dtype in pre:
            xt = x if dtype is None or x.dtype == dtype else x.to(dtype)
            x = d.transform_input(xt).to(x.dtype)
        return self.base_layer(x, *args, **kwargs)

    def _owns(self, base: nn.Module) -> bool:
        """Whether ``base``'s output is the Site's alone (see the module docstring)."""
        return self._fresh and not _hooked(base)

    # ----- forward ------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if _OPEN_ROUTINGS:
            routing = _ROUTING.get()
            if routing is not None:
                return self._forward_mixed(routing, *args, **kwargs)
        into, base = self._into, self._base
        if into is not None and len(args) == 1 and not kwargs:  # the common case: one adapter
            x, (delta, dtype) = args[0], into
            if x.dtype == dtype and self._owns(base) and not _hooked(delta):
                if self._tokenwise and x.dim() != 2:
                    x2 = x.reshape(-1, x.shape[-1])
                    y = delta.forward_into(x2, base(x2), base)
                    return y.view(*x.shape[:-1], y.shape[-1])
                return delta.forward_into(x, base(x), base)
        if not self._run and self._replace is None:
            return base(*args, **kwargs)
        x = args[0] if args else _first_tensor(kwargs)
        if self._replace is not None:
            y, owned = self._replace.replace(*args, **kwargs), False
        elif self._pre and args:
            y, owned = self._base_with(x, self._pre, *args[1:], **kwargs), False
        else:
            y = base(*args, **kwargs)
            owned = self._owns(base)
        for delta, dtype in self._run:
            y, owned = self._run_delta(delta, dtype, x, y, owned)
        return y

    def _run_delta(self, delta: Delta, dtype, x, y, owned: bool):
        """Apply one Delta to ``y``; returns the new output and whether the Site owns it."""
        if dtype is not None and x.dtype != dtype and x.is_floating_point():
            x = x.to(dtype)
        if owned and delta.accumulates and not _hooked(delta):
            out = delta.forward_into(x, y, self._base)
        else:
            out = delta(x, y, self._base)
        if out.dtype != y.dtype:
            out = out.to(y.dtype)
        # a new tensor made without autograd is the Site's too; under autograd it may be saved
        return out, (owned and out is y) or (out is not y and not torch.is_grad_enabled())

    def _forward_mixed(self, routing: Routing, *args, **kwargs):
        if self.merged:
            raise RuntimeError(
                f"adapters {self.merged} are merged into the base weights; unmerge them "
                "(model.unmerge_adapter()) before running mixed-adapter batches"
            )
        x = args[0] if args else _first_tensor(kwargs)
        rest = args[1:]
        groups = [(self.deltas[n], idx) for n, idx in routing.groups(x.device, x.shape[0]).items()
                  if n in self.deltas]
        routing.keep(groups)  # Deltas over packed storage keep their identity for the block
        y = self.base_layer(*args, **kwargs)
        replacing = [(d, i) for d, i in groups if d.replaces_base]
        if replacing:
            for d, idx in replacing:
                part = d.replace(x[idx], *rest, **kwargs)  # a Delta that cannot split rows raises here
                y = y.index_copy(0, idx, part.to(y.dtype))
            return y
        if not groups:
            return y
        owned = self._owns(self.base_layer)
        by_cls: dict[type, list] = {}
        for d, idx in groups:
            by_cls.setdefault(type(d), []).append((d, idx))
        out = y
        for cls, items in by_cls.items():
            res = None
            if len(items) > 1:
                res = cls.forward_mixed([d for d, _ in items], [i for _, i in items], x, out, self.base_layer,
                                        inplace=owned)
            if res is not None:
                out, owned = res, owned and res is out
                continue
            for d, idx in items:
                dt = self._input_dtype(d)
                y_rows = self._base_with(x[idx], [(d, dt)], *rest, **kwargs) if d.transforms_input else y[idx]
                part, _ = self._run_delta(d, dt, x[idx], y_rows, True)  # y[idx] is a new tensor
                out = out.index_copy(0, idx, part)  # row groups are disjoint
                owned = not torch.is_grad_enabled()
        return out

    # ----- merging ------------------------------------------------------------------
    def check_merge(self, names: Iterable[str]) -> None:
        """Raise, changing nothing, if one of the named adapters here cannot be merged (the
        method's explanation, or a quantised base); the host asks every Site before merging any."""
        names = list(names)
        _refuse_quantized(self.base_layer, names, self.deltas, self.merged)
        for n in names:
            if n in self.deltas and n not in self.merged and not self.deltas[n].mergeable:
                self.deltas[n].delta_weight(self.base_layer)  # raises the method's explanation

    def merge(self, names: Iterable[str], safe_merge: bool = False) -> None:
        """Fold the named adapters present here into the base weight, in order."""
        names = list(names)
        self.check_merge(names)
        for n in names:
            if n not in self.deltas or n in self.merged:
                continue
            d = self.deltas[n]
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
