"""Predict the peak memory of training before loading anything.

``estimate_memory(model_or_config, method, batch_shape)`` returns the parts of a training
step's peak resident memory (:attr:`MemoryEstimate.step_peak` is their sum), the peak while the
model is loaded (:attr:`MemoryEstimate.load_peak`), and :attr:`MemoryEstimate.total`, the higher
of the two. The parts:

* **runtime**: the process before the model's tensors exist (Python, torch, transformers, the
  modeling code, and bitsandbytes' native library when quantising), measured as this process's
  resident memory right after the meta-device run below, which imports and initialises all of it
  (pass ``runtime_bytes`` to override);
* **weights**: the base model's parameters and buffers in ``dtype`` (ties counted once); with
  ``quantize``, each quantised ``nn.Linear`` at its packed size (4-bit: ``in*out/2`` bytes plus one
  block scale per 64 weights, itself 8-bit with double quantisation; 8-bit: ``in*out`` plus one
  fp32 scale per row); the output head and embeddings stay in ``dtype``;
* **adapter**, **gradients**: the trainable parameters and their gradients (fp32);
* **optimizer**: the optimizer's state for them, per ``peftkit train --optim`` choice
  (:func:`peftkit.train.optim.state_bytes`: AdamW 8 bytes per parameter, 8-bit AdamW 2 bytes
  plus an fp32 scale per 256 values for tensors of 4096 values or more);
* **activations**: the highest sum of live tensors during forward and backward, minus the
  gradients. The real model and method run forward *and backward* on the ``meta`` device (no
  memory, no compute) under a dispatch mode that records each new storage and its release, so
  saved activations, the logits and their gradients, attention and every other temporary are
  counted when they coexist, each at glibc's chunk size (16-byte header, 64-byte alignment, whole
  pages from 128 KiB). Attention is routed to the fused CPU kernel, which saves what a CPU run
  saves. Quantised layers stay dense on ``meta``, but every op that computes from a quantised
  weight also allocates what bitsandbytes' CPU path allocates around it: the dequantised fp32
  weight (``4*in*out`` bytes) and its fp32 block scales, freed once the op's output exists (in
  forward, and again in backward for the input's gradient). With gradient checkpointing only the
  forward is traced: the activations are what it saves plus the logits' gradient and that of
  their fp32 log-softmax (``2 * batch * seq * vocab * 4`` bytes), or the forward's peak if higher.

Load: the checkpoint is memory-mapped. Kept in its dtype, its pages are only read by the first
forward (they are the **weights** of the step). Converted to another dtype or quantised, every
page is read (the file size becomes resident) next to the converted or packed weights, and
quantising also holds, for the layer in hand, its fp32 copy and two fp32 temporaries of the
quantiser (12 bytes per weight of the largest layer). For a QLoRA run with a small batch this
load peak is the run's peak.

The allocator. Every allocation is counted at glibc's chunk size with a *fixed* 128 KiB mmap
threshold: larger tensors get their own pages and give them back when freed. That is the heap
``peftkit train --quantize`` runs with (:mod:`peftkit.train.alloc` fixes the threshold, because
a quantised base fragments glibc's default heap badly). glibc's default instead raises the
threshold to the size of each freed temporary (up to 32 MiB), after which smaller tensors share
the brk heap, where the holes left by freed temporaries stay resident: on SmolLM2-135M, QLoRA
r8 q,v, batch 4x128, the live tensors peak at the same 847 MiB under both (this estimate's
activations: 846 MiB), but training peaks at 1,614-1,690 MiB by default against 1,340-1,347 MiB
with the fixed threshold (estimate: 1,408), and between steps the default keeps ~650 MiB of free
heap resident (mallinfo2). Without ``--quantize`` peftkit train leaves glibc's default alone,
and this estimate is 4-8% under the measured peak of LoRA and prefix tuning (BENCHMARKS.md,
"Memory estimate (issue 7)", has the figures of the current code).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import weakref
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .quant.half import HALF_MODES as _HALF  # 16-bit storage: no bitsandbytes, widened per layer

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
    #: bytes autograd saves for backward (part of ``activations``; not added again)
    saved: int = 0
    #: predicted peak while loading (and quantising) the model, before training starts
    load_peak: int = 0

    _PARTS = ("runtime", "weights", "adapter", "gradients", "optimizer", "activations")

    @property
    def step_peak(self) -> int:
        """Predicted peak resident memory of a training step, in bytes."""
        return sum(getattr(self, k) for k in self._PARTS)

    @property
    def total(self) -> int:
        """Predicted peak resident memory of the whole run: the step's or, if higher, the load's."""
        return max(self.step_peak, self.load_peak)

    def table(self) -> str:
        """A human-readable breakdown in MiB."""
        lines = [f"{n:<12} {getattr(self, n) / _MIB:10.1f} MiB" for n in self._PARTS]
        lines.append(f"{'step peak':<12} {self.step_peak / _MIB:10.1f} MiB   ({self.trainable_params:,} trainable params)")
        lines.append(f"{'load peak':<12} {self.load_peak / _MIB:10.1f} MiB")
        lines.append(f"{'total':<12} {self.total / _MIB:10.1f} MiB")
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


@contextlib.contextmanager
def _one_sequence_per_row():
    """Without a KV cache (gradient checkpointing turns it off), transformers looks for packed
    sequences in the position ids, a data-dependent test meta tensors cannot answer. The meta
    batch holds one sequence per row, for which that test finds none: answer so directly."""
    try:
        from transformers import masking_utils
    except ImportError:  # an older transformers without the test
        yield
        return
    find = getattr(masking_utils, "find_packed_sequence_indices", None)
    if find is None:
        yield
        return
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = find


class _AllocTrace(TorchDispatchMode):
    """Records every storage the ops of a ``meta`` run allocate and when it is freed, in order.

    An allocation is an op output whose storage is new; its free is the destruction of that
    storage (a weak finalizer), so saved tensors, views and gradients are followed exactly as
    autograd keeps them. Storages in ``external`` (the model's own tensors) are not recorded.
    ``dequant``: storages of quantised weights -> their element count. bitsandbytes dequantises
    such a weight around every op that reads it (forward and backward), so those ops get the
    temporaries its CPU path allocates: the double-quantised block scales (two fp32 vectors of
    ``n/64``) and the fp32 dense weight (``4n`` bytes), freed once the op's output exists.
    """

    def __init__(self, external: set, dequant: dict):
        super().__init__()
        self.events: list[tuple] = []  # ("a", key, nbytes) or ("f", key)
        self.live: set = set()
        self.external = external
        self.dequant = dequant
        self._tmp = 0

    def _alloc(self, key, nbytes: int) -> None:
        self.live.add(key)
        self.events.append(("a", key, nbytes))

    def _free(self, key) -> None:
        self.live.discard(key)
        self.events.append(("f", key))

    def _track(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        key = s._cdata
        if key in self.live or key in self.external:
            return
        self._alloc(key, s.nbytes())
        weakref.finalize(s, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        n = max((self.dequant.get(a.untyped_storage()._cdata, 0) for a in leaves), default=0)
        out = func(*args, **kwargs)
        new = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)
               and t.untyped_storage()._cdata not in self.live and t.untyped_storage()._cdata not in self.external]
        tmp = []
        if n and new:  # an op computing from a quantised weight (not a view of it)
            for nbytes in (4 * -(-n // 64), 4 * -(-n // 64), 4 * n):
                self._tmp += 1
                tmp.append(("tmp", self._tmp))
                self._alloc(tmp[-1], nbytes)
            self._free(tmp.pop(0))  # the 8-bit scales' dequantised copy, once offset
        for t in new:
            self._track(t)
        for key in tmp:
            self._free(key)
        return out


#: glibc's initial mmap threshold and page size: smaller requests carry a 16-byte chunk header
#: (torch aligns them to 64 bytes), larger ones are mapped in whole pages
_MMAP_THRESHOLD, _PAGE = 128 << 10, 4096


def _chunk(nbytes: int) -> int:
    """Bytes glibc takes for a torch CPU allocation of ``nbytes``."""
    size = (nbytes + 16 + 63) // 64 * 64
    return -(-size // _PAGE) * _PAGE if size >= _MMAP_THRESHOLD else size


def _live_peak(events: list) -> int:
    """Highest sum of live allocations (glibc chunk sizes) over ``events`` from :class:`_AllocTrace`."""
    live: dict = {}
    cur = peak = 0
    for ev in events:
        if ev[0] == "a":
            live[ev[1]] = _chunk(ev[2])
            cur += live[ev[1]]
            peak = max(peak, cur)
        else:
            cur -= live.pop(ev[1], 0)
    return peak



def _quantized_bytes(linear: nn.Linear, mode: str, double_quant: bool) -> int:
    n = linear.in_features * linear.out_features
    bias = linear.out_features * 4 if linear.bias is not None else 0
    if mode in ("4bit", "nf4", "fp4"):
        blocks = -(-n // 64)
        scales = blocks + 4 * -(-blocks // 256) if double_quant else 4 * blocks
        return -(-n // 2) + scales + bias
    if mode in ("8bit", "int8-ao"):
        return n + 4 * linear.out_features + bias
    if mode in _HALF:  # peftkit.quant.half: 16-bit storage, bias kept as it was
        return 2 * n + bias
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


def _checkpoint_bytes(model_or_config: Any) -> Optional[int]:
    """Size of a model folder's safetensors files (what loading maps and reads), else None."""
    if isinstance(model_or_config, str) and os.path.isdir(model_or_config):
        files = [f for f in os.listdir(model_or_config) if f.endswith(".safetensors")]
        if files:
            return sum(os.path.getsize(os.path.join(model_or_config, f)) for f in files)
    return None


def estimate_memory(model_or_config: Any, method: Union[str, Any], batch_shape: tuple[int, int] = (4, 128), *,
                    quantize: Optional[str] = None, double_quant: bool = True, dtype: torch.dtype = torch.float32,
                    optimizer: str = "adamw", gradient_checkpointing: bool = False,
                    runtime_bytes: Optional[int] = None) -> MemoryEstimate:
    """Predict peak training memory for ``method`` on a model, for batches of ``batch_shape``.

    ``model_or_config``: a transformers model, its config, or a model folder. ``method``: a
    PeftConfig or a name (see :func:`method_config`); ``"qlora"`` implies ``quantize="4bit"``.
    ``optimizer``: ``"sgd"`` (no state) or a ``peftkit train --optim`` name: ``"adamw"`` (two
    fp32 moments), ``"adamw_8bit"``, ``"paged_adamw_8bit"``, ``"paged_adamw"``
    (see :mod:`peftkit.train.optim`). The model is described in this module's docstring.
    """
    from transformers import AutoModelForCausalLM

    from .model import get_peft_model
    from .train.optim import state_bytes

    if isinstance(method, str) and method.lower() == "qlora" and quantize is None:
        quantize = "4bit"
    cfg = method_config(method)
    config = _config_of(model_or_config)
    saved_as = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)  # before from_config sets it
    saved_as = getattr(torch, saved_as, None) if isinstance(saved_as, str) else saved_as
    optimizer = {"adam": "adamw"}.get(optimizer.lower(), optimizer.lower())
    state_bytes(optimizer, [])  # unknown names fail here, before any work
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
        dense = _weights_bytes(model, dtype, None, double_quant)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        quantised = [m for m in model.modules() if quantize and type(m) is nn.Linear and m is not head]
        dequant = {m.weight.untyped_storage()._cdata: m.weight.numel() for m in quantised}
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pm = get_peft_model(model, cfg)
        trainable = [p for p in pm.parameters() if p.requires_grad]
        n_train = sum(p.numel() for p in trainable)
        adapter = sum(p.numel() * 4 for p in trainable)  # adapters train in fp32
        in_embedding = {id(m.weight) for m in pm.modules() if isinstance(m, nn.Embedding)}
        optim = state_bytes(optimizer, [p.numel() for p in trainable if id(p) not in in_embedding],
                            [p.numel() for p in trainable if id(p) in in_embedding])
        own = {t.untyped_storage()._cdata for t in list(pm.parameters()) + list(pm.buffers())}
        ids = torch.zeros(b, s, dtype=torch.long)
        pm.train()
        trace = _AllocTrace(own, dequant)
        with trace, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _CpuAttentionOnMeta(), \
                _one_sequence_per_row():
            out = pm(input_ids=ids, labels=ids)
            if not gradient_checkpointing:
                out.loss.backward()
            del out
            grads = sum(_chunk(p.grad.untyped_storage().nbytes()) for p in trainable if p.grad is not None)
            for p in trainable:
                p.grad = None
        events = list(trace.events)
    for key in own:  # weights saved for backward are counted above
        saved.pop(key, None)
    del pm, model, trainable
    if quantize and quantize not in _HALF and runtime_bytes is None:
        try:  # the training process imports it to quantise (its native library: ~40 MB here)
            import bitsandbytes  # noqa: F401
        except Exception:  # not installed: training would fail anyway, the estimate still helps
            pass
    # after the meta run, the process has imported and initialised everything training uses
    # (modeling code, autograd, attention kernels) but holds no tensor data
    runtime = _rss() if runtime_bytes is None else int(runtime_bytes)
    activations = max(0, _live_peak(events) - grads)
    if gradient_checkpointing:
        # backward recomputes each block under checkpoint's own dispatch, which the meta run cannot
        # follow (attention would recompute in its math form): count what the forward saves plus
        # the largest transient of backward, the logits' gradient and that of their fp32
        # log-softmax, and the forward's own live peak if higher
        vocab = config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size
        activations = max(activations, sum(saved.values()) + 2 * b * s * vocab * 4)
    # loading maps the checkpoint: kept as is, its pages are read by the first forward (they are
    # the weights above); converted, every page is read and the converted copy made; quantising
    # also holds, for the layer in hand, an fp32 copy plus two fp32 temporaries of bitsandbytes'
    # quantiser (12 bytes per weight)
    file_bytes = _checkpoint_bytes(model_or_config) or dense
    converted = bool(quantize) or (saved_as is not None and saved_as != dtype)
    biggest = max((m.weight.numel() for m in quantised), default=0)
    per_weight = 2 if quantize in _HALF else 12  # the 16-bit copy of the layer in hand
    load = runtime + (file_bytes + weights + per_weight * biggest if converted else 0)
    return MemoryEstimate(runtime=runtime, weights=weights, adapter=adapter, gradients=adapter,
                          optimizer=optim, activations=activations, trainable_params=n_train,
                          saved=sum(saved.values()), load_peak=load)


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
    p.add_argument("--quantize", choices=["4bit", "nf4", "fp4", "8bit", "bf16", "fp16"], default=None)
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 base weights")
    p.add_argument("--optim", "--optimizer", dest="optimizer", default="adamw",
                   choices=["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw", "sgd"],
                   help="optimizer whose state to count (peftkit train --optim names, or sgd)")
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
        print(json.dumps({**dataclasses.asdict(est), "step_peak": est.step_peak, "total": est.total}))
    else:
        print(f"{os.path.basename(path.rstrip('/'))}, {args.method}, batch {args.batch_size}x{args.seq_len}"
              + (f", {quantize} base" if quantize else ""))
        print(est.table())
        if quantize and quantize not in _HALF:
            print("(heap as `peftkit train --quantize` sets it: mmap threshold fixed at 128 KiB; with "
                  "--malloc-defaults glibc keeps freed holes resident and the peak is higher, see docs/scale.md)")
    return 0
