"""``AutoPeftModelFor*``: load base model and adapter in one call, as Hugging Face PEFT's auto classes do.

``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` reads ``adapter_config.json``, loads
the base model named by its ``base_model_name_or_path`` with the matching transformers Auto class,
and returns ``PeftModel.from_pretrained(base, adapter_dir)``. peftkit never downloads: the base
must be a local folder (pass ``base_model_name_or_path=`` to point elsewhere), otherwise an error
says what to do.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Any, Optional, Union

from .config import CONFIG_NAME, PeftConfig, TaskType
from .model import (PeftModel, PeftModelForCausalLM, PeftModelForFeatureExtraction, PeftModelForQuestionAnswering,
                    PeftModelForSeq2SeqLM, PeftModelForSequenceClassification, PeftModelForTokenClassification)

_TOKENIZER_CONFIG = "tokenizer_config.json"


class _AutoPeftModel:
    """Shared ``from_pretrained`` of the auto classes (never instantiated)."""

    #: transformers' Auto class name for the base model; None for :class:`AutoPeftModel`
    _target_class: Optional[str] = None
    _target_peft_class: type[PeftModel] = PeftModel
    _task_type: Optional[str] = None

    def __init__(self, *args: Any, **kwargs: Any):
        raise TypeError(f"{type(self).__name__} is not instantiated; use "
                        f"{type(self).__name__}.from_pretrained(adapter_dir).")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        base_model_name_or_path: Optional[Union[str, os.PathLike]] = None,
                        **kwargs: Any) -> PeftModel:
        """Load the base model the adapter names, then the adapter onto it.

        Args:
            pretrained_model_name_or_path: the adapter folder (local).
            adapter_name, is_trainable, config: as for ``PeftModel.from_pretrained``.
            base_model_name_or_path: a local base model folder to use instead of the one the
                adapter's config names (peftkit-only).
            **kwargs: passed to the transformers ``from_pretrained`` of the base (``dtype``,
                ``device_map``, ``quantization_config`` ...); ``subfolder`` and ``revision`` refer
                to the adapter, as in PEFT.
        """
        adapter_dir = os.fspath(pretrained_model_name_or_path)
        subfolder = kwargs.pop("subfolder", None)
        kwargs.pop("revision", None)  # local folders have no revisions
        peft_config = config or PeftConfig.from_pretrained(adapter_dir, subfolder=subfolder)
        base_class = cls._base_class(peft_config, adapter_dir, subfolder)
        base_path = base_model_name_or_path or peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(f"The adapter config in {adapter_dir!r} names no base model (base_model_name_or_path "
                             "is empty). Pass base_model_name_or_path=<local folder>, or load the base yourself and "
                             "call PeftModel.from_pretrained(base, adapter_dir).")
        base_path = os.fspath(base_path)
        if not os.path.isdir(base_path):
            raise ValueError(f"The base model {base_path!r} named by the adapter is not a local folder, and peftkit "
                             "never downloads models. Pass base_model_name_or_path=<local folder with the base "
                             "model>, or load the base yourself and call PeftModel.from_pretrained(base, "
                             f"{adapter_dir!r}).")
        kwargs.setdefault("local_files_only", True)
        base = base_class.from_pretrained(base_path, **kwargs)
        _grow_embeddings_for_tokenizer(base, adapter_dir, kwargs.get("trust_remote_code", False))
        return cls._target_peft_class.from_pretrained(base, adapter_dir, adapter_name=adapter_name,
                                                      is_trainable=is_trainable, config=peft_config,
                                                      subfolder=subfolder)

    @classmethod
    def _base_class(cls, peft_config: PeftConfig, adapter_dir: str, subfolder: Optional[str]):
        """The transformers class that loads the base, after checking the task type fits ``cls``."""
        import transformers

        task = peft_config.task_type
        if cls._task_type is not None:
            if task is not None and task != cls._task_type:
                right = _CLASS_FOR_TASK.get(task)
                raise ValueError(f"The adapter in {adapter_dir!r} has task_type={task!r}, but "
                                 f"{cls.__name__} loads {cls._task_type!r} adapters. Use "
                                 f"{right.__name__ if right else 'AutoPeftModel'}.from_pretrained instead.")
            return getattr(transformers, cls._target_class)
        if task is not None:
            raise ValueError(f"The adapter in {adapter_dir!r} has task_type={task!r}; AutoPeftModel is for adapters "
                             f"without one. Use {_CLASS_FOR_TASK[task].__name__}.from_pretrained instead.")
        mapping = _auto_mapping(adapter_dir, subfolder)
        if mapping:  # PEFT records the base class of a model without a task head here
            library, name = mapping.get("parent_library", ""), mapping.get("base_model_class", "")
            if library != "transformers" and not library.startswith("transformers."):
                raise ValueError(f"The adapter config asks for the base class {name!r} from {library!r}; peftkit "
                                 "only imports transformers classes here. Load the base yourself and call "
                                 "PeftModel.from_pretrained(base, adapter_dir).")
            return getattr(importlib.import_module(library), name)
        return transformers.AutoModel


def _auto_mapping(adapter_dir: str, subfolder: Optional[str]) -> Optional[dict]:
    """``auto_mapping`` from the raw config file (PeftConfig does not keep it)."""
    folder = os.path.join(adapter_dir, subfolder) if subfolder else adapter_dir
    file = adapter_dir if adapter_dir.endswith(".json") else os.path.join(folder, CONFIG_NAME)
    try:
        with open(file, encoding="utf-8") as fh:
            mapping = json.load(fh).get("auto_mapping")
    except (OSError, ValueError):
        return None
    return mapping if isinstance(mapping, dict) else None


def _grow_embeddings_for_tokenizer(base, adapter_dir: str, trust_remote_code: bool) -> None:
    """PEFT's rule: a tokenizer saved beside the adapter with more tokens than the base has
    embeddings means the vocabulary grew in training; resize so that the adapter fits."""
    if not os.path.isfile(os.path.join(adapter_dir, _TOKENIZER_CONFIG)) or not hasattr(base, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


def _auto(name: str, target: Optional[str], peft_class: type[PeftModel], task: Optional[TaskType], doc: str):
    return type(name, (_AutoPeftModel,), {"__doc__": doc, "__module__": __name__, "_target_class": target,
                                          "_target_peft_class": peft_class,
                                          "_task_type": task.value if task else None})


AutoPeftModel = _auto("AutoPeftModel", None, PeftModel, None,
                      "Base from ``transformers.AutoModel`` (or the config's ``auto_mapping``), for adapters "
                      "without a task type.")
AutoPeftModelForCausalLM = _auto("AutoPeftModelForCausalLM", "AutoModelForCausalLM", PeftModelForCausalLM,
                                 TaskType.CAUSAL_LM, "``CAUSAL_LM`` adapters on ``AutoModelForCausalLM``.")
AutoPeftModelForSeq2SeqLM = _auto("AutoPeftModelForSeq2SeqLM", "AutoModelForSeq2SeqLM", PeftModelForSeq2SeqLM,
                                  TaskType.SEQ_2_SEQ_LM, "``SEQ_2_SEQ_LM`` adapters on ``AutoModelForSeq2SeqLM``.")
AutoPeftModelForSequenceClassification = _auto(
    "AutoPeftModelForSequenceClassification", "AutoModelForSequenceClassification",
    PeftModelForSequenceClassification, TaskType.SEQ_CLS,
    "``SEQ_CLS`` adapters on ``AutoModelForSequenceClassification``.")
AutoPeftModelForTokenClassification = _auto(
    "AutoPeftModelForTokenClassification", "AutoModelForTokenClassification", PeftModelForTokenClassification,
    TaskType.TOKEN_CLS, "``TOKEN_CLS`` adapters on ``AutoModelForTokenClassification``.")
AutoPeftModelForQuestionAnswering = _auto(
    "AutoPeftModelForQuestionAnswering", "AutoModelForQuestionAnswering", PeftModelForQuestionAnswering,
    TaskType.QUESTION_ANS, "``QUESTION_ANS`` adapters on ``AutoModelForQuestionAnswering``.")
AutoPeftModelForFeatureExtraction = _auto(
    "AutoPeftModelForFeatureExtraction", "AutoModel", PeftModelForFeatureExtraction,
    TaskType.FEATURE_EXTRACTION, "``FEATURE_EXTRACTION`` adapters on ``AutoModel``.")

_CLASS_FOR_TASK = {
    TaskType.CAUSAL_LM.value: AutoPeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM.value: AutoPeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS.value: AutoPeftModelForSequenceClassification,
    TaskType.TOKEN_CLS.value: AutoPeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: AutoPeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION.value: AutoPeftModelForFeatureExtraction,
}
