"""Business-day arithmetic for the simulator: day boundaries in microseconds, paydays, intraday times."""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

import numpy as np

from datagen.population import PAYDAY_15TH, PAYDAY_25TH, PAYDAY_MONTH_END

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)

# Relative activity by hour of the business day (local time), per kind of event.
HOURLY_SPEND = np.array(
    [0.5, 0.3, 0.2, 0.1, 0.1, 0.2, 0.8, 2.0, 3.5, 3.0, 3.0, 4.0,
     7.5, 6.0, 4.0, 4.0, 4.5, 6.0, 7.5, 7.0, 5.5, 4.0, 2.5, 1.2]
)  # fmt: skip
HOURLY_APP = np.array(
    [1.5, 0.8, 0.4, 0.2, 0.2, 0.4, 1.5, 3.0, 3.5, 2.5, 2.5, 3.0,
     5.0, 4.0, 3.0, 3.0, 3.5, 4.5, 5.5, 6.0, 6.5, 6.5, 5.0, 3.0]
)  # fmt: skip
HOURLY_TOPUP = np.array(
    [0.3, 0.2, 0.1, 0.1, 0.1, 0.2, 0.6, 1.5, 3.0, 4.0, 4.5, 4.5,
     5.0, 4.5, 4.0, 4.0, 4.0, 4.5, 5.0, 4.5, 3.5, 2.5, 1.5, 0.8]
)  # fmt: skip
HOURLY_REQUEST = np.array(
    [2.0, 1.5, 0.8, 0.4, 0.3, 0.3, 0.8, 1.5, 2.0, 2.0, 2.0, 2.5,
     3.5, 3.0, 2.5, 2.5, 3.0, 3.5, 4.5, 5.0, 5.5, 5.5, 4.5, 3.0]
)  # fmt: skip


class BusinessClock:
    """Day boundaries of one business time zone, cached (the zone is read once, not per row)."""

    def __init__(self, zone: str) -> None:
        self.zone = ZoneInfo(zone)
        self._start = lru_cache(maxsize=None)(self._compute_start)

    def _compute_start(self, ordinal: int) -> int:
        """UTC microseconds at which business day `ordinal` begins (as paylater.timeutil)."""
        start = datetime.combine(date.fromordinal(ordinal), time.min, tzinfo=self.zone)
        return (start.astimezone(UTC) - _EPOCH) // _US

    def start_us(self, ordinal: int) -> int:
        """Start of one business day in UTC microseconds."""
        return int(self._start(int(ordinal)))

    def starts_us(self, ordinals: np.ndarray) -> np.ndarray:
        """Start of many business days (vectorised over the distinct days)."""
        if len(ordinals) == 0:
            return np.zeros(0, dtype=np.int64)
        uniq, inverse = np.unique(ordinals, return_inverse=True)
        return np.array([self.start_us(o) for o in uniq], dtype=np.int64)[inverse]

    def lengths_us(self, ordinals: np.ndarray) -> np.ndarray:
        """Length of many business days (23-25 h where the zone has DST)."""
        return self.starts_us(ordinals + 1) - self.starts_us(ordinals)

    def times_in_days(
        self, rng: np.random.Generator, ordinals: np.ndarray, profile: np.ndarray
    ) -> np.ndarray:
        """Random instants (UTC microseconds) inside the given business days, by hourly profile."""
        n = len(ordinals)
        hour = rng.choice(24, size=n, p=profile / profile.sum())
        fraction = (hour + rng.random(n)) / 24.0
        return self.starts_us(ordinals) + (fraction * self.lengths_us(ordinals)).astype(np.int64)


def us_to_datetime(us: int) -> datetime:
    """UTC microseconds to an aware datetime."""
    return _EPOCH + timedelta(microseconds=int(us))


def payday_of(year: int, month: int, kind: int) -> date:
    """A payday in a month; one falling on a weekend moves to the Friday before (Japanese practice)."""
    if kind == PAYDAY_25TH:
        day = date(year, month, 25)
    elif kind == PAYDAY_15TH:
        day = date(year, month, 15)
    elif kind == PAYDAY_MONTH_END:
        day = date(year, month, calendar.monthrange(year, month)[1])
    else:
        raise ValueError(f"unknown payday kind {kind}")
    while day.weekday() >= 5:
        day -= timedelta(days=1)
    return day


@lru_cache(maxsize=4096)
def payday_context(ordinal: int) -> tuple[tuple[bool, bool, bool], tuple[int, int, int]]:
    """For each payday kind: whether `ordinal` is a payday, and days since the last payday."""
    day = date.fromordinal(ordinal)
    is_payday = []
    since = []
    for kind in (PAYDAY_25TH, PAYDAY_15TH, PAYDAY_MONTH_END):
        this_month = payday_of(day.year, day.month, kind)
        if this_month <= day:
            last = this_month
        else:
            prev = day.replace(day=1) - timedelta(days=1)
            last = payday_of(prev.year, prev.month, kind)
        is_payday.append(last == day)
        since.append((day - last).days)
    return (is_payday[0], is_payday[1], is_payday[2]), (since[0], since[1], since[2])
