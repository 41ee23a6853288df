"""LoRA on ``nn.MultiheadAttention`` (Hu et al., 2021, arXiv:2106.09685, section 4.2).

torch's attention layer keeps its query/key/value projection as one bare parameter
(``in_proj_weight``, 3E x E) and calls its output projection's weight directly, without running
``out_proj``'s forward, so neither can be wrapped as a layer. Both get a low-rank update, and the
layer runs with the updated weights::

    W_in'  = W_in  + s B_in  A_in        A_in:  r x E,  B_in:  3E x r
    W_out' = W_out + s B_out A_out       A_out: r x E,  B_out: E x r
    (attn_output, attn_weights) = MHA(query, key, value; W_in', W_out')

The layer's own code runs with the two weights substituted for the call
(``torch.func.functional_call``), so every option of its forward (masks, ``need_weights``,
``batch_first``) behaves as before and gradients reach the four factors; nothing is written into
the base weights unless the adapter is merged. As in Hugging Face PEFT: both projections are
adapted (there is no way to pick one), query/key/value must share the embedding size, there is no
dropout on the input (the update acts on the weights) and no DoRA; mixed-adapter batches are
refused. On disk: ``<mha>.lora_A.weight``/``lora_B.weight`` and
``<mha>.base_layer.out_proj.lora_A.weight``/``lora_B.weight``.

One deliberate difference: Hugging Face PEFT 0.21.2 adds the output projection's update twice
(by hand, then again by merging ``out_proj``; huggingface/peft#3774), so its forward computes
``W_out + 2 s B_out A_out``. peftkit applies the equation above; the same file then gives other
outputs in PEFT 0.21.2 than here (tests/test_lora_sites.py pins the difference).
"""
from __future__ import annotations

import torch
from torch import nn

from ...core.method import Delta
from ...core.site import current_routing
from .delta import LoraLinear


class LoraMultiheadAttention(Delta):
    """Low-rank updates of an attention layer's input and output projection weights."""

    lora_scaled = True
    mergeable = True
    replaces_base = True  # the whole attention runs here, with the updated weights
    peft_names = {"in_proj.lora_A": "lora_A.weight", "in_proj.lora_B": "lora_B.weight",
                  "out_proj.lora_A": "base_layer.out_proj.lora_A.weight",
                  "out_proj.lora_B": "base_layer.out_proj.lora_B.weight"}

    def __init__(self, base: nn.MultiheadAttention, **kw):
        super().__init__()
        e = base.embed_dim
        self.in_proj = LoraLinear(e, 3 * e, **kw)
        self.out_proj = LoraLinear(e, e, **kw)
        self.__dict__["_attn"] = base  # a plain reference: the Site owns the layer

    @property
    def r(self) -> int:
        """The rank of both updates."""
        return self.in_proj.r

    @property
    def scaling(self) -> float:
        """The scale of both updates (``alpha / r``)."""
        return self.in_proj.scaling

    @scaling.setter
    def scaling(self, value: float) -> None:
        self.in_proj.scaling = self.out_proj.scaling = value

    def replace(self, *args, **kwargs):
        """The attention layer's output with ``W_in'`` and ``W_out'`` (see the module docstring)."""
        if current_routing() is not None:
            raise TypeError("LoRA on nn.MultiheadAttention does not support mixed adapter batches "
                            "(adapter_names=...), as in Hugging Face PEFT; set_adapter() one adapter instead.")
        attn = self._attn
        weights = {"in_proj_weight": attn.in_proj_weight + _update(self.in_proj, attn.in_proj_weight),
                   "out_proj.weight": attn.out_proj.weight + _update(self.out_proj, attn.out_proj.weight)}
        return torch.func.functional_call(attn, weights, args, kwargs)

    def forward(self, x, y, base):  # not used by the Site (replaces_base), kept for direct calls
        return self.replace(x, x, x)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """``s B_in A_in`` (the output projection's update is merged with it, see :meth:`merge`)."""
        return _update(self.in_proj, base.in_proj_weight)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        base.in_proj_weight.add_(_update(self.in_proj, base.in_proj_weight))
        base.out_proj.weight.add_(_update(self.out_proj, base.out_proj.weight))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        base.in_proj_weight.sub_(_update(self.in_proj, base.in_proj_weight))
        base.out_proj.weight.sub_(_update(self.out_proj, base.out_proj.weight))


def _update(lora: LoraLinear, weight: torch.Tensor) -> torch.Tensor:
    """``s B A`` in ``weight``'s dtype."""
    return (lora.lora_B @ lora.lora_A * lora.scaling).to(weight.dtype)
