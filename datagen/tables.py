"""Arrow shapes of the source tables (warehouse types) and their construction from simulator arrays."""

from __future__ import annotations

from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datagen.population import CATEGORIES, PREFECTURE_NAMES, TOPUP_METHODS, Population
from datagen.simulate import CHANNELS, SCREENS, TXN_STATUSES

TS = pa.timestamp("us", tz="UTC")
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()

USERS = pa.schema(
    [
        ("user_id", pa.int64()),
        ("signed_up_at", TS),
        ("birth_year", pa.int32()),
        ("prefecture", pa.string()),
        ("identity_verified_at", TS),
        ("status", pa.string()),
        ("updated_at", TS),
    ]
)
CARD_TRANSACTIONS = pa.schema(
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
)
TOPUPS = pa.schema(
    [
        ("topup_id", pa.int64()),
        ("user_id", pa.int64()),
        ("topped_up_at", TS),
        ("amount_jpy", pa.int64()),
        ("method", pa.string()),
        ("updated_at", TS),
    ]
)
DEFERRED_CHARGES = pa.schema(
    [
        ("charge_id", pa.int64()),
        ("user_id", pa.int64()),
        ("requested_at", TS),
        ("amount_jpy", pa.int64()),
        ("fee_jpy", pa.int64()),
        ("due_date", pa.date32()),
        ("status", pa.string()),
        ("repaid_at", TS),
        ("days_late", pa.int32()),
        ("updated_at", TS),
    ]
)
APP_EVENTS = pa.schema(
    [
        ("event_id", pa.int64()),
        ("user_id", pa.int64()),
        ("event_at", TS),
        ("event_date", pa.date32()),
        ("session_id", pa.int64()),
        ("event_name", pa.string()),
        ("screen", pa.string()),
    ]
)
TRUTH = pa.schema([("charge_id", pa.int64()), ("default_probability", pa.float64())])
SOURCE_SCHEMAS: dict[str, pa.Schema] = {
    "users": USERS,
    "card_transactions": CARD_TRANSACTIONS,
    "topups": TOPUPS,
    "deferred_charges": DEFERRED_CHARGES,
}
PRIMARY_KEYS = {
    "users": "user_id",
    "card_transactions": "transaction_id",
    "topups": "topup_id",
    "deferred_charges": "charge_id",
}


def _ts(us: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """UTC microseconds to a timestamp column (NULL where not valid)."""
    mask = None if valid is None else ~valid
    return pa.array(us.astype(np.int64), type=pa.int64(), mask=mask).cast(TS)


def _names(codes: np.ndarray, names: tuple[str, ...]) -> pa.Array:
    """Integer codes to their string names."""
    return pc.take(pa.array(names, pa.string()), pa.array(codes.astype(np.int32)))


def _date32(ordinals: np.ndarray) -> pa.Array:
    """Day ordinals to date32."""
    return pa.array((ordinals - _EPOCH_ORDINAL).astype(np.int32), pa.int32()).cast(pa.date32())


def concat_columns(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate the same columns of several days."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def transactions_table(cols: dict[str, np.ndarray], horizon_us: int) -> pa.Table:
    """Card transactions as they stand at `horizon_us` (refunds after it not yet applied)."""
    if not cols:
        return CARD_TRANSACTIONS.empty_table()
    refunded = (cols["refund_us"] >= 0) & (cols["refund_us"] < horizon_us)
    status = np.where(cols["declined"], 1, np.where(refunded, 2, 0))
    updated = np.where(refunded, cols["refund_us"], cols["authorized_us"])
    return pa.Table.from_arrays(
        [
            pa.array(cols["transaction_id"]),
            pa.array(cols["user_id"]),
            _ts(cols["authorized_us"]),
            pa.array(cols["amount_jpy"].astype(np.int64)),
            pa.array(cols["merchant_id"]),
            _names(cols["category"], CATEGORIES),
            _names(cols["channel"], CHANNELS),
            _names(status, TXN_STATUSES),
            _ts(updated),
        ],
        schema=CARD_TRANSACTIONS,
    )


def topups_table(cols: dict[str, np.ndarray]) -> pa.Table:
    """Top-ups (they never change after the fact)."""
    if not cols:
        return TOPUPS.empty_table()
    return pa.Table.from_arrays(
        [
            pa.array(cols["topup_id"]),
            pa.array(cols["user_id"]),
            _ts(cols["topped_up_us"]),
            pa.array(cols["amount_jpy"].astype(np.int64)),
            _names(cols["method"], TOPUP_METHODS),
            _ts(cols["topped_up_us"]),
        ],
        schema=TOPUPS,
    )


def charges_table(cols: dict[str, np.ndarray], horizon_us: int) -> pa.Table:
    """Deferred charges as they stand at `horizon_us`: outstanding, repaid or defaulted."""
    if not cols or len(cols["charge_id"]) == 0:
        return DEFERRED_CHARGES.empty_table()
    repaid = (cols["repaid_us"] >= 0) & (cols["repaid_us"] < horizon_us)
    defaulted = ~repaid & (cols["default_us"] >= 0) & (cols["default_us"] < horizon_us)
    status = np.where(repaid, "repaid", np.where(defaulted, "defaulted", "outstanding"))
    updated = np.where(
        repaid, cols["repaid_us"], np.where(defaulted, cols["default_us"], cols["requested_us"])
    )
    return pa.Table.from_arrays(
        [
            pa.array(cols["charge_id"]),
            pa.array(cols["user_id"]),
            _ts(cols["requested_us"]),
            pa.array(cols["amount_jpy"].astype(np.int64)),
            pa.array(cols["fee_jpy"].astype(np.int64)),
            _date32(cols["due_day"]),
            pa.array(status, pa.string()),
            _ts(cols["repaid_us"], repaid),
            pa.array(cols["days_late"].astype(np.int32), pa.int32(), mask=~repaid),
            _ts(updated),
        ],
        schema=DEFERRED_CHARGES,
    )


def truth_table(cols: dict[str, np.ndarray]) -> pa.Table:
    """Evaluation-only truth: each charge's true default probability."""
    if not cols:
        return TRUTH.empty_table()
    return pa.Table.from_arrays(
        [pa.array(cols["charge_id"]), pa.array(cols["default_probability"])], schema=TRUTH
    )


def app_events_table(cols: dict[str, np.ndarray], ordinal: int) -> pa.Table:
    """One business day's app events."""
    if not cols:
        return APP_EVENTS.empty_table()
    screen = cols["screen"]
    is_start = screen < 0
    names = _names(is_start.astype(np.int8), ("screen_view", "session_start"))
    screens = pc.take(
        pa.array(SCREENS, pa.string()),
        pa.array(np.maximum(screen, 0).astype(np.int32), mask=is_start),
    )
    return pa.Table.from_arrays(
        [
            pa.array(cols["event_id"]),
            pa.array(cols["user_id"]),
            _ts(cols["event_us"]),
            _date32(np.full(len(screen), ordinal, dtype=np.int64)),
            pa.array(cols["session_id"]),
            names,
            screens,
        ],
        schema=APP_EVENTS,
    )


def users_table(pop: Population, horizon_us: int, rows: np.ndarray | None = None) -> pa.Table:
    """Users signed up before `horizon_us`, as they stand then (verified, closed)."""
    if rows is None:
        rows = np.flatnonzero(pop.signup_us < horizon_us)
    signup = pop.signup_us[rows]
    verified_us = pop.verified_us[rows]
    churn_us = pop.churn_us[rows]
    verified = (verified_us >= 0) & (verified_us < horizon_us)
    closed = (churn_us >= 0) & (churn_us < horizon_us)
    updated = np.maximum(signup, np.where(verified, verified_us, 0))
    updated = np.maximum(updated, np.where(closed, churn_us, 0))
    return pa.Table.from_arrays(
        [
            pa.array(pop.user_id[rows]),
            _ts(signup),
            pa.array(pop.birth_year[rows].astype(np.int32)),
            _names(pop.prefecture[rows], PREFECTURE_NAMES),
            _ts(verified_us, verified),
            pa.array(np.where(closed, "closed", "active"), pa.string()),
            _ts(updated),
        ],
        schema=USERS,
    )
