"""DeepSpeed ZeRO-2/3 for adapter training: a config that runs on CPU too, and complete adapter saves.

ZeRO (Rajbhandari et al., 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", arXiv:1910.02054) splits training state over the N data-parallel ranks: stage 1 the
optimizer state, stage 2 also the gradients, stage 3 also the parameters themselves. Per rank,
with Psi parameters and K bytes of optimizer state per parameter, model state drops from
``(2 + 2 + K) Psi`` (DDP) to ``2 Psi + (2 + K) Psi / N`` (stage 2) and ``(4 + K) Psi / N``
(stage 3). For an adapter the optimizer state and gradients are small anyway; stage 3 is the one
that matters, because it also splits the frozen base.

What peftkit adds on top of DeepSpeed:

* :func:`load_config` reads the JSON file and makes it safe on a machine without CUDA: DeepSpeed's
  CPU accelerator, a torch optimizer instead of the C++ ``DeepSpeedCPUAdam``
  (``zero_force_ds_cpu_optimizer: false``), and no just-in-time build of the shared-memory
  all-reduce op. That build is what made a 2-process run on CPU look hung: every rank's
  communication set-up compiles ``deepspeed_shm_comm`` (minutes of C++ on a small machine, used
  only by inference all-reduce), the other ranks wait on the build's lock file without a
  timeout, and a build that is killed leaves the lock behind, so every later run waits forever.
* :func:`gather_adapter_state` / :func:`save_adapter`: under ZeRO-3 a parameter outside a
  ``deepspeed.zero.GatheredParameters`` block is an empty placeholder, so a plain
  ``save_pretrained`` writes an adapter of empty tensors. All ranks gather the adapter's
  parameters (only those: the frozen base stays partitioned) and rank 0 writes PEFT's format.
* :func:`unshard` turns a ZeRO-3 model back into an ordinary module on every rank after
  training (parameters gathered for good, DeepSpeed's hooks removed), so rank 0 can evaluate and
  generate on its own.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Union

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError

#: values the Hugging Face Trainer fills in from its own options when the file says "auto"
AUTO_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size")
SHM_OP = "deepspeed_shm_comm"


def cpu_only() -> bool:
    """True when this process has no CUDA device (DeepSpeed then runs on its CPU accelerator)."""
    return not torch.cuda.is_available()


def prepare_runtime() -> None:
    """Point DeepSpeed at the CPU accelerator when there is no GPU, and skip the shm op build.

    Must run before DeepSpeed first picks its accelerator (``load_config`` calls it). The
    shared-memory all-reduce op serves only inference all-reduce, and gloo does the training
    collectives; it is kept when the installed DeepSpeed already ships it compiled.
    """
    if cpu_only():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed.ops
        from deepspeed.git_version_info import installed_ops
    except ImportError as e:
        raise ConfigError(f"--deepspeed needs the deepspeed package ({e}); install it with "
                          "`pip install deepspeed` (on a CPU-only torch: add --no-build-isolation --no-deps, "
                          "then hjson msgpack ninja py-cpuinfo einops).") from None
    if not installed_ops.get(SHM_OP, False):
        deepspeed.ops.__compatible_ops__[SHM_OP] = False  # build_shm_op() then returns None


def load_config(source: Union[str, dict]) -> dict:
    """The DeepSpeed config from a JSON file (or a dict), checked and completed for the Trainer.

    Batch size, accumulation and clipping default to ``"auto"`` so that ``peftkit train``'s own
    options decide them (a different number in the file is reported as a mismatch by the
    Trainer). On a machine without CUDA, options that need compiled DeepSpeed ops are refused
    with the reason.
    """
    if isinstance(source, dict):
        cfg, where = copy.deepcopy(source), "the DeepSpeed config"
    else:
        where = f"--deepspeed {source}"
        if not os.path.isfile(source):
            raise ConfigError(f"{where}: no such file; pass a DeepSpeed JSON config (see docs/scale.md).")
        try:
            with open(source, encoding="utf-8") as fh:
                cfg = json.load(fh)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object such as {{\"zero_optimization\": {{\"stage\": 2}}}}.")
    zero = cfg.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization must be an object such as {{\"stage\": 3}}, got {zero!r}.")
    stage = zero.setdefault("stage", 0)
    if type(stage) is not int or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}.")
    for key in AUTO_KEYS:
        cfg.setdefault(key, "auto")
    prepare_runtime()
    if cpu_only():
        _check_cpu(cfg, zero, where)
    return cfg


def _check_cpu(cfg: dict, zero: dict, where: str) -> None:
    """Refuse what would compile C++ ops on a CPU-only machine, and keep the torch optimizer."""
    from deepspeed.git_version_info import installed_ops

    cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in ("none", None):
            raise ConfigError(f"{where}: zero_optimization.{key}.device={device!r} offloads to the CPU, but this "
                              "machine has no GPU: everything is on the CPU already. Remove the offload section.")
    opt = cfg.get("optimizer")
    if opt is not None and not isinstance(opt, dict):
        raise ConfigError(f"{where}: the optimizer section must be an object, got {opt!r}.")
    if opt is not None:
        name = str(opt.get("type", "")).lower()
        torch_adam = name in ("adam", "adamw") and (opt.get("params") or {}).get("torch_adam", False)
        if not torch_adam and not installed_ops.get("fused_adam", False):
            raise ConfigError(f"{where}: the optimizer section ({opt.get('type')!r}) makes DeepSpeed build a C++ "
                              "optimizer op on this CPU-only machine. Remove the section (the Trainer then uses "
                              "torch AdamW with --lr and --weight-decay) or set \"params\": {\"torch_adam\": true}.")
    if (cfg.get("fp16") or {}).get("enabled") in (True, "true"):
        raise ConfigError(f"{where}: fp16 needs a GPU; on CPU remove the fp16 section.")


def _is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def adapter_parameters(model: nn.Module, adapter_name: str = "default") -> list[nn.Parameter]:
    """The parameters that make up adapter ``adapter_name``: its Deltas' plus any trainable one."""
    tag = f"deltas.{adapter_name}."
    return [p for n, p in model.named_parameters() if p.requires_grad or tag in n]


def gather_adapter_state(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The complete adapter (Hugging Face PEFT keys, CPU copies) on every rank; a collective call.

    Under ZeRO-3 the adapter's parameters are gathered for the copy and partitioned again after
    it; the frozen base is left alone. Raises if a tensor is still empty (a parameter the gather
    did not reach), instead of letting an empty adapter be written.
    """
    params = adapter_parameters(model, adapter_name)
    partitioned = [p for p in params if _is_zero3_param(p)]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned):
            state = {k: v.detach().clone().cpu() for k, v in model.get_adapter_state_dict(adapter_name).items()}
    else:
        state = {k: v.detach().clone().cpu() for k, v in model.get_adapter_state_dict(adapter_name).items()}
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"Adapter tensor {empty[0]} is empty after gathering ({len(empty)} such); it is a ZeRO-3 "
                           "placeholder outside adapter_parameters(). Nothing was saved.")
    return state


def save_adapter(model: nn.Module, save_directory: str, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Gather adapter ``adapter_name`` and write it once, from rank 0; every rank must call this.

    Same files as ``save_pretrained``. Returns the gathered tensors (on every rank).
    """
    from .fsdp import write_adapter

    tensors = gather_adapter_state(model, adapter_name)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_adapter(model, save_directory, tensors, adapter_name)
    if dist.is_initialized():
        dist.barrier()  # nobody reads the folder before it is complete
    return tensors


def zero_stage(engine) -> int:
    """The ZeRO stage of a DeepSpeed engine (0 for anything else)."""
    stage = getattr(engine, "zero_optimization_stage", None)
    return int(stage()) if callable(stage) else 0


def unshard(engine) -> nn.Module:
    """Make the module inside a ZeRO-3 ``engine`` an ordinary full model on every rank; collective.

    Gathers every parameter for good (the memory the full model took before ``initialize``) and
    removes DeepSpeed's forward hooks, so each rank can run forward and ``generate`` alone (and
    clears transformers' global "ZeRO-3 is on" flag, which makes ``generate`` wait for the other
    ranks). The engine cannot train afterwards. Returns the module; other stages are left as they are.
    """
    module = engine.module
    if zero_stage(engine) != 3:
        return module
    params = [p for p in module.parameters() if _is_zero3_param(p)]
    if params:
        params[0].all_gather(param_list=params)
    engine.destroy()  # removes the fetch/release hooks; the gathered data stays in place
    for p in params:
        p.ds_active_sub_modules.clear()
    try:  # transformers' generate() would otherwise keep all ranks in lockstep (synced_gpus) for ZeRO-3
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except ImportError:
        pass
    return module
