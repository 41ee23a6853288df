"""Mixed-adapter batches for LoRA: every row with its own adapter, in two batched matmuls.

S-LoRA (Sheng et al. 2023, arXiv:2311.03285) and Punica (Chen et al. 2023, arXiv:2310.18547)
serve many LoRA adapters on one base by gathering, for each row of the batch, that row's own
``A`` and ``B`` and running one batched product for all rows ("BGMV"). The same idea here::

    rows x (T, in)  ──bmm──►  A_row^T (in, r)  ──►  (T, r) * s_row  ──bmm──►  B_row^T (r, out)
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


def lora_mixed(deltas, rows, x: torch.Tensor, y: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``y`` with each group of rows ``rows[i]`` adapted by LoRA ``deltas[i]`` (plain LoRA only);
    ``inplace``: the Site owns ``y`` (core/site.py's rule), so the products accumulate into it."""
    routing = current_routing()
    if routing is not None and routing.reuse and not torch.is_grad_enabled():
        key = ("lora", tuple(map(id, deltas)), tuple(map(id, rows)))
        hit = routing.memo.get(key)
        if hit is None:
            hit = routing.memo[key] = _gather(deltas, rows, x, routing)
    else:
        hit = _gather(deltas, rows, x, routing)
    a, b, scale = hit
    x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)
    h = torch.bmm(x3, a)                                                      # n, T, r
    alpha = 1.0
    if isinstance(scale, float):
        alpha = scale  # one scale for every adapter: folded into the product below
    else:
        h = h * scale  # per-row scales on the small (n, T, r) side, not on the stacked B
    if y.dtype != b.dtype or not y.is_contiguous():
        return y + (torch.bmm(h, b) * alpha).view(y.shape).to(y.dtype)
    y3 = y.view(y.shape[0], -1, y.shape[-1])
    if inplace:
        y3.baddbmm_(h, b, alpha=alpha)
        return y
    return torch.baddbmm(y3, h, b, alpha=alpha).view(y.shape)                # y + s h B^T, one kernel


def _row_groups(rows, n: int, routing) -> list[int]:
    """For each of the ``n`` batch rows, the index of its group in ``rows`` (``len(rows)`` for rows
    of no group). The same row tensors reach every layer of one forward, so this is built once per
    forward (kept in the routing's memo) rather than once per layer."""
    key = ("lora_rows", n, tuple(map(id, rows)))
    memo = routing.memo if routing is not None else {}
    hit = memo.get(key)
    if hit is None:
        which = [len(rows)] * n
        for g, idx in enumerate(rows):
            for i in idx.tolist():
                which[i] = g
        hit = memo[key] = (which, rows)  # rows kept so that their ids stay valid
    return hit[0]


def _gather(deltas, rows, x: torch.Tensor, routing=None):
    """Per-row (A^T: n x in x r, B^T: n x r x out, scale) for every row of the batch, in row order.

    ``scale`` is one float when every adapter here has the same ``s`` (the product then takes it
    as ``alpha``), else an (n, 1, 1) tensor of per-row scales applied to ``A x``: either way the
    stacked ``B`` (the largest tensor here) is written once and never rescaled.

    Each adapter's factors are fetched once per layer (plus a zero entry for rows of no adapter
    here: ``__base__`` or an adapter without this site) and stacked straight into row order, so
    every row's factors are copied once and the Python work per row is one list lookup.
    """
    rmax = max(d.r for d in deltas)
    a_list, b_list = [], []
    for d in deltas:
        a, b = d.lora_A, d.lora_B
        if d.r < rmax:
            a = F.pad(a, (0, 0, 0, rmax - d.r))
            b = F.pad(b, (0, rmax - d.r))
        a_list.append(a)
        b_list.append(b)
    a_list.append(a_list[0].new_zeros(a_list[0].shape))
    b_list.append(b_list[0].new_zeros(b_list[0].shape))
    which = _row_groups(rows, x.shape[0], routing)
    a = torch.stack([a_list[w] for w in which]).transpose(1, 2)               # n, in, r
    b = torch.stack([b_list[w] for w in which]).transpose(1, 2)               # n, r, out
    scales = {d.scaling for d in deltas}
    if len(scales) == 1:
        return a, b, scales.pop()
    per_adapter = [d.scaling for d in deltas] + [0.0]
    scale = torch.tensor([per_adapter[w] for w in which], dtype=b.dtype, device=b.device)
    return a, b, scale.view(-1, 1, 1)
