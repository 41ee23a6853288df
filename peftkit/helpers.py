"""``peft.helpers``: small tools PEFT scripts import, with PEFT 0.21's names and behaviour.

- :func:`rescale_adapter_scale`: ``with rescale_adapter_scale(model, 0.5):`` multiplies every
  LoRA-family update by a factor inside the block (WiSE-FT-style interpolation between the base
  and the fine-tuned model: ``W + m * s * B A``) and restores the scales on exit, packed
  inference adapters included;
- :func:`disable_input_dtype_casting`: inside the block, inputs reach adapters in the dtype they
  come in (for layer-wise casting hooks, as in diffusers);
- :func:`check_if_peft_model`: whether a folder holds an adapter config (offline; never the Hub);
- :func:`update_forward_signature` / :func:`update_generate_signature` / :func:`update_signature`:
  make ``inspect.signature(peft_model.forward)`` (and ``generate``) show the base model's
  parameters, for tools that read a model's signature.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from types import MethodType
from typing import Iterator, Union

from torch import nn

from .core.site import Site

__all__ = ["check_if_peft_model", "disable_input_dtype_casting", "rescale_adapter_scale",
           "update_forward_signature", "update_generate_signature", "update_signature"]


def check_if_peft_model(model_name_or_path: str) -> bool:
    """True when ``model_name_or_path`` is a folder with a readable ``adapter_config.json``.

    PEFT also asks the Hub; peftkit never goes online, so a Hub id reads as False (as PEFT's
    check does offline)."""
    from .config import PeftConfig

    try:
        PeftConfig.from_pretrained(model_name_or_path)
    except Exception:  # any failure means "not a PEFT model", as in PEFT
        return False
    return True


def _scaled_deltas(model: nn.Module):
    """(site, adapter name) for every LoRA-family Delta (PEFT's ``LoraLayer``s) in ``model``."""
    for module in model.modules():
        if isinstance(module, Site):
            for name in list(module.deltas.keys()):
                if getattr(module.deltas[name], "lora_scaled", False):
                    yield module, name


def _set_scaling(site: Site, name: str, value: float) -> None:
    site.deltas[name].scaling = value
    if site.deltas.packed(name) is not None:  # the record, for views built later
        site.deltas.set_packed_value(name, value)


@contextlib.contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: Union[float, int]) -> Iterator[None]:
    """Multiply the scaling of every LoRA adapter in ``model`` by ``multiplier`` inside the block.

    ``multiplier`` in [0, 1] interpolates between the base (0) and the adapted model (1), which is
    WiSE-FT (Wortsman et al., 2022) for LoRA. Raises TypeError for a non-number and ValueError
    when ``model`` holds no LoRA adapter, as PEFT does. Merged adapters are not changed (their
    update is already in the weights)."""
    if isinstance(multiplier, bool) or not isinstance(multiplier, (float, int)):
        raise TypeError(f"Argument multiplier should be of type float, got {type(multiplier)}")
    original = [(site, name, site.deltas[name].scaling) for site, name in _scaled_deltas(model)]
    if not original:
        raise ValueError("scaling is only supported for models with `LoraLayer`s")
    for site, name, value in original:
        _set_scaling(site, name, value * multiplier)
    try:
        yield
    finally:
        for site, name, value in original:
            if name in site.deltas:  # still loaded
                _set_scaling(site, name, value)


@contextlib.contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True):
    """Inside the block, adapters get their input in the dtype it arrives in, not cast to their
    own (``active=False``: the block changes nothing). The flags are restored on exit."""
    if not active:
        yield
        return
    before = {site: site.cast_input_dtype_enabled for site in model.modules() if isinstance(site, Site)}
    for site in before:
        site.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for site, value in before.items():
            site.cast_input_dtype_enabled = value


def _only_varargs(fn) -> bool:
    """Whether ``fn`` takes only ``*args``/``**kwargs`` (and peftkit's keyword ``adapter_names``)."""
    params = inspect.signature(fn).parameters
    kinds = {p.kind for p in params.values()}
    named = set(params) - {"adapter_names"}
    return kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD,
                     inspect.Parameter.KEYWORD_ONLY} and named <= {"args", "kwargs"} and "kwargs" in named


def _show_base_signature(model, method: str) -> None:
    """Bind, on this instance only, a ``method`` whose signature and docs are the base model's."""
    base_fn = getattr(type(model.get_base_model()), method, None)
    own = getattr(model, method, None)
    if base_fn is None or own is None or not _only_varargs(own):
        return
    impl = getattr(type(model), method)

    def call(self, *args, **kwargs):
        return impl(self, *args, **kwargs)

    functools.update_wrapper(call, base_fn, assigned=("__doc__", "__name__", "__annotations__"))
    object.__setattr__(model, method, MethodType(call, model))


def update_forward_signature(model) -> None:
    """Make ``inspect.signature(model.forward)`` show the base model's ``forward`` parameters."""
    _show_base_signature(model, "forward")


def update_generate_signature(model) -> None:
    """Make ``inspect.signature(model.generate)`` show the base model's ``generate`` parameters."""
    if hasattr(model, "generate"):
        _show_base_signature(model, "generate")


def update_signature(model, method: str = "all") -> None:
    """:func:`update_forward_signature` and/or :func:`update_generate_signature`
    (``method``: ``"forward"``, ``"generate"`` or ``"all"``)."""
    if method == "forward":
        update_forward_signature(model)
    elif method == "generate":
        update_generate_signature(model)
    elif method == "all":
        update_forward_signature(model)
        update_generate_signature(model)
    else:
        raise ValueError(f"method {method} is not supported please choose one of ['forward', 'generate', 'all']")
