"""``peftkit train --optim``: which optimizer updates the adapter, and what its state costs.

=====================  =======================================  =============================
``--optim``            optimizer (Trainer's ``optim`` name)     state per trainable parameter
=====================  =======================================  =============================
``adamw`` (default)    ``torch.optim.AdamW``, fused             2 fp32 moments: 8 bytes
                       (``adamw_torch_fused``)
``adamw_8bit``         bitsandbytes ``AdamW8bit``               2 uint8 moments + one fp32
                       (``adamw_bnb_8bit``)                     absmax per 256 values per moment
``paged_adamw_8bit``   bitsandbytes ``PagedAdamW8bit``          as ``adamw_8bit``, in CUDA
                                                                unified memory
``paged_adamw``        bitsandbytes ``PagedAdamW`` 32-bit       8 bytes, in CUDA unified memory
                       (``paged_adamw_32bit``)
``loraplus``           fused ``torch.optim.AdamW`` with LoRA+    8 bytes
                       groups: B at ``--loraplus-ratio`` x lr
``lorafa``             LoRA-FA: A frozen, B on its projected    8 bytes, B and other tensors
                       gradient (peftkit.optimizers)            only (A has no state)
=====================  =======================================  =============================

``loraplus`` and ``lorafa`` are built by :func:`build_optimizer` (peftkit.optimizers, PEFT's
``create_loraplus_optimizer`` / ``create_lorafa_optimizer``) and handed to Trainer, whose
scheduler then scales every group's learning rate alike (the LoRA+ ratio is kept).

8-bit Adam (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization",
arXiv:2110.02861) stores each moment ``m`` block-wise quantised: for every block ``b`` of 256
values ``absmax_b = max |m_b|`` (fp32) and ``q_i = argmin_j |Q_j - m_i / absmax_b|`` over a
256-entry dynamic code ``Q`` (uint8), so a moment costs ``n + 4 * ceil(n / 256)`` bytes instead
of ``4 n``. bitsandbytes keeps tensors with fewer than ``min_8bit_size`` (4096) values in fp32, and
Trainer keeps ``nn.Embedding`` weights in fp32 state too (prompt tables, for instance).

bitsandbytes 0.50's CPU backend runs 8-bit Adam on CPU tensors (checked at start-up by one step
on a small tensor, so a build without that kernel fails before the model is loaded). Paged
optimizers page their state between GPU and host through CUDA unified memory; without CUDA,
bitsandbytes silently falls back to the unpaged optimizer, so peftkit refuses them instead.
"""
from __future__ import annotations

import functools
import math
from typing import Iterable, Optional

from ..config import ConfigError

#: --optim value -> (Trainer's ``optim`` name, bits per moment, paged)
OPTIMIZERS = {
    # fused: one kernel for all tensors, as Trainer's own default with torch >= 2.8; on this
    # project's CPU it steps an all-linear r=16 SmolLM2 adapter in 14 ms instead of 60 ms
    # (benchmarks/optim_step.py)
    "adamw": ("adamw_torch_fused", 32, False),
    "adamw_8bit": ("adamw_bnb_8bit", 8, False),
    "paged_adamw_8bit": ("paged_adamw_8bit", 8, True),
    "paged_adamw": ("paged_adamw_32bit", 32, True),
    # built here and given to Trainer (build_optimizer); Trainer's own name is only a placeholder
    "loraplus": ("adamw_torch_fused", 32, False),
    "lorafa": ("adamw_torch", 32, False),
}
#: --optim values whose optimizer peftkit builds itself (needs the model), see build_optimizer
OWN_OPTIMIZERS = ("loraplus", "lorafa")
#: bitsandbytes' defaults: tensors smaller than this keep fp32 state; block size of 8-bit state
MIN_8BIT_SIZE = 4096
BLOCK = 256
#: the two 256-entry fp32 code books (signed, unsigned) one 8-bit optimizer shares across tensors
_QMAPS = 2 * 256 * 4


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _bnb_8bit_runs_on_cpu() -> Optional[str]:
    """None when bitsandbytes' AdamW8bit takes a step on a CPU tensor here, else why not."""
    try:
        import bitsandbytes as bnb
        import torch

        p = torch.nn.Parameter(torch.ones(MIN_8BIT_SIZE))
        opt = bnb.optim.AdamW8bit([p], lr=0.1)
        p.grad = torch.ones_like(p)
        opt.step()
        if opt.state[p]["state1"].dtype != torch.uint8 or not bool((p < 1).all()):
            return "its AdamW8bit step did not update the parameter with 8-bit state"
    except Exception as e:  # ImportError, a missing native kernel, NotImplementedError ...
        return f"{type(e).__name__}: {e}"
    return None


def check_optim(name: str, cuda: Optional[bool] = None) -> str:
    """Validate ``--optim name`` for this machine; returns Trainer's ``optim`` string.

    Raises :class:`~peftkit.config.ConfigError` with what to use instead when the optimizer
    cannot run here (bitsandbytes missing, a paged optimizer without CUDA, 8-bit Adam on a CPU
    build of bitsandbytes that lacks it). ``cuda`` overrides the CUDA detection (for tests).
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"--optim {name!r} is not known; choose one of {', '.join(OPTIMIZERS)}.")
    trainer_name, bits, paged = OPTIMIZERS[name]
    if name == "adamw" or name in OWN_OPTIMIZERS:
        return trainer_name
    cuda = _cuda() if cuda is None else cuda
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:
        raise ConfigError(f"--optim {name} needs bitsandbytes, which does not load here ({type(e).__name__}: {e}). "
                          "Install it (pip install bitsandbytes) or use --optim adamw.") from None
    if paged and not cuda:
        alt = "adamw_8bit" if bits == 8 else "adamw"
        raise ConfigError(f"--optim {name} needs a CUDA GPU: paged optimizers move their state between GPU and "
                          f"host memory through CUDA unified memory, and this machine has no CUDA device. "
                          f"Use --optim {alt} instead (same {'8-bit ' if bits == 8 else ''}state, not paged).")
    if bits == 8 and not cuda:
        why = _bnb_8bit_runs_on_cpu()
        if why is not None:
            raise ConfigError(f"--optim {name}: bitsandbytes on this machine cannot run 8-bit Adam on CPU tensors "
                              f"({why}). It needs a CUDA GPU here; use --optim adamw on CPU.")
    return trainer_name


def state_bytes(name: str, sizes: Iterable[int], fp32_sizes: Iterable[int] = ()) -> int:
    """Bytes of optimizer state for trainable tensors of ``sizes`` elements under ``--optim name``.

    ``fp32_sizes``: tensors that keep 32-bit state whatever the optimizer (Trainer does so for
    ``nn.Embedding`` weights with bitsandbytes' 8-bit optimizers). ``"sgd"`` (no momentum) has none.
    """
    if name == "sgd":
        return 0
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be sgd or one of {', '.join(OPTIMIZERS)}, not {name!r}")
    bits = OPTIMIZERS[name][1]
    total = sum(8 * n for n in fp32_sizes)
    eight = False
    for n in sizes:
        if bits == 8 and n >= MIN_8BIT_SIZE:
            total += 2 * (n + 4 * math.ceil(n / BLOCK))
            eight = True
        else:
            total += 8 * n
    return total + (_QMAPS if eight else 0)


def build_optimizer(name: str, model, lr: float, weight_decay: float = 0.0, loraplus_ratio: float = 16.0):
    """The optimizer for ``--optim name`` when peftkit builds it (``loraplus``, ``lorafa``), else None
    (Trainer builds the others from its ``optim`` name).

    ``loraplus``: fused AdamW over LoRA+'s groups, ``B`` at ``loraplus_ratio`` x ``lr`` (the paper's
    2^4 = 16 by default). ``lorafa``: LoRA-FA, which needs a LoRA adapter (its ``A`` is frozen here).
    """
    if name not in OWN_OPTIMIZERS:
        return None
    import torch

    from ..optimizers import create_lorafa_optimizer, create_loraplus_optimizer

    configs = getattr(model, "peft_config", {}) or {}
    active = [configs[a] for a in getattr(model, "active_adapters", []) if a in configs]
    if not active or any(getattr(c, "peft_type", None) != "LORA" for c in active):
        raise ConfigError(f"--optim {name} is made for LoRA adapters (--method lora); the active adapter is "
                          f"{[getattr(c, 'peft_type', None) for c in active]}. Use --optim adamw for other methods.")
    if name == "loraplus":
        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=loraplus_ratio,
                                         loraplus_weight_decay=weight_decay, fused=True)
    cfg = active[0]
    return create_lorafa_optimizer(model, r=cfg.r, lora_alpha=cfg.lora_alpha, lr=lr, weight_decay=weight_decay)
