"""``get_layer_status`` / ``get_model_status``: what every adapted layer holds, as PEFT reports it.

Hugging Face PEFT offers both on ``PeftModel`` and as functions; scripts print them to check that
adapters are where, active, merged and trainable as intended. The fields and the ``"irregular"``
rule (layers disagree) are PEFT's. A layer is a Site here; its ``module_type`` reads
``<method>.<layer class>`` (``lora.Linear``), its name is the path under the host
(``model.<path>``), as in PEFT.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Union

from torch import nn

from .core.inject import sites

IRREGULAR = "irregular"


@dataclasses.dataclass
class TunerLayerStatus:
    """One adapted layer: its adapters and their state."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Literal["irregular"]]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]


@dataclasses.dataclass
class TunerModelStatus:
    """The whole model: the layers' states folded together (``"irregular"`` where they differ)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Literal["irregular"]]
    active_adapters: Union[list[str], Literal["irregular"]]
    merged_adapters: Union[list[str], Literal["irregular"]]
    requires_grad: dict[str, Union[bool, Literal["irregular"]]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Literal["irregular"]]


def _type_name(peft_type) -> str:
    return str(getattr(peft_type, "value", peft_type))


def _fold(values) -> Union[bool, Literal["irregular"]]:
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return IRREGULAR


def _host(model: nn.Module):
    from .functional import _host_and_prefix

    host, _ = _host_and_prefix(model)
    if host.kind != "site":
        raise TypeError("get_layer_status() / get_model_status() do not support prompt methods (prompt tuning, "
                        "prefix tuning, adaption prompt): they adapt no layer. Inspect model.peft_config instead.")
    return host


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapted layer of ``model`` (a PeftModel or an injected model)."""
    host = _host(model)
    out = []
    for path, site in sites(host.model):
        names = list(site.deltas.keys())
        requires_grad, devices = {}, {}
        for n in names:
            params = list(site.deltas[n].parameters())
            requires_grad[n] = _fold(p.requires_grad for p in params) if params else False
            devices[n] = sorted({t.device.type for t in list(params) + list(site.deltas[n].buffers())})
        first = host.peft_config.get(names[0]) if names else None
        method = _type_name(getattr(first, "peft_type", "adapter")).lower()
        backend = getattr(site.base_layer, "quantization_backend", None)
        out.append(TunerLayerStatus(
            name=f"model.{path}", module_type=f"{method}.{type(site.base_layer).__name__}",
            enabled=not site.disabled, active_adapters=list(site.active), merged_adapters=list(site.merged),
            requires_grad=requires_grad, available_adapters=sorted(names), devices=devices,
            quantization_backend=getattr(backend, "backend_name", None)))
    if not out:
        raise ValueError("No adapter layers found in the model; is it a peftkit PeftModel, or a model returned by "
                         "inject_adapter_in_model?")
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The status of ``model``'s adapters as a whole (see :class:`TunerModelStatus`)."""
    from .model import PeftModel

    host = _host(model)
    layers = get_layer_status(model)
    if isinstance(model, PeftModel):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        params = {id(p): p for p in host.model.parameters()}.values()
        trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    merged_all = sorted({n for s in layers for n in s.merged_adapters})
    merged: Union[list[str], str] = merged_all
    if any((set(s.available_adapters) - set(s.merged_adapters)) & set(merged_all) for s in layers):
        merged = IRREGULAR
    grads: dict[str, list] = {}
    devs: dict[str, set] = {}
    for s in layers:
        for k, v in s.requires_grad.items():
            grads.setdefault(k, []).append(v)
        for k, v in s.devices.items():
            devs.setdefault(k, set()).update(v)
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=type(host.model).__name__, adapter_model_type=type(host).__name__,
        peft_types={k: _type_name(c.peft_type) for k, c in host.peft_config.items()},
        trainable_params=trainable, total_params=total, num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else IRREGULAR,
        active_adapters=list(active.pop()) if len(active) == 1 else IRREGULAR,
        merged_adapters=merged, requires_grad={k: _fold(v) for k, v in grads.items()},
        available_adapters=sorted({n for s in layers for n in s.available_adapters}),
        devices={k: sorted(v) for k, v in devs.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else IRREGULAR)
