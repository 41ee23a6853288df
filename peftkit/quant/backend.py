"""One small interface for quantised base layers.

A Delta never sees quantisation: LoRA and every method that only uses the site's output ``y``
run unchanged on a quantised ``base_layer`` because the Site calls the layer and hands ``y`` on.
What a backend adds is only what the Site cannot get from ``y``:

* :meth:`QuantBackend.dequantize` - the dense ``out x in`` weight behind the packed storage,
  for DoRA's column norms and for merging;
* :meth:`QuantBackend.quantize` - build the quantised layer from a dense ``nn.Linear`` (for
  ``quantize_model`` and for re-quantising after a merge);
* :meth:`QuantBackend.before_forward` - restore a layout that autograd can go through
  when an inference-only kernel has changed the storage (bitsandbytes' AVX512-BF16 repacking).

Backends register themselves with :func:`register_backend`; :func:`backend_for` finds the one that
owns a module, so nothing else in peftkit names a quantisation library.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn


class QuantBackend:
    """A quantisation library's layer type, seen through three operations."""

    #: Modes this backend builds in :meth:`quantize` (``"nf4"``, ``"8bit"``, ...).
    modes: ClassVar[tuple[str, ...]] = ()
    name: ClassVar[str] = ""

    def available(self) -> bool:
        """Whether the library imports here."""
        return True

    def handles(self, module: nn.Module) -> bool:
        """Whether ``module`` is a quantised layer of this backend (must not import the library:
        it runs for every module of every model)."""
        return False

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The dense ``out x in`` weight of ``module`` (a new tensor; storage is not changed)."""
        raise TypeError(f"{self.name} cannot dequantize {type(module).__name__}")

    def quantize(self, linear: nn.Linear, mode: str, compute_dtype: Optional[torch.dtype] = None,
                 double_quant: bool = True) -> nn.Module:
        """A quantised copy of ``linear`` in ``mode`` (``double_quant``: quantise the block scales too)."""
        raise TypeError(f"{self.name} has no mode {mode!r}; it builds {', '.join(self.modes)}")

    def before_forward(self, module: nn.Module, x: torch.Tensor) -> None:
        """Called before each forward of a guarded layer: make the storage differentiable again
        if an inference-only kernel changed it and this forward needs gradients."""

    def guard(self, module: nn.Module, allow_packed_eval: bool) -> None:
        """Make ``module`` safe to train from now on (see :func:`peftkit.quant.guard_quantized`)."""

    def mode_of(self, module: nn.Module) -> tuple[str, bool]:
        """(mode, double_quant) that :meth:`quantize` would need to rebuild ``module``."""
        return self.modes[0], True


_BACKENDS: list[QuantBackend] = []


def register_backend(backend: QuantBackend) -> QuantBackend:
    """Add ``backend`` to the lookup used by :func:`backend_for` and :func:`quantize_linear`."""
    _BACKENDS.append(backend)
    return backend


_BUILTIN_LOADED = False


def _load_builtin() -> None:
    # a flag, not "no backend registered yet": importing one backend module directly (or a
    # user's register_backend) must not hide the others
    global _BUILTIN_LOADED
    if not _BUILTIN_LOADED:
        _BUILTIN_LOADED = True
        from . import ao, bnb, half  # noqa: F401  (importing registers them)


def backend_for(module: nn.Module) -> Optional[QuantBackend]:
    """The backend owning ``module``, or None when it is not a quantised layer."""
    _load_builtin()
    for b in _BACKENDS:
        if b.handles(module):
            return b
    return None


def is_quantized(module: nn.Module) -> bool:
    """True when ``module`` is a quantised layer of a registered backend."""
    return backend_for(module) is not None


_DENSE = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)


def dequantize(module: nn.Module) -> torch.Tensor:
    """Dense ``out x in`` weight of a quantised layer (``module.weight`` for dense layers)."""
    if type(module) in _DENSE or type(module).__name__ == "Conv1D":
        return module.weight  # the common case, first: torch.compile traces it without a break
    b = backend_for(module)
    return module.weight if b is None else b.dequantize(module)


def all_modes() -> dict[str, QuantBackend]:
    """Every quantisation mode offered by an installed backend -> that backend."""
    _load_builtin()
    return {m: b for b in _BACKENDS if b.available() for m in b.modes}


def quantize_linear(linear: nn.Linear, mode: str, compute_dtype: Optional[torch.dtype] = None,
                    double_quant: bool = True) -> nn.Module:
    """A quantised copy of ``linear`` in ``mode`` (see :func:`all_modes`)."""
    _load_builtin()
    owner = next((b for b in _BACKENDS if mode in b.modes), None)  # only this library gets imported
    if owner is None or not owner.available():
        known = sorted({m for b in _BACKENDS for m in b.modes})
        why = (f"{owner.name} is not installed (or failed to load)" if owner is not None
               else f"known modes: {', '.join(known)}")
        raise ValueError(f"Cannot quantise in mode {mode!r}: {why}. Install bitsandbytes for "
                         "4bit/nf4/fp4/8bit, torchao for int8-ao.")
    return owner.quantize(linear, mode, compute_dtype, double_quant)
