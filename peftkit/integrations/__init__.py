"""peftkit models in other libraries' training loops: transformers' ``Trainer``, TRL's ``SFTTrainer``.

One line before building the trainer::

    import peftkit.integrations
    peftkit.integrations.enable()

and the Trainer / SFTTrainer tutorials' code runs unchanged with a peftkit model: the model's
columns are kept, ``evaluate()`` reports ``eval_loss``, ``save_model()`` and every checkpoint
write the adapter in Hugging Face PEFT's format (not the base model), checkpoints also hold the
optimizer, scheduler and RNG states, and ``resume_from_checkpoint`` continues the same run.
``SFTTrainer(model, peft_config=peftkit.LoraConfig(...))`` wraps the model with peftkit. The
same script runs under ``torchrun`` and ``accelerate launch``. Nothing here imports ``peft``.

How and why: :mod:`peftkit.integrations.transformers`, :mod:`peftkit.integrations.trl`.
"""
from __future__ import annotations


def enable() -> None:
    """Make transformers' ``Trainer`` (and its subclasses) and, when installed, TRL's
    ``SFTTrainer`` handle peftkit models as they handle PEFT's. Idempotent."""
    from . import transformers as _transformers
    from . import trl as _trl

    _transformers.enable()
    _trl.enable()


def disable() -> None:
    """Undo :func:`enable` (the libraries' own methods back)."""
    from . import transformers as _transformers
    from . import trl as _trl

    _trl.disable()
    _transformers.disable()
