"""16-bit storage for the frozen base, fp32 compute: the ``"bf16"`` and ``"fp16"`` modes.

Training adapters never updates the base weights, so they only have to be *stored* precisely
enough to compute with. This backend keeps each frozen ``nn.Linear`` weight ``W`` in bfloat16
(or float16) and computes in the input's dtype (fp32)::

    y = x · widen(W16)^T + b,      W16 = round16(W),   widen: 16-bit -> dtype of x

    backward (weights frozen):  dL/dx = dL/dy · widen(W16)

The widened copy exists for one layer at a time: the backward pass widens ``W16`` again instead
of keeping the fp32 copy from the forward alive until then. That is the storage half of mixed
precision (Micikevicius et al. 2018, "Mixed Precision Training", arXiv:1710.03740: 16-bit weight
copies, fp32 arithmetic where it matters), and the same trade as QLoRA's (Dettmers et al. 2023,
arXiv:2305.14314) with a 16-bit instead of a 4-bit store: half the weight memory of fp32, no
quantisation error beyond bf16/fp16 rounding, no dequantisation tables.

Why not simply load the model in bf16 (``--dtype bfloat16``)? Because then the matrix products
run in bf16, and CPUs without bf16 units (AVX2, most consumer CPUs) have no fast kernel for
them: on the 2-core AVX2 development machine a bf16 training step of SmolLM2-135M took 29x the
fp32 step. With bf16 *storage* the products stay fp32 (see BENCHMARKS.md for measured figures).
On hardware with bf16 units (GPUs, AVX512-BF16/AMX CPUs) a bf16 model is the better choice.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backend import QuantBackend, register_backend

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: the 16-bit storage modes (no bitsandbytes involved)
HALF_MODES = tuple(_DTYPES)


class _WidenedLinear(torch.autograd.Function):
    """``F.linear(x, W16.to(x.dtype), b)`` that saves ``W16``, not the widened copy."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        gx = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return gx, None, gb


class HalfLinear(nn.Linear):
    """A frozen linear layer whose weight is stored in 16 bits and used in the input's dtype.

    ``weight`` keeps its name and its ``out x in`` shape (state dicts stay readable); only its
    dtype changes. The bias, a vector, keeps the original dtype. The weight cannot be trained:
    the backward pass gives it no gradient, and asking for one is refused. It is an
    ``nn.Linear`` (methods adapt it like one, as they do bitsandbytes' layers), built without
    ``nn.Linear``'s own fp32 allocation.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        nn.Module.__init__(self)
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"HalfLinear stores weights in bfloat16 or float16, not {dtype}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        b = linear.bias
        self.bias = None if b is None else nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise RuntimeError("HalfLinear keeps a frozen 16-bit weight and gives it no gradient; "
                               "train adapters on it, or use a dense nn.Linear to train the weight")
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return _WidenedLinear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight.to(x.dtype), self.bias)  # no graph: the wide copy dies here

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, storage={str(self.weight.dtype).removeprefix('torch.')}")


class HalfStorage(QuantBackend):
    """Backend for :class:`HalfLinear`: 16-bit storage, compute in the input's dtype."""

    name = "16-bit storage (peftkit)"
    modes = HALF_MODES

    def handles(self, module: nn.Module) -> bool:
        return isinstance(module, HalfLinear)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.to(torch.float32)

    def quantize(self, linear: nn.Linear, mode: str, compute_dtype: Optional[torch.dtype] = None,
                 double_quant: bool = True) -> nn.Module:
        if mode not in _DTYPES:
            return super().quantize(linear, mode, compute_dtype, double_quant)
        return HalfLinear(linear, _DTYPES[mode])

    def mode_of(self, module: nn.Module) -> tuple[str, bool]:
        return ("bf16" if module.weight.dtype == torch.bfloat16 else "fp16"), False


register_backend(HalfStorage())
