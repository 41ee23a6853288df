"""peftkit's error classes that PEFT code catches by name.

``PeftError`` is the base of PEFT's own errors; ``NoMatchingPeftModuleError`` is raised when an
adapter's targets select nothing in the model; ``PeftWarning`` is the category of the warnings
PEFT gives as its own (``lora_bias`` on a layer without a bias), so filters on it work. Both are exported from ``peftkit`` and
``peftkit.utils`` as PEFT exports them from ``peft`` and ``peft.utils``; the second is also a
``ValueError``, so code that catches the generic error keeps working.
"""
from __future__ import annotations


class PeftError(Exception):
    """Base of the errors PEFT code may catch by name (``except peftkit.PeftError``)."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """The adapter's ``target_modules`` (and ``target_parameters``) matched nothing in the model.

    The message begins as PEFT's does and goes on to list the layer names the model has.
    """


class PeftWarning(UserWarning):
    """Category of warnings that PEFT issues as ``PeftWarning`` (a ``UserWarning``)."""
