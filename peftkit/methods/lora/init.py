"""LoRA initialisation schemes.

- Default (Hu et al. 2021): ``A`` Kaiming-uniform (a = sqrt 5), ``B = 0``: the update starts at 0.
- Gaussian: ``A ~ N(0, 1/r)``, ``B = 0``.
- PiSSA (Meng et al. 2024, arXiv:2404.02948): with ``W = U S V^T``, the adapter takes the top-r
  principal part, ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``, and the frozen weight
  keeps the residual ``W - s B A``. ``pissa_niter_K`` uses a randomised SVD with K iterations.
- OLoRA (Büyükakyüz 2024, arXiv:2406.01775): ``W = Q R``, ``B = Q[:, :r]``, ``A = R[:r]``, and
  the frozen weight becomes ``W - s B A``.
- LoftQ (Li et al. 2023, arXiv:2310.08659): the frozen weight becomes its quantised ``Q`` and
  ``B A`` the rank-r SVD of ``W - Q`` (alternating; loftq.py).
- EVA (Paischer et al. 2024, arXiv:2410.07170): as the default here (B = 0); ``A`` then comes from
  the input activations' SVD in ``initialize_lora_eva_weights`` (eva.py).

PiSSA and OLoRA modify the base weights. Their adapters are exact only on top of that residual
base; :func:`to_plain_lora` turns a trained one into an ordinary LoRA of rank 2r that applies to
the original weights: ``s(BA - B0A0) = s [B | -B0] [A ; A0]``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...core.method import init_skipped


def _changes_base(init) -> bool:
    """Schemes that rewrite the base weight (the saved adapter only fits the rewritten base)."""
    return isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "loftq"))


@torch.no_grad()
def initialise(delta, init, base: nn.Module, config=None) -> None:
    """Initialise ``delta``'s factors in place according to ``init`` (see module docstring).

    While a checkpoint is being loaded (:func:`~peftkit.core.method.init_skipped`), the random
    schemes are skipped: the file overwrites them. PiSSA/OLoRA/LoftQ still run, because they also
    rewrite the base weight that the saved adapter was trained on top of. ``config`` (the
    LoraConfig) carries LoftQ's settings.
    """
    if init_skipped() and not _changes_base(init):
        return
    if init == "eva":
        init = True  # B = 0 as PEFT's "eva"; A is replaced by initialize_lora_eva_weights
    if init == "loftq":
        from .loftq import loftq_delta

        loftq_delta(delta, base, getattr(config, "loftq_config", None) or {"loftq_bits": 4, "loftq_iter": 1})
        return
    a, b = delta.factors()
    if init is False:
        if hasattr(delta, "lora_embedding_A"):
            a.normal_()
            b.normal_()
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        return
    if hasattr(delta, "lora_embedding_A"):
        a.zero_()
        b.normal_()
        return
    if init is True:
        nn.init.kaiming_uniform_(delta.lora_A, a=math.sqrt(5))
        delta.lora_B.zero_()
    elif init == "gaussian":
        nn.init.normal_(delta.lora_A, std=1 / delta.r)
        delta.lora_B.zero_()
    elif isinstance(init, str) and (init.startswith("pissa") or init == "olora"):
        _principal_init(delta, init, base)
    else:
        raise ValueError(f"unknown init_lora_weights={init!r}")


def _principal_init(delta, init: str, base: nn.Module) -> None:
    from .delta import LoraLinear

    if not isinstance(delta, LoraLinear):
        raise ValueError(f"init_lora_weights={init!r} is implemented for linear layers only; "
                         "exclude other layer types or use the default initialisation.")
    w2 = delta.weight_2d(base)
    dtype = w2.dtype
    w = w2.float()
    r, s = delta.r, delta.scaling
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        b, a = q[:, :r], rr[:r]
    else:
        if init == "pissa":
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            u, sv, vh = u[:, :r], sv[:r], vh[:r]
        else:
            niter = int(init[len("pissa_niter_"):])
            u, sv, v = torch.svd_lowrank(w, q=r, niter=niter)
            vh = v.T
        root = torch.sqrt(sv / s)
        b, a = u * root, root[:, None] * vh
    delta.lora_A.data = a.to(dtype=delta.lora_A.dtype, memory_format=torch.contiguous_format, copy=True)  # own storage (was maybe a placeholder)
    delta.lora_B.data = b.to(dtype=delta.lora_B.dtype, memory_format=torch.contiguous_format, copy=True)
    residual = (w - s * b @ a).to(dtype)
    base.weight.data.copy_(delta.from_2d(residual, base))


def to_plain_lora(a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank 2r with ``B'A' = BA - B0A0``, for the original (non-residual) base."""
    return torch.cat([a, a0], dim=0), torch.cat([b, -b0], dim=1)


def plain_lora_state(tensors: dict, initial: dict, config):
    """Convert a trained PiSSA/OLoRA adapter into a plain LoRA for the original base weights.

    ``tensors`` holds the trained adapter, ``initial`` the same adapter as saved right after
    initialisation (Hugging Face PEFT keys). Returns (tensors, config) of rank 2r whose update
    ``s' B'A' = s (BA - B0A0)`` applies to the unmodified base; ``s' = s`` because alpha is
    doubled with r (times sqrt 2 under rsLoRA), as Hugging Face PEFT's conversion does.
    """
    import dataclasses

    out = dict(tensors)
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        bkey = key[: -len("lora_A.weight")] + "lora_B.weight"
        if key not in initial or bkey not in initial:
            raise ValueError(f"the initial adapter has no {key!r}: pass the folder saved right after "
                             "get_peft_model, before training, for this same configuration")
        out[key], out[bkey] = to_plain_lora(a, tensors[bkey], initial[key].to(a.dtype), initial[bkey].to(a.dtype))
    alpha = config.lora_alpha * (2 ** 0.5 if config.use_rslora else 2)
    config = dataclasses.replace(
        config, r=config.r * 2, lora_alpha=alpha, init_lora_weights=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
    )
    return out, config
