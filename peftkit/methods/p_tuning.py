"""P-tuning (Liu et al., 2021, "GPT Understands, Too", arXiv:2103.10385). Family: additive
(soft prompts, reparametrised).

Equation: the virtual tokens are produced by a small trainable network f from free embeddings
e_1..e_V, which eases optimisation (the paper's prompt encoder):

    P = f(e),  e in R^{V x d};   MLP: f = W3 relu(W2 relu(W1 e))  (d -> h -> h -> d)
                                 LSTM: f = MLP2(BiLSTM(e))         (d -> 2h -> 2h -> d)

and the model reads ``[P ; E(x)]`` as in prompt tuning. Initialisation: PyTorch's defaults for
``nn.Embedding`` (N(0, 1)), ``nn.Linear`` and ``nn.LSTM``. After training only P matters: Hugging
Face PEFT saves P alone (``prompt_embeddings``); peftkit also saves f and e under
``prompt_encoder.*`` keys so training can resume through the encoder, and an adapter loaded for
inference holds only P (the same parameter count as PEFT's).

Shapes::

    e: (V * submodules, d) -> f -> P: (V * submodules, d) -> (B, V, d) ++ E(x): (B, T, d)
"""
from __future__ import annotations

import dataclasses
import enum
import warnings
from typing import Optional, Union

import torch
from torch import nn

from ..config import ConfigError, PeftType
from ..core.prompt import PromptLearningConfig
from ..core.registry import register_method
from .prompt_tuning import PromptEmbedding
from .virtual_tokens import VirtualTokenMethod


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The network f that produces the prompt."""

    MLP = "MLP"
    LSTM = "LSTM"


@dataclasses.dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Hugging Face PEFT's ``PromptEncoderConfig`` fields and defaults).

    Args:
        num_virtual_tokens: V.
        encoder_reparameterization_type: "MLP" (default) or "LSTM".
        encoder_hidden_size: h (default: token_dim).
        encoder_num_layers: LSTM layers (the MLP always has three linear layers).
        encoder_dropout: dropout between LSTM layers.
    """

    encoder_reparameterization_type: Union[str, PromptEncoderReparameterizationType] = "MLP"
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.peft_type = PeftType.P_TUNING.value
        super().__post_init__()
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        if kind not in PromptEncoderReparameterizationType.__members__:
            raise ConfigError(f"encoder_reparameterization_type must be 'MLP' or 'LSTM', got {kind!r}.")
        self.encoder_reparameterization_type = kind
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size <= 0):
            raise ConfigError(f"encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size!r}.")
        if not 0.0 <= float(self.encoder_dropout) < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}.")


class PromptEncoder(nn.Module):
    """e and f (parameter names as in Hugging Face PEFT: ``embedding``, ``mlp_head``, ``lstm_head``)."""

    direct = False

    def __init__(self, total: int, dim: int, hidden: int, kind: str, lstm_layers: int, dropout: float):
        super().__init__()
        self.kind = kind
        self.embedding = nn.Embedding(total, dim)
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=lstm_layers, dropout=dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def output(self) -> torch.Tensor:
        """P = f(e), (total virtual tokens, token_dim)."""
        e = self.embedding.weight.unsqueeze(0)  # 1, N, d: the LSTM reads the tokens as one sequence
        if self.kind == "LSTM":
            e = self.lstm_head(e)[0]
        return self.mlp_head(e)[0]


@register_method
class PTuningMethod(VirtualTokenMethod):
    """Soft prompt produced by an MLP or LSTM encoder."""

    name = "P_TUNING"
    config_cls = PromptEncoderConfig

    def make_encoder(self, config: PromptEncoderConfig, model: nn.Module) -> nn.Module:
        total = config.num_virtual_tokens * config.num_transformer_submodules
        if config.inference_mode:
            return PromptEmbedding(total, config.token_dim)  # P only, as loaded for inference
        if config.encoder_reparameterization_type == "MLP" and config.encoder_num_layers != 2:
            warnings.warn("encoder_num_layers is ignored for the MLP encoder (always three linear layers).",
                          stacklevel=4)
        return PromptEncoder(total, config.token_dim, config.encoder_hidden_size,
                             config.encoder_reparameterization_type, config.encoder_num_layers,
                             float(config.encoder_dropout))
