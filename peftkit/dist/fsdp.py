"""FSDP2 for adapter training: shard each transformer block, frozen and trainable parameters mixed.

``torch.distributed.fsdp.fully_shard`` (FSDP2) shards every parameter of a unit on its own
(as a DTensor), so a block whose frozen base weights and trainable adapters sit side by side is
one unit: no flat buffer has to be uniform in ``requires_grad``, and no adapter-only wrapping
policy is needed. What peftkit adds:

* **freeze before wrap**: trainability is decided by ``get_peft_model`` and checked here, since
  the optimizer must be built on the sharded parameters that exist after wrapping;
* one ``fully_shard`` per transformer block (``_no_split_modules`` of a transformers model, else
  the entries of its largest ``nn.ModuleList``), then one on the root for embeddings and head;
* :func:`gather_adapter_state` all-gathers the adapter's shards (every rank must call it, in the
  same order), and :func:`save_adapter` writes the full adapter once, from rank 0.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..io.checkpoint import WEIGHTS_NAME, atomic_save_tensors


def init_distributed(backend: Optional[str] = None) -> tuple[int, int]:
    """Join the process group ``torchrun`` set up in the environment; returns (rank, world_size).

    ``backend`` defaults to NCCL when CUDA is available, else gloo (CPU).
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError("No RANK/WORLD_SIZE in the environment: launch with "
                               "`torchrun --nproc-per-node N your_script.py` (or init the process group yourself).")
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return dist.get_rank(), dist.get_world_size()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one (decoder layers for a transformers model)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    if names:
        blocks = [m for m in model.modules() if type(m).__name__ in names]
        if blocks:
            return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"Cannot find the transformer blocks of {type(model).__name__}; pass blocks= explicitly.")
    return list(max(lists, key=len))


def _check_frozen_before_wrap(model: nn.Module) -> None:
    flags = [p.requires_grad for p in model.parameters()]
    if not any(flags):
        raise ValueError("No trainable parameter: call get_peft_model (which freezes the base and makes "
                         "the adapter trainable) before wrapping; the optimizer needs the wrapped params.")
    if all(flags):
        raise ValueError("Every parameter requires grad: the base is not frozen. Build the PeftModel "
                         "(get_peft_model) first, then wrap it.")


def shard_model(model: nn.Module, blocks: Optional[Iterable[nn.Module]] = None, mesh=None,
                reshard_after_forward: bool = True, mp_policy=None) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to each block of ``model`` (a PeftModel), then to the root.

    Call after ``get_peft_model`` and before building the optimizer. ``mesh``: a 1-D
    ``DeviceMesh`` (default: all ranks on this device type). Returns ``model`` (sharded in place).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise RuntimeError("Initialise the process group first (peftkit.dist.init_distributed()).")
    _check_frozen_before_wrap(model)
    if mesh is None:
        device = next(model.parameters()).device.type
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for block in (list(blocks) if blocks is not None else transformer_blocks(model)):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_adapter_state(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The complete adapter state (Hugging Face PEFT keys) on every rank; a collective call."""
    return {k: _full(v).detach().cpu() for k, v in model.get_adapter_state_dict(adapter_name).items()}


def write_adapter(model: nn.Module, save_directory: str, tensors: dict[str, torch.Tensor],
                  adapter_name: str = "default") -> None:
    """Write gathered adapter ``tensors`` with ``model``'s config in ``save_pretrained``'s layout (one process)."""
    folder = save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)
    cfg = model.peft_config[adapter_name]
    inner = getattr(model.base_model, "model", None)
    base = getattr(getattr(inner, "config", None), "_name_or_path", None)
    cfg = dataclasses.replace(cfg, inference_mode=True,
                              base_model_name_or_path=cfg.base_model_name_or_path or base or None)
    atomic_save_tensors(os.path.join(folder, WEIGHTS_NAME), tensors)
    cfg.save_pretrained(folder)


def save_adapter(model: nn.Module, save_directory: str, adapter_name: str = "default") -> None:
    """Gather adapter ``adapter_name`` in full and write it once, from rank 0 (all ranks call this).

    Same layout as ``save_pretrained``: ``adapter_config.json`` + ``adapter_model.safetensors``
    in ``save_directory`` (``save_directory/<name>`` for adapters not named ``default``).
    """
    tensors = gather_adapter_state(model, adapter_name)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        write_adapter(model, save_directory, tensors, adapter_name)
    if dist.is_initialized():
        dist.barrier()  # nobody reads the folder before it is complete
