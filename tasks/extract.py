"""Arrow-native extraction from the operational database (PostgreSQL or SQLite) through ADBC.

Every read of one table happens in one snapshot (REPEATABLE READ on PostgreSQL, a read
transaction on SQLite) together with the counts it is checked against. Large reads are split
over several PostgreSQL connections that share the snapshot (pg_export_snapshot): a first sync
over its key range, an incremental window over its time range. Batches stream out as they
arrive so the warehouse writes while the source is still being read. Extra connections share
the driver's database object, which loads the server's type catalogue once per source. On
PostgreSQL the counts run on a connection of their own in the same snapshot while the read goes on,
instead of in front of it, unless they are a small index range (a day of a small table).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import json
import queue
import re
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from paylater.postgres import bounded_url
from paylater.redaction import redact, safe_cause
from tasks.sync_config import (
    ARROW_TYPES,
    ConfigError,
    SchemaMismatch,
    SourceLocked,
    SourceTimeout,
    SourceUnavailable,
    TableSpec,
    check_identifier,
)

# Below this many rows one reader is faster than coordinating several: a first sync split over
# the key range. An incremental window is split over its time range from a lower size, since a
# further reader only costs a connection (~8 ms) and joining the snapshot. On a 10M-row table's
# day (110k changed rows) the whole sync's median went from 0.571 to 0.538 s (10 rounds).
PARALLEL_MIN_ROWS = 200_000
WINDOW_PARALLEL_MIN_ROWS = 50_000
# The PostgreSQL driver's batches default to 16 MB (~500k rows of a narrow table): so large that
# the warehouse waits for half a read before it writes anything. Smaller batches let it write
# while the source is still being read.
PG_BATCH_BYTES = 2 << 20
# adbc_driver_postgresql.StatementOptions.USE_COPY (the driver is imported only when used).
_PG_USE_COPY = "adbc.postgresql.use_copy"
# An index-range count over fewer rows than this (as the planner estimates) is taken at once: on
# its own connection it would cost more to connect (35-50 ms) than it takes (a 1M-row table's
# 7-day band: ~10 ms; a 10M-row table's: ~50 ms, which then runs beside the read).
BACKGROUND_COUNT_MIN_ROWS = 250_000
# How long closing a snapshot waits for a cancelled background count to give its connection back.
COUNT_CLOSE_SECONDS = 30
# PostgreSQL stores 'infinity' and '-infinity' as the extreme int64 (int32 for a date); the driver
# shifts them from its 2000 epoch to Arrow's 1970 one, which wraps them round to dates far BC
# (PostgreSQL's own earliest is 4713 BC, so nothing real is that low). They become the extremes
# that both warehouses can hold (BigQuery's range is years 1 to 9999), in their order.
_PG_WRAPPED = {"timestamp": -(2**62), "date": -(2**30)}
_PG_MINUS_INFINITY = {"timestamp": -(2**63) + 946_684_800_000_000, "date": -(2**31) + 10_957}
_PG_EXTREMES = {
    "timestamp": (-62_135_596_800_000_000, 253_402_300_799_999_999),  # 0001-01-01, 9999-12-31 …
    "date": (-719_162, 2_932_896),  # 0001-01-01, 9999-12-31
}
# SQLite infers a column's Arrow type from its first values, so NULLs ahead of text would make
# it an integer column; non-integer columns are read through COALESCE with this sentinel.
_SQLITE_NULL = "\x00"

_PG_TYPES: dict[str, str | None] = {
    "bigint": "int64",
    "integer": "int64",
    "smallint": "int64",
    "text": "string",
    "character varying": "string",
    "character": "string",
    "timestamp with time zone": "timestamp",
    "timestamp without time zone": "timestamp",
    "date": "date",
    "boolean": "bool",
    "double precision": "float64",
    "real": "float64",
    "uuid": "string",  # read as its text (see _pg_select)
}
_PG_CHARACTER_TYPES = ("text", "character varying", "character")
# Columns of a table in the current schema ($1) with their declared types (a domain as its base
# type): pg_catalog gives the same names and types as information_schema.columns in about a tenth
# of the time (1 ms instead of 11), which every run pays.
_PG_COLUMNS_SQL = (
    "SELECT a.attname AS column_name,"
    " format_type(COALESCE(NULLIF(t.typbasetype, 0), a.atttypid), NULL) AS data_type"
    " FROM pg_attribute a"
    " JOIN pg_class c ON c.oid = a.attrelid"
    " JOIN pg_namespace n ON n.oid = c.relnamespace"
    " JOIN pg_type t ON t.oid = a.atttypid"
    " WHERE n.nspname = current_schema() AND c.relname = $1"
    " AND c.relkind IN ('r', 'v', 'f', 'p') AND a.attnum > 0 AND NOT a.attisdropped"
    " ORDER BY a.attnum"
)
_SQLITE_TYPES: dict[str, str | None] = {
    "INTEGER": "int64",
    "INT": "int64",
    "BIGINT": "int64",
    "REAL": "float64",
    "TEXT": "string",
}


@dataclass(frozen=True)
class Window:
    """The change-time window of one sync: start <= cursor < end; start None is -infinity."""

    start: datetime | None
    end: datetime


class Figures(NamedTuple):
    """The counts of one table in one snapshot."""

    in_window: int
    in_band: int
    after: int
    # Rows whose cursor is NULL: no window holds them, so no sync would ever read them.
    null_cursor: int = 0


class Ahead(NamedTuple):
    """Rows whose cursor lies after an instant (the sync's clock): the earliest and latest of
    those change times as the source writes them (PostgreSQL's text, 'infinity' included)."""

    rows: int
    earliest: str | None = None
    latest: str | None = None


class SourceCounts:
    """Counts taken in the read's snapshot, the figures a sync is checked against.

    in_band: rows with band_start <= cursor < end (band_start None: every row before the end);
    after: rows with cursor >= end; null_cursor: rows whose cursor is NULL. Full mode:
    in_window = in_band = all rows, after = null_cursor = 0.

    Made from Figures already counted, or from a function that waits for figures still being
    counted elsewhere (in the same snapshot): then the first figure asked for waits for them, and
    raises the count's error if it failed. `estimate` is known at once: the exact window count
    when counted, else the planner's estimate of it, for sizing the read (never for a check).
    """

    def __init__(
        self,
        figures: Figures | Callable[[], Figures],
        band_start: datetime | None = None,
        estimate: int | None = None,
    ) -> None:
        self.band_start = band_start
        if isinstance(figures, Figures):
            self._figures: Figures | None = figures
            self._wait: Callable[[], Figures] | None = None
            self.estimate = figures.in_window if estimate is None else estimate
        else:
            if estimate is None:
                raise ValueError("counts still being counted need an estimate of the window")
            self._figures, self._wait = None, figures
            self.estimate = estimate

    @property
    def known(self) -> bool:
        """Whether the figures are in hand (asking for one does not wait)."""
        return self._figures is not None

    @property
    def figures(self) -> Figures:
        """The counts, waiting for them the first time if they are still being counted."""
        if self._figures is None:
            assert self._wait is not None  # set whenever _figures is not
            self._figures = self._wait()
        return self._figures

    @property
    def in_window(self) -> int:
        """Rows in the sync window."""
        return self.figures.in_window

    @property
    def in_band(self) -> int:
        """Rows in the check band [band_start, end)."""
        return self.figures.in_band

    @property
    def after(self) -> int:
        """Rows changed at or after the window's end."""
        return self.figures.after

    @property
    def null_cursor(self) -> int:
        """Rows whose cursor is NULL (in no window)."""
        return self.figures.null_cursor

    @property
    def total(self) -> int:
        """All rows of the table (only known when the band is the whole history)."""
        if self.band_start is not None:
            raise ValueError("the total is not counted when the band has a start")
        return self.in_band + self.after

    def __repr__(self) -> str:
        figures = repr(self._figures) if self._figures is not None else "counting"
        return f"SourceCounts({figures}, band_start={self.band_start!r}, estimate={self.estimate})"


# How the server words a statement cancelled by its statement_timeout, and a session it ended
# for idling in a transaction past idle_in_transaction_session_timeout: running it again meets
# the same limit, so neither is transient (SourceTimeout), unlike the other cancellations below.
_STATEMENT_TIMEOUT = re.compile(r"canceling statement due to statement timeout", re.IGNORECASE)
_IDLE_TIMEOUT = re.compile(r"idle-in-transaction timeout|idle_in_transaction", re.IGNORECASE)
# A statement cancelled by lock_timeout: another session holds a lock on the table, which it
# may release, so it is retried (SourceLocked), under a message naming the setting.
_LOCK_TIMEOUT = re.compile(r"canceling statement due to lock timeout", re.IGNORECASE)
# How libpq and the server word a session that ended or a statement they cancelled (a restart,
# a failover, pg_terminate_backend, a conflict with recovery on a replica): nothing wrong with
# the data, so the task that read it is worth retrying.
_SESSION_LOST = re.compile(
    r"server closed the connection|terminating connection|could not receive data|"
    r"no connection to the server|connection to server|PQgetCopyData\(\) failed|"
    r"canceling statement due to",
    re.IGNORECASE,
)


def server_timeout(error: BaseException, table: str) -> SourceTimeout | SourceLocked | None:
    """The sync's error for `error` (the driver's, from a count or the read) when it is one of
    PostgreSQL's timeouts, naming the setting: SourceTimeout (statement_timeout, or
    idle_in_transaction_session_timeout) or SourceLocked (lock_timeout); None otherwise."""
    if isinstance(error, SourceTimeout | SourceLocked):
        return error
    text = str(error)
    reason = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    named: SourceTimeout | SourceLocked
    if _STATEMENT_TIMEOUT.search(text):
        named = SourceTimeout(
            f"sync of {table}: a source query ran past PostgreSQL's statement_timeout and was"
            f" cancelled ({reason}); not retried, since it would time out again: raise"
            " statement_timeout for the sync's role or database (ALTER ROLE ... SET"
            " statement_timeout = '30min'), or in the source URL (options=-c statement_timeout=...)"
        )
    elif _IDLE_TIMEOUT.search(text):
        named = SourceTimeout(
            f"sync of {table}: PostgreSQL ended a source session idle in its transaction past"
            f" idle_in_transaction_session_timeout ({reason}); not retried, since the sync's"
            " session idles in its snapshot while the readers and the warehouse work, and would"
            " be ended again. The sync turns the setting off for its own sessions: whatever sets"
            " it back (a pooler's session reset) must leave them alone, or raise it for the"
            " sync's role (ALTER ROLE ... SET idle_in_transaction_session_timeout = 0)"
        )
    elif _LOCK_TIMEOUT.search(text):
        named = SourceLocked(
            f"sync of {table}: a source query waited past PostgreSQL's lock_timeout for a lock"
            f" another session holds on the table ({reason}); retried, since the holder (a"
            " migration, a VACUUM FULL, a long transaction) may let go: if it recurs, find it"
            " in pg_locks, or raise lock_timeout for the sync's role (ALTER ROLE ... SET"
            " lock_timeout = '5min')"
        )
    else:
        return None
    named.__cause__ = error
    return named


class ExtractStream:
    """A typed RecordBatchReader over one extract that counts the rows it has handed out."""

    def __init__(self, schema: pa.Schema, batches: Iterator[pa.RecordBatch], table: str) -> None:
        self.table = table
        self.rows = 0
        self.error: BaseException | None = None
        """What the extract raised, if it failed: the warehouse reading the stream reports it
        wrapped in an error of its own (DuckDB: InvalidInputException), which hides the cause."""
        self.reader = pa.RecordBatchReader.from_batches(schema, self._counted(batches))

    def _counted(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """Pass batches through, adding up their rows (and keeping the error, if any)."""
        try:
            for batch in batches:
                self.rows += batch.num_rows
                yield batch
        except Unconvertible as exc:
            self.error = SchemaMismatch(f"sync of {self.table}: {exc}")
            raise self.error from exc
        except BaseException as exc:
            self.error = exc
            raise

    def failure(self) -> Exception | None:
        """The extract's own error, if it failed; SourceUnavailable (transient) when the source
        session was lost or its statement cancelled (other than by one of the timeouts
        `server_timeout` names). The driver raises those as OSError or ArrowInvalid, which say
        nothing about retrying."""
        error = self.error
        if not isinstance(error, Exception):
            return None
        text = str(error)
        session_lost = _SESSION_LOST.search(text) and server_timeout(error, "") is None
        if not isinstance(error, SourceUnavailable) and session_lost:
            reason = str(error).strip().splitlines()[0]
            lost = SourceUnavailable(f"source connection lost during the read: {reason}")
            lost.__cause__ = error
            return lost
        return error


class Snapshot(Protocol):
    """One consistent view of the source."""

    def counts(
        self, spec: TableSpec, window: Window, band_start: datetime | None = None
    ) -> SourceCounts:
        """Rows in the window, in the check band [band_start, end) and after the end (possibly
        still being counted: they are resolved on first use, while the snapshot is open)."""
        ...

    def read(self, spec: TableSpec, window: Window, expected_rows: int = 0) -> ExtractStream:
        """The window's rows (all rows in full mode), typed as the warehouse table.

        `expected_rows` (an estimate will do) only sizes the read: how many readers split it."""
        ...

    def keys(self, spec: TableSpec) -> ExtractStream:
        """The primary-key values of every row of the table (to find rows deleted since)."""
        ...

    def ahead(self, spec: TableSpec, instant: datetime) -> Ahead:
        """The rows whose cursor lies after `instant` (call after the read has ended)."""
        ...


class Source(Protocol):
    """An operational database the sync reads."""

    url: str
    # Whether the source holds times as text (SQLite), which a cursor of a text column then is.
    times_as_text: bool

    def column_types(self, table: str) -> dict[str, str | None] | None:
        """Source columns -> Arrow type name (None: undeclared); None when the table is missing."""
        ...

    def key_enforced(self, table: str, key: tuple[str, ...]) -> bool:
        """Whether the table's own constraints make `key` unique and never NULL (see
        `enforces_key`); False for a view or a missing table."""
        ...

    def snapshot(self) -> AbstractContextManager[Snapshot]:
        """Open a consistent read snapshot for counts and reads."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def enforces_key(
    key: tuple[str, ...], not_null: set[str], unique_indexes: list[list[str | None]]
) -> bool:
    """Whether constraints make `key` unique and never NULL: every key column is NOT NULL and
    some unique index (a primary key, a unique constraint) has only key columns as its key.

    An index over a subset of the key makes the whole key unique too. `unique_indexes` lists the
    key columns of each full (not partial) unique index; None stands for an expression.
    """
    if not set(key) <= not_null:
        return False
    return any(
        columns and all(c is not None and c in key for c in columns) for columns in unique_indexes
    )


def quote(name: str) -> str:
    """A validated identifier, double-quoted for PostgreSQL and SQLite."""
    return '"' + check_identifier(name, "identifier") + '"'


def open_source(url: str, readers: int = 2) -> Source:
    """Open the operational database named by a SQLAlchemy-style URL.

    `readers`: how many PostgreSQL connections may split one large read (SQLite reads with one).
    """
    scheme = url.partition("://")[0].split("+")[0]
    if scheme in ("postgresql", "postgres"):
        return PostgresSource(url, readers)
    if scheme == "sqlite":
        return SqliteSource(url)
    raise ConfigError(
        f"source URL {redact(url)!r} is of unknown kind {scheme!r}: use postgresql://… or sqlite:///path"
    )


def window_sql(
    spec: TableSpec, window: Window, placeholder: Callable[[int], str]
) -> tuple[str, list]:
    """WHERE clause and parameters selecting the window (full mode: everything)."""
    if spec.mode == "full" or spec.cursor is None:
        return "TRUE", []
    cursor = quote(spec.cursor)
    if window.start is None:
        return f"{cursor} < {placeholder(1)}", [window.end]
    return f"{cursor} >= {placeholder(1)} AND {cursor} < {placeholder(2)}", [
        window.start,
        window.end,
    ]


class Unconvertible(SchemaMismatch):
    """A source value the type listed for its column cannot hold (raised by the read, which
    does not know the table; the ExtractStream names it)."""


def to_schema(
    batch: pa.RecordBatch, schema: pa.Schema, sentinel_nulls: bool = False
) -> pa.RecordBatch:
    """Cast one source batch to the warehouse schema (text times parsed, sentinel NULLs restored)."""
    arrays = []
    for target in schema:
        column = batch.column(target.name)
        if sentinel_nulls and pa.types.is_string(column.type):
            column = pc.if_else(pc.equal(column, _SQLITE_NULL), None, column)
        arrays.append(column if column.type == target.type else _cast(column, target))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _cast(column: pa.Array, target: pa.Field) -> pa.Array:
    """`column` as the warehouse type of `target` (a safe cast: a value it would change fails)."""
    try:
        return column.cast(target.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        # Arrow's message quotes the value, which may be anyone's data: it goes to the cause,
        # not into the ledger and the alert.
        listed = next(name for name, kind in ARROW_TYPES.items() if kind == target.type)
        raise Unconvertible(
            f"column {target.name} holds a value that is no {listed}, the type the sync"
            " configuration lists for it: was the source column retyped? List the column's"
            " type as the source now holds it and alter the warehouse table (and its __changes)"
            " to match, or correct the value at the source"
        ) from exc


def pg_infinities(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A PostgreSQL batch with its wrapped-round infinite times and dates made the extremes."""
    columns = original = batch.columns
    for i, column in enumerate(original):
        if pa.types.is_timestamp(column.type):
            kind, width = "timestamp", pa.int64()
        elif pa.types.is_date32(column.type):
            kind, width = "date", pa.int32()
        else:
            continue
        raw = column.view(width)
        lowest = pc.min(raw).as_py()
        if lowest is None or lowest >= _PG_WRAPPED[kind]:
            continue
        low, high = (pa.scalar(v, width) for v in _PG_EXTREMES[kind])
        infinite = pc.if_else(pc.equal(raw, _PG_MINUS_INFINITY[kind]), low, high)
        fixed = pc.if_else(pc.less(raw, _PG_WRAPPED[kind]), infinite, raw)
        columns = [*columns[:i], fixed.view(column.type), *columns[i + 1 :]]
    if columns is original:
        return batch
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


def _interleave(
    schema: pa.Schema, slices: list[Callable[[], Iterator[pa.RecordBatch]]]
) -> Iterator[pa.RecordBatch]:
    """Run each slice's reader in its own thread and yield batches as they arrive."""
    if len(slices) == 1:
        for batch in slices[0]():
            yield to_schema(batch, schema)
        return
    arrived: queue.Queue[Any] = queue.Queue(maxsize=4 * len(slices))
    stop = threading.Event()
    done = object()

    def pump(read: Callable[[], Iterator[pa.RecordBatch]]) -> None:
        try:
            for batch in read():
                while not stop.is_set():
                    try:
                        arrived.put(batch, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            arrived.put(done)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            arrived.put(exc)

    threads = [threading.Thread(target=pump, args=(s,), daemon=True) for s in slices]
    for thread in threads:
        thread.start()
    try:
        finished = 0
        while finished < len(slices):
            item = arrived.get()
            if item is done:
                finished += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield to_schema(item, schema)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back (once).

    Each extract batch allocates and frees megabytes in the reader threads; with the default
    thresholds glibc returns that memory to the kernel and asks for it again at the next batch,
    which strace showed as ~700k mprotect calls for a 10M-row read, 6 of its 16 CPU seconds in
    the kernel (about 3 with these thresholds). Keeping up to 256 MB costs a sync process
    little. A no-op off glibc.
    """
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        return all(
            libc.mallopt(option, value) == 1
            for option, value in (
                (m_trim_threshold, 256 << 20),
                (m_top_pad, 64 << 20),
                (m_mmap_threshold, 32 << 20),
            )
        )
    except (OSError, AttributeError):
        return False


def _adbc_batches(
    cursor: Any, sql: str, params: list, options: dict[str, str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Execute on an ADBC cursor (with driver statement options) and stream its record batches."""
    if options:
        cursor.adbc_statement.set_options(**options)
    cursor.execute(sql, params or None)
    for batch in cursor.fetch_record_batch():
        # An empty batch carries the driver's guessed types, which need not cast.
        if batch.num_rows:
            yield batch


class PostgresSource:
    """PostgreSQL through adbc_driver_postgresql (binary COPY under the hood)."""

    times_as_text = False  # a text column never compares with the window's instants

    def __init__(self, url: str, readers: int = 2) -> None:
        import adbc_driver_postgresql
        import adbc_driver_postgresql.dbapi as pg

        self.url = url
        self.readers = readers
        keep_freed_memory()
        self._uri = bounded_url("postgresql://" + url.partition("://")[2])
        self._connect = pg.connect
        self.statement_options = {
            adbc_driver_postgresql.StatementOptions.BATCH_SIZE_HINT_BYTES.value: str(PG_BATCH_BYTES)
        }
        # Extra connections (readers, background counts) are opened from threads: ADBC objects
        # allow serialized access only, so they share the database object under this lock.
        self._open_lock = threading.Lock()
        self.conn: Any = None
        self.conn = self._open()

    def _open(self) -> Any:
        """A new connection (not autocommit: ADBC commits bound statements itself in autocommit
        mode, which would end a snapshot), or SourceUnavailable.

        Its session's zone is UTC, whatever the server's or the database's is.
        The first one creates the driver's database object, which connects once more on its own
        to load the server's type catalogue (about 22 of the 30 ms here); every later one shares
        that database object and only connects (about 8 ms). The object lives until the last
        connection sharing it is closed.
        """
        try:
            with self._open_lock:
                if self.conn is None:
                    conn = self._connect(self._uri, autocommit=False)
                else:
                    conn = self.conn.adbc_clone()
            try:
                with conn.cursor() as cur:
                    # A `timestamp` without time zone holds UTC, as the read types it; the
                    # window's bounds are instants, which the server compares with it in the
                    # session's zone.
                    cur.execute("SET TIME ZONE 'UTC'")
                    # The driver (autocommit off, for the snapshot) opens the next transaction
                    # at once after each commit or rollback, so the session idles in one
                    # whenever the readers or the warehouse work: a server-wide timeout for
                    # forgotten transactions would end it, and the pinned driver aborts the
                    # process at its next statement (apache/arrow-adbc#3878).
                    cur.execute("SET idle_in_transaction_session_timeout = 0")
                conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.close()
                raise
            return conn
        except Exception as exc:
            raise SourceUnavailable.connecting(self.url, exc) from safe_cause(exc)

    def _catalogue(self, sql: str, table: str) -> list[dict[str, Any]]:
        """Rows of one catalogue query about `table` ($1), leaving no transaction idle."""
        with self.conn.cursor() as cur:
            cur.execute(sql, [table])
            rows = cur.fetch_arrow_table().to_pylist()
        self.conn.rollback()
        return rows

    def column_types(self, table: str) -> dict[str, str | None] | None:
        """Columns of `table` in the current schema with their Arrow type names (from
        pg_catalog: see _PG_COLUMNS_SQL)."""
        rows = self._catalogue(_PG_COLUMNS_SQL, table)
        if not rows:
            return None
        return {r["column_name"]: _PG_TYPES.get(r["data_type"]) for r in rows}

    def key_enforced(self, table: str, key: tuple[str, ...]) -> bool:
        """Whether `table`'s constraints make `key` unique and never NULL, from pg_catalog.

        One catalogue query per table at validation (about 1 ms): the NOT NULL columns and the
        key columns of each valid unique index without a predicate or expressions (INCLUDE
        columns are not part of its key). A view, a foreign table or a table with inheritance
        children (their rows are read with the parent's, outside its index) has none that count;
        a partitioned table's unique index spans its partitions.
        """
        rows = self._catalogue(
            "SELECT c.relkind::text AS kind, c.relhassubclass AS has_children,"
            " ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid"
            "   AND a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull) AS not_null,"
            " (SELECT json_agg(ARRAY("
            "     SELECT a.attname::text FROM generate_series(0, i.indnkeyatts - 1) AS k(pos)"
            "     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[k.pos]"
            "   ))::text FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique"
            "   AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL) AS unique_keys"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = current_schema() AND c.relname = $1",
            table,
        )
        if not rows:
            return False
        row = rows[0]
        if row["kind"] not in ("r", "p") or (row["kind"] == "r" and row["has_children"]):
            return False
        return enforces_key(key, set(row["not_null"]), json.loads(row["unique_keys"] or "[]"))

    @contextmanager
    def snapshot(self) -> Iterator[PostgresSnapshot]:
        """A REPEATABLE READ, READ ONLY transaction whose snapshot extra readers can join."""
        self.conn.rollback()  # the driver opens the next transaction; set it up before any query
        try:
            with self.conn.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                cur.execute("SELECT pg_export_snapshot() AS id")
                snapshot_id = cur.fetch_arrow_table().column("id")[0].as_py()
            snapshot = PostgresSnapshot(self, snapshot_id)
            try:
                yield snapshot
            finally:
                snapshot.close()  # counts still running are cancelled and their connections closed
        except BaseException:
            # Whatever failed (the server dropping the connection, say) is the error to report,
            # not the rollback's failure on the same dead connection.
            with contextlib.suppress(Exception):
                self.conn.rollback()
            raise
        self.conn.rollback()

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


RowQuery = Callable[[str, list], dict[str, Any]]


def pg_figures(
    row: RowQuery, spec: TableSpec, window: Window, band_start: datetime | None
) -> Figures:
    """Window, band and after-end counts through `row` (one-row queries on a connection in the
    snapshot): index ranges, except for a band without a start (and full mode): a scan."""
    table = quote(spec.name)
    if spec.mode == "full" or spec.cursor is None:
        total = row(f"SELECT count(*) AS n FROM {table}", [])["n"]
        return Figures(total, total, 0)
    cursor = quote(spec.cursor)
    # An index range too (btree indexes hold NULLs); nothing to find under NOT NULL.
    null_cursor = row(f"SELECT count(*) AS n FROM {table} WHERE {cursor} IS NULL", [])["n"]
    if band_start is not None and window.start is not None and band_start <= window.start:
        # The usual incremental day: one index range scan from the band's start counts all
        # three (the window lies inside the band; rows after the end are few).
        counted = row(
            f"SELECT count(*) FILTER (WHERE {cursor} >= $2 AND {cursor} < $3) AS in_window,"
            f" count(*) FILTER (WHERE {cursor} < $3) AS in_band,"
            f" count(*) FILTER (WHERE {cursor} >= $3) AS after"
            f" FROM {table} WHERE {cursor} >= $1",
            [band_start, window.start, window.end],
        )
        return Figures(counted["in_window"], counted["in_band"], counted["after"], null_cursor)
    where, params = window_sql(spec, window, lambda i: f"${i}")
    in_window = row(f"SELECT count(*) AS n FROM {table} WHERE {where}", params)["n"]
    # Rows at or after the end are few (changed since the day ended): an index range.
    after = row(f"SELECT count(*) AS n FROM {table} WHERE {cursor} >= $1", [window.end])["n"]
    if band_start is None and window.start is None:
        in_band = in_window  # the same rows: cursor < end
    elif band_start is None:
        in_band = row(f"SELECT count(*) AS n FROM {table} WHERE {cursor} < $1", [window.end])["n"]
    else:
        in_band = row(
            f"SELECT count(*) AS n FROM {table} WHERE {cursor} >= $1 AND {cursor} < $2",
            [band_start, window.end],
        )["n"]
    return Figures(in_window, in_band, after, null_cursor)


class BackgroundCount:
    """Figures counted in a thread on a connection of its own that joins the snapshot.

    `result()` waits for them and raises what the count raised (the driver's own error, as the
    same count on the snapshot's connection would). `close()` cancels a count still running and
    waits for its thread, which always closes the connection.
    """

    def __init__(self, snapshot: PostgresSnapshot, count: Callable[[RowQuery], Figures]) -> None:
        self._future: Future[Figures] = Future()
        self._closing = threading.Event()
        self._lock = threading.Lock()  # guards _conn between the thread and close()
        self._conn: Any = None
        self._thread = threading.Thread(
            target=self._run, args=(snapshot, count), name="paylater-source-count", daemon=True
        )
        self._thread.start()

    def _run(self, snapshot: PostgresSnapshot, count: Callable[[RowQuery], Figures]) -> None:
        """The thread: count, and hand over the figures or the error."""
        try:
            figures = self._count(snapshot, count)
        except BaseException as exc:  # handed to result(), which re-raises it
            self._future.set_exception(exc)
        else:
            self._future.set_result(figures)

    def _count(self, snapshot: PostgresSnapshot, count: Callable[[RowQuery], Figures]) -> Figures:
        """Open a connection, join the snapshot, count; the connection is closed in every case."""
        conn = snapshot.source._open()
        try:
            with self._lock:
                self._conn = conn
            with conn.cursor() as cur:

                def row(sql: str, params: list) -> dict[str, Any]:
                    if self._closing.is_set():
                        raise RuntimeError("the snapshot closed before its count finished")
                    cur.execute(sql, params or None)
                    rows: list[dict[str, Any]] = cur.fetch_arrow_table().to_pylist()
                    return rows[0]

                snapshot.join(cur)
                return count(row)
        finally:
            with self._lock:
                self._conn = None
            conn.close()

    def result(self) -> Figures:
        """The figures, once counted (re-raises the count's error)."""
        return self._future.result()

    def close(self) -> None:
        """Cancel the count if it still runs and wait for its thread to close the connection."""
        self._closing.set()
        with self._lock:
            if self._conn is not None and not self._future.done():
                with contextlib.suppress(Exception):  # it may have just finished
                    self._conn.adbc_cancel()
        self._thread.join(timeout=COUNT_CLOSE_SECONDS)


class PostgresSnapshot:
    """Counts and reads inside one exported PostgreSQL snapshot."""

    def __init__(self, source: PostgresSource, snapshot_id: str) -> None:
        self.source = source
        self.snapshot_id = snapshot_id
        self._counting: list[BackgroundCount] = []

    def _rows(self, sql: str, params: list) -> list[dict[str, Any]]:
        """Run a query on the snapshot's own connection, in its transaction."""
        with self.source.conn.cursor() as cur:
            cur.execute(sql, params or None)
            rows: list[dict[str, Any]] = cur.fetch_arrow_table().to_pylist()
        return rows

    def _scalar_row(self, sql: str, params: list) -> dict[str, Any]:
        """Run a one-row query on the snapshot's own connection."""
        return self._rows(sql, params)[0]

    def join(self, cur: Any) -> None:
        """Make a new connection's transaction (through its cursor) read this snapshot."""
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        # SET TRANSACTION SNAPSHOT takes no bind parameter; the id comes from the server.
        check_snapshot_id(self.snapshot_id)
        try:
            cur.execute(f"SET TRANSACTION SNAPSHOT '{self.snapshot_id}'")
        except Exception as exc:
            # The transaction that exported it has ended: during a sync, only because its
            # session was lost (a failover, a terminated backend): as transient as that.
            if "invalid snapshot identifier" not in str(exc):
                raise
            reason = str(exc).strip().splitlines()[0]
            raise SourceUnavailable(
                f"source connection lost during the read: the snapshot {self.snapshot_id} ended"
                f" before a reader joined it ({reason})"
            ) from exc

    def counts(
        self, spec: TableSpec, window: Window, band_start: datetime | None = None
    ) -> SourceCounts:
        """Window, band and after-end counts in this snapshot.

        A count would hold the read back for as long as it takes, so it runs on its own connection
        in this snapshot while the read goes on: its figures wait for it when first asked for, and
        the read is sized by the planner's estimate meanwhile. Only a small index-range count (an
        incremental day whose check band the planner puts under BACKGROUND_COUNT_MIN_ROWS rows) is
        taken here, at once: connecting would cost more than counting.
        """
        if spec.mode == "full" or spec.cursor is None:
            band_start = None  # full mode: the band is the whole table
        count = functools.partial(pg_figures, spec=spec, window=window, band_start=band_start)
        if spec.cursor is not None and band_start is not None:  # index ranges, not a scan
            band = f"{quote(spec.cursor)} >= {pg_literal(band_start)}"  # what the day's count reads
            if self._planned_rows(spec, band) < BACKGROUND_COUNT_MIN_ROWS:
                return SourceCounts(count(self._scalar_row), band_start)
        background = BackgroundCount(self, count)
        self._counting.append(background)
        return SourceCounts(background.result, band_start, self.estimate(spec, window))

    def estimate(self, spec: TableSpec, window: Window) -> int:
        """The planner's estimate of the rows in the window (from statistics: no scan).

        A window without a start holds nearly the whole table (rows changed after its end are
        few), so the whole table is estimated: the planner sizes a table from its pages even
        before it has statistics, where it would guess a third of it for `cursor < end`.
        """
        where, params = window_sql(spec, window, lambda i: f"${i}")
        if window.start is None:
            where, params = "TRUE", []
        return self._planned_rows(spec, inline(where, params))

    def _planned_rows(self, spec: TableSpec, where: str) -> int:
        """The planner's row estimate for `SELECT ... WHERE where` (statistics only: no scan)."""
        sql = f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {quote(spec.name)} WHERE {where}"
        with self.source.conn.cursor() as cur:
            # The driver would wrap a query without parameters in COPY, which EXPLAIN cannot be.
            cur.adbc_statement.set_options(**{_PG_USE_COPY: "false"})
            cur.execute(sql)
            plan = cur.fetch_arrow_table().column(0)[0].as_py()
        return int(json.loads(plan)[0]["Plan"]["Plan Rows"])

    def close(self) -> None:
        """Cancel the counts still running in the background and close their connections."""
        while self._counting:
            self._counting.pop().close()

    def _slices(self, spec: TableSpec, window: Window, rows: int) -> list[str]:
        """Conditions that split a large read, one slice per reader (none: one reader).

        An incremental window with a start is split into equal spans of its time range: its rows
        are the day's changes, spread over the day, while their keys are not (new rows sit at the
        top of the key range, updated ones anywhere below). Anything else (a first sync, a full
        table) is split into equal spans of an integer primary key.
        """
        readers = self.source.readers
        if readers < 2:
            return []
        if spec.mode != "full" and spec.cursor is not None and window.start is not None:
            if rows < WINDOW_PARALLEL_MIN_ROWS:
                return []
            step = (window.end - window.start) / readers
            cuts = [window.start + i * step for i in range(1, readers)]
            times = itertools.pairwise([window.start, *cuts, window.end])
            ranges: list[tuple[Any, Any]] = [(pg_literal(a), pg_literal(b)) for a, b in times]
            column = quote(spec.cursor)
        else:
            ranges = list(self._key_ranges(spec, window, rows))
            column = quote(spec.primary_key[0])
        return [f"{column} >= {lo} AND {column} < {hi}" for lo, hi in ranges]

    def _key_ranges(self, spec: TableSpec, window: Window, rows: int) -> list[tuple[int, int]]:
        """Split a large read over the integer key range, one slice per reader."""
        readers = self.source.readers
        if rows < PARALLEL_MIN_ROWS or len(spec.primary_key) != 1:
            return []
        if spec.columns.get(spec.primary_key[0]) != "int64":
            return []
        key = quote(spec.primary_key[0])
        where, params = window_sql(spec, window, lambda i: f"${i}")
        bounds = self._scalar_row(
            f"SELECT min({key}) AS lo, max({key}) AS hi FROM {quote(spec.name)} WHERE {where}",
            params,
        )
        lo, hi = bounds["lo"], bounds["hi"]
        if lo is None or hi - lo < readers:
            return []
        step = (hi - lo + 1) // readers
        edges = [lo + i * step for i in range(readers)] + [hi + 1]
        return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]

    def read(self, spec: TableSpec, window: Window, expected_rows: int = 0) -> ExtractStream:
        """Stream the window's rows, over several snapshot-sharing connections when large.

        The bounds are written into the SQL as typed literals: the driver streams a query through
        COPY ... (FORMAT binary) only when it has no bind parameters, and otherwise has libpq
        hold the whole result in memory before converting it (about twice the CPU).
        """
        schema = spec.arrow_schema()
        declared = {
            r["column_name"]: r["data_type"] for r in self._rows(_PG_COLUMNS_SQL, [spec.name])
        }
        columns = ", ".join(_pg_select(field, declared.get(field.name)) for field in schema)
        where, params = window_sql(spec, window, lambda i: f"${i}")
        sql = f"SELECT {columns} FROM {quote(spec.name)} WHERE {inline(where, params)}"
        slices = self._slices(spec, window, expected_rows)
        if not slices:
            return ExtractStream(schema, self._slice_on_main(sql, schema), spec.name)
        bounded = [f"{sql} AND {condition}" for condition in slices]
        readers = [self._slice_reader(query) for query in bounded[1:]]
        readers.insert(0, lambda: self._main_batches(bounded[0]))
        return ExtractStream(schema, _interleave(schema, readers), spec.name)

    def ahead(self, spec: TableSpec, instant: datetime) -> Ahead:
        """Rows changed after `instant`, on the snapshot's own connection: an index range (rows
        after the window's end are few). Times as the server writes them in UTC."""
        cursor = quote(spec.cursor or "updated_at")
        row = self._scalar_row(
            f"SELECT count(*) AS n, min({cursor})::text AS earliest,"
            f" max({cursor})::text AS latest FROM {quote(spec.name)} WHERE {cursor} > $1",
            [instant],
        )
        return Ahead(int(row["n"]), row["earliest"], row["latest"])

    def keys(self, spec: TableSpec) -> ExtractStream:
        """Every row's primary key, on the snapshot's own connection (after the read has ended):
        an index-only scan where the key is indexed."""
        schema = spec.key_schema()
        declared = {
            r["column_name"]: r["data_type"] for r in self._rows(_PG_COLUMNS_SQL, [spec.name])
        }
        columns = ", ".join(_pg_select(field, declared.get(field.name)) for field in schema)
        sql = f"SELECT {columns} FROM {quote(spec.name)}"
        return ExtractStream(schema, self._slice_on_main(sql, schema), spec.name)

    def _slice_on_main(self, sql: str, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        """Read on the snapshot's own connection."""
        for batch in self._main_batches(sql):
            yield to_schema(batch, schema)

    def _main_batches(self, sql: str) -> Iterator[pa.RecordBatch]:
        """Raw batches of a parameterless query (streamed through COPY) on the snapshot's own
        connection."""
        with self.source.conn.cursor() as cur:
            yield from self._pg_batches(cur, sql)

    def _pg_batches(self, cur: Any, sql: str) -> Iterator[pa.RecordBatch]:
        """A parameterless query's batches through COPY, infinite times made the extremes."""
        for batch in _adbc_batches(cur, sql, [], self.source.statement_options):
            yield pg_infinities(batch)

    def _slice_reader(self, sql: str) -> Callable[[], Iterator[pa.RecordBatch]]:
        """A reader of a parameterless query on a new connection that joins this snapshot first."""

        def read() -> Iterator[pa.RecordBatch]:
            conn = self.source._open()
            try:
                with conn.cursor() as cur:
                    self.join(cur)
                    yield from self._pg_batches(cur, sql)
                conn.rollback()
            finally:
                conn.close()

        return read


def _pg_select(field: pa.Field, declared: str | None) -> str:
    """One column of the PostgreSQL read. A string column of a type other than the character
    types is cast to text by the server: the driver hands a uuid over as its 16 bytes, which are
    no UTF-8. (A character type is read as it is: its cast to text would drop char(n)'s padding.)
    """
    name = quote(field.name)
    if pa.types.is_string(field.type) and declared not in _PG_CHARACTER_TYPES:
        return f"{name}::text AS {name}"
    return name


def pg_literal(value: Any) -> str:
    """A typed PostgreSQL literal for a bound value of ours (an aware datetime or an int)."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the sync window is in UTC")
        return f"'{value.isoformat()}'::timestamptz"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"no PostgreSQL literal for {type(value).__name__} {value!r}")


def inline(sql: str, params: list) -> str:
    """`sql` with its $n placeholders replaced by literals of `params` (identifiers in it are
    validated plain names, so a `$` only ever starts a placeholder)."""
    return re.sub(r"\$(\d+)", lambda m: pg_literal(params[int(m.group(1)) - 1]), sql)


def check_snapshot_id(snapshot_id: str) -> str:
    """A snapshot id as pg_export_snapshot returns it (hex digits and dashes)."""
    if not snapshot_id or any(ch not in "0123456789ABCDEFabcdef-" for ch in snapshot_id):
        raise SourceUnavailable(f"unexpected snapshot id {snapshot_id!r}")
    return snapshot_id


def sqlite_text(value: datetime) -> str:
    """A UTC instant in the text form the SQLite source stores (so text order is time order)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


class SqliteSource:
    """The embedded SQLite source through adbc_driver_sqlite, opened read-only."""

    times_as_text = True  # ISO-8601 UTC text, compared as text with the window's bounds

    def __init__(self, url: str) -> None:
        import adbc_driver_sqlite.dbapi as sqlite

        self.url = url
        path = Path(url.partition("://")[2].removeprefix("/"))
        if not path.is_file():
            raise SourceUnavailable(
                f"source database {redact(url)} unreachable: {path} does not exist"
            )
        try:
            # Not autocommit: the driver keeps a read transaction open, so one view holds.
            self.conn = sqlite.connect(f"file:{path.resolve()}?mode=ro", autocommit=False)
        except Exception as exc:
            raise SourceUnavailable(f"source database {redact(url)} unreachable: {exc}") from exc

    def column_types(self, table: str) -> dict[str, str | None] | None:
        """Columns of `table` with Arrow type names from their declared SQLite types."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT name, type FROM pragma_table_info(?)", [table])
            rows = cur.fetch_arrow_table().to_pylist()
        self.conn.rollback()
        if not rows:
            return None
        return {r["name"]: _SQLITE_TYPES.get(str(r["type"]).upper()) for r in rows}

    def key_enforced(self, table: str, key: tuple[str, ...]) -> bool:
        """Whether `table`'s constraints make `key` unique and never NULL (PRAGMA table_info
        and index_list / index_info).

        An INTEGER PRIMARY KEY is the rowid itself (unique, never NULL) and has no index; any
        other primary key or UNIQUE constraint is an automatic unique index. SQLite lets a
        primary key of a rowid table hold NULLs unless its columns are declared NOT NULL.
        """
        with self.conn.cursor() as cur:
            cur.execute(
                'SELECT name, type, "notnull" AS not_null, pk FROM pragma_table_info(?)', [table]
            )
            columns = cur.fetch_arrow_table().to_pylist()
            cur.execute(
                "SELECT il.name AS index_name, il.origin, ii.name AS column_name"
                " FROM pragma_index_list(?) AS il JOIN pragma_index_info(il.name) AS ii"
                ' WHERE il."unique" = 1 AND il.partial = 0',
                [table],
            )
            indexed = cur.fetch_arrow_table().to_pylist()
        self.conn.rollback()
        not_null = {c["name"] for c in columns if c["not_null"]}
        unique: dict[str, list[str | None]] = {}
        for row in indexed:
            unique.setdefault(row["index_name"], []).append(row["column_name"])
        primary = [c for c in columns if c["pk"]]
        rowid_alias = (
            len(primary) == 1
            and str(primary[0]["type"]).upper() == "INTEGER"
            and not any(row["origin"] == "pk" for row in indexed)  # INTEGER PRIMARY KEY DESC
        )
        if rowid_alias:
            not_null.add(primary[0]["name"])
            unique["rowid"] = [primary[0]["name"]]
        return enforces_key(key, not_null, list(unique.values()))

    @contextmanager
    def snapshot(self) -> Iterator[SqliteSnapshot]:
        """One read transaction: SQLite keeps its view stable until it ends."""
        self.conn.rollback()  # start a fresh read transaction
        try:
            yield SqliteSnapshot(self)
        finally:
            self.conn.rollback()

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


class SqliteSnapshot:
    """Counts and reads inside the SQLite read transaction."""

    def __init__(self, source: SqliteSource) -> None:
        self.source = source

    def _params(self, params: list) -> list:
        """Times become the stored text form, so comparisons are text comparisons."""
        return [sqlite_text(p) if isinstance(p, datetime) else p for p in params]

    def counts(
        self, spec: TableSpec, window: Window, band_start: datetime | None = None
    ) -> SourceCounts:
        """Window, band and after-end counts in one scan (the embedded source is small)."""
        table = quote(spec.name)
        if spec.mode == "full" or spec.cursor is None:
            sql = f"SELECT count(*) AS a, count(*) AS b, 0 AS c FROM {table}"
            params: list = []
        else:
            where, params = window_sql(spec, window, lambda i: "?")
            cursor = quote(spec.cursor)
            band = f"{cursor} >= ? AND {cursor} < ?" if band_start else f"{cursor} < ?"
            sql = (
                f"SELECT count(*) FILTER (WHERE {where}) AS a, count(*) FILTER (WHERE {band}) AS b,"
                f" count(*) FILTER (WHERE {cursor} >= ?) AS c,"
                f" count(*) FILTER (WHERE {cursor} IS NULL) AS d FROM {table}"
            )
            band_params = [band_start, window.end] if band_start else [window.end]
            params = [*params, *band_params, window.end]
        with self.source.conn.cursor() as cur:
            cur.execute(sql, self._params(params))
            row = cur.fetch_arrow_table().to_pylist()[0]
        figures = Figures(row["a"], row["b"], row["c"], row.get("d") or 0)
        return SourceCounts(figures, band_start if spec.cursor else None)

    def read(self, spec: TableSpec, window: Window, expected_rows: int = 0) -> ExtractStream:
        """Stream the window's rows typed as the warehouse table."""
        schema = spec.arrow_schema()
        selected = []
        for field in schema:
            name = quote(field.name)
            if pa.types.is_integer(field.type):
                selected.append(name)
            else:
                selected.append(f"COALESCE({name}, char(0)) AS {name}")
        where, params = window_sql(spec, window, lambda i: "?")
        sql = f"SELECT {', '.join(selected)} FROM {quote(spec.name)} WHERE {where}"

        def batches() -> Iterator[pa.RecordBatch]:
            with self.source.conn.cursor() as cur:
                for batch in _adbc_batches(cur, sql, self._params(params)):
                    yield to_schema(batch, schema, sentinel_nulls=True)

        return ExtractStream(schema, batches(), spec.name)

    def ahead(self, spec: TableSpec, instant: datetime) -> Ahead:
        """Rows changed after `instant` (text comparison of the stored UTC text)."""
        cursor = quote(spec.cursor or "updated_at")
        sql = (
            f"SELECT count(*) AS n, min({cursor}) AS earliest, max({cursor}) AS latest"
            f" FROM {quote(spec.name)} WHERE {cursor} > ?"
        )
        with self.source.conn.cursor() as cur:
            cur.execute(sql, self._params([instant]))
            row = cur.fetch_arrow_table().to_pylist()[0]
        return Ahead(int(row["n"]), row["earliest"], row["latest"])

    def keys(self, spec: TableSpec) -> ExtractStream:
        """Every row's primary key, typed as the warehouse table's key columns."""
        schema = spec.key_schema()
        selected = [
            quote(f.name)
            if pa.types.is_integer(f.type)
            else f"COALESCE({quote(f.name)}, char(0)) AS {quote(f.name)}"
            for f in schema
        ]
        sql = f"SELECT {', '.join(selected)} FROM {quote(spec.name)}"

        def batches() -> Iterator[pa.RecordBatch]:
            with self.source.conn.cursor() as cur:
                for batch in _adbc_batches(cur, sql, []):
                    yield to_schema(batch, schema, sentinel_nulls=True)

        return ExtractStream(schema, batches(), spec.name)
