"""Built-in methods. Importing this package registers each of them with the core registry.

Families follow Lialin et al., "Scaling Down to Scale Up" (2023): additive, selective,
reparametrisation-based and hybrid.
"""
from .lora import LoraConfig  # noqa: F401  reparametrisation: LoRA, rsLoRA, DoRA, PiSSA, OLoRA
