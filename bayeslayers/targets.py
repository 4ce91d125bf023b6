"""Module selection with peft's semantics.

A list (or tuple/set) of names matches a module whose qualified name equals an entry or ends with
``"." + entry``; a string is a regular expression that must match the whole qualified name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def check_targets(targets, argument: str):
    if targets is None or isinstance(targets, str):
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as error:
                raise ValueError(f"{argument} is not a valid regular expression: {error}") from None
        return targets
    if isinstance(targets, Iterable):
        targets = list(targets)
        if all(isinstance(t, str) for t in targets):
            return targets
    raise TypeError(f"{argument} must be a regex string, a list of module names, or None; got {targets!r}")


def name_matches(name: str, targets) -> bool:
    """True when the qualified module ``name`` is selected by ``targets`` (regex string or list of names)."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)
