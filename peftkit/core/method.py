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

from typing import Any, Callable, ClassVar, Iterable, Optional

import torch
from torch import nn

from .storage import (LeanModule, init_skipped, is_placeholder, new_parameter, new_weight,  # noqa: F401
                      weights_from_checkpoint)


class UnsupportedSite(TypeError):
    """Raised when a method is asked to adapt a module type it has no math for."""


class Delta(LeanModule):
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
    #: True for LoRA-family deltas (PEFT's ``LoraLayer``): the update is multiplied by the float
    #: attribute ``scaling``, which ``peftkit.helpers.rescale_adapter_scale`` changes.
    lora_scaled: ClassVar[bool] = False

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

    def tied_copies(self, host: nn.Module, config: Any, adapter_name: str) -> dict[str, torch.Tensor]:
        """Tensors PEFT writes that repeat another of the adapter's tensors (a tied layer's copy of
        the embedding's rows): saved, loaded when a file has them, not required (keys under the model)."""
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
