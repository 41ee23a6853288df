"""Padding-free batches: several examples in one row, attention kept inside each example.

A padded batch of ragged examples spends most of its compute on padding (Code Alpaca's longest
record in a batch of 8 is typically 2-3x the mean). :class:`PackedCollator` instead joins the
batch's examples end to end into a single row of ``sum(lengths)`` tokens, with

- ``position_ids`` restarting at 0 for every example, so rotary/learned positions are the ones
  each example would see alone;
- no ``attention_mask``: transformers (>= 4.44, here 5.x ``masking_utils``) then detects the
  packed layout from the restarting ``position_ids`` (``find_packed_sequence_indices``) and
  builds a block-diagonal causal mask for SDPA/eager/flex attention (flash-attention uses the
  same positions for its varlen kernel), so no token attends across an example boundary.
  ``peftkit train`` goes one step further for SDPA models and runs attention example by
  example (:mod:`peftkit.train.varlen`), without the dense ``(T, T)`` mask;
- the first label of every example set to -100, so the last token of one example is never
  trained to predict the first token of the next (alone, an example's first token is never a
  target either).

The shape sketch, for a batch of lengths 3 and 2::

    input_ids     [a0 a1 a2 b0 b1]          (1, 5)
    position_ids  [ 0  1  2  0  1]
    labels        [-100 a1 a2 -100 b1]      (targets after the usual shift: a1 a2 | b1)
    attention     a* sees a*, b* sees b*    block-diagonal causal

The loss summed over target tokens is then the same sum as the examples run one by one, and
divided by the batch's target count (Trainer's ``num_items_in_batch``) it is the exact per-token
mean of the padded batch. Whether a given model's attention honours the layout is checked, not
assumed: :func:`packing_mismatch` runs two short examples both ways before training and
``peftkit train`` falls back to length-grouped padded batches when they differ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .data import IGNORE


@dataclass
class PackedCollator:
    """Joins a list of encoded examples (``input_ids``, ``labels`` lists) into one padding-free row.

    Works as ``data_collator`` for transformers' ``Trainer`` with any causal LM whose attention
    supports packed ``position_ids`` (see the module docstring); the batch holds
    ``input_ids``, ``position_ids`` and ``labels``, each of shape ``(1, total_tokens)``, and
    ``use_cache=False``: transformers looks for the packed layout only when no KV cache is
    passed, and a model in training still makes one when its config says ``use_cache``
    (Llama does), which silently turns the block-diagonal mask into a plain causal one.
    """

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        """Concatenate ``batch`` into one row with per-example positions and boundary labels masked."""
        if not batch:
            raise ValueError("PackedCollator got an empty batch; expected at least one encoded example.")
        ids, pos, labels = [], [], []
        for b in batch:
            seq = b["input_ids"]
            lab = b.get("labels")
            if not isinstance(lab, list) or len(lab) != len(seq):
                raise ValueError("PackedCollator needs per-token 'labels' (a list as long as 'input_ids'); "
                                 "classification examples cannot be packed, use the padding Collator.")
            ids += seq
            pos += range(len(seq))
            labels += [IGNORE] + list(lab[1:])
        return {"input_ids": torch.tensor([ids], dtype=torch.long),
                "position_ids": torch.tensor([pos], dtype=torch.long),
                "labels": torch.tensor([labels], dtype=torch.long),
                "use_cache": False}


def packing_mismatch(model, sequences: list[list[int]], atol: Optional[float] = None) -> Optional[str]:
    """Why packing is not exact for ``model``, or None when it is.

    Runs ``sequences`` (token id lists; two short ones suffice) one by one and packed into one
    row, without gradients, and compares the logits. ``atol`` defaults to 1e-4 for float32
    weights and 5e-2 for 16-bit ones (their rounding differs between shapes).
    """
    if len(sequences) < 2:
        raise ValueError("packing_mismatch needs at least two sequences to pack together.")
    param = next(model.parameters())
    if atol is None:
        atol = 1e-4 if param.dtype == torch.float32 else 5e-2
    device = param.device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = [model(input_ids=torch.tensor([s], device=device), use_cache=False).logits[0]
                     for s in sequences]
            packed = PackedCollator()([{"input_ids": s, "labels": list(s)} for s in sequences])
            out = model(input_ids=packed["input_ids"].to(device), position_ids=packed["position_ids"].to(device),
                        use_cache=False).logits[0]
    except Exception as e:  # a model whose forward refuses position_ids or a packed row
        return f"the model's forward failed on a packed row ({type(e).__name__}: {e})"
    finally:
        model.train(was_training)
    diff = (out.float() - torch.cat(alone).float()).abs().max().item()
    if not diff <= atol:
        return (f"its attention crosses example boundaries in a packed row (logits differ by {diff:.2e} "
                f"from the examples run alone; attention implementation "
                f"{getattr(getattr(model, 'config', None), '_attn_implementation', '?')!r})")
    return None


@dataclass
class BatchPlan:
    """How ``peftkit train`` batches and scores: the collator, length grouping, the chunked-loss head."""

    collator: object
    packed: bool
    group_by_length: bool
    loss_head: object = None
    notes: tuple = ()
    attention_before: Optional[str] = None  # set when packed rows use varlen.packed_attention


def plan_batches(peft_model, train_set, pad_id: int, causal: bool, packing: bool = True,
                 group_by_length: bool = False, loss_chunk: int = -1, deepspeed: bool = False) -> BatchPlan:
    """Choose packing (when exact on this model), else padding (length-grouped as the fallback), and the chunked loss.

    Packed rows of an SDPA model run :mod:`peftkit.train.varlen`'s per-example attention (the
    model's ``_attn_implementation`` is switched; ``attention_before`` holds the old value).
    Packing is probed on the first two training examples (:func:`packing_mismatch`); when it is
    not exact the plan pads instead, grouping by length, and says why in ``notes``. The chunked
    loss needs a causal LM whose head is a frozen ``nn.Linear``, an adapter that does not
    rewrite the inputs (not a prompt method) and no DeepSpeed (ZeRO-3 shards the head's weight).
    """
    from ..core.prompt import PromptHost
    from .data import Collator
    from .loss import frozen_linear_head
    from .varlen import restore_attention, use_packed_attention

    notes = []
    attention_before = None
    prompt = isinstance(getattr(peft_model, "base_model", None), PromptHost)
    packed = False
    if packing and causal:
        if prompt:
            notes.append("packing off: prompt methods add virtual tokens to every row; padded batches, grouped by length")
        elif len(train_set) < 2:
            notes.append("packing off: fewer than two training examples")
        else:
            previous = use_packed_attention(peft_model)  # per-example SDPA where the model uses SDPA
            probe = [train_set[i]["input_ids"][:32] for i in range(2)]
            why = packing_mismatch(peft_model, probe)
            if why is None:
                packed, attention_before = True, previous
            else:
                restore_attention(peft_model, previous)
                notes.append(f"packing off: {why}; padded batches, grouped by length instead")
        group_by_length = group_by_length or not packed
    head = None
    if causal and loss_chunk != 0 and not prompt and not deepspeed:
        get_base = getattr(peft_model, "get_base_model", None)
        head = frozen_linear_head(get_base() if callable(get_base) else peft_model)
        if head is None:
            notes.append("chunked loss off: the output head is trained or not a plain nn.Linear; plain loss")
    collator = PackedCollator() if packed else Collator(pad_id)
    return BatchPlan(collator, packed, group_by_length and not packed, head, tuple(notes), attention_before)
