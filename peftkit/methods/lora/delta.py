"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv:2106.09685), with DoRA and rsLoRA variants.

Family: reparametrisation-based (Lialin et al. 2023, section 9).

Equation, for a frozen weight ``W`` (out x in) and input ``x``::

    y = W x + s * B (A dropout(x)),   A: r x in,  B: out x r,  s = alpha / r

    x ──► W ──────────────► (+) ──► y
    └──► dropout ─► A (r) ─► B ─► * s ─┘

rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) only changes the scale to ``s = alpha / sqrt(r)``,
which keeps the update's magnitude stable as r grows.

DoRA (Liu et al. 2024, arXiv:2402.09353) splits the weight into magnitude and direction::

    W' = m * (W + s B A) / ||W + s B A||_c        (norm per output row, detached)
    y  = W'x = y_base + (g - 1) * (W x) + g * s * B A x,   g = m / ||W + s B A||_c

with ``m`` initialised to ``||W||_c`` so training starts at the base model. Following the paper
(section 4.3) the norm is treated as a constant in backward.

Initialisation (``init_lora_weights``): A Kaiming-uniform and B = 0 (the update starts at 0);
"gaussian": A ~ N(0, 1/r); PiSSA/OLoRA: see init.py. Embeddings follow the LoRA reference:
A = 0, B ~ N(0, 1).

Site types: ``nn.Linear`` and GPT-2's ``Conv1D`` (weight stored in x out), ``nn.Embedding``
(A: r x num_embeddings, B: dim x r, applied as a lookup), ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``
(A is a conv with the base kernel, B a 1x1 conv, grouped like the base), ``nn.MultiheadAttention``
(mha.py). Every type is seen through one 2-D view of its weight, ``W2`` (out x in_flat), so merging
and DoRA are written once.

``lora_bias=True`` (PEFT's option) gives ``B`` a bias ``b``: ``y = W x + s (B A x + b)``; merging
adds ``s b`` to the base layer's bias, which must exist.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...core.method import Delta, new_parameter
from ...quant.backend import dequantize
from .._shared import embed_scale


def _frozen(t: torch.Tensor) -> nn.Parameter:
    """``t`` as a Parameter that does not require grad (nn.Parameter's constructor, minus its checks)."""
    return torch.Tensor._make_subclass(nn.Parameter, t, False)


class LoraDelta(Delta):
    """Shared LoRA/DoRA math; subclasses give the low-rank path and the 2-D weight view."""

    lora_scaled = True
    mergeable = True
    accumulates = True
    peft_names = {"magnitude": "lora_magnitude_vector"}
    channel_dim = -1  # where the output features sit in y

    def __init__(self, r: int, alpha: float, dropout: float, use_rslora: bool, use_dora: bool):
        super().__init__()
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout_p = float(dropout)  # functional: dropout 0 costs no call at all
        self.use_dora = use_dora
        self.magnitude: Optional[nn.Parameter] = None
        self.lora_B_bias: Optional[nn.Parameter] = None  # lora_bias=True: B's bias (linear, conv)
        self._merge_norm: Optional[torch.Tensor] = None

    # ----- per site type ----------------------------------------------------------
    def lora(self, x: torch.Tensor) -> torch.Tensor:
        """``B A x`` without scaling, in the site's output layout."""
        raise NotImplementedError

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A2: r x in_flat, B2: out x r) as matrices."""
        raise NotImplementedError

    def weight_2d(self, base: nn.Module) -> torch.Tensor:
        """The base weight as out x in_flat (a view where possible)."""
        return base.weight.reshape(base.weight.shape[0], -1)

    def from_2d(self, w2: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """Inverse of :meth:`weight_2d`."""
        return w2.reshape(base.weight.shape)

    def base_no_bias(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """``W x`` without bias, for DoRA when dropout changed the input."""
        raise NotImplementedError

    # ----- shared math ------------------------------------------------------------
    def lora_weight_2d(self) -> torch.Tensor:
        """``B2 @ A2`` (out x in_flat), unscaled."""
        a2, b2 = self.factors()
        return b2 @ a2

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """``s * B A`` in the base weight's native layout (plain LoRA only)."""
        w = self.lora_weight_2d().to(base.weight.dtype) * self.scaling
        return self.from_2d(w, base)

    def init_magnitude(self, base: nn.Module) -> None:
        """DoRA: m = ||W + s B A||_c, so the adapted model starts equal to the base."""
        with torch.no_grad():
            norm = self._weight_norm(base)
        self.magnitude = nn.Parameter(norm.to(torch.float32 if norm.dtype in (torch.float16, torch.bfloat16) else norm.dtype))

    def _weight_norm(self, base: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            w2 = self.weight_2d(base)
            lw = self.lora_weight_2d().to(w2.dtype)
            return torch.linalg.vector_norm(w2 + self.scaling * lw, dim=1)

    def _shape_gain(self, g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.channel_dim == -1:
            return g
        shape = [1] * y.dim()
        shape[self.channel_dim] = -1
        return g.view(shape)

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout on the adapter's input (identity when p = 0 or in eval mode)."""
        return F.dropout(x, self.dropout_p, self.training) if self.dropout_p and self.training else x

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """``y + s B A dropout(x)`` as a new tensor (DoRA: see the module docstring)."""
        if self.magnitude is not None:
            return self._dora(x, y, base)
        return self.add_update(self.dropout(x), y, inplace=False)

    def forward_into(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """As :meth:`forward`, the update added into ``y`` in place (the Site owns it)."""
        if self.magnitude is not None:
            return self._dora(x, y, base)
        return self.add_update(self.dropout(x), y, inplace=True)

    def add_update(self, x: torch.Tensor, y: torch.Tensor, inplace: bool) -> torch.Tensor:
        """``y + s B A x``: the one place LoRA's update is written (``x`` after dropout; for
        linear layers the same sum as one ``addmm``, see :meth:`LoraLinear.add_update`)."""
        z = self.lora(x)  # with lora_bias, B's bias is part of the conv here
        return y.add_(z, alpha=self.scaling) if inplace else torch.add(y, z, alpha=self.scaling)

    def _dora(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        g = self.magnitude.reshape(-1) / self._weight_norm(base).to(self.magnitude.dtype)
        g = self._shape_gain(g, y)
        if not (self.dropout_p and self.training):
            base_out = y
            bias = getattr(base, "bias", None)
            if bias is not None:
                base_out = y - self._shape_gain(bias, y)
            lora_out = self.lora(x)
        else:
            xd = self.dropout(x)
            base_out = self.base_no_bias(xd, base)
            lora_out = self.lora(xd)
        return y + (g - 1) * base_out + g * self.scaling * lora_out

    def _merge_bias(self, base: nn.Module, sign: float) -> None:
        if self.lora_B_bias is None:
            return
        if getattr(base, "bias", None) is None:
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
        base.bias.data.add_(self.lora_B_bias.reshape(-1).to(base.bias.dtype), alpha=sign * self.scaling)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        if self.magnitude is None:
            self._merge_bias(base, 1.0)
            return super().merge(base)
        w2 = self.weight_2d(base)
        new = w2 + self.scaling * self.lora_weight_2d().to(w2.dtype)
        norm = torch.linalg.vector_norm(new, dim=1)
        self._merge_norm = norm
        new = (self.magnitude.reshape(-1).to(w2.dtype) / norm).unsqueeze(1) * new
        base.weight.data.copy_(self.from_2d(new, base))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        if self.magnitude is None:
            self._merge_bias(base, -1.0)
            return super().unmerge(base)
        w2 = self.weight_2d(base)
        old = w2 / (self.magnitude.reshape(-1).to(w2.dtype) / self._merge_norm).unsqueeze(1)
        old = old - self.scaling * self.lora_weight_2d().to(w2.dtype)
        base.weight.data.copy_(self.from_2d(old, base))
        self._merge_norm = None

    @classmethod
    def forward_mixed(cls, deltas, rows, x, y, base, inplace=False):
        """Plain LoRA on linear layers: one gathered batched product for all rows (mixed.py).

        DoRA, active dropout and other site types return None: the Site then runs each
        adapter on its own rows.
        """
        if cls is not LoraLinear or any(d.magnitude is not None or d.lora_B_bias is not None
                                        or (d.dropout_p and d.training) for d in deltas):
            return None
        from .mixed import lora_mixed

        return lora_mixed(deltas, rows, x, y, inplace)


class LoraLinear(LoraDelta):
    """LoRA on ``nn.Linear`` (and on GPT-2's ``Conv1D`` with ``fan_in_fan_out``).

    ``lora_A`` (r x in) and ``lora_B`` (out x r) are bare parameters of this one module, not two
    ``nn.Linear`` children: a site then costs one Python module instead of three, which is what
    bounds the memory and load time of hundreds of adapters. On disk they keep PEFT's
    ``lora_A.weight``/``lora_B.weight`` names.
    """

    peft_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_B_bias": "lora_B.bias",
                  **LoraDelta.peft_names}

    def __init__(self, in_features: int, out_features: int, fan_in_fan_out: bool = False,
                 lora_bias: bool = False, **kw):
        super().__init__(**kw)
        self.fan_in_fan_out = fan_in_fan_out
        # uninitialised: init.initialise() fills them, or a checkpoint load supplies them
        self.lora_A = new_parameter(self.r, in_features)
        self.lora_B = new_parameter(out_features, self.r)
        if lora_bias:
            self.lora_B_bias = nn.Parameter(torch.zeros(out_features))

    def lora(self, x):
        return F.linear(F.linear(x, self.lora_A), self.lora_B, self.lora_B_bias)

    def add_update(self, x, y, inplace):
        """``y + s B (A x)`` as one ``addmm`` on 2-D views: the add happens inside the matrix
        product and the scale lands on the small (tokens x r) side in backward. Other dtypes
        (autocast, a half-precision base under an fp32 adapter) or layouts add ``B (A x)``."""
        h = F.linear(x, self.lora_A)
        b, bias = self.lora_B, self.lora_B_bias
        if y.dtype != b.dtype or h.dtype != b.dtype or not y.is_contiguous():
            z = F.linear(h, b, bias)
            return y.add_(z, alpha=self.scaling) if inplace else torch.add(y, z, alpha=self.scaling)
        y2 = y if y.dim() == 2 else y.view(-1, y.shape[-1])
        h2 = h if h.dim() == 2 else h.reshape(-1, self.r)
        if inplace:
            y2.addmm_(h2, b.t(), alpha=self.scaling)
        else:
            y2 = torch.addmm(y2, h2, b.t(), alpha=self.scaling)
        if bias is not None:
            y2 = y2.add_(bias, alpha=self.scaling)  # y2 is the Site's or new here
        return y if inplace else y2.view(y.shape)

    def factors(self):
        return self.lora_A, self.lora_B

    # ----- packing (core/packed.py): a row is (A offset, B offset, r, in, out), the float s ----
    pack_width = 5

    def packable(self) -> bool:
        """Plain LoRA only: DoRA's magnitude and merge state are not packed."""
        return (self.magnitude is None and self._merge_norm is None and self.lora_B_bias is None
                and not self._forward_hooks)

    def pack_tensors(self):
        """``A`` then ``B``."""
        return self.lora_A, self.lora_B

    def pack_row(self, offsets):
        """(A offset, B offset, r, in, out) and the scale ``s``."""
        return [offsets[0], offsets[1], self.r, self.lora_A.shape[1], self.lora_B.shape[0]], self.scaling

    def pack_meta(self):
        """What every site of one adapter shares: the Conv1D layout flag and the dropout."""
        return (self.fan_in_fan_out, self.dropout_p)

    @classmethod
    def from_pack(cls, flat, ints, value, meta):
        """A frozen LoraLinear over views of ``flat`` (no copy, no autograd state)."""
        off_a, off_b, r, n_in, n_out = ints
        view = cls.__new__(cls)
        Delta.__init__(view)
        view.__dict__.update(r=r, alpha=value * r, scaling=value, dropout_p=meta[1], use_dora=False,
                             magnitude=None, lora_B_bias=None, _merge_norm=None, fan_in_fan_out=meta[0])
        base = flat.storage_offset()  # one as_strided per factor: views are built on every switch
        view._parameters["lora_A"] = _frozen(flat.as_strided((r, n_in), (n_in, 1), base + off_a))
        view._parameters["lora_B"] = _frozen(flat.as_strided((n_out, r), (r, 1), base + off_b))
        return view

    def unpacked(self):
        """A LoraLinear with its own (copied) frozen parameters."""
        a, b = self.lora_A.detach(), self.lora_B.detach()
        flat = torch.cat([a.reshape(-1), b.reshape(-1)])  # the copy: one new storage for both
        own = LoraLinear.from_pack(flat, [0, a.numel(), self.r, a.shape[1], b.shape[0]], self.scaling,
                                   self.pack_meta())
        own.__dict__.update(alpha=self.alpha, training=self.training)
        return own

    def weight_2d(self, base):
        w = dequantize(base)  # the dense weight behind a quantised base (DoRA's norms); else base.weight
        return w.T if self.fan_in_fan_out else w

    def from_2d(self, w2, base):
        return w2.T if self.fan_in_fan_out else w2

    def base_no_bias(self, x, base):
        return F.linear(x, self.weight_2d(base).to(x.dtype))


class LoraEmbedding(LoraDelta):
    """LoRA on ``nn.Embedding``: ``y = E[x] + s * (A^T[x]) B^T``; no dropout on token ids.

    A scaled word embedding (Gemma, BART: ``y = c * E[x]``) scales the update alike,
    ``y = c * (E[x] + s * (A^T[x]) B^T)``, which is what the merged weight ``E + s (B A)^T`` gives."""

    peft_names = {"lora_embedding_A": "lora_embedding_A", "lora_embedding_B": "lora_embedding_B",
                  **LoraDelta.peft_names}

    def __init__(self, num_embeddings: int, embedding_dim: int, base: nn.Embedding, **kw):
        kw["dropout"] = 0.0
        super().__init__(**kw)
        self.lora_embedding_A = new_parameter(self.r, num_embeddings)
        self.lora_embedding_B = new_parameter(embedding_dim, self.r)
        self._embed_kw = dict(padding_idx=base.padding_idx, max_norm=base.max_norm,
                              norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                              sparse=base.sparse)
        #: the embedding itself, when it scales its lookups (a plain reference: the Site owns it)
        self.__dict__["_scaled_base"] = base if hasattr(base, "embed_scale") else None

    def lora(self, x):
        out = F.embedding(x, self.lora_embedding_A.T, **self._embed_kw) @ self.lora_embedding_B.T
        scaled = self.__dict__.get("_scaled_base")
        if scaled is not None and (c := embed_scale(scaled)) is not None:
            out = out * c.to(out.dtype)
        return out

    def factors(self):
        return self.lora_embedding_A, self.lora_embedding_B

    def weight_2d(self, base):
        return base.weight.T  # (dim, num): output features first

    def from_2d(self, w2, base):
        return w2.T

    def base_no_bias(self, x, base):
        return F.embedding(x, base.weight, **self._embed_kw)


class LoraConv(LoraDelta):
    """LoRA on ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``: A is a conv with the base kernel, B a
    1x1 conv with the base's groups (``r`` must then be a multiple of ``groups``, as in PEFT).

    Both kernels are bare parameters (``lora_A``: r x in x k..., ``lora_B``: out x r/groups x 1...),
    saved under PEFT's ``lora_A.weight``/``lora_B.weight``. A grouped B has no dense ``B A``
    product in the base kernel's layout, so grouped sites do not merge (as in PEFT).
    """

    peft_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_B_bias": "lora_B.bias",
                  **LoraDelta.peft_names}
    channel_dim = 1

    def __init__(self, base: nn.Module, lora_bias: bool = False, **kw):
        super().__init__(**kw)
        dims = base.weight.dim() - 2
        ones = (1,) * dims
        self._conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        self._conv_kw = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
        self.groups = base.groups
        self.lora_A = new_parameter(self.r, base.in_channels, *base.kernel_size)
        self.lora_B = new_parameter(base.out_channels, self.r // self.groups, *ones)
        if lora_bias:
            self.lora_B_bias = nn.Parameter(torch.zeros(base.out_channels))

    def lora(self, x):
        return self._conv(self._conv(x, self.lora_A, **self._conv_kw), self.lora_B, self.lora_B_bias,
                          groups=self.groups)

    def init_magnitude(self, base):
        """DoRA on convolutions keeps Hugging Face PEFT's magnitude shape (1, out, 1, ...)."""
        super().init_magnitude(base)
        shape = (1, -1) + (1,) * (base.weight.dim() - 2)
        self.magnitude = nn.Parameter(self.magnitude.detach().reshape(shape))

    def factors(self):
        return self.lora_A.reshape(self.r, -1), self.lora_B.reshape(self.lora_B.shape[0], -1)

    def lora_weight_2d(self):
        if self.groups > 1:
            raise NotImplementedError("Merging is not supported for LoRA on convolutions with groups > 1 (as in "
                                      "Hugging Face PEFT): keep the adapter unmerged; it runs as it is.")
        return super().lora_weight_2d()

    def base_no_bias(self, x, base):
        return base._conv_forward(x, base.weight.to(x.dtype), None)
