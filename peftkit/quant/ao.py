"""torchao int8 weight-only base layers.

torchao keeps ``nn.Linear`` and swaps its weight for a tensor subclass that stores int8 values
with one scale per output row (``W ~= q * scale[:, None]``) and dequantises inside ``F.linear``.
The Site calls the layer as usual; DoRA and merging read the dense weight through
``weight.dequantize()``.
"""
from __future__ import annotations

import copy
import functools
from typing import Optional

import torch
from torch import nn

from .backend import QuantBackend, register_backend


class TorchAoInt8(QuantBackend):
    """``nn.Linear`` whose weight is a torchao quantised tensor."""

    name = "torchao-int8-weight-only"
    modes = ("int8-ao",)

    @functools.lru_cache(maxsize=None)
    def available(self) -> bool:
        try:
            import torchao.quantization  # noqa: F401
        except Exception:  # not installed, or built for another torch
            return False
        return True

    def handles(self, module: nn.Module) -> bool:
        w = getattr(module, "weight", None)
        return isinstance(module, nn.Linear) and type(w).__module__.startswith("torchao")

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.dequantize()

    def quantize(self, linear: nn.Linear, mode: str, compute_dtype: Optional[torch.dtype] = None,
                 double_quant: bool = True) -> nn.Module:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        layer = copy.deepcopy(linear)
        if compute_dtype is not None:
            layer.to(compute_dtype)
        layer.requires_grad_(False)
        holder = nn.Sequential(layer)  # quantize_ rewrites children of the module it is given
        quantize_(holder, Int8WeightOnlyConfig())
        return holder[0]


register_backend(TorchAoInt8())
