"""Mixed-adapter batches for LoRA: every row with its own adapter, in two batched matmuls.

S-LoRA (Sheng et al. 2023, arXiv:2311.03285) and Punica (Chen et al. 2023, arXiv:2310.18547)
serve many LoRA adapters on one base by gathering, for each row of the batch, that row's own
``A`` and ``B`` and running one batched product for all rows ("BGMV"). The same idea here::

    rows x (T, in)  ──bmm──►  A_row^T (in, r)  ──►  (T, r)  ──bmm──►  B_row^T (r, out) * s_row
    y[rows] += result                                        (one kernel per step, not per adapter)

The per-row factors are stacked from references to each adapter's parameters, so the work
depends on the number of rows, not on how many adapters are loaded, and training through a
mixed batch updates each row's own adapter. During generation (a routing marked ``reuse``) and
without gradients, the stacked factors of each site are kept for the block, so decode steps
only run the products. Ranks that differ are zero-padded to the largest (zero rows/columns add
nothing).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core.site import current_routing


def lora_mixed(deltas, rows, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` with each group of rows ``rows[i]`` adapted by LoRA ``deltas[i]`` (plain LoRA only)."""
    routing = current_routing()
    if routing is not None and routing.reuse and not torch.is_grad_enabled():
        key = ("lora", tuple(map(id, deltas)), tuple(map(id, rows)))
        hit = routing.memo.get(key)
        if hit is None:
            hit = routing.memo[key] = _gather(deltas, rows, x)
    else:
        hit = _gather(deltas, rows, x)
    a, b, covered = hit
    xs = x.index_select(0, covered).to(a.dtype)
    shape = xs.shape
    h = torch.bmm(xs.reshape(shape[0], -1, shape[-1]), a)                    # n, T, r
    out = torch.bmm(h, b)                                                     # n, T, out
    return y.index_add(0, covered, out.reshape(*shape[:-1], -1).to(y.dtype))


def _gather(deltas, rows, x: torch.Tensor):
    """Per-row (A^T: n x in x r, s B^T: n x r x out) and the rows they cover, in that order."""
    rmax = max(d.r for d in deltas)
    a_rows, b_rows, scales = [], [], []
    for d, idx in zip(deltas, rows):
        a, b = d.lora_A, d.lora_B
        if d.r < rmax:
            a = F.pad(a, (0, 0, 0, rmax - d.r))
            b = F.pad(b, (0, rmax - d.r))
        k = idx.numel()
        a_rows += [a] * k
        b_rows += [b] * k
        scales += [d.scaling] * k
    dtype = a_rows[0].dtype
    covered = torch.cat(rows) if len(rows) > 1 else rows[0]
    a = torch.stack(a_rows).transpose(1, 2)                                   # n, in, r
    scale = torch.tensor(scales, dtype=dtype, device=x.device).view(-1, 1, 1)
    b = torch.stack(b_rows).transpose(1, 2) * scale                           # n, r, out
    return a, b, covered
