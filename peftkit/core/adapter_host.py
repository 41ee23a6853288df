"""The host strategy of site methods: a Delta per targeted module, held by that module's Site.

:class:`AdapterHost` fills in :class:`~peftkit.core.host.Host`'s strategy hooks for every method
whose Method ``kind`` is ``"site"`` (LoRA and its variants, IA3, LoHa, LoKr, VeRA, AdaLoRA, OFT,
BOFT, LN tuning, BitFit, bottleneck adapters, trainable tokens): injection at the targeted
modules, trainability bookkeeping, mixed-adapter routing, packing for inference and PEFT's file
keys. ``core/prompt.py: PromptHost`` is the other strategy.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Optional

import torch
from torch import nn

from .copies import ModuleCopy
from .host import Host
from .inject import attach, excluded_paths, iter_candidates, no_match_error, sites, spec_text
from .method import UnsupportedSite
from .packed import pack_adapter, unpack_adapter
from .registry import get_method
from .site import BASE, Site, adapter_routing


class AdapterHost(Host):
    """The host of site methods: a Delta per targeted module (``self.model``'s Sites)."""

    kind = "site"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.trainable_base: dict[str, set[str]] = {}  # adapter -> base parameter names it trains
        # Trainability bookkeeping, so that set/add/delete cost what changes, not what is loaded:
        self._params: dict[str, list[nn.Parameter]] = {}  # adapter -> its Deltas' parameters
        self._train_on: set[str] = set()                   # adapters whose parameters require grad
        self._base_on: set[str] = set()                    # base parameter names requiring grad
        self._base_frozen = False
        # load_state_dict(assign=True) replaces Parameter objects: the lists above must follow
        self.register_load_state_dict_post_hook(_refresh_params)

    def _host_api(self, name: str):
        """Functions a loaded method offers on the host (``Method.host_api``), e.g. AdaLoRA's
        ``update_and_allocate``; called with the host as first argument."""
        for config in (self.__dict__.get("peft_config") or {}).values():
            fn = get_method(config.peft_type).host_api().get(name)
            if fn is not None:
                return functools.partial(fn, self)
        return None

    @property
    def targeted_module_names(self) -> list[str]:
        """Paths of the modules that hold an adapter (not the ``modules_to_save`` copies), as PEFT lists them."""
        return [p for p, site in sites(self.model) if any(not d.replaces_base for _, d in site.deltas.items())]

    # ----- running --------------------------------------------------------------------
    def _routing(self, adapter_names: Optional[list[str]], reuse: bool = False):
        if adapter_names is None:
            return contextlib.nullcontext()
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names contains unknown adapters {unknown}; loaded: "
                             f"{sorted(self.peft_config)} (use '{BASE}' for the base model alone).")
        return adapter_routing(adapter_names, reuse=reuse)

    def forward(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        """The model's forward; ``adapter_names[i]`` picks row ``i``'s adapter (mixed batch)."""
        with self._routing(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Optional[list[str]] = None, **kwargs):
        """The model's ``generate`` with the adapters applied (per row with ``adapter_names``)."""
        with self._routing(adapter_names, reuse=True):  # the same rows at every decode step
            return self.model.generate(*args, **kwargs)

    # ----- injection ------------------------------------------------------------------
    def _add(self, name: str, config, method) -> list[Site]:
        made: list[Site] = []
        targets = [(p, m) for p, m in iter_candidates(self.model) if method.is_target(config, p, m, self.model)]
        if not targets:
            raise no_match_error(config, self.model)
        if getattr(config, "exclude_modules", None) and not excluded_paths(config, self.model):
            warnings.warn(f"You have passed exclude_modules={spec_text(config.exclude_modules)} but no modules were excluded. "
                          "Please check that exclude_modules was set correctly.", UserWarning, stacklevel=4)
        for path, module in targets:
            base = module.base_layer if isinstance(module, Site) else module
            if isinstance(module, Site) and any(type(d) is ModuleCopy for _, d in module.deltas.modules_only()):
                raise ValueError(f"{path} is in modules_to_save; it cannot also be an adapter target")
            try:
                delta = method.make_delta(config, path, base, name)
            except UnsupportedSite as e:
                raise UnsupportedSite(
                    f"{path}: {e} {config.peft_type} supports: {', '.join(method.supported_sites())}. "
                    "Narrow target_modules or exclude_modules so that only supported layers are selected."
                ) from None
            _match_device(delta, base)
            made.append(attach(self.model, path, name, delta))
        return made

    def _added(self, name: str, config, method, made: list[Site]) -> None:
        method.after_inject(self, config, name)
        if not self._base_frozen:  # once: the user's model arrives fully trainable
            for p in self.model.parameters():
                p.requires_grad_(False)
            self._base_frozen = True
        # read after after_inject, which may wrap the Deltas (gates)
        params = {id(p): p for site in made for p in site.deltas[name].parameters()}
        self._params[name] = list(params.values())
        for p in self._params[name]:
            p.requires_grad_(False)
        # tensors after_inject made trainable outside the Sites above (a second adapter's token
        # rows): frozen too; set_adapter then enables what the active adapters train
        for pname in self.trainable_base.get(name, ()):
            self.model.get_parameter(pname).requires_grad_(False)

    def _drop(self, name: str, config) -> None:
        for pname in self.trainable_base.pop(name, ()):  # tensors that left with the adapter's Deltas
            try:
                self.model.get_parameter(pname)
            except AttributeError:
                self._base_on.discard(pname)
        self._params.pop(name, None)
        self._train_on.discard(name)

    def _tensor_owners(self, name: str, made: list[Site]):
        for site in made:
            d = site.deltas._modules.get(name)
            if d is None or d.replaces_base:  # full copies keep the module's own dtype
                continue
            w = getattr(site.base_layer, "weight", None)
            owner = w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else None
            for m in d.modules():
                yield owner, m._parameters
                yield owner, m._buffers

    def _devices(self, name: str) -> dict[int, torch.device]:
        out = {}
        for _, site in sites(self.model):
            d = site.deltas._modules.get(name)
            p = next((q for q in site.base_layer.parameters() if not q.is_meta), None)
            if d is not None and p is not None:
                out.update({id(t): p.device for t in list(d.parameters()) + list(d.buffers())})
        return out

    # ----- trainability --------------------------------------------------------------
    def _apply_trainability(self) -> None:
        """Freeze the adapters that stop training and (re)enable the active ones.

        The cost follows the adapters involved, never all that are loaded. Active adapters are
        always re-enabled, so code that froze parameters behind the host's back (a composed
        prompt host, a user's ``requires_grad_(False)``) cannot leave them stuck.
        """
        want = {n for n in self.active_adapters if not self.peft_config[n].inference_mode}
        if self._off is not None:  # disabled: nothing trains until enabled again
            want = set()
        for n in self._train_on - want:
            for p in self._params.get(n, ()):
                p.requires_grad_(False)
        for n in want:
            for p in self._params[n]:
                p.requires_grad_(True)
        self._train_on = want
        base = set().union(*(self.trainable_base.get(n, ()) for n in want)) if want else set()
        for pname in self._base_on - base:
            self.model.get_parameter(pname).requires_grad_(False)
        for pname in base:
            self.model.get_parameter(pname).requires_grad_(True)
        self._base_on = base

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """As :meth:`Host.set_requires_grad`; a packed inference adapter, which has no parameters
        to switch on, first gets Delta modules of its own (:meth:`unpack`), so it does train."""
        if requires_grad:
            for n in self.check_known(adapter_names):
                self.unpack(n)
        super().set_requires_grad(adapter_names, requires_grad)

    def _adapter_params(self, name: str) -> list[nn.Parameter]:
        return list(self._params.get(name, ()))

    def _trainable_changed(self, name: str, on: bool) -> None:
        (self._train_on.add if on else self._train_on.discard)(name)

    def _switch_off(self):
        merged = {path: list(site.merged) for path, site in sites(self.model)}
        for _, site in sites(self.model):
            site.unmerge()
            site.disabled = True
            site._refresh()
        for n in self._train_on:  # nothing trains while disabled (PEFT freezes disabled layers)
            for p in self._params.get(n, ()):
                p.requires_grad_(False)
        for pname in self._base_on:
            self.model.get_parameter(pname).requires_grad_(False)
        self._train_on, self._base_on = set(), set()
        return merged

    def _switch_on(self, merged) -> None:
        for path, site in sites(self.model):
            site.disabled = False
            site.merge(merged.get(path, []))
        self._apply_trainability()

    def unload(self, merge: bool = False, names=None, safe_merge: bool = False) -> nn.Module:
        """Put the original modules back, merging ``names`` first when ``merge``; returns the model."""
        out = super().unload(merge, names, safe_merge)
        self.__dict__.pop("_pack_store", None)
        self.trainable_base.clear()
        self._params.clear()
        self._train_on, self._base_on = set(), set()
        return out

    # ----- packed adapters (core/packed.py) -------------------------------------------
    def pack(self, name: str) -> bool:
        """Keep inference adapter ``name`` as packed records instead of a module per site
        (False, and nothing changed, when it is not eligible)."""
        return pack_adapter(self, name)

    def unpack(self, name: str) -> bool:
        """Give packed adapter ``name`` its own Delta modules again (False: it was not packed)."""
        return unpack_adapter(self, name)

    # ----- save / load ---------------------------------------------------------------
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors under Hugging Face PEFT's keys (io/peft_format.py)."""
        from ..io.peft_format import adapter_state_dict

        return adapter_state_dict(self, name)

    def load_plan(self, name: str, tensors: dict, source: str):
        """(destination, value) pairs for ``tensors``, checked by name and shape (io/peft_format.py)."""
        from ..io.peft_format import load_plan

        return load_plan(self, name, tensors, source)


def _match_device(delta: nn.Module, base: nn.Module) -> None:
    """Move ``delta`` to the base layer's device (skipped when already there: ``.to`` is slow)."""
    p = base._parameters.get("weight")  # the usual case, without a walk over the module
    if p is None:
        p = next(base.parameters(), None)
    if p is None or p.device.type == "meta":
        return
    if p.device.type == "cpu" and not delta._modules and all(
            q is None or q.device.type == "cpu" for q in delta._parameters.values()):
        return
    if any(q.device != p.device for q in delta.parameters()):
        delta.to(p.device)


def _refresh_params(host: "AdapterHost", incompatible_keys) -> None:
    """After ``load_state_dict`` (on the host or any model around it): re-read each adapter's
    parameters from its Sites, since ``assign=True`` puts new Parameter objects in place, and
    toggling the old ones would leave the new ones trainable or frozen by mistake."""
    fresh: dict[str, dict[int, nn.Parameter]] = {n: {} for n, ps in host._params.items() if ps}
    if not fresh:
        return
    for _, site in sites(host.model):
        for n, d in site.deltas.modules_only():
            if n in fresh:
                fresh[n].update((id(p), p) for p in d.parameters())
    for n, ps in fresh.items():  # the new objects carry the old requires_grad flags already
        host._params[n] = list(ps.values())

