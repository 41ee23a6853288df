"""DDP for adapter training: replicate the model, all-reduce only the adapter's gradients.

``DistributedDataParallel`` registers gradient hooks on parameters that require grad only, so a
PeftModel whose base is frozen before wrapping all-reduces nothing but the adapter. Wrapping
after freezing matters: DDP fixes its bucket plan at construction.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .fsdp import _check_frozen_before_wrap


def wrap_ddp(model: nn.Module, **ddp_kwargs) -> DistributedDataParallel:
    """Wrap a PeftModel (base frozen, adapter trainable) in DDP on this rank's device.

    Extra keyword arguments go to ``DistributedDataParallel``. Save with
    ``unwrap(ddp).save_pretrained(...)`` on rank 0 (every rank holds the full adapter).
    """
    if not dist.is_initialized():
        raise RuntimeError("Initialise the process group first (peftkit.dist.init_distributed()).")
    _check_frozen_before_wrap(model)
    device = next(model.parameters()).device
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index if device.index is not None else torch.cuda.current_device()])
    return DistributedDataParallel(model, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The PeftModel inside a DDP wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
