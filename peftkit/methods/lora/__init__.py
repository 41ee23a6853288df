"""LoRA and its variants (rsLoRA, DoRA, PiSSA/OLoRA initialisation). See delta.py for the math;
params.py for LoRA on bare parameters (``target_parameters``: fused mixture-of-experts weights)."""
from .config import LoraConfig
from .method import LoraMethod
from .params import LoraParameters

__all__ = ["LoraConfig", "LoraMethod", "LoraParameters"]
