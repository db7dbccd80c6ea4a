"""The true default risk reads the same windows of behaviour as the source tables show."""

from __future__ import annotations

from datetime import date

import duckdb
import numpy as np
import pyarrow as pa

from datagen.generator import Simulation
from datagen.population import WINDOW_DAYS
from datagen.simulate import default_logit

END = date(2026, 10, 31)


def _per_user_day(table: pa.Table, sql: str) -> dict[tuple[int, int], float]:
    """{(user_id, local day ordinal): value} from an aggregate over `table` (named t)."""
    t = table  # noqa: F841 (read by duckdb by name)
    relation = duckdb.sql(sql)
    assert relation is not None, "a SELECT yields rows"
    rows = relation.fetchall()
    return {(int(u), d.toordinal()): float(v) for u, d, v in rows}


def test_carried_windows_equal_the_source_tables_per_user_and_day() -> None:
    sim, plan = Simulation.begin(300, 2, seed=5, end_date=END, zone="Asia/Tokyo")
    chunks = list(sim.run(plan, END))
    tx = pa.concat_tables([c.card_transactions for c in chunks])
    topups = pa.concat_tables([c.topups for c in chunks])
    events = pa.concat_tables([t for c in chunks for _, t in c.app_events])
    local = "CAST(timezone('Asia/Tokyo', {col}) AS DATE)"
    spend = _per_user_day(
        tx,
        f"SELECT user_id, {local.format(col='authorized_at')} d, sum(amount_jpy) FROM t "
        "WHERE status != 'declined' GROUP BY ALL",
    )
    declines = _per_user_day(
        tx,
        f"SELECT user_id, {local.format(col='authorized_at')} d, count(*) FROM t "
        "WHERE status = 'declined' GROUP BY ALL",
    )
    topup_jpy = _per_user_day(
        topups,
        f"SELECT user_id, {local.format(col='topped_up_at')} d, sum(amount_jpy) FROM t GROUP BY ALL",
    )
    topup_count = _per_user_day(
        topups,
        f"SELECT user_id, {local.format(col='topped_up_at')} d, count(*) FROM t GROUP BY ALL",
    )
    sessions = _per_user_day(
        events, "SELECT user_id, event_date, count(DISTINCT session_id) FROM t GROUP BY ALL"
    )
    pop = sim.pop
    end = END.toordinal()
    active = np.flatnonzero(pop.churn_day > end)
    checked = 0
    for name, truth in [
        ("win_spend", spend),
        ("win_declines", declines),
        ("win_topup_jpy", topup_jpy),
        ("win_topup_count", topup_count),
        ("win_sessions", sessions),
    ]:
        carried = getattr(pop, name)
        for day in range(end - WINDOW_DAYS + 1, end + 1):
            expected = [truth.get((int(pop.user_id[i]), day), 0.0) for i in active]
            np.testing.assert_array_equal(carried[active, day % WINDOW_DAYS], expected, name)
            checked += int(np.count_nonzero(expected))
    assert checked > 1000  # the windows hold real activity, not just zeros


def test_risk_rises_with_the_stress_a_lender_sees() -> None:
    base = {
        "spend_30d": np.array([80_000.0]),
        "topup_jpy_30d": np.array([80_000.0]),
        "topup_count_30d": np.array([3.0]),
        "declines_30d": np.array([0.0]),
        "sessions_7d": np.array([2.0]),
        "sessions_30d": np.array([8.0]),
        "days_since_topup": np.array([5]),
        "late_count": np.array([0]),
        "amount": np.array([10_000.0]),
        "stress": np.array([0.2]),
    }
    calm = default_logit(**base)[0]
    worse = {
        "spend_30d": np.array([120_000.0]),  # spending beyond what came in
        "topup_jpy_30d": np.array([30_000.0]),
        "topup_count_30d": np.array([1.0]),
        "declines_30d": np.array([4.0]),
        "sessions_7d": np.array([0.0]),  # app use fading
        "days_since_topup": np.array([25]),
        "late_count": np.array([1]),
        "amount": np.array([30_000.0]),
    }
    for name, value in worse.items():
        assert default_logit(**(base | {name: value}))[0] > calm, name
