"""AdaLoRA: adaptive budget allocation over an SVD-form low-rank update.

Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
(arXiv:2303.10512). Family: reparametrisation-based (Lialin et al. 2023, section 9).

Equation, for a frozen weight ``W`` (out x in)::

    y = W x + (alpha / (ranknum + 1e-5)) * P (Λ ⊙ Q) x,
        P = lora_B: out x r,   Λ = lora_E: r x 1 (the "singular values"),   Q = lora_A: r x in

    x ──► W ─────────────────────────────────────► (+) ──► y
    └──► dropout ─► Q (r) ─► ⊙ Λ ─► P ─► * alpha/ranknum ┘

``ranknum`` stays the initial rank ``init_r`` (Hugging Face PEFT's behaviour, so scales match).
Training adds the orthogonality regulariser ``orth_reg_weight * mean_i ||P_iᵀP_i - I||_F`` (and
the same for ``Q_i Q_iᵀ``) to the loss; here its gradient is added in backward by an identity
autograd function on P and Q (no loss term to remember), in training mode only.

Budgeted rank pruning (adalora_schedule.py): after each optimiser step the user calls
``model.base_model.update_and_allocate(step)``; importance scores (smoothed ``|w * grad|`` and
their uncertainty) rank every singular triplet across layers, and the lowest are masked to zero
so that the total rank follows a cubic schedule from ``init_r`` per layer down to ``target_r``
between ``tinit`` and ``total_step - tfinal``, every ``deltaT`` steps. The final mask is written
to ``config.rank_pattern`` (``"<module path>.lora_E": [bool] * init_r``); the saved tensors keep
only the surviving triplets, and loading builds each layer at its pruned rank, as PEFT does.

Initialisation: Λ = 0 (the update starts at zero), P and Q ~ N(0, 0.02²).
Merging adds the ΔW exactly. On disk: ``lora_A``, ``lora_B``, ``lora_E`` (no ``.weight``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, PeftType
from ..core.method import Delta, Method, UnsupportedSite
from ..core.registry import register_method
from ._shared import adapter_dtype, from_2d, linear_dims, with_default_targets
from .lora.config import LoraConfig

ADALORA_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"],
    "bert": ["query", "value"], "roberta": ["query", "key", "value", "dense"],
    "t5": ["q", "k", "v", "o", "wi", "wo"], "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "bloom": ["query_key_value"],
}


@dataclasses.dataclass
class AdaLoraConfig(LoraConfig):
    """Configuration of an AdaLoRA adapter (Hugging Face PEFT's fields and defaults).

    Beyond :class:`~peftkit.methods.lora.LoraConfig` (``lora_alpha``, ``lora_dropout``,
    ``target_modules``, ``fan_in_fan_out`` ...; ``r`` is unused, as in PEFT):

    Args:
        target_r: average rank per layer at the end of pruning.
        init_r: rank per layer at the start.
        tinit: steps of warm-up before pruning starts.
        tfinal: steps at the end during which the final mask is kept fixed.
        deltaT: prune every this many steps in between.
        beta1 / beta2: smoothing of the importance and its uncertainty.
        orth_reg_weight: weight of the orthogonality regulariser.
        total_step: length of training in steps (required).
        rank_pattern: the mask found by pruning (written by training; read when loading).
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict] = None

    def __post_init__(self) -> None:
        pattern, self.rank_pattern = self.rank_pattern, {}
        super().__post_init__()  # LoRA's checks (sets peft_type LORA; fixed below)
        self.peft_type = PeftType.ADALORA.value
        self.rank_pattern = pattern
        if self.use_dora:
            raise ConfigError("AdaLoRA does not support DoRA (use_dora=True); use LoraConfig for DoRA.")
        if self.bias != "none":
            raise ConfigError(f"AdaLoraConfig.bias={self.bias!r}: only 'none' is implemented in peftkit.")
        if self.init_lora_weights not in (True, False):
            raise ConfigError("AdaLoraConfig.init_lora_weights must be True or False (PiSSA/OLoRA "
                              "initialisations are LoRA-only).")
        if self.alpha_pattern:
            raise ConfigError("AdaLoraConfig.alpha_pattern is not used by AdaLoRA; remove it.")
        if self.total_step is None or self.total_step <= 0:
            raise ConfigError("AdaLoRA needs total_step (the number of training steps, > 0) to schedule "
                              "its rank budget.")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(f"AdaLoRA: tinit ({self.tinit}) must be below total_step - tfinal "
                              f"({self.total_step} - {self.tfinal}); there would be no pruning phase. "
                              "Lower tinit/tfinal or increase total_step.")
        for n in ("init_r", "target_r", "deltaT"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"AdaLoraConfig.{n} must be a positive integer, got {v!r}.")
        if self.target_r > self.init_r:
            raise ConfigError(f"AdaLoraConfig.target_r ({self.target_r}) cannot exceed init_r ({self.init_r}).")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ConfigError("AdaLoraConfig.beta1 and beta2 must lie strictly between 0 and 1.")
        if self.orth_reg_weight < 0:
            raise ConfigError("AdaLoraConfig.orth_reg_weight must be >= 0.")


class _OrthGrad(torch.autograd.Function):
    """Identity on a factor; backward adds ``w * d||G - I||_F`` (G = the factor's Gram matrix)."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, weight: float, rows: bool) -> torch.Tensor:
        ctx.save_for_backward(p)
        ctx.weight, ctx.rows = weight, rows
        return p.view_as(p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (p,) = ctx.saved_tensors
        with torch.no_grad():
            gram = p @ p.T if ctx.rows else p.T @ p  # Q Qᵀ for lora_A, Pᵀ P for lora_B
            m = gram - torch.eye(gram.shape[0], dtype=p.dtype, device=p.device)
            norm = torch.linalg.matrix_norm(m)
            if norm > 0:
                extra = (m @ p if ctx.rows else p @ m) * (2.0 * ctx.weight / norm)
                grad = grad + extra
        return grad, None, None


class AdaLoraDelta(Delta):
    """The SVD-form update at one linear layer."""

    lora_scaled = True
    mergeable = True
    peft_names = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E"}

    def __init__(self, in_features: int, out_features: int, r: int, init_r: int, lora_alpha: float,
                 dropout: float, init: bool):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(r, in_features))
        self.lora_E = nn.Parameter(torch.randn(r, 1))
        self.lora_B = nn.Parameter(torch.randn(out_features, r))
        if init:
            with torch.no_grad():
                self.lora_E.zero_()
                self.lora_A.normal_(0.0, 0.02)
                self.lora_B.normal_(0.0, 0.02)
        self.ranknum = float(init_r)
        self.scaling = lora_alpha if lora_alpha > 0 else float(init_r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.orth_weight = 0.0  # orth_reg_weight / number of factors, set by the Method
        self.mask: Optional[torch.Tensor] = None  # surviving triplets once pruning has started

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_A, self.lora_B
        if self.training and self.orth_weight > 0 and torch.is_grad_enabled() and a.requires_grad:
            a = _OrthGrad.apply(a, self.orth_weight, True)
            b = _OrthGrad.apply(b, self.orth_weight, False)
        return a, b

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        a, b = self._factors()
        h = F.linear(self.dropout(x), a * self.lora_E)
        return y + F.linear(h, b) * (self.scaling / (self.ranknum + 1e-5))

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        w2 = self.lora_B @ (self.lora_A * self.lora_E) * (self.scaling / (self.ranknum + 1e-5))
        return from_2d(w2, base).to(base.weight.dtype)

    def _pruned(self) -> bool:
        return self.mask is not None and not bool(self.mask.all())

    def peft_state(self) -> dict[str, torch.Tensor]:
        """PEFT keeps only the surviving triplets in its files once a mask exists."""
        if not self._pruned():
            return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}
        keep = self.mask
        return {"lora_A": self.lora_A[keep], "lora_B": self.lora_B[:, keep], "lora_E": self.lora_E[keep]}

    def local_name(self, peft_suffix: str) -> str:
        # while pruned, the saved tensors are slices, not the (full-size) parameters themselves;
        # loading always builds a fresh layer at the pruned rank, which has no mask
        return "pruned:" + peft_suffix if self._pruned() else peft_suffix


@register_method
class AdaLoraMethod(Method):
    """AdaLoRA at Linear and Conv1D sites, with the rank schedule of adalora_schedule.py."""

    name = "ADALORA"
    config_cls = AdaLoraConfig

    def prepare(self, config, model):
        return with_default_targets(config, model, ADALORA_TARGETS, "AdaLoRA")

    def supported_sites(self):
        return ["nn.Linear", "transformers Conv1D"]

    def make_delta(self, config: AdaLoraConfig, path: str, module: nn.Module, adapter_name: str) -> Delta:
        dims = linear_dims(module)
        if dims is None:
            raise UnsupportedSite(f"layer type {type(module).__name__} is not supported by AdaLoRA.")
        r = config.init_r
        mask = (config.rank_pattern or {}).get(f"{path}.lora_E")
        if mask is not None:  # a pruned adapter being loaded: build the layer at its final rank
            if len(mask) != config.init_r:
                raise ConfigError(f"AdaLoRA rank_pattern for {path} has {len(mask)} entries; init_r is "
                                  f"{config.init_r}. The config does not belong to this adapter.")
            r = int(sum(bool(m) for m in mask))
        delta = AdaLoraDelta(dims[0], dims[1], r, config.init_r, config.lora_alpha,
                             float(config.lora_dropout), bool(config.init_lora_weights))
        return delta.to(adapter_dtype(module))

    def after_inject(self, host, config: AdaLoraConfig, adapter_name: str) -> None:
        from .adalora_schedule import adapter_deltas

        deltas = adapter_deltas(host, adapter_name)
        for _, d in deltas:
            d.orth_weight = config.orth_reg_weight / (2 * len(deltas))

    def host_api(self) -> dict[str, Any]:
        from .adalora_schedule import orth_regularization, update_and_allocate

        return {"update_and_allocate": update_and_allocate, "orth_regularization": orth_regularization}
