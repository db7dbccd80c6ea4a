"""Time semantics: `as_of` is a business day in the configured zone; timestamps are stored in UTC."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from paylater.settings import get_settings


def business_zone() -> ZoneInfo:
    """The business time zone (Asia/Tokyo unless configured)."""
    return ZoneInfo(get_settings().timezone)


def today(now: datetime | None = None) -> date:
    """Today's date in the business zone."""
    now = now or datetime.now(UTC)
    return now.astimezone(business_zone()).date()


def default_as_of(now: datetime | None = None) -> date:
    """Yesterday in the business zone: the last complete day."""
    return today(now) - timedelta(days=1)


def resolve_as_of(as_of: date | str | None, name: str = "as_of") -> date:
    """An explicit `as_of`, parsed if given as text (templated Prefect parameters arrive as strings).

    `name`: what an error calls the value (a CLI names its flag)."""
    if as_of is None:
        return default_as_of()
    if isinstance(as_of, datetime):
        return _business_date(as_of)
    if isinstance(as_of, date):
        return as_of
    text = str(as_of).strip()
    try:
        return date.fromisoformat(text)
    except ValueError:
        pass
    try:
        # The whole text: a prefix cut to 10 characters took `2026-10-311` for the 31st.
        return _business_date(datetime.fromisoformat(text))
    except ValueError as exc:
        raise ValueError(f"{name} must be a date like 2026-11-26, got {as_of!r}") from exc


def _business_date(moment: datetime) -> date:
    """The business day `moment` falls in; a naive datetime is taken as already local."""
    return moment.astimezone(business_zone()).date() if moment.tzinfo else moment.date()


def day_start_utc(day: date) -> datetime:
    """The UTC instant at which business day `day` begins."""
    return datetime.combine(day, time.min, tzinfo=business_zone()).astimezone(UTC)


def day_end_utc(day: date) -> datetime:
    """The UTC instant at which business day `day` ends (exclusive): the sync watermark for `day`."""
    return day_start_utc(day + timedelta(days=1))
