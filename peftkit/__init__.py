"""peftkit: parameter-efficient fine-tuning for PyTorch models.

The public API mirrors Hugging Face PEFT: ``get_peft_model(model, LoraConfig(...))`` returns a
:class:`PeftModel` whose adapters save to and load from PEFT's ``adapter_config.json`` +
``adapter_model.safetensors`` format.
"""
from .config import ConfigError, PeftConfig, PeftType, TaskType
from .errors import NoMatchingPeftModuleError, PeftError, PeftWarning
from .io.checkpoint import CheckpointError
from .methods import LoraConfig
from .methods import (AdaLoraConfig, BitFitConfig, BottleneckConfig, IA3Config, LNTuningConfig,  # noqa: E402
                      LoHaConfig, LoKrConfig, VeraConfig)
from .methods import BOFTConfig, OFTConfig  # noqa: E402
from .methods.trainable_tokens import TrainableTokensConfig  # noqa: E402
from .methods.lora.loftq import LoftQConfig, replace_lora_weights_loftq  # noqa: E402
from .methods.lora.eva import EvaConfig, get_eva_state_dict, initialize_lora_eva_weights  # noqa: E402
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
from .methods import PromptTuningInit
from .functional import (get_peft_model_state_dict, inject_adapter_in_model, load_peft_weights,
                         set_peft_model_state_dict)
from .auto import (AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForFeatureExtraction,
                   AutoPeftModelForQuestionAnswering, AutoPeftModelForSeq2SeqLM,
                   AutoPeftModelForSequenceClassification, AutoPeftModelForTokenClassification)
from .quant import prepare_model_for_kbit_training
from .mapping import PEFT_TYPE_TO_CONFIG_MAPPING, get_peft_config  # noqa: E402
from .methods import PromptEncoderReparameterizationType  # noqa: E402
from .status import get_layer_status, get_model_status  # noqa: E402
from .utils import (cast_mixed_precision_params, get_base_model_state_dict,  # noqa: E402
                    set_base_model_state_dict, shift_tokens_right)
from . import helpers  # noqa: E402,F401  peft.helpers

__version__ = "0.1.0"

__all__ = [
    "IA3Config", "LoHaConfig", "LoKrConfig", "VeraConfig", "AdaLoraConfig", "LNTuningConfig",
    "BitFitConfig", "BottleneckConfig",
    "OFTConfig", "BOFTConfig",
    "PromptTuningConfig", "PromptEncoderConfig", "PrefixTuningConfig", "AdaptionPromptConfig",
    "PeftConfig", "PeftType", "TaskType", "ConfigError", "CheckpointError", "PeftError",
    "NoMatchingPeftModuleError", "LoraConfig",
    "PeftModel", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction", "get_peft_model",
    "PromptTuningInit", "get_peft_model_state_dict", "set_peft_model_state_dict", "load_peft_weights",
    "inject_adapter_in_model", "prepare_model_for_kbit_training",
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction",
    "TrainableTokensConfig", "LoftQConfig", "replace_lora_weights_loftq", "EvaConfig", "get_eva_state_dict",
    "initialize_lora_eva_weights", "PeftWarning", "PEFT_TYPE_TO_CONFIG_MAPPING", "get_peft_config",
    "PromptEncoderReparameterizationType", "get_layer_status", "get_model_status", "cast_mixed_precision_params",
    "get_base_model_state_dict", "set_base_model_state_dict", "shift_tokens_right",
]
