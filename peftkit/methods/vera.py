"""VeRA: Vector-based Random Matrix Adaptation.

Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation" (arXiv:2310.11454).
Family: reparametrisation-based (a LoRA whose factors are frozen, random and shared).

Equation: one pair of frozen random matrices ``A`` (r x in_max) and ``B`` (out_max x r) is shared
by every adapted layer; each layer slices them to its size and learns only two vectors::

    y = W x + Λb B[:out] Λd A[:, :in] x,     Λd = diag(lambda_d) (r),  Λb = diag(lambda_b) (out)

    x ──► W ──────────────────────────────────────────► (+) ──► y
    └──► dropout ─► A[:, :in] ─► ⊙ λd ─► B[:out] ─► ⊙ λb ─┘

Initialisation: ``A`` and ``B`` are Kaiming-uniform draws from ``torch.Generator`` seeded with
``projection_prng_key`` (A first, then B, on the CPU: PEFT's order, so the same key gives the
same matrices in both libraries); ``lambda_b = 0`` and ``lambda_d = d_initial`` so the update
starts at zero. ``init_weights=False``: ``lambda_b = 1``, ``lambda_d ~ N(0, 1)`` (tests only).

Saving (PEFT's ``save_projection``): True writes ``A`` and ``B`` as ``base_model.vera_A`` /
``base_model.vera_B`` next to the per-layer ``vera_lambda_b`` / ``vera_lambda_d``; False writes
only the vectors, and loading regenerates ``A`` and ``B`` from the key. Mergeable: the update
is a plain ΔW.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, PeftConfig, PeftType
from ..core.inject import iter_candidates
from ..core.method import Delta, Method, UnsupportedSite
from ..core.registry import register_method
from ..core.site import Site
from ..targets import LORA_DEFAULT_TARGETS
from ._shared import (adapter_dtype, check_layers, check_positive_int, check_probability, from_2d,
                      linear_dims, normalise_targets, with_default_targets)

PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")


@dataclasses.dataclass
class VeraConfig(PeftConfig):
    """Configuration of a VeRA adapter (Hugging Face PEFT's fields and defaults).

    Args:
        r: rank of the shared random projections (VeRA uses large ranks cheaply: only r per layer).
        target_modules: as in LoraConfig; None picks the family default.
        projection_prng_key: seed of the shared projections.
        save_projection: write the projections into the adapter file (else regenerate on load).
        vera_dropout: dropout on the adapter's input.
        d_initial: initial value of every entry of ``lambda_d``.
        fan_in_fan_out: weights stored (in, out) as in GPT-2's Conv1D (detected automatically).
        bias: only ``"none"`` is implemented.
        modules_to_save: modules trained in full and saved with the adapter.
        init_weights: True starts with a zero update.
        layers_to_transform / layers_pattern: restrict to these layer indices.
    """

    r: int = 256
    target_modules: Optional[Union[list[str], str]] = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.VERA.value
        super().__post_init__()
        normalise_targets(self, "target_modules")
        check_positive_int(self, "r")
        check_probability(self, "vera_dropout")
        check_layers(self)
        if self.bias != "none":
            raise ConfigError(f"VeraConfig.bias={self.bias!r}: only 'none' is implemented in peftkit; "
                              "train biases with a separate BitFit adapter instead.")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain sqrt 2, fan_in = shape[1]) drawn from ``generator`` on the CPU."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(r: int, in_max: int, out_max: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared (A: r x in_max, B: out_max x r) for ``key``."""
    g = torch.Generator(device="cpu").manual_seed(key)
    a = kaiming_uniform((r, in_max), g)
    b = kaiming_uniform((out_max, r), g)
    return a, b


class VeraDelta(Delta):
    """Two trainable vectors over slices of the shared frozen projections."""

    mergeable = True
    peft_names = {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}

    def __init__(self, in_features: int, out_features: int, a: torch.Tensor, b: torch.Tensor,
                 dropout: float, d_initial: float, init: bool):
        super().__init__()
        r = a.shape[0]
        self.in_features, self.out_features = in_features, out_features
        # shared with every other layer of this adapter; not saved per layer (see extra_state)
        self.register_buffer("vera_A", a, persistent=False)
        self.register_buffer("vera_B", b, persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init:
            self.vera_lambda_b = nn.Parameter(torch.zeros(out_features))
            self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial)))
        else:
            self.vera_lambda_b = nn.Parameter(torch.ones(out_features))
            self.vera_lambda_d = nn.Parameter(torch.randn(r))

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        a = self.vera_A[:, : self.in_features].to(x.dtype)
        b = self.vera_B[: self.out_features].to(x.dtype)
        h = self.vera_lambda_d * F.linear(self.dropout(x), a)
        return y + self.vera_lambda_b * F.linear(h, b)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        a = self.vera_A[:, : self.in_features]
        b = self.vera_B[: self.out_features]
        w2 = (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)
        return from_2d(w2, base).to(base.weight.dtype)


@register_method
class VeraMethod(Method):
    """VeRA at Linear and Conv1D sites, with projections shared across the adapter's layers."""

    name = "VERA"
    config_cls = VeraConfig

    def prepare(self, config: VeraConfig, model: nn.Module) -> VeraConfig:
        config = with_default_targets(config, model, LORA_DEFAULT_TARGETS, "VeRA")
        in_max = out_max = 0
        device = None
        for path, module in iter_candidates(model):
            if not self.is_target(config, path, module, model):
                continue
            base = module.base_layer if isinstance(module, Site) else module
            dims = linear_dims(base)
            if dims is None:
                continue
            in_max, out_max = max(in_max, dims[0]), max(out_max, dims[1])
            device = device or base.weight.device
        if in_max == 0:
            raise ConfigError(f"VeRA: target_modules={config.target_modules!r} selected no nn.Linear or "
                              "Conv1D layer; VeRA adapts linear layers only.")
        a, b = projections(config.r, in_max, out_max, config.projection_prng_key)
        if device is not None and device.type != "meta":
            a, b = a.to(device), b.to(device)  # once, so every layer's buffer stays the same tensor
        config = dataclasses.replace(config)
        config._projection = (a, b)  # not a dataclass field: never written to JSON
        return config

    def supported_sites(self):
        return ["nn.Linear", "transformers Conv1D"]

    def make_delta(self, config: VeraConfig, path: str, module: nn.Module, adapter_name: str) -> Delta:
        dims = linear_dims(module)
        if dims is None:
            raise UnsupportedSite(f"layer type {type(module).__name__} is not supported by VeRA.")
        a, b = config._projection
        delta = VeraDelta(dims[0], dims[1], a, b, float(config.vera_dropout), config.d_initial, config.init_weights)
        delta.vera_lambda_b.data = delta.vera_lambda_b.data.to(adapter_dtype(module))
        delta.vera_lambda_d.data = delta.vera_lambda_d.data.to(adapter_dtype(module))
        return delta

    def extra_state(self, host, config: VeraConfig, adapter_name: str) -> dict[str, torch.Tensor]:
        if not config.save_projection:
            return {}
        a, b = config._projection
        return dict(zip(PROJECTION_KEYS, (a, b)))
