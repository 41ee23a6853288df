"""Hosts: own the user's model and every adapter in it, through one lifecycle.

``PeftModel.base_model`` is a host whose ``model`` attribute is the user's model, so parameter
paths read ``base_model.model.<path>`` as in Hugging Face PEFT's files. :class:`Host` is the one
adapter lifecycle (name checks, inject with rollback, task heads, set/delete, enable/disable,
trainability switches, the load pipeline); two strategies fill in what differs:

- ``core/adapter_host.py: AdapterHost`` (``kind = "site"``): methods that put a Delta on targeted
  modules (Sites);
- ``core/prompt.py: PromptHost`` (``kind = "prompt"``): methods that add tokens or attention.

:func:`host_for` picks the strategy for a config from its registered Method's ``kind``, so no
caller tests host types.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections import namedtuple
from typing import Any, ClassVar, Iterable, Iterator, Union

import torch
from torch import nn

from ..quant.prepare import guard_quantized
from .copies import ModuleCopy
from .inject import attach, detach, iter_candidates, sites
from .method import is_placeholder, weights_from_checkpoint
from .packed import STORE_KEY
from .registry import get_method
from .site import BASE, Site
from .tied import warn_tied_targets

#: What loading adapter weights returns, as torch's ``load_state_dict`` (and PEFT's loaders) do.
IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

#: Method kind -> host class (filled as the host classes are defined).
HOSTS: dict[str, type["Host"]] = {}

_HALF = (torch.float16, torch.bfloat16)


def _as_list(names: Union[str, Iterable[str]]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def unknown_adapter(name: Any, loaded: Iterable[str]) -> ValueError:
    """The one "no such adapter" error (PEFT raises ValueError too, saying it does not exist)."""
    return ValueError(f"Unknown adapter {name!r}: it does not exist in this model (not found among the loaded "
                      f"adapters {sorted(loaded)}). Pass one of these names.")


def names_list(adapter_names):
    """``adapter_names`` of the merge calls: None or a list; a bare string is PEFT's TypeError."""
    if isinstance(adapter_names, str):
        raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}: pass "
                        f"[{adapter_names!r}].")
    return adapter_names


def method_kind(config) -> str:
    """``"site"`` or ``"prompt"``: which host strategy ``config``'s method needs."""
    return getattr(get_method(config.peft_type), "kind", "site")


def host_for(config) -> type["Host"]:
    """The host class for ``config`` (``AdapterHost`` for site methods, ``PromptHost`` for prompts)."""
    kind = method_kind(config)
    if kind not in HOSTS:  # each strategy registers itself on import
        from . import adapter_host, prompt  # noqa: F401
    return HOSTS[kind]


class Host(nn.Module):
    """The adapter lifecycle shared by every method; subclasses implement the strategy hooks
    (``_add``, ``_drop``, ``_activate``, ``_apply_trainability``, ``_adapter_params``,
    ``_switch_off``/``_switch_on``, ``adapter_state_dict``, ``load_plan``)."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.__dict__.get("kind"):
            HOSTS[cls.kind] = cls

    def __getattr__(self, name: str):
        """Attributes the host lacks are the user's model's (PEFT's tuner does the same), except
        ``base_model``: code that unwraps ``getattr(x, "base_model", x)`` must stop at the host."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "base_model") or "model" not in self.__dict__.get("_modules", {}):
                raise
            fn = self._host_api(name)
            if fn is not None:
                return fn
            return getattr(self._modules["model"], name)

    def _host_api(self, name: str):
        """A function the loaded methods offer on the host under ``name``, or None."""
        return None

    def __init__(self, model: nn.Module):
        super().__init__()
        guard_quantized(model, only_new=True)  # quantised layers (targeted or not) train correctly
        self.model = model
        self.peft_config: dict = {}
        self.active_adapters: list[str] = []
        self._off = None  # state saved by disable_adapter_layers(), None while enabled

    # ----- names --------------------------------------------------------------------
    def check_known(self, names: Union[str, Iterable[str]]) -> list[str]:
        """``names`` as a list; raises :func:`unknown_adapter` for the first name not loaded."""
        names = _as_list(names)
        for n in names:
            if n not in self.peft_config:
                raise unknown_adapter(n, self.peft_config)
        return names

    def check_new(self, name: str, config) -> None:
        """Refuse a taken or reserved name, and a method this host's strategy cannot hold."""
        if name in self.peft_config:
            raise ValueError(f"Adapter with name {name!r} already exists; pick another name or "
                             "delete_adapter() it first.")
        if name in (BASE, STORE_KEY):
            raise ValueError(f"{name!r} is reserved ({BASE!r} names the base model in mixed batches, "
                             f"{STORE_KEY!r} the packed adapters' store); pick another adapter name.")
        if method_kind(config) != self.kind:
            raise ValueError(f"A {config.peft_type} adapter cannot be added to a model holding "
                             f"{sorted({c.peft_type for c in self.peft_config.values()})} adapters: prompt methods "
                             "and layer methods do not mix in one PeftModel. Wrap a fresh base model instead.")

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        """The active adapter's name (a list when several are active), as PEFT's tuner has it."""
        a = self.active_adapters
        return a[0] if len(a) == 1 else list(a)

    # ----- injection (template) -------------------------------------------------------
    def inject(self, adapter_name: str, config, task_heads: Iterable[str] = (),
               autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        """Add adapter ``adapter_name`` described by ``config``; on any error nothing is left behind.

        ``task_heads``: module names trained in full for the task (added to ``modules_to_save``
        where present). ``autocast_adapter_dtype``: adapters over float16/bfloat16 layers are kept
        in float32 (True, PEFT's default) or in the layer's dtype (False). ``low_cpu_mem_usage``:
        the adapter's tensors are created on the meta device, to be filled by a load.
        """
        self.check_new(adapter_name, config)
        method = get_method(config.peft_type)
        if method.kind == "site":
            warn_tied_targets(config, self.model)  # on the user's config, before defaults, as PEFT
        config = method.prepare(self._with_task_heads(config, task_heads), self.model)
        try:
            made = self._add(adapter_name, config, method)
            made += self._add_heads(adapter_name, config)
            self.peft_config[adapter_name] = config
            self._added(adapter_name, config, method, made)
        except BaseException:
            self._remove(adapter_name, config)
            raise
        self._set_dtypes(adapter_name, made, autocast_adapter_dtype, low_cpu_mem_usage)
        self.set_adapter(self.active_adapters or adapter_name)

    def _with_task_heads(self, config, task_heads: Iterable[str]):
        heads = list(task_heads)
        if not heads or not hasattr(config, "modules_to_save"):
            return config
        present = {p.rsplit(".", 1)[-1] for p, _ in self.model.named_modules()}
        extra = list(config.modules_to_save or [])
        extra += [h for h in heads if h in present and h not in extra]
        return dataclasses.replace(config, modules_to_save=extra or None)

    def _heads(self, config) -> list[str]:
        names = getattr(config, "modules_to_save", None) or []
        if not names:
            return []
        return [p for p, _ in iter_candidates(self.model) if any(p == n or p.endswith("." + n) for n in names)]

    def _add_heads(self, name: str, config) -> list[Site]:
        """Full trainable copies of the ``modules_to_save`` modules (task heads)."""
        made = []
        for path in self._heads(config):
            module = self.model.get_submodule(path)
            base = module.base_layer if isinstance(module, Site) else module
            if isinstance(module, Site) and (module.deltas.npacked or not all(
                    type(d) is ModuleCopy for _, d in module.deltas.modules_only())):
                raise ValueError(f"{path} is an adapter target; it cannot also be in modules_to_save")
            made.append(attach(self.model, path, name, ModuleCopy(base)))
        return made

    def _remove(self, name: str, config) -> None:
        """Take adapter ``name`` out of every Site and drop the strategy's state (no checks)."""
        for path, site in list(sites(self.model)):
            if name in site.deltas:
                detach(self.model, path, name)
        self._drop(name, config)
        self.peft_config.pop(name, None)

    def _set_dtypes(self, name: str, made: list[Site], autocast: bool, on_meta: bool) -> None:
        """PEFT's dtype rule for new adapter tensors: float16/bfloat16 become float32 when
        ``autocast`` (else they follow their layer's dtype); ``on_meta`` moves them to meta."""
        for owner, tensor_dict in self._tensor_owners(name, made):
            for key, t in list(tensor_dict.items()):
                if t is None or not t.is_floating_point():
                    continue
                dtype = t.dtype
                if autocast and dtype in _HALF:
                    dtype = torch.float32
                elif not autocast and owner is not None and owner in _HALF:
                    dtype = owner
                device = "meta" if on_meta else t.device
                if dtype == t.dtype and device == t.device:
                    continue
                if is_placeholder(t) or on_meta:
                    new = torch.empty(1, dtype=dtype, device=device).expand(*t.shape)
                else:
                    new = t.detach().to(dtype)
                if isinstance(t, nn.Parameter):
                    _set_storage(t, new)
                else:
                    tensor_dict[key] = new

    def _tensor_owners(self, name: str, made: list[Site]):
        """(layer dtype or None, a module's ``_parameters``/``_buffers``) for adapter ``name``'s
        tensors; PEFT casts layer adapters only (not prompt encoders, not full copies)."""
        return ()

    # ----- activation and trainability --------------------------------------------
    def set_adapter(self, names: Union[str, Iterable[str]], inference_mode: bool = False) -> None:
        """Activate exactly ``names``; their parameters train unless in inference mode (the
        config's, or ``inference_mode=True`` here, which only freezes them)."""
        names = self.check_known(names)
        self._check_active(names)
        self.active_adapters = names
        self._activate(names)
        self._apply_trainability()
        if inference_mode:
            self.set_requires_grad(names, False)

    def set_requires_grad(self, adapter_names: Union[str, Iterable[str]], requires_grad: bool = True) -> None:
        """Switch gradients of the named adapters' parameters (active or not), as PEFT does."""
        for n in self.check_known(adapter_names):
            for p in self._adapter_params(n):
                p.requires_grad_(requires_grad)
            self._trainable_changed(n, requires_grad)

    def _check_active(self, names: list[str]) -> None:
        """Refuse a set of active adapters this strategy cannot run."""

    def _trainable_changed(self, name: str, on: bool) -> None:
        """Bookkeeping after :meth:`set_requires_grad`."""

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` everywhere; the original modules return where no adapter is left.

        A merged adapter is refused (PEFT's rule): unmerge it first.
        """
        self.check_known(name)
        if self._merged_names() & {name}:
            raise ValueError(f"Cannot delete adapter(s) [{name!r}] while they are merged into the base weights. "
                             "Please unmerge them first (unmerge_adapter()).")
        self._remove(name, self.peft_config[name])
        self._reactivate(name, warn=name in self.active_adapters)

    def _reactivate(self, removed: str, warn: bool = False) -> None:
        """After ``removed`` is gone: the other active adapters stay, else the first one loaded
        (with PEFT's warning when ``warn``: the active adapter was deleted)."""
        remaining = [a for a in self.active_adapters if a != removed]
        if not remaining and self.peft_config:
            remaining = list(self.peft_config)[:1]
            if warn:
                warnings.warn(f"Adapter {removed} was active which is now deleted. Setting active adapter to "
                              f"{remaining[0]}.", UserWarning, stacklevel=4)
        self.active_adapters = []
        if remaining:
            self.set_adapter(remaining)
        else:
            self._activate([])
            self._apply_trainability()

    # ----- enabling and disabling ----------------------------------------------------
    def disable_adapter_layers(self) -> None:
        """Run the base model alone until :meth:`enable_adapter_layers` (no-op when already off)."""
        if self._off is None:
            self._off = self._switch_off()

    def enable_adapter_layers(self) -> None:
        """Undo :meth:`disable_adapter_layers` (no-op when on)."""
        if self._off is not None:
            state, self._off = self._off, None
            self._switch_on(state)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model alone inside the block; nested blocks are no-ops, and the previous
        state returns on exit, exception or not."""
        if self._off is not None:
            yield
            return
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    # ----- merging -------------------------------------------------------------------
    def _merged_names(self) -> set[str]:
        return {n for _, site in sites(self.model) for n in site.merged}

    def merge(self, names=None, safe_merge: bool = False) -> None:
        """Merge ``names`` (default: the active adapters) into the base weights; merging what is
        already merged warns and changes nothing (PEFT's warnings)."""
        names = self.active_adapters if names is None else self.check_known(names)
        merged = self._merged_names()
        if merged:
            todo = [n for n in names if n not in merged]
            if todo:
                warnings.warn(f"Already following adapters were merged {','.join(sorted(merged))}. You are now "
                              f"additionally merging {','.join(todo)}.", UserWarning, stacklevel=3)
            else:
                warnings.warn("All adapters are already merged, nothing to do.", UserWarning, stacklevel=3)
                return
        every = [site for _, site in sites(self.model)]
        for site in every:  # all or nothing: a refusal anywhere leaves every weight as it was
            site.check_merge(names)
        for site in every:
            site.merge(names, safe_merge=safe_merge)

    def unmerge(self) -> None:
        """Undo every merge (warns when nothing is merged, as PEFT does)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=3)
            return
        for _, site in sites(self.model):
            site.unmerge()

    @property
    def merged(self) -> bool:
        """True when some adapter is merged into some site."""
        return any(site.merged for _, site in sites(self.model))

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        """PEFT's tuner spelling of :meth:`merge` (``adapter_names``: a list, as PEFT requires)."""
        self.merge(names_list(adapter_names), safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """PEFT's tuner spelling of :meth:`unmerge`."""
        self.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Merge and return the plain model (PEFT's tuner method)."""
        return self.unload(merge=True, names=names_list(adapter_names), safe_merge=safe_merge)

    def unload(self, merge: bool = False, names=None, safe_merge: bool = False) -> nn.Module:
        """Put the original modules back, merging ``names`` first when ``merge``; returns the model."""
        if merge:
            self.merge(names, safe_merge=safe_merge)
        elif self.merged:
            self.unmerge()
        for path, site in list(sites(self.model)):
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            setattr(parent, child, site.base_layer)
        for name in list(self.peft_config):
            self._drop(name, self.peft_config[name])
            del self.peft_config[name]
        self.active_adapters = []
        self._off = None
        self._activate([])
        return self.model

    # ----- packing (site adapters only) ------------------------------------------------
    def pack(self, name: str) -> bool:
        """Keep inference adapter ``name`` packed (core/packed.py); False when not eligible."""
        return False

    def unpack(self, name: str) -> bool:
        """Give packed adapter ``name`` its own Delta modules again (False: it was not packed)."""
        return False

    # ----- the load pipeline -----------------------------------------------------------
    def load_weights(self, name: str, tensors: dict, source: str, is_trainable: bool = False,
                     packed: bool = True, remove_on_error: bool = True) -> IncompatibleKeys:
        """Fill adapter ``name`` from ``tensors``: checked by name and shape before anything is
        written; on error a just-injected adapter is removed again (``remove_on_error``), an
        existing one keeps its weights. Inference adapters are then packed where their method
        allows, unless ``packed=False``."""
        try:
            plan = self.materialize(self.load_plan(name, tensors, source), name)
            from ..io.peft_format import apply_plan

            apply_plan(plan, source=tensors, frozen=not is_trainable)
        except BaseException:
            if remove_on_error:
                self._remove(name, self.peft_config[name])
                self._reactivate(name)
            raise
        if not is_trainable and packed:
            self.pack(name)
        return IncompatibleKeys(missing_keys=[], unexpected_keys=[])

    def add_saved(self, name: str, config, tensors: dict, source: str, is_trainable: bool = False,
                  packed: bool = True, **inject_kw: Any) -> IncompatibleKeys:
        """Inject adapter ``name`` without initialising it, then :meth:`load_weights`."""
        with weights_from_checkpoint():
            self.inject(name, config, **inject_kw)
        return self.load_weights(name, tensors, source, is_trainable, packed)

    def materialize(self, plan, name: str) -> list:
        """``plan`` made ready to apply: destinations still on the meta device
        (``low_cpu_mem_usage``) get placeholder storage on their layer's device, so that loading
        assigns the file's tensors to them; values for sharded (DTensor) destinations, as FSDP2
        leaves them, are sharded alike (what ``load_state_dict`` does for PEFT)."""
        devices = self._devices(name) if any(d.is_meta for d, _ in plan) else {}
        out = []
        for dest, value in plan:
            if dest.is_meta:
                dev = devices.get(id(dest), torch.device("cpu"))
                _set_storage(dest, torch.empty(1, dtype=dest.dtype, device=dev).expand(*dest.shape))
            out.append((dest, _shard_like(dest, value)))
        return out

    def _devices(self, name: str) -> dict[int, torch.device]:
        """id(tensor) -> the device adapter ``name``'s tensor belongs on."""
        return {}

    # ----- strategy hooks ------------------------------------------------------------------
    def _add(self, name: str, config, method) -> list[Site]:
        raise NotImplementedError

    def _added(self, name: str, config, method, made: list[Site]) -> None:
        """After the adapter is in place and registered (method hooks, parameter lists)."""

    def _drop(self, name: str, config) -> None:
        """Forget the strategy's state for ``name`` (its Sites are already detached)."""

    def _activate(self, names: list[str]) -> None:
        for _, site in sites(self.model):
            site.set_active(names)

    def _apply_trainability(self) -> None:
        raise NotImplementedError

    def _adapter_params(self, name: str) -> list[nn.Parameter]:
        raise NotImplementedError

    def _switch_off(self):
        raise NotImplementedError

    def _switch_on(self, state) -> None:
        raise NotImplementedError

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors under Hugging Face PEFT's keys."""
        raise NotImplementedError

    def load_plan(self, name: str, tensors: dict, source: str):
        """(destination, value) pairs for ``tensors``; raises CheckpointError naming a mismatch."""
        raise NotImplementedError


def _shard_like(dest: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` laid out as ``dest`` when ``dest`` is a DTensor (FSDP2's sharded parameters)."""
    placements = getattr(dest, "placements", None)
    if placements is None or hasattr(value, "placements"):
        return value
    from torch.distributed.tensor import distribute_tensor

    mesh = dest.device_mesh
    return distribute_tensor(value.to(device=mesh.device_type, dtype=dest.dtype), mesh, placements)


def _set_storage(param: nn.Parameter, new: torch.Tensor) -> None:
    """Give ``param`` the tensor ``new`` in place (same Python object, so every reference to it
    stays valid); across devices, meta included, ``.data`` cannot do that, ``swap_tensors`` can."""
    if new.device == param.device:
        param.data = new
    else:
        torch.utils.swap_tensors(param, nn.Parameter(new, requires_grad=param.requires_grad))
