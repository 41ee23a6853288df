"""TRL's ``SFTTrainer`` with peftkit: a peftkit model, or ``peft_config=peftkit.LoraConfig(...)``.

Two places in ``SFTTrainer`` need a PEFT model to be ``peft.PeftModel`` (accelerate's
``is_peft_model``) and go wrong for a peftkit one:

* the fused LM head (per-token log-probabilities without materialising the logits) is patched
  onto the model's ``forward``, and for a PEFT model onto ``get_base_model()``; patched onto the
  peftkit wrapper, it calls the wrapper's host module as the backbone and the first step fails
  with ``_forward_unimplemented() got an unexpected keyword argument 'input_ids'``. Here the head
  goes onto ``get_base_model()``, as for PEFT, and the wrapper's ``forward`` passes the
  ``fused_lm_head=True`` call through to it;
* ``peft_config=`` is checked to be a ``peft.PeftConfig`` (or refused when ``peft`` is not
  installed). Here a peftkit config wraps the model with ``peftkit.get_peft_model`` before
  ``SFTTrainer`` sees it. A model given by name is refused with what to do instead: TRL loads it
  inside ``__init__``, after the point where the adapter must be added.

Saving and resuming come from :mod:`peftkit.integrations.transformers` (``SFTTrainer`` is a
``Trainer``). TRL's other trainers (DPO, GRPO...) are not covered here.
"""
from __future__ import annotations

import functools
from typing import Callable

from .transformers import peftkit_model

#: (module, attribute) -> the original object, while :func:`enable` is in force
_ORIGINALS: dict[tuple, Callable] = {}


def _fused_head(original):
    @functools.wraps(original)
    def add_fused_lm_head(model, *args, **kwargs):
        peft_model = peftkit_model(model)
        return original(peft_model.get_base_model() if peft_model is not None else model, *args, **kwargs)
    return add_fused_lm_head


def _sft_init(original):
    @functools.wraps(original)
    def __init__(self, model, *args, peft_config=None, **kwargs):
        from ..config import PeftConfig
        from ..model import get_peft_model

        if isinstance(peft_config, PeftConfig):
            if isinstance(model, str):
                raise ValueError(
                    f"SFTTrainer(model={model!r}, peft_config=<peftkit {type(peft_config).__name__}>): TRL loads a "
                    "model given by name itself, too late for peftkit to add the adapter. Load it first and pass the "
                    "model object: model = AutoModelForCausalLM.from_pretrained(name); "
                    "SFTTrainer(model=model, peft_config=config, ...) (or pass peftkit.get_peft_model(model, config)).")
            if peftkit_model(model) is not None:
                raise ValueError("SFTTrainer got a peftkit model and a peft_config: pass one of them (the model "
                                 "already has its adapter), or merge_and_unload() the model first.")
            model, peft_config = get_peft_model(model, peft_config), None
        original(self, model, *args, peft_config=peft_config, **kwargs)
    return __init__


def enable() -> bool:
    """Patch TRL's ``SFTTrainer`` for peftkit models; False (and nothing done) without TRL."""
    try:
        import trl.trainer.sft_trainer as sft
    except ImportError:
        return False
    for key, make in (((sft, "add_fused_lm_head"), _fused_head), ((sft.SFTTrainer, "__init__"), _sft_init)):
        if key not in _ORIGINALS:
            _ORIGINALS[key] = getattr(*key)
            setattr(*key, make(_ORIGINALS[key]))
    return True


def disable() -> None:
    """Undo :func:`enable`."""
    for (owner, name) in list(_ORIGINALS):
        setattr(owner, name, _ORIGINALS.pop((owner, name)))
