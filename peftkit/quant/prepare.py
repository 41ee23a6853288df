"""Getting a model with a quantised base ready for adapter training, using no extra memory.

Hugging Face PEFT's ``prepare_model_for_kbit_training`` upcasts every non-quantised parameter
(embeddings, norms, the output head) to fp32, which on a 135M-parameter model with a 49k
vocabulary costs more than the 4-bit weights themselves save. Training adapters needs none of
that: the base stays frozen, so its dtype only has to be one the forward can compute in, and the
adapters are created in fp32 by their methods. What training does need:

1. every base parameter frozen (nothing to store optimizer state or gradients for);
2. gradient checkpointing, if asked, in its non-reentrant form, which gets gradients to the
   adapters without forcing them down to the embeddings (the reentrant form needs an input that
   requires grad, so only then are the input embeddings hooked);
3. quantised layers guarded against inference-only kernels (see :mod:`peftkit.quant.bnb`).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .backend import backend_for, quantize_linear

_HOOKED = "_peftkit_quant_guard"


def guard_quantized(model: nn.Module, allow_packed_eval: bool = False, only_new: bool = False) -> int:
    """Keep training correct on every quantised layer of ``model``; returns how many were guarded.

    peftkit calls this (with ``only_new=True``) whenever it wraps a model, so a user who never
    calls :func:`prepare_model_for_kbit_training` is protected too; ``only_new`` leaves layers
    that an earlier call already guarded as that call set them (``allow_packed_eval`` kept).

    Each layer gets a forward pre-hook that lets its backend restore a differentiable layout
    before any forward that needs gradients. With ``allow_packed_eval=False`` (the default),
    bitsandbytes' AVX512-BF16 eval repacking is also switched off, so the frozen weights never
    change; ``True`` keeps the faster eval kernel, at the price of one unpacking per switch from
    eval to training and block scales kept in bf16 after the first eval.
    """
    n = 0
    for module in model.modules():
        backend = backend_for(module)
        if backend is None or (only_new and getattr(module, _HOOKED, False)):
            continue
        n += 1
        backend.guard(module, allow_packed_eval)
        if not getattr(module, _HOOKED, False):
            module.register_forward_pre_hook(_pre_forward(backend))
            setattr(module, _HOOKED, True)
    return n


def _pre_forward(backend):
    def hook(module, args):
        if args and isinstance(args[0], torch.Tensor):
            backend.before_forward(module, args[0])

    return hook


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Optional[dict] = None,
                                    allow_packed_eval: bool = False) -> nn.Module:
    """Freeze the base, set up gradient checkpointing and guard quantised layers (in place).

    Drop-in for Hugging Face PEFT's function of the same name, without its fp32 upcast of the
    non-quantised parameters. ``gradient_checkpointing_kwargs`` defaults to
    ``{"use_reentrant": False}``.
    """
    for name, p in model.named_parameters():
        if ".deltas." not in name:  # called after get_peft_model too: adapters stay trainable
            p.requires_grad_(False)
    if use_gradient_checkpointing:
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            call = lambda: enable(activation_checkpointing_kwargs=kwargs)  # noqa: E731
        elif hasattr(model, "gradient_checkpointing_enable"):
            call = lambda: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # noqa: E731
        else:
            raise TypeError(f"{type(model).__name__} has no gradient_checkpointing_enable(); pass "
                            "use_gradient_checkpointing=False or use a transformers model.")
        had_hooks = bool(getattr(model, "_require_grads_hooks", None))
        call()
        if kwargs["use_reentrant"]:
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        elif not had_hooks and hasattr(model, "disable_input_require_grads"):
            # transformers hooks the embeddings to require grad whenever checkpointing is on; the
            # non-reentrant form does not need it, and it makes backward run down to the embeddings
            model.disable_input_require_grads()
    guard_quantized(model, allow_packed_eval=allow_packed_eval)
    return model


def quantize_model(model: nn.Module, mode: str, skip_modules: Iterable[str] = (),
                   compute_dtype: Optional[torch.dtype] = None, double_quant: bool = True) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` by quantised ones, in place; returns ``model``.

    ``mode``: ``"4bit"``/``"nf4"`` (NF4), ``"fp4"``, ``"8bit"`` (LLM.int8()), ``"int8-ao"``
    (torchao int8 weight-only); see :func:`peftkit.quant.all_modes`. The output head
    (``get_output_embeddings()``) and any module whose dotted path ends with a name in
    ``skip_modules`` stay dense, as in QLoRA. Layers are converted one at a time so the dense
    and the quantised model never coexist in memory. The result is guarded
    (:func:`guard_quantized`).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = tuple(skip_modules)
    targets = []
    for path, module in model.named_modules():
        if type(module) is not nn.Linear or module is head or backend_for(module) is not None:
            continue
        if any(path == s or path.endswith("." + s) for s in skip):
            continue
        targets.append(path)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantise (outside the output "
                         f"head and skip_modules={list(skip)}).")
    for path in targets:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, quantize_linear(getattr(parent, child), mode, compute_dtype, double_quant))
    guard_quantized(model)
    _release_freed_memory(model)
    return model


@torch.no_grad()
def _release_freed_memory(model: nn.Module) -> None:
    """Let the dense weights' memory go back to the OS.

    A model loaded from safetensors keeps views into one memory map of the whole checkpoint;
    while any tensor (the embeddings, a norm) still points into it, every page read during
    quantisation stays resident - the full dense model. Copying the few dense tensors that remain
    drops the map (measured on SmolLM2: ~500 MB). Then glibc is asked to return freed heap.
    """
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point() and t.device.type == "cpu":
            t.data = t.data.clone()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
