"""Default target modules per model family, used when a config leaves ``target_modules`` empty.

The table mirrors the choices of the LoRA paper and of Hugging Face PEFT (query and value
projections), so that an adapter trained with defaults targets the same layers in both.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

LORA_DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj"], "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"], "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "bloom": ["query_key_value"],
    "falcon": ["query_key_value"], "gpt_bigcode": ["c_attn"], "t5": ["q", "v"], "mt5": ["q", "v"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "distilbert": ["q_lin", "v_lin"], "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"], "olmo": ["q_proj", "v_proj"], "smollm3": ["q_proj", "v_proj"],
}


def model_type(model: nn.Module) -> Optional[str]:
    """The transformers ``model_type`` of ``model`` (None for a plain nn.Module)."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def default_targets(model: nn.Module, table: dict[str, list[str]], method: str) -> list[str]:
    """Targets for ``model`` from ``table``; a clear error when the family is not listed."""
    mt = model_type(model)
    if mt in table:
        return list(table[mt])
    raise ValueError(
        f"{method}: target_modules is not set and there is no default for model type {mt!r}. "
        "Pass target_modules explicitly (module names such as ['q_proj', 'v_proj'], a regex, "
        "or 'all-linear')."
    )
