"""LoKr: low-rank Kronecker product update (KronA / LyCORIS).

Edalati et al. 2022, "KronA: Parameter Efficient Tuning with Kronecker Adapter" (arXiv:2212.10650);
the LoKr form follows LyCORIS (Yeh et al. 2024, arXiv:2309.14859). Family: reparametrisation-based.

Equation: the dimensions are factorised, ``out = a * b`` and ``in = c * d`` (the kernel of a conv
folds into d), and::

    ΔW = s * W1 ⊗ W2,   W1: a x c,   W2: b x (d * kernel),   s = alpha / r
    W1 = lokr_w1            or  lokr_w1_a (a x r) @ lokr_w1_b (r x c)   when decompose_both and r < max(a, c)/2
    W2 = lokr_w2            or  lokr_w2_a (b x r) @ lokr_w2_b (r x d)   when r < max(b, d)/2
    y  = W x + ΔW x

    x ──► W ─────────────────► (+) ──► y
    └──► (W1 ⊗ W2) * s ────────┘

``factorization(n, f)`` picks (m, n/m) with m <= n/m as close to sqrt(n) (or to ``f`` when
``decompose_factor`` > 0 divides n) as possible: PEFT's rule, so shapes match its files.

Initialisation (``init_weights=True``, as in PEFT): W1 (or W1a) = 0, the rest Kaiming-uniform, so
ΔW = 0. ``"lycoris"``: W2 (or W2b) = 0 instead. False: all random (tests only).
Merging adds ΔW exactly. On disk: ``lokr_w1`` / ``lokr_w1_a`` / ``lokr_w1_b`` / ``lokr_w2`` /
``lokr_w2_a`` / ``lokr_w2_b`` as PEFT writes them. Sites as LoHa's (grouped convolutions
factor ``in/groups``).

``use_effective_conv2d=True`` on a convolution with a kernel larger than 1, when W2 is low-rank,
builds W2 from a CP-style core ``lokr_t2`` (r x r x k1 x k2; k x 1 for Conv1d) and
``lokr_w2_a`` (r x b), ``lokr_w2_b`` (r x d): ``W2[p, q, k, l] = Σ t2[i, j, k, l] a[i, p] b[j, q]``,
then ``ΔW = s * W1[:, :, None, None] ⊗ W2`` of shape (a*b, c*d, k1, k2), as PEFT does.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PeftType
from ..core.method import Delta, Method
from ..core.registry import register_method
from ..targets import LORA_DEFAULT_TARGETS
from ._shared import adapter_dtype, weight_2d, with_default_targets
from .loha import LycorisConfig, LycorisDelta, check_site, cp_weight, effective_conv


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n, m as close to sqrt(dimension) (or ``factor``) as allowed."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    limit = m + n  # fixed bound, as in PEFT, so both libraries pick the same shapes
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > limit or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@dataclasses.dataclass
class LoKrConfig(LycorisConfig):
    """Configuration of a LoKr adapter; see :class:`~peftkit.methods.loha.LycorisConfig` and:

    Args:
        decompose_both: also factor the left matrix W1 into a rank-r pair.
        decompose_factor: target size of the first factor (-1: near the square root).
        rank_dropout_scale: rescale rows kept by rank dropout by the kept fraction.
        init_weights: True, False or ``"lycoris"`` (which factor starts at zero).
    """

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    _init_choices: ClassVar[tuple] = (True, False, "lycoris")

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LOKR.value
        super().__post_init__()


class LoKrDelta(LycorisDelta):
    """LoKr at one layer: a Kronecker product of two (optionally low-rank) factors."""

    peft_names = {n: n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                 "lokr_t2")}

    def __init__(self, base: nn.Module, init: Any, decompose_both: bool, decompose_factor: int,
                 effective: bool = False, **kw: Any):
        super().__init__(base, **kw)
        w = base.weight
        out_dim = weight_2d(base).shape[0]
        in_dim = weight_2d(base).shape[1] // (math.prod(w.shape[2:]) if self.conv else 1)
        kernel = tuple(w.shape[2:]) if self.conv else ()
        a, b = factorization(out_dim, decompose_factor)
        c, d = factorization(in_dim, decompose_factor)
        r = self.r
        self.shape = (a, b, c, d, kernel)
        if decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, c))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        self.effective = effective and r < max(b, d) / 2  # PEFT: a full W2 wins over the CP form
        if self.effective:
            self.lokr_t2 = nn.Parameter(torch.empty(r, r, *(kernel + ((1,) if len(kernel) == 1 else ()))))
            self.lokr_w2_a = nn.Parameter(torch.empty(r, b))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d))
        elif r < max(b, d) / 2:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d * math.prod(kernel)))
        else:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *kernel))
        for p in self.parameters():
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        with torch.no_grad():
            if init is True:
                (self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a).zero_()
            elif init == "lycoris":
                (self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_b).zero_()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W1: a x c, W2: b x d*kernel) as matrices."""
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2.reshape(self.lokr_w2.shape[0], -1) if hasattr(self, "lokr_w2") else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def weight_2d_delta(self) -> torch.Tensor:
        if self.effective:  # (a, c) ⊗ (b, d, k1, k2) with W1 promoted to (a, c, 1, 1), as PEFT
            # spelled as an outer product: torch.kron views its inputs and fails on einsum's strides
            # for a k x 1 kernel (Conv1d), where PEFT 0.21.2 itself raises
            w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
            w2 = cp_weight(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
            w = torch.einsum("ij,pq...->ipjq...", w1, w2)
            return w.reshape(w1.shape[0] * w2.shape[0], -1) * self.scaling
        if hasattr(self, "lokr_w2") and self.lokr_w2.dim() == 3:
            # Conv1d with a full W2: PEFT takes kron(W1, W2) with W1 promoted to (1, a, c) and
            # reshapes the (b, a*d, c*k) result; following it keeps saved files meaning the same
            w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
            w = torch.kron(w1, self.lokr_w2)
            return w.reshape(self.shape[0] * self.shape[1], -1) * self.scaling
        # kron keeps the kernel positions of W2 innermost, matching the (out, in*kernel) view
        w1, w2 = self.factors()
        return torch.kron(w1, w2) * self.scaling


@register_method
class LoKrMethod(Method):
    """LoKr at Linear, Conv1D, Conv1d and Conv2d sites (grouped convolutions too)."""

    name = "LOKR"
    config_cls = LoKrConfig

    def prepare(self, config, model):
        return with_default_targets(config, model, LORA_DEFAULT_TARGETS, "LoKr")

    def supported_sites(self):
        return ["nn.Linear", "transformers Conv1D", "nn.Conv1d", "nn.Conv2d (grouped too)"]

    def make_delta(self, config: LoKrConfig, path: str, module: nn.Module, adapter_name: str) -> Delta:
        check_site(module, config, "LoKr")
        r, alpha = config.rank_and_alpha(path)
        delta = LoKrDelta(module, config.init_weights, config.decompose_both, config.decompose_factor,
                          effective=effective_conv(module, config), r=r, alpha=alpha, rank_dropout=config.rank_dropout,
                          module_dropout=config.module_dropout, rank_dropout_scale=config.rank_dropout_scale)
        return delta.to(adapter_dtype(module))
