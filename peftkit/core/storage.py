"""Lean adapter storage: placeholders for weights a checkpoint will supply, and nn.Module state
without the per-instance containers a Delta almost never uses.

Both exist for the same reason: a server holds hundreds of adapters of dozens of sites each, so
what one Delta costs beyond its own tensors (allocations, Python objects) bounds how many fit and
how fast they load. :class:`LeanModule` is the base of every Delta; the functions here are what
methods call to create parameters (:func:`new_parameter`) and what the loader calls to adopt a
file's tensors without a copy (:func:`is_placeholder`).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch
from torch import nn

_FROM_CHECKPOINT = contextvars.ContextVar("peftkit_from_checkpoint", default=False)


@contextlib.contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Within this block, new Deltas are about to be overwritten by a checkpoint.

    Methods may then skip random initialisation (``Method.make_delta`` asks
    :func:`init_skipped`). Initialisations that change the *base* model (PiSSA, OLoRA) must still
    run, since the saved adapter only fits the base they leave behind. The loader checks that every
    tensor of the new adapter is in the file, so nothing uninitialised survives a successful load,
    and a failed load deletes the adapter.
    """
    token = _FROM_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _FROM_CHECKPOINT.reset(token)


def init_skipped() -> bool:
    """True inside :func:`weights_from_checkpoint`: random initialisation would be overwritten."""
    return _FROM_CHECKPOINT.get()


def new_weight(*shape: int) -> torch.Tensor:
    """Storage for a new adapter parameter of ``shape`` (default dtype, uninitialised).

    Inside :func:`weights_from_checkpoint` nothing is allocated: the result is a one-element
    tensor expanded to ``shape`` (a placeholder), and the loader makes the file's own tensor the
    parameter's storage (:func:`is_placeholder`), so loading an adapter costs one allocation per
    tensor and no copy. Code that must write into such a parameter before loading (PiSSA) gives
    it real storage first.
    """
    if _FROM_CHECKPOINT.get():
        return torch.empty(1).expand(*shape)
    return torch.empty(*shape)


def new_parameter(*shape: int) -> nn.Parameter:
    """A new adapter parameter over :func:`new_weight` storage.

    Inside :func:`weights_from_checkpoint` it starts frozen: the host sets every new adapter's
    trainability after injecting it anyway, and a parameter that never requires grad never gets
    autograd state (about 200 bytes per tensor, 1.3% of a q,v LoRA r=8 adapter's own bytes).
    """
    return nn.Parameter(new_weight(*shape), requires_grad=not _FROM_CHECKPOINT.get())


def is_placeholder(t: torch.Tensor) -> bool:
    """Whether ``t`` is a :func:`new_weight` placeholder (fewer stored elements than it shows)."""
    return t.numel() > 1 and t.untyped_storage().nbytes() < t.numel() * t.element_size()


#: nn.Module's per-instance hook dicts and non-persistent buffer names. A Delta almost never
#: uses them, yet nn.Module.__init__ makes twelve fresh containers per instance (about 1.6 KB on
#: CPython 3.11, a sixth of a q,v LoRA r=8 site's own bytes): with hundreds of adapters loaded,
#: thousands of Deltas. A Delta reads them from shared empty, read-only class attributes instead
#: and gets its own containers the first time a hook or buffer is registered on it.
_LAZY_STATE = ("_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks", "_non_persistent_buffers_set")
#: nn.Module methods that write into those containers (each first gives the Delta its own)
_LAZY_WRITERS = ("register_buffer", "register_forward_pre_hook", "register_forward_hook",
                 "register_backward_hook", "register_full_backward_pre_hook", "register_full_backward_hook",
                 "_register_state_dict_hook", "register_state_dict_post_hook", "register_state_dict_pre_hook",
                 "_register_load_state_dict_pre_hook", "register_load_state_dict_pre_hook",
                 "register_load_state_dict_post_hook")


def _read_only(*_: Any, **__: Any) -> None:
    raise TypeError("A Delta's shared empty hook container was written to directly. Register hooks "
                    "and buffers through nn.Module's register_* methods (they give the Delta its own "
                    "containers), or call delta.own_module_state() first.")


class _NoHooks(OrderedDict):
    """Shared, empty and read-only: what a Delta's hook dicts are until it has hooks."""

    __setitem__ = update = setdefault = __ior__ = _read_only  # type: ignore[assignment]


class _NoNames(set):
    """Shared, empty and read-only: a Delta's non-persistent buffer names until it has buffers."""

    add = update = __ior__ = _read_only  # type: ignore[assignment]


def _module_state() -> dict[str, Any]:
    """What nn.Module.__init__ sets per instance in this torch version, minus the lazy containers."""
    return {k: v for k, v in nn.Module().__dict__.items() if k not in _LAZY_STATE}


_EAGER_STATE = _module_state()


def _owning(name: str) -> Callable[..., Any]:
    base = getattr(nn.Module, name)

    @functools.wraps(base)
    def method(self: "LeanModule", *args: Any, **kwargs: Any) -> Any:
        self.own_module_state()
        return base(self, *args, **kwargs)

    return method



class LeanModule(nn.Module):
    """nn.Module whose hook dicts and non-persistent buffer names start shared and empty (see
    ``_LAZY_STATE``); its own containers are made the first time something is registered."""

    def __init__(self) -> None:
        """nn.Module's state without its empty hook containers (see ``_LAZY_STATE``)."""
        for k, v in _EAGER_STATE.items():  # fresh dicts for parameters, buffers, submodules
            object.__setattr__(self, k, type(v)() if isinstance(v, (dict, set, list)) else v)

    def own_module_state(self) -> None:
        """Give this module its own hook dicts and buffer-name set (done before any registration)."""
        for k in _LAZY_STATE:
            if k not in self.__dict__:
                object.__setattr__(self, k, set() if k == "_non_persistent_buffers_set" else OrderedDict())


for _name in _LAZY_STATE:
    setattr(LeanModule, _name, _NoNames() if _name == "_non_persistent_buffers_set" else _NoHooks())
for _name in _LAZY_WRITERS:
    if hasattr(nn.Module, _name):
        setattr(LeanModule, _name, _owning(_name))
