"""LoRA on bare parameters (``LoraConfig(target_parameters=[...])``), e.g. fused MoE experts.

LoRA (Hu et al., 2021, arXiv:2106.09685) adds a low-rank update to a frozen weight. Mixture-of-
experts blocks in transformers (``Qwen3MoeExperts``, ``MixtralExperts``, ``GptOssExperts``, ...)
keep all experts' weights in one 3-D ``nn.Parameter`` and index it in their own forward, so there
is no layer to wrap. The update then acts on the parameter itself, one low-rank matrix per
expert, and the owning module runs with the updated tensor::

    W'_e = W_e + s B_e A_e,   e = 1..E,   s = alpha / r  (alpha / sqrt(r) with rsLoRA)
    y    = owner(x, ...; W')                       (the owner's own forward, nothing else changes)

Shapes, as Hugging Face PEFT stores them (so files interoperate both ways)::

    W       (E, out, in)   transformers' default layout (Qwen3-MoE, Mixtral: F.linear(x, W[e]))
            (E, in, out)   owners marked ``is_transposed`` (gpt-oss: x @ W[e])
            (out, in)      a 2-D parameter: E = 1, plain LoRA
    lora_A  (E*r, in)      rows expert-major:  A_e = lora_A[e*r:(e+1)*r]
    lora_B  (out, E*r)     columns rank-major: B_e = lora_B[:, e::E]

The owner (the ``experts`` module) becomes the Site; one :class:`LoraParameters` Delta per adapter
holds the factors of every targeted parameter of that owner. On disk PEFT nests one wrapper per
parameter in the owner's registration order, the first one innermost: with ``gate_up_proj`` and
``down_proj`` targeted, ``experts.base_layer.lora_A.weight`` is ``gate_up_proj``'s and
``experts.lora_A.weight`` is ``down_proj``'s.

As in PEFT: no ``lora_dropout`` (the update acts on weights: there is no input to drop out), no
``fan_in_fan_out``, ``lora_bias``, DoRA or data-dependent initialisation; mixed-adapter batches
(``adapter_names=``) are refused. Merging adds ``s B_e A_e`` into the parameter; unmerging
subtracts it.
"""
from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from ...core import site as _site
from ...core.method import Delta, init_skipped, new_parameter


def parameter_layout(owner: nn.Module, name: str) -> tuple[int, int, int, bool]:
    """``(experts, in_features, out_features, transposed)`` of ``owner.<name>``.

    ``transposed``: the parameter is stored (E, in, out) (the owner says ``is_transposed``).
    """
    p = getattr(owner, name)
    if p.dim() == 2:
        return 1, p.shape[1], p.shape[0], False
    if p.dim() != 3:
        raise ValueError(f"target_parameters: {type(owner).__name__}.{name} has {p.dim()} dimensions "
                         f"(shape {tuple(p.shape)}); LoRA on parameters supports 2-D (out, in) and 3-D "
                         "(experts, ., .) tensors.")
    transposed = bool(getattr(owner, "is_transposed", False))
    e, a, b = p.shape
    return (e, a, b, True) if transposed else (e, b, a, False)


class ParamFactors(nn.Module):
    """``lora_A`` (E*r x in) and ``lora_B`` (out x E*r) for one parameter (PEFT's shapes)."""

    def __init__(self, experts: int, in_f: int, out_f: int, r: int, transposed: bool, scaling: float):
        super().__init__()
        self.experts, self.r, self.transposed = experts, r, transposed
        self.scaling = scaling  # this parameter's alpha / r (rank_pattern / alpha_pattern apply per parameter)
        self.lora_A = new_parameter(experts * r, in_f)
        self.lora_B = new_parameter(out_f, experts * r)

    def update(self, like: torch.Tensor) -> torch.Tensor:
        """``s B_e A_e`` for every expert, in ``like``'s layout and dtype."""
        scaling = self.scaling
        a, b = self.lora_A.to(like.dtype), self.lora_B.to(like.dtype)
        if like.dim() == 2:
            return (b @ a) * scaling
        e = self.experts
        a3 = a.view(e, self.r, a.shape[-1])                 # (E, r, in)
        b3 = b.view(b.shape[0], self.r, e).permute(2, 0, 1)  # (E, out, r)
        if self.transposed:
            return torch.bmm(a3.transpose(1, 2), b3.transpose(1, 2)) * scaling  # (E, in, out)
        return torch.bmm(b3, a3) * scaling                                       # (E, out, in)


class LoraParameters(Delta):
    """One LoRA adapter on the targeted parameters of one owner module (see the module docstring)."""

    lora_scaled = True
    mergeable = True
    replaces_base = True  # the owner runs here, with the updated parameters
    peft_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __init__(self, owner: nn.Module, names: list[str], ranks: dict[str, tuple[int, float]], use_rslora: bool):
        """``ranks``: parameter name -> (r, alpha), as ``rank_pattern``/``alpha_pattern`` give them
        for ``<owner path>.<name>`` (PEFT matches the patterns per parameter)."""
        super().__init__()
        self.names = list(names)  # the owner's registration order: PEFT's nesting, innermost first
        self.r, self.alpha = ranks[self.names[0]]
        scale = (lambda r, a: a / math.sqrt(r)) if use_rslora else (lambda r, a: a / r)
        self.factors = nn.ModuleDict({n: ParamFactors(*_args(owner, n, ranks[n][0]), scale(*ranks[n]))
                                      for n in self.names})
        self.__dict__["_owner"] = owner  # a plain reference: the Site owns the module

    @property
    def scaling(self) -> float:
        """The scale of the first targeted parameter's update; setting it rescales every one of
        them by the same factor (``peftkit.helpers.rescale_adapter_scale``)."""
        return next(iter(self.factors.values())).scaling

    @scaling.setter
    def scaling(self, value: float) -> None:
        current = self.scaling
        for f in self.factors.values():
            f.scaling = value if current == 0 else f.scaling * (value / current)

    def reset(self, init) -> None:
        """PEFT's initialisation: True (A Kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r),
        B = 0) or False (both as nn.Linear's default, for tests)."""
        if init_skipped():
            return
        with torch.no_grad():
            for f in self.factors.values():
                nn.init.kaiming_uniform_(f.lora_A, a=math.sqrt(5))
                if init == "gaussian":
                    nn.init.normal_(f.lora_A, std=1 / f.r)
                if init is False:
                    nn.init.kaiming_uniform_(f.lora_B, a=math.sqrt(5))
                else:
                    nn.init.zeros_(f.lora_B)

    def updated(self) -> dict[str, torch.Tensor]:
        """Parameter name -> ``W + sum of s B A`` over the active, unmerged adapters of this kind at
        the Site (PEFT sums them; usually just this one). A new tensor: the parameter is untouched."""
        owner, deltas = self._owner, [self]
        ref = self.__dict__.get("_site")
        site = ref() if ref is not None else None
        if site is not None and len(site.active) > 1:  # len only: one-adapter switches add no guard
            deltas = [site.deltas[n] for n in site.active if n not in site.merged]
            deltas = [d for d in deltas if isinstance(d, LoraParameters)]
        out = {}
        for name in dict.fromkeys(n for d in deltas for n in d.names):
            w = getattr(owner, name)
            for d in deltas:
                if name in d.factors:
                    w = w + d.factors[name].update(w)
            out[name] = w
        return out

    def replace(self, *args, **kwargs):
        """The owner's output with every targeted parameter replaced by ``W + s B A``."""
        # the plain global first: torch.compile traces it, not the ContextVar (as Site.forward does)
        if _site._OPEN_ROUTINGS and _site.current_routing() is not None:
            raise TypeError("LoRA on parameters (target_parameters) does not support mixed adapter batches "
                            "(adapter_names=...), as in Hugging Face PEFT; set_adapter() one adapter instead.")
        return torch.func.functional_call(self._owner, self.updated(), args, kwargs, strict=False)

    def forward(self, x, y, base):  # not used by the Site (replaces_base), kept for direct calls
        return self.replace(x)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The update of the first targeted parameter (all of them: :meth:`merge`)."""
        n = self.names[0]
        return self.factors[n].update(getattr(base, n))

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        for n, f in self.factors.items():
            w = getattr(base, n)
            w.add_(f.update(w))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        for n, f in self.factors.items():
            w = getattr(base, n)
            w.sub_(f.update(w))

    # ----- PEFT's keys: one nested wrapper per parameter, the first registered innermost ----------
    def _prefix(self, name: str) -> str:
        return "base_layer." * (len(self.names) - 1 - self.names.index(name))

    def peft_state(self) -> dict[str, torch.Tensor]:
        """``[base_layer.]*k lora_A.weight`` / ``lora_B.weight`` per parameter (see the docstring)."""
        out = {}
        for n, f in self.factors.items():
            p = self._prefix(n)
            out[p + "lora_A.weight"] = f.lora_A
            out[p + "lora_B.weight"] = f.lora_B
        return out

    def local_name(self, peft_suffix: str) -> str:
        for n in self.names:
            p = self._prefix(n)
            for local in ("lora_A", "lora_B"):
                if peft_suffix == f"{p}{local}.weight":
                    return f"factors.{n}.{local}"
        return peft_suffix


def link_sites(host: nn.Module, adapter_name: str) -> None:
    """Give each of ``adapter_name``'s :class:`LoraParameters` a weak reference to its Site, so
    that several active adapters on one owner add up (the Site lets one Delta replace the base)."""
    from ...core.inject import sites

    for _, site in sites(host.model):
        d = site.deltas[adapter_name] if adapter_name in site.deltas else None
        if isinstance(d, LoraParameters):
            d.__dict__["_site"] = weakref.ref(site)


def _args(owner: nn.Module, name: str, r: int):
    e, in_f, out_f, transposed = parameter_layout(owner, name)
    return e, in_f, out_f, r, transposed  # ParamFactors' arguments before the scale


def targeted_parameters(config, path: str, module: nn.Module) -> list[str]:
    """The names of ``module``'s own parameters that ``config.target_parameters`` selects, in
    registration order. A target matches ``<path>.<name>`` in full or as a dotted suffix."""
    specs = getattr(config, "target_parameters", None)
    if not specs:
        return []
    if isinstance(module, nn.Module) and hasattr(module, "deltas") and hasattr(module, "base_layer"):
        module = module.base_layer  # already a Site (another adapter): its owner's parameters
    out = []
    for name, _ in module.named_parameters(recurse=False):
        key = f"{path}.{name}" if path else name
        if any(key == t or key.endswith("." + t) for t in specs):
            out.append(name)
    return out
