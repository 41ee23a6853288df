"""Combining LoRA adapters into a new one: ``add_weighted_adapter``.

Given adapters ``1..n`` with weights ``w_i`` at one site (factors ``A_i: r x in``, ``B_i: out x r``,
scales ``s_i``), the combination types build a new LoRA whose scale is 1 (``r = alpha``):

- ``linear`` (task arithmetic, Ilharco et al. 2023, arXiv:2212.04089, applied to the factors):
  ``A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i``, ``B = sum_i sqrt|w_i s_i| B_i``. Cheap but only an
  approximation of ``sum_i w_i s_i B_i A_i`` (cross terms appear); all ranks must be equal.
- ``cat``: ``A = [w_1 s_1 A_1; ...; w_n s_n A_n]``, ``B = [B_1 | ... | B_n]``: exactly
  ``sum_i w_i s_i B_i A_i`` at rank ``sum_i r_i``.
- ``svd``: ``dW = sum_i w_i s_i B_i A_i`` then the best rank-``k`` factorisation by SVD,
  ``dW ~ (U_k S_k) V_k^T`` (Eckart-Young), ``B = U_k S_k``, ``A = V_k^T``; ``k = svd_rank`` or the
  largest source rank; ``svd_clamp`` clips both factors to a quantile of their entries.
- ``ties`` (TIES-Merging, Yadav et al. 2023, arXiv:2306.01708): keep the top ``density`` share of
  each task tensor by magnitude (trim), elect a sign per entry from the sum ("total") or the count
  ("frequency") of the trimmed tensors, then average the weighted entries that agree with it
  (disjoint merge).
- ``dare_linear`` / ``dare_ties`` (DARE, Yu et al. 2023, arXiv:2311.03099, "Language Models are
  Super Mario"): drop each entry with probability ``1 - density`` and rescale survivors by
  ``1 / density``, then sum weighted (linear) or elect signs and disjoint-merge (ties).
- ``magnitude_prune``: trim by magnitude as TIES does, then a weighted sum (no sign election).

The five pruning types act on the factors (``A`` and ``B`` separately, with the ``sqrt`` weights
of ``linear``); their ``*_svd`` forms (``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
``magnitude_prune_svd``) act on the full ``s_i B_i A_i`` and then factorise as ``svd``. These are
Hugging Face PEFT's semantics (``LoraModel.add_weighted_adapter``), so both libraries produce the
same factors (DARE's random drops aside); with ``generator=None`` DARE draws from torch's global
generator.

Shapes at one site (``n`` adapters)::

    A_i: r_i x in_flat, B_i: out x r_i  --linear/ties/dare/prune-->  A: r x in_flat, B: out x r
                                        --cat--> A: (sum r_i) x in_flat, B: out x (sum r_i)
    s_i B_i A_i: out x in_flat          --svd--> A: k x in_flat,  B: out x k

Differences from PEFT, each deliberate: an existing ``adapter_name`` is an error (PEFT returns
silently); DoRA sources are refused (no rule combines magnitude vectors); the result never uses
rsLoRA scaling, so its scale is exactly 1; a single ``modules_to_save`` copy among the sources
is carried over trained (PEFT starts the new copy from the original module).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from typing import Optional, Sequence

import torch

from ...core.copies import ModuleCopy
from ...core.inject import iter_candidates, sites
from ...core.registry import get_method

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = FACTOR_TYPES + ("cat",) + SVD_TYPES


# ----- merge rules on lists of same-shaped tensors (pure functions) --------------------------
def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.reshape((-1,) + (1,) * (stacked.dim() - 1)).to(stacked)


def prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * keep.reshape(t.shape)


def prune_random(t: torch.Tensor, density: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DARE's drop-and-rescale: keep each entry with probability ``density``, divide by it."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES' sign election: True where an entry's sign equals the elected sign (ties -> +)."""
    sign = stacked.sign()
    votes = stacked.sum(0) if method == "total" else sign.sum(0)
    return sign == torch.where(votes >= 0, 1, -1).to(sign)


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tasks whose entry agrees with the elected sign (0 where none does)."""
    return (weighted * mask).sum(0) / mask.sum(0).clamp(min=1)


def merge_tensors(kind: str, tensors: Sequence[torch.Tensor], weights: torch.Tensor,
                  density: Optional[float] = None, majority_sign_method: str = "total",
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Combine same-shaped task tensors by ``kind`` (one of :data:`FACTOR_TYPES`, or "svd")."""
    kind = kind.removesuffix("_svd") if kind != "svd" else "linear"
    if kind in ("ties", "magnitude_prune"):
        tensors = [prune_magnitude(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [prune_random(t, density, generator) for t in tensors]
    stacked = torch.stack(list(tensors))
    weighted = _weighted(stacked, weights)
    if kind in ("ties", "dare_ties"):
        return disjoint_merge(weighted, majority_sign_mask(stacked, majority_sign_method))
    return weighted.sum(0)


# ----- per-site combinations ------------------------------------------------------------------
def _factors_combined(kind, parts, density, sign_method, generator):
    """FACTOR_TYPES: combine A's and B's separately with sqrt-split weights."""
    wa, wb, As, Bs = [], [], [], []
    for delta, w in parts:
        ws = w * delta.scaling
        wa.append(math.copysign(math.sqrt(abs(ws)), ws))
        wb.append(math.sqrt(abs(ws)))
        a, b = delta.factors()
        As.append(a.detach())
        Bs.append(b.detach())
    a = merge_tensors(kind, As, torch.tensor(wa, dtype=torch.float64), density, sign_method, generator)
    b = merge_tensors(kind, Bs, torch.tensor(wb, dtype=torch.float64), density, sign_method, generator)
    return a, b


def _cat_combined(parts):
    As = [delta.factors()[0].detach() * (w * delta.scaling) for delta, w in parts]
    Bs = [delta.factors()[1].detach() for delta, _ in parts]
    return torch.cat(As, 0), torch.cat(Bs, 1)


def _svd_combined(kind, parts, rank, density, sign_method, generator, clamp, full_matrices, driver):
    dws = [(d.lora_weight_2d().detach().float() * d.scaling) for d, _ in parts]
    weights = torch.tensor([w for _, w in parts], dtype=torch.float64)
    dw = merge_tensors(kind, dws, weights, density, sign_method, generator)
    u, s, vh = torch.linalg.svd(dw, full_matrices=full_matrices, driver=driver)
    k = min(rank, s.shape[0])
    b = dw.new_zeros(dw.shape[0], rank)
    a = dw.new_zeros(rank, dw.shape[1])
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vh[:k]
    if clamp is not None:
        hi = torch.quantile(torch.cat([b[:, :k].flatten(), a[:k].flatten()]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return a, b


def _factor_params(delta):
    if hasattr(delta, "lora_embedding_A"):
        return delta.lora_embedding_A, delta.lora_embedding_B
    return delta.lora_A, delta.lora_B


# ----- the public entry point -----------------------------------------------------------------
def _check(peft_model, adapters, weights, adapter_name, combination_type, density, sign_method):
    cfgs = peft_model.peft_config
    if adapter_name in cfgs:
        raise ValueError(f"An adapter named {adapter_name!r} already exists; pick a new name for the combination.")
    if not adapters:
        raise ValueError("add_weighted_adapter needs at least one source adapter in `adapters`.")
    unknown = [a for a in adapters if a not in cfgs]
    if unknown:
        raise ValueError(f"Unknown adapters {unknown}; loaded: {sorted(cfgs)}.")
    if len(weights) != len(adapters):
        raise ValueError(f"Got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter.")
    if any(not isinstance(w, (int, float)) or not math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {list(weights)}.")
    not_lora = [a for a in adapters if str(cfgs[a].peft_type) != "LORA"]
    if not_lora:
        raise ValueError(f"add_weighted_adapter combines LoRA adapters only; {not_lora} are not LoRA.")
    if any(cfgs[a].use_dora for a in adapters):
        raise ValueError("DoRA adapters cannot be combined: there is no defined rule for their magnitude "
                         "vectors. Merge them into the base (merge_and_unload) or combine plain LoRAs.")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r} is not one of {', '.join(COMBINATION_TYPES)}.")
    needs_density = combination_type.removesuffix("_svd") in FACTOR_TYPES[1:]
    if needs_density and (density is None or not 0.0 <= float(density) <= 1.0):
        raise ValueError(f"combination_type={combination_type!r} needs density in [0, 1] (the share of "
                         f"entries kept), got {density!r}.")
    if sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}.")


def _site_rank(kind, path, parts, svd_rank):
    ranks = [d.r for d, _ in parts]
    if kind == "cat":
        return sum(ranks)
    if kind in SVD_TYPES:
        return svd_rank or max(ranks)
    if len(set(ranks)) != 1:
        raise ValueError(f"{kind!r} needs equal ranks, but at {path} the adapters have ranks {ranks}. "
                         "Use combination_type='cat' or 'svd' for adapters of different ranks.")
    return ranks[0]


def _target_modules(host, cfgs, paths):
    """The sources' union of target names when it selects exactly ``paths``, else the paths."""
    lists = [c.target_modules for c in cfgs]
    plain = all(isinstance(t, list) and not c.exclude_modules and c.layers_to_transform is None
                for t, c in zip(lists, cfgs))
    if plain:
        union = sorted(set().union(*lists))
        probe = dataclasses.replace(cfgs[0], target_modules=union, exclude_modules=None, layers_to_transform=None)
        method = get_method("LORA")
        hit = {p for p, m in iter_candidates(host.model) if method.is_target(probe, p, m, host.model)}
        if hit == set(paths):
            return union
    return sorted(paths)


@torch.no_grad()
def add_weighted_adapter(peft_model, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None,
                         svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                         svd_driver: Optional[str] = None, density: Optional[float] = None,
                         majority_sign_method: str = "total",
                         generator: Optional[torch.Generator] = None) -> None:
    """Add ``adapter_name``: the ``weights``-weighted combination of LoRA ``adapters``.

    See the module docstring for each ``combination_type``. The new adapter is inactive (call
    ``set_adapter``), has scale 1 and targets every module any source targets. ``density`` is
    required by the pruning types; ``generator`` makes DARE's random drops reproducible.
    Nothing changes on any error.
    """
    adapters, weights = list(adapters), [float(w) if isinstance(w, int) else w for w in weights]
    _check(peft_model, adapters, weights, adapter_name, combination_type, density, majority_sign_method)
    kind = "linear" if len(adapters) == 1 else combination_type
    host = peft_model.base_model
    plan, copies = {}, {}
    for path, site in sites(host.model):
        parts = [(site.deltas[a], w) for a, w in zip(adapters, weights) if a in site.deltas]
        lora = [(d, w) for d, w in parts if not isinstance(d, ModuleCopy)]
        if len(lora) != len(parts):
            if len(parts) > 1:
                raise ValueError(f"{path} is a modules_to_save copy in {len(parts)} of the adapters; such "
                                 "full copies cannot be combined. Keep it in at most one source adapter.")
            copies[path] = parts[0][0]
        elif lora:
            plan[path] = (lora, _site_rank(kind, path, lora, svd_rank))
    if not plan:
        raise ValueError(f"The adapters {adapters} have no LoRA layers to combine.")
    cfgs = [peft_model.peft_config[a] for a in adapters]
    ranks = Counter(r for _, r in plan.values())
    r = max(ranks, key=lambda k: (ranks[k], k))  # most common rank; ties -> the larger
    per_site = {re.escape(p): rank for p, (_, rank) in plan.items() if rank != r}
    saved = sorted({m for c in cfgs for m in (c.modules_to_save or [])}) or None
    config = dataclasses.replace(
        cfgs[0], r=r, lora_alpha=r, rank_pattern=per_site, alpha_pattern=dict(per_site), use_rslora=False,
        use_dora=False, init_lora_weights=True, lora_dropout=0.0, exclude_modules=None,
        layers_to_transform=None, layers_pattern=None, modules_to_save=saved,
        target_modules=_target_modules(host, cfgs, plan),
    )
    results = {}
    for path, (parts, rank) in plan.items():
        if kind == "cat":
            results[path] = _cat_combined(parts)
        elif kind in SVD_TYPES:
            results[path] = _svd_combined(kind, parts, rank, density, majority_sign_method, generator,
                                          svd_clamp, svd_full_matrices, svd_driver)
        else:
            results[path] = _factors_combined(kind, parts, density, majority_sign_method, generator)
    host.inject(adapter_name, config)
    try:
        for path, (a2, b2) in results.items():
            a, b = _factor_params(host.model.get_submodule(path).deltas[adapter_name])
            a.copy_(a2.reshape(a.shape).to(a))
            b.copy_(b2.reshape(b.shape).to(b))
        for path, src in copies.items():
            host.model.get_submodule(path).deltas[adapter_name].module.load_state_dict(src.module.state_dict())
    except BaseException:
        host.delete_adapter(adapter_name)
        raise
