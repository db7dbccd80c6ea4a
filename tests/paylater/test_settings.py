"""Settings resolve embedded defaults under PAYLATER_HOME and honour explicit URLs."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from paylater.settings import get_settings
from paylater.timeutil import day_end_utc, day_start_utc, default_as_of, resolve_as_of


def test_defaults_live_under_home(paylater_home: Path) -> None:
    s = get_settings()
    assert s.source == f"sqlite:///{paylater_home / 'source.db'}"
    assert s.warehouse == f"duckdb:///{paylater_home / 'warehouse.duckdb'}"
    assert s.datasets == (paylater_home / "datasets").as_uri()
    assert s.tracking_uri == f"sqlite:///{paylater_home / 'mlflow.db'}"


def test_explicit_urls_win(paylater_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYLATER_WAREHOUSE_URL", "bigquery://proj/ds")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    s = get_settings()
    assert s.warehouse == "bigquery://proj/ds"
    assert s.tracking_uri == "http://127.0.0.1:5000"


def test_settings_follow_the_environment_as_it_changes(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsed settings are reused only while the environment is unchanged, and cannot be edited."""
    first = get_settings()
    assert get_settings() is first
    monkeypatch.setenv("PAYLATER_TIMEZONE", "UTC")
    assert get_settings().timezone == "UTC"
    monkeypatch.delenv("PAYLATER_TIMEZONE")
    assert get_settings().timezone == first.timezone
    with pytest.raises(ValidationError):
        first.timezone = "UTC"  # type: ignore[misc]


def test_business_day_is_tokyo(paylater_home: Path) -> None:
    # 2026-11-26 16:00 UTC is already 2026-11-27 01:00 in Tokyo: yesterday there is the 26th.
    assert default_as_of(datetime(2026, 11, 26, 16, 0, tzinfo=UTC)) == date(2026, 11, 26)
    assert day_start_utc(date(2026, 11, 27)) == datetime(2026, 11, 26, 15, 0, tzinfo=UTC)
    assert day_end_utc(date(2026, 11, 26)) == datetime(2026, 11, 26, 15, 0, tzinfo=UTC)


def test_as_of_parsing() -> None:
    assert resolve_as_of("2026-11-01") == date(2026, 11, 1)
    assert resolve_as_of(" 2026-11-01T00:00:00 ") == date(2026, 11, 1)
    with pytest.raises(ValueError, match="as_of must be a date"):
        resolve_as_of("yesterday")


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
