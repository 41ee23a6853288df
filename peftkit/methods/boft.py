"""BOFT: orthogonal fine-tuning with a butterfly product of block-diagonal rotations.

Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization" (ICLR 2024,
arXiv:2311.06243). Family: reparametrisation-based. With one butterfly factor BOFT is OFT with exact
Cayley blocks plus a learned output scale; more factors let few small blocks mix the whole input.

Equation, for a frozen layer ``y = W x + b``, ``W: out x d`` (a Conv2d's kernel flattened to
``out x (C k k)``), m = ``boft_n_butterfly_factor`` factors of D blocks of size b (D * b = d)::

    B_j = diag(Q_j1, ..., Q_jD),   Q_ji = (I - S_ji)(I + S_ji)^-1,   S_ji = (A_ji - A_ji^T) / 2
    M_j = P_j B_j P_j^T            (P_j: the j-th butterfly permutation; P_0 = I)
    R   = M_(m-1) ... M_1 M_0      (orthogonal, d x d)
    W'  = diag(s) W R^T,           y = s ⊙ (W R^T x) + b      (the bias is not scaled)

    x ──► x R (m sparse factors) ──► W ──► (-b) ⊙ s (+b) ──► y        (nn.Linear)
    boft_R: (m, D, b, b) = A,   boft_s: (out, 1) for Linear, (1, out) for Conv2d

The butterfly permutation of factor j cuts the input into groups of ``b * 2^j`` and each group
into ``2^(j+1)`` halves of blocks (b / 2 values); it puts the even-numbered halves first, then the
odd-numbered ones, so that after j factors each output mixes ``b * 2^j`` inputs. Shapes and
permutations follow Hugging Face PEFT, whose files load here and back unchanged.

Initialisation: ``A = 0`` (R = I), ``s = 1``: the model starts at the base. ``init_weights=False``:
``A ~ N(0, 0.1)``, ``s ~ N(1, 0.1)`` (tests only). ``boft_dropout`` (training only) picks one factor
at random and replaces ``int(p * D)`` of its blocks by the identity, as PEFT does.
Merging is exact: ``W <- diag(s) W R^T``; unmerging divides by s and multiplies by ``R^-T`` (each
block inverted). On disk: ``<module>.boft_R`` and ``<module>.boft_s``.

Differences from PEFT 0.21, stated: PEFT needs its CUDA extension for more than one butterfly
factor and otherwise silently trains with one (its file then holds ``boft_R`` of shape (1, D, b, b)
whatever the config says); peftkit computes every factor on any device. PEFT's unmerged Conv2d
forward ignores the layer's dilation; peftkit convolves the rotated kernel with the layer's own
settings (PEFT's merged result). With several BOFT adapters active at once PEFT applies the last
one's rotation to the input first; peftkit applies them in activation order.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch
from torch import nn

from ..config import ConfigError, PeftConfig, PeftType
from ..core.method import Delta, Method, UnsupportedSite, init_skipped, new_parameter
from ..core.registry import register_method
from ..targets import LORA_DEFAULT_TARGETS
from ._shared import adapter_dtype, check_layers, check_probability, is_conv1d_gpt2, normalise_targets, with_default_targets
from .oft import cayley, identity_dropout, square_kernel, train_biases, trained_biases


@dataclasses.dataclass
class BOFTConfig(PeftConfig):
    """Configuration of a BOFT adapter (Hugging Face PEFT 0.21's fields and defaults).

    Args:
        boft_block_size: size b of each block (default 4); 0 to give ``boft_block_num`` instead.
        boft_block_num: blocks D per factor; exactly one of the two is non-zero (D * b = input size).
        boft_n_butterfly_factor: butterfly factors m (1: OFT with a scale).
        target_modules / exclude_modules: as in LoraConfig; None picks the model family's default.
        boft_dropout: share of one factor's blocks set to the identity in a training step.
        fan_in_fan_out: accepted for PEFT's files; nn.Linear stores (out, in), so it is ignored.
        bias: ``"none"``, ``"all"`` or ``"boft_only"`` (biases of the targeted layers train).
        modules_to_save: modules trained in full and saved with the adapter.
        init_weights: True starts at the identity; False draws random blocks and scales (tests).
        layers_to_transform / layers_pattern: restrict to these layer indices.
    """

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.BOFT.value
        super().__post_init__()
        normalise_targets(self)
        name = type(self).__name__
        for field in ("boft_block_size", "boft_block_num"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}.{field} must be a non-negative integer, got {v!r}.")
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ConfigError(
                f"{name}: give exactly one of boft_block_size ({self.boft_block_size}) and boft_block_num "
                f"({self.boft_block_num}) as non-zero (block size x block count = the layer's input size); "
                "e.g. boft_block_size=0 with boft_block_num=8.")
        v = self.boft_n_butterfly_factor
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}.boft_n_butterfly_factor must be a positive integer (1: no butterfly), got {v!r}.")
        check_probability(self, "boft_dropout")
        if self.bias not in ("none", "all", "boft_only"):
            raise ConfigError(f"{name}.bias must be 'none', 'all' or 'boft_only', got {self.bias!r}.")
        if self.init_weights not in (True, False):
            raise ConfigError(f"{name}.init_weights must be true or false, got {self.init_weights!r}.")
        check_layers(self)


def butterfly_permutation(dim: int, block_size: int, factor: int) -> torch.Tensor:
    """Indices ``p`` (dim,) of factor ``factor``'s permutation: ``(P v)[i] = v[p[i]]``.

    Each group of ``block_size * 2^factor`` entries is cut into halves of blocks; the even-numbered
    halves come first, then the odd-numbered ones. Factor 0 is the identity.
    """
    if factor == 0:
        return torch.arange(dim)
    half = block_size // 2
    group = block_size * 2 ** factor
    halves = group // half
    order = list(range(0, halves, 2)) + list(range(1, halves, 2))
    within = torch.tensor([h * half + t for h in order for t in range(half)], dtype=torch.long)
    return torch.cat([g + within for g in range(0, dim, group)])


def block_layout(dim: int, config: BOFTConfig, where: str) -> tuple[int, int]:
    """(D, b) for a layer whose rotated dimension is ``dim``; PEFT's checks, with clearer words."""
    extra = config.boft_n_butterfly_factor - 1  # butterfly factors beyond the first
    hint = f"{where}: BOFT over a dimension of {dim}"
    if config.boft_block_size == 0:
        num = config.boft_block_num
        if dim % num:
            raise ConfigError(f"{hint}: boft_block_num {num} must divide {dim}.")
        if extra and (extra > int(math.log2(num)) or num % 2 ** extra):
            raise ConfigError(f"{hint}: boft_block_num {num} must be a multiple of 2^{extra} for "
                              f"boft_n_butterfly_factor {extra + 1}.")
        size = dim // num
    else:
        size = config.boft_block_size
        if dim % size:
            raise ConfigError(f"{hint}: boft_block_size {size} must divide {dim}.")
        if extra and dim % (size * 2 ** extra):
            raise ConfigError(f"{hint}: boft_block_size x 2^(boft_n_butterfly_factor - 1) = {size * 2 ** extra} "
                              f"must divide {dim}.")
        num = dim // size
    if extra and (num % 2 or size % 2):
        raise ConfigError(f"{hint}: with butterfly factors the block count ({num}) and block size ({size}) "
                          "must both be even.")
    return num, size


class BOFTDelta(Delta):
    """The butterfly rotation and output scale shared by BOFT's layer types."""

    mergeable = True
    peft_names = {"boft_R": "boft_R", "boft_s": "boft_s"}

    def __init__(self, dim: int, out_features: int, num: int, size: int, config: BOFTConfig, scale_shape):
        super().__init__()
        self.dim, self.num, self.size = dim, num, size
        self.factors = config.boft_n_butterfly_factor
        self.dropout = float(config.boft_dropout)
        self.boft_R = new_parameter(self.factors, num, size, size)
        self.boft_s = new_parameter(*scale_shape)
        if not init_skipped():
            with torch.no_grad():
                if config.init_weights:
                    self.boft_R.zero_()
                    self.boft_s.fill_(1.0)
                else:
                    self.boft_R.normal_(0.0, 0.1)
                    self.boft_s.normal_(1.0, 0.1)
        perms = torch.stack([butterfly_permutation(dim, size, j) for j in range(self.factors)])
        self.register_buffer("perm", perms, persistent=False)
        self.register_buffer("inverse_perm", torch.argsort(perms, dim=1), persistent=False)

    def blocks(self, dtype: Optional[torch.dtype] = None, dropout: bool = False) -> torch.Tensor:
        """The orthogonal blocks Q (m, D, b, b), in ``dtype`` (the parameter's by default)."""
        a = self.boft_R if dtype is None else self.boft_R.to(dtype)
        q = cayley(0.5 * (a - a.transpose(-1, -2)))
        if dropout and self.training and self.dropout:
            j = int(torch.randint(0, self.factors, (1,)).item())
            q = torch.cat([q[:j], identity_dropout(q[j], self.dropout)[None], q[j + 1:]])
        return q

    def apply_rows(self, t: torch.Tensor, blocks: torch.Tensor, reverse: bool) -> torch.Tensor:
        """Row vectors ``t`` (..., dim) times ``P_j blocks_j P_j^T`` for each factor j, ascending
        (``reverse=False``) or descending. ``x R`` is ``apply_rows(x, Q, reverse=True)``."""
        shape = t.shape
        order = range(self.factors - 1, -1, -1) if reverse else range(self.factors)
        for j in order:
            t = t.index_select(-1, self.inverse_perm[j])  # t P_j
            t = torch.einsum("...dk,dkc->...dc", t.reshape(*shape[:-1], self.num, self.size), blocks[j])
            t = t.reshape(shape).index_select(-1, self.perm[j])  # ... P_j^T
        return t

    def _scale_rows(self) -> torch.Tensor:
        """s as an (out, 1) column whatever its stored layout."""
        return self.boft_s.reshape(-1, 1)

    def _merged_2d(self, w2: torch.Tensor, dropout: bool = False) -> torch.Tensor:
        """``diag(s) W R^T`` for the (out, dim) weight, in fp32 at least."""
        work = torch.promote_types(w2.dtype, torch.float32)
        blocks = self.blocks(work, dropout)
        return self.apply_rows(w2.to(work), blocks.transpose(-1, -2), reverse=False) * self._scale_rows().to(work)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        w = base.weight
        w.copy_(self._merged_2d(w.reshape(w.shape[0], -1)).reshape(w.shape).to(w.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        w = base.weight
        work = torch.promote_types(w.dtype, torch.float32)
        if (self.boft_s == 0).any():
            raise ValueError("a BOFT scale boft_s has exact zeros, so its merge cannot be undone; "
                             "reload the base weights instead of unmerging.")
        inv = torch.linalg.inv(self.blocks(torch.float64)).to(work)
        w2 = w.reshape(w.shape[0], -1).to(work) / self._scale_rows().to(work)
        # W R^-T = W M_(m-1)^-T ... M_0^-T, with M_j^-T = P_j Q_j^-T P_j^T
        w.copy_(self.apply_rows(w2, inv.transpose(-1, -2), reverse=True).reshape(w.shape).to(w.dtype))


class BOFTLinear(BOFTDelta):
    """BOFT at an nn.Linear: the input is rotated, the layer runs, its output (less bias) is scaled."""

    transforms_input = True

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_rows(x, self.blocks(dropout=True), reverse=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        s = self.boft_s.reshape(-1).to(y.dtype)
        bias = getattr(base, "bias", None)
        if bias is None:
            return y * s
        bias = bias.to(y.dtype)
        return (y - bias) * s + bias


class BOFTConv2d(BOFTDelta):
    """BOFT at an nn.Conv2d: the flattened kernel becomes ``diag(s) W R^T``."""

    def rotated_weight(self, base: nn.Conv2d, dtype: torch.dtype) -> torch.Tensor:
        """``diag(s) W R^T`` in the kernel's shape and ``dtype`` (gradients reach boft_R and boft_s)."""
        w = base.weight
        return self._merged_2d(w.reshape(w.shape[0], -1), dropout=True).reshape(w.shape).to(dtype)

    def forward_whole(self, x: torch.Tensor, base: nn.Conv2d) -> Optional[torch.Tensor]:
        """The whole output in one convolution with the adapted kernel (the Site's single-adapter path)."""
        return base._conv_forward(x, self.rotated_weight(base, base.weight.dtype), base.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        change = self.rotated_weight(base, x.dtype) - base.weight.to(x.dtype)
        return y + base._conv_forward(x, change, None).to(y.dtype)


@register_method
class BOFTMethod(Method):
    """BOFT at nn.Linear and nn.Conv2d sites (Hugging Face PEFT's set)."""

    name = "BOFT"
    config_cls = BOFTConfig

    def prepare(self, config, model):
        return with_default_targets(config, model, LORA_DEFAULT_TARGETS, "BOFT")

    def supported_sites(self):
        return ["nn.Linear", "nn.Conv2d (square kernel)"]

    def make_delta(self, config: BOFTConfig, path: str, module: nn.Module, adapter_name: str) -> Delta:
        if is_conv1d_gpt2(module):
            raise UnsupportedSite("transformers' Conv1D is not supported by BOFT (nor by Hugging Face PEFT).")
        if isinstance(module, nn.Linear):
            dim, out = module.in_features, module.out_features
            num, size = block_layout(dim, config, path)
            delta: BOFTDelta = BOFTLinear(dim, out, num, size, config, (out, 1))
        elif isinstance(module, nn.Conv2d):
            k = square_kernel(module, "BOFT")
            dim, out = module.in_channels * k * k, module.out_channels
            num, size = block_layout(dim, config, path)
            delta = BOFTConv2d(dim, out, num, size, config, (1, out))
        else:
            raise UnsupportedSite(f"layer type {type(module).__name__} is not supported by BOFT.")
        return delta.to(adapter_dtype(module))

    def after_inject(self, host, config: BOFTConfig, adapter_name: str) -> None:
        train_biases(host, config, adapter_name)

    def extra_state(self, host, config, adapter_name):
        return trained_biases(host, adapter_name)
