"""Method registry: ``peft_type`` -> :class:`~peftkit.core.method.Method`.

Adding a method is one file that calls :func:`register_method` plus one row in the test matrix;
nothing in ``core/`` names a method.
"""
from __future__ import annotations

from .method import Method

_METHODS: dict[str, Method] = {}


def register_method(method_cls: type[Method]) -> type[Method]:
    """Class decorator: register a Method subclass under its ``name`` (a ``peft_type``)."""
    if not method_cls.name:
        raise ValueError(f"{method_cls.__name__} needs a non-empty `name`")
    _METHODS[method_cls.name.upper()] = method_cls()
    return method_cls


def get_method(peft_type) -> Method:
    """Look a method up by ``peft_type`` (case-insensitive); clear error when unknown."""
    from .. import methods  # noqa: F401  (importing registers the built-in methods)

    key = getattr(peft_type, "value", peft_type)
    key = str(key).upper()
    if key not in _METHODS:
        raise ValueError(
            f"Unknown peft_type {peft_type!r}; peftkit knows: {', '.join(sorted(_METHODS))}."
        )
    return _METHODS[key]


def registered_methods() -> list[str]:
    """Names of all registered methods."""
    from .. import methods  # noqa: F401

    return sorted(_METHODS)
