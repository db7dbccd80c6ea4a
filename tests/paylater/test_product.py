"""The product's rules: fee schedule, due date, maturity."""

from __future__ import annotations

from datetime import date

import pytest

from paylater.product import (
    GRACE_DAYS,
    MAX_AMOUNT_JPY,
    MIN_AMOUNT_JPY,
    due_date_for,
    fee_for,
    matured_by,
)


@pytest.mark.parametrize(
    ("amount", "fee"),
    [
        (MIN_AMOUNT_JPY, 200),
        (5_000, 200),
        (5_001, 400),
        (10_000, 400),
        (30_000, 800),
        (30_001, 1_200),
        (50_000, 1_200),
        (50_001, 1_800),
        (MAX_AMOUNT_JPY, 1_800),
    ],
)
def test_the_fee_is_fixed_by_the_amount_band(amount: int, fee: int) -> None:
    assert fee_for(amount) == fee


@pytest.mark.parametrize("amount", [MIN_AMOUNT_JPY - 1, MAX_AMOUNT_JPY + 1, 0, -5_000])
def test_an_amount_outside_the_limits_has_no_fee(amount: int) -> None:
    with pytest.raises(
        ValueError, match=f"between {MIN_AMOUNT_JPY} and {MAX_AMOUNT_JPY}, got {amount}"
    ):
        fee_for(amount)


@pytest.mark.parametrize(
    ("request_day", "due"),
    [
        (date(2026, 11, 1), date(2026, 12, 27)),
        (date(2026, 11, 30), date(2026, 12, 27)),
        (date(2026, 12, 31), date(2027, 1, 27)),  # over the year end
        (date(2026, 1, 31), date(2026, 2, 27)),  # into the short month
    ],
)
def test_a_charge_falls_due_on_the_27th_of_the_next_month(request_day: date, due: date) -> None:
    assert due_date_for(request_day) == due


def test_a_charge_matures_when_its_grace_period_is_over() -> None:
    due = date(2026, 12, 27)
    assert GRACE_DAYS == 30
    assert not matured_by(due, date(2027, 1, 25))
    assert matured_by(due, date(2027, 1, 26))
