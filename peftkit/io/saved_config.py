"""The adapter config as Hugging Face PEFT 0.21 writes it to ``adapter_config.json``.

Two fields are filled in from the model at save time, as PEFT fills them:

- ``target_modules="all-linear"`` is written as the list of the module paths it matched
  (``model.layers.0.self_attn.q_proj``, ...): PEFT replaces the shorthand by those paths when it
  injects, and tools that read the file literally (servers deciding which layers carry LoRA) need
  names, not the shorthand. peftkit writes them sorted and only those that hold the adapter (PEFT
  writes its set in arbitrary order and keeps linear layers that ``exclude_modules`` or
  ``layers_to_transform`` then drop; both files select the same layers on load).
- ``auto_mapping`` (adapters without a task type): the base model's class and module, which
  ``AutoPeftModel`` reads to rebuild the base.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..core.inject import sites
from ..core.registry import get_method

ALL_LINEAR = "all-linear"


def matched_paths(host: Any, name: str, config: Any) -> list[str]:
    """Sorted paths of the modules that adapter ``name`` adapts because ``config`` targets them
    (not its ``modules_to_save`` copies or trainable-token rows, which other fields name)."""
    method = get_method(config.peft_type)
    out = []
    for path, site in sites(host.model):
        if name in site.deltas and not site.deltas[name].replaces_base and \
                method.is_target(config, path, site.base_layer, host.model):
            out.append(path)
    return sorted(out)


def config_for_save(peft_model: Any, name: str, config: Any) -> Any:
    """``config`` (of adapter ``name`` in ``peft_model``) with the fields PEFT fills in on save."""
    changes: dict[str, Any] = {}
    tm = getattr(config, "target_modules", None)
    if tm == ALL_LINEAR:  # spelled as peftkit's matcher takes it (core/inject.py)
        changes["target_modules"] = matched_paths(peft_model.base_model, name, config)
    if config.task_type is None:
        base = type(peft_model.base_model.model)
        changes["auto_mapping"] = {"base_model_class": base.__name__, "parent_library": base.__module__}
    return dataclasses.replace(config, **changes) if changes else config
