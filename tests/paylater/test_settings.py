"""Settings resolve embedded defaults under PAYLATER_HOME and honour explicit URLs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from paylater.settings import get_settings


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
