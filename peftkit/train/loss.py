"""The language-model loss in chunks, so the full ``(tokens, vocab)`` logits never exist at once.

At SmolLM2's 49,152-token vocabulary the LM head's logits are the largest activation of a
step: 2,000 tokens make 393 MB of float32 logits, and the plain loss keeps them, a float32
copy, the softmax and their gradient alive together. The approach of Liger Kernel's fused
linear cross-entropy (Hsu et al. 2024, arXiv:2410.10989) and Cut Cross-Entropy (Wijmans et al.
2024, arXiv:2411.09009) is used here: for the hidden states ``h`` of the *target* positions
only (tokens whose label is -100 need no logits at all), in chunks of ``c`` rows,

    z = h_c W^T + b                      (c, V)   logits of one chunk, in the head's dtype
    loss += sum_i logsumexp(z_i) - z_i[y_i]        in float32
    dL/dh_c = (softmax(z) - onehot(y)) W          (c, d)   computed now, kept

so only one chunk's logits live at a time and nothing is recomputed in backward: the forward
pass already produced the gradient of the summed loss with respect to ``h`` (an ``(n, d)``
tensor, 85x smaller than the logits at SmolLM2's sizes), and backward scales it by the incoming
gradient. The result is the summed cross-entropy, the same number (to float rounding) as
``F.cross_entropy(h W^T + b, y, reduction="sum")``; the caller divides by the token count.

The head's weight must be frozen (it is, for adapters that do not train the head); otherwise
use the plain loss. Shapes: ``h`` (n, d), ``W`` (V, d), ``b`` (V,) or None, ``y`` (n,).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE

#: default logits elements per chunk (32 MiB of float32)
CHUNK_ELEMENTS = 1 << 23


def chunk_rows(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that one chunk's logits hold about ``elements`` values."""
    return max(1, elements // max(1, vocab))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h W^T + b`` against ``y``, chunk by chunk (see the module docstring)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, rows: int):
        need_grad = h.requires_grad
        grad_h = torch.empty_like(h) if need_grad else None
        acc = torch.promote_types(h.dtype, torch.float32)  # float32 at least, as transformers' loss
        total = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, h.shape[0], rows):
            hc, yc = h[s:s + rows], targets[s:s + rows]
            z = F.linear(hc, weight, bias).to(acc)
            lse = torch.logsumexp(z, dim=-1)
            total += (lse - z.gather(1, yc[:, None]).squeeze(1)).sum()
            if need_grad:
                z.sub_(lse[:, None]).exp_()  # softmax, in place: the chunk's logits are not needed again
                z[torch.arange(z.shape[0], device=z.device), yc] -= 1.0
                grad_h[s:s + rows] = z.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_h if need_grad else torch.empty(0))
        ctx.need_grad = need_grad
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype) if ctx.need_grad else None), None, None, None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          targets: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
    """Summed cross-entropy of the logits ``h @ weight.T + bias`` against ``targets``, in chunks.

    ``h`` (n, d) may require grad; ``weight`` (V, d) and ``bias`` must not (a trained head needs
    the plain loss). ``rows`` per chunk defaults to :func:`chunk_rows` of the vocabulary.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("chunked_cross_entropy needs a frozen head (its weight gets no gradient here); "
                         "the head is trainable, so use the plain loss (peftkit train --loss-chunk 0).")
    if h.dim() != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"expected h of shape (n, d) and targets of shape (n,); got {tuple(h.shape)} "
                         f"and {tuple(targets.shape)}.")
    if h.shape[0] == 0:
        return h.sum() * 0.0
    return _ChunkedCrossEntropy.apply(h, weight, bias, targets, rows or chunk_rows(weight.shape[0]))


def causal_lm_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Linear,
                       rows: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss, target count) of a causal LM from its last hidden states.

    ``hidden`` (B, T, d) and ``labels`` (B, T) as a transformers causal LM takes them: position
    t predicts ``labels[t + 1]``, -100 is ignored. Only target positions get logits.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]
    return chunked_cross_entropy(h, head.weight, head.bias, targets[keep], rows), keep.sum()


def frozen_linear_head(model: nn.Module) -> Optional[nn.Linear]:
    """The model's output head when the chunked loss can stand in for it: a plain, frozen ``nn.Linear``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear or any(p.requires_grad for p in head.parameters()):
        return None
    return head


@contextlib.contextmanager
def head_bypassed(model: nn.Module, head: nn.Module):
    """Within the block, ``model``'s head is the identity, so the model returns its last hidden states
    as ``logits`` (for :func:`causal_lm_loss_sum`); the head is put back afterwards."""
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if child is head:
                setattr(module, attr, nn.Identity())
                try:
                    yield
                finally:
                    setattr(module, attr, head)
                return
    raise ValueError("head_bypassed: the head is not a submodule of the model.")
