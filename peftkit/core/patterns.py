"""Per-module overrides keyed by regular expressions (``rank_pattern``, ``alpha_pattern``)."""
from __future__ import annotations

import re
from typing import Any


def pattern_value(patterns: dict, path: str, default: Any) -> Any:
    """The value of the first key of ``patterns`` that matches the end of ``path``.

    A key matches when it equals a dotted suffix of the path or, as a regex, matches a suffix
    that starts at a dot boundary; this is Hugging Face PEFT's rule, so the same patterns pick
    the same modules in both libraries.
    """
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
