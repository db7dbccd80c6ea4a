"""Users and their latent traits: the hidden causes behind every row the generator writes."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa

# Prefectures with rough population weights (millions): sign-ups follow where people live.
PREFECTURES: tuple[tuple[str, float], ...] = (
    ("Hokkaido", 5.1), ("Aomori", 1.2), ("Iwate", 1.2), ("Miyagi", 2.3), ("Akita", 0.9),
    ("Yamagata", 1.0), ("Fukushima", 1.8), ("Ibaraki", 2.8), ("Tochigi", 1.9), ("Gunma", 1.9),
    ("Saitama", 7.3), ("Chiba", 6.3), ("Tokyo", 14.0), ("Kanagawa", 9.2), ("Niigata", 2.1),
    ("Toyama", 1.0), ("Ishikawa", 1.1), ("Fukui", 0.8), ("Yamanashi", 0.8), ("Nagano", 2.0),
    ("Gifu", 1.9), ("Shizuoka", 3.6), ("Aichi", 7.5), ("Mie", 1.7), ("Shiga", 1.4),
    ("Kyoto", 2.5), ("Osaka", 8.8), ("Hyogo", 5.4), ("Nara", 1.3), ("Wakayama", 0.9),
    ("Tottori", 0.5), ("Shimane", 0.7), ("Okayama", 1.9), ("Hiroshima", 2.8), ("Yamaguchi", 1.3),
    ("Tokushima", 0.7), ("Kagawa", 0.9), ("Ehime", 1.3), ("Kochi", 0.7), ("Fukuoka", 5.1),
    ("Saga", 0.8), ("Nagasaki", 1.3), ("Kumamoto", 1.7), ("Oita", 1.1), ("Miyazaki", 1.1),
    ("Kagoshima", 1.6), ("Okinawa", 1.5),
)  # fmt: skip
PREFECTURE_NAMES = tuple(name for name, _ in PREFECTURES)
_PREFECTURE_P = np.array([w for _, w in PREFECTURES]) / sum(w for _, w in PREFECTURES)

# Payday conventions: the 25th dominates in Japan; some employers pay on the 15th or month end.
PAYDAY_25TH, PAYDAY_15TH, PAYDAY_MONTH_END = 0, 1, 2
_PAYDAY_P = np.array([0.72, 0.13, 0.15])

CATEGORIES: tuple[str, ...] = (
    "grocery",
    "convenience",
    "dining",
    "transport",
    "online_shopping",
    "entertainment",
    "utilities",
    "drugstore",
    "fashion",
    "travel",
)
# Typical ticket (median yen) and spread per category.
CATEGORY_MEDIAN_JPY = np.array([2600, 750, 1900, 1100, 4200, 3200, 7800, 1600, 6500, 16000.0])
CATEGORY_SIGMA = np.array([0.6, 0.5, 0.6, 0.7, 0.8, 0.7, 0.4, 0.6, 0.7, 0.8])
_CATEGORY_BASE = np.array([0.22, 0.22, 0.14, 0.10, 0.09, 0.05, 0.03, 0.08, 0.04, 0.03])
# Impulsive users lean towards these categories (online shopping, entertainment, fashion, dining).
_CATEGORY_IMPULSE = np.array([-0.5, 0.2, 0.5, -0.2, 1.0, 0.9, -0.3, 0.0, 1.0, 0.3])

TOPUP_METHODS: tuple[str, ...] = ("convenience_store", "bank", "credit_card", "deferred")
METHOD_CONVENIENCE, METHOD_BANK, METHOD_CREDIT_CARD, METHOD_DEFERRED = 0, 1, 2, 3

WINDOW_DAYS = 30
"""Length of the carried per-day history (the features' longest short window)."""

NEVER = np.int64(10**7)
"""Day ordinal that never comes (date.max is ~3.65M)."""


@dataclass
class Population:
    """Every user as parallel numpy arrays: fixed traits plus the state the simulation carries."""

    user_id: np.ndarray
    signup_day: np.ndarray  # date ordinal (business day)
    signup_us: np.ndarray  # UTC microseconds
    verified_us: np.ndarray  # UTC microseconds, -1 = never verified
    churn_day: np.ndarray  # ordinal of the day the account closes (NEVER = stays)
    churn_us: np.ndarray
    birth_year: np.ndarray
    prefecture: np.ndarray  # index into PREFECTURE_NAMES
    income: np.ndarray  # monthly take-home pay, yen
    payday: np.ndarray  # PAYDAY_* code
    stress: np.ndarray  # 0..1 chronic financial stress
    impulsiveness: np.ndarray  # 0..1
    engagement: np.ndarray  # 0..1 app and card engagement
    spend_rate: np.ndarray  # expected card transactions per day
    ticket_scale: np.ndarray  # multiplies category ticket sizes (income-driven)
    topup_method: np.ndarray  # preferred method code
    topup_discipline: np.ndarray  # 0..1 how reliably the user tops up on payday / when low
    category_cum: np.ndarray  # (n, len(CATEGORIES)) cumulative category probabilities
    # Carried state.
    balance: np.ndarray
    late_count: np.ndarray  # late repayments observed so far
    default_count: np.ndarray  # defaults observed so far
    charge_count: np.ndarray
    busy_until: np.ndarray  # no new deferred charge until after this day (outstanding one)
    event_day: np.ndarray  # day the outstanding charge's first outcome becomes visible
    event_kind: np.ndarray  # 0 none/on time, 1 late repayment, 2 default
    shock_until: np.ndarray  # a stress shock (job loss, big expense) lasts until this day
    # The last WINDOW_DAYS days of what the source tables show, one column per day (slot = ordinal
    # % WINDOW_DAYS): the true risk reads these so that it sees the same windows the features do.
    last_topup_day: np.ndarray  # ordinal of the latest top-up of any method (-1 = none yet)
    win_spend: np.ndarray  # settled card spend, yen
    win_topup_count: np.ndarray  # top-ups of every method (deferred included)
    win_topup_jpy: np.ndarray  # their amount, yen
    win_declines: np.ndarray  # declined card transactions
    win_sessions: np.ndarray  # app sessions

    def __len__(self) -> int:
        return len(self.user_id)

    def extend(self, other: Population) -> None:
        """Append new users (sign-ups) in place."""
        for f in fields(self):
            setattr(self, f.name, np.concatenate([getattr(self, f.name), getattr(other, f.name)]))

    def to_arrow(self) -> pa.Table:
        """All arrays as one table (category_cum split into columns) for persisting."""
        columns = {}
        for f in fields(self):
            values = getattr(self, f.name)
            if values.ndim == 2:
                for j in range(values.shape[1]):
                    columns[f"{f.name}_{j}"] = values[:, j]
            else:
                columns[f.name] = values
        return pa.table(columns)

    @classmethod
    def from_arrow(cls, table: pa.Table) -> Population:
        """Inverse of to_arrow."""
        kwargs = {}
        for f in fields(cls):
            if f.name not in table.column_names:  # a 2-D field, saved one column per index
                width = sum(1 for c in table.column_names if c.startswith(f"{f.name}_"))
                parts = [_writable(table, f"{f.name}_{j}") for j in range(width)]
                kwargs[f.name] = np.column_stack(parts)
            else:
                kwargs[f.name] = _writable(table, f.name)
        return cls(**kwargs)


def _writable(table: pa.Table, name: str) -> np.ndarray:
    """A column as a numpy array the simulation may modify in place (Arrow buffers are read-only)."""
    return np.array(table.column(name).to_numpy(), copy=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function."""
    return 1.0 / (1.0 + np.exp(-x))


def new_users(
    rng: np.random.Generator,
    first_user_id: int,
    signup_day: np.ndarray,
    signup_us: np.ndarray,
    reference_year: int,
    churn_from_day: np.ndarray | int | None = None,
) -> Population:
    """Draw traits for users signing up at the given days and instants (vectorised)."""
    n = len(signup_day)
    # Correlated latent traits: stress is partly low income, partly its own thing.
    age = np.clip(np.round(rng.gamma(4.0, 4.5, n) + 17), 18, 75).astype(np.int32)
    base = rng.standard_normal((n, 4))
    income_z = base[:, 0] + 0.35 * np.clip((age - 22) / 15, -1, 1.5)
    income = np.round(np.exp(12.35 + 0.38 * income_z), -3)  # median ~230k yen a month
    stress = _sigmoid(-1.3 + 1.0 * base[:, 1] - 0.55 * income_z)
    impulsiveness = _sigmoid(-0.4 + 1.0 * base[:, 2] - 0.02 * (age - 30))
    engagement = _sigmoid(0.1 + 1.1 * base[:, 3] - 0.015 * (age - 30))
    payday = rng.choice(3, size=n, p=_PAYDAY_P).astype(np.int8)

    spend_rate = np.exp(rng.normal(np.log(1.05), 0.35, n)) * (0.65 + 0.7 * engagement)
    ticket_scale = (income / 230_000.0) ** 0.35 * np.exp(rng.normal(0, 0.15, n))
    logits = np.log(_CATEGORY_BASE)[None, :] + (impulsiveness - 0.4)[:, None] * _CATEGORY_IMPULSE
    logits = logits + rng.normal(0, 0.35, (n, len(CATEGORIES)))
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    category_cum = np.cumsum(probs, axis=1)
    category_cum[:, -1] = 1.0

    young = age < 30
    method_p = np.where(young[:, None], [0.50, 0.22, 0.28], [0.25, 0.40, 0.35])
    method = (rng.random(n)[:, None] > np.cumsum(method_p, axis=1)).sum(axis=1).astype(np.int8)
    discipline = _sigmoid(1.0 - 1.6 * stress - 1.0 * impulsiveness + rng.normal(0, 0.6, n) + 0.8)

    # eKYC: most users pass within days, some never finish it.
    verified = rng.random(n) < 0.93
    verified_us = np.where(
        verified, signup_us + (rng.exponential(1.2, n) * 86_400e6).astype(np.int64) + 60_000_000, -1
    )
    # Churn: disengaged users leave sooner (a constant hazard from sign-up, or from a given day).
    hazard = 0.00025 + 0.0012 * (1 - engagement) ** 2
    start = signup_day if churn_from_day is None else churn_from_day
    churn_day = start + 1 + rng.geometric(hazard).astype(np.int64)
    churn_day = np.minimum(churn_day, NEVER)
    churn_us = np.zeros(n, dtype=np.int64)  # filled once the day is known to the simulator

    izeros = np.zeros(n, dtype=np.int64)
    return Population(
        user_id=np.arange(first_user_id, first_user_id + n, dtype=np.int64),
        signup_day=signup_day.astype(np.int64),
        signup_us=signup_us.astype(np.int64),
        verified_us=verified_us.astype(np.int64),
        churn_day=churn_day,
        churn_us=churn_us,
        birth_year=(reference_year - age).astype(np.int32),
        prefecture=rng.choice(len(PREFECTURE_NAMES), size=n, p=_PREFECTURE_P).astype(np.int16),
        income=income,
        payday=payday,
        stress=stress,
        impulsiveness=impulsiveness,
        engagement=engagement,
        spend_rate=spend_rate,
        ticket_scale=ticket_scale,
        topup_method=method,
        topup_discipline=discipline,
        category_cum=category_cum,
        balance=np.round(rng.uniform(0, 1, n) * 0.15 * income, -3),
        late_count=izeros.copy(),
        default_count=izeros.copy(),
        charge_count=izeros.copy(),
        busy_until=izeros.copy(),
        event_day=np.full(n, NEVER, dtype=np.int64),
        event_kind=np.zeros(n, dtype=np.int8),
        shock_until=izeros.copy(),
        last_topup_day=np.full(n, -1, dtype=np.int64),
        win_spend=np.zeros((n, WINDOW_DAYS), dtype=np.float32),
        win_topup_count=np.zeros((n, WINDOW_DAYS), dtype=np.float32),
        win_topup_jpy=np.zeros((n, WINDOW_DAYS), dtype=np.float32),
        win_declines=np.zeros((n, WINDOW_DAYS), dtype=np.float32),
        win_sessions=np.zeros((n, WINDOW_DAYS), dtype=np.float32),
    )


def expected_ticket(pop: Population, rows: np.ndarray) -> np.ndarray:
    """Mean card ticket (yen) of some users, given their category mix and ticket scale."""
    probs = np.diff(pop.category_cum[rows], axis=1, prepend=0.0)
    mean_by_cat = CATEGORY_MEDIAN_JPY * np.exp(CATEGORY_SIGMA**2 / 2)
    return (probs @ mean_by_cat) * pop.ticket_scale[rows]
