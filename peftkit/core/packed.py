"""Packed adapters: frozen adapters stored as records, with no module per site.

A Delta is an ``nn.Module`` with its own Parameters: about 1.2 KB of Python and tensor objects
per site, beside the weights themselves. For one trainable adapter that is nothing; for a server
that holds a hundred frozen adapters of 60 sites each it is 7 MB, 4% of their own bytes. A
*packed* adapter keeps instead:

- its weights in one flat tensor (the buffer its file was read into, adopted without a copy),
  held by the host's :class:`PackStore`;
- one row of integers and one float per site in a :class:`Pack` (for LoRA: the offsets of ``A``
  and ``B`` in the flat tensor, the rank and the in/out sizes; the float is the scale ``s``).

The seam is the Site's :class:`DeltaDict`: it answers ``name in site.deltas`` and
``site.deltas[name]`` for packed adapters too, with an ordinary Delta whose parameters are views
of the flat tensor (``from_pack`` of :class:`PackableDelta`). It builds such a Delta on first use
and then returns the same object for as long as anyone holds it (a weak cache: the Site's run
list holds its active adapters', a mixed-batch block those it uses), so the Site never knows how
a Delta is stored, and the memory held per site does not grow with the number of packed
adapters. ``train()``/``eval()`` reach the cached Deltas; ``.to()`` drops them (their views
belong to the old tensors). Reads, merges, saves, in-place copies (hot-swap) and
``model.state_dict()``/``load_state_dict()`` (under the same keys as an unpacked adapter's)
go through the views to the packed weights; operations that would replace a Delta first turn
the adapter back into ordinary modules (:func:`unpack_adapter`).

Packing needs a method that opts in (``Delta.pack_width`` > 0; plain LoRA on linear layers), an
adapter in inference mode, and nothing but such Deltas (no ``modules_to_save`` copies, no
trained biases, no host-level tensors). ``PeftModel.load_adapter`` and ``from_pretrained`` pack
every eligible inference load unless given ``packed=False``.
"""
from __future__ import annotations

import weakref
from array import array
from typing import Iterator, Optional, Protocol

import torch
from torch import nn

STORE_KEY = "__packs__"  # the store's key among a DeltaDict's children


class PackableDelta(Protocol):
    """What a Delta class implements to be packed (besides declaring ``pack_width`` > 0)."""

    pack_width: int

    def packable(self) -> bool:
        """Whether this Delta's state is fully described by the three methods below now."""

    def pack_tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors stored for this Delta, in a fixed order."""

    def pack_row(self, offsets: list[int]) -> tuple[list[int], float]:
        """This site's record: ``pack_width`` integers (the first one >= 0) and one float, given
        each of :meth:`pack_tensors`' element offsets in the packed flat tensor."""

    def pack_meta(self) -> tuple:
        """Settings shared by all sites of one adapter (stored once per packed adapter)."""

    @classmethod
    def from_pack(cls, flat: torch.Tensor, ints: list[int], value: float, meta: tuple) -> nn.Module:
        """A frozen Delta whose tensors are views of ``flat``, from one site's record."""

    def unpacked(self) -> nn.Module:
        """A copy of this (packed view) Delta with parameters of its own."""


class Pack:
    """One packed adapter: the Delta class that reads it, per-site rows, and shared settings.

    ``ints[slot * width: (slot + 1) * width]`` is the row of the site with that slot number
    (``-1`` first when the adapter has no Delta there); ``floats[slot]`` its one float.
    """

    __slots__ = ("cls", "width", "ints", "floats", "meta", "count")

    def __init__(self, cls: type, meta: tuple):
        self.cls, self.width, self.meta, self.count = cls, cls.pack_width, meta, 0
        self.ints, self.floats = array("q"), array("d")

    def row(self, slot: int) -> Optional[tuple[list[int], float]]:
        """The (ints, float) record of ``slot``, or None when the adapter is not there."""
        w = self.width
        if slot < 0 or (slot + 1) * w > len(self.ints) or self.ints[slot * w] < 0:
            return None
        return self.ints[slot * w:(slot + 1) * w].tolist(), self.floats[slot]

    def put(self, slot: int, ints: list[int], value: float) -> None:
        """Record ``slot``'s row (growing the table with absent rows as needed)."""
        w = self.width
        missing = slot + 1 - len(self.floats)
        if missing > 0:
            self.ints.extend([-1] * (missing * w))
            self.floats.extend([0.0] * missing)
        self.ints[slot * w:(slot + 1) * w] = array("q", ints)
        self.floats[slot] = value
        self.count += 1

    def drop(self, slot: int) -> None:
        """Forget ``slot``'s row."""
        self.ints[slot * self.width] = -1
        self.count -= 1


class PackStore(nn.Module):
    """Every packed adapter of one host: flat weight tensors (non-persistent buffers, so
    ``.to()``/``.half()`` convert them with the model and ``state_dict()`` leaves them out, as
    adapters are saved with ``save_pretrained``) and their :class:`Pack` records.

    The one store is a child of every DeltaDict that holds a packed adapter, so converting any
    part of the model that contains such a Site converts the weights it reads.
    """

    def __init__(self) -> None:
        super().__init__()
        self.packs: dict[str, Pack] = {}
        self.slots = 0  # slot numbers handed out to Sites so far

    def flat(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s flat weight tensor."""
        return self._buffers[name]

    def add(self, name: str, flat: torch.Tensor, pack: Pack) -> None:
        """Hold ``name``'s weights and records."""
        self._buffers[name] = flat  # adapter names need not be identifiers: no register_buffer
        self._non_persistent_buffers_set.add(name)
        self.packs[name] = pack

    def remove(self, name: str) -> None:
        """Drop ``name``'s weights and records."""
        self._buffers.pop(name, None)
        self._non_persistent_buffers_set.discard(name)
        self.packs.pop(name, None)

    def numel(self) -> int:
        """Elements in all packed weights (for parameter counts)."""
        return sum(t.numel() for t in self._buffers.values())

    def extra_repr(self) -> str:
        return f"adapters={list(self.packs)}"


class _Views(weakref.WeakValueDictionary):
    """Adapter name -> the Delta over its packed weights, while someone holds it. Copies and
    pickles of a model start with an empty cache (the Deltas are rebuilt on demand)."""

    def __deepcopy__(self, memo):
        return _Views()

    def __reduce__(self):
        return (_Views, ())


class DeltaDict(nn.ModuleDict):
    """A Site's adapters: Delta modules, plus the packed adapters that have a row at this Site.

    Mapping reads (``in``, ``[]``, ``len``, iteration, ``items()``) see both kinds; a packed
    adapter is returned as a Delta over views of its packed weights, the same object while it is
    in use (see the module docstring).
    """

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "slot", -1)      # this Site's row in every Pack (-1: none yet)
        object.__setattr__(self, "npacked", 0)    # packed adapters with a row here
        object.__setattr__(self, "_views", _Views())

    def _store(self) -> Optional[PackStore]:
        return self._modules.get(STORE_KEY) if self.npacked else None

    def packed(self, name: str) -> Optional[tuple[Pack, list[int], float]]:
        """(pack, ints, float) when ``name`` is a packed adapter present here, else None."""
        store = self._store()
        pack = store.packs.get(name) if store is not None else None
        row = pack.row(self.slot) if pack is not None else None
        return None if row is None else (pack, *row)

    def packed_names(self) -> list[str]:
        """Names of the packed adapters present here."""
        store = self._store()
        if store is None:
            return []
        return [n for n, p in store.packs.items() if p.row(self.slot) is not None]

    def set_packed_value(self, name: str, value: float) -> None:
        """Change the one float of packed adapter ``name``'s row here (LoRA: its scaling); a cached
        view keeps being the Delta in use, so the caller updates that too."""
        hit = self.packed(name)
        if hit is None:
            raise KeyError(name)
        hit[0].floats[self.slot] = value

    def view(self, name: str) -> nn.Module:
        """The Delta over the packed weights of ``name`` (cached while it is held)."""
        view = self._views.get(name)
        if view is not None:
            return view
        hit = self.packed(name)
        if hit is None:
            raise KeyError(name)
        pack, ints, value = hit
        view = pack.cls.from_pack(self._store().flat(name), ints, value, pack.meta)
        view.__dict__["training"] = self.training  # follows the Site's train()/eval()
        self._views[name] = view
        return view

    def train(self, mode: bool = True):
        """As nn.Module's; the cached Deltas over packed weights (not children) follow."""
        out = super().train(mode)
        for view in list(self._views.values()):
            view.__dict__["training"] = mode
        return out

    def _apply(self, fn, recurse=True):
        """Convert as nn.Module does (the packed weights with the store); cached Deltas are views
        of the tensors before conversion, so they are dropped."""
        out = super()._apply(fn, recurse)
        self._views.clear()
        return out

    # ----- state dicts: packed adapters under the keys an unpacked adapter has ----------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self.packed_names():
            for k, t in self.view(name).state_dict(keep_vars=keep_vars).items():
                destination[f"{prefix}{name}.{k}"] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in self.packed_names():
            for k, t in self.view(name).state_dict(keep_vars=True).items():
                key = f"{prefix}{name}.{k}"
                if key not in state_dict:
                    if strict:
                        missing_keys.append(key)
                    continue
                value = state_dict.pop(key)
                if value.shape != t.shape:
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                      f"the shape in current model is {tuple(t.shape)}.")
                    continue
                with torch.no_grad():
                    t.copy_(value)  # into the packed flat tensor, through the view
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ----- mapping --------------------------------------------------------------------
    def __contains__(self, name) -> bool:
        return (name in self._modules and name != STORE_KEY) or (self.npacked > 0 and self.packed(name) is not None)

    def __getitem__(self, name):
        if name != STORE_KEY and name in self._modules:
            return self._modules[name]
        return self.view(name)  # KeyError when not packed here either

    def __delitem__(self, name) -> None:
        if name != STORE_KEY and name in self._modules:
            del self._modules[name]
            return
        hit = self.packed(name)
        if hit is None:
            raise KeyError(name)
        store = self._store()
        self._views.pop(name, None)
        hit[0].drop(self.slot)
        if hit[0].count == 0:
            store.remove(name)
        object.__setattr__(self, "npacked", self.npacked - 1)
        if self.npacked == 0:
            del self._modules[STORE_KEY]

    def keys(self) -> list[str]:  # type: ignore[override]
        """Adapter names here: Delta modules first, then packed adapters."""
        return [k for k in self._modules if k != STORE_KEY] + self.packed_names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._modules) - (STORE_KEY in self._modules) + self.npacked

    def items(self):  # type: ignore[override]
        """(name, Delta) pairs; packed adapters as new views."""
        return [(k, self[k]) for k in self.keys()]

    def values(self):  # type: ignore[override]
        """The Deltas; packed adapters as new views."""
        return [self[k] for k in self.keys()]

    def modules_only(self) -> Iterator[tuple[str, nn.Module]]:
        """(name, Delta) for the adapters held as modules (not packed)."""
        return ((k, m) for k, m in self._modules.items() if k != STORE_KEY)

    # ----- packing --------------------------------------------------------------------
    def take_packed(self, name: str, store: PackStore) -> None:
        """``name``'s Delta module here is now packed in ``store``: drop the module."""
        del self._modules[name]
        if STORE_KEY not in self._modules:
            self._modules[STORE_KEY] = store
        object.__setattr__(self, "npacked", self.npacked + 1)


def _site_entries(host, name: str) -> list:
    from .inject import sites

    return [(path, site) for path, site in sites(host.model) if name in site.deltas]


def pack_adapter(host, name: str) -> bool:
    """Turn adapter ``name``'s Delta modules into a packed adapter; False (nothing changed) when
    it is not eligible (see the module docstring)."""
    from .registry import get_method

    config = host.peft_config[name]
    if not getattr(config, "inference_mode", False) or host.trainable_base.get(name):
        return False
    entries = _site_entries(host, name)
    deltas = [site.deltas._modules.get(name) for _, site in entries]
    if not deltas or any(d is None for d in deltas):
        return False
    cls = type(deltas[0])  # a class packs only if it declares pack_width itself (not inherited)
    if cls.__dict__.get("pack_width", 0) <= 0 or any(type(d) is not cls or not d.packable() for d in deltas):
        return False
    if any(name in site.merged for _, site in entries):
        return False
    if get_method(config.peft_type).extra_state(host, config, name):
        return False
    tensors = [t for d in deltas for t in d.pack_tensors()]
    dtype, device = tensors[0].dtype, tensors[0].device
    if any(t.dtype != dtype or t.device != device or t.requires_grad for t in tensors):
        return False
    meta = deltas[0].pack_meta()
    if any(d.pack_meta() != meta for d in deltas):
        return False
    flat, offsets = _flatten(tensors)  # last: it may copy
    store = getattr(host, "_pack_store", None)
    if store is None:
        store = PackStore()
        object.__setattr__(host, "_pack_store", store)
    pack = Pack(cls, meta)
    rows, k = [], 0
    for (_, site), d in zip(entries, deltas):
        n = len(d.pack_tensors())
        rows.append(d.pack_row(offsets[k:k + n]))
        k += n
    store.add(name, flat, pack)
    for (_, site), (ints, value) in zip(entries, rows):
        if site.deltas.slot < 0:
            object.__setattr__(site.deltas, "slot", store.slots)
            store.slots += 1
        pack.put(site.deltas.slot, ints, value)
        site.deltas.take_packed(name, store)
        site._refresh()
    host._params[name] = []
    return True


def _flatten(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """One flat tensor holding ``tensors`` and each one's element offset in it.

    When they already tile one storage exactly (a file's buffer adopted at load), that storage
    becomes the flat tensor with no copy; otherwise they are copied into a new one.
    """
    storage = tensors[0].untyped_storage()
    item = tensors[0].element_size()
    same = all(t.untyped_storage().data_ptr() == storage.data_ptr() and t.is_contiguous() for t in tensors)
    if same and storage.nbytes() == sum(t.numel() for t in tensors) * item and storage.nbytes() % item == 0:
        flat = torch.empty(0, dtype=tensors[0].dtype, device=tensors[0].device)
        flat.set_(storage, 0, (storage.nbytes() // item,))
        return flat, [t.storage_offset() for t in tensors]
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    offsets, k = [], 0
    for t in tensors:
        flat[k:k + t.numel()].copy_(t.reshape(-1))
        offsets.append(k)
        k += t.numel()
    return flat, offsets


def unpack_adapter(host, name: str) -> bool:
    """Give packed adapter ``name`` Delta modules of its own again (copies of its weights), for
    operations that replace or reshape its Deltas (gating, padding for hot-swap). False when it
    is not packed."""
    store = getattr(host, "_pack_store", None)
    if store is None or name not in store.packs:
        return False
    params = []
    for _, site in _site_entries(host, name):
        view = site.deltas.view(name)
        own = view.unpacked()
        del site.deltas[name]
        site.deltas._modules[name] = own
        params.extend(own.parameters())
        site._refresh()
    store.remove(name)
    host._params[name] = params
    return True


def is_packed(host, name: str) -> bool:
    """Whether adapter ``name`` of ``host`` is packed."""
    store = getattr(host, "_pack_store", None)
    return store is not None and name in store.packs


def packed_numel(host) -> int:
    """Elements in ``host``'s packed adapters."""
    store = getattr(host, "_pack_store", None)
    return store.numel() if store is not None else 0
