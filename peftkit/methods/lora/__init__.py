"""LoRA and its variants (rsLoRA, DoRA, PiSSA/OLoRA initialisation). See delta.py for the math."""
from .config import LoraConfig
from .method import LoraMethod

__all__ = ["LoraConfig", "LoraMethod"]
