"""Virtual tokens around the base model: masks, labels, KV caches and ``generate``.

Shared by prompt tuning, p-tuning (virtual input embeddings) and prefix tuning (virtual keys and
values). Each method's encoder maps nothing to its V virtual tokens via ``output()``:

    input embeddings:  (V * num_transformer_submodules, token_dim)
    key/value prefix:  (V, num_layers * 2 * token_dim)  viewed as (V, L*2, kv_heads, head_dim)

Training forward (the layout Hugging Face PEFT uses, so logits agree with it exactly)::

    embeddings: inputs_embeds = [P ; E(x)]   attention_mask = [1_V ; m]   labels = [-100_V ; y]
    KV prefix:  cache_l = (K_l, V_l) of length V in every layer   attention_mask = [1_V ; m]
                position_ids (if given) + V

Generation adds the prompt once, at prefill: the virtual tokens become a KV cache of length V
(prefix tuning: the prefix itself; prompt tuning: one forward of the prompt alone, which is the
same thing a causal model computes for them), and the real tokens follow with position ids
``V + cumsum(m) - 1``. Left padding then sits *after* the prompt and is masked, so a padded row
decodes exactly as it does alone. Encoder-decoders get the prompt as encoder input embeddings.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

import torch
from torch import nn

from ..config import ConfigError, TaskType
from ..core.prompt import SEQ2SEQ, PromptMethod, fill_model_dims
from ..io.checkpoint import CheckpointError

SUPPORTED_TASKS = (None, TaskType.CAUSAL_LM.value, TaskType.SEQ_CLS.value, SEQ2SEQ,
                   TaskType.FEATURE_EXTRACTION.value)
ENCODER_KEY = "prompt_encoder."


def _gradient_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


class VirtualTokenMethod(PromptMethod):
    """Base of the virtual-token methods; subclasses implement ``make_encoder``."""

    #: True when the encoder output is a per-layer key/value prefix (prefix tuning).
    kv_prefix: ClassVar[bool] = False

    def prepare(self, config, model: nn.Module):
        if config.task_type not in SUPPORTED_TASKS:
            raise ConfigError(f"{config.peft_type} supports task_type CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM or "
                              f"FEATURE_EXTRACTION here, got {config.task_type!r}.")
        if getattr(model, "get_input_embeddings", None) is None:
            raise ConfigError(f"{config.peft_type} needs a transformers model (get_input_embeddings); "
                              f"got {type(model).__name__}.")
        if self.kv_prefix and _gradient_checkpointing(model):
            raise ConfigError(f"{config.peft_type} keeps its prefix in the KV cache, which transformers "
                              "disables under gradient checkpointing. Call model.gradient_checkpointing_disable() "
                              "first, or use prompt tuning / p-tuning, which work with it.")
        return fill_model_dims(config, model, kv_heads=self.kv_prefix)

    # ----- saved form -----------------------------------------------------------------
    def state_to_save(self, host, name):
        """PEFT's ``prompt_embeddings`` (the encoder output) plus, for reparametrising encoders,
        the encoder itself under ``prompt_encoder.*`` keys, which PEFT's loader ignores: peftkit can
        then resume training through the encoder, and the file still loads in PEFT."""
        enc = host.prompt_encoder[name]
        out = {"prompt_embeddings": enc.output().detach()}
        if not enc.direct:
            out.update({ENCODER_KEY + k: v.detach() for k, v in enc.state_dict().items()})
        return out

    def load_plan(self, host, name, tensors, source):
        unknown = [k for k in tensors if k != "prompt_embeddings" and not k.startswith(ENCODER_KEY)]
        if unknown:
            raise CheckpointError(f"{source}: tensor {unknown[0]!r} has no place in a {self.name} adapter "
                                  "(expected 'prompt_embeddings'). The file belongs to another method.")
        if "prompt_embeddings" not in tensors:
            raise CheckpointError(f"{source}: missing tensor 'prompt_embeddings'; not a {self.name} adapter file.")
        enc = host.prompt_encoder[name]
        own = {k[len(ENCODER_KEY):]: v for k, v in tensors.items() if k.startswith(ENCODER_KEY)}
        if not enc.direct and not own:
            # Hugging Face PEFT keeps only the encoder's output; continue training on that output.
            warnings.warn(f"{source} holds only the encoder output (Hugging Face PEFT's format); training "
                          "continues on that output directly, without the reparametrising network.", stacklevel=4)
            enc = self.make_encoder(dataclasses.replace(host.peft_config[name], inference_mode=True), host.model)
            host.prompt_encoder[name] = enc.to(host.prompt_encoder[name].embedding.weight.device)
            host.apply_trainability()
        targets = {"embedding.weight": tensors["prompt_embeddings"]} if enc.direct else own
        local = enc.state_dict(keep_vars=True)
        plan = []
        for k, dest in local.items():
            if k not in targets:
                raise CheckpointError(f"{source}: missing tensor {ENCODER_KEY + k!r}.")
            if tuple(dest.shape) != tuple(targets[k].shape):
                shown = "prompt_embeddings" if enc.direct else ENCODER_KEY + k
                raise CheckpointError(
                    f"{source}: tensor {shown!r} has shape {tuple(targets[k].shape)} but this model needs "
                    f"{tuple(dest.shape)}. The adapter was trained on another base model or with other "
                    "num_virtual_tokens; load it onto the base it was trained on.")
            plan.append((dest, targets[k]))
        return plan

    # ----- pieces -----------------------------------------------------------------------
    def prompts(self, host, name, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """Virtual input embeddings, (batch, V * submodules, token_dim)."""
        p = host.prompt_encoder[name].output().to(dtype)
        return p.unsqueeze(0).expand(batch, -1, -1)

    def prefix_layers(self, host, name, config, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (key, value), each (batch, kv_heads, V, head_dim)."""
        model = host.model
        V, L, H = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
        out = host.prompt_encoder[name].output().to(model.dtype)
        kv = out.view(V, 2 * L, H, config.token_dim // H).permute(1, 2, 0, 3)  # 2L, H, V, hd
        # For encoder-decoders PEFT duplicates the 2L entries and reads them in chunks of four
        # (self k, self v, cross k, cross v), so decoder layer l uses entries 4l, 4l+1 (mod 2L).
        # Kept as is: adapters must mean the same thing in both libraries.
        step = 4 if config.num_transformer_submodules == 2 else 2
        layers = []
        for layer in range(L):
            k, v = kv[(step * layer) % (2 * L)], kv[(step * layer + 1) % (2 * L)]
            layers.append((k.unsqueeze(0).expand(batch, -1, -1, -1), v.unsqueeze(0).expand(batch, -1, -1, -1)))
        return layers

    def prefix_cache(self, host, name, config, batch: int):
        """The KV prefix as the transformers cache the model expects."""
        from transformers import DynamicCache, EncoderDecoderCache

        layers = self.prefix_layers(host, name, config, batch)
        if config.num_transformer_submodules == 2 or getattr(host.model.config, "is_encoder_decoder", False):
            return EncoderDecoderCache(DynamicCache(layers), DynamicCache())
        return DynamicCache(layers, config=host.model.config)

    # ----- forward ----------------------------------------------------------------------
    def forward(self, host, name, config, kw):
        model = host.model
        ids, embeds = kw.pop("input_ids", None), kw.pop("inputs_embeds", None)
        ref = ids if ids is not None else embeds
        if ref is None:
            raise ValueError("Pass input_ids or inputs_embeds.")
        batch, V = ref.shape[0], config.num_virtual_tokens
        ones = torch.ones(batch, V, dtype=torch.long, device=ref.device)
        seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        if self.kv_prefix:
            if model.training and _gradient_checkpointing(model):
                raise ValueError(f"{config.peft_type} cannot train under gradient checkpointing (its prefix lives "
                                 "in the KV cache); call model.gradient_checkpointing_disable().")
            key = "decoder_attention_mask" if seq2seq else "attention_mask"
            if kw.get(key) is not None:
                kw[key] = torch.cat([ones.to(kw[key].dtype), kw[key]], dim=1)
            if not seq2seq and _bidirectional(model):
                # Encoders read position embeddings from the past length; their real tokens keep
                # positions 0..T-1 (the prefix is not a text before them).
                if kw.get("position_ids") is None:
                    kw["position_ids"] = torch.arange(ref.shape[1], device=ref.device).expand(batch, -1)
            else:
                _drop_ids(kw, config, shift=V, keep_token_types=config.task_type == TaskType.SEQ_CLS.value)
            kw["cache"] = self.prefix_cache(host, name, config, batch)
            return model(input_ids=ids, inputs_embeds=embeds, **kw)
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        prompts = self.prompts(host, name, batch, embeds.dtype)[:, :V]
        if kw.get("attention_mask") is not None:
            kw["attention_mask"] = torch.cat([ones.to(kw["attention_mask"].dtype), kw["attention_mask"]], dim=1)
        if config.task_type == TaskType.SEQ_CLS.value:
            if kw.get("token_type_ids") is not None:
                kw["token_type_ids"] = torch.cat([torch.zeros_like(ones), kw["token_type_ids"]], dim=1)
            _drop_ids(kw, config, shift=None, keep_token_types=True)
        else:
            _drop_ids(kw, config, shift=None)
            if not seq2seq and kw.get("labels") is not None:
                kw["labels"] = torch.cat([torch.full_like(ones, -100).to(kw["labels"].dtype), kw["labels"]], dim=1)
        return model(inputs_embeds=torch.cat([prompts, embeds], dim=1), **kw)

    # ----- generate ---------------------------------------------------------------------
    def generate(self, host, name, config, kw):
        model = host.model
        if kw.get("use_cache") is False:
            raise ValueError(f"{config.peft_type} generates through the KV cache (the prompt is added once, at "
                             "prefill); use_cache=False is not supported. For an uncached reference, call the "
                             "model's forward on the whole sequence.")
        for k in ("cache", "past_key_values", "inputs_embeds"):
            if kw.get(k) is not None:
                raise ValueError(f"generate() with a prompt adapter takes input_ids, not {k}.")
        ids = kw.pop("input_ids", None)
        if ids is None:
            raise ValueError("generate() with a prompt adapter needs input_ids.")
        batch, V = ids.shape[0], config.num_virtual_tokens
        mask = kw.pop("attention_mask", None)
        mask = torch.ones_like(ids) if mask is None else mask
        ones = torch.ones(batch, V, dtype=mask.dtype, device=mask.device)
        gen = kw.get("generation_config") or model.generation_config
        expand = max(kw.get("num_beams") or gen.num_beams or 1, kw.get("num_return_sequences") or gen.num_return_sequences or 1)
        _drop_ids(kw, config, shift=None)
        with torch.no_grad():
            if getattr(model.config, "is_encoder_decoder", False):
                if self.kv_prefix:
                    cache = self.prefix_cache(host, name, config, batch * expand)
                    return model.generate(input_ids=ids, attention_mask=mask, cache=cache, **kw)
                embeds = model.get_input_embeddings()(ids)
                prompts = self.prompts(host, name, batch, embeds.dtype)[:, :V]
                return model.generate(inputs_embeds=torch.cat([prompts, embeds], dim=1),
                                      attention_mask=torch.cat([ones, mask], dim=1), **kw)
            if self.kv_prefix:
                cache = self.prefix_cache(host, name, config, batch * expand)
            else:
                emb = model.get_input_embeddings()
                prompt = self.prompts(host, name, 1, emb.weight.dtype)[:, :V]
                out = model(inputs_embeds=prompt, use_cache=True)
                cache = out.cache if hasattr(out, "cache") else out.past_key_values
                cache.batch_repeat_interleave(batch * expand)
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0) + V
            return model.generate(input_ids=ids, attention_mask=torch.cat([ones, mask], dim=1),
                                  position_ids=positions, cache=cache, **kw)


def _bidirectional(model: nn.Module) -> bool:
    """True for encoders: every attention module that says so is non-causal (BERT, RoBERTa)."""
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and not any(flags)


def _drop_ids(kw: dict, config, shift, keep_token_types: bool = False) -> None:
    """Position ids shift past a KV prefix; with virtual input tokens they are dropped, as in PEFT."""
    if kw.get("position_ids") is not None:
        if shift is not None:
            kw["position_ids"] = kw["position_ids"] + shift
        else:
            warnings.warn(f"{config.peft_type}: position_ids are recomputed by the model around the virtual "
                          "tokens; the given ones are ignored.", stacklevel=4)
            kw["position_ids"] = None
    if not keep_token_types and kw.get("token_type_ids") is not None:
        warnings.warn(f"{config.peft_type}: token_type_ids are not supported here and are ignored.", stacklevel=4)
        kw["token_type_ids"] = None
