"""peftkit: parameter-efficient fine-tuning for PyTorch models.

The public API mirrors Hugging Face PEFT: ``get_peft_model(model, LoraConfig(...))`` returns a
:class:`PeftModel` whose adapters save to and load from PEFT's ``adapter_config.json`` +
``adapter_model.safetensors`` format.
"""
from .config import ConfigError, PeftConfig, PeftType, TaskType
from .io.checkpoint import CheckpointError
from .methods import LoraConfig
from .methods import (AdaLoraConfig, BitFitConfig, BottleneckConfig, IA3Config, LNTuningConfig,  # noqa: E402
                      LoHaConfig, LoKrConfig, VeraConfig)
from .methods import AdaptionPromptConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig  # noqa: F401
from .model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)

__version__ = "0.1.0"

__all__ = [
    "IA3Config", "LoHaConfig", "LoKrConfig", "VeraConfig", "AdaLoraConfig", "LNTuningConfig",
    "BitFitConfig", "BottleneckConfig",
    "PromptTuningConfig", "PromptEncoderConfig", "PrefixTuningConfig", "AdaptionPromptConfig",
    "PeftConfig", "PeftType", "TaskType", "ConfigError", "CheckpointError", "LoraConfig",
    "PeftModel", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction", "get_peft_model",
]
