"""Learned gates on another adapter's update, as UniPELT uses them.

Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning"
(arXiv:2110.07577), section 3. Family: hybrid (Lialin et al. 2023, section 10).

Each submodule m of a layer gets a gate computed by a small trainable linear layer from the
submodule's own input u, one scalar per token::

    G_m = σ(W_G u + b_G)                       W_G: 1 x d_u,  b_G: 1
    LoRA:             y  = W0 x + G_L(x) * s B A x
    serial adapter:   h <- h + G_A(h) * s U σ(D h)      (u = h, the layer output it reads)
    parallel adapter: y  = F(x) + G_A(x) * s U σ(D x)   (u = x, the block input it reads)

Generically, for a wrapped Delta ``inner`` with output ``inner(x, y)``::

    y' = y + G(u) * (inner(x, y) - y)

    u ──► W_G ──► σ ──────────┐
    x ──► base ──► y ──┬─────(+)──► y'
                       └──► inner ─► (- y) ─► * G

Initialisation: PyTorch's ``nn.Linear`` default for W_G and b_G, so G starts near 0.5. LoRA
(B = 0) and the bottleneck adapter (U = 0) start at zero update, so the gated model still starts
exactly at the base model.

Not mergeable: G depends on each token, so ``G(x) s B A`` cannot be folded into ``W0``.

Saving: Hugging Face PEFT has no gates. :class:`GatedDelta` reports its inner Delta's tensors
under the inner's PEFT names (so the gated adapter's file is the plain adapter's file, loadable in
PEFT as the ungated adapter), and the gates are saved apart by :func:`gate_state_dict` /
:func:`load_gates` (``HybridModel`` writes them to its own ``gates.safetensors``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..core.inject import sites
from ..core.method import Delta, UnsupportedSite
from ..core.packed import unpack_adapter
from .bottleneck import BottleneckDelta, block_dims

GATE_KEY = "gate"  # the gate's submodule name inside a GatedDelta (keys ``<path>.gate.weight``)


class GatedDelta(Delta):
    """``inner``'s update scaled per token by ``σ(W_G u + b_G)``.

    Args:
        inner: the Delta whose update is gated (LoRA, a bottleneck adapter, ...).
        width: d_u, the width of the gate's input.
        on_output: True when the gate reads the base output ``y`` (a serial adapter's input),
            False when it reads the site input ``x``.
    """

    mergeable = False

    def __init__(self, inner: Delta, width: int, on_output: bool):
        super().__init__()
        if inner.replaces_base or inner.transforms_input or isinstance(inner, GatedDelta):
            raise UnsupportedSite(f"{type(inner).__name__} cannot be gated: a gate scales an additive update "
                                  "y + Δ(x, y); full copies, input rescaling ((IA)^3 on feed-forward layers) and "
                                  "already gated adapters have none.")
        self.inner = inner
        self.on_output = on_output
        ref = next((p for p in inner.parameters() if p.is_floating_point()), None)
        self.gate = nn.Linear(width, 1)
        if ref is not None:
            self.gate.to(device=ref.device, dtype=ref.dtype)

    def gate_value(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """G, shape (..., 1): one value per token."""
        u = y if self.on_output else x
        return torch.sigmoid(self.gate(u.to(self.gate.weight.dtype)))

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"a gated adapter needs a layer that returns one tensor; {type(base).__name__} "
                            f"returned {type(y).__name__}.")
        g = self.gate_value(x, y)
        # Without autograd an ungated Delta may add into y in place (LoRA's inference path).
        out = self.inner(x, y if torch.is_grad_enabled() else y.clone(), base)
        return y + g * (out - y)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """Always refuses: the gate is a per-token factor, not a weight."""
        raise TypeError(
            f"this {type(self.inner).__name__} adapter is gated (UniPELT): its update is scaled by "
            "G = sigmoid(W_G x), a different factor for every token, so it cannot be folded into the "
            "base weight. Keep it unmerged (it still runs), or build the ungated form "
            "(unipelt(..., gated=False)) if you need to merge the LoRA part."
        )

    def peft_state(self) -> dict[str, torch.Tensor]:
        """The inner adapter's tensors under PEFT's names; the gate is saved apart."""
        return self.inner.peft_state()

    def local_name(self, peft_suffix: str) -> str:
        """The local (state_dict) name of one of the inner adapter's PEFT suffixes."""
        return "inner." + self.inner.local_name(peft_suffix)


def _gate_input(delta: Delta, base: nn.Module, path: str) -> tuple[int, bool]:
    """(width of u, whether u is the base output) for gating ``delta`` at ``base``."""
    dims = block_dims(base)
    if dims is None:
        raise UnsupportedSite(f"{path}: {type(base).__name__} is not a linear layer or a block of them; a gate "
                              "needs a hidden-state input to read (embeddings and convolutions are not supported).")
    if isinstance(delta, BottleneckDelta) and not delta.parallel:
        return dims[1], True
    return dims[0], False


def _host(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def add_gates(model: nn.Module, adapter_name: str) -> int:
    """Wrap every Delta of ``adapter_name`` in a :class:`GatedDelta`; returns how many.

    ``model`` is a PeftModel (or its AdapterHost). The gates' trainability follows the adapter's
    (through ``set_adapter``). Refuses merged adapters and adapters that are already gated.
    """
    host = _host(model)
    if adapter_name not in getattr(host, "peft_config", {}):
        raise ValueError(f"Unknown adapter {adapter_name!r}; loaded adapters: {sorted(getattr(host, 'peft_config', {}))}")
    unpack_adapter(host, adapter_name)  # a gate wraps a Delta module: packed records are unpacked
    found = [(path, site) for path, site in sites(host.model) if adapter_name in site.deltas]
    for path, site in found:
        if adapter_name in site.merged:
            raise ValueError(f"adapter {adapter_name!r} is merged at {path}; unmerge_adapter() before gating it.")
        if isinstance(site.deltas[adapter_name], GatedDelta):
            raise ValueError(f"adapter {adapter_name!r} is already gated at {path}.")
    gated = {}
    for path, site in found:  # build all first: a refusal leaves the model unchanged
        inner = site.deltas[adapter_name]
        width, on_output = _gate_input(inner, site.base_layer, path)
        gated[path] = GatedDelta(inner, width, on_output)
        gated[path].gate.requires_grad_(any(p.requires_grad for p in inner.parameters()))
    for path, site in found:
        active = list(site.active)
        site.remove(adapter_name)
        site.add(adapter_name, gated[path])
        site.set_active(active)
    params = getattr(host, "_params", None)  # the host's per-adapter list drives set_adapter's requires_grad
    if isinstance(params, dict) and adapter_name in params:
        params[adapter_name] = list(params[adapter_name]) + [p for d in gated.values() for p in d.gate.parameters()]
    return len(found)


def gated_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters of ``model`` whose Deltas are gated."""
    names: dict[str, None] = {}
    for _, site in sites(_host(model).model):
        for n, d in site.deltas.items():
            if isinstance(d, GatedDelta):
                names[n] = None
    return list(names)


def gate_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The gates of ``adapter_name``: ``<module path>.gate.weight`` / ``.gate.bias`` -> tensor."""
    out = {}
    for path, site in sites(_host(model).model):
        d = site.deltas[adapter_name] if adapter_name in site.deltas else None
        if isinstance(d, GatedDelta):
            for k, v in d.gate.state_dict().items():
                out[f"{path}.{GATE_KEY}.{k}"] = v.detach()
    return out


@torch.no_grad()
def load_gates(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor],
               source: Optional[str] = None) -> None:
    """Copy saved gates (from :func:`gate_state_dict`) into ``adapter_name``'s gates.

    Every gate must be present with the right shape and nothing else may be there; otherwise a
    CheckpointError names the first problem and no gate is changed.
    """
    from ..io.checkpoint import CheckpointError

    expected: dict[str, torch.Tensor] = {}
    for path, site in sites(_host(model).model):
        d = site.deltas[adapter_name] if adapter_name in site.deltas else None
        if isinstance(d, GatedDelta):
            for k, v in d.gate.state_dict(keep_vars=True).items():
                expected[f"{path}.{GATE_KEY}.{k}"] = v
    where = source or "gates"
    if not expected:
        raise CheckpointError(f"{where}: adapter {adapter_name!r} has no gates to load into; gate it first "
                              "(add_gates) or build the hybrid with this adapter gated.")
    for k, v in tensors.items():
        if k not in expected:
            raise CheckpointError(f"{where}: gate tensor {k!r} has no place in adapter {adapter_name!r}; expected "
                                  f"keys look like {sorted(expected)[:2]}. It was saved from another model or placement.")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{where}: gate tensor {k!r} has shape {tuple(v.shape)}, this model needs "
                                  f"{tuple(expected[k].shape)}.")
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(f"{where}: missing gate tensor {missing[0]!r} ({len(missing)} missing in all).")
    for k, dest in expected.items():
        dest.data.copy_(tensors[k].to(device=dest.device, dtype=dest.dtype))
