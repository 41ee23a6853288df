"""bitsandbytes base layers: 4-bit NF4/FP4 (with or without double quantisation) and LLM.int8().

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) freezes the base in 4-bit NormalFloat with
double-quantised block scales and trains LoRA in higher precision on top::

    y = dequant(W_nf4, absmax) x + s * B A x         (W: out x in packed into out*in/2 bytes)

LLM.int8() (Dettmers et al. 2022, arXiv:2208.07339) stores ``W`` as int8 with one scale per
output row: ``W ~= CB * SCB[:, None] / 127``.

The AVX512-BF16 trap. On CPUs with AVX512-BF16, ``Linear4bit.forward`` repacks its weight in
place the first time it runs in eval mode on an input without gradient, and from then on every
forward (training ones too) takes an inference kernel with no autograd formula: gradients no
longer flow through the base layer, so every adapter below it silently stops learning.
:meth:`Bnb4bit.before_forward` undoes the repacking whenever a forward needs gradients, and
:func:`peftkit.quant.prepare.guard_quantized` (called by ``prepare_model_for_kbit_training``)
turns the repacking off unless asked to keep the faster eval kernel.
"""
from __future__ import annotations

import functools
import sys
from typing import Optional

import torch
from torch import nn

from .backend import QuantBackend, register_backend


def _bnb():
    import bitsandbytes as bnb

    return bnb


def _is(module: nn.Module, cls_name: str) -> bool:
    # a bitsandbytes layer exists only if bitsandbytes was imported: no import needed to check
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, getattr(bnb.nn, cls_name))


class _BnbBackend(QuantBackend):
    @functools.lru_cache(maxsize=None)
    def available(self) -> bool:
        try:
            _bnb()
        except Exception:  # not installed, or its native library failed to load
            return False
        return True


class Bnb4bit(_BnbBackend):
    """``bitsandbytes.nn.Linear4bit`` (NF4 or FP4)."""

    name = "bitsandbytes-4bit"
    modes = ("4bit", "nf4", "fp4")

    def handles(self, module: nn.Module) -> bool:
        return _is(module, "Linear4bit")

    @staticmethod
    def is_repacked(module: nn.Module) -> bool:
        """True when the weight is in bitsandbytes' inference-only CPU layout."""
        return bool(getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False))

    @staticmethod
    def undo_repack(module: nn.Module) -> None:
        """Put a repacked weight back into the layout the differentiable kernel reads."""
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        w = module.weight
        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        module.quant_state = w.quant_state

    def before_forward(self, module: nn.Module, x: torch.Tensor) -> None:
        # bitsandbytes repacks only for eval-mode, no-grad inputs; any other forward must not
        # run on the repacked layout, so restore the trainable one first.
        if self.is_repacked(module) and (module.training or (torch.is_grad_enabled() and x.requires_grad)):
            self.undo_repack(module)

    def guard(self, module: nn.Module, allow_packed_eval: bool) -> None:
        if self.is_repacked(module):
            self.undo_repack(module)
        if not allow_packed_eval:
            module.support_avx512bf16_for_cpu = False

    def mode_of(self, module: nn.Module) -> tuple[str, bool]:
        if self.is_repacked(module):
            self.undo_repack(module)
        qs = module.weight.quant_state
        return qs.quant_type, bool(qs.nested)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        if self.is_repacked(module):
            self.undo_repack(module)
        w = module.weight
        return _bnb().functional.dequantize_4bit(w.data, w.quant_state)

    def quantize(self, linear: nn.Linear, mode: str, compute_dtype: Optional[torch.dtype] = None,
                 double_quant: bool = True) -> nn.Module:
        bnb = _bnb()
        qtype = "fp4" if mode == "fp4" else "nf4"
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant,
                                  quant_type=qtype, device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().float().clone(), requires_grad=False,
                                         compress_statistics=double_quant, quant_type=qtype, module=layer)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        # bitsandbytes quantises when the parameter is moved to a device
        return layer.to(linear.weight.device if linear.weight.device.type != "meta" else "cpu")


class Bnb8bit(_BnbBackend):
    """``bitsandbytes.nn.Linear8bitLt`` (LLM.int8() with frozen int8 weights)."""

    name = "bitsandbytes-8bit"
    modes = ("8bit",)

    def handles(self, module: nn.Module) -> bool:
        return _is(module, "Linear8bitLt")

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        state = module.state
        cb = state.CB if state.CB is not None else module.weight.data
        scb = state.SCB if state.SCB is not None else getattr(module.weight, "SCB", None)
        if scb is None or cb.dtype != torch.int8:
            return module.weight.data.float()  # fp16 weights kept for training: nothing to undo
        return cb.float() * (scb.float().unsqueeze(1) / 127.0)

    def quantize(self, linear: nn.Linear, mode: str, compute_dtype: Optional[torch.dtype] = None,
                 double_quant: bool = True) -> nn.Module:
        bnb = _bnb()
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(linear.weight.detach().float().clone(), requires_grad=False,
                                         has_fp16_weights=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer.to(linear.weight.device if linear.weight.device.type != "meta" else "cpu")


register_backend(Bnb4bit())
register_backend(Bnb8bit())
