"""Hugging Face PEFT's tensor names <-> peftkit's modules, as pure functions of the host.

PEFT writes ``base_model.model.<module path>.<suffix>`` with no adapter name: LoRA's
``lora_A.weight``/``lora_B.weight``, ``lora_embedding_A/B`` for embeddings,
``lora_magnitude_vector`` for DoRA, a ``modules_to_save`` copy under the module's own parameter
names, trained biases under their parameter path (``...q_proj.base_layer.bias`` for a wrapped
layer). Each Delta declares its suffixes (``peft_names``), so this module names no method.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from ..core.copies import ModuleCopy
from ..core.inject import sites
from ..core.method import is_placeholder
from ..core.registry import get_method
from .checkpoint import CheckpointError, tensors_in_buffer

PREFIX = "base_model.model."
HOST_PREFIX = "base_model."


def _delta_entries(host, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path, site in sites(host.model):
        if name not in site.deltas:
            continue
        delta = site.deltas[name]
        local = delta.state_dict(keep_vars=True)
        for suffix, tensor in delta.peft_state().items():
            yield f"{PREFIX}{path}.{suffix}", local.get(delta.local_name(suffix), tensor)


def adapter_state_dict(host, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under Hugging Face PEFT's keys."""
    out = {k: v.detach() for k, v in _delta_entries(host, name)}
    method, config = get_method(host.peft_config[name].peft_type), host.peft_config[name]
    for k, v in {**method.extra_state(host, config, name), **method.tied_copies(host, config, name)}.items():
        out[_extra_key(k)] = v.detach()
    return out


def _extra_key(key: str) -> str:
    """A method's extra tensor key: paths in the model get PEFT's prefix; keys that already start
    with ``base_model.`` are host-level tensors (VeRA's shared ``base_model.vera_A``) kept as given."""
    return key if key.startswith(HOST_PREFIX) else PREFIX + key


def _aliases(host, name: str) -> tuple[dict[str, str], set[str]]:
    """PEFT spellings that mean the same tensor, and keys PEFT writes that carry no adapter state."""
    alias, ignore = {}, set()
    for path, site in sites(host.model):
        if name not in site.deltas:
            continue
        if isinstance(site.deltas[name], ModuleCopy):  # modules_to_save: PEFT may add these spellings
            for pname in site.deltas[name].module.state_dict():
                alias[f"{PREFIX}{path}.modules_to_save.{pname}"] = f"{PREFIX}{path}.{pname}"
                ignore.add(f"{PREFIX}{path}.original_module.{pname}")
    return alias, ignore


def load_plan(host, name: str, tensors: dict[str, torch.Tensor], source: str):
    """Check ``tensors`` against adapter ``name`` and return (destination, value) pairs.

    Nothing is written here, so a mismatch leaves the model untouched. The first missing,
    unexpected or wrongly shaped tensor is named in the error.
    """
    expected = dict(_delta_entries(host, name))
    method, config = get_method(host.peft_config[name].peft_type), host.peft_config[name]
    for k, v in method.extra_state(host, config, name).items():
        expected[_extra_key(k)] = v
    optional = {_extra_key(k): v for k, v in method.tied_copies(host, config, name).items()}
    alias, ignore = _aliases(host, name)
    from .embedding_layers import check_shape, embedding_destinations  # it reads PREFIX from here

    embeddings = embedding_destinations(host.model)  # save_embedding_layers: base tensors, loaded too
    plan, seen = [], set()
    for key, value in sorted(tensors.items()):
        key = alias.get(key, key)
        if key in ignore:
            continue
        if key in optional and key not in expected:  # a tied copy of rows the file holds under their own key
            if tuple(optional[key].shape) != tuple(value.shape):
                raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(value.shape)} but this model "
                                      f"needs {tuple(optional[key].shape)}; load it onto the base it was trained on.")
            _check_copy(key, value, optional[key], expected, tensors, source)
            continue
        if key in embeddings and key not in expected:
            if (problem := check_shape(key, embeddings[key], value, source)) is not None:
                raise CheckpointError(problem)
            plan.append((embeddings[key], value))
            continue
        if key not in expected:
            sample = ", ".join(sorted(expected)[:3])
            raise CheckpointError(
                f"{source}: tensor {key!r} has no place in this model. The adapter was probably "
                f"trained on another architecture or with other target modules. Expected keys "
                f"look like: {sample} ..."
            )
        dest = expected[key]
        if tuple(dest.shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)} but this model needs "
                f"{tuple(dest.shape)}. The adapter does not fit this base model (another size or "
                "rank); load it onto the base it was trained on."
            )
        plan.append((dest, value))
        seen.add(key)
    missing = [k for k in expected if k not in seen]
    if missing:
        raise CheckpointError(
            f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all). The "
            "checkpoint is incomplete or belongs to a different configuration."
        )
    return plan


def _check_copy(key: str, value: torch.Tensor, view: torch.Tensor, expected: dict, tensors: dict, source: str) -> None:
    """A tied copy in a file must repeat the tensor it is tied to (``view`` is that tensor, or its
    transpose): the file's value under the owner's key, transposed alike. A copy that differs was
    saved from untied layers, and loading only the owner would silently change the model, so it
    is refused. (The owner may still be a loading placeholder, so the relation is read from the
    shapes, not the strides.)"""
    owner = view._base if view._base is not None else view
    owner_key = next((k for k, t in expected.items() if t is owner), None)
    if owner_key is None or owner_key not in tensors:
        return
    held = tensors[owner_key]
    if view is owner:
        implied = held
    elif view.dim() == 2 and tuple(view.shape) == tuple(owner.shape)[::-1]:
        implied = held.t()
    else:
        return
    if not torch.equal(implied.to(value.dtype), value):
        raise CheckpointError(
            f"{source}: tensor {key!r} should repeat {owner_key!r} (the layers are tied, so they share one "
            "adapter), but its values differ: the file was saved from untied layers. Load it with a config "
            "that does not tie them (ensure_weight_tying=False), or save it again from a tied model.")


@torch.no_grad()
def apply_plan(plan, source: Optional[dict] = None, frozen: bool = False) -> None:
    """Copy each value into its destination tensor (casting dtype and device).

    Destinations that are still placeholders (:func:`~peftkit.core.method.is_placeholder`,
    parameters created while loading) get storage instead of a copy, one allocation for all of
    them: when ``source`` (the dict the plan was made from) is an
    :class:`~peftkit.io.checkpoint.AdapterTensors` whose every tensor lands, unconverted, in a
    placeholder, its buffer is adopted as is; otherwise the values are packed, cast, into one new
    buffer per (device, dtype). The buffer is freed with the last of its parameters (deleting the
    adapter). With ``frozen`` (an adapter loaded for inference) the parameters are views of the
    buffer's one storage; otherwise each gets a storage of its own within it
    (:func:`~peftkit.io.checkpoint.tensors_in_buffer`), so any tool can save them.
    """
    adopt: list = []
    for dest, value in plan:
        if is_placeholder(dest):
            adopt.append((dest, value))
        else:
            dest.data.copy_(value.to(device=dest.device, dtype=dest.dtype))
    if not adopt:
        return
    buffer = getattr(source, "buffer", None)
    if buffer is not None and _whole_buffer(adopt, source, buffer):
        start = buffer.data_ptr()
        layout = [(k, v.dtype, list(v.shape), v.data_ptr() - start) for k, (_, v) in enumerate(adopt)]
        for k, t in tensors_in_buffer(buffer, layout, frozen).items():
            adopt[k][0].data = t
        return
    groups: dict = {}
    for dest, value in adopt:
        groups.setdefault((dest.device, dest.dtype), []).append((dest, value))
    for (device, dtype), items in groups.items():
        layout, offset = [], 0
        for k, (dest, _) in enumerate(items):
            layout.append((k, dtype, list(dest.shape), offset))
            offset += dest.numel() * dtype.itemsize
        packed = tensors_in_buffer(torch.empty(offset, dtype=torch.uint8, device=device), layout, frozen)
        for k, (dest, value) in enumerate(items):
            packed[k].copy_(value)
            dest.data = packed[k]


def _whole_buffer(adopt, source, buffer) -> bool:
    """Whether the values are exactly the tensors of ``source``'s buffer, each in its destination's
    dtype and on its device, so that the buffer can become the parameters' storage."""
    if len(adopt) != len(source) or len({id(d) for d, _ in adopt}) != len(adopt):
        return False
    if {id(v) for _, v in adopt} != {id(v) for v in source.values()}:
        return False
    lo, hi = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    return all(v.dtype == d.dtype and v.device == d.device and v.is_contiguous()
               and lo <= v.data_ptr() and v.data_ptr() + v.numel() * v.element_size() <= hi
               for d, v in adopt)
