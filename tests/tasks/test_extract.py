"""Arrow-native extraction: snapshot-sharing parallel readers on PostgreSQL, typed SQLite reads."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pyarrow as pa
import pytest

from tasks import extract
from tasks.extract import (
    Figures,
    PostgresSource,
    SourceCounts,
    Window,
    inline,
    open_source,
    pg_literal,
    redact,
)
from tasks.sync import SourceUnavailable, configured_tables, is_transient, validate_tables

ROOT = Path(__file__).resolve().parents[2]
END = datetime(2026, 11, 21, 15, tzinfo=UTC)


def charges_spec(source):
    """The configured deferred_charges table, validated against `source`."""
    return next(
        s for s in validate_tables(source, configured_tables()) if s.name == "deferred_charges"
    )


def open_postgres_source(url: str, readers: int = 2) -> PostgresSource:
    """open_source's PostgreSQL source: these tests reach into its snapshot's workings."""
    source = open_source(url, readers=readers)
    assert isinstance(source, PostgresSource), source
    return source


def fill_charges(url: str, rows: int, repaid_every: int = 0) -> None:
    """deferred_charges with `rows` rows updated before END (ids 1..rows; never analysed), every
    `repaid_every`-th one with a repaid_at (0: none)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute((ROOT / "schema/source_postgres.sql").read_text())
        conn.execute(
            "INSERT INTO deferred_charges SELECT g, g %% 7, '2026-11-20T00:00Z', 1000 + g, 100,"
            " '2026-12-27', 'outstanding',"
            " CASE WHEN %s > 0 AND g %% %s = 0 THEN '2026-11-20T05:00Z'::timestamptz END, NULL,"
            " '2026-11-20T01:00Z'::timestamptz + g * interval '1 millisecond'"
            " FROM generate_series(1, %s) g",
            [repaid_every, max(repaid_every, 1), rows],
        )


def test_parallel_readers_share_one_snapshot(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fill_charges(pg_url, 5000, repaid_every=3)
    monkeypatch.setattr(extract, "PARALLEL_MIN_ROWS", 1)
    source = open_postgres_source(pg_url, readers=3)
    spec = charges_spec(source)
    window = Window(None, END)
    with source.snapshot() as snapshot:
        counts = snapshot.counts(spec, window)
        # Committed after the snapshot began: no reader may see these.
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO deferred_charges SELECT g, 1, now(), 1, 1, '2026-12-27', 'outstanding',"
                " NULL, NULL, '2026-11-20T02:00Z' FROM generate_series(5001, 5100) g"
            )
            conn.execute("UPDATE deferred_charges SET amount_jpy = -1 WHERE charge_id <= 10")
        assert len(snapshot._key_ranges(spec, window, counts.in_window)) == 3
        stream = snapshot.read(spec, window, counts.in_window)
        table = stream.reader.read_all()
    source.close()
    assert counts.in_window == stream.rows == table.num_rows == 5000
    assert table.schema == spec.arrow_schema()
    assert sorted(table.column("charge_id").to_pylist()) == list(range(1, 5001))
    assert min(table.column("amount_jpy").to_pylist()) == 1001
    assert table.column("repaid_at").null_count == 5000 - 5000 // 3


@pytest.mark.parametrize("readers", [2, 3])
def test_an_incremental_window_splits_over_its_time_range(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, readers: int
) -> None:
    fill_charges(pg_url, 3000)  # updated at 01:00:00 + g ms
    monkeypatch.setattr(extract, "WINDOW_PARALLEL_MIN_ROWS", 1)
    source = open_postgres_source(pg_url, readers=readers)
    spec = charges_spec(source)
    # g = 1..1999; with 2 readers the cut falls at 01:00:01, on row 1000's change time exactly.
    start = datetime(2026, 11, 20, 1, 0, 0, tzinfo=UTC)
    window = Window(start, start + timedelta(seconds=2))
    with source.snapshot() as snapshot:
        slices = snapshot._slices(spec, window, 1999)
        assert len(slices) == readers and all('"updated_at"' in s for s in slices)
        # Committed after the snapshot began, inside the window: no reader may see it.
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE deferred_charges SET updated_at = %s WHERE charge_id = 2500", [start]
            )
        stream = snapshot.read(spec, window, 1999)
        table = stream.reader.read_all()
    source.close()
    assert stream.rows == table.num_rows == 1999
    assert sorted(table.column("charge_id").to_pylist()) == list(range(1, 2000))


def test_extra_connections_share_the_driver_database(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import adbc_driver_postgresql

    created: list[str] = []
    real_connect = adbc_driver_postgresql.connect

    def counted(uri: str, **kwargs):
        created.append(threading.current_thread().name)
        return real_connect(uri, **kwargs)

    monkeypatch.setattr(adbc_driver_postgresql, "connect", counted)
    fill_charges(pg_url, 3000)
    monkeypatch.setattr(extract, "PARALLEL_MIN_ROWS", 1)
    source = open_postgres_source(pg_url, readers=3)
    spec = charges_spec(source)
    with source.snapshot() as snapshot:
        # A whole-table count in the background, and two more readers: three extra connections,
        # opened from three threads at about the same time.
        counts = snapshot.counts(spec, Window(None, END))
        table = snapshot.read(spec, Window(None, END), counts.estimate).reader.read_all()
        assert counts.total == table.num_rows == 3000
    assert created == [threading.current_thread().name]  # one database object, for the first
    opened = []
    errors: list[BaseException] = []

    def open_and_query() -> None:
        try:
            conn = source._open()
            with conn.cursor() as cur:
                cur.execute("SELECT 1 AS one")
                assert cur.fetchone() == (1,)
            opened.append(conn)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=open_and_query) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(opened) == 8
    # The database object outlives the source's own connection until its last sharer closes.
    source.close()
    with opened[0].cursor() as cur:
        cur.execute("SELECT 2 AS two")
        assert cur.fetchone() == (2,)
    for conn in opened:
        conn.close()
    # A backend leaves pg_stat_activity a moment after its client hangs up: wait for that, not
    # for a leak (a connection left open stays listed).
    deadline = time.monotonic() + 10
    with psycopg.connect(pg_url, autocommit=True) as conn:
        while True:
            (others,) = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            ).fetchone() or (None,)
            if others == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert others == 0
    assert len(created) == 1


def test_whole_table_count_runs_beside_the_read_in_its_snapshot(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill_charges(pg_url, 3000)
    real = extract.pg_figures
    committed = threading.Event()

    def after_the_commit(row, spec, window, band_start) -> Figures:
        assert committed.wait(10)  # count only once newer rows are committed
        return real(row, spec, window, band_start)

    monkeypatch.setattr(extract, "pg_figures", after_the_commit)
    source = open_source(pg_url)
    spec = charges_spec(source)
    with source.snapshot() as snapshot:
        counts = snapshot.counts(spec, Window(None, END))  # a first sync: a whole-table count
        assert not counts.known and counts.estimate > 0
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO deferred_charges SELECT g, 1, now(), 1, 1, '2026-12-27',"
                " 'outstanding', NULL, NULL, '2026-11-20T02:00Z' FROM generate_series(5001, 5100) g"
            )
        committed.set()
        read = snapshot.read(spec, Window(None, END), counts.estimate).reader.read_all()
        # Counted after the insert committed, yet in the read's snapshot.
        assert counts.figures == (3000, 3000, 0, 0) and counts.total == 3000 == read.num_rows
    source.close()


def test_a_large_first_read_splits_while_the_count_runs(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Never analysed: the planner sizes the table from its pages, at about 80% of these rows.
    rows = extract.PARALLEL_MIN_ROWS * 3 // 2
    fill_charges(pg_url, rows)
    split: list[int] = []
    real = extract.PostgresSnapshot._key_ranges

    def spy(self, spec, window, expected):
        ranges = real(self, spec, window, expected)
        split.append(len(ranges))
        return ranges

    monkeypatch.setattr(extract.PostgresSnapshot, "_key_ranges", spy)
    source = open_source(pg_url, readers=2)
    spec = charges_spec(source)
    with source.snapshot() as snapshot:
        counts = snapshot.counts(spec, Window(None, END))
        # The planner's estimate sizes the read (the table was never analysed: from its size).
        assert not counts.known and counts.estimate >= extract.PARALLEL_MIN_ROWS
        stream = snapshot.read(spec, Window(None, END), counts.estimate)
        table = stream.reader.read_all()
        assert counts.in_window == stream.rows == table.num_rows == rows
    source.close()
    assert split == [2]  # two connections read it
    assert sorted(table.column("charge_id").to_pylist()) == list(range(1, rows + 1))

    small = open_source(pg_url, readers=2)
    with small.snapshot() as snapshot:
        # An incremental day's counts are index ranges, counted at once; a small read uses one
        # connection.
        start = datetime(2026, 11, 20, 1, 0, 1, tzinfo=UTC)
        counts = snapshot.counts(spec, Window(start, END), start)
        assert counts.known and counts.in_window == rows - 999
        counts = snapshot.counts(spec, Window(datetime(2026, 11, 20, 1, 3, 0, tzinfo=UTC), END))
        # check_days None: a whole-table count for the band, beside the read as well.
        assert not counts.known and counts.estimate < extract.PARALLEL_MIN_ROWS
        assert counts.in_window == rows - 180_000 + 1 and counts.in_band == rows
        assert snapshot.read(spec, Window(None, END), 10).reader.read_all().num_rows == rows
    small.close()
    assert split[1:] == [0]


def test_a_reader_joining_a_snapshot_whose_session_ended_is_a_transient_failure(
    pg_url: str,
) -> None:
    # A failover or a terminated session ends the transaction that exported the snapshot; a
    # slice reader or a background count still connecting then cannot join it. The server says
    # "invalid snapshot identifier" (a ProgrammingError), which was not taken for a lost
    # session: the sync failed for the day instead of being retried. (The exporting transaction
    # is ended here by leaving the snapshot: killing its session between two statements aborts
    # the process with the pinned driver, apache/arrow-adbc#3878.)
    fill_charges(pg_url, 1000)
    source = open_postgres_source(pg_url, readers=2)
    spec = charges_spec(source)
    try:
        with source.snapshot() as snapshot:
            pass
        with pytest.raises(
            SourceUnavailable, match=r"snapshot \S+ ended before a reader joined it"
        ) as lost:
            next(snapshot._slice_reader("SELECT 1")())
        assert is_transient(lost.value)
        counts = snapshot.counts(spec, Window(None, END))  # a whole-table count: in the background
        with pytest.raises(
            SourceUnavailable, match=r"snapshot \S+ ended before a reader joined it"
        ) as lost:
            _ = counts.in_window
        assert is_transient(lost.value)
    finally:
        snapshot.close()
        source.close()


def test_source_counts_known_or_waited_for() -> None:
    known = SourceCounts(Figures(5, 7, 1))
    assert (known.known, known.estimate, known.in_window, known.total) == (True, 5, 5, 8)
    with pytest.raises(ValueError, match="band has a start"):
        _ = SourceCounts(Figures(5, 7, 1), END).total

    asked: list[int] = []

    def count() -> Figures:
        asked.append(1)
        return Figures(3, 4, 0)

    pending = SourceCounts(count, None, estimate=10)
    assert (pending.known, pending.estimate, asked) == (False, 10, [])
    assert (pending.in_window, pending.in_band, pending.after, pending.total) == (3, 4, 0, 4)
    assert pending.known and asked == [1]  # counted once

    def broken() -> Figures:
        raise OSError("count failed")

    failed = SourceCounts(broken, None, estimate=10)
    for _ in range(2):  # every figure raises the count's error
        with pytest.raises(OSError, match="count failed"):
            _ = failed.in_band
    with pytest.raises(ValueError, match="estimate"):
        SourceCounts(count)


def test_sqlite_text_times_typed_even_after_many_nulls(tmp_path: Path) -> None:
    path = tmp_path / "src.db"
    with sqlite3.connect(path) as db:
        db.executescript((ROOT / "schema/source_sqlite.sql").read_text())
        at = "2026-11-20T03:04:05.123456+00:00"
        # SQLite's ADBC driver guesses a column's type from its first rows: 3000 NULLs first.
        db.executemany(
            "INSERT INTO deferred_charges VALUES (?, 1, ?, 100, 10, '2026-12-27', 'repaid', ?, ?, ?)",
            [(i, at, None if i < 3000 else at, None if i < 3000 else 2, at) for i in range(3100)],
        )
    source = open_source(f"sqlite:///{path}")
    spec = charges_spec(source)
    with source.snapshot() as snapshot:
        table = snapshot.read(spec, Window(None, END)).reader.read_all()
    source.close()
    assert table.schema == spec.arrow_schema()
    assert table.column("repaid_at").null_count == 3000
    assert table.column("repaid_at")[3050].as_py() == datetime(
        2026, 11, 20, 3, 4, 5, 123456, tzinfo=UTC
    )
    assert table.column("due_date").type == pa.date32()


def test_unknown_source_kind_and_redaction() -> None:
    with pytest.raises(extract.ConfigError, match="unknown kind 'mysql'"):
        open_source("mysql://u:pw@h/db")
    assert redact("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"


def test_read_bounds_become_typed_literals() -> None:
    """Reads carry no bind parameters (the driver streams only those through COPY)."""
    start = datetime(2026, 10, 31, 15, 0, tzinfo=UTC)
    sql = inline('"t" >= $1 AND "t" < $2 AND "k" < $3', [start, start, 12])
    assert sql == (
        "\"t\" >= '2026-10-31T15:00:00+00:00'::timestamptz"
        ' AND "t" < \'2026-10-31T15:00:00+00:00\'::timestamptz AND "k" < 12'
    )
    with pytest.raises(ValueError, match="naive"):
        pg_literal(datetime(2026, 10, 31))
    with pytest.raises(TypeError):
        pg_literal("1; DROP TABLE users")


def test_postgres_column_types_as_information_schema_has_them(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS typed; DROP DOMAIN IF EXISTS yen")
        conn.execute("CREATE DOMAIN yen AS bigint CHECK (VALUE >= 0)")
        conn.execute(
            "CREATE TABLE typed (id integer, gone text, amount yen, note varchar(20), code char(2),"
            " at timestamptz, local_at timestamp, day date, ok boolean, ratio double precision,"
            " small smallint, weird jsonb, tags text[], token uuid)"
        )
        conn.execute("ALTER TABLE typed DROP COLUMN gone")
        expected = {
            name: extract._PG_TYPES.get(data_type)
            for name, data_type in conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = 'typed'"
                " ORDER BY ordinal_position"
            ).fetchall()
        }
    source = open_source(pg_url)
    try:
        types = source.column_types("typed")
        assert source.column_types("no_such_table") is None
    finally:
        source.close()
    assert types == expected
    assert list(types) == [
        "id", "amount", "note", "code", "at", "local_at", "day", "ok", "ratio", "small", "weird", "tags",
        "token",
    ]  # fmt: skip
    assert types["amount"] == "int64" and types["weird"] is None and types["tags"] is None
    assert types["token"] == "string"  # read as its text


def test_a_source_that_never_answers_is_unavailable_in_seconds(silent_postgres: str) -> None:
    """A source host that takes the TCP connection and says nothing is SourceUnavailable (retried
    by the task), not a sync held for good."""
    from tasks.extract import PostgresSource
    from tasks.sync_config import SourceUnavailable

    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match=r"unreachable.*timeout"):
        PostgresSource(silent_postgres)
    assert time.monotonic() - started < 15


def leak_free_chain(exc: BaseException, secret: str) -> None:
    """Neither the error nor anything its traceback prints (cause, context) holds `secret`."""
    import traceback

    printed = "".join(traceback.format_exception(exc))
    assert secret not in printed, printed


def test_a_wrong_password_or_malformed_url_never_shows_the_password(pg_server_url: str) -> None:
    """libpq quotes a URL it cannot parse whole in its error, password included: the message
    (and the traceback a Prefect run logs) must carry the host and the reason, not the secret."""
    from tasks.extract import PostgresSource
    from tasks.sync_config import SourceUnavailable

    host = pg_server_url.rpartition("@")[2]  # 127.0.0.1:5432/postgres
    wrong = f"postgresql://postgres:Wr0ngSecret@{host}"
    with pytest.raises(SourceUnavailable, match="password authentication failed") as caught:
        PostgresSource(wrong)
    assert "127.0.0.1" in str(caught.value)
    leak_free_chain(caught.value, "Wr0ngSecret")

    malformed = "postgresql://postgres:Wr0ngSecret@[::1/postgres"
    with pytest.raises(SourceUnavailable, match=r"IPv6 host address") as caught:
        PostgresSource(malformed)
    assert "[::1/postgres" in str(caught.value)
    leak_free_chain(caught.value, "Wr0ngSecret")


def test_unknown_source_kind_never_shows_the_password() -> None:
    with pytest.raises(extract.ConfigError, match="unknown kind") as caught:
        open_source("mysql://u:pa/ss@h/db")  # an unescaped `/` fools a URL parser
    assert "pa/ss" not in str(caught.value) and "@h/db" in str(caught.value)
