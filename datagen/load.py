"""Bulk loading of generated rows: COPY into PostgreSQL, Arrow ingest into SQLite, partitions into the warehouse."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from datagen.tables import SOURCE_SCHEMAS
from paylater.redaction import redact as redact_text
from paylater.redaction import safe_cause

_ROOT = Path(__file__).resolve().parent
_SCHEMA_DIR = _ROOT.parent / "schema"
_SQL_DIR = _ROOT / "sql"
SOURCE_TABLES = ("users", "card_transactions", "topups", "deferred_charges")
_COPY_BATCH_ROWS = 250_000
ID_COLUMNS = {
    "users": "user_id",
    "card_transactions": "transaction_id",
    "topups": "topup_id",
    "deferred_charges": "charge_id",
}
"""The key of each source table, named as the generator counter handing it out (ids are dense
and given in order of creation)."""


class SourceNotEmpty(RuntimeError):
    """The source database already holds data and replacing it was not asked for."""


class SourceUnavailable(RuntimeError):
    """The source database cannot be reached or opened."""


class SourceMoved(RuntimeError):
    """The source's recorded progress moved while this run wrote a day (another run wrote it)."""


@dataclass(frozen=True)
class Progress:
    """What the source holds of the simulated world: its id and last committed business day."""

    world: str
    last_day: date


def _sql(name: str) -> str:
    """A statement from datagen/sql (positional `?` parameters), comments stripped."""
    text = (_SQL_DIR / f"{name}.sql").read_text()
    return "\n".join(line for line in text.splitlines() if not line.startswith("--")).strip()


def _check_table(table: str) -> str:
    """Only the four known source tables may be spliced into SQL."""
    if table not in SOURCE_SCHEMAS:
        raise ValueError(f"{table!r} is not a source table ({', '.join(SOURCE_TABLES)})")
    return table


class SourceDB(Protocol):
    """What the generator needs from the operational database."""

    url: str

    def ensure_schema(self) -> None: ...
    def drop_indexes(self) -> None: ...
    def row_counts(self) -> dict[str, int]: ...
    def last_ids(self) -> dict[str, int]: ...
    def clear(self) -> None: ...
    def append(self, table: str, data: pa.Table) -> None: ...
    def update(self, table: str, data: pa.Table) -> None: ...
    def progress(self) -> Progress | None: ...
    def record_progress(self, world: str, previous: date | None, day: date) -> None: ...
    def commit(self) -> None: ...
    def close(self) -> None: ...


def database_errors() -> tuple[type[Exception], ...]:
    """What a source database raises when it fails a statement (locked, gone, refused)."""
    import sqlite3

    import adbc_driver_manager
    import psycopg

    # adbc_driver_manager.Error: the embedded SQLite source is written through ADBC.
    return (sqlite3.Error, adbc_driver_manager.Error, psycopg.Error)


def redact(url: str) -> str:
    """A URL with its password hidden, a URL missing its scheme (user:password@host/db) too."""
    return re.sub(r"^([^:/@]+):[^@/]*@", r"\1:***@", redact_text(url))


def open_source(url: str) -> SourceDB:
    """Connect to sqlite:///path or postgresql://... (SQLAlchemy-style URLs)."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ValueError(
            f"source URL {redact(url)!r} has no scheme: use sqlite:///path or postgresql://..."
        )
    kind = scheme.split("+", 1)[0]
    if kind == "sqlite":
        return SqliteSource(url)
    if kind in ("postgresql", "postgres"):
        return PostgresSource(url)
    raise ValueError(
        f"source URL {redact(url)!r} is of unknown kind {scheme!r}: use sqlite or postgresql"
    )


def _to_sqlite_types(data: pa.Table) -> pa.Table:
    """Timestamps to fixed-width ISO-8601 UTC text and dates to 'YYYY-MM-DD', as source_sqlite.sql says."""
    columns = []
    for col, fld in zip(data.columns, data.schema, strict=True):
        if pa.types.is_timestamp(fld.type):
            col = iso_utc_text(col)
        elif pa.types.is_date(fld.type):
            col = col.cast(pa.string())
        columns.append(col)
    return pa.Table.from_arrays(columns, names=data.column_names)


def iso_utc_text(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """UTC timestamps as '2026-11-26T03:04:05.123456+00:00' (Arrow's zone-aware cast is ~40x slower)."""
    naive = column.cast(pa.timestamp("us", tz="UTC")).cast(pa.timestamp("us")).cast(pa.string())
    with_t = pc.utf8_replace_slice(naive, start=10, stop=11, replacement="T")
    return pc.binary_join_element_wise(with_t, pa.scalar("+00:00"), pa.scalar(""))


class _ProgressRecord:
    """The datagen_progress row, on top of three statements each backend provides."""

    def _query(self, name: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run datagen/sql/<name>.sql; its rows, if it returns any."""
        raise NotImplementedError

    def _changed_rows(self) -> int:
        """Rows the last statement changed."""
        raise NotImplementedError

    def _has_progress_table(self) -> bool:
        """Whether datagen_progress exists (not before the first generate that recorded it)."""
        raise NotImplementedError

    def progress(self) -> Progress | None:
        """The recorded world and last day; None for a source generated before they were."""
        if not self._has_progress_table():
            return None
        rows = self._query("progress_read")
        if len(rows) != 1:
            return None
        world, last_day = rows[0]
        return Progress(str(world), date.fromisoformat(str(last_day)))

    def record_progress(self, world: str, previous: date | None, day: date) -> None:
        """Record `day` as committed in the open transaction: from `previous` (an advance, which
        must find it there) or afresh (previous None: a generate)."""
        self._query("progress_create")
        if previous is not None:
            self._query("progress_advance", (day.isoformat(), world, previous.isoformat()))
            if self._changed_rows() == 1:
                return
            if self._query("progress_read"):  # a source that held no record yet takes one
                raise SourceMoved(
                    f"the source no longer ends on {previous} of this world: another"
                    " `paylater demo-data` run wrote to it meanwhile; run advance again"
                )
        self._query("progress_clear")
        self._query("progress_insert", (world, day.isoformat()))


class SqliteSource(_ProgressRecord):
    """The embedded SQLite source, written through ADBC (Arrow in, no per-row Python)."""

    def __init__(self, url: str) -> None:
        import adbc_driver_sqlite.dbapi

        path = url.split("://", 1)[1]
        path = path[1:] if path.startswith("/") else path  # sqlite:///rel, sqlite:////abs
        if not path:
            raise ValueError(f"source URL {url!r} names no SQLite file")
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.url = url
        self.conn = adbc_driver_sqlite.dbapi.connect(path)

    def ensure_schema(self) -> None:
        """Create the source tables if missing."""
        script = (_SCHEMA_DIR / "source_sqlite.sql").read_text()
        with self.conn.cursor() as cur:
            for statement in _statements(script):
                cur.execute(statement)

    def drop_indexes(self) -> None:
        """Drop the updated_at indexes before a bulk load (ensure_schema builds them again)."""
        with self.conn.cursor() as cur:
            for name in _secondary_indexes("source_sqlite.sql"):
                cur.execute(f"DROP INDEX IF EXISTS {name}")

    def row_counts(self) -> dict[str, int]:
        """Rows per source table."""
        counts = {}
        with self.conn.cursor() as cur:
            for table in SOURCE_TABLES:
                cur.execute(f"SELECT count(*) FROM {_check_table(table)}")
                row = cur.fetchone()
                counts[table] = int(row[0]) if row else 0
        return counts

    def last_ids(self) -> dict[str, int]:
        """The highest id of each source table (0 when empty)."""
        ids = {}
        with self.conn.cursor() as cur:
            for table, key in ID_COLUMNS.items():
                cur.execute(f"SELECT coalesce(max({key}), 0) FROM {_check_table(table)}")
                row = cur.fetchone()
                ids[table] = int(row[0]) if row else 0
        return ids

    def clear(self) -> None:
        """Delete every row of the source tables (same transaction as the load that follows)."""
        with self.conn.cursor() as cur:
            for table in SOURCE_TABLES:
                cur.execute(f"DELETE FROM {_check_table(table)}")

    def append(self, table: str, data: pa.Table) -> None:
        """Bulk insert Arrow rows."""
        if data.num_rows:
            with self.conn.cursor() as cur:
                cur.adbc_ingest(_check_table(table), _to_sqlite_types(data), mode="append")

    def update(self, table: str, data: pa.Table) -> None:
        """Apply status changes: `data` columns in the order of datagen/sql/update_<table>.sql."""
        if data.num_rows:
            with self.conn.cursor() as cur:
                cur.executemany(_sql(f"update_{_check_table(table)}"), _to_sqlite_types(data))

    def _query(self, name: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run datagen/sql/<name>.sql; its rows, if it returns any."""
        with self.conn.cursor() as cur:
            cur.execute(_sql(name), params)
            return list(cur.fetchall()) if cur.description else []

    def _changed_rows(self) -> int:
        """Rows the last statement changed (ADBC's rowcount is -1 for SQLite)."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT changes()")
            row = cur.fetchone()
            return int(row[0]) if row else 0

    def _has_progress_table(self) -> bool:
        """Whether datagen_progress exists."""
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'datagen_progress'"
            )
            row = cur.fetchone()
            return bool(row and row[0])

    def commit(self) -> None:
        """Commit the open transaction."""
        self.conn.commit()

    def close(self) -> None:
        """Close the connection (uncommitted work is rolled back)."""
        self.conn.close()


class PostgresSource(_ProgressRecord):
    """PostgreSQL through psycopg: COPY (CSV written by Arrow) for inserts, batched updates."""

    def __init__(self, url: str) -> None:
        import psycopg

        from paylater.postgres import connect_timeout

        rest = url.split("://", 1)[1]
        self.url = url
        self._last_rowcount = -1
        conninfo = "postgresql://" + rest
        try:
            self.conn = psycopg.connect(conninfo, **connect_timeout(conninfo))
        # ProgrammingError: libpq refused the URL itself (an unknown query parameter).
        except (psycopg.OperationalError, psycopg.ProgrammingError) as exc:
            text = str(exc).strip()
            first_line = redact(text.splitlines()[0]) if text else repr(exc)
            # libpq quotes a URL it cannot parse whole, password included (see safe_cause).
            raise SourceUnavailable(
                f"cannot connect to the source database: {first_line}"
            ) from safe_cause(exc)

    def ensure_schema(self) -> None:
        """Create the source tables if missing."""
        self.conn.execute((_SCHEMA_DIR / "source_postgres.sql").read_text())

    def drop_indexes(self) -> None:
        """Drop the updated_at indexes before a bulk load (ensure_schema builds them again)."""
        for name in _secondary_indexes("source_postgres.sql"):
            self.conn.execute(f"DROP INDEX IF EXISTS {name}")

    def row_counts(self) -> dict[str, int]:
        """Rows per source table."""
        counts = {}
        for table in SOURCE_TABLES:
            row = self.conn.execute(f"SELECT count(*) FROM {_check_table(table)}").fetchone()
            counts[table] = int(row[0]) if row else 0
        return counts

    def last_ids(self) -> dict[str, int]:
        """The highest id of each source table (0 when empty)."""
        ids = {}
        for table, key in ID_COLUMNS.items():
            statement = f"SELECT coalesce(max({key}), 0) FROM {_check_table(table)}"
            row = self.conn.execute(statement).fetchone()
            ids[table] = int(row[0]) if row else 0
        return ids

    def clear(self) -> None:
        """Empty the source tables (same transaction as the load that follows)."""
        self.conn.execute("TRUNCATE " + ", ".join(_check_table(t) for t in SOURCE_TABLES))

    def append(self, table: str, data: pa.Table) -> None:
        """COPY Arrow rows in as CSV, a batch at a time (memory stays flat)."""
        if not data.num_rows:
            return
        columns = ", ".join(data.column_names)
        options = pacsv.WriteOptions(include_header=False, batch_size=_COPY_BATCH_ROWS)
        statement = f"COPY {_check_table(table)} ({columns}) FROM STDIN (FORMAT csv)"
        text = _with_text_timestamps(data)
        with self.conn.cursor() as cur, cur.copy(statement) as copy:
            for batch in text.to_batches(max_chunksize=_COPY_BATCH_ROWS):
                buffer = io.BytesIO()
                pacsv.write_csv(batch, buffer, options)
                copy.write(buffer.getbuffer())

    def update(self, table: str, data: pa.Table) -> None:
        """Apply status changes: `data` columns in the order of datagen/sql/update_<table>.sql."""
        if data.num_rows:
            statement = _sql(f"update_{_check_table(table)}").replace("?", "%s")
            with self.conn.cursor() as cur:
                cur.executemany(statement, _rows(data))

    def _query(self, name: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run datagen/sql/<name>.sql; its rows, if it returns any."""
        cur = self.conn.execute(_sql(name).replace("?", "%s"), params)
        self._last_rowcount = cur.rowcount
        return list(cur.fetchall()) if cur.description else []

    def _changed_rows(self) -> int:
        """Rows the last statement changed."""
        return self._last_rowcount

    def _has_progress_table(self) -> bool:
        """Whether datagen_progress exists (on the search path)."""
        row = self.conn.execute("SELECT to_regclass('datagen_progress') IS NOT NULL").fetchone()
        return bool(row and row[0])

    def commit(self) -> None:
        """Commit the open transaction."""
        self.conn.commit()

    def close(self) -> None:
        """Close the connection (uncommitted work is rolled back)."""
        self.conn.close()


def _with_text_timestamps(data: pa.Table) -> pa.Table:
    """Timestamps pre-rendered as ISO text with an explicit UTC offset (fast, zone-proof COPY input)."""
    columns = [
        iso_utc_text(col) if pa.types.is_timestamp(fld.type) else col
        for col, fld in zip(data.columns, data.schema, strict=True)
    ]
    return pa.Table.from_arrays(columns, names=data.column_names)


def _rows(data: pa.Table) -> list[tuple[Any, ...]]:
    """Rows as tuples (only for the small daily update sets)."""
    return list(zip(*(col.to_pylist() for col in data.columns), strict=True))


def _secondary_indexes(schema_file: str) -> list[str]:
    """Names of the indexes a schema file creates (plain identifiers by construction)."""
    text = (_SCHEMA_DIR / schema_file).read_text()
    return re.findall(r"CREATE INDEX IF NOT EXISTS ([A-Za-z_][A-Za-z0-9_]*)", text)


def _statements(script: str) -> Iterable[str]:
    """Split a DDL script on semicolons (the schema files hold no procedural code)."""
    without_comments = re.sub(r"--[^\n]*", "", script)
    return [s.strip() for s in without_comments.split(";") if s.strip()]


def write_app_event_days(
    warehouse: Any, days: Iterable[tuple[date, pa.Table]], table_name: str = "app_events"
) -> int:
    """Replace each business day's partition of app events (idempotent); returns rows written."""
    written = 0
    for day, table in days:
        warehouse.replace_partition(table_name, "event_date", day, table)
        written += table.num_rows
    return written


def split_by_day(app_events: pa.Table) -> list[tuple[date, pa.Table]]:
    """One table per event_date."""
    if app_events.num_rows == 0:
        return []
    days = pc.unique(app_events.column("event_date")).to_pylist()
    return [
        (
            day,
            app_events.filter(
                pc.equal(app_events.column("event_date"), pa.scalar(day, pa.date32()))
            ),
        )
        for day in sorted(days)
    ]
