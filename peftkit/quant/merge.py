"""Merging adapters into a quantised base: dequantise, merge, then keep dense or re-quantise.

Packed 4-bit or int8 storage cannot absorb ``s * B A`` in place, so merging goes through a dense
weight: ``W' = dequant(W_q) + s B A``. Keeping ``W'`` dense is exact (the merged model computes
what the unmerged one did, to float rounding) and costs the dense layer's memory. Re-quantising
(``W_q' = quant(W')``) keeps the memory low but adds a fresh quantisation error; it is reported
per layer as

* ``weight_rel_err  = ||dequant(W_q') - W'||_F / ||W'||_F``   (how far the stored weight moved)
* ``update_rel_err  = ||(dequant(W_q') - dequant(W_q)) - s B A||_F / ||s B A||_F``
  (how much of the adapter's update survives; a small update can be rounded away entirely).

The numbers for tiny and real models are in docs/scale.md.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..core.inject import sites
from .backend import backend_for


def _host(model: nn.Module) -> nn.Module:
    host = getattr(model, "base_model", model)
    if not hasattr(host, "unload") or not hasattr(host, "model"):
        raise TypeError(f"expected a PeftModel (or its base_model), got {type(model).__name__}")
    return host


def _dense_copy(layer: nn.Module, dtype: Optional[torch.dtype]) -> nn.Linear:
    w = backend_for(layer).dequantize(layer).detach()
    dtype = dtype or (w.dtype if w.dtype != torch.float16 else torch.float32)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                      device=w.device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(w.to(dtype))
        if layer.bias is not None:
            dense.bias.copy_(layer.bias.detach().to(dtype))
    dense.requires_grad_(False)
    return dense


def dequantize_sites(model: nn.Module, dtype: Optional[torch.dtype] = None) -> int:
    """Replace the quantised base layer of every adapted Site by a dense ``nn.Linear``, in place.

    Afterwards ``merge_adapter()``/``unmerge_adapter()``/``merge_and_unload()`` work as on a dense
    model (exactly). Returns the number of layers converted.
    """
    n = 0
    for _, site in sites(_host(model).model):
        if backend_for(site.base_layer) is None:
            continue
        if site.merged:
            raise RuntimeError("unmerge the adapters before dequantising their base layers")
        site.base_layer = _dense_copy(site.base_layer, dtype)
        n += 1
    return n


@torch.no_grad()
def merge_and_unload_quantized(model: nn.Module, requantize: bool = False,
                               adapter_names: Optional[list[str]] = None,
                               dtype: Optional[torch.dtype] = None) -> tuple[nn.Module, dict[str, dict]]:
    """Merge adapters into a (partly) quantised base and return ``(base model, errors)``.

    ``requantize=False`` leaves each merged layer dense (in ``dtype``, default the dequantised
    dtype); ``True`` quantises it again with the layer's own mode. ``errors`` maps each converted
    layer path to ``{"weight_rel_err", "update_rel_err"}`` (both 0.0 when kept dense).
    """
    host = _host(model)
    plan = []
    for path, site in sites(host.model):
        backend = backend_for(site.base_layer)
        if backend is not None:
            plan.append((path, site, backend, backend.mode_of(site.base_layer)))
    before = {path: backend.dequantize(site.base_layer).float() for path, site, backend, _ in plan}
    dequantize_sites(host, dtype)
    merged_model = host.unload(merge=True, names=adapter_names)
    errors: dict[str, dict] = {}
    for path, _, backend, (mode, dq) in plan:
        parent_path, _, child = path.rpartition(".")
        parent = merged_model.get_submodule(parent_path) if parent_path else merged_model
        dense = getattr(parent, child)
        merged = dense.weight.float()
        update = merged - before[path]
        if not requantize:
            errors[path] = {"weight_rel_err": 0.0, "update_rel_err": 0.0}
            continue
        q = backend.quantize(dense, mode, double_quant=dq)
        stored = backend.dequantize(q).float()
        un = update.norm().item()
        errors[path] = {
            "weight_rel_err": ((stored - merged).norm() / merged.norm().clamp_min(1e-30)).item(),
            "update_rel_err": ((stored - before[path]) - update).norm().item() / un if un > 0 else 0.0,
        }
        setattr(parent, child, q)
    return merged_model, errors
