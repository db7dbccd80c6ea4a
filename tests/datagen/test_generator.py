"""The simulator in memory: determinism, contract shapes, product rules, realistic rates."""

from __future__ import annotations

from datetime import date, timedelta

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from datagen import SourceData, generate
from datagen.tables import APP_EVENTS, CARD_TRANSACTIONS, DEFERRED_CHARGES, TOPUPS, TRUTH, USERS
from paylater.product import GRACE_DAYS, due_date_for, fee_for, matured_by
from paylater.timeutil import day_end_utc, day_start_utc

END = date(2026, 10, 31)


@pytest.fixture(scope="module")
def world() -> SourceData:
    """Enough users and months for matured charges and rates to mean something."""
    return generate(1000, 7, seed=7, end_date=END)


def _business_dates(column: pa.ChunkedArray) -> np.ndarray:
    """UTC instants to Asia/Tokyo business dates."""
    local = pc.local_timestamp(column.cast(pa.timestamp("us", tz="Asia/Tokyo")))
    return local.cast(pa.date32()).to_numpy(zero_copy_only=False)


def _auc(label: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties)."""
    import scipy.stats

    label = np.asarray(label, dtype=bool)
    ranks = scipy.stats.rankdata(np.asarray(score, dtype=float))
    positives, negatives = label.sum(), (~label).sum()
    return float((ranks[label].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def test_same_seed_gives_identical_rows_and_another_seed_does_not() -> None:
    first = generate(100, 1, seed=11, end_date=END)
    second = generate(100, 1, seed=11, end_date=END)
    other = generate(100, 1, seed=12, end_date=END)
    for name in ("users", "card_transactions", "topups", "deferred_charges", "app_events", "truth"):
        assert getattr(first, name).equals(getattr(second, name)), name
    assert not first.card_transactions.equals(other.card_transactions)


def test_tables_have_the_contract_shapes_and_unique_ids(world: SourceData) -> None:
    expected = {
        "users": (USERS, "user_id"),
        "card_transactions": (CARD_TRANSACTIONS, "transaction_id"),
        "topups": (TOPUPS, "topup_id"),
        "deferred_charges": (DEFERRED_CHARGES, "charge_id"),
        "app_events": (APP_EVENTS, "event_id"),
        "truth": (TRUTH, "charge_id"),
    }
    for name, (schema, key) in expected.items():
        table = getattr(world, name)
        assert table.schema.equals(schema), name
        assert table.num_rows > 0, name
        assert pc.count_distinct(table.column(key)).as_py() == table.num_rows, name
    counts = world.row_counts()
    per_user_month = counts["card_transactions"] / (counts["users"] * 8)
    assert 20 < per_user_month < 60  # sign-ups and churn make it lower than for active users
    assert set(pc.unique(world.topups.column("method")).to_pylist()) == {
        "convenience_store",
        "bank",
        "credit_card",
        "deferred",
    }
    assert set(pc.unique(world.users.column("status")).to_pylist()) == {"active", "closed"}


def test_fees_due_dates_and_deferred_topups_follow_the_product_rules(world: SourceData) -> None:
    charges = world.deferred_charges
    amounts = charges.column("amount_jpy").to_pylist()
    assert charges.column("fee_jpy").to_pylist() == [fee_for(a) for a in amounts]
    request_days = _business_dates(charges.column("requested_at"))
    dues = charges.column("due_date").to_pylist()
    assert dues == [due_date_for(d.astype(object)) for d in request_days]
    deferred = world.topups.filter(pc.equal(world.topups.column("method"), "deferred"))
    assert sorted(deferred.column("amount_jpy").to_pylist()) == sorted(amounts)


def test_every_timestamp_falls_in_the_simulated_business_days(world: SourceData) -> None:
    start = day_start_utc(END - timedelta(days=400))
    end = day_end_utc(END)
    for table, created in [
        (world.card_transactions, "authorized_at"),
        (world.topups, "topped_up_at"),
        (world.deferred_charges, "requested_at"),
    ]:
        created_at = table.column(created)
        updated_at = table.column("updated_at")
        assert pc.min(created_at).as_py() >= start
        assert pc.max(updated_at).as_py() < end
        assert pc.all(pc.greater_equal(updated_at, created_at)).as_py()
    events = world.app_events
    assert (
        _business_dates(events.column("event_at")) == events.column("event_date").to_numpy()
    ).all()


def test_defaults_happen_only_after_the_grace_period(world: SourceData) -> None:
    charges = world.deferred_charges.to_pandas()
    charges["updated_day"] = _business_dates(world.deferred_charges.column("updated_at"))
    defaulted = charges[charges.status == "defaulted"]
    assert len(defaulted) > 0
    grace_end = [d + timedelta(days=GRACE_DAYS) for d in defaulted.due_date]
    assert all(u.date() > g for u, g in zip(defaulted.updated_day, grace_end, strict=True))
    assert defaulted.repaid_at.isna().all()
    repaid = charges[charges.status == "repaid"]
    repaid_day = _business_dates(world.deferred_charges.column("repaid_at"))[
        charges.status == "repaid"
    ]
    expected_late = [
        max(0, (r.astype(object) - d).days)
        for r, d in zip(repaid_day, repaid.due_date, strict=True)
    ]
    assert repaid.days_late.tolist() == expected_late
    outstanding = charges[charges.status == "outstanding"]
    assert all(
        not matured_by(d, END) or d + timedelta(days=GRACE_DAYS) == END
        for d in outstanding.due_date
    )


def test_true_default_probabilities_give_a_realistic_and_learnable_default_rate(
    world: SourceData,
) -> None:
    charges = world.deferred_charges.to_pandas().merge(world.truth.to_pandas(), on="charge_id")
    assert len(charges) == world.truth.num_rows
    assert charges.default_probability.between(0, 1, inclusive="neither").all()
    matured = charges[[matured_by(d, END) for d in charges.due_date]]
    label = matured.repaid_at.isna() | (matured.days_late > GRACE_DAYS)
    assert len(matured) > 700
    assert 0.05 <= label.mean() <= 0.12
    assert abs(label.mean() - matured.default_probability.mean()) < 0.02
    assert _auc(label.to_numpy(), matured.default_probability.to_numpy()) > 0.65


def test_spending_spikes_on_paydays(world: SourceData) -> None:
    tx = world.card_transactions
    days = _business_dates(tx.column("authorized_at"))
    dom = np.array([d.astype(object).day for d in days])
    by_day = np.bincount(dom, weights=tx.column("amount_jpy").to_numpy(), minlength=32)[1:29]
    assert by_day[24] > 1.15 * np.median(by_day)  # the 25th, most common payday in Japan


def test_observable_history_predicts_default(world: SourceData) -> None:
    """A model fed only source tables can learn: past lateness and declines separate defaulters."""
    charges = world.deferred_charges  # noqa: F841 (read by duckdb by name)
    tx = world.card_transactions  # noqa: F841
    relation = duckdb.sql(
        f"""
        SELECT c.charge_id,
               (c.repaid_at IS NULL OR c.days_late > {GRACE_DAYS})::INT AS label,
               (SELECT count(*) FROM charges p WHERE p.user_id = c.user_id
                   AND p.repaid_at < c.requested_at AND p.days_late > 0) AS past_late,
               (SELECT count(*) FROM tx t WHERE t.user_id = c.user_id AND t.status = 'declined'
                   AND t.authorized_at BETWEEN c.requested_at - INTERVAL 30 DAY AND c.requested_at)
                   AS declines_30d
        FROM charges c
        WHERE c.due_date + INTERVAL {GRACE_DAYS} DAY <= DATE '{END}'
        """
    )
    assert relation is not None, "a SELECT yields rows"
    rows = relation.df()
    score = rows.past_late + 0.3 * rows.declines_30d
    assert _auc(rows.label.to_numpy(), score.to_numpy()) > 0.55
