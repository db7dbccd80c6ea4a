"""The one check of a name spliced into SQL text: a plain identifier, or an error naming it.

In paylater/ because the Bento packages only bentos/ and paylater/ (bentofile.yaml), and the
service checks the online table's and the features' names as the feature build does.
"""

from __future__ import annotations

import re
from typing import Any

# fullmatch, not match with ^...$: `$` also matches before a trailing newline, so "users\n" (a
# YAML block scalar, an environment variable with its newline) passed as a plain name.
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RULE = "ASCII letters, digits and underscores, not starting with a digit"
"""What a plain identifier is, as the errors say it."""


def is_identifier(name: Any) -> bool:
    """Whether `name` is a plain SQL identifier: safe to splice into SQL text, quoted or not."""
    return isinstance(name, str) and _PLAIN.fullmatch(name) is not None


def check_identifier(name: Any, what: str, error: type[Exception] = ValueError) -> str:
    """`name` when it is a plain SQL identifier; else `error` saying what it names (`what`: the
    setting or file it comes from, e.g. "online table name (PAYLATER_ONLINE_FEATURES_TABLE)")."""
    if not is_identifier(name):
        raise error(f"{what} {name!r} is not a plain SQL identifier ({RULE})")
    return name
