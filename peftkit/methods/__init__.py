"""Built-in methods. Importing this package registers each of them with the core registry.

Families follow Lialin et al., "Scaling Down to Scale Up" (2023): additive, selective,
reparametrisation-based and hybrid.
"""
from .lora import LoraConfig  # noqa: F401  reparametrisation: LoRA, rsLoRA, DoRA, PiSSA, OLoRA
from .prompt_tuning import PromptTuningConfig, PromptTuningInit  # noqa: F401  additive: soft prompts
from .p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType  # noqa: F401  additive
from .prefix_tuning import PrefixTuningConfig  # noqa: F401  additive: per-layer KV prefixes
from .ia3 import IA3Config  # noqa: F401  additive: (IA)^3 learned rescaling
from .bottleneck import BottleneckConfig  # noqa: F401  additive: Houlsby, Pfeiffer, parallel adapters
from .bitfit import BitFitConfig  # noqa: F401  selective: biases only
from .ln_tuning import LNTuningConfig  # noqa: F401  selective: normalisation layers
from .loha import LoHaConfig  # noqa: F401  reparametrisation: Hadamard product
from .lokr import LoKrConfig  # noqa: F401  reparametrisation: Kronecker product
from .vera import VeraConfig  # noqa: F401  reparametrisation: shared random projections
from .adalora import AdaLoraConfig  # noqa: F401  reparametrisation: SVD form with rank pruning
from .oft import OFTConfig  # noqa: F401  reparametrisation: block-diagonal orthogonal rotation
from .boft import BOFTConfig  # noqa: F401  reparametrisation: butterfly orthogonal rotation
from .adaption_prompt import AdaptionPromptConfig  # noqa: F401  additive: LLaMA-Adapter gated prompts
from .trainable_tokens import TrainableTokensConfig  # noqa: F401  selective: chosen embedding rows
from .hybrids import mam_adapter, unipelt  # noqa: F401  hybrids: compositions of the above
