"""Bulk loading into real SQLite and PostgreSQL, and app events into the DuckDB warehouse."""

from __future__ import annotations

import re
import sqlite3
from datetime import date, timedelta
from pathlib import Path

import psycopg
import pyarrow.compute as pc
import pytest

from datagen import SourceData, SourceNotEmpty, generate, load, write_app_events
from tasks.warehouse import open_warehouse

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}\+00:00$")


@pytest.fixture(scope="module")
def small_world() -> SourceData:
    """A small world: enough rows of every kind, including repaid and defaulted charges."""
    return generate(150, 3, seed=5, end_date=date(2026, 9, 30))


def test_sqlite_load_matches_the_schema_and_keeps_iso_utc_text(
    tmp_path: Path, small_world: SourceData
) -> None:
    path = tmp_path / "source.db"
    counts = load(f"sqlite:///{path}", small_world)
    assert counts == {k: v.num_rows for k, v in small_world.source_tables().items()}
    with sqlite3.connect(path) as conn:
        for table, data in small_world.source_tables().items():
            columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
            assert columns == data.column_names
        row = conn.execute(
            "SELECT requested_at, due_date, updated_at FROM deferred_charges ORDER BY charge_id LIMIT 1"
        ).fetchone()
        assert ISO_UTC.match(row[0]) and ISO_UTC.match(row[2])
        assert re.match(r"^\d{4}-\d{2}-\d{2}$", row[1])
        first = small_world.deferred_charges.column("requested_at")[0].as_py()
        assert row[0] == first.isoformat(timespec="microseconds")
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "card_transactions_updated_at" in indexes
    with pytest.raises(SourceNotEmpty, match="--replace"):
        load(f"sqlite:///{path}", small_world)


@pytest.mark.postgres
def test_postgres_load_copies_every_row_with_types_intact(
    pg_url: str, small_world: SourceData
) -> None:
    counts = load(pg_url, small_world)
    assert counts == {k: v.num_rows for k, v in small_world.source_tables().items()}
    charges = small_world.deferred_charges
    with psycopg.connect(pg_url) as conn:
        got = conn.execute(
            "SELECT charge_id, requested_at, due_date, status, repaid_at, days_late, updated_at"
            " FROM deferred_charges ORDER BY charge_id"
        ).fetchall()
        statuses = conn.execute("SELECT DISTINCT status FROM card_transactions").fetchall()
        index = conn.execute(
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'deferred_charges_updated_at'"
        ).fetchone()
    expected = charges.select(
        ["charge_id", "requested_at", "due_date", "status", "repaid_at", "days_late", "updated_at"]
    ).to_pylist()
    assert [tuple(r.values()) for r in expected] == got
    assert {s for (s,) in statuses} <= {"settled", "declined", "refunded"}
    assert index == (1,)
    # --replace empties the tables first, so a second load gives the same counts.
    assert load(pg_url, small_world, replace=True) == counts


def test_app_events_replace_their_day_partitions_idempotently(
    tmp_path: Path, small_world: SourceData
) -> None:
    url = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    dates = small_world.app_events.column("event_date")
    events = small_world.app_events.filter(
        pc.less(dates, pc.min(dates).as_py() + timedelta(days=8))
    )
    assert write_app_events(url, events) == events.num_rows
    write_app_events(url, events)
    warehouse = open_warehouse(url)
    try:
        got = warehouse.query_arrow(
            "SELECT count(*) AS n, count(DISTINCT event_date) AS days FROM app_events"
        ).to_pylist()[0]
    finally:
        warehouse.close()
    assert got == {"n": events.num_rows, "days": 8}


@pytest.mark.parametrize(
    "url",
    ["postgress://app:S3cretPw@db.internal/source", "app:S3cretPw@db.internal/source"],
)
def test_a_malformed_source_url_is_refused_without_its_password(url: str) -> None:
    from datagen.load import open_source

    with pytest.raises(ValueError, match="source URL") as refused:
        open_source(url)
    assert "S3cretPw" not in str(refused.value)


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_progress_moves_only_from_the_day_a_run_started_from(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two advances of the same state both wrote their day; the progress record, committed with
    each day's rows, lets the second one find the source moved instead of writing over it."""
    from datagen.load import Progress, SourceMoved, open_source

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'source.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    day = date(2026, 9, 30)
    first, second = open_source(url), open_source(url)
    try:
        assert first.progress() is None  # a source generated before progress was recorded
        first.record_progress("w1", None, day)
        first.commit()
        assert second.progress() == Progress("w1", day)
        second.commit()  # ends its read (SQLite would hold the first one's commit back)
        first.record_progress("w1", day, day + timedelta(days=1))
        first.commit()
        with pytest.raises(SourceMoved, match="another"):
            second.record_progress("w1", day, day + timedelta(days=1))
        second.close()
        second = open_source(url)
        assert second.progress() == Progress("w1", day + timedelta(days=1))
        second.record_progress("w2", None, day)  # a generate starts a new world
        second.commit()
        assert first.progress() == Progress("w2", day)
    finally:
        first.close()
        second.close()
