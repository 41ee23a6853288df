"""Predict the peak memory of a training step before loading anything.

``estimate_memory(model_or_config, method, batch_shape)`` adds up:

* **runtime**: the process before the model's tensors exist (Python, torch, transformers, the
  modeling code), measured as this process's resident memory right after the meta-device run
  below, which imports and initialises all of it (pass ``runtime_bytes`` to override);
* **weights**: the base model's parameters and buffers in ``dtype`` (ties counted once); with
  ``quantize``, each quantised ``nn.Linear`` at its packed size (4-bit: ``in*out/2`` bytes plus one
  block scale per 64 weights, itself 8-bit with double quantisation; 8-bit: ``in*out`` plus one
  fp32 scale per row);
* **adapter**, **gradients**, **optimizer**: the trainable parameters (fp32), their gradients,
  and AdamW's two moments (SGD: none);
* **activations**: every tensor autograd saves for backward, found by running the real forward on
  the ``meta`` device (no memory, no compute) under ``saved_tensors_hooks`` and summing distinct
  storages; plus the largest transient of backward, the gradient of the logits and of their
  fp32 log-softmax (``2 * batch * seq * vocab * 4`` bytes).

The model on ``meta`` is built from its config, so any architecture and any registered method
(LoRA, prefix tuning, IA3...) is measured by the same code that trains it. Quantised layers are
kept dense on ``meta`` for the forward (they save the same activations: their input).
Accuracy against measured peaks is in docs/scale.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_MIB = 1 << 20


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes per component; :attr:`total` is the predicted peak resident memory."""

    runtime: int
    weights: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    trainable_params: int

    @property
    def total(self) -> int:
        """Predicted peak resident memory of a training step, in bytes."""
        return self.runtime + self.weights + self.adapter + self.gradients + self.optimizer + self.activations

    def table(self) -> str:
        """A human-readable breakdown in MiB."""
        rows = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "trainable_params"]
        lines = [f"{n:<12} {v / _MIB:10.1f} MiB" for n, v in rows]
        lines.append(f"{'total':<12} {self.total / _MIB:10.1f} MiB   ({self.trainable_params:,} trainable params)")
        return "\n".join(lines)


def _rss() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux: the caller can pass runtime_bytes
        pass
    return 0


def _config_of(model_or_config: Any):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config
    if isinstance(model_or_config, nn.Module):
        cfg = getattr(model_or_config, "config", None)
        if cfg is None:
            raise TypeError("estimate_memory needs a transformers model (it rebuilds it from .config on meta)")
        return cfg
    if isinstance(model_or_config, str):
        return AutoConfig.from_pretrained(model_or_config)
    raise TypeError(f"expected a transformers model, config or model folder, got {type(model_or_config).__name__}")


def method_config(method: Union[str, Any], r: int = 8, target_modules: Optional[list] = None,
                  num_virtual_tokens: int = 20):
    """A PeftConfig for ``method``: a config is returned as is; a name gets typical settings.

    Names: ``lora``/``qlora`` (LoRA r on ``target_modules``, default q/v), ``prefix``,
    ``prompt``, ``ia3``.
    """
    if not isinstance(method, str):
        return method
    import peftkit

    name = method.lower().replace("-", "_")
    if name in ("lora", "qlora"):
        return peftkit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules or ["q_proj", "v_proj"],
                                  task_type="CAUSAL_LM")
    from .config import PeftConfig

    by_type = {"prefix": "PREFIX_TUNING", "prefix_tuning": "PREFIX_TUNING", "prompt": "PROMPT_TUNING",
               "prompt_tuning": "PROMPT_TUNING", "ia3": "IA3"}
    if name not in by_type:
        raise ValueError(f"Unknown method {method!r}; use lora, qlora, prefix, prompt, ia3 or pass a PeftConfig.")
    data: dict[str, Any] = {"peft_type": by_type[name], "task_type": "CAUSAL_LM"}
    if name.startswith(("prefix", "prompt")):
        data["num_virtual_tokens"] = num_virtual_tokens
    if name == "ia3" and target_modules:
        data["target_modules"] = target_modules
    return PeftConfig.from_dict(data)


class _CpuAttentionOnMeta(TorchFunctionMode):
    """On ``meta``, ``scaled_dot_product_attention`` falls back to its math form, which saves the
    full attention matrix; on a real CPU it runs the fused flash kernel, which saves only q, k, v,
    the output and the log-sum-exp. Route it to that kernel so the meta run saves what training will."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        dropout = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
        causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
        if mask is not None and mask.dtype == torch.bool:  # the CPU kernel converts it per call, and saves that
            mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(  # grouped k/v handled natively
            q, k, v, dropout, causal, attn_mask=mask, scale=kwargs.get("scale"))
        return out


def _quantized_bytes(linear: nn.Linear, mode: str, double_quant: bool) -> int:
    n = linear.in_features * linear.out_features
    bias = linear.out_features * 4 if linear.bias is not None else 0
    if mode in ("4bit", "nf4", "fp4"):
        blocks = -(-n // 64)
        scales = blocks + 4 * -(-blocks // 256) if double_quant else 4 * blocks
        return -(-n // 2) + scales + bias
    if mode in ("8bit", "int8-ao"):
        return n + 4 * linear.out_features + bias
    raise ValueError(f"unknown quantisation mode {mode!r}")


def _weights_bytes(model: nn.Module, dtype: torch.dtype, quantize: Optional[str], double_quant: bool) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quantised: set[int] = set()
    total = 0
    if quantize:
        for m in model.modules():
            if type(m) is nn.Linear and m is not head:
                total += _quantized_bytes(m, quantize, double_quant)
                quantised.update(id(p) for p in m.parameters(recurse=False))
    size = torch.empty((), dtype=dtype).element_size()
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or id(t) in quantised:
            continue
        seen.add(id(t))
        total += t.numel() * (size if t.is_floating_point() else t.element_size())
    return total


def estimate_memory(model_or_config: Any, method: Union[str, Any], batch_shape: tuple[int, int] = (4, 128), *,
                    quantize: Optional[str] = None, double_quant: bool = True, dtype: torch.dtype = torch.float32,
                    optimizer: str = "adamw", gradient_checkpointing: bool = False,
                    runtime_bytes: Optional[int] = None) -> MemoryEstimate:
    """Predict peak training memory for ``method`` on a model, for batches of ``batch_shape``.

    ``model_or_config``: a transformers model, its config, or a model folder. ``method``: a
    PeftConfig or a name (see :func:`method_config`); ``"qlora"`` implies ``quantize="4bit"``.
    ``optimizer``: ``"adamw"`` (two fp32 moments per trainable parameter) or ``"sgd"``.
    """
    from transformers import AutoModelForCausalLM

    from .model import get_peft_model

    if isinstance(method, str) and method.lower() == "qlora" and quantize is None:
        quantize = "4bit"
    cfg = method_config(method)
    config = _config_of(model_or_config)
    states = {"adamw": 2, "adam": 2, "sgd": 0}.get(optimizer.lower())
    if states is None:
        raise ValueError(f"optimizer must be adamw or sgd, not {optimizer!r}")
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        saved[s._cdata] = s.nbytes()
        return t

    b, s = batch_shape
    # meta as the default device: tensors a method creates on the fly (masks, prompts) land there too
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        weights = _weights_bytes(model, dtype, quantize, double_quant)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pm = get_peft_model(model, cfg)
        trainable = [p for p in pm.parameters() if p.requires_grad]
        n_train = sum(p.numel() for p in trainable)
        adapter = sum(p.numel() * 4 for p in trainable)  # adapters train in fp32
        ids = torch.zeros(b, s, dtype=torch.long)
        pm.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _CpuAttentionOnMeta():
            pm(input_ids=ids, labels=ids)
    for t in list(pm.parameters()) + list(pm.buffers()):  # weights saved for backward are counted above
        saved.pop(t.untyped_storage()._cdata, None)
    del pm, model
    # after the meta run, the process has imported and initialised everything training uses
    # (modeling code, autograd, attention kernels) but holds no tensor data
    runtime = _rss() if runtime_bytes is None else int(runtime_bytes)
    vocab = config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size
    transient = 2 * b * s * vocab * 4
    return MemoryEstimate(runtime=runtime, weights=weights, adapter=adapter, gradients=adapter,
                          optimizer=states * adapter, activations=sum(saved.values()) + transient,
                          trainable_params=n_train)


def register(subparsers) -> None:
    """Add ``peftkit estimate`` (peftkit/cli.py's registration hook)."""
    p = subparsers.add_parser("estimate", help="predict peak training memory before training",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder, .gguf file or 'smollm2' (default)")
    p.add_argument("--method", default="lora", help="lora, qlora, prefix, prompt, ia3 (default lora)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--target-modules", nargs="+", default=None, help="LoRA targets (default q_proj v_proj)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--quantize", choices=["4bit", "nf4", "fp4", "8bit"], default=None)
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 base weights")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--json", action="store_true", help="print the breakdown as JSON")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from .models import resolve

    path = resolve(args.model, log=lambda m: None)
    method = method_config(args.method, r=args.r, target_modules=args.target_modules)
    quantize = args.quantize or ("4bit" if args.method.lower() == "qlora" else None)
    est = estimate_memory(path, method, (args.batch_size, args.seq_len), quantize=quantize,
                          dtype=getattr(torch, args.dtype), optimizer=args.optimizer,
                          gradient_checkpointing=args.gradient_checkpointing)
    if args.json:
        print(json.dumps({**dataclasses.asdict(est), "total": est.total}))
    else:
        print(f"{os.path.basename(path.rstrip('/'))}, {args.method}, batch {args.batch_size}x{args.seq_len}"
              + (f", {quantize} base" if quantize else ""))
        print(est.table())
    return 0
