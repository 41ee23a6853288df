"""Prompt tuning (Lester, Al-Rfou & Constant, 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning", arXiv:2104.08691). Family: additive (soft prompts).

Equation: the frozen model reads V learned vectors before the embedded input,

    h_0 = [P ; E(x)],   P in R^{V x d}   (only P is trained)

Initialisation (``prompt_tuning_init``): RANDOM draws P ~ N(0, 1) (``nn.Embedding``'s default);
SAMPLE_VOCAB copies the embeddings of V random vocabulary tokens; TEXT copies the embeddings of
``prompt_tuning_init_text`` tokenised with the tokenizer at ``tokenizer_name_or_path`` (a local
folder; the text is repeated or cut to V tokens). Encoder-decoders keep one prompt per stack
(``num_transformer_submodules`` = 2), of which the encoder's is used, as in Hugging Face PEFT.

Shapes::

    P: (V * submodules, d) --expand--> (B, V, d) ++ E(x): (B, T, d)  ->  model  (B, V + T, ...)
"""
from __future__ import annotations

import dataclasses
import enum
import math
import os
from typing import Optional, Union

import torch
from torch import nn

from ..config import ConfigError, PeftType
from ..core.prompt import PromptLearningConfig
from ..core.registry import register_method
from .virtual_tokens import VirtualTokenMethod


class PromptTuningInit(str, enum.Enum):
    """How the prompt vectors start."""

    RANDOM = "RANDOM"
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"


@dataclasses.dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Hugging Face PEFT's ``PromptTuningConfig`` fields and defaults).

    Args:
        num_virtual_tokens: V.
        prompt_tuning_init: "RANDOM" (default), "TEXT" or "SAMPLE_VOCAB".
        prompt_tuning_init_text: the text for TEXT.
        tokenizer_name_or_path: a local tokenizer folder for TEXT (hub ids are not fetched).
        tokenizer_kwargs: extra arguments for ``AutoTokenizer.from_pretrained`` (TEXT only).
    """

    prompt_tuning_init: Union[PromptTuningInit, str] = PromptTuningInit.RANDOM
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PROMPT_TUNING.value
        super().__post_init__()
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        if init not in PromptTuningInit.__members__:
            raise ConfigError(f"prompt_tuning_init must be one of {list(PromptTuningInit.__members__)}, got {init!r}.")
        self.prompt_tuning_init = init
        if init == "TEXT" and (not self.tokenizer_name_or_path or self.prompt_tuning_init_text is None):
            raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path "
                              "(a local tokenizer folder).")
        if self.tokenizer_kwargs and init != "TEXT":
            raise ConfigError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'.")


class PromptEmbedding(nn.Module):
    """The trainable prompt P itself (``embedding.weight``, Hugging Face PEFT's parameter name)."""

    direct = True  # the parameter is the output: nothing else to save

    def __init__(self, total: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(total, dim)

    def output(self) -> torch.Tensor:
        """P, (total virtual tokens, token_dim)."""
        return self.embedding.weight


def _text_ids(config: PromptTuningConfig, total: int) -> list[int]:
    from transformers import AutoTokenizer

    path = config.tokenizer_name_or_path
    if not os.path.isdir(path):
        raise ConfigError(f"tokenizer_name_or_path={path!r} is not a local folder; peftkit does not download. "
                          "Save the tokenizer with tokenizer.save_pretrained(folder) and pass that folder.")
    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # never run code from a tokenizer folder
    ids = AutoTokenizer.from_pretrained(path, **kwargs)(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ConfigError("prompt_tuning_init_text tokenises to no tokens; give a non-empty text.")
    return (ids * math.ceil(total / len(ids)))[:total]


@register_method
class PromptTuningMethod(VirtualTokenMethod):
    """Soft prompt given as input embeddings."""

    name = "PROMPT_TUNING"
    config_cls = PromptTuningConfig

    def make_encoder(self, config: PromptTuningConfig, model: nn.Module) -> PromptEmbedding:
        total = config.num_virtual_tokens * config.num_transformer_submodules
        enc = PromptEmbedding(total, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init == "RANDOM":
            return enc  # weights come from a file, or stay N(0, 1)
        words = model.get_input_embeddings()
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, words.num_embeddings, (total,))
        else:
            ids = torch.tensor(_text_ids(config, total))
        with torch.no_grad():
            enc.embedding.weight.copy_(words(ids.to(words.weight.device)).float())
        return enc
