"""Hot-swapping: replace a loaded adapter's weights in place from another saved adapter.

A server keeps one model (maybe ``torch.compile``-d) and changes which task it runs without
rebuilding anything: :func:`hotswap_adapter` copies the new adapter's tensors into the existing
parameters (``copy_`` into the same storage), so module structure, parameter identity, shapes and
every Python attribute the compiled graph was traced with stay the same, and nothing recompiles.

Hot-swapping supports LoRA adapters (and their ``modules_to_save`` copies; LoRA on parameters,
``target_parameters``, at the ranks allocated), as Hugging Face PEFT does: other methods' outputs depend on hyperparameters that an in-place copy cannot change.
For an allocated adapter of rank ``R`` and scale ``s`` and a new one of rank
``r <= R`` and scale ``s'``::

    A (R x in):  [A' ; 0]           the new rows, then zero rows
    B (out x R): [B' * s'/s | 0]    the scale ratio is folded into B

so ``s * B A = s' * B' A'`` exactly, while ``s`` (a Python float read by the traced forward) never
changes. DoRA's magnitude vector is copied as is (its norm uses the same product ``s B A``).
A site the new file does not cover gets ``B = 0`` (no update there), as Hugging Face PEFT does;
a tensor the model has no place for is an error. Everything is checked before the first write,
so a failed swap leaves the model exactly as it was.

To swap in adapters of larger rank than the one loaded first, allocate the rank up front with
:func:`prepare_for_hotswap` (before compiling): it zero-pads the factors and rewrites the
adapter's config so that saving it still round-trips.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Optional

import torch
from torch import nn

from ...config import PeftConfig
from ...core.copies import ModuleCopy
from ...core.inject import sites
from ...core.registry import get_method
from ...core.packed import unpack_adapter
from ...io.checkpoint import CheckpointError, load_tensors
from ...io.peft_format import PREFIX
from .params import LoraParameters

# local parameter name -> the dimension that holds the rank
_RANK_DIM = {"lora_A": 0, "lora_embedding_A": 0, "lora_B": 1, "lora_embedding_B": 1}
_B_NAMES = ("lora_B", "lora_embedding_B")


def _is_lora(delta) -> bool:
    from .delta import LoraDelta

    return isinstance(delta, LoraDelta)


def _canonical(host, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's alternative spellings mapped to ours; the base-weight copies PEFT may add dropped.

    Looks only at this adapter's sites (not at every parameter of the model), so a swap costs
    the same however many adapters are loaded.
    """
    alias, ignore = {}, set()
    for path, site in sites(host.model):
        if name not in site.deltas:
            continue
        delta = site.deltas[name]
        if delta.replaces_base and not isinstance(delta, (ModuleCopy, LoraParameters)):
            raise NotImplementedError(
                f"hot-swapping adapter {name!r} is not supported: its Delta at {path} "
                f"({type(delta).__name__}) computes the whole layer (LoRA on nn.MultiheadAttention). "
                "Load the new adapter with load_adapter() and set_adapter() instead.")
        if isinstance(delta, ModuleCopy):  # modules_to_save copies
            for pname in delta.module.state_dict():
                alias[f"{PREFIX}{path}.modules_to_save.{pname}"] = f"{PREFIX}{path}.{pname}"
                ignore.add(f"{PREFIX}{path}.original_module.{pname}")
        else:  # PEFT saves the full weight of targeted embeddings when the vocabulary was resized
            ignore.add(f"{PREFIX}{path}.base_layer.weight")
    return {alias.get(k, k): v for k, v in tensors.items() if alias.get(k, k) not in ignore}


def _scale(config, path: str) -> tuple[int, float]:
    r, alpha = config.rank_and_alpha(path)
    return r, (alpha / math.sqrt(r) if config.use_rslora else alpha / r)


def _padded(dest: torch.Tensor, value: torch.Tensor, dim: int, key: str, source: str) -> torch.Tensor:
    if value.dim() != dest.dim() or any(v != d for i, (v, d) in enumerate(zip(value.shape, dest.shape)) if i != dim):
        raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(value.shape)}, which does not fit "
                              f"{tuple(dest.shape)} (only the rank may differ). The adapter belongs to another "
                              "base model or targets layers of another type.")
    if value.shape[dim] > dest.shape[dim]:
        raise CheckpointError(f"{source}: {key!r} has rank {value.shape[dim]} but only {dest.shape[dim]} is "
                              "allocated. Call peftkit.methods.lora.hotswap.prepare_for_hotswap(model, target_rank="
                              f"{value.shape[dim]}) before compiling, or load the largest adapter first.")
    out = torch.zeros_like(dest)
    out.narrow(dim, 0, value.shape[dim]).copy_(value)
    return out


def _plan(peft_model, tensors: dict[str, torch.Tensor], adapter_name: str, config, source: str):
    host = peft_model.base_model
    if adapter_name not in host.peft_config:
        raise ValueError(f"Unknown adapter {adapter_name!r}; loaded: {sorted(host.peft_config)}. hotswap_adapter "
                         "replaces an adapter that is already loaded; use load_adapter to add a new one.")
    old = host.peft_config[adapter_name]
    if str(old.peft_type) != "LORA":
        raise ValueError(f"{adapter_name!r} is a {old.peft_type} adapter; hot-swapping supports LoRA adapters "
                         "(as Hugging Face PEFT does). Use delete_adapter() and load_adapter() instead.")
    if str(config.peft_type) != str(old.peft_type):
        raise ValueError(f"{source} is a {config.peft_type} adapter but {adapter_name!r} is {old.peft_type}; "
                         "hot-swapping needs the same method.")
    if getattr(config, "use_dora", False) != getattr(old, "use_dora", False):
        raise ValueError(f"{source}: use_dora differs from {adapter_name!r}'s; hot-swapping needs the same variant.")
    tensors = _canonical(host, adapter_name, tensors)
    plan, seen = [], set()
    for path, site in sites(host.model):
        if adapter_name not in site.deltas:
            continue
        if adapter_name in site.merged:
            raise ValueError(f"{adapter_name!r} is merged into {path}; unmerge_adapter() before hot-swapping.")
        delta = site.deltas[adapter_name]
        local = delta.state_dict(keep_vars=True)
        keys = {f"{PREFIX}{path}.{suffix}": delta.local_name(suffix) for suffix in delta.peft_state()}
        present = [k for k in keys if k in tensors]
        if isinstance(delta, LoraParameters):
            plan += _parameters_plan(delta, path, keys, present, tensors, config, source)
            seen.update(present)
            continue
        if _is_lora(delta) and not present and delta.magnitude is None:
            for name in keys.values():
                if name in _B_NAMES:  # the new adapter leaves this layer alone
                    plan.append((local[name], torch.zeros_like(local[name])))
            continue
        if len(present) != len(keys):
            missing = next(k for k in keys if k not in tensors)
            raise CheckpointError(f"{source}: missing tensor {missing!r}; the new adapter must cover the same "
                                  "tensors of every layer it targets.")
        ratio = None
        if _is_lora(delta):
            r_new, s_new = _scale(config, path)
            if delta.scaling == 0:
                raise ValueError(f"{adapter_name!r} has scale 0 at {path} (lora_alpha=0); it cannot carry "
                                 "another adapter's update. Load it with a nonzero lora_alpha.")
            ratio = s_new / delta.scaling
        for key, name in keys.items():
            value, dest = tensors[key], local[name]
            if ratio is not None and name in _RANK_DIM:
                if value.shape[_RANK_DIM[name]] != r_new:
                    raise CheckpointError(f"{source}: {key!r} has rank {value.shape[_RANK_DIM[name]]} but its "
                                          f"config says r={r_new} for {path}; the config and weights disagree.")
                value = value.to(dest.dtype) * ratio if name in _B_NAMES else value.to(dest.dtype)
                value = _padded(dest, value.to(dest.device), _RANK_DIM[name], key, source)
            elif tuple(value.shape) != tuple(dest.shape):
                raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(value.shape)} but the loaded "
                                      f"adapter has {tuple(dest.shape)}; hot-swapping needs equal shapes.")
            plan.append((dest, value))
            seen.add(key)
    extra = get_method(old.peft_type).extra_state(host, old, adapter_name)
    for k, dest in extra.items():
        if PREFIX + k in tensors:
            value = tensors[PREFIX + k]
            if tuple(value.shape) != tuple(dest.shape):
                raise CheckpointError(f"{source}: {PREFIX + k!r} has shape {tuple(value.shape)}, expected {tuple(dest.shape)}.")
            plan.append((dest, value))
            seen.add(PREFIX + k)
    # tied layers' copies of tensors handled above (ensure_weight_tying): nothing of their own to swap
    seen.update(PREFIX + k for k in get_method(old.peft_type).tied_copies(host, old, adapter_name))
    unexpected = [k for k in tensors if k not in seen]
    if unexpected:
        raise CheckpointError(f"{source}: tensor {unexpected[0]!r} has no place in adapter {adapter_name!r} "
                              f"({len(unexpected)} such). A hot-swapped adapter may only target layers the "
                              "loaded one targets; load it with load_adapter instead.")
    return plan


def _parameters_plan(delta, path: str, keys: dict, present: list, tensors: dict, config, source: str) -> list:
    """LoRA on parameters (params.py): each parameter's factors at the allocated rank, the new
    scale folded into B as for layers (``s B A = s' B' A'``); an owner the new adapter leaves
    alone gets ``B = 0``. Expert factors are not padded (their rows are expert-major), so a
    different rank is an error."""
    local = delta.state_dict(keep_vars=True)
    if not present:
        return [(local[n], torch.zeros_like(local[n])) for n in keys.values() if n.endswith("lora_B")]
    if len(present) != len(keys):
        missing = next(k for k in keys if k not in tensors)
        raise CheckpointError(f"{source}: missing tensor {missing!r}; the new adapter must cover the same "
                              "parameters of every module it targets.")
    plan = []
    for key, name in keys.items():
        param = name.split(".")[1]  # factors.<parameter>.lora_A
        factors, dest, value = delta.factors[param], local[name], tensors[key]
        if tuple(value.shape) != tuple(dest.shape):
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(value.shape)} but the loaded adapter "
                                  f"has {tuple(dest.shape)}; hot-swapping LoRA on parameters needs the same rank "
                                  "(expert factors are not padded).")
        if name.endswith("lora_B"):
            if factors.scaling == 0:
                raise ValueError(f"the loaded adapter has scale 0 at {path}.{param} (lora_alpha=0); it cannot "
                                 "carry another adapter's update. Load it with a nonzero lora_alpha.")
            value = value.to(dest.dtype) * (_scale(config, f"{path}.{param}")[1] / factors.scaling)
        plan.append((dest, value))
    return plan


@torch.no_grad()
def hotswap_adapter_from_state_dict(peft_model, tensors: dict[str, torch.Tensor], adapter_name: str,
                                    config: PeftConfig, source: str = "state dict") -> None:
    """Copy ``tensors`` (Hugging Face PEFT keys, as ``save_pretrained`` writes) into ``adapter_name``."""
    for dest, value in _plan(peft_model, tensors, adapter_name, config, source):
        dest.data.copy_(value.to(device=dest.device, dtype=dest.dtype))


def hotswap_adapter(peft_model, model_id: str, adapter_name: str = "default", subfolder: Optional[str] = None,
                    config: Optional[PeftConfig] = None) -> None:
    """Replace the weights of loaded adapter ``adapter_name`` with the adapter saved in ``model_id``.

    The adapter keeps its name, active state and trainability; no module is created or removed,
    so a ``torch.compile``-d model does not recompile. Raises (leaving the model unchanged) when
    the new adapter targets other layers, has larger rank than allocated, or another method.
    """
    folder = os.path.join(model_id, subfolder) if subfolder else model_id
    config = config or PeftConfig.from_pretrained(folder)
    hotswap_adapter_from_state_dict(peft_model, load_tensors(folder), adapter_name, config, source=folder)


@torch.no_grad()
def prepare_for_hotswap(peft_model, target_rank: int, adapter_names: Optional[list[str]] = None) -> None:
    """Zero-pad LoRA adapters to rank ``target_rank`` so later swaps of rank up to it fit.

    Call before ``torch.compile``. Outputs are unchanged (the padding is zero and each layer's
    scale is kept); the config becomes ``r=target_rank`` with per-layer ``alpha_pattern`` entries
    giving the same scales, so saving and reloading the padded adapter round-trips.
    """
    host = peft_model.base_model
    names = adapter_names or list(host.peft_config)
    for name in names:
        cfg = host.peft_config[name]
        if str(cfg.peft_type) != "LORA":
            raise ValueError(f"prepare_for_hotswap pads LoRA adapters; {name!r} is {cfg.peft_type}.")
        alphas = {}
        unpack_adapter(host, name)  # padding replaces the Delta's tensors: packed records cannot grow
        ranks = {}
        for path, site in sites(host.model):
            delta = site.deltas[name] if name in site.deltas else None
            if isinstance(delta, LoraParameters):  # not padded: their rank and scale stay, by pattern
                for n, f in delta.factors.items():
                    key = re.escape(f"{path}.{n}")
                    ranks[key] = f.r
                    alphas[key] = f.scaling * (math.sqrt(f.r) if cfg.use_rslora else f.r)
                continue
            if delta is None or not _is_lora(delta):
                continue
            if delta.r > target_rank:
                raise ValueError(f"{name!r} has rank {delta.r} at {path}, above target_rank={target_rank}.")
            _pad_delta(delta, target_rank)
            alphas[re.escape(path)] = delta.scaling * (math.sqrt(target_rank) if cfg.use_rslora else target_rank)
        host.peft_config[name] = dataclasses.replace(cfg, r=target_rank, rank_pattern=ranks, alpha_pattern=alphas)
    host.set_adapter(host.active_adapters)


def _pad_delta(delta, rank: int) -> None:
    for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        old = getattr(delta, attr, None)
        if old is None:
            continue
        weight = old.weight if isinstance(old, nn.Module) else old
        dim = 0 if attr.endswith("A") else 1
        shape = list(weight.shape)
        shape[dim] = rank
        new = weight.new_zeros(shape)
        new.narrow(dim, 0, weight.shape[dim]).copy_(weight)
        param = nn.Parameter(new, requires_grad=weight.requires_grad)
        if isinstance(old, nn.Module):
            old.weight = param
            if isinstance(old, nn.Linear):
                old.in_features, old.out_features = new.shape[1], new.shape[0]
            else:
                old.in_channels, old.out_channels = new.shape[1], new.shape[0]
        else:
            setattr(delta, attr, param)
    delta.r = rank
