"""Adapter configurations: the JSON round trip shared by every method.

Every method's config is a dataclass deriving from :class:`PeftConfig`. The on-disk form is
Hugging Face PEFT's ``adapter_config.json``: the same field names, ``peft_type`` naming the method.
Reading a file tolerates fields this version does not know (a newer writer): they are warned
about and ignored. Fields that are known but hold a value peftkit cannot honour (a PEFT feature
not implemented here) are an error, since silently dropping them would change the outputs.

In memory, as in PEFT, ``config.peft_type`` is a :class:`PeftType` member (``PeftType.LORA``, with
``.value == "LORA"``), also after ``from_pretrained``; ``task_type`` keeps what was given (a string
or a :class:`TaskType`). Both are ``str`` subclasses, so comparing with ``"LORA"`` works, and the
JSON holds the plain strings. ``peft_version`` records the PEFT release whose file format was
written (:data:`PEFT_FORMAT_VERSION`; a file's own value is kept on reload, as PEFT keeps it).
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from typing import Any, ClassVar, Optional

from .errors import PeftError

CONFIG_NAME = "adapter_config.json"

#: The Hugging Face PEFT release whose adapter format peftkit writes (and tests against), recorded
#: as ``peft_version``. Readers parse this field as a PEFT release to pick a format (PEFT's OFT
#: treats files below 0.18 as its old Cayley-Neumann form), so peftkit's own version, which names
#: no PEFT format, is not written here but in the model card (io/model_card.py).
PEFT_FORMAT_VERSION = "0.21.2"


class _StrValueEnum(str, enum.Enum):
    """A ``str`` enum whose ``str()`` and f-string form is the value (``"LORA"``), so messages and
    string comparisons read the same whether a field holds the member or the plain string."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class TaskType(_StrValueEnum):
    """The task a wrapped model solves; picks the PeftModel subclass and default extras."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(_StrValueEnum):
    """Method identifiers, spelled as Hugging Face PEFT writes them in ``peft_type``."""

    LORA = "LORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    VERA = "VERA"
    ADALORA = "ADALORA"
    LN_TUNING = "LN_TUNING"
    BITFIT = "BITFIT"
    BOTTLENECK = "BOTTLENECK"
    OFT = "OFT"
    BOFT = "BOFT"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"


class ConfigError(PeftError, ValueError):
    """A configuration that cannot be used; the message says what was expected."""


class ConfigTypeError(ConfigError, TypeError):
    """A config field of the wrong type, where PEFT raises ``TypeError`` (still a ConfigError)."""


@dataclasses.dataclass
class PeftConfig:
    """Fields common to every method's configuration.

    Args:
        peft_type: the method; set by each subclass.
        task_type: a :class:`TaskType` (or its string), or None for a bare ``nn.Module``.
        base_model_name_or_path: recorded on save so that ``from_pretrained`` can name the base.
        revision: the base model's revision, recorded for the user.
        inference_mode: True freezes the adapter (as when loaded without ``is_trainable``).
        auto_mapping: for adapters without a task type, the base model's class and library
            (``{"base_model_class": ..., "parent_library": ...}``), written on save as PEFT does
            and read by ``AutoPeftModel``.
        peft_version: the PEFT release whose format the file holds; None fills in
            :data:`PEFT_FORMAT_VERSION`.
    """

    peft_type: Optional[str] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None

    # Fields Hugging Face PEFT writes that peftkit accepts silently when they hold these
    # values (defaults meaning "feature off"); any other value is refused with ConfigError.
    _inert_fields: ClassVar[dict[str, Any]] = {"modules_to_save": None}

    def __post_init__(self) -> None:
        if self.task_type is not None and self.task_type not in TaskType.__members__:
            raise ConfigError(
                f"task_type={self.task_type!r} is not one of {sorted(TaskType.__members__)}."
            )
        if self.peft_version is None:
            self.peft_version = PEFT_FORMAT_VERSION

    def __setattr__(self, name: str, value: Any) -> None:
        # PEFT's configs hold the enum member; subclasses assign the plain string in __post_init__
        if name == "peft_type" and isinstance(value, str) and value in PeftType._value2member_map_:
            value = PeftType(value)
        super().__setattr__(name, value)

    # ----- dict / JSON ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict written to ``adapter_config.json``."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, enum.Enum):
                v = v.value
            if isinstance(v, (set, tuple)):
                v = sorted(v) if isinstance(v, set) else list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "PeftConfig":
        """Build a config from a dict, dispatching on ``peft_type`` when called on PeftConfig.

        Unknown keys are warned about and ignored; known-but-unsupported features raise.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}.")
        target = cls
        if cls is PeftConfig or cls.__dict__.get("_dispatch", False):
            from .core.registry import get_method

            if "peft_type" not in data:
                raise ConfigError(f"{source}: missing required key 'peft_type' (e.g. \"LORA\").")
            target = get_method(data["peft_type"]).config_cls
        names = {f.name for f in dataclasses.fields(target)}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            elif key in target._inert_fields:
                want = target._inert_fields[key]
                if want is not Any and value not in (want, None, False, {}, []):
                    raise ConfigError(
                        f"{source}: '{key}'={value!r} uses a Hugging Face PEFT feature that "
                        f"peftkit does not implement; remove it or set it to {want!r}."
                    )
            else:
                unknown.append(key)
        if unknown:
            warnings.warn(
                f"{source}: ignoring keys unknown to peftkit's {target.__name__} "
                f"(written by a newer version?): {', '.join(sorted(unknown))}",
                stacklevel=2,
            )
        try:
            cfg = target(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: invalid value in {target.__name__} ({e}).") from None
        cfg.validate_types(source)
        return cfg

    def validate_types(self, source: str = "config") -> None:
        """Check each field's JSON type against the dataclass annotation (coarsely)."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            ann = str(f.type)
            if ann in ("int", "Optional[int]") and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(f"{source}: '{f.name}' must be an integer, got {v!r}.")
            if ann in ("float", "Optional[float]") and not isinstance(v, (int, float)):
                raise ConfigError(f"{source}: '{f.name}' must be a number, got {v!r}.")
            if ann == "bool" and not isinstance(v, bool):
                raise ConfigError(f"{source}: '{f.name}' must be true or false, got {v!r}.")

    def save_pretrained(self, save_directory: str) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` atomically."""
        from .io.checkpoint import atomic_write_text

        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(
            os.path.join(save_directory, CONFIG_NAME),
            json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n",
        )

    @classmethod
    def from_pretrained(cls, path: str, subfolder: Optional[str] = None, **overrides) -> "PeftConfig":
        """Read ``adapter_config.json`` from a folder (or the file itself); ``str`` or ``os.PathLike``."""
        path = os.fspath(path)
        if subfolder:
            path = os.path.join(path, subfolder)
        file = path if path.endswith(".json") else os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"No {CONFIG_NAME} at {path!r}: expected a folder written by save_pretrained "
                "(peftkit or Hugging Face PEFT). Hub ids are not fetched by this loader; "
                "download the adapter first."
            )
        try:
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e}).") from None
        data.update(overrides)
        return cls.from_dict(data, source=file)

    @property
    def is_prompt_learning(self) -> bool:
        """True for methods that add virtual tokens instead of wrapping modules."""
        return False
