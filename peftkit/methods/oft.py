"""OFT: orthogonal fine-tuning with a block-diagonal rotation of each layer's input space.

Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning" (arXiv:2306.07280).
Family: reparametrisation-based (the weight is multiplied by a learned orthogonal matrix, which
keeps the angles between its neurons, the paper's "hyperspherical energy").

Equation, for a frozen layer ``y = W x + b`` with ``W: out x in`` (a Conv2d's kernel flattened
to ``out x (C kh kw)``)::

    R   = diag(R_1, ..., R_n),    R_i = Cayley(S_i): b x b,    n * b = in
    S_i = skew-symmetric, from the b(b-1)/2 numbers of row i of ``oft_R`` (its strict upper triangle)
    Cayley(S) = (I - S)(I + S)^-1                     (use_cayley_neumann=False: exact, orthogonal)
              ~ I + 2S + 2S^2 + ... + 2S^(k-2) + S^(k-1)   (True, k = num_cayley_neumann_terms)
    W'  = W R^T,   y = W' x + b = W (R^T x) + b

    x ──► [x_1 .. x_n] ──► x_i R_i (each b-sized slice) ──► W ──► y      (nn.Linear: the input rotates)
    oft_R: (n, b(b-1)/2)      block_share=True: (1, b(b-1)/2), one R_1 for every slice

Options: ``r`` (number of blocks) or ``oft_block_size`` (block size), exactly one non-zero, as in
Hugging Face PEFT; a value that does not divide the layer's input is moved to the nearest divisor
(with a warning), as PEFT does, so both libraries build the same shapes. ``coft`` (constrained
OFT) keeps each ``S_i`` within a Frobenius ball of radius ``eps / sqrt(n)`` by projecting the
parameter in place before each use. ``module_dropout`` replaces ``int(p * n)`` random blocks by the
identity in a training step (PEFT 0.21 builds this layer but never calls it: there the option has
no effect). ``bias``: ``"none"``, ``"all"`` or ``"oft_only"`` (train the biases of the targets).

Initialisation: ``oft_R = 0`` so ``R = I`` and the model starts at the base; ``init_weights=False``
draws ``N(0, 0.1)`` (tests only). Merging is exact and multiplicative: ``W <- W R^T`` (an
embedding's table ``E <- E R``); unmerging multiplies by the inverse of each block.

Sites: nn.Linear (input rotated before the base runs), nn.Embedding (output rotated: ``e' = e R``),
nn.Conv2d with a square kernel (the rotated kernel ``W R^T`` is convolved; for kernels larger than
1x1 this is PEFT's merged result: PEFT 0.21's unmerged Conv2d forward rotates overlapping input
patches and sums them back, which changes the output even at initialisation). On disk:
``<module>.oft_R.weight`` (``oft_embedding_R.weight`` for embeddings), exactly as PEFT writes it.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Optional, Union

import torch
from torch import nn

from ..config import ConfigError, PeftConfig, PeftType
from ..core.method import Delta, Method, UnsupportedSite, init_skipped, new_parameter
from ..core.registry import register_method
from ..targets import LORA_DEFAULT_TARGETS
from ._shared import (adapter_dtype, check_layers, check_probability, is_conv1d_gpt2, normalise_targets,
                      with_default_targets)


@dataclasses.dataclass
class OFTConfig(PeftConfig):
    """Configuration of an OFT adapter (Hugging Face PEFT 0.21's fields and defaults).

    Args:
        r: number of blocks per layer; 0 to give ``oft_block_size`` instead (exactly one is non-zero).
        oft_block_size: size b of each block (default 32).
        module_dropout: share of blocks set to the identity in a training step.
        target_modules / exclude_modules: as in LoraConfig; None picks the model family's default.
        fan_in_fan_out: accepted for PEFT's files; nn.Linear stores (out, in), so it is ignored there.
        bias: ``"none"``, ``"all"`` or ``"oft_only"`` (biases of the targeted layers are trained).
        init_weights: True starts at the identity rotation; False draws random blocks (tests).
        layers_to_transform / layers_pattern: restrict to these layer indices.
        modules_to_save: modules trained in full and saved with the adapter.
        coft: constrained OFT (each block kept within ``eps`` of the identity).
        eps: COFT's radius (only used with ``coft=True``).
        block_share: one block shared by all slices of a layer.
        use_cayley_neumann: the truncated Neumann series instead of the exact inverse.
        num_cayley_neumann_terms: terms of that series.
    """

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: Optional[Union[list[str], str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        self.peft_type = PeftType.OFT.value
        super().__post_init__()
        normalise_targets(self)
        name = type(self).__name__
        for field in ("r", "oft_block_size"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}.{field} must be a non-negative integer, got {v!r}.")
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(
                f"{name}: give exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}) as "
                "non-zero (r x oft_block_size = the layer's input size); e.g. oft_block_size=0 with r=8 "
                "(on the command line: --r 8 --set oft_block_size=0).")
        check_probability(self, "module_dropout")
        if self.bias not in ("none", "all", "oft_only"):
            raise ConfigError(f"{name}.bias must be 'none', 'all' or 'oft_only', got {self.bias!r}.")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ConfigError(f"{name}.eps (COFT's radius) must be a positive number, got {self.eps!r}.")
        v = self.num_cayley_neumann_terms
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}.num_cayley_neumann_terms must be a positive integer, got {v!r}.")
        if self.init_weights not in (True, False):
            raise ConfigError(f"{name}.init_weights must be true or false, got {self.init_weights!r}.")
        check_layers(self)

    def to_dict(self) -> dict[str, Any]:
        """PEFT's fields, plus ``peft_version``: PEFT reads a file without it as written before 0.18,
        whose Cayley-Neumann series differed, and warns; the series here is 0.18's and later."""
        return {**super().to_dict(), "peft_version": NEUMANN_FORMAT}


#: The Hugging Face PEFT release whose OFT files (Cayley-Neumann series included) this module writes.
NEUMANN_FORMAT = "0.21.2"


# ----- the rotation's math (shared with BOFT) -----------------------------------------------
def cayley(skew: torch.Tensor, neumann_terms: int = 0) -> torch.Tensor:
    """Orthogonal ``(I - S)(I + S)^-1`` of a batch of skew-symmetric ``S`` (..., b, b).

    ``neumann_terms > 0`` gives Hugging Face PEFT's truncated series instead (not exactly
    orthogonal): ``I + 2S + ... + 2S^(k-2) + S^(k-1)``, where k = 3 and k = 4 both stop at S^3.
    """
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).expand_as(skew)
    if not neumann_terms:
        # X (I + S) = I - S; I - S and (I + S)^-1 commute, so X is the Cayley transform
        return torch.linalg.solve(eye + skew, eye - skew, left=False)
    out = eye.clone()
    if neumann_terms == 1:
        return out
    out = out + 2 * skew
    if neumann_terms == 2:
        return out
    last = max(2, neumann_terms - 2)  # powers 1..last weigh 2, power last + 1 weighs 1
    power = skew
    for _ in range(2, last + 1):
        power = power @ skew
        out = out + 2 * power
    return out + power @ skew


def closest_divisor(n: int, value: int) -> int:
    """The divisor of ``n`` nearest to ``value`` (ties: the smaller; ``n`` when value >= n): PEFT's rule."""
    if value >= n:
        return n
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - value), d))


def identity_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """``blocks`` (n, b, b) with ``int(p * n)`` of them, drawn at random, replaced by the identity."""
    n, b = blocks.shape[0], blocks.shape[-1]
    k = int(p * n)
    if k == 0:
        return blocks
    drop = torch.zeros(n, device=blocks.device, dtype=blocks.dtype)
    drop[torch.randperm(n, device=blocks.device)[:k]] = 1
    drop = drop.view(n, 1, 1)
    eye = torch.eye(b, device=blocks.device, dtype=blocks.dtype)
    return (1 - drop) * blocks + drop * eye


def square_kernel(module: nn.Conv2d, method: str) -> int:
    """The kernel size k of a Conv2d PEFT can adapt (square kernel, no groups), else UnsupportedSite."""
    kh, kw = module.kernel_size
    if kh != kw:
        raise UnsupportedSite(f"Conv2d with a non-square kernel {module.kernel_size} is not supported by "
                              f"{method} (Hugging Face PEFT sizes the rotation as in_channels * k * k).")
    if module.groups != 1:
        raise UnsupportedSite(f"grouped convolution (groups={module.groups}) is not supported by {method}.")
    return kh


def train_biases(host: nn.Module, config: Any, adapter_name: str) -> None:
    """``bias="all"``: every bias of the model trains with the adapter; ``"oft_only"`` /
    ``"boft_only"``: the biases of the layers this adapter targets. They are saved with it."""
    if config.bias == "none":
        return
    names = set()
    for pname, _ in host.model.named_parameters():
        if not pname.endswith("bias") or ".deltas." in pname:
            continue
        if pname.endswith(".base_layer.bias"):
            site = host.model.get_submodule(pname[: -len(".base_layer.bias")])
            if any(d.replaces_base for d in getattr(site, "deltas", {}).values()):
                continue  # a modules_to_save copy holds its own bias
            if config.bias == "all" or adapter_name in getattr(site, "deltas", {}):
                names.add(pname)
        elif config.bias == "all":
            names.add(pname)
    host.trainable_base[adapter_name] = names


def trained_biases(host: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The base biases :func:`train_biases` made trainable, keyed by their path in the model."""
    return {n: host.model.get_parameter(n) for n in sorted(host.trainable_base.get(adapter_name, ()))}


# ----- Deltas -------------------------------------------------------------------------------
class OFTDelta(Delta):
    """The block rotation shared by OFT's layer types; subclasses say where it is applied."""

    mergeable = True
    #: local parameter name (its PEFT suffix adds ``.weight``)
    param_name = "oft_R"

    def __init__(self, dim: int, r: int, block_size: int, config: OFTConfig):
        super().__init__()
        self.dim, self.r, self.block_size = dim, r, block_size
        self.coft, self.eps = config.coft, float(config.eps)
        self.block_share = config.block_share
        self.neumann_terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else 0
        self.module_dropout = float(config.module_dropout)
        stored = 1 if self.block_share else r
        param = new_parameter(stored, block_size * (block_size - 1) // 2)
        setattr(self, self.param_name, param)
        if not init_skipped():
            with torch.no_grad():
                if config.init_weights:
                    param.zero_()
                else:
                    param.normal_(0.0, 0.1)
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("upper", rows * block_size + cols, persistent=False)

    @property
    def vector(self) -> nn.Parameter:
        """The stored parameter: one row of b(b-1)/2 numbers per block."""
        return getattr(self, self.param_name)

    def _project(self) -> None:
        """COFT: pull each block's skew matrix back into the ball of radius eps / sqrt(blocks)."""
        with torch.no_grad():
            v = self.vector
            radius = self.eps / math.sqrt(v.shape[0])
            norm = v.norm(dim=1, keepdim=True) * math.sqrt(2.0)  # Frobenius norm of S = v - v^T
            v.copy_(torch.where(norm <= radius, v, v * (radius / norm)))

    def blocks(self, dtype: Optional[torch.dtype] = None, dropout: bool = False) -> torch.Tensor:
        """The r rotation blocks (r, b, b), in ``dtype`` (the parameter's by default); ``dropout``:
        in training mode, apply ``module_dropout`` (forward passes only, never merges)."""
        if self.coft:
            self._project()
        v = self.vector if dtype is None else self.vector.to(dtype)
        b = self.block_size
        flat = v.new_zeros(v.shape[0], b * b).index_copy(1, self.upper, v)
        upper = flat.view(-1, b, b)
        rot = cayley(upper - upper.transpose(1, 2), self.neumann_terms)
        if dropout and self.training and self.module_dropout and rot.shape[0] > 1:
            rot = identity_dropout(rot, self.module_dropout)
        return rot.expand(self.r, b, b) if self.block_share else rot

    def rotate_rows(self, t: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``t @ R`` for row vectors ``t`` (..., dim): each b-sized slice times its block."""
        shape = t.shape
        out = torch.einsum("...rk,rkc->...rc", t.reshape(*shape[:-1], self.r, self.block_size), blocks)
        return out.reshape(shape)

    def _rotated_2d(self, w2: torch.Tensor, inverse: bool = False, dropout: bool = False) -> torch.Tensor:
        """``w2 R^T`` (or ``w2 R^-T``) for an (out, dim) matrix, in fp32 at least."""
        work = torch.promote_types(w2.dtype, torch.float32)
        blocks = self.blocks(work, dropout)
        if inverse:
            blocks = torch.linalg.inv(blocks.double()).to(work)
        return self.rotate_rows(w2.to(work), blocks.transpose(1, 2))

    def _weight_2d(self, base: nn.Module) -> torch.Tensor:
        return base.weight.reshape(base.weight.shape[0], -1)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        w = base.weight
        w.copy_(self._rotated_2d(self._weight_2d(base)).reshape(w.shape).to(w.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        w = base.weight
        w.copy_(self._rotated_2d(self._weight_2d(base), inverse=True).reshape(w.shape).to(w.dtype))


class OFTLinear(OFTDelta):
    """OFT at an nn.Linear: the input is rotated, then the frozen layer runs on it."""

    transforms_input = True
    peft_names = {"oft_R": "oft_R.weight"}

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotate_rows(x, self.blocks(dropout=True))

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return y  # the Site already ran the base layer on transform_input(x)


class OFTConv2d(OFTDelta):
    """OFT at an nn.Conv2d: the flattened kernel (out, C k k) is rotated, ``W' = W R^T``."""

    peft_names = {"oft_R": "oft_R.weight"}

    def rotated_weight(self, base: nn.Conv2d, dtype: torch.dtype) -> torch.Tensor:
        """``W R^T`` in the layer's kernel shape, in ``dtype`` (gradients reach ``oft_R``)."""
        w = base.weight
        return self._rotated_2d(self._weight_2d(base), dropout=True).reshape(w.shape).to(dtype)

    def forward_whole(self, x: torch.Tensor, base: nn.Conv2d) -> Optional[torch.Tensor]:
        """The whole output in one convolution with the rotated kernel (the Site's single-adapter path)."""
        return base._conv_forward(x, self.rotated_weight(base, base.weight.dtype), base.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        # with other adapters active: add the convolution with (W R^T - W)
        change = self.rotated_weight(base, x.dtype) - base.weight.to(x.dtype)
        return y + base._conv_forward(x, change, None).to(y.dtype)


class OFTEmbedding(OFTDelta):
    """OFT at an nn.Embedding: each looked-up vector is rotated, ``e' = e R``."""

    param_name = "oft_embedding_R"
    peft_names = {"oft_embedding_R": "oft_embedding_R.weight"}

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        blocks = self.blocks(dropout=True)
        return self.rotate_rows(y.to(blocks.dtype), blocks)

    def _rotated_2d(self, w2: torch.Tensor, inverse: bool = False, dropout: bool = False) -> torch.Tensor:
        work = torch.promote_types(w2.dtype, torch.float32)
        blocks = self.blocks(work, dropout)
        if inverse:
            blocks = torch.linalg.inv(blocks.double()).to(work)
        return self.rotate_rows(w2.to(work), blocks)  # the table's rows are outputs: E R


def block_layout(dim: int, r: int, block_size: int, where: str) -> tuple[int, int]:
    """(r, b) for a layer whose rotated dimension is ``dim``, following PEFT's adjustment."""
    if r == 0:
        b = block_size
        if dim % b:
            b = closest_divisor(dim, b)
            warnings.warn(f"{where}: oft_block_size {block_size} does not divide {dim}; using {b} "
                          "(as Hugging Face PEFT does).", stacklevel=4)
        return dim // b, b
    if dim % r or r > dim:
        old, r = r, closest_divisor(dim, r)
        warnings.warn(f"{where}: r {old} does not divide {dim}; using {r} (as Hugging Face PEFT does).",
                      stacklevel=4)
    return r, dim // r


@register_method
class OFTMethod(Method):
    """OFT at nn.Linear, nn.Embedding and nn.Conv2d sites (Hugging Face PEFT's set)."""

    name = "OFT"
    config_cls = OFTConfig

    def prepare(self, config, model):
        return with_default_targets(config, model, LORA_DEFAULT_TARGETS, "OFT")

    def supported_sites(self):
        return ["nn.Linear", "nn.Embedding", "nn.Conv2d (square kernel, dilation 1)"]

    def make_delta(self, config: OFTConfig, path: str, module: nn.Module, adapter_name: str) -> Delta:
        if is_conv1d_gpt2(module):
            raise UnsupportedSite("transformers' Conv1D is not supported by OFT (nor by Hugging Face PEFT).")
        if isinstance(module, nn.Linear):
            cls, dim = OFTLinear, module.in_features
        elif isinstance(module, nn.Embedding):
            cls, dim = OFTEmbedding, module.embedding_dim
        elif isinstance(module, nn.Conv2d):
            k = square_kernel(module, "OFT")
            if module.dilation[0] > 1 or module.dilation[1] > 1:
                raise UnsupportedSite("Conv2d with dilation > 1 is not supported by OFT (nor by Hugging Face PEFT).")
            cls, dim = OFTConv2d, module.in_channels * k * k
        else:
            raise UnsupportedSite(f"layer type {type(module).__name__} is not supported by OFT.")
        r, b = block_layout(dim, config.r, config.oft_block_size, path)
        return cls(dim, r, b, config).to(adapter_dtype(module))

    def after_inject(self, host, config: OFTConfig, adapter_name: str) -> None:
        train_biases(host, config, adapter_name)

    def extra_state(self, host, config, adapter_name):
        return trained_biases(host, adapter_name)
