"""Adapter training past one process: FSDP2 per-block sharding and DDP, with full-adapter saves.

DeepSpeed ZeRO-2/3 helpers live in :mod:`peftkit.dist.deepspeed` (imported on demand: deepspeed is optional).

See docs/scale.md for launching with ``torchrun`` on one or several machines.
"""
from .ddp import unwrap, wrap_ddp
from .fsdp import gather_adapter_state, init_distributed, save_adapter, shard_model, transformer_blocks

__all__ = ["init_distributed", "shard_model", "transformer_blocks", "gather_adapter_state", "save_adapter",
           "wrap_ddp", "unwrap"]
