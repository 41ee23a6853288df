"""Bottleneck adapters: Houlsby (serial, two per block), Pfeiffer (serial, FFN only), parallel.

- Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP" (arXiv:1902.00751).
- Pfeiffer et al. 2021, "AdapterFusion" (arXiv:2005.00247): one adapter after the feed-forward block.
- He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning"
  (arXiv:2110.04366): the parallel adapter, scaled by ``s``.
Family: additive (Lialin et al. 2023, section 6).

Equations, with ``f(h) = U σ(D LN?(h) + b_D) + b_U`` (D: m x d, U: d_out x m, m = d / reduction_factor
or ``bottleneck_size``)::

    serial   (Houlsby, Pfeiffer), at a sublayer's output projection:  y' = y + s f(y)
    parallel (He et al.), around a whole block or layer with input x: y' = y + s f(x)

    serial:   x ──► layer ──► y ──┬──────────► (+) ──► y'      parallel: x ──┬──► block ──► (+) ──► y'
                                  └──► f ─► * s ┘                            └──► f ─► * s ─┘

Placement (``target_modules`` None picks it per family): Houlsby puts one after the attention
output projection and one after the feed-forward output projection (before the residual add),
Pfeiffer only the second, parallel wraps the feed-forward block (``mlp`` / ``DenseReluDense``).

Initialisation: D Kaiming-uniform (PyTorch's Linear default), U = 0 and b_U = 0, so each adapter
starts as the identity (Houlsby's near-identity init, made exact). ``init_weights=False`` also
draws U (tests only). Not mergeable: the non-linearity makes the update depend on the input.
Hugging Face PEFT has no bottleneck adapter; the file format is peftkit's own
(``<layer>.adapter_down.weight`` ...).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
from torch import nn

from ..config import ConfigError, PeftConfig, PeftType
from ..core.method import Delta, Method, UnsupportedSite
from ..core.registry import register_method
from ..core.site import Site
from ..targets import model_type
from ._shared import check_probability, linear_dims, normalise_targets

_LLAMA = {"houlsby": r".*\.(self_attn\.o_proj|mlp\.down_proj)", "pfeiffer": r".*\.mlp\.down_proj",
          "parallel": r".*\.layers\.\d+\.mlp"}
_BERT = {"houlsby": r".*\.attention\.output\.dense|.*\.layer\.\d+\.output\.dense",
         "pfeiffer": r".*\.layer\.\d+\.output\.dense"}
BOTTLENECK_TARGETS = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
    "gpt2": {"houlsby": r".*\.(attn|mlp)\.c_proj", "pfeiffer": r".*\.mlp\.c_proj", "parallel": r".*\.h\.\d+\.mlp"},
    "bert": _BERT, "roberta": _BERT,
    "t5": {"houlsby": r".*\.(SelfAttention|EncDecAttention)\.o|.*\.DenseReluDense\.wo",
           "pfeiffer": r".*\.DenseReluDense\.wo", "parallel": r".*\.DenseReluDense"},
    "gpt_neox": {"houlsby": r".*\.(attention\.dense|mlp\.dense_4h_to_h)", "pfeiffer": r".*\.mlp\.dense_4h_to_h",
                 "parallel": r".*\.layers\.\d+\.mlp"},
}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}


@dataclasses.dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of a bottleneck adapter.

    Args:
        adapter_type: ``"houlsby"``, ``"pfeiffer"`` or ``"parallel"``.
        target_modules: where to insert (names, dotted suffixes or a regex); None: the placement
            of ``adapter_type`` for the model family (see the module docstring).
        exclude_modules: same forms; matching modules are skipped.
        reduction_factor: bottleneck width m = d / reduction_factor.
        bottleneck_size: the width m itself (overrides ``reduction_factor``).
        non_linearity: one of relu, gelu, silu/swish, tanh.
        use_layernorm: a LayerNorm on the adapter's input.
        scaling: ``s`` (He et al. use 4 for a parallel feed-forward adapter).
        adapter_dropout: dropout on the bottleneck activations.
        init_weights: True starts at the identity (U = 0).
        modules_to_save: modules trained in full and saved with the adapter.
    """

    adapter_type: str = "houlsby"
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    reduction_factor: int = 16
    bottleneck_size: Optional[int] = None
    non_linearity: str = "relu"
    use_layernorm: bool = False
    scaling: float = 1.0
    adapter_dropout: float = 0.0
    init_weights: bool = True
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.BOTTLENECK.value
        super().__post_init__()
        normalise_targets(self)
        if self.adapter_type not in ("houlsby", "pfeiffer", "parallel"):
            raise ConfigError(f"BottleneckConfig.adapter_type must be 'houlsby', 'pfeiffer' or 'parallel', "
                              f"got {self.adapter_type!r}.")
        if self.non_linearity not in ACTIVATIONS:
            raise ConfigError(f"BottleneckConfig.non_linearity must be one of {sorted(ACTIVATIONS)}, "
                              f"got {self.non_linearity!r}.")
        for n in ("reduction_factor", "bottleneck_size"):
            v = getattr(self, n)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ConfigError(f"BottleneckConfig.{n} must be a positive integer, got {v!r}.")
        check_probability(self, "adapter_dropout")

    def width(self, dim: int) -> int:
        """Bottleneck width for a layer of width ``dim``."""
        return self.bottleneck_size or max(1, dim // self.reduction_factor)


def block_dims(module: nn.Module) -> Optional[tuple[int, int]]:
    """(input width, output width) of a linear layer or of a block of them (first in, last out).

    Layers inside the block that already hold adapters count as their base layers; the
    adapters' own linear layers are not part of the block.
    """
    inner = list(_linear_dims_in(module))
    return (inner[0][0], inner[-1][1]) if inner else None


def _linear_dims_in(module: nn.Module):
    """linear_dims of every linear layer in ``module``, in definition order, skipping Deltas."""
    if isinstance(module, Site):
        module = module.base_layer
    dims = linear_dims(module)
    if dims is not None:
        yield dims
        return
    for child in module.children():
        yield from _linear_dims_in(child)


class BottleneckDelta(Delta):
    """One bottleneck adapter, serial (on the site's output) or parallel (on its input)."""

    peft_names = {}

    def __init__(self, d_in: int, d_out: int, width: int, act: str, layernorm: bool, scaling: float,
                 parallel: bool, dropout: float, init: bool):
        super().__init__()
        self.parallel, self.scaling = parallel, scaling
        self.adapter_norm = nn.LayerNorm(d_in) if layernorm else nn.Identity()
        self.adapter_down = nn.Linear(d_in, width)
        self.adapter_act = ACTIVATIONS[act]()
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_up = nn.Linear(width, d_out)
        if init:
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"a bottleneck adapter needs a layer that returns one tensor; {type(base).__name__} "
                            f"returned {type(y).__name__}. Target its output projection instead.")
        h = x if self.parallel else y
        # The Site casts x to the adapter's dtype but hands over y as the base made it (bf16 ...)
        h = self.adapter_norm(h.to(self.adapter_down.weight.dtype))
        h = self.adapter_up(self.adapter_dropout(self.adapter_act(self.adapter_down(h))))
        return y + self.scaling * h


@register_method
class BottleneckMethod(Method):
    """Houlsby, Pfeiffer and parallel adapters at linear layers or whole blocks."""

    name = "BOTTLENECK"
    key_roots = ("adapter_norm", "adapter_down", "adapter_up")
    config_cls = BottleneckConfig

    def prepare(self, config: BottleneckConfig, model: nn.Module) -> BottleneckConfig:
        if config.target_modules is not None:
            return config
        row = BOTTLENECK_TARGETS.get(model_type(model), {})
        if config.adapter_type not in row:
            raise ConfigError(
                f"BottleneckConfig: no default placement of a {config.adapter_type!r} adapter for model type "
                f"{model_type(model)!r}. Pass target_modules (the attention/feed-forward output projections "
                "for serial adapters, the feed-forward block for a parallel one).")
        return dataclasses.replace(config, target_modules=row[config.adapter_type])

    def supported_sites(self):
        return ["nn.Linear", "transformers Conv1D", "a block of them returning one tensor (parallel)"]

    def make_delta(self, config: BottleneckConfig, path: str, module: nn.Module, adapter_name: str) -> Delta:
        dims = block_dims(module)
        if dims is None:
            raise UnsupportedSite(f"{type(module).__name__} has no linear layer to read its width from.")
        d_in, d_out = dims
        parallel = config.adapter_type == "parallel"
        if not parallel and linear_dims(module) is None:
            d_in = d_out
        width = config.width(d_in if parallel else d_out)
        delta = BottleneckDelta(d_in if parallel else d_out, d_out, width, config.non_linearity,
                                config.use_layernorm, config.scaling, parallel, float(config.adapter_dropout),
                                config.init_weights)
        p = next((p for p in module.parameters() if p.is_floating_point()), None)
        dtype = torch.float32 if p is None or p.dtype in (torch.float16, torch.bfloat16) else p.dtype
        return delta.to(dtype)
