"""The pay-later product's rules, shared by the generator, the features, the service and the worker."""

from __future__ import annotations

from datetime import date, timedelta

MIN_AMOUNT_JPY = 1_000
MAX_AMOUNT_JPY = 100_000
GRACE_DAYS = 30
"""A charge defaults when it is not repaid within this many days after its due date."""

# (upper bound of the amount, fee): the fee is fixed by the requested amount.
FEE_SCHEDULE_JPY: tuple[tuple[int, int], ...] = (
    (5_000, 200),
    (10_000, 400),
    (30_000, 800),
    (50_000, 1_200),
    (MAX_AMOUNT_JPY, 1_800),
)


def fee_for(amount_jpy: int) -> int:
    """The fee charged for deferring `amount_jpy`; ValueError outside the product's limits."""
    if not MIN_AMOUNT_JPY <= amount_jpy <= MAX_AMOUNT_JPY:
        raise ValueError(
            f"amount_jpy must be between {MIN_AMOUNT_JPY} and {MAX_AMOUNT_JPY}, got {amount_jpy}"
        )
    for upper, fee in FEE_SCHEDULE_JPY:
        if amount_jpy <= upper:
            return fee
    raise AssertionError("unreachable: the schedule covers MAX_AMOUNT_JPY")


def due_date_for(request_day: date) -> date:
    """Charges fall due on the 27th of the month after the request (the card's billing day)."""
    first_next = (request_day.replace(day=1) + timedelta(days=32)).replace(day=1)
    return first_next.replace(day=27)


def matured_by(due_date: date, as_of: date) -> bool:
    """Whether a charge's outcome is known at the end of `as_of` (grace period over)."""
    return as_of >= due_date + timedelta(days=GRACE_DAYS)
