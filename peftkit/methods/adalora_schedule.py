"""AdaLoRA's budget schedule and importance-based rank pruning (Zhang et al. 2023, section 3).

One call per training step drives it, after ``optimizer.step()`` and before ``zero_grad()``::

    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    model.base_model.update_and_allocate(step)
    optimizer.zero_grad()

Importance of each entry w of P, Λ, Q: ``I = |w * dL/dw|``, smoothed ``Ī ← β1 Ī + (1-β1) I`` and
its uncertainty ``Ū ← β2 Ū + (1-β2) |I - Ī|``; the score is ``Ī * Ū``. A triplet i's score is
``s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``. The budget (total rank over all layers) is::

    b(t) = init_bgt                                       t <= tinit
         = target_bgt + (init_bgt - target_bgt) (1 - (t - tinit) / (T - tfinal - tinit))^3
         = target_bgt                                     t >= T - tfinal

and every ``deltaT`` steps the ``init_bgt - b(t)`` lowest-scoring triplets get Λ_i = 0. At
``t = T - tfinal`` the final mask is fixed (``config.rank_pattern``) and re-applied afterwards.
"""
from __future__ import annotations

import torch

from ..core.inject import sites


def adapter_deltas(host, name: str) -> list:
    """(module path, AdaLoraDelta) for every layer of adapter ``name``."""
    return [(path, site.deltas[name]) for path, site in sites(host.model) if name in site.deltas]


def _trainable_adalora(host) -> str:
    names = [n for n in host.active_adapters
             if host.peft_config[n].peft_type == "ADALORA" and not host.peft_config[n].inference_mode]
    if len(names) != 1:
        raise ValueError(f"update_and_allocate needs exactly one active, trainable AdaLoRA adapter; found "
                         f"{names or 'none'} among active adapters {host.active_adapters}. Use "
                         "set_adapter(name) and load with is_trainable=True.")
    return names[0]


class RankAllocator:
    """Importance statistics and the budget schedule for one adapter."""

    def __init__(self, config, deltas: list):
        self.config = config
        self.init_bgt = sum(d.lora_A.shape[0] for _, d in deltas)
        self.target_bgt = config.target_r * len(deltas)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        """Forget the smoothed importance (after the final mask is fixed)."""
        self.avg_ipt: dict[tuple, torch.Tensor] = {}
        self.avg_unc: dict[tuple, torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at ``step``, whether to mask at this step)."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        frac = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * frac ** 3 + self.target_bgt), step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self, deltas: list) -> None:
        """Fold this step's ``|w * grad|`` into the smoothed importance and uncertainty."""
        b1, b2 = self.config.beta1, self.config.beta2
        for path, d in deltas:
            for pname in ("lora_A", "lora_B", "lora_E"):
                p = getattr(d, pname)
                if p.grad is None:
                    raise RuntimeError(f"{path}.{pname} has no gradient: call update_and_allocate(step) after "
                                       "loss.backward() and before optimizer.zero_grad().")
                key = (path, pname)
                ipt = (p * p.grad).abs()
                avg = self.avg_ipt.get(key, torch.zeros_like(p))
                unc = self.avg_unc.get(key, torch.zeros_like(p))
                avg = b1 * avg + (1 - b1) * ipt
                self.avg_ipt[key] = avg
                self.avg_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def _score(self, path: str, pname: str) -> torch.Tensor:
        return self.avg_ipt[(path, pname)] * self.avg_unc[(path, pname)]

    @torch.no_grad()
    def mask_to_budget(self, deltas: list, budget: int) -> dict[str, list[bool]]:
        """Zero the lowest-scoring triplets so that ``budget`` remain; returns the rank pattern."""
        scores = {}
        for path, d in deltas:
            s = self._score(path, "lora_E").view(-1)
            s = s + self._score(path, "lora_A").mean(dim=1) + self._score(path, "lora_B").mean(dim=0)
            scores[path] = s
        k = self.init_bgt - budget
        pattern = {}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values.item() if k > 0 else None
        for path, d in deltas:
            keep = scores[path] > threshold if threshold is not None else torch.ones_like(scores[path], dtype=torch.bool)
            d.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            d.mask = keep
            pattern[f"{path}.lora_E"] = keep.tolist()
        return pattern


@torch.no_grad()
def _apply_pattern(deltas: list, pattern: dict) -> None:
    for path, d in deltas:
        keep = torch.tensor(pattern[f"{path}.lora_E"], dtype=torch.bool, device=d.lora_E.device)
        d.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
        d.mask = keep


def update_and_allocate(host, global_step: int) -> None:
    """Update importance scores and prune ranks for the active AdaLoRA adapter (once per step)."""
    name = _trainable_adalora(host)
    config = host.peft_config[name]
    deltas = adapter_deltas(host, name)
    alloc = getattr(config, "_allocator", None)
    if alloc is None:
        alloc = config._allocator = RankAllocator(config, deltas)  # not a dataclass field: never saved
    end = config.total_step - config.tfinal
    if global_step < end:
        alloc.update_ipt(deltas)
        budget, mask = alloc.budget(global_step)
        if mask:
            config.rank_pattern = alloc.mask_to_budget(deltas, budget)
    elif global_step == end:
        config.rank_pattern = alloc.mask_to_budget(deltas, alloc.target_bgt)
        alloc.reset_ipt()
    elif config.rank_pattern:
        _apply_pattern(deltas, config.rank_pattern)


def orth_regularization(host, adapter_name: str = None) -> torch.Tensor:
    """The regulariser's value ``mean ||PᵀP - I||_F, ||QQᵀ - I||_F`` (for logging; its gradient is
    already added in backward during training, see adalora.py)."""
    name = adapter_name or _trainable_adalora(host)
    total, n = 0.0, 0
    with torch.no_grad():
        for _, d in adapter_deltas(host, name):
            for gram in (d.lora_A @ d.lora_A.T, d.lora_B.T @ d.lora_B):
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                total = total + torch.linalg.matrix_norm(gram - eye)
                n += 1
    return torch.as_tensor(total / max(n, 1))
