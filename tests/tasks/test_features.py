"""Feature SQL against an independent plain-Python reference, point-in-time leakage, label as of, config."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa
import pytest

from paylater.product import GRACE_DAYS, due_date_for, fee_for
from paylater.settings import Settings
from tasks import features
from tasks.warehouse.duckdb import DuckDBWarehouse

TOKYO = ZoneInfo("Asia/Tokyo")
AS_OF = date(2026, 7, 15)
TS = pa.timestamp("us", tz="UTC")

SCHEMAS = {
    "users": pa.schema(
        [
            ("user_id", pa.int64()),
            ("signed_up_at", TS),
            ("birth_year", pa.int64()),
            ("prefecture", pa.string()),
            ("identity_verified_at", TS),
            ("status", pa.string()),
            ("updated_at", TS),
        ]
    ),
    "card_transactions": pa.schema(
        [
            ("transaction_id", pa.int64()),
            ("user_id", pa.int64()),
            ("authorized_at", TS),
            ("amount_jpy", pa.int64()),
            ("merchant_id", pa.int64()),
            ("merchant_category", pa.string()),
            ("channel", pa.string()),
            ("status", pa.string()),
            ("updated_at", TS),
        ]
    ),
    "topups": pa.schema(
        [
            ("topup_id", pa.int64()),
            ("user_id", pa.int64()),
            ("topped_up_at", TS),
            ("amount_jpy", pa.int64()),
            ("method", pa.string()),
            ("updated_at", TS),
        ]
    ),
    "deferred_charges": pa.schema(
        [
            ("charge_id", pa.int64()),
            ("user_id", pa.int64()),
            ("requested_at", TS),
            ("amount_jpy", pa.int64()),
            ("fee_jpy", pa.int64()),
            ("due_date", pa.date32()),
            ("status", pa.string()),
            ("repaid_at", TS),
            ("days_late", pa.int64()),
            ("updated_at", TS),
        ]
    ),
    "app_events": pa.schema(
        [
            ("event_id", pa.int64()),
            ("user_id", pa.int64()),
            ("event_at", TS),
            ("event_date", pa.date32()),
            ("session_id", pa.int64()),
            ("event_name", pa.string()),
            ("screen", pa.string()),
        ]
    ),
}
CATEGORIES = [
    "grocery",
    "convenience",
    "dining",
    "transport",
    "online_shopping",
    "entertainment",
    "fashion",
    "travel",
]
SHARE_CATEGORIES = CATEGORIES[:-1]  # every category but the catch-all ones gets a share
METHODS = ["convenience_store", "bank", "credit_card", "deferred"]


def local_date(ts: datetime) -> date:
    """The Tokyo business date of a UTC instant."""
    return ts.astimezone(TOKYO).date()


def tokyo(day: date, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    """A Tokyo wall-clock time as a UTC instant."""
    return datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=TOKYO).astimezone(
        UTC
    )


def random_source(seed: int = 7, users: int = 6) -> dict[str, list[dict[str, Any]]]:
    """Small source tables with edge cases: midnight boundaries, declines, refunds, late repayments."""
    rng = random.Random(seed)
    start = date(2025, 12, 1)
    days = (date(2026, 8, 10) - start).days
    now = datetime(2026, 8, 20, tzinfo=UTC)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in SCHEMAS}
    ids = iter(range(1, 10**6))
    for user in range(1, users + 1):
        signed = tokyo(start + timedelta(days=rng.randrange(0, 40)), rng.randrange(24))
        verified = signed + timedelta(days=rng.randrange(0, 120)) if user % 3 else None
        rows["users"].append(
            dict(
                user_id=user,
                signed_up_at=signed,
                birth_year=1980 + user,
                prefecture="Tokyo",
                identity_verified_at=verified,
                status="closed" if user == users else "active",
                updated_at=now,
            )
        )
        for _ in range(rng.randrange(20, 70)):
            day = start + timedelta(days=rng.randrange(days))
            # Half the transactions sit right at the Tokyo midnight edge or in the night window.
            hour, minute, second = rng.choice(
                [(0, 0, 0), (23, 59, 59), (22, 0, 0), (4, 59, 59), (5, 0, 0)]
                + [(rng.randrange(24), rng.randrange(60), 0)] * 5
            )
            rows["card_transactions"].append(
                dict(
                    transaction_id=next(ids),
                    user_id=user,
                    authorized_at=tokyo(day, hour, minute, second),
                    amount_jpy=rng.randrange(100, 20_000),
                    merchant_id=rng.randrange(1, 12),
                    merchant_category=rng.choice(CATEGORIES),
                    channel="online",
                    status=rng.choice(["settled"] * 8 + ["declined", "refunded"]),
                    updated_at=now,
                )
            )
        for _ in range(rng.randrange(0, 15)):
            day = start + timedelta(days=rng.randrange(days))
            rows["topups"].append(
                dict(
                    topup_id=next(ids),
                    user_id=user,
                    topped_up_at=tokyo(day, rng.randrange(24), rng.randrange(60)),
                    amount_jpy=rng.randrange(1_000, 30_000),
                    method=rng.choice(METHODS),
                    updated_at=now,
                )
            )
        for _ in range(rng.randrange(1, 6)):
            day = start + timedelta(days=rng.randrange(days))
            amount = rng.randrange(1_000, 50_000)
            due = due_date_for(day)
            outcome = rng.choice(["on_time", "late", "very_late", "never", "after_as_of"])
            late = {"on_time": 0, "late": rng.randrange(1, 25), "very_late": 45}.get(outcome)
            if outcome == "after_as_of":
                late = max((AS_OF - due).days + rng.randrange(1, 10), 0)
            repaid = tokyo(due + timedelta(days=late), 12) if late is not None else None
            rows["deferred_charges"].append(
                dict(
                    charge_id=next(ids),
                    user_id=user,
                    requested_at=tokyo(day, rng.randrange(24), rng.randrange(60)),
                    amount_jpy=amount,
                    fee_jpy=fee_for(amount),
                    due_date=due,
                    status="repaid" if repaid else "outstanding",
                    repaid_at=repaid,
                    days_late=late,
                    updated_at=now,
                )
            )
        for session in range(rng.randrange(0, 25)):
            day = start + timedelta(days=rng.randrange(days))
            at = tokyo(day, rng.randrange(24), rng.randrange(60))
            for k, name in enumerate(["session_start", "screen_view", "screen_view"]):
                rows["app_events"].append(
                    dict(
                        event_id=next(ids),
                        user_id=user,
                        event_at=at + timedelta(seconds=k),
                        event_date=local_date(at + timedelta(seconds=k)),
                        session_id=user * 1000 + session,
                        event_name=name,
                        screen="home",
                    )
                )
    return rows


def load(warehouse: DuckDBWarehouse, source: dict[str, list[dict[str, Any]]]) -> None:
    """Write the source rows into the warehouse tables (the contract's Arrow types)."""
    for name, schema in SCHEMAS.items():
        warehouse.replace_table(name, pa.Table.from_pylist(source[name], schema=schema))


# ---------------------------------------------------------------- the independent reference


def days_late(charge: dict[str, Any]) -> int:
    """A repaid charge's days past due: the source's value, else from the repayment's local day."""
    if charge["days_late"] is not None:
        return int(charge["days_late"])
    return max((local_date(charge["repaid_at"]) - charge["due_date"]).days, 0)


def ref_window(values: list[int]) -> dict[str, Any]:
    """count, sum, mean, max, sample std of one window."""
    return {
        "count": len(values),
        "sum": sum(values),
        "mean": statistics.fmean(values) if values else None,
        "max": max(values) if values else None,
        "std": statistics.stdev(values) if len(values) >= 2 else None,
    }


def ratio(num: float, den: float) -> float | None:
    """num / den, None when den is 0."""
    return num / den if den else None


def ref_features(src: dict[str, list[dict[str, Any]]], user: int, day: date) -> dict[str, Any]:
    """Every user feature for a request by `user` on `day`, written from the definitions."""
    out: dict[str, Any] = {}
    txs = [
        t
        for t in src["card_transactions"]
        if t["user_id"] == user and local_date(t["authorized_at"]) < day
    ]
    age = {id(t): (day - local_date(t["authorized_at"])).days for t in txs}
    spent = [t for t in txs if t["status"] != "declined"]
    for w in (7, 30, 90):
        stats = ref_window([t["amount_jpy"] for t in spent if age[id(t)] <= w])
        for key, value in stats.items():
            out[f"card_{key}_{w}d"] = value
    out["card_declined_count_30d"] = sum(
        1 for t in txs if t["status"] == "declined" and age[id(t)] <= 30
    )
    s90 = [t for t in spent if age[id(t)] <= 90]
    out["card_distinct_merchants_90d"] = len({t["merchant_id"] for t in s90})
    total = sum(t["amount_jpy"] for t in s90)
    for cat in SHARE_CATEGORIES:
        out[f"card_share_{cat}_90d"] = ratio(
            sum(t["amount_jpy"] for t in s90 if t["merchant_category"] == cat), total
        )
    hours = [t["authorized_at"].astimezone(TOKYO).hour for t in s90]
    out["card_night_ratio_90d"] = ratio(sum(1 for h in hours if h >= 22 or h < 5), len(s90))
    out["card_weekend_ratio_90d"] = ratio(
        sum(1 for t in s90 if local_date(t["authorized_at"]).weekday() >= 5), len(s90)
    )
    month = day.year * 12 + day.month
    lags = {}
    for k in (1, 2, 3):
        lags[k] = sum(
            t["amount_jpy"]
            for t in spent
            if month
            - (local_date(t["authorized_at"]).year * 12 + local_date(t["authorized_at"]).month)
            == k
        )
        out[f"card_spend_month_lag{k}"] = lags[k]
    out["card_spend_trend_1_2"] = lags[1] - lags[2]
    out["card_spend_trend_1_3"] = lags[1] - lags[3]

    tops = [
        (t, (day - local_date(t["topped_up_at"])).days)
        for t in src["topups"]
        if t["user_id"] == user and local_date(t["topped_up_at"]) < day
    ]
    for w in (30, 90):
        out[f"topup_count_{w}d"] = sum(1 for _, a in tops if a <= w)
        out[f"topup_sum_{w}d"] = sum(t["amount_jpy"] for t, a in tops if a <= w)
    for w in (30, 90):
        for method in METHODS:
            out[f"topup_{method}_sum_{w}d"] = sum(
                t["amount_jpy"] for t, a in tops if a <= w and t["method"] == method
            )
    out["topup_days_since_last"] = min((a for _, a in tops), default=None)

    prior = [
        c
        for c in src["deferred_charges"]
        if c["user_id"] == user and local_date(c["requested_at"]) < day
    ]
    late_known, settled_or_due, outstanding = [], [], 0
    for c in prior:
        repaid = c["repaid_at"] is not None and local_date(c["repaid_at"]) < day
        if repaid:
            late = days_late(c)
        elif c["due_date"] < day:
            late = (day - c["due_date"]).days
        else:
            late = 0
        late_known.append(late)
        if repaid or c["due_date"] < day:
            settled_or_due.append(late)
        if not repaid:
            outstanding += c["amount_jpy"] + c["fee_jpy"]
    out["dc_count"] = len(prior)
    out["dc_late_count"] = sum(1 for x in late_known if x > 0)
    out["dc_max_days_late"] = max(late_known, default=0)
    out["dc_on_time_ratio"] = ratio(sum(1 for x in settled_or_due if x == 0), len(settled_or_due))
    out["dc_outstanding_jpy"] = outstanding
    out["dc_days_since_last"] = min(
        ((day - local_date(c["requested_at"])).days for c in prior), default=None
    )

    events = [
        (e, (day - e["event_date"]).days)
        for e in src["app_events"]
        if e["user_id"] == user and 1 <= (day - e["event_date"]).days <= 90
    ]
    for w in (7, 30):
        window = [e for e, a in events if a <= w]
        out[f"app_sessions_{w}d"] = sum(1 for e in window if e["event_name"] == "session_start")
        out[f"app_events_{w}d"] = len(window)
        out[f"app_active_days_{w}d"] = len({e["event_date"] for e in window})
    out["app_days_since_last_session"] = min(
        (a for e, a in events if e["event_name"] == "session_start"), default=None
    )

    (account,) = [u for u in src["users"] if u["user_id"] == user]
    out["account_age_days"] = (day - local_date(account["signed_up_at"])).days
    verified = account["identity_verified_at"]
    out["identity_verified"] = int(verified is not None and local_date(verified) < day)
    return out


def ref_training(src: dict[str, list[dict[str, Any]]], as_of: date) -> list[dict[str, Any]]:
    """Training rows: matured charges, label as known at as_of, features as of the request day."""
    rows = []
    for c in sorted(src["deferred_charges"], key=lambda c: c["charge_id"]):
        day = local_date(c["requested_at"])
        if (as_of - c["due_date"]).days < GRACE_DAYS or day > as_of:
            continue
        good = (
            c["repaid_at"] is not None
            and local_date(c["repaid_at"]) <= as_of
            and days_late(c) <= GRACE_DAYS
        )
        rows.append(
            {
                "charge_id": c["charge_id"],
                "user_id": c["user_id"],
                "requested_at": c["requested_at"],
                "request_date": day,
                "label_default": 0 if good else 1,
                "request_amount_jpy": c["amount_jpy"],
                "request_fee_jpy": c["fee_jpy"],
                **ref_features(src, c["user_id"], day),
            }
        )
    return rows


def ref_scoring(src: dict[str, list[dict[str, Any]]], as_of: date) -> list[dict[str, Any]]:
    """Scoring rows: active users signed up by the end of as_of, as a request on as_of + 1."""
    return [
        {
            "user_id": u["user_id"],
            "as_of": as_of,
            **ref_features(src, u["user_id"], as_of + timedelta(days=1)),
        }
        for u in sorted(src["users"], key=lambda u: u["user_id"])
        if u["status"] == "active" and local_date(u["signed_up_at"]) <= as_of
    ]


def assert_rows_equal(actual: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Same rows, same columns, equal values (floats to 1e-9 relative)."""
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert set(got) == set(want), set(got) ^ set(want)
        for name, value in want.items():
            if isinstance(value, float) and got[name] is not None:
                assert math.isclose(got[name], value, rel_tol=1e-9), (name, got, want)
            else:
                assert got[name] == value, (name, got[name], value, got["user_id"])


# ---------------------------------------------------------------- tests


@pytest.fixture
def settings(paylater_home: Path) -> Settings:
    """Default settings in an isolated home."""
    return Settings()


@pytest.fixture
def warehouse() -> Iterator[DuckDBWarehouse]:
    """An in-memory DuckDB warehouse."""
    w = DuckDBWarehouse(":memory:")
    yield w
    w.close()


@pytest.fixture(scope="module")
def source() -> dict[str, list[dict[str, Any]]]:
    """The random source rows (built once)."""
    return random_source()


def test_training_matches_reference(
    warehouse: DuckDBWarehouse, source: dict[str, list[dict[str, Any]]], settings: Settings
) -> None:
    load(warehouse, source)
    table, feature_sql = features.build_training_table(warehouse, AS_OF, settings)
    expected = ref_training(source, AS_OF)
    assert len(expected) >= 8 and {r["label_default"] for r in expected} == {0, 1}
    assert table.column_names == [
        *features.TRAINING_HEAD,
        "label_default",
        *feature_sql.training_features,
    ]
    assert table.schema.field("label_default").type == pa.int8()
    assert table.schema.field("requested_at").type == TS
    assert_rows_equal(table.to_pylist(), expected)


def test_scoring_matches_reference(
    warehouse: DuckDBWarehouse, source: dict[str, list[dict[str, Any]]], settings: Settings
) -> None:
    load(warehouse, source)
    table, feature_sql = features.build_scoring_table(warehouse, AS_OF, settings)
    expected = ref_scoring(source, AS_OF)
    assert table.column_names == ["user_id", "as_of", *feature_sql.user_features]
    assert [r["user_id"] for r in expected] == [1, 2, 3, 4, 5]  # user 6 is closed
    assert_rows_equal(table.to_pylist(), expected)


def test_reference_exercises_every_feature(source: dict[str, list[dict[str, Any]]]) -> None:
    """Guard against a vacuous comparison: every feature takes a non-trivial value somewhere."""
    rows = ref_training(source, AS_OF) + ref_scoring(source, AS_OF)
    feature_names = features.load_feature_sql(Settings()).user_features
    trivial = [n for n in feature_names if all(r[n] in (None, 0) for r in rows)]
    assert not trivial


def future_rows(
    source: dict[str, list[dict[str, Any]]], user: int, day: date
) -> dict[str, list[dict[str, Any]]]:
    """The source plus rows dated on or after `day`, and later outcomes of older rows."""
    src = {k: [dict(r) for r in v] for k, v in source.items()}
    at = tokyo(day)  # exactly the first instant of the request day: must be excluded
    now = datetime(2026, 8, 20, tzinfo=UTC)
    base = 9_000_000
    src["card_transactions"].append(
        dict(
            transaction_id=base,
            user_id=user,
            authorized_at=at,
            amount_jpy=99_999,
            merchant_id=999,
            merchant_category="grocery",
            channel="online",
            status="settled",
            updated_at=now,
        )
    )
    src["topups"].append(
        dict(
            topup_id=base,
            user_id=user,
            topped_up_at=at + timedelta(hours=5),
            amount_jpy=50_000,
            method="bank",
            updated_at=now,
        )
    )
    src["app_events"].append(
        dict(
            event_id=base,
            user_id=user,
            event_at=at,
            event_date=day,
            session_id=base,
            event_name="session_start",
            screen="home",
        )
    )
    src["deferred_charges"].append(
        dict(
            charge_id=base,
            user_id=user,
            requested_at=at,
            amount_jpy=5_000,
            fee_jpy=200,
            due_date=due_date_for(day),
            status="outstanding",
            repaid_at=None,
            days_late=None,
            updated_at=now,
        )
    )
    for charge in src["deferred_charges"]:
        # An older charge unpaid at the request day gets repaid later (today's status says repaid).
        if (
            charge["user_id"] == user
            and local_date(charge["requested_at"]) < day
            and (charge["repaid_at"] is None or local_date(charge["repaid_at"]) >= day)
        ):
            charge["repaid_at"] = max(at + timedelta(days=2), charge["requested_at"])
            charge["days_late"] = max(
                (local_date(charge["repaid_at"]) - charge["due_date"]).days, 0
            )
            charge["status"] = "repaid"
    for tx in src["card_transactions"]:
        # Refunds happen later; the refunded status must not change an earlier request's features.
        if tx["user_id"] == user and tx["status"] == "settled" and tx["transaction_id"] % 2:
            tx["status"] = "refunded"
    for account in src["users"]:
        if account["user_id"] == user and account["identity_verified_at"] is None:
            account["identity_verified_at"] = at + timedelta(hours=1)
    return src


def test_no_leakage_from_rows_on_or_after_the_request_day(
    warehouse: DuckDBWarehouse, source: dict[str, list[dict[str, Any]]], settings: Settings
) -> None:
    load(warehouse, source)
    before, feature_sql = features.build_training_table(warehouse, AS_OF, settings)
    rows = before.to_pylist()
    changed_something = False
    for row in rows[:: max(len(rows) // 4, 1)]:
        leaked = future_rows(source, row["user_id"], row["request_date"])
        load(warehouse, leaked)
        after, _ = features.build_training_table(warehouse, AS_OF, settings)
        (again,) = [r for r in after.to_pylist() if r["charge_id"] == row["charge_id"]]
        for name in feature_sql.training_features:
            assert again[name] == row[name] or (
                isinstance(row[name], float) and math.isclose(again[name], row[name])
            ), (name, row["charge_id"])
        changed_something |= after.num_rows != before.num_rows or after != before
    # The added rows are real: they do change later requests / the scoring set.
    assert changed_something


def test_scoring_ignores_rows_after_as_of(
    warehouse: DuckDBWarehouse, source: dict[str, list[dict[str, Any]]], settings: Settings
) -> None:
    day = AS_OF + timedelta(days=1)
    load(warehouse, source)
    before, _ = features.build_scoring_table(warehouse, AS_OF, settings)
    load(warehouse, future_rows(source, 2, day))
    after, _ = features.build_scoring_table(warehouse, AS_OF, settings)
    assert after.to_pylist() == before.to_pylist()
    # ... while the same rows one day earlier are visible to the same scoring set.
    load(warehouse, future_rows(source, 2, AS_OF))
    seen, _ = features.build_scoring_table(warehouse, AS_OF, settings)
    assert seen.to_pylist() != before.to_pylist()


def test_label_is_as_known_at_as_of(warehouse: DuckDBWarehouse, settings: Settings) -> None:
    """A charge repaid on time counts as good; repaid after as_of is still a default at as_of."""
    src = random_source(seed=1, users=1)
    due = date(2026, 5, 27)
    common = dict(
        user_id=1,
        amount_jpy=3_000,
        fee_jpy=200,
        due_date=due,
        updated_at=src["users"][0]["updated_at"],
    )
    src["deferred_charges"] = [
        dict(charge_id=1, requested_at=tokyo(date(2026, 4, 3), 9), status="repaid",
             repaid_at=tokyo(due, 20), days_late=0, **common),
        dict(charge_id=2, requested_at=tokyo(date(2026, 4, 4), 9), status="repaid",
             repaid_at=tokyo(AS_OF + timedelta(days=1), 0), days_late=50, **common),
        dict(charge_id=3, requested_at=tokyo(date(2026, 4, 5), 9), status="repaid",
             repaid_at=tokyo(due + timedelta(days=GRACE_DAYS), 23), days_late=GRACE_DAYS, **common),
        dict(charge_id=4, requested_at=tokyo(date(2026, 6, 5), 9), status="outstanding",
             repaid_at=None, days_late=None, **{**common, "due_date": date(2026, 7, 27)}),
    ]  # fmt: skip
    load(warehouse, src)
    table, _ = features.build_training_table(warehouse, due + timedelta(days=GRACE_DAYS), settings)
    assert dict(zip(table["charge_id"].to_pylist(), table["label_default"].to_pylist(), strict=True)) == {
        1: 0, 2: 1, 3: 0
    }  # fmt: skip
    # One day before maturity the charges do not appear at all.
    early, _ = features.build_training_table(
        warehouse, due + timedelta(days=GRACE_DAYS - 1), settings
    )
    assert early.num_rows == 0


def test_history_of_a_repayment_without_days_late_counts_it_as_the_label_does(
    warehouse: DuckDBWarehouse, settings: Settings
) -> None:
    """A repaid charge whose source row lacks days_late is late by its repayment day, not on time.

    The label already falls back to the repayment's local day; the history feature of the user's
    next request must measure the same repayment the same way.
    """
    src = random_source(seed=1, users=1)
    common = dict(
        user_id=1,
        amount_jpy=3_000,
        fee_jpy=200,
        status="repaid",
        updated_at=src["users"][0]["updated_at"],
    )
    late_due, early_due = date(2026, 4, 27), date(2026, 5, 27)
    src["deferred_charges"] = [
        # Repaid 20 local days after its due date (00:30 in Tokyo is still the previous UTC day).
        dict(charge_id=1, requested_at=tokyo(date(2026, 3, 5), 9), due_date=late_due,
             repaid_at=tokyo(late_due + timedelta(days=20), 0, 30), days_late=None, **common),
        # Repaid before its due date: on time.
        dict(charge_id=2, requested_at=tokyo(date(2026, 4, 5), 9), due_date=early_due,
             repaid_at=tokyo(early_due - timedelta(days=3), 12), days_late=None, **common),
        dict(charge_id=3, requested_at=tokyo(date(2026, 6, 3), 9), due_date=date(2026, 7, 27),
             repaid_at=tokyo(date(2026, 7, 20), 12), days_late=0, **common),
    ]  # fmt: skip
    load(warehouse, src)
    as_of = date(2026, 8, 26)
    table, _ = features.build_training_table(warehouse, as_of, settings)
    rows = {r["charge_id"]: r for r in table.to_pylist()}
    assert {c: r["label_default"] for c, r in rows.items()} == {1: 0, 2: 0, 3: 0}
    history = {k: rows[3][k] for k in ("dc_late_count", "dc_max_days_late", "dc_on_time_ratio")}
    assert history == {"dc_late_count": 1, "dc_max_days_late": 20, "dc_on_time_ratio": 0.5}
    assert_rows_equal(table.to_pylist(), ref_training(src, as_of))
    scoring, _ = features.build_scoring_table(warehouse, as_of, settings)
    assert_rows_equal(scoring.to_pylist(), ref_scoring(src, as_of))


def test_table_mapping_points_the_sql_at_other_tables(
    warehouse: DuckDBWarehouse,
    source: dict[str, list[dict[str, Any]]],
    paylater_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    load(warehouse, source)
    expected, _ = features.build_scoring_table(warehouse, AS_OF, Settings())
    warehouse.execute("ALTER TABLE card_transactions RENAME TO my_card_tx")
    monkeypatch.setenv("PAYLATER_FEATURE_TABLES", '{"card_transactions": "my_card_tx"}')
    mapped, _ = features.build_scoring_table(warehouse, AS_OF, Settings())
    assert mapped == expected
    monkeypatch.setenv("PAYLATER_FEATURE_TABLES", '{"card_transactions": "x; DROP TABLE users"}')
    with pytest.raises(features.FeatureSqlError, match="not a table name"):
        features.build_scoring_table(warehouse, AS_OF, Settings())
    monkeypatch.setenv("PAYLATER_FEATURE_TABLES", '{"cards": "my_card_tx"}')
    with pytest.raises(features.FeatureSqlError, match="unknown tables"):
        features.table_mapping(Settings())


def test_sql_folder_and_label_query_come_from_settings(
    tmp_path: Path, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default_hash = features.load_feature_sql(Settings()).sql_hash
    folder = tmp_path / "sql"
    folder.mkdir()
    for path in features.default_sql_dir().glob("*.sql"):
        if path.name in ("requests_training.sql", "requests_scoring.sql", "50_account.sql"):
            (folder / path.name).write_text(path.read_text())
    (folder / "my_label.sql").write_text(
        "SELECT charge_id, IF(status = 'defaulted', 1, 0) AS label_default FROM deferred_charges"
    )
    monkeypatch.setenv("PAYLATER_FEATURE_SQL_DIR", str(folder))
    monkeypatch.setenv("PAYLATER_FEATURE_LABEL_SQL", "my_label.sql")
    loaded = features.load_feature_sql(Settings())
    assert loaded.user_features == ["account_age_days", "identity_verified"]
    assert "status = 'defaulted'" in loaded.label
    assert loaded.sql_hash != default_hash
    monkeypatch.setenv("PAYLATER_FEATURE_LABEL_SQL", "missing.sql")
    with pytest.raises(features.FeatureSqlError, match=r"missing\.sql does not exist"):
        features.load_feature_sql(Settings())


def test_parameters_in_comments_and_strings_are_not_bound() -> None:
    """Only real @parameters are bound: DuckDB rejects a bound parameter the query does not use."""
    sql = "-- uses @tz in a comment\nSELECT @as_of AS d, '@grace_days' AS s /* @x */ FROM t"
    assert features.used_parameters(sql) == {"as_of"}
    assert set(features.query_params(sql, date(2026, 11, 26))) == {"as_of"}


def test_a_result_the_warehouse_ordered_is_kept_and_any_other_is_sorted() -> None:
    """The builds sort in the warehouse (ORDER BY); a client that reads several streams may still
    hand rows back out of order, and the dataset must come out sorted either way."""
    ordered = pa.table({"charge_id": [1, 2, 5, 9], "x": [0.1, 0.2, 0.5, 0.9]})
    assert features.in_order(ordered, "charge_id") is ordered
    shuffled = pa.table({"charge_id": [5, 1, 9, 2], "x": [0.5, 0.1, 0.9, 0.2]})
    assert features.in_order(shuffled, "charge_id").equals(ordered)
    assert features.in_order(ordered.slice(0, 1), "charge_id").num_rows == 1


def copy_sql(folder: Path) -> Path:
    """The shipped feature SQL copied into `folder` (to add or change a file there)."""
    folder.mkdir()
    for path in features.default_sql_dir().glob("*.sql"):
        (folder / path.name).write_text(path.read_text())
    return folder


def test_a_layer_returning_several_rows_per_request_is_named_not_multiplied(
    warehouse: DuckDBWarehouse,
    source: dict[str, list[dict[str, Any]]],
    tmp_path: Path,
    paylater_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A layer (or mapped table) with more than one row per request silently repeated training
    and scoring rows: a model trained on duplicated charges, a publish failing on its key."""
    load(warehouse, source)
    folder = copy_sql(tmp_path / "sql")
    (folder / "60_topup_amounts.sql").write_text(
        "SELECT r.request_id, t.amount_jpy AS topup_amount_jpy\n"
        "FROM requests AS r JOIN topups AS t ON t.user_id = r.user_id\n"
    )
    monkeypatch.setenv("PAYLATER_FEATURE_SQL_DIR", str(folder))
    for build in (features.build_training_table, features.build_scoring_table):
        with pytest.raises(features.FeatureSqlError, match=r"60_topup_amounts\.sql returns"):
            build(warehouse, AS_OF, Settings())


def test_a_mapped_table_repeating_a_key_is_named(
    warehouse: DuckDBWarehouse,
    source: dict[str, list[dict[str, Any]]],
    paylater_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    load(warehouse, source)
    # A users table mapped to a history (two rows of user 2) repeats scoring requests.
    warehouse.execute("CREATE TABLE users_history AS SELECT * FROM users")
    warehouse.execute("INSERT INTO users_history SELECT * FROM users WHERE user_id = 2")
    monkeypatch.setenv("PAYLATER_FEATURE_TABLES", '{"users": "users_history"}')
    with pytest.raises(features.FeatureSqlError, match=r"requests_scoring\.sql returns.*\b2\b"):
        features.build_scoring_table(warehouse, AS_OF, Settings())
    # Two label rows for one charge repeat a training row.
    monkeypatch.delenv("PAYLATER_FEATURE_TABLES")
    folder = copy_sql(paylater_home / "sql")
    (folder / "label.sql").write_text(
        (folder / "label.sql").read_text() + "\nUNION ALL\nSELECT charge_id, 1 AS label_default "
        "FROM deferred_charges WHERE user_id = 1\n"
    )
    monkeypatch.setenv("PAYLATER_FEATURE_SQL_DIR", str(folder))
    with pytest.raises(features.FeatureSqlError, match=r"label\.sql returns"):
        features.build_training_table(warehouse, AS_OF, Settings())


def test_a_mapped_table_the_sql_cannot_read_is_named_with_its_file(
    warehouse: DuckDBWarehouse,
    source: dict[str, list[dict[str, Any]]],
    paylater_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mapped table lacking a column, or in a schema that does not exist, failed with the
    warehouse's bare error (no file, no mapping) and was retried as if it were an I/O hiccup."""
    load(warehouse, source)
    warehouse.execute(
        "CREATE TABLE card_tx AS SELECT * EXCLUDE (merchant_category) FROM card_transactions"
    )
    monkeypatch.setenv("PAYLATER_FEATURE_TABLES", '{"card_transactions": "card_tx"}')
    for build in (features.build_training_table, features.build_scoring_table):
        with pytest.raises(
            features.FeatureSqlError,
            match=r"rejected by the warehouse in 10_card\.sql: .*merchant_category.*"
            r"card_transactions -> card_tx",
        ):
            build(warehouse, AS_OF, Settings())
    monkeypatch.setenv("PAYLATER_FEATURE_TABLES", '{"users": "crm.users"}')
    with pytest.raises(
        features.FeatureSqlError, match=r"in requests_scoring\.sql: .*crm.*users -> crm\.users"
    ):
        features.build_scoring_table(warehouse, AS_OF, Settings())
    with pytest.raises(features.FeatureSqlError, match=r"in 50_account\.sql: .*crm"):
        features.build_training_table(warehouse, AS_OF, Settings())


@pytest.mark.parametrize("name", ["60_Topup_Amounts.sql", "60_topup-amounts.sql"])
def test_a_layer_file_whose_name_the_loader_would_skip_is_refused(
    tmp_path: Path, paylater_home: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """A layer named NN_<name>.sql with a capital or a hyphen in <name> was skipped without a
    word: the build ran, and its features were silently missing from every dataset."""
    folder = copy_sql(tmp_path / "sql")
    (folder / name).write_text("SELECT request_id, 1 AS topup_flag FROM requests")
    monkeypatch.setenv("PAYLATER_FEATURE_SQL_DIR", str(folder))
    with pytest.raises(features.FeatureSqlError, match=f"{name} looks like a feature layer"):
        features.load_feature_sql(Settings())


def test_a_mapped_table_joined_with_a_comma_is_mapped_too(
    warehouse: DuckDBWarehouse,
    source: dict[str, list[dict[str, Any]]],
    tmp_path: Path,
    paylater_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only names after FROM or JOIN were mapped: a layer joining `requests AS r, topups AS t`
    read the unmapped `topups` (a stale or other copy the warehouse also holds) without a word."""
    load(warehouse, source)
    warehouse.execute("CREATE TABLE my_topups AS SELECT * FROM topups")
    warehouse.execute("DELETE FROM topups")  # the stale copy: no top-ups at all
    folder = copy_sql(tmp_path / "sql")
    (folder / "60_topup_total.sql").write_text(
        "-- Every top-up before the request day (comma join on purpose).\n"
        "SELECT r.request_id, COUNT(*) AS topup_count_ever\n"
        "FROM requests AS r, topups AS t\n"
        "WHERE t.user_id = r.user_id\n"
        "  AND t.topped_up_at < TIMESTAMP_MICROS(UNIX_DATE(r.request_date) * 86400000000"
        " - @utc_offset_us)\n"
        "GROUP BY r.request_id\n"
    )
    # A CTE named like a logical table is the CTE where it is in scope, not the mapped table.
    (folder / "70_cte_named_topups.sql").write_text(
        "WITH topups AS (SELECT request_id, 1 AS one FROM requests)\n"
        "SELECT request_id, one AS cte_flag FROM topups\n"
    )
    monkeypatch.setenv("PAYLATER_FEATURE_SQL_DIR", str(folder))
    monkeypatch.setenv("PAYLATER_FEATURE_TABLES", '{"topups": "my_topups"}')
    table, _ = features.build_scoring_table(warehouse, AS_OF, Settings())
    assert set(table["cte_flag"].to_pylist()) == {1}
    day = AS_OF + timedelta(days=1)
    expected = {
        u: sum(
            1 for t in source["topups"] if t["user_id"] == u and local_date(t["topped_up_at"]) < day
        )
        for u in table["user_id"].to_pylist()
    }
    got = dict(
        zip(table["user_id"].to_pylist(), table["topup_count_ever"].to_pylist(), strict=True)
    )
    assert {u: n or 0 for u, n in got.items()} == expected and any(expected.values())
    # The shipped layers read the mapped table as well.
    assert_rows_equal(
        table.drop_columns(["topup_count_ever", "cte_flag"]).to_pylist(),
        ref_scoring(source, AS_OF),
    )


@pytest.mark.parametrize("column", ["user_id", "as_of", "label_default", "request_amount_jpy"])
def test_a_layer_feature_named_like_a_dataset_column_is_refused(
    warehouse: DuckDBWarehouse,
    source: dict[str, list[dict[str, Any]]],
    tmp_path: Path,
    paylater_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    column: str,
) -> None:
    """A layer column named like one the datasets already carry gave the dataset that name
    twice: the training set was written so (a layer's `user_id` listed as a model feature), the
    scoring build failed with pyarrow's 'Field "user_id" exists 2 times in schema'."""
    load(warehouse, source)
    folder = copy_sql(tmp_path / "sql")
    (folder / "60_extra.sql").write_text(f"SELECT request_id, 1 AS {column} FROM requests")
    monkeypatch.setenv("PAYLATER_FEATURE_SQL_DIR", str(folder))
    with pytest.raises(features.FeatureSqlError, match=f"60_extra.sql.*{column}"):
        features.load_feature_sql(Settings())


def shifted(source: dict[str, list[dict[str, Any]]], days: int) -> dict[str, list[dict[str, Any]]]:
    """The source moved `days` later (every date and time; Tokyo has no daylight saving)."""
    delta = timedelta(days=days)
    return {
        name: [{k: v + delta if isinstance(v, date) else v for k, v in row.items()} for row in rows]
        for name, rows in source.items()
    }


@pytest.mark.parametrize(
    "as_of",
    [date(2028, 2, 28), date(2028, 2, 29), date(2028, 3, 31), date(2028, 5, 31), date(2028, 7, 31)],
    ids=str,
)
def test_month_ends_and_a_leap_day_match_the_reference(
    warehouse: DuckDBWarehouse,
    source: dict[str, list[dict[str, Any]]],
    settings: Settings,
    as_of: date,
) -> None:
    """Windows and monthly lags across month ends and 29 February (the source moved to 2028)."""
    src = shifted(source, (date(2027, 12, 1) - date(2025, 12, 1)).days)
    load(warehouse, src)
    training, _ = features.build_training_table(warehouse, as_of, settings)
    assert_rows_equal(training.to_pylist(), ref_training(src, as_of))
    scoring, _ = features.build_scoring_table(warehouse, as_of, settings)
    expected = ref_scoring(src, as_of)
    assert len(expected) == 5
    assert_rows_equal(scoring.to_pylist(), expected)


def test_only_errors_that_reject_the_query_itself_are_feature_sql_errors() -> None:
    """BigQuery's 400 and 404 and DuckDB's binder, catalog and parser errors fail the same way
    every time; a 5xx, a dropped connection or a locked DuckDB file may pass on a retry."""
    import duckdb
    from google.api_core import exceptions as google

    rejected = [
        google.BadRequest("Unrecognized name: merchant_category"),
        google.NotFound("Not found: Table p:d.cards"),
        duckdb.BinderException("x"),
        duckdb.CatalogException("x"),
        duckdb.ParserException("x"),
    ]
    passing = [
        google.ServiceUnavailable("backend error"),
        google.InternalServerError("x"),
        google.TooManyRequests("x"),
        duckdb.IOException("Could not set lock on file"),
        ConnectionError("reset"),
    ]
    assert [features.is_rejected_sql(e) for e in rejected] == [True] * len(rejected)
    assert [features.is_rejected_sql(e) for e in passing] == [False] * len(passing)


def test_the_sql_hash_tells_builds_from_other_tables_apart(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest's and the model version's feature_sql_hash said two builds ran the same SQL
    when PAYLATER_FEATURE_TABLES pointed one of them at other tables."""
    default = features.load_feature_sql(Settings()).sql_hash
    monkeypatch.setenv("PAYLATER_FEATURE_TABLES", '{"card_transactions": "card_tx"}')
    mapped = features.load_feature_sql(Settings()).sql_hash
    monkeypatch.setenv("PAYLATER_FEATURE_TABLES", '{"card_transactions": "card_tx_v2"}')
    other = features.load_feature_sql(Settings()).sql_hash
    assert len({default, mapped, other}) == 3
    monkeypatch.setenv("PAYLATER_FEATURE_TABLES", "{}")  # no mapping: the hash it always had
    assert features.load_feature_sql(Settings()).sql_hash == default


def test_a_name_ending_in_a_newline_is_refused_in_a_mapping_and_a_layer(
    tmp_path: Path, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `^...$` let "my_card_tx\n" through (`$` also matches before a trailing newline): the mapped
    # name went into the feature SQL. A layer's column names share the one identifier check.
    monkeypatch.setenv("PAYLATER_FEATURE_TABLES", '{"card_transactions": "my_card_tx\\n"}')
    with pytest.raises(features.FeatureSqlError, match="not a table name"):
        features.table_mapping(Settings())
    with pytest.raises(
        features.FeatureSqlError,
        match=r"10_x\.sql must select named columns, each a plain SQL identifier .*bad: \['1x'\]",
    ):
        features.selected_columns("SELECT request_id, 1 AS `1x` FROM t", "10_x.sql")
