"""Mixed-adapter batches for LoRA: every row with its own adapter, in two batched matmuls.

S-LoRA (Sheng et al. 2023, arXiv:2311.03285) and Punica (Chen et al. 2023, arXiv:2310.18547)
serve many LoRA adapters on one base by gathering, for each row of the batch, that row's own
``A`` and ``B`` and running one batched product for all rows ("BGMV"). The same idea here::

    rows x (T, in)  ──bmm──►  A_row^T (in, r)  ──►  (T, r)  ──bmm──►  B_row^T (r, out) * s_row
    y += result (rows of no adapter: zero factors)           (one kernel per step, not per adapter)

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
    a, b = hit
    x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)
    h = torch.bmm(x3, a)                                                      # n, T, r
    if y.dtype != b.dtype or not y.is_contiguous():
        return y + torch.bmm(h, b).view(y.shape).to(y.dtype)
    y3 = y.view(y.shape[0], -1, y.shape[-1])
    if torch.is_grad_enabled():
        return torch.baddbmm(y3, h, b).view(y.shape)                         # y + h B^T, one kernel
    y3.baddbmm_(h, b)  # no autograd: y is the Site's own fresh base output
    return y


def _gather(deltas, rows, x: torch.Tensor):
    """Per-row (A^T: n x in x r, s B^T: n x r x out) for every row of the batch, in row order.

    Rows of no adapter here (``__base__`` or an adapter without this site) get zero factors, so
    the products run over the whole batch without gathering rows out and scattering them back.
    """
    rmax = max(d.r for d in deltas)
    n = x.shape[0]
    a_rows: list = [None] * n
    b_rows: list = [None] * n
    scales = [0.0] * n
    for d, idx in zip(deltas, rows):
        a, b = d.lora_A, d.lora_B
        if d.r < rmax:
            a = F.pad(a, (0, 0, 0, rmax - d.r))
            b = F.pad(b, (0, rmax - d.r))
        for i in idx.tolist():
            a_rows[i], b_rows[i], scales[i] = a, b, d.scaling
    if any(t is None for t in a_rows):
        za = a_rows[rows[0][0]].new_zeros(rmax, x.shape[-1])
        zb = b_rows[rows[0][0]].new_zeros(b_rows[rows[0][0]].shape)
        a_rows = [za if t is None else t for t in a_rows]
        b_rows = [zb if t is None else t for t in b_rows]
    dtype = a_rows[0].dtype
    a = torch.stack(a_rows).transpose(1, 2)                                   # n, in, r
    scale = torch.tensor(scales, dtype=dtype, device=x.device).view(-1, 1, 1)
    b = torch.stack(b_rows).transpose(1, 2) * scale                           # n, r, out
    return a, b
