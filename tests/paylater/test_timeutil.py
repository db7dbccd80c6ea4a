"""Time semantics: `as_of` is a business day in Asia/Tokyo (or the configured zone), stored times UTC."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from paylater.timeutil import day_end_utc, day_start_utc, default_as_of, resolve_as_of, today


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


def test_days_follow_the_configured_zone(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYLATER_TIMEZONE", "UTC")
    assert today(datetime(2026, 11, 26, 16, 0, tzinfo=UTC)) == date(2026, 11, 26)
    assert day_start_utc(date(2026, 11, 27)) == datetime(2026, 11, 27, 0, 0, tzinfo=UTC)


def test_as_of_given_as_a_date_or_a_datetime_is_that_day() -> None:
    assert resolve_as_of(date(2026, 2, 28)) == date(2026, 2, 28)
    assert resolve_as_of(datetime(2026, 2, 28, 23, 59)) == date(2026, 2, 28)


@pytest.mark.parametrize("text", ["2026-11-261", "2026-11-26 tomorrow", "2026-11-26T99:00"])
def test_as_of_with_trailing_text_is_refused_not_truncated(text: str) -> None:
    """`--end 2026-10-311` is a typo to report, not the 31st."""
    with pytest.raises(ValueError, match="as_of must be a date"):
        resolve_as_of(text)


def test_an_instant_with_an_offset_is_the_business_day_it_falls_in(paylater_home: Path) -> None:
    # 16:00 UTC on the 26th is 01:00 on the 27th in Tokyo.
    assert resolve_as_of("2026-11-26T16:00:00+00:00") == date(2026, 11, 27)
    assert resolve_as_of(datetime(2026, 11, 26, 16, 0, tzinfo=UTC)) == date(2026, 11, 27)
    assert resolve_as_of("2026-11-26T16:00:00") == date(2026, 11, 26)  # no offset: that day
