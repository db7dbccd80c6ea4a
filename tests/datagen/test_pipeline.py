"""generate then advance: new rows and status changes of old rows land inside the new business day."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import psycopg
import pyarrow.parquet as pq
import pytest

from datagen import advance_into, generate_into
from paylater.product import GRACE_DAYS
from paylater.timeutil import day_end_utc, day_start_utc

END = date(2026, 8, 23)  # advancing into the 24th-25th: repayments cluster before the 27th


@pytest.mark.postgres
def test_advance_updates_old_rows_within_the_new_day(pg_url: str, tmp_path: Path) -> None:
    truth_dir = tmp_path / "truth"
    warehouse = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    generate_into(250, 3, 9, END, "Asia/Tokyo", pg_url, warehouse, truth_dir)
    truth_before = pq.read_table(truth_dir / "deferred_charges.parquet").num_rows
    report = advance_into(2, pg_url, warehouse, truth_dir)
    assert report.first_day == END + timedelta(days=1)
    assert report.last_day == END + timedelta(days=2)
    day = END + timedelta(days=2)
    start, end = day_start_utc(day), day_end_utc(day)
    with psycopg.connect(pg_url) as conn:
        old_changed = conn.execute(
            "SELECT status, count(*) FROM deferred_charges"
            " WHERE updated_at >= %s AND requested_at < %s GROUP BY status",
            (start, start),
        ).fetchall()
        outside = conn.execute(
            "SELECT count(*) FROM card_transactions WHERE updated_at >= %s", (end,)
        ).fetchone()
        new_rows = conn.execute(
            "SELECT count(*) FROM card_transactions WHERE authorized_at >= %s AND updated_at < %s",
            (start, end),
        ).fetchone()
        early_defaults = conn.execute(
            "SELECT count(*) FROM deferred_charges WHERE status = 'defaulted'"
            " AND (updated_at AT TIME ZONE 'Asia/Tokyo')::date <= due_date + %s",
            (GRACE_DAYS,),
        ).fetchone()
        charges = conn.execute("SELECT count(*) FROM deferred_charges").fetchone()
    assert sum(n for _, n in old_changed) > 0  # repayments of charges from earlier days
    assert outside == (0,)
    assert new_rows is not None and new_rows[0] > 0
    assert early_defaults == (0,)
    truth = pq.read_table(truth_dir / "deferred_charges.parquet")
    assert charges is not None and truth.num_rows == charges[0] >= truth_before


def test_advance_continues_deterministically(tmp_path: Path) -> None:
    """Two worlds from the same seed advance to identical rows (state persisted, not re-drawn)."""
    dumps = []
    for name in ("a", "b"):
        home = tmp_path / name
        source = f"sqlite:///{home / 'source.db'}"
        warehouse = f"duckdb:///{home / 'warehouse.duckdb'}"
        generate_into(80, 1, 3, END, "Asia/Tokyo", source, warehouse, home / "truth")
        advance_into(1, source, warehouse, home / "truth")
        import sqlite3

        with sqlite3.connect(home / "source.db") as conn:
            dumps.append(
                [
                    conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                    for t in ("users", "card_transactions", "topups", "deferred_charges")
                ]
            )
    assert dumps[0] == dumps[1]
    assert len(dumps[0][1]) > 0


def test_reports_name_the_zone_the_days_were_simulated_in(tmp_path: Path) -> None:
    source = f"sqlite:///{tmp_path / 'source.db'}"
    warehouse = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    report = generate_into(20, 1, 3, END, "Asia/Kolkata", source, warehouse, tmp_path / "truth")
    assert "(business days, Asia/Kolkata)" in report.lines()[0]
    report = advance_into(1, source, warehouse, tmp_path / "truth")
    assert "(business days, Asia/Kolkata)" in report.lines()[0]


def test_an_advance_that_fails_on_a_later_day_resumes_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`advance --days 3` failing on its 2nd day (the warehouse write) kept day 1 in the source
    but not in the generator's state: the next advance simulated day 1 again and every insert
    collided with the rows already there, for good."""
    import sqlite3

    import datagen.pipeline as pipeline
    from datagen.generator import Simulation

    def dump(home: Path) -> list[list[tuple[object, ...]]]:
        with sqlite3.connect(home / "source.db") as conn:
            return [
                conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                for t in ("users", "card_transactions", "topups", "deferred_charges")
            ]

    homes = {name: tmp_path / name for name in ("straight", "resumed")}
    urls = {
        name: (f"sqlite:///{home / 'source.db'}", f"duckdb:///{home / 'warehouse.duckdb'}")
        for name, home in homes.items()
    }
    for name, home in homes.items():
        generate_into(80, 1, 3, END, "Asia/Tokyo", *urls[name], home / "truth")
    advance_into(3, *urls["straight"], homes["straight"] / "truth")

    real_write = pipeline.write_app_event_days
    calls: list[int] = []

    def failing_second_day(warehouse: object, days: object) -> int:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(warehouse, days)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "write_app_event_days", failing_second_day)
    with pytest.raises(OSError, match="disk full"):
        advance_into(3, *urls["resumed"], homes["resumed"] / "truth")
    monkeypatch.setattr(pipeline, "write_app_event_days", real_write)
    done = Simulation.load(homes["resumed"] / "truth" / "generator").last_day
    assert done == END + timedelta(days=1)  # the day that finished is kept, the failed one not
    advance_into(2, *urls["resumed"], homes["resumed"] / "truth")

    assert dump(homes["resumed"]) == dump(homes["straight"])
    truths = [pq.read_table(home / "truth" / "deferred_charges.parquet") for home in homes.values()]
    assert truths[0].sort_by("charge_id").equals(truths[1].sort_by("charge_id"))
