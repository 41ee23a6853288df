"""The model card (``README.md``) that ``save_pretrained`` writes beside the adapter, as PEFT 0.21 does.

Hugging Face PEFT writes the Hub's model card: its YAML front matter says ``library_name: peft``
(the files are PEFT's format and load with ``peft``, so the Hub shows PEFT's loading snippet),
``base_model`` (the base's ``config._name_or_path``), ``tags`` (the base's ``model_tags``,
``transformers`` for a transformers base, ``lora`` for LoRA, ``base_model:adapter:<name>``) and
``pipeline_tag: text-generation`` for causal LMs; the text gets a "Framework versions" line. An
existing README keeps its text and other metadata: only those keys are set (tags replaced, as
PEFT does) and the version line is added once. peftkit's line names itself and the PEFT format it
wrote (``- peftkit 0.1.0 (PEFT 0.21.2 format)``), so a card says which library made the files.

The card is rendered with ``huggingface_hub`` (a dependency; its template is local, nothing is
fetched) and written atomically like every other file.
"""
from __future__ import annotations

import os
from typing import Any

from ..config import PEFT_FORMAT_VERSION
from .checkpoint import atomic_write_text

CARD_NAME = "README.md"
FRAMEWORK_HEADING = "### Framework versions"


def framework_line() -> str:
    """The version line peftkit adds under "Framework versions"."""
    from .. import __version__

    return f"- peftkit {__version__} (PEFT {PEFT_FORMAT_VERSION} format)"


def card_tags(peft_model: Any) -> set[str]:
    """PEFT's tags for the card: the base model's own tags and those derived from the adapter."""
    base = peft_model.base_model.model
    tags = set(getattr(base, "model_tags", None) or [])
    try:
        from transformers import PreTrainedModel

        if isinstance(base, PreTrainedModel):
            tags.add("transformers")
    except ImportError:  # a plain torch model without transformers installed
        pass
    if str(peft_model.active_peft_config.peft_type) == "LORA":
        tags.add("lora")
    if hasattr(base, "name_or_path"):
        tags.add(f"base_model:adapter:{base.name_or_path}")
    return tags


def _name_or_path(peft_model: Any):
    config = getattr(peft_model.base_model.model, "config", None)
    if config is None:
        return None
    data = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    return data.get("_name_or_path")


def write_model_card(peft_model: Any, save_directory: str) -> None:
    """Create ``save_directory/README.md`` or update the one there (see the module docstring)."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..model import PeftModelForCausalLM

    path = os.path.join(save_directory, CARD_NAME)
    card = ModelCard.load(path) if os.path.isfile(path) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    tags = card_tags(peft_model)
    if tags:
        card.data["tags"] = sorted(tags)
    if not card.data.pipeline_tag and isinstance(peft_model, PeftModelForCausalLM):
        card.data.pipeline_tag = "text-generation"
    name = _name_or_path(peft_model)
    if name is not None:
        card.data["base_model"] = name
    lines = card.text.splitlines()
    line = framework_line()
    if line not in lines:
        if FRAMEWORK_HEADING in lines:
            lines.insert(lines.index(FRAMEWORK_HEADING) + 2, line)
        else:
            lines.append(f"{FRAMEWORK_HEADING}\n\n{line}")
    card.text = "\n".join(lines)
    atomic_write_text(path, str(card))
