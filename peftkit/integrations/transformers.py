"""transformers' ``Trainer`` with peftkit models: adapter-only saves, exact resume, evaluation.

transformers recognises PEFT models by ``isinstance(model, peft.PeftModel)`` (``_is_peft_model``
in ``trainer_utils``, ``supported_classes`` in ``Trainer._save``), and only when ``peft`` is
installed. A peftkit model is a plain ``nn.Module`` to it, so unchanged ``Trainer`` code:

* reads the columns to keep from the wrapper's ``forward(*args, **kwargs)`` and drops them all
  ("No columns in the dataset match the model's forward method signature");
* finds no ``labels`` argument on the wrapper's class, so ``evaluate()`` reports no ``eval_loss``;
* saves ``model.state_dict()`` whole (the base model too), which fails on tied embeddings
  ("Some tensors share memory"), and cannot resume from what it saved.

:func:`enable` replaces five ``Trainer`` methods by versions that do, for a peftkit model, what
Trainer does for a PEFT model, and call the original for anything else:

============================== ===========================================================
``__init__``                   label names, ``can_return_loss`` and ``model_accepts_loss_kwargs``
                               read from the base model's class and ``forward``
``_set_signature_columns_...`` the columns of the base model's ``forward``
``_save``                      ``save_pretrained``: the adapter only, in PEFT's format, plus the
                               tokenizer and ``training_args.bin`` as Trainer writes them
``_load_from_checkpoint``      the adapter(s) read back in place, every tensor checked
``_load_best_model``           the same for ``load_best_model_at_end=True``
============================== ===========================================================

Trainer's own checkpoint code is kept, so a checkpoint holds the adapter plus the optimizer,
scheduler, RNG states and ``trainer_state.json``, and ``resume_from_checkpoint`` continues the
same run. Patching the class (not an instance or a subclass) is what lets subclasses such as TRL's
``SFTTrainer`` work too. DeepSpeed and FSDP checkpoints are not covered: use ``peftkit train``
(``peftkit.train.loop.AdapterTrainer``) there.
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable, Optional

#: Trainer method name -> the original function, while :func:`enable` is in force
_ORIGINALS: dict[str, Callable] = {}


def peftkit_model(model) -> Optional[Any]:
    """The peftkit ``PeftModel`` inside ``model`` (itself, or under a DDP/compile wrapper), else None."""
    from ..model import PeftModel

    for _ in range(4):  # DistributedDataParallel.module, torch.compile's _orig_mod
        if isinstance(model, PeftModel):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if model is None:
            return None
    return None


def adapter_folders(peft_model, folder: str) -> dict[str, str]:
    """Adapter name -> the folder ``save_pretrained(folder)`` writes it to (PEFT's layout)."""
    return {name: folder if name == "default" else os.path.join(folder, name) for name in peft_model.peft_config}


def load_adapters(peft_model, folder: str) -> None:
    """Read every adapter of ``peft_model`` back from a folder written by ``save_pretrained``.

    The adapters must exist already (same configs); each tensor's name and shape is checked
    before anything is copied. Raises ``ValueError`` when ``folder`` holds no adapter.
    """
    from ..functional import load_peft_weights, set_peft_model_state_dict
    from ..io.checkpoint import WEIGHTS_NAME

    folders = adapter_folders(peft_model, folder)
    present = {n: f for n, f in folders.items() if os.path.isfile(os.path.join(f, WEIGHTS_NAME))
               or os.path.isfile(os.path.join(f, "adapter_model.bin"))}
    if not present:
        raise ValueError(f"Can't find a valid checkpoint at {folder}: no {WEIGHTS_NAME} for the adapters "
                         f"{sorted(folders)}. Pass a checkpoint-N folder written while training this peftkit model.")
    for name, path in present.items():
        set_peft_model_state_dict(peft_model, load_peft_weights(path, device="cpu"), adapter_name=name)


def _inspect_base(trainer, model) -> None:
    """What Trainer.__init__ reads from a PEFT model's base, read from the peftkit model's base."""
    from transformers.utils import can_return_loss, find_labels

    base = model.get_base_model()
    if trainer.args.label_names is None:
        trainer.label_names = find_labels(type(base))
    trainer.can_return_loss = can_return_loss(type(base))
    if hasattr(base, "accepts_loss_kwargs"):
        trainer.model_accepts_loss_kwargs = base.accepts_loss_kwargs
    else:
        params = inspect.signature(base.forward).parameters.values()
        trainer.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


def _init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        model = peftkit_model(getattr(self, "model", None))
        if model is not None:
            _inspect_base(self, model)
    return __init__


def _signature_columns(original):
    @functools.wraps(original)
    def _set_signature_columns_if_needed(self):
        model = peftkit_model(self.model)
        if model is None or self._signature_columns is not None:
            return original(self)
        columns = list(inspect.signature(model.get_base_model().forward).parameters)
        self._signature_columns = columns + sorted({"label", "label_ids", *self.label_names} - set(columns))
    return _set_signature_columns_if_needed


def _save(original):
    @functools.wraps(original)
    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        model = peftkit_model(self.model)
        if model is None:
            return original(self, output_dir, state_dict)
        if not self.args.should_save:
            return None
        import torch
        from transformers.trainer import TRAINING_ARGS_NAME

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)  # the adapters only; each file written beside and renamed
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None
    return _save


def _load_from_checkpoint(original):
    @functools.wraps(original)
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        peft_model = peftkit_model(model if model is not None else self.model)
        if peft_model is None:
            return original(self, resume_from_checkpoint, model)
        load_adapters(peft_model, resume_from_checkpoint)
        return None
    return _load_from_checkpoint


def _load_best_model(original):
    @functools.wraps(original)
    def _load_best_model(self):
        peft_model = peftkit_model(self.model)
        if peft_model is None:
            return original(self)
        load_adapters(peft_model, self.state.best_model_checkpoint)
        return None
    return _load_best_model


_PATCHES = {"__init__": _init, "_set_signature_columns_if_needed": _signature_columns, "_save": _save,
            "_load_from_checkpoint": _load_from_checkpoint, "_load_best_model": _load_best_model}


def enable() -> None:
    """Teach ``transformers.Trainer`` (and every subclass) to train, save and resume peftkit models.

    Idempotent; models that are not peftkit's are handled exactly as before.
    """
    from transformers import Trainer

    for name, make in _PATCHES.items():
        if name not in _ORIGINALS:
            _ORIGINALS[name] = getattr(Trainer, name)
            setattr(Trainer, name, make(_ORIGINALS[name]))


def disable() -> None:
    """Undo :func:`enable`: ``Trainer``'s own methods back."""
    from transformers import Trainer

    for name in list(_ORIGINALS):
        setattr(Trainer, name, _ORIGINALS.pop(name))


def enabled() -> bool:
    """Whether :func:`enable` is in force."""
    return bool(_ORIGINALS)
