"""The LoRA Method: which Delta to build for each targeted module, and LoRA's bias option."""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ...errors import PeftWarning
from ...core.method import Method, UnsupportedSite, init_skipped
from ...core.registry import register_method
from ...targets import LORA_DEFAULT_TARGETS
from .._shared import adapter_dtype, is_conv1d_gpt2, with_default_targets
from .config import LoraConfig
from .delta import LoraConv, LoraEmbedding, LoraLinear
from .mha import LoraMultiheadAttention
from .params import LoraParameters, link_sites, targeted_parameters
from .tied import rewrite_for_tying, tie_adapters, tied_file_copies
from .init import initialise, plain_lora_state


@register_method
class LoraMethod(Method):
    """LoRA, rsLoRA and DoRA at Linear, Conv1D, Embedding, Conv1d/2d/3d and MultiheadAttention sites."""

    name = "LORA"
    config_cls = LoraConfig
    key_roots = ("token_adapter",)  # trainable_token_indices' rows: <embedding>.token_adapter.trainable_tokens_delta

    def prepare(self, config: LoraConfig, model: nn.Module) -> LoraConfig:
        if config.target_modules is None and config.target_parameters:  # PEFT: parameters only
            return config
        return rewrite_for_tying(with_default_targets(config, model, LORA_DEFAULT_TARGETS, "LoRA"), model)

    def is_target(self, config: LoraConfig, path: str, module: nn.Module, model: nn.Module) -> bool:
        """A module selected by ``target_modules``, or the owner of a ``target_parameters`` entry."""
        return super().is_target(config, path, module, model) or bool(targeted_parameters(config, path, module))

    def supported_sites(self):
        return ["nn.Linear", "transformers Conv1D", "nn.Embedding", "nn.Conv1d", "nn.Conv2d", "nn.Conv3d",
                "nn.MultiheadAttention",
                "2-D/3-D nn.Parameter via target_parameters (MoE experts)"]

    def make_delta(self, config: LoraConfig, path: str, module: nn.Module, adapter_name: str):
        r, alpha = config.rank_and_alpha(path)
        if config.target_parameters and (names := targeted_parameters(config, path, module)):
            return _parameters_delta(config, path, module, names)
        kw = dict(r=r, alpha=alpha, dropout=float(config.lora_dropout), use_rslora=config.use_rslora,
                  use_dora=config.use_dora)
        bias = bool(getattr(config, "lora_bias", False))
        if bias and not isinstance(module, nn.Embedding) and getattr(module, "bias", None) is None:
            warnings.warn(f"`lora_bias=True` was passed but the targeted layer of type {type(module).__name__} "
                          "has no bias. This means that merging LoRA weights won't be possible.", PeftWarning, stacklevel=3)
        if isinstance(module, nn.MultiheadAttention):
            return _attention_delta(config, module, bias, kw)
        if is_conv1d_gpt2(module):
            if not config.fan_in_fan_out:
                warnings.warn("Conv1D layers store weights as (in, out); using fan_in_fan_out=True for them.",
                              stacklevel=3)
            in_f, out_f = module.weight.shape
            delta = LoraLinear(in_f, out_f, fan_in_fan_out=True, lora_bias=bias, **kw)
        elif isinstance(module, nn.Linear):
            if config.fan_in_fan_out:
                warnings.warn(f"fan_in_fan_out=True but {path} is nn.Linear (weight out x in); ignoring it.",
                              stacklevel=3)
            delta = LoraLinear(module.in_features, module.out_features, lora_bias=bias, **kw)
        elif isinstance(module, nn.Embedding):
            if bias:
                raise ValueError("lora_bias=True is not supported for an nn.Embedding target (as in Hugging Face "
                                 "PEFT); set lora_bias=False or exclude the embedding.")
            delta = LoraEmbedding(module.num_embeddings, module.embedding_dim, module, **kw)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if module.groups > 1:
                if r % module.groups:
                    raise ValueError(
                        f"Targeting a {type(module).__name__} with groups={module.groups} and rank {r} at {path}: "
                        "LoRA on grouped convolutions needs a rank divisible by groups. Choose another rank "
                        "(rank_pattern can set one for this layer) or exclude it.")
                if config.use_dora:
                    raise UnsupportedSite(f"DoRA on a grouped convolution (groups={module.groups}) is not supported.")
                warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.",
                              stacklevel=3)
            delta = LoraConv(module, lora_bias=bias, **kw)
        else:
            raise UnsupportedSite(f"layer type {type(module).__name__} is not supported by LoRA.")
        dtype = adapter_dtype(module)
        if dtype != torch.get_default_dtype():
            delta.to(dtype=dtype)
        initialise(delta, config.init_lora_weights, module, config)
        if config.use_dora:
            delta.init_magnitude(module)
        _init_bias(delta, config)
        return delta

    def after_inject(self, host, config: LoraConfig, adapter_name: str) -> None:
        if config.target_parameters:  # several active adapters on one owner add up (params.py)
            link_sites(host, adapter_name)
        tie_adapters(host, config, adapter_name)  # ensure_weight_tying (tied.py)
        if config.trainable_token_indices is not None:  # chosen embedding rows (methods/trainable_tokens.py)
            from ..trainable_tokens import attach_token_rows

            attach_token_rows(host, config, adapter_name)
        if config.bias == "none":
            return
        names = set()
        for pname, _ in host.model.named_parameters():
            if not pname.endswith("bias") or ".deltas." in pname or _in_module_copy(host.model, pname):
                continue
            if config.bias == "all" or _is_site_bias(host.model, pname, adapter_name):
                names.add(pname)
        host.trainable_base.setdefault(adapter_name, set()).update(names)

    def convert_for_original_base(self, tensors, initial, config):
        """PiSSA/OLoRA -> plain LoRA of rank 2r for the unmodified base (see init.py)."""
        return plain_lora_state(tensors, initial, config)

    def extra_state(self, host, config, adapter_name):
        return {n: host.model.get_parameter(n) for n in sorted(host.trainable_base.get(adapter_name, ()))
                if ".deltas." not in n}  # trainable token rows are saved by their Deltas

    def tied_copies(self, host, config, adapter_name):
        """The tied head's copies of the embedding adapter's tensors (ensure_weight_tying), as PEFT writes them."""
        return tied_file_copies(host, adapter_name)


def _init_bias(delta, config) -> None:
    """``lora_bias``: zero (the update starts at 0), or nn.Linear's default for init False."""
    bias = getattr(delta, "lora_B_bias", None)
    if bias is not None and config.init_lora_weights is False and not init_skipped():
        bound = 1 / math.sqrt(delta.r)
        with torch.no_grad():
            bias.uniform_(-bound, bound)


def _attention_delta(config: LoraConfig, module: nn.MultiheadAttention, bias: bool, kw: dict):
    """The Delta for an attention layer (mha.py), with PEFT's restrictions."""
    if not module._qkv_same_embed_dim:
        raise UnsupportedSite("nn.MultiheadAttention with kdim/vdim other than embed_dim is not supported.")
    if config.use_dora or bias:
        raise UnsupportedSite("nn.MultiheadAttention supports plain LoRA only (no DoRA, no lora_bias).")
    if config.init_lora_weights not in (True, False, "gaussian"):
        raise UnsupportedSite(f"init_lora_weights={config.init_lora_weights!r} is not supported on "
                              "nn.MultiheadAttention (True, False or 'gaussian').")
    kw = {**kw, "dropout": 0.0}  # the update acts on the weights: there is no input to drop out
    delta = LoraMultiheadAttention(module, **kw)
    delta.to(dtype=adapter_dtype(module.out_proj))
    initialise(delta.in_proj, config.init_lora_weights, module, config)
    initialise(delta.out_proj, config.init_lora_weights, module.out_proj, config)
    return delta


def _parameters_delta(config: LoraConfig, path: str, module: nn.Module, names: list[str]):
    """The Delta for the owner of targeted parameters (params.py), with PEFT's restrictions."""
    from ...core.inject import matches_targets

    if matches_targets(config, path, module, module):
        raise ValueError(f"{path} is selected by target_modules and owns target_parameters {names}; a module "
                         "can be adapted one way only. Narrow target_modules (target_modules=[] for parameters only).")
    if config.init_lora_weights not in (True, False, "gaussian"):
        raise UnsupportedSite(f"init_lora_weights={config.init_lora_weights!r} is not supported with "
                              "target_parameters (True, False or 'gaussian').")
    ranks = {n: config.rank_and_alpha(f"{path}.{n}") for n in names}  # PEFT: patterns per parameter
    delta = LoraParameters(module, names, ranks, use_rslora=config.use_rslora)
    p = getattr(module, names[0])
    delta.to(dtype=p.dtype if p.is_floating_point() else torch.float32)  # PEFT: the parameter's dtype
    delta.reset(config.init_lora_weights)
    return delta


def _is_site_bias(model: nn.Module, pname: str, adapter_name: str) -> bool:
    if not pname.endswith(".base_layer.bias"):
        return False
    site = model.get_submodule(pname[: -len(".base_layer.bias")])
    return adapter_name in getattr(site, "deltas", {})


def _in_module_copy(model: nn.Module, pname: str) -> bool:
    """A base bias of a ``modules_to_save`` site: its trainable copy already holds one."""
    if not pname.endswith(".base_layer.bias"):
        return False
    site = model.get_submodule(pname[: -len(".base_layer.bias")])
    return any(d.replaces_base for d in getattr(site, "deltas", {}).values())
