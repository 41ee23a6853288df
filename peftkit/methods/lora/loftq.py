"""LoftQ: LoRA initialised from the quantisation error (``init_lora_weights="loftq"``).

Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
arXiv:2310.08659. A quantised base ``Q`` loses ``W - Q``; LoftQ starts the adapter from the best
rank-r approximation of that loss, alternating (``loftq_iter`` = T times)::

    R_0 = W
    Q_t = dequant(quant(W - L_{t-1} R_{t-1}))        (L_0 R_0 = 0)
    L_t R_t = SVD_r(W - Q_t):  L = U_r sqrt(S_r),  R = sqrt(S_r) V_r^T
    base <- Q_T,  lora_B = L_T (out x r),  lora_A = R_T (r x in)

    W (out x in) ─quant─► Q ─┐
       └──── W - Q ──SVD_r──► B (out x r) · A (r x in)

As in Hugging Face PEFT, ``B A`` approximates ``W - Q`` itself, so ``Q + s B A`` reproduces ``W``
best when the scale ``s = lora_alpha / r`` is 1 (a warning says so otherwise).

Quantisers (bitsandbytes' formats, computed here in plain torch, so no GPU is needed):

- 4 bits, NF4 (Dettmers et al. 2023, QLoRA): blocks of 64 consecutive values of the row-major
  weight, each scaled by its absmax to [-1, 1] and rounded to the nearest of 16 levels that are
  quantiles of N(0, 1) (8 positive, 7 negative, and an exact 0), then rescaled.
- 8 bits, LLM.int8()'s vector-wise format: the weight in float16, then per output row
  ``q = round(127 w / absmax_row)``.

Hugging Face PEFT 0.21 computes the same with bitsandbytes on a CUDA/XPU device; the tests run its
``loftq_init`` on CPU tensors and compare. :func:`replace_lora_weights_loftq` does LoftQ's single
step for a base that is already quantised (peftkit.quant), reading the original weights from the
model's safetensors file.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from ...config import ConfigError

NF4_BLOCK = 64


@dataclasses.dataclass
class LoftQConfig:
    """LoftQ's settings (pass with ``LoraConfig(init_lora_weights="loftq", loftq_config=...)``).

    Args:
        loftq_bits: 4 (NF4) or 8 (int8, row-wise).
        loftq_iter: alternating quantise / SVD rounds (>= 1).
    """

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        check_loftq(dataclasses.asdict(self))


def check_loftq(cfg: dict) -> None:
    """Refuse a LoftQ config PEFT could not run, naming what is allowed."""
    bits, it = cfg.get("loftq_bits", 4), cfg.get("loftq_iter", 1)
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ConfigError(f"loftq_bits={bits!r}: LoftQ quantises to 4 bits (NF4) or 8 bits (int8); pick 4 or 8.")
    if isinstance(it, bool) or not isinstance(it, int) or it < 1:
        raise ConfigError(f"loftq_iter={it!r} must be an integer >= 1 (alternating quantise/SVD rounds).")
    unknown = set(cfg) - {"loftq_bits", "loftq_iter"}
    if unknown:
        raise ConfigError(f"loftq_config has unknown keys {sorted(unknown)}; it takes loftq_bits and loftq_iter.")


@functools.lru_cache(maxsize=None)
def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels: N(0, 1) quantiles at evenly spaced probabilities, normalised to [-1, 1]."""
    top = 0.9677083  # the outermost probability QLoRA uses, so that the extreme levels are finite
    pos = torch.special.ndtri(torch.linspace(top, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(top, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.max()).float()


def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """``dequant(quant_nf4(w))`` for a float32 tensor, blocks of 64 in row-major order."""
    flat = w.reshape(-1)
    pad = (-flat.numel()) % NF4_BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)
    levels = nf4_levels().to(w.device)
    # nearest level: the midpoints between consecutive levels split [-1, 1] into 16 bins
    idx = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2)
    out = (levels[idx] * absmax).view(-1)
    return out[: flat.numel()].view(w.shape)


def int8_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """``dequant(quant_int8(w))`` for a float32 (out x in) matrix: LLM.int8()'s storage rounds the
    weight to float16 first, then keeps ``round(127 w / absmax_row)`` and the row's absmax."""
    w16 = w.to(torch.float16).to(torch.float32)
    absmax = w16.abs().amax(dim=1, keepdim=True)
    q = torch.round(w16 * (127.0 / absmax.clamp_min(torch.finfo(torch.float32).tiny)))
    return q * absmax * (1.0 / 127.0)  # an all-zero row stays zero


def _svd_factors(res: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L = U_r sqrt(S_r), R = sqrt(S_r) V_r^T) with ``L R`` the best rank-r approximation."""
    u, s, vh = torch.linalg.svd(res, full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


@torch.no_grad()
def loftq_init(weight: torch.Tensor, num_bits: int, reduced_rank: int, num_iter: int = 1):
    """LoftQ for one (out x in) weight: (Q in the weight's dtype, lora_A = R, lora_B = L), both fp32."""
    check_loftq({"loftq_bits": num_bits, "loftq_iter": num_iter})
    if weight.dim() != 2:
        raise ValueError(f"LoftQ takes a 2-D weight (out x in), got shape {tuple(weight.shape)}")
    roundtrip = nf4_roundtrip if num_bits == 4 else int8_roundtrip
    w = weight.detach().to(torch.float32)
    target = w
    for t in range(num_iter):
        q = roundtrip(target)
        low_b, low_a = _svd_factors(w - q, reduced_rank)
        if t + 1 < num_iter:
            target = w - low_b @ low_a
    return q.to(weight.dtype), low_a, low_b


def loftq_delta(delta, base: nn.Module, loftq_config: dict) -> None:
    """``init_lora_weights="loftq"`` at one site: the base weight becomes Q, the factors L and R."""
    from .delta import LoraLinear

    if not isinstance(delta, LoraLinear) or type(base) is not nn.Linear:
        raise ValueError("init_lora_weights='loftq' is implemented for nn.Linear layers only (as in PEFT); "
                         f"got {type(base).__name__}. Narrow target_modules to linear layers.")
    if abs(delta.scaling - 1.0) > 1e-12:
        warnings.warn(f"LoftQ sets B A to the quantisation residual itself (as PEFT does); with scale "
                      f"lora_alpha/r = {delta.scaling:g} the adapted layer starts at Q + {delta.scaling:g} (W - Q). "
                      "Set lora_alpha = r for an exact start.", stacklevel=4)
    q, a, b = loftq_init(base.weight, loftq_config.get("loftq_bits", 4), delta.r, loftq_config.get("loftq_iter", 1))
    delta.lora_A.data = a.to(delta.lora_A.dtype).contiguous()
    delta.lora_B.data = b.to(delta.lora_B.dtype).contiguous()
    base.weight.data.copy_(q)


def _weight_reader(peft_model, model_path: Optional[str]):
    """name -> original fp tensor, from a model.safetensors file (or a folder with one or shards)."""
    from safetensors import safe_open

    if model_path is None:
        cfg = getattr(peft_model.get_base_model(), "config", None)
        model_path = getattr(cfg, "_name_or_path", None)
        if not model_path or not os.path.exists(model_path):
            raise ValueError("replace_lora_weights_loftq needs model_path: the local folder or model.safetensors "
                             "file holding the base model's unquantised weights.")
    files = {}
    if os.path.isdir(model_path):
        single = os.path.join(model_path, "model.safetensors")
        index = os.path.join(model_path, "model.safetensors.index.json")
        if os.path.isfile(single):
            model_path = single
        elif os.path.isfile(index):
            import json

            with open(index, encoding="utf-8") as fh:
                files = {k: os.path.join(os.path.dirname(index), v) for k, v in json.load(fh)["weight_map"].items()}
        else:
            raise FileNotFoundError(f"{model_path}: no model.safetensors (or sharded index) in this folder")
    elif not os.path.isfile(model_path):
        raise FileNotFoundError(f"{model_path}: no such safetensors file")
    prefix = getattr(peft_model.get_base_model(), "base_model_prefix", "") or ""

    def read(name: str) -> torch.Tensor:
        for key in (name, name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None):
            if key is None:
                continue
            path = files.get(key, model_path) if files else model_path
            if path is None or not os.path.isfile(path):
                continue
            with safe_open(path, framework="pt", device="cpu") as fh:
                if key in fh.keys():
                    return fh.get_tensor(key)
        raise KeyError(f"{name} is not in {model_path}: is it the checkpoint this quantised model was made from?")

    return read


@torch.no_grad()
def replace_lora_weights_loftq(peft_model, model_path: Optional[str] = None, adapter_name: str = "default",
                               callback: Optional[Callable[[nn.Module, str], bool]] = None) -> None:
    """LoftQ for a model whose LoRA sites sit on quantised layers (PEFT's function of this name).

    Each quantised LoRA site gets ``B A = SVD_r(W - dequant(Q))`` from the original weight ``W`` in
    ``model_path`` (safetensors). ``callback(model, module_name)`` may return False to undo one
    site's replacement (e.g. when the logits did not get closer to the unquantised model's).
    """
    from ...core.site import Site
    from ...quant.backend import dequantize, is_quantized
    from .delta import LoraLinear

    read = _weight_reader(peft_model, model_path)
    found = False
    for path, site in peft_model.base_model.model.named_modules():  # model order, as PEFT goes
        if not isinstance(site, Site):
            continue
        delta = site.deltas._modules.get(adapter_name)
        if not isinstance(delta, LoraLinear) or not is_quantized(site.base_layer):
            continue
        found = True
        w = read(path + ".weight").to(torch.float32)
        low_b, low_a = _svd_factors(w - dequantize(site.base_layer).to(torch.float32), delta.r)
        old = (delta.lora_A.data, delta.lora_B.data)
        delta.lora_A.data = low_a.to(delta.lora_A.dtype).contiguous()
        delta.lora_B.data = low_b.to(delta.lora_B.dtype).contiguous()
        if callback is not None and not callback(peft_model, path):
            delta.lora_A.data, delta.lora_B.data = old
    if not found:
        raise ValueError(f"no LoRA adapter {adapter_name!r} on a quantised layer: quantise the base first "
                         "(peftkit.quant.quantize_model(model, '4bit')), then get_peft_model, then call this.")
