"""The one abstraction: a method is math at a site.

A :class:`Delta` is one adapter of one method at one site. Given the site's input ``x``, the base
layer's output ``y`` and the (frozen) base layer, it returns the adapted output. It owns its
parameters and hyperparameters, so merging needs no arguments. It never sees adapter names,
batches of mixed adapters, merge bookkeeping or dtype casting: the :class:`~peftkit.core.site.Site`
does those.

A :class:`Method` is the recipe that turns a config into Deltas: which modules it targets, what
Delta it builds for each, and how its parameter names map to Hugging Face PEFT's on-disk keys.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from collections import OrderedDict
from typing import Any, Callable, ClassVar, Iterable, Iterator, Optional

import torch
from torch import nn


class UnsupportedSite(TypeError):
    """Raised when a method is asked to adapt a module type it has no math for."""


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
    def method(self: "Delta", *args: Any, **kwargs: Any) -> Any:
        self.own_module_state()
        return base(self, *args, **kwargs)

    return method


class Delta(nn.Module):
    """One adapter of one method at one site.

    Subclasses implement :meth:`forward`; mergeable ones also :meth:`delta_weight` (additive
    updates) or override :meth:`merge`/:meth:`unmerge` (multiplicative ones such as DoRA).
    """

    #: True when the update can be folded into the base weight exactly.
    mergeable: ClassVar[bool] = False
    #: True when the delta computes the whole output itself (full trainable copies).
    replaces_base: ClassVar[bool] = False
    #: True when the delta rescales the site's *input* before the base layer runs
    #: ((IA)^3 on feed-forward layers: ``y = W (l * x)``); see :meth:`transform_input`.
    transforms_input: ClassVar[bool] = False
    #: True when :meth:`forward_into` may write the update into ``y`` in place.
    accumulates: ClassVar[bool] = False
    #: Local parameter name -> suffix in Hugging Face PEFT's file (``lora_A.weight`` ...).
    peft_names: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        """nn.Module's state without its empty hook containers (see ``_LAZY_STATE``)."""
        for k, v in _EAGER_STATE.items():  # fresh dicts for parameters, buffers, submodules
            object.__setattr__(self, k, type(v)() if isinstance(v, (dict, set, list)) else v)

    def own_module_state(self) -> None:
        """Give this Delta its own hook dicts and buffer-name set (done before any registration)."""
        for k in _LAZY_STATE:
            if k not in self.__dict__:
                object.__setattr__(self, k, set() if k == "_non_persistent_buffers_set" else OrderedDict())

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """Return the adapted output given input ``x`` and the base output ``y`` (never
        written to: a hook, the user or autograd may hold it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, y, base)")

    def forward_into(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """As :meth:`forward`, for a ``y`` that the Site owns: nothing else holds it and autograd
        does not need its value, so the update may be added into it in place (classes that do
        declare :attr:`accumulates`). Called only by the Site, under the rule in core/site.py."""
        return self.forward(x, y, base)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """For ``transforms_input`` deltas: the input the base layer should see instead of ``x``.

        Input-transforming deltas run before the base layer; their :meth:`forward` is then called
        with the transformed input's base output and should usually return ``y`` unchanged.
        """
        return x

    # ----- merging ------------------------------------------------------------------
    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The additive update to ``base.weight`` in its native layout."""
        raise TypeError(
            f"{type(self).__name__} cannot be merged into the base weights: its update depends "
            "on the input, not only on the weights. Keep it unmerged (it still runs), or use "
            "a mergeable method (LoRA, DoRA, (IA)^3, LoHa, LoKr, VeRA)."
        )

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        """Fold this update into ``base``'s weight in place."""
        w = base.weight
        w.add_(self.delta_weight(base).to(w.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        """Undo :meth:`merge` exactly (up to floating point)."""
        w = base.weight
        w.sub_(self.delta_weight(base).to(w.dtype))

    # ----- mixed batches ------------------------------------------------------------
    @classmethod
    def forward_mixed(cls, deltas: list["Delta"], rows: list[torch.Tensor], x: torch.Tensor,
                      y: torch.Tensor, base: nn.Module, inplace: bool = False) -> Optional[torch.Tensor]:
        """Vectorised path for a batch whose rows use different adapters of this class.

        ``deltas[i]`` applies to the batch rows ``rows[i]``; ``inplace``: the Site owns ``y``
        (as in :meth:`forward_into`). Return the full adapted output, or None to let the Site
        fall back to one call per adapter on its rows.
        """
        return None

    def peft_state(self) -> dict[str, torch.Tensor]:
        """This delta's tensors under Hugging Face PEFT's suffixes."""
        sd = self.state_dict()
        return {self.peft_names.get(k, k): v for k, v in sd.items()}

    def local_name(self, peft_suffix: str) -> str:
        """Inverse of :attr:`peft_names` for one key."""
        for local, theirs in self.peft_names.items():
            if theirs == peft_suffix:
                return local
        return peft_suffix


for _name in _LAZY_STATE:
    setattr(Delta, _name, _NoNames() if _name == "_non_persistent_buffers_set" else _NoHooks())
for _name in _LAZY_WRITERS:
    if hasattr(nn.Module, _name):
        setattr(Delta, _name, _owning(_name))


class Method:
    """How one PEFT method turns its config into Deltas at the targeted sites.

    Subclasses set :attr:`name` and :attr:`config_cls` and implement :meth:`make_delta`.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = type(None)
    #: Names that begin a site's own part of this method's on-disk keys besides those its Delta
    #: classes declare in ``peft_names`` (child modules such as ``adapter_down``).
    key_roots: ClassVar[tuple[str, ...]] = ()
    #: Method kind: "site" (wraps modules) or "prompt" (virtual tokens; core/prompt.py).
    kind: ClassVar[str] = "site"

    def is_target(self, config: Any, path: str, module: nn.Module, model: nn.Module) -> bool:
        """Whether ``module`` at ``path`` is one of this config's targets."""
        from .inject import matches_targets

        return matches_targets(config, path, module, model)

    def make_delta(self, config: Any, path: str, module: nn.Module, adapter_name: str) -> Delta:
        """Build the Delta for one targeted module (raise UnsupportedSite if it can't)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_delta")

    def prepare(self, config: Any, model: nn.Module) -> Any:
        """Fill in defaults that depend on the model (e.g. target modules); returns config."""
        return config

    def after_inject(self, host: nn.Module, config: Any, adapter_name: str) -> None:
        """Hook for work after all sites exist (trainable biases, shared tensors)."""

    def extra_state(self, host: nn.Module, config: Any, adapter_name: str) -> dict[str, torch.Tensor]:
        """Tensors saved with the adapter that live outside its Deltas (keys under the model)."""
        return {}

    def host_api(self) -> dict[str, Callable[..., Any]]:
        """Functions offered as ``peft_model.base_model.<name>(...)`` while an adapter of this
        method is loaded; each is called with the host first (AdaLoRA's ``update_and_allocate``)."""
        return {}

    def convert_for_original_base(self, tensors: dict, initial: dict, config: Any):
        """Rewrite an adapter trained on a modified base (PiSSA/OLoRA) for the original base."""
        raise ValueError(f"{self.name} adapters do not modify the base weights; "
                         "path_initial_model_for_weight_conversion applies to LoRA with PiSSA/OLoRA init")

    def on_disk_roots(self) -> set[str]:
        """First components of the site-relative keys this method writes (``lora_A``, ...): what
        ends the adapted module's path in a key (``peftkit inspect``). Read from the Delta classes
        in the method's module and :attr:`key_roots`, so a new method needs no list elsewhere."""
        import sys

        roots = set(self.key_roots)
        for obj in vars(sys.modules.get(type(self).__module__, object)).values():
            if isinstance(obj, type) and issubclass(obj, Delta):
                roots.update(v.split(".", 1)[0] for v in obj.peft_names.values())
        return roots

    def supported_sites(self) -> Iterable[str]:
        """Human-readable names of the module types this method can adapt."""
        return ()
