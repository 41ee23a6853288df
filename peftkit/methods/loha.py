"""LoHa: low-rank Hadamard product update (FedPara / LyCORIS).

Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning" (arXiv:2108.06098); used for fine-tuning by LyCORIS (Yeh et al. 2024, arXiv:2309.14859).
Family: reparametrisation-based (Lialin et al. 2023, section 9).

Equation, for a frozen weight ``W`` viewed as (out, in_flat) (conv kernels flattened into in)::

    ΔW = s * (W1a W1b) ⊙ (W2a W2b),   W1a, W2a: out x r,  W1b, W2b: r x in_flat,  s = alpha / r
    y  = W x + ΔW x

    x ──► W ──────────────────────────────► (+) ──► y
    └──► [(W1a W1b) ⊙ (W2a W2b)] * s ───────┘

The Hadamard product of two rank-r matrices has rank up to r², so LoHa reaches higher ranks
than LoRA for the same parameter count (4 r (out + in) vs. 2 r (out + in) ... at rank r²).

Initialisation (``init_weights=True``, as in PEFT): W1a, W1b, W2a Kaiming-uniform, W2b = 0, so
ΔW = 0 at the start. ``init_weights=False``: all four random (tests only).

Training-time options shared with LoKr: ``rank_dropout`` zeroes whole output rows of ΔW (and
rescales by the kept fraction), ``module_dropout`` skips the whole adapter for a step.
Merging adds ΔW to the weight exactly. On disk: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``,
``hada_w2_b`` as PEFT writes them. Sites: nn.Linear, GPT-2 Conv1D, nn.Conv1d, nn.Conv2d, grouped
convolutions too (the weight is (out, in/groups, *kernel), so is ΔW), as in PEFT 0.21; nn.Conv3d
is refused there and here.

``use_effective_conv2d=True`` (convolutions with a kernel larger than 1; a 1-wide kernel keeps
the flattened form, as in PEFT) builds each factor from a CP-style core instead (LyCORIS,
after Kim et al. 2016, arXiv:1511.06530)::

    W_i = T_i ×_1 A_i^T ×_2 B_i^T:   W_i[p, q, k, l] = Σ_{a, b} T_i[a, b, k, l] A_i[a, p] B_i[b, q]
    ΔW  = s * W_1 ⊙ W_2            (out, in/groups, k1, k2)

    hada_t1, hada_t2: r x r x k1 x k2 (k x 1 for Conv1d),  hada_w*_a: r x out,  hada_w*_b: r x in/groups
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, PeftConfig, PeftType
from ..core.method import Delta, Method, UnsupportedSite
from ..core.patterns import pattern_value
from ..core.registry import register_method
from ..targets import LORA_DEFAULT_TARGETS
from ._shared import (adapter_dtype, check_layers, check_positive_int, check_probability, from_2d,
                      is_conv1d_gpt2, normalise_targets, weight_2d, with_default_targets)


@dataclasses.dataclass
class LycorisConfig(PeftConfig):
    """Fields LoHa and LoKr share (Hugging Face PEFT's ``LycorisConfig`` names and defaults).

    Args:
        r: rank of each factor pair.
        alpha: scale numerator; ΔW is multiplied by ``alpha / r``.
        rank_dropout: probability of zeroing an output row of ΔW in a training step.
        module_dropout: probability of skipping the adapter in a training step.
        use_effective_conv2d: PEFT's CP-decomposed form for convolutions with kernels above 1.
        target_modules / exclude_modules: as in LoraConfig; None picks the family default.
        init_weights: True starts with ΔW = 0; False (tests) all factors random.
        layers_to_transform / layers_pattern: restrict to these layer indices.
        rank_pattern / alpha_pattern: per-module overrides of r / alpha keyed by regex.
        modules_to_save: modules trained in full and saved with the adapter.
    """

    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)
    r: int = 8
    alpha: int = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    init_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None

    _init_choices: ClassVar[tuple] = (True, False)

    def __post_init__(self) -> None:
        super().__post_init__()
        normalise_targets(self)
        check_positive_int(self, "r")
        check_probability(self, "rank_dropout", "module_dropout")
        check_layers(self)
        if self.init_weights not in self._init_choices:
            raise ConfigError(f"{type(self).__name__}.init_weights must be one of {self._init_choices}, "
                              f"got {self.init_weights!r}.")

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """(r, alpha) for the module at ``path`` after the per-module patterns."""
        return pattern_value(self.rank_pattern, path, self.r), pattern_value(self.alpha_pattern, path, self.alpha)


@dataclasses.dataclass
class LoHaConfig(LycorisConfig):
    """Configuration of a LoHa adapter; see :class:`LycorisConfig` for the fields."""

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LOHA.value
        super().__post_init__()


class LycorisDelta(Delta):
    """ΔW-based update shared by LoHa and LoKr: subclasses give :meth:`weight_2d_delta`."""

    mergeable = True

    def __init__(self, base: nn.Module, r: int, alpha: float, rank_dropout: float, module_dropout: float,
                 rank_dropout_scale: bool = True):
        super().__init__()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.rank_dropout_scale = rank_dropout_scale
        self.conv = isinstance(base, (nn.Conv1d, nn.Conv2d))

    def weight_2d_delta(self) -> torch.Tensor:
        """ΔW as (out, in_flat), scaled."""
        raise NotImplementedError(f"{type(self).__name__} must define weight_2d_delta")

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return from_2d(self.weight_2d_delta(), base).to(base.weight.dtype)

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.training and self.module_dropout and torch.rand(1).item() <= self.module_dropout:
            return y
        w = self.weight_2d_delta()
        if self.training and self.rank_dropout:
            keep = (torch.rand(w.shape[0], device=w.device) > self.rank_dropout).to(w.dtype)
            if self.rank_dropout_scale and keep.mean() > 0:
                keep = keep / keep.mean()
            w = w * keep[:, None]
        if self.conv:
            return y + base._conv_forward(x, w.reshape(base.weight.shape), None)
        return y + F.linear(x, w)


def check_site(module: nn.Module, config: LycorisConfig, method: str) -> None:
    """Refuse layer types PEFT 0.21 has no LyCORIS layer for (its rule, so files agree)."""
    if is_conv1d_gpt2(module) or isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return
    hint = (" Hugging Face PEFT 0.21 has no LoHa/LoKr for nn.Conv3d either; use LoRA or (IA)^3 there."
            if isinstance(module, nn.Conv3d) else "")
    raise UnsupportedSite(f"layer type {type(module).__name__} is not supported by {method}.{hint}")


def effective_conv(module: nn.Module, config: LycorisConfig) -> bool:
    """Whether ``use_effective_conv2d`` applies at ``module``: a convolution whose kernel is
    larger than 1 (PEFT keeps 1x1 and 1-wide kernels in the flattened form)."""
    return (bool(config.use_effective_conv2d) and isinstance(module, (nn.Conv1d, nn.Conv2d))
            and math.prod(module.kernel_size) > 1)


def cp_weight(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``W[p, q, k, l] = Σ core[i, j, k, l] a[i, p] b[j, q]``: a CP-style core (r x r x k1 x k2)
    turned into a kernel (p x q x k1 x k2) by the factors a (r x p) and b (r x q)."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, a, b)


class LoHaDelta(LycorisDelta):
    """LoHa at one layer: two rank-r pairs combined by a Hadamard product."""

    peft_names = {n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")}

    def __init__(self, base: nn.Module, init: bool, effective: bool = False, **kw: Any):
        super().__init__(base, **kw)
        out, inn = weight_2d(base).shape
        r = self.r
        self.effective = effective
        if effective:  # CP form: (r, out) / (r, in/groups) factors around an r x r x kernel core
            kernel = tuple(base.weight.shape[2:]) + ((1,) if base.weight.dim() == 3 else ())
            per_group = base.weight.shape[1]
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *kernel))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *kernel))
            shapes = ((r, out), (r, per_group))
        else:
            shapes = ((out, r), (r, inn))
        self.hada_w1_a = nn.Parameter(torch.empty(shapes[0]))
        self.hada_w1_b = nn.Parameter(torch.empty(shapes[1]))
        self.hada_w2_a = nn.Parameter(torch.empty(shapes[0]))
        self.hada_w2_b = nn.Parameter(torch.empty(shapes[1]))
        for p in self.parameters():
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        if init:
            nn.init.zeros_(self.hada_w2_b)

    def weight_2d_delta(self) -> torch.Tensor:
        if self.effective:
            w1 = cp_weight(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            w2 = cp_weight(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
            return (w1 * w2 * self.scaling).reshape(w1.shape[0], -1)
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling


@register_method
class LoHaMethod(Method):
    """LoHa at Linear, Conv1D, Conv1d and Conv2d sites (grouped convolutions too)."""

    name = "LOHA"
    config_cls = LoHaConfig

    def prepare(self, config, model):
        return with_default_targets(config, model, LORA_DEFAULT_TARGETS, "LoHa")

    def supported_sites(self):
        return ["nn.Linear", "transformers Conv1D", "nn.Conv1d", "nn.Conv2d (grouped too)"]

    def make_delta(self, config: LoHaConfig, path: str, module: nn.Module, adapter_name: str) -> Delta:
        check_site(module, config, "LoHa")
        r, alpha = config.rank_and_alpha(path)
        delta = LoHaDelta(module, bool(config.init_weights), effective=effective_conv(module, config), r=r, alpha=alpha,
                          rank_dropout=config.rank_dropout, module_dropout=config.module_dropout)
        return delta.to(adapter_dtype(module))
