"""docs/settings.md is generated from the settings module and kept in step with it."""

from __future__ import annotations

from pathlib import Path


def test_the_settings_reference_in_docs_is_the_one_the_code_generates() -> None:
    """docs/settings.md lists every setting with its default; regenerate it with
    `paylater settings --reference > docs/settings.md` when a setting changes."""
    from paylater.settings import Settings
    from paylater.settings_doc import reference_markdown

    generated = reference_markdown()
    for name in Settings.model_fields:
        assert f"PAYLATER_{name.upper()}" in generated, name
    committed = (Path(__file__).resolve().parents[2] / "docs/settings.md").read_text()
    assert committed == generated, "docs/settings.md is stale: regenerate it (see docstring)"
