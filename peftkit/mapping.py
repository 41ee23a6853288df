"""``peft.mapping``'s lookups: from a ``peft_type`` to its config class, and a config from a dict.

``PEFT_TYPE_TO_CONFIG_MAPPING`` holds every method registered with peftkit (PEFT's methods that
peftkit implements, plus its own BitFit and bottleneck adapters); keys are :class:`PeftType`
members, which compare equal to their strings (``mapping["LORA"]`` works as in PEFT).
"""
from __future__ import annotations

from typing import Any

from . import methods as _methods  # noqa: F401  registers every method
from .config import PeftConfig, PeftType
from .core.registry import get_method, registered_methods

__all__ = ["PEFT_TYPE_TO_CONFIG_MAPPING", "get_peft_config"]

PEFT_TYPE_TO_CONFIG_MAPPING: dict[PeftType, type] = {
    PeftType(name): get_method(name).config_cls for name in registered_methods()}


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config that ``config_dict`` describes (an ``adapter_config.json``'s contents).

    As PEFT's function, dispatched on ``config_dict["peft_type"]``; built with
    :meth:`PeftConfig.from_dict`, so fields of PEFT features peftkit lacks are accepted at their
    "off" values and unknown keys are warned about, instead of a ``TypeError``."""
    return PeftConfig.from_dict(dict(config_dict), source="get_peft_config")
