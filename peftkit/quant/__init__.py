"""Quantised base layers behind one small backend interface (bitsandbytes, torchao).

``quantize_model(model, "4bit")`` builds a QLoRA base; ``prepare_model_for_kbit_training`` gets a
quantised model ready to train without upcasting anything; ``merge_and_unload_quantized`` folds
adapters into a quantised base (kept dense, or re-quantised with the error reported).
"""
from .backend import (QuantBackend, all_modes, backend_for, dequantize, is_quantized, quantize_linear,
                      register_backend)
from .merge import dequantize_sites, merge_and_unload_quantized
from .prepare import guard_quantized, prepare_model_for_kbit_training, quantize_model

__all__ = ["QuantBackend", "all_modes", "backend_for", "dequantize", "is_quantized", "quantize_linear",
           "register_backend", "dequantize_sites", "merge_and_unload_quantized", "guard_quantized",
           "prepare_model_for_kbit_training", "quantize_model"]
