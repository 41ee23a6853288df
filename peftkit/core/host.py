"""AdapterHost: owns the user's model and every adapter injected into it.

``PeftModel.base_model`` is an AdapterHost whose ``model`` attribute is the user's model, so
parameter paths read ``base_model.model.<path>`` as in Hugging Face PEFT's files. The host is
method-agnostic: it asks the registered Method for targets and Deltas, and manages activation,
trainability, merging and removal through the Sites.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterable, Iterator, Union

from torch import nn

from ..quant.prepare import guard_quantized
from .copies import ModuleCopy
from .inject import attach, detach, iter_candidates, no_match_error, sites
from .method import UnsupportedSite
from .packed import STORE_KEY, pack_adapter, unpack_adapter
from .registry import get_method
from .site import BASE, Site


def _as_list(names: Union[str, Iterable[str]]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


class AdapterHost(nn.Module):
    """The tuner wrapper around the user's model (``self.model``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        guard_quantized(model, only_new=True)  # quantised layers (targeted or not) train correctly
        self.model = model
        self.peft_config: dict = {}
        self.active_adapters: list[str] = []
        self.trainable_base: dict[str, set[str]] = {}  # adapter -> base parameter names it trains
        # Trainability bookkeeping, so that set/add/delete cost what changes, not what is loaded:
        self._params: dict[str, list[nn.Parameter]] = {}  # adapter -> its Deltas' parameters
        self._train_on: set[str] = set()                   # adapters whose parameters require grad
        self._base_on: set[str] = set()                    # base parameter names requiring grad
        self._base_frozen = False

    def __getattr__(self, name: str):
        """Functions a loaded method offers on the host (``Method.host_api``), e.g. AdaLoRA's
        ``update_and_allocate``; called with the host as first argument."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            configs = self.__dict__.get("peft_config") or {}
            for config in configs.values():
                fn = get_method(config.peft_type).host_api().get(name)
                if fn is not None:
                    return functools.partial(fn, self)
            raise

    # ----- injection ------------------------------------------------------------------
    def inject(self, adapter_name: str, config) -> None:
        """Add adapter ``adapter_name`` described by ``config`` to every targeted module.

        On any error nothing is left half-injected: the sites added so far are removed.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; pick another name "
                             "or delete_adapter() it first.")
        if adapter_name in (BASE, STORE_KEY):
            raise ValueError(f"{adapter_name!r} is reserved ({BASE!r} names the base model in mixed batches, "
                             f"{STORE_KEY!r} the packed adapters' store); pick another adapter name.")
        method = get_method(config.peft_type)
        config = method.prepare(config, self.model)
        done: list[str] = []
        made: list[Site] = []  # the Sites given a Delta or copy, for the parameter list below
        try:
            targets = [(p, m) for p, m in iter_candidates(self.model)
                       if method.is_target(config, p, m, self.model)]
            if not targets:
                raise no_match_error(config, self.model)
            for path, module in targets:
                base = module.base_layer if isinstance(module, Site) else module
                if isinstance(module, Site) and any(type(d) is ModuleCopy for _, d in module.deltas.modules_only()):
                    raise ValueError(f"{path} is in modules_to_save; it cannot also be an adapter target")
                try:
                    delta = method.make_delta(config, path, base, adapter_name)
                except UnsupportedSite as e:
                    raise UnsupportedSite(
                        f"{path}: {e} {config.peft_type} supports: "
                        f"{', '.join(method.supported_sites())}. Narrow target_modules or "
                        "exclude_modules so that only supported layers are selected."
                    ) from None
                _match_device(delta, base)
                made.append(attach(self.model, path, adapter_name, delta))
                done.append(path)
            for path in self._modules_to_save_paths(config):
                module = self.model.get_submodule(path)
                base = module.base_layer if isinstance(module, Site) else module
                if isinstance(module, Site) and (module.deltas.npacked or not all(
                        type(d) is ModuleCopy for _, d in module.deltas.modules_only())):
                    raise ValueError(f"{path} is an adapter target; it cannot also be in modules_to_save")
                made.append(attach(self.model, path, adapter_name, ModuleCopy(base)))
                done.append(path)
            self.peft_config[adapter_name] = config
            method.after_inject(self, config, adapter_name)
        except BaseException:
            for path in done:
                detach(self.model, path, adapter_name)
            self.peft_config.pop(adapter_name, None)
            self.trainable_base.pop(adapter_name, None)
            raise
        if not self._base_frozen:  # once: the user's model arrives fully trainable
            for p in self.model.parameters():
                p.requires_grad_(False)
            self._base_frozen = True
        # read after after_inject, which may wrap the Deltas (gates)
        params = {id(p): p for site in made for p in site.deltas[adapter_name].parameters()}
        self._params[adapter_name] = list(params.values())
        for p in self._params[adapter_name]:
            p.requires_grad_(False)
        self.set_adapter(self.active_adapters or adapter_name)

    def _modules_to_save_paths(self, config) -> list[str]:
        names = getattr(config, "modules_to_save", None) or []
        if not names:
            return []
        out = []
        for path, _ in iter_candidates(self.model):
            if any(path == n or path.endswith("." + n) for n in names):
                out.append(path)
        return out

    # ----- activation and trainability ----------------------------------------------
    def set_adapter(self, names: Union[str, Iterable[str]]) -> None:
        """Activate exactly ``names``; their parameters become trainable unless in inference mode."""
        names = _as_list(names)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"Unknown adapter {n!r}; loaded adapters: {sorted(self.peft_config)}")
        self.active_adapters = names
        for _, site in sites(self.model):
            site.set_active(names)
        self._apply_trainability()

    def _apply_trainability(self) -> None:
        """Freeze the adapters that stop training and (re)enable the active ones.

        The cost follows the adapters involved, never all that are loaded. Active adapters are
        always re-enabled, so code that froze parameters behind the host's back (a composed
        prompt host, a user's ``requires_grad_(False)``) cannot leave them stuck.
        """
        want = {n for n in self.active_adapters if not self.peft_config[n].inference_mode}
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

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` everywhere; the original modules return where no adapter is left."""
        if name not in self.peft_config:
            raise ValueError(f"Unknown adapter {name!r}; loaded adapters: {sorted(self.peft_config)}")
        for path, site in list(sites(self.model)):
            if name in site.deltas:
                detach(self.model, path, name)
        del self.peft_config[name]
        self.trainable_base.pop(name, None)
        self._params.pop(name, None)
        self._train_on.discard(name)
        remaining = [a for a in self.active_adapters if a != name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.active_adapters = remaining
        if remaining:
            self.set_adapter(remaining)
        else:
            self._apply_trainability()

    # ----- packed adapters (core/packed.py) -------------------------------------------
    def pack(self, name: str) -> bool:
        """Keep inference adapter ``name`` as packed records instead of a module per site
        (False, and nothing changed, when it is not eligible)."""
        return pack_adapter(self, name)

    def unpack(self, name: str) -> bool:
        """Give packed adapter ``name`` its own Delta modules again (False: it was not packed)."""
        return unpack_adapter(self, name)

    # ----- merging ------------------------------------------------------------------
    def merge(self, names=None, safe_merge: bool = False) -> None:
        """Merge ``names`` (default: the active adapters) into the base weights."""
        names = self.active_adapters if names is None else _as_list(names)
        for _, site in sites(self.model):
            site.merge(names, safe_merge=safe_merge)

    def unmerge(self) -> None:
        """Undo every merge."""
        for _, site in sites(self.model):
            site.unmerge()

    @property
    def merged(self) -> bool:
        """True when some adapter is merged into some site."""
        return any(site.merged for _, site in sites(self.model))

    def unload(self, merge: bool = False, names=None, safe_merge: bool = False) -> nn.Module:
        """Put the original modules back, merging ``names`` first when ``merge``; returns the model."""
        if merge:
            self.merge(names, safe_merge=safe_merge)
        else:
            self.unmerge()
        for path, site in list(sites(self.model)):
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            setattr(parent, child, site.base_layer)
        self.peft_config.clear()
        self.__dict__.pop("_pack_store", None)
        self.active_adapters = []
        self.trainable_base.clear()
        self._params.clear()
        self._train_on, self._base_on = set(), set()
        return self.model

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model alone (merged adapters are unmerged for the block, then re-merged)."""
        merged = {path: list(site.merged) for path, site in sites(self.model)}
        all_sites = list(sites(self.model))
        try:
            for _, site in all_sites:
                site.unmerge()
                site.disabled = True
                site._refresh()
            yield
        finally:
            for path, site in all_sites:
                site.disabled = False
                site.merge(merged[path])


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
