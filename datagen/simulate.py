"""One business day of the prepaid card, vectorised over users: top-ups, spending, deferred charges, app use."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import numpy as np

from datagen.clock import (
    HOURLY_APP,
    HOURLY_REQUEST,
    HOURLY_SPEND,
    HOURLY_TOPUP,
    BusinessClock,
    payday_context,
)
from datagen.population import (
    CATEGORIES,
    CATEGORY_MEDIAN_JPY,
    CATEGORY_SIGMA,
    METHOD_DEFERRED,
    NEVER,
    WINDOW_DAYS,
    Population,
    expected_ticket,
    new_users,
)
from paylater.product import (
    FEE_SCHEDULE_JPY,
    GRACE_DAYS,
    MAX_AMOUNT_JPY,
    MIN_AMOUNT_JPY,
    due_date_for,
)

SCREENS: tuple[str, ...] = ("home", "card", "topup", "deferred", "history", "settings")
_SCREEN_P_CALM = np.array([0.36, 0.22, 0.12, 0.06, 0.18, 0.06])
_SCREEN_P_SHORT = np.array([0.28, 0.14, 0.22, 0.20, 0.12, 0.04])  # low balance or stress shock
CHANNELS: tuple[str, ...] = ("in_store", "online", "contactless")
TXN_STATUSES: tuple[str, ...] = ("settled", "declined", "refunded")
_ONLINE_P = np.array([0.03, 0.0, 0.05, 0.15, 0.97, 0.45, 0.92, 0.05, 0.35, 0.65])
_REFUND_P = np.array([0.004, 0.001, 0.003, 0.004, 0.035, 0.01, 0.002, 0.006, 0.03, 0.04])
_WEEKDAY_SPEND = np.array([0.95, 0.93, 0.95, 0.97, 1.08, 1.2, 1.1])
_FEE_UPPER = np.array([u for u, _ in FEE_SCHEDULE_JPY])
_FEE = np.array([f for _, f in FEE_SCHEDULE_JPY])


def fees_for(amounts: np.ndarray) -> np.ndarray:
    """paylater.product.fee_for over an array (amounts already within the product's limits)."""
    return _FEE[np.searchsorted(_FEE_UPPER, amounts, side="left")]


def due_days_for(request_ordinals: np.ndarray) -> np.ndarray:
    """paylater.product.due_date_for over an array of day ordinals (27th of the next month)."""
    uniq, inverse = np.unique(request_ordinals, return_inverse=True)
    dues = [due_date_for(date.fromordinal(int(o))).toordinal() for o in uniq]
    return np.array(dues, dtype=np.int64)[inverse]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function."""
    return 1.0 / (1.0 + np.exp(-x))


DEFAULT_INTERCEPT = -4.1


def default_logit(
    *,
    spend_30d: np.ndarray,
    topup_jpy_30d: np.ndarray,
    topup_count_30d: np.ndarray,
    declines_30d: np.ndarray,
    sessions_7d: np.ndarray,
    sessions_30d: np.ndarray,
    days_since_topup: np.ndarray,
    late_count: np.ndarray,
    amount: np.ndarray,
    stress: np.ndarray,
) -> np.ndarray:
    """The true log-odds of default of a charge, from the user's state as a lender sees it.

    Every term but the last reads what the source tables show up to the day before the
    request (the same 30- and 7-day windows as the features): spending beyond what came in,
    sparse or overdue top-ups, declines, past lateness, a request large against the inflow, and
    app use that fades. Latent stress and shocks act through that behaviour; a small direct
    stress term is the idiosyncratic part no lender can see.
    """
    days_since = np.where(days_since_topup < 0, 45.0, days_since_topup)
    daily_30 = sessions_30d / 30.0
    fading = np.clip(1.0 - (sessions_7d / 7.0) / (daily_30 + 0.02), 0.0, 1.0)
    return (
        DEFAULT_INTERCEPT
        + 0.7 * np.clip(np.log((spend_30d + 5000.0) / (topup_jpy_30d + 5000.0)), -1.0, 1.5)
        + 1.8 * np.minimum(late_count, 3)
        + 0.6 * np.minimum(amount / (topup_jpy_30d + 20_000.0), 1.5)
        - 1.5 * np.minimum(topup_count_30d, 4.0) / 4.0
        + 0.35 * np.minimum(declines_30d, 8.0)
        - 1.2 * np.minimum(sessions_30d, 20.0) / 20.0
        + 0.5 * fading * (sessions_30d > 0)
        + 1.5 * np.minimum(days_since, 45.0) / 45.0
        + 0.6 * stress
    )


@dataclass
class DayActivity:
    """Rows born on one business day (numpy columns; codes index the module's name tuples)."""

    day: int
    transactions: dict[str, np.ndarray] = field(default_factory=dict)
    topups: dict[str, np.ndarray] = field(default_factory=dict)
    charges: dict[str, np.ndarray] = field(default_factory=dict)
    app_events: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Counters:
    """Next identifier of every table (ids are dense and ordered by creation)."""

    user_id: int = 1
    transaction_id: int = 1
    topup_id: int = 1
    charge_id: int = 1
    event_id: int = 1
    session_id: int = 1


def _take_ids(counters: Counters, name: str, n: int) -> np.ndarray:
    """Allocate `n` consecutive ids of one kind."""
    first = getattr(counters, name)
    setattr(counters, name, first + n)
    return np.arange(first, first + n, dtype=np.int64)


def _group_positions(counts: np.ndarray) -> np.ndarray:
    """0..k-1 inside each group of a np.repeat(.., counts) layout."""
    total = int(counts.sum())
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total, dtype=np.int64) - starts


class DaySimulator:
    """Advances a Population one business day at a time; deterministic given (seed, day, state)."""

    def __init__(self, seed: int, clock: BusinessClock, reference_year: int) -> None:
        self.seed = seed
        self.clock = clock
        self.reference_year = reference_year

    def rng(self, ordinal: int, stream: int = 0) -> np.random.Generator:
        """The random stream of one day (independent of every other day's)."""
        return np.random.default_rng([self.seed, ordinal, stream])

    def sign_up(
        self, pop: Population | None, counters: Counters, ordinal: int, count: int
    ) -> Population:
        """Create `count` users signing up during day `ordinal`; returns the grown population."""
        rng = self.rng(ordinal, 1)
        days = np.full(count, ordinal, dtype=np.int64)
        instants = np.sort(self.clock.times_in_days(rng, days, HOURLY_APP))
        users = new_users(
            rng, counters.user_id, days, instants, self.reference_year, churn_from_day=None
        )
        counters.user_id += count
        self.fill_churn_instants(rng, users)
        if pop is None:
            return users
        pop.extend(users)
        return pop

    def fill_churn_instants(self, rng: np.random.Generator, users: Population) -> None:
        """Closing instants for users whose churn day is known (within a reasonable horizon)."""
        finite = users.churn_day < NEVER
        users.churn_us[:] = -1
        if finite.any():
            users.churn_us[finite] = self.clock.times_in_days(
                rng, users.churn_day[finite], HOURLY_APP
            )

    def simulate(self, pop: Population, counters: Counters, ordinal: int) -> DayActivity:
        """Everything users do on day `ordinal` (sign-ups must already be in `pop`)."""
        rng = self.rng(ordinal)
        out = DayActivity(day=ordinal)
        t0 = self.clock.start_us(ordinal)
        t1 = self.clock.start_us(ordinal + 1)
        (paydays, since) = payday_context(ordinal)
        weekday = date.fromordinal(ordinal).weekday()

        # Outcomes of earlier charges become visible today and shape behaviour from now on.
        visible = pop.event_day == ordinal
        pop.late_count[visible & (pop.event_kind == 1)] += 1
        pop.default_count[visible & (pop.event_kind == 2)] += 1
        pop.event_day[visible] = NEVER

        idx = np.flatnonzero((pop.signup_day < ordinal) & (pop.churn_day > ordinal))
        n = len(idx)
        stress = pop.stress[idx]
        new_shock = rng.random(n) < (1 / 700) * (0.3 + 2.5 * stress)
        pop.shock_until[idx[new_shock]] = ordinal + rng.integers(30, 120, int(new_shock.sum()))
        shocked = pop.shock_until[idx] >= ordinal
        ticket = expected_ticket(pop, idx)
        monthly_need = pop.spend_rate[idx] * 30 * ticket
        income = pop.income[idx]
        discipline = pop.topup_discipline[idx]
        is_payday = np.asarray(paydays)[pop.payday[idx]]
        days_since = np.asarray(since)[pop.payday[idx]]
        balance = pop.balance[idx].copy()

        # Top-ups: the payday top-up, then top-ups when the balance runs low.
        payday_topup = is_payday & (rng.random(n) < 0.55 + 0.4 * discipline)
        payday_amount = (
            monthly_need
            * rng.uniform(0.55, 1.05, n)
            * (0.55 + 0.5 * discipline)
            * np.where(shocked, 0.45, 1.0)
        )
        low = balance < 0.12 * monthly_need + 1500
        top_p = (0.12 + 0.45 * discipline) * np.where(shocked, 0.5, 1.0) * (1 - 0.5 * stress)
        low_topup = ~payday_topup & low & (rng.random(n) < top_p)
        low_amount = monthly_need * rng.uniform(0.15, 0.45, n) * np.where(shocked, 0.6, 1.0)
        topup_amount = np.where(payday_topup, payday_amount, low_amount)
        topup_amount = np.clip(np.round(topup_amount, -3), 1000, np.maximum(income, 1000))
        topup_mask = payday_topup | low_topup
        balance += np.where(topup_mask, topup_amount, 0)
        t_idx = np.flatnonzero(topup_mask)
        method = pop.topup_method[idx[t_idx]].copy()
        switch = rng.random(len(t_idx)) < 0.12
        method[switch] = rng.integers(0, METHOD_DEFERRED, int(switch.sum()))
        topups_uidx = [idx[t_idx]]
        topups_amount = [topup_amount[t_idx]]
        topups_method = [method]
        topups_at = [
            self.clock.times_in_days(rng, np.full(len(t_idx), ordinal, np.int64), HOURLY_TOPUP)
        ]

        # Card spending: payday splurges, weekends; declines once the balance is spent.
        rate = (
            pop.spend_rate[idx]
            * _WEEKDAY_SPEND[weekday]
            * (1 + (0.35 + 0.6 * pop.impulsiveness[idx]) * np.exp(-days_since / 3.0))
            * np.where(shocked, 0.85, 1.0)
        )
        counts = rng.poisson(rate)
        tx_local = np.repeat(np.arange(n), counts)
        m = len(tx_local)
        cumulative = pop.category_cum[idx]
        if _month_end(ordinal):
            cumulative = _bill_season(cumulative)
        cat = (rng.random(m)[:, None] > cumulative[tx_local]).sum(axis=1)
        cat = np.minimum(cat, len(CATEGORIES) - 1).astype(np.int8)
        amount = CATEGORY_MEDIAN_JPY[cat] * pop.ticket_scale[idx[tx_local]]
        amount = amount * np.exp(CATEGORY_SIGMA[cat] * rng.standard_normal(m))
        amount = np.maximum(np.round(amount, -1), 100).astype(np.int64)
        running = _group_offsets(np.cumsum(amount), amount, counts)
        declined = (running > balance[tx_local]) | (rng.random(m) < 0.004)
        settled_amount = np.where(declined, 0, amount)
        spent = np.bincount(tx_local, weights=settled_amount, minlength=n)
        declines = np.bincount(tx_local, weights=declined, minlength=n)
        balance = np.maximum(balance - spent, 0)
        online = rng.random(m) < _ONLINE_P[cat]
        channel = np.where(online, 1, np.where(rng.random(m) < 0.55, 2, 0)).astype(np.int8)
        merchant = cat.astype(np.int64) * 100_000 + np.minimum(rng.zipf(1.4, m), 99_999)
        authorized = self.clock.times_in_days(rng, np.full(m, ordinal, np.int64), HOURLY_SPEND)
        refunded = ~declined & (rng.random(m) < _REFUND_P[cat])
        refund_day = np.where(refunded, ordinal + rng.integers(1, 21, m), NEVER)
        refund_us = np.full(m, -1, dtype=np.int64)
        if refunded.any():
            refund_us[refunded] = self.clock.times_in_days(rng, refund_day[refunded], HOURLY_TOPUP)
        out.transactions = {
            "transaction_id": _take_ids(counters, "transaction_id", m),
            "user_id": pop.user_id[idx[tx_local]],
            "authorized_us": authorized,
            "amount_jpy": amount,
            "merchant_id": merchant,
            "category": cat,
            "channel": channel,
            "declined": declined,
            "refund_us": refund_us,
        }

        # Deferred charges: asked for when money runs short, more by the stressed and impulsive.
        verified = (pop.verified_us[idx] >= 0) & (pop.verified_us[idx] < t0)
        eligible = verified & (pop.busy_until[idx] < ordinal) & (pop.default_count[idx] == 0)
        short = (balance < 0.1 * monthly_need + 2000) | (declines > 0)
        request_p = (
            np.where(short, 0.16, 0.005)
            * np.exp(
                1.1 * stress + 0.9 * pop.impulsiveness[idx] - 0.5 + np.where(shocked, 1.0, 0.0)
            )
            * (0.7 + days_since / 25.0)
        )
        asked = eligible & (rng.random(n) < request_p)
        c_local = np.flatnonzero(asked)
        k = len(c_local)
        c_income = income[c_local]
        want = np.exp(
            rng.normal(np.log(6000 + 0.03 * c_income), 0.6, k)
            + 0.6 * pop.impulsiveness[idx[c_local]]
        )
        c_amount = np.clip(np.round(want, -3), MIN_AMOUNT_JPY, MAX_AMOUNT_JPY).astype(np.int64)
        c_fee = fees_for(c_amount)
        requested = self.clock.times_in_days(rng, np.full(k, ordinal, np.int64), HOURLY_REQUEST)
        requested = np.minimum(requested, t1 - 120_000_000)  # room for the top-up after it
        cu = idx[c_local]
        slot = ordinal % WINDOW_DAYS
        week = (ordinal - np.arange(1, 8)) % WINDOW_DAYS  # the 7 days before today
        last_topup = pop.last_topup_day[cu]
        logit = default_logit(
            spend_30d=pop.win_spend[cu].sum(axis=1, dtype=np.float64),
            topup_jpy_30d=pop.win_topup_jpy[cu].sum(axis=1, dtype=np.float64),
            topup_count_30d=pop.win_topup_count[cu].sum(axis=1, dtype=np.float64),
            declines_30d=pop.win_declines[cu].sum(axis=1, dtype=np.float64),
            sessions_7d=pop.win_sessions[cu][:, week].sum(axis=1, dtype=np.float64),
            sessions_30d=pop.win_sessions[cu].sum(axis=1, dtype=np.float64),
            days_since_topup=np.where(last_topup < 0, -1, ordinal - last_topup),
            late_count=pop.late_count[cu],
            amount=c_amount.astype(np.float64),
            stress=pop.stress[cu],
        )
        probability = _sigmoid(logit)
        due = due_days_for(np.full(k, ordinal, np.int64))
        defaults = rng.random(k) < probability
        late = ~defaults & (rng.random(k) < np.minimum(0.85, _sigmoid(logit + 1.2)))
        on_time_day = due - rng.integers(0, 6, k)
        late_day = due + rng.integers(1, GRACE_DAYS + 1, k)
        recovered = defaults & (rng.random(k) < 0.2)
        recovery_day = due + rng.integers(GRACE_DAYS + 2, GRACE_DAYS + 90, k)
        repay_day = np.where(defaults, np.where(recovered, recovery_day, NEVER), on_time_day)
        repay_day = np.where(late, late_day, repay_day)
        repaid_us = np.full(k, -1, dtype=np.int64)
        has_repay = repay_day < NEVER
        repaid_us[has_repay] = self.clock.times_in_days(rng, repay_day[has_repay], HOURLY_TOPUP)
        default_day = due + GRACE_DAYS + 1
        default_us = np.full(k, -1, dtype=np.int64)
        if defaults.any():
            # The nightly collections batch marks defaults early in the day after the grace period.
            starts = self.clock.starts_us(default_day[defaults])
            default_us[defaults] = starts + rng.integers(0, 7_200_000_000, int(defaults.sum()))
        pop.busy_until[cu] = repay_day
        pop.event_day[cu] = np.where(defaults, default_day, np.where(late, late_day, NEVER))
        pop.event_kind[cu] = np.where(defaults, 2, np.where(late, 1, 0))
        pop.charge_count[cu] += 1
        balance[c_local] += c_amount
        out.charges = {
            "charge_id": _take_ids(counters, "charge_id", k),
            "user_id": pop.user_id[cu],
            "requested_us": requested,
            "amount_jpy": c_amount,
            "fee_jpy": c_fee,
            "due_day": due,
            "repaid_us": repaid_us,
            "days_late": np.where(has_repay, np.maximum(repay_day - due, 0), -1),
            "default_us": default_us,
            "default_probability": probability,
        }
        # A granted charge lands on the card as a 'deferred' top-up seconds later.
        topups_uidx.append(cu)
        topups_amount.append(c_amount.astype(float))
        topups_method.append(np.full(k, METHOD_DEFERRED, np.int8))
        topups_at.append(requested + rng.integers(2_000_000, 60_000_000, k))
        t_user = np.concatenate(topups_uidx)
        t_at = np.concatenate(topups_at)
        order = np.argsort(t_at, kind="stable")
        out.topups = {
            "topup_id": _take_ids(counters, "topup_id", len(order)),
            "user_id": pop.user_id[t_user[order]],
            "topped_up_us": t_at[order],
            "amount_jpy": np.concatenate(topups_amount)[order].astype(np.int64),
            "method": np.concatenate(topups_method)[order],
        }

        out.app_events, sessions = self._app_use(
            rng, pop, counters, idx, ordinal, t1, shocked, short, is_payday, c_local, requested
        )

        # Carried state: ~30-day averages of what an analyst could see in the source tables.
        # Cadence of the user's own top-ups (deferred ones are charges, counted apart).
        topup_counts = np.bincount(t_idx, minlength=n)
        all_topups = topup_counts + np.bincount(c_local, minlength=n)
        topped_in = np.where(topup_mask, topup_amount, 0.0) + np.bincount(
            c_local, weights=c_amount, minlength=n
        )
        pop.win_spend[idx, slot] = spent
        pop.win_topup_count[idx, slot] = all_topups
        pop.win_topup_jpy[idx, slot] = topped_in
        pop.win_declines[idx, slot] = declines
        pop.win_sessions[idx, slot] = sessions
        pop.last_topup_day[idx[all_topups > 0]] = ordinal
        pop.balance[idx] = balance
        return out

    def _app_use(
        self,
        rng: np.random.Generator,
        pop: Population,
        counters: Counters,
        idx: np.ndarray,
        ordinal: int,
        t1: int,
        shocked: np.ndarray,
        short: np.ndarray,
        is_payday: np.ndarray,
        requesters: np.ndarray,
        requested_us: np.ndarray,
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Sessions and screen views; every deferred request comes with its own session."""
        n = len(idx)
        worried = shocked | short
        engagement = pop.engagement[idx]
        rate = (
            (0.04 + 0.5 * engagement**1.5)
            * np.where(is_payday, 1.3, 1.0)
            * np.where(short, 1.2, 1.0)
            * np.where(shocked, 0.5, 1.0)  # a user in trouble looks away from the app
        )
        counts = rng.poisson(rate)
        s_local = np.repeat(np.arange(n), counts)
        starts = self.clock.times_in_days(rng, np.full(len(s_local), ordinal, np.int64), HOURLY_APP)
        # The session in which a deferred charge is asked for starts a little before the request.
        s_local = np.concatenate([s_local, requesters])
        starts = np.concatenate(
            [
                starts,
                np.maximum(
                    requested_us - rng.integers(30_000_000, 100_000_000, len(requesters)),
                    self.clock.start_us(ordinal),
                ),
            ]
        )
        forced_deferred = np.concatenate(
            [np.zeros(len(starts) - len(requesters), bool), np.ones(len(requesters), bool)]
        )
        order = np.argsort(starts, kind="stable")
        s_local, starts, forced_deferred = s_local[order], starts[order], forced_deferred[order]
        n_sessions = len(s_local)
        session_ids = _take_ids(counters, "session_id", n_sessions)
        views = 1 + rng.poisson(0.8 + 2.2 * engagement[s_local])
        per_session = views + 1  # the session_start event plus its screen views
        e_session = np.repeat(np.arange(n_sessions), per_session)
        position = _group_positions(per_session)
        e_count = len(e_session)
        gaps = np.where(position == 0, 0, rng.exponential(20_000_000, e_count).astype(np.int64))
        at = starts[e_session] + _group_offsets(np.cumsum(gaps), gaps, per_session)
        at = np.minimum(at, t1 - 1)
        calm = rng.random(e_count)[:, None] > np.cumsum(_SCREEN_P_CALM)[None, :]
        short = rng.random(e_count)[:, None] > np.cumsum(_SCREEN_P_SHORT)[None, :]
        screen = np.where(worried[s_local][e_session], short.sum(1), calm.sum(1))
        screen = np.minimum(screen, len(SCREENS) - 1).astype(np.int8)
        screen[forced_deferred[e_session] & (position == 2)] = SCREENS.index("deferred")
        screen[position == 0] = -1  # session_start carries no screen
        events = {
            "event_id": _take_ids(counters, "event_id", e_count),
            "user_id": pop.user_id[idx[s_local[e_session]]],
            "event_us": at,
            "session_id": session_ids[e_session],
            "screen": screen,
        }
        sessions = np.bincount(s_local, minlength=n)
        return events, sessions


_UTILITIES = CATEGORIES.index("utilities")


def _month_end(ordinal: int) -> bool:
    """Utility bills and subscriptions cluster around the turn of the month."""
    dom = date.fromordinal(ordinal).day
    return dom >= 26 or dom <= 2


def _bill_season(cumulative: np.ndarray) -> np.ndarray:
    """Category mix with utilities three times as likely (bills due at month end)."""
    probs = np.diff(cumulative, axis=1, prepend=0.0)
    probs[:, _UTILITIES] *= 3.0
    probs /= probs.sum(axis=1, keepdims=True)
    out = np.cumsum(probs, axis=1)
    out[:, -1] = 1.0
    return out


def _group_offsets(running: np.ndarray, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-element running sum restarted at each group: subtract what came before the group."""
    before_group = running - values  # cumulative sum up to (not incl.) each element
    group_first = np.cumsum(counts) - counts
    valid = counts > 0
    base = np.zeros(len(counts), dtype=running.dtype)
    base[valid] = before_group[group_first[valid]]
    return running - np.repeat(base, counts)
