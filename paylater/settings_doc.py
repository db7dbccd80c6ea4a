"""The settings reference (docs/settings.md), generated from the Settings model so it cannot drift:
`paylater settings --reference > docs/settings.md`; a test compares the file with this output."""

from __future__ import annotations

import inspect
import re
from typing import Any

from pydantic import AliasChoices
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from paylater import settings as settings_module
from paylater.settings import Settings

_SECTION = re.compile(r"^\s*# --- ([^(\-]+?)\s*(?:\(|---)")
_FIELD = re.compile(r"^    ([a-z_][a-z0-9_]*): ")


def sections() -> dict[str, str]:
    """Each field's section, from the `# --- name` comments of paylater/settings.py."""
    found: dict[str, str] = {}
    current = "general"
    for line in inspect.getsource(settings_module).splitlines():
        if section := _SECTION.match(line):
            name = section.group(1).strip()
            current = "general" if name.startswith("end ") else name
        elif (field := _FIELD.match(line)) and field.group(1) in Settings.model_fields:
            found[field.group(1)] = current
    return found


def variables(name: str, info: FieldInfo) -> list[str]:
    """The environment variables that set a field, in the order they are read."""
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    return [f"PAYLATER_{name.upper()}"]


def default(info: FieldInfo) -> str:
    """A field's default as a reader would write it."""
    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "(required)"
    else:
        value = info.default
    if value is None:
        return "unset"
    if value in ({}, [], ()):
        return "empty"
    return f"`{value}`"


def reference_markdown() -> str:
    """docs/settings.md: every setting by section, with its variable, default and meaning."""
    by_section: dict[str, list[str]] = {}
    for name, section in sections().items():
        info = Settings.model_fields[name]
        names = " or ".join(f"`{v}`" for v in variables(name, info))
        text = " ".join((info.description or "").split()).replace("|", "\\|")
        by_section.setdefault(section, []).append(f"| {names} | {default(info)} | {text} |")
    lines = [
        "# Settings",
        "",
        "Every setting is an environment variable (or a line in `.env`), read when code runs.",
        "Generated from `paylater/settings.py` by `paylater settings --reference`; a test fails",
        "when this file and the code disagree.",
    ]
    for section, rows in by_section.items():
        lines += ["", f"## {section}", "", "| variable | default | meaning |", "|---|---|---|"]
        lines += rows
    return "\n".join(lines) + "\n"
