"""The daily sync: copy each configured source table into the warehouse for one `as_of`.

Incremental tables: the rows with watermark_from <= updated_at < watermark_to, where
watermark_to = day_end_utc(as_of) and watermark_from is the watermark of the latest earlier as_of
that succeeded (`lookback_minutes` earlier, when set: the windows then overlap, and the rows of
the overlap are read again, at their versions then; -infinity when the current table was dropped
or emptied by hand after holding rows), are merged into `<table>` by primary key, the newer
updated_at winning. With
`keep_changes` (the default) they first land in `<table>__changes` (partition as_of, replaced on
rerun), the history of what changed when. (A rerun reads the window as the source holds it now:
re-syncing an old as_of after later days drops from its partition the rows changed again since,
which the later partitions hold at their newer versions. The current table is unaffected; the
history loses those intermediate versions.) Without it, on DuckDB, they stream straight into the
empty table on a first sync, or are staged in a temporary table and merged. BigQuery always
stages in `__changes`. Full tables are replaced whole. On DuckDB the load, the merge and the
ledger row commit in one transaction, a bulk one: past 1 MiB of changes it is checkpointed into
the file at commit instead of going through the write-ahead log first.

Checks (a failure rolls the table back and records the failure in the ledger: a failed row, or,
when a run of the day already succeeded, the error and failed_at of its row, which stays
succeeded: see record_failure), all counted in the
same source snapshot as the read:
  rows_extracted == source rows in the window;  rows_loaded == rows_extracted;
  incremental: no source row has a NULL cursor (no window would ever read it);
  incremental, for a band of change times [B, watermark_to):
    source rows with B <= updated_at < watermark_to
      <= warehouse rows with updated_at >= B
      <= that + source rows with updated_at >= watermark_to.
Why those bounds: rows are never deleted at the source (or, with `deletes: propagate` and in a
reread, the rows whose key the source no longer holds are deleted from the current table first,
in the same transaction; with `deletes: fail` a broken upper bound counts those rows for its
message) and the windows of successive as_of values tile (-inf, watermark_to), so every source
row whose current version lies in the band was read by some window and is held at that version
(lower bound); a warehouse row in the band whose source row is not in it has a newer version,
after the watermark (upper bound). A row
that escaped every window (a transaction committing after the sync with an older updated_at)
breaks the lower bound when it is new, or its previous version is older than the band; an
update of a row the band already holds leaves both counts as they were, and the warehouse keeps
the previous version unnoticed (only `lookback_minutes` reads such an update, if it is late by
less than that). B is -inf on a first sync (the whole table: every warehouse key is a
source key) and otherwise `check_days` (default 7) before the watermark, at the latest the
window's start, so that a daily check costs index ranges instead of a scan of the source table:
a row lost further back than the band goes unnoticed (check_days: null checks everything daily).
Full tables: warehouse_rows == source rows.
Columns: before anything is written, an incremental table's warehouse tables (current and
`__changes`) must hold exactly the columns and types the sync reads (SchemaMismatch otherwise,
naming each difference): the sync never alters a table, and a column added, removed or retyped
at the source would otherwise fail deep in the load, or sync on with the column NULL.
Keys: unless the source's own constraints make the primary key unique and never NULL (a primary
key or unique index over key columns, the key columns NOT NULL and held in the warehouse in
their source type: found once per table by validate_tables), the loaded rows (the increment
before its merge, or the full load) must hold each key value once and none with a NULL part. A
view or a table without a key constraint can repeat one (a key the warehouse holds in another type
can, after conversion: text '1' and '01' listed as int64): merged, DuckDB would keep an
arbitrary version (BigQuery's MERGE inserts both copies of a new key, failing only when a held row
matches several), and a NULL key would never match (a new row at every sync). The table fails with KeyViolation (not retried) and rolls back. A table
whose source enforces its key pays nothing for it: the check is not run.
On BigQuery, load jobs run outside the transaction: a failed check leaves the current table
as it was, but the as_of partition of `__changes` holds the rejected increment until a rerun
replaces it. A full table's rows load into `<table>__staged` (expiring by itself), checked
there, and replace the table by one atomic job once they passed: a failed check keeps the
previous copy.
The warehouse tables a table's first sync creates are created in its transaction: a failed one
leaves none behind (DuckDB rolls them back; BigQuery's, created by table API calls or jobs, are
dropped again), so that a configuration corrected after it meets no table of the wrong schema.
A killed one runs no handler. On BigQuery, which has no transaction spanning table creation,
load jobs and the ledger row, the current table is therefore never created empty: a first sync
(no succeeded ledger row for the table, at any as_of) writes it whole by one atomic job once
its rows have passed the checks (see rebuilds; a full table's load creates it), and the next
sync after a killed one rebuilds it the same way, replacing whatever holds its name.
Source counts other than a small index range are taken while the read goes on (tasks.extract)
and waited for by the first check, still inside the warehouse transaction.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from string import Template
from typing import Any, Literal, cast

import pyarrow as pa
from prefect import task
from pydantic import BaseModel, Field

from paylater.redaction import redact
from paylater.settings import get_settings
from paylater.timeutil import day_end_utc
from tasks.extract import Source, SourceCounts, Window, open_source, server_timeout
from tasks.sync_config import (
    CHANGES_PARTITION,
    ConfigError,
    CountMismatch,
    KeyViolation,
    SchemaMismatch,
    SourceLocked,
    SourceTimeout,
    SourceUnavailable,
    SyncError,
    TableSpec,
    load_config,
    resolve_columns,
)
from tasks.warehouse import Warehouse, WarehouseError, open_warehouse
from tasks.warehouse.bigquery import BigQueryWarehouse
from tasks.warehouse.duckdb import DuckDBWarehouse

__all__ = [
    "ConfigError",
    "CountMismatch",
    "KeyViolation",
    "LedgerGap",
    "SchemaMismatch",
    "SourceLocked",
    "SourceTimeout",
    "SourceUnavailable",
    "SyncError",
    "SyncIncomplete",
    "SyncReport",
    "TableResult",
    "TableSpec",
    "check_ledger",
    "configured_tables",
    "incomplete",
    "ledger_gaps",
    "ledger_watermark",
    "sync_table",
    "validate_tables",
]

SQL_DIR = Path(__file__).with_name("sql")
log = logging.getLogger(__name__)
LEDGER = "sync_ledger"
# An increment up to this many rows (a day's, typically) is merged from an Arrow table in memory
# (~150 bytes a row); a larger one, such as a catch-up over weeks, is staged in a temporary table.
STAGE_IN_MEMORY_ROWS = 1_000_000
# ... and up to this many bytes: a wide table's rows (long texts, many columns) would otherwise
# hold gigabytes in memory below the row limit.
STAGE_IN_MEMORY_BYTES = 256 << 20
# How long a source keys table (BigQuery, see load_source_keys) lives unless dropped first: longer
# than any one table's sync runs, so that the transaction never finds it gone, and short enough
# that one left by a killed process costs a day of storage at most.
SOURCE_KEYS_EXPIRE = timedelta(days=1)
# A change time less than this ahead of the sync's clock is a clock a little ahead, not worth a
# warning: the row is read with the next day like any row changed after the day ended.
AHEAD_GRACE = timedelta(minutes=5)
LEDGER_SCHEMA = pa.schema(
    [
        ("table_name", pa.string()),
        ("as_of", pa.date32()),
        ("mode", pa.string()),
        ("watermark_from", pa.timestamp("us", tz="UTC")),
        ("watermark_to", pa.timestamp("us", tz="UTC")),
        ("rows_extracted", pa.int64()),
        ("rows_loaded", pa.int64()),
        ("warehouse_rows", pa.int64()),
        ("duration_seconds", pa.float64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        # Added later (a ledger created before it gains it: see ensure_ledger); NULL unless the
        # table propagates deletes.
        ("rows_deleted", pa.int64()),
        # Likewise: what a succeeded sync wants an operator to know (rows changed ahead of it).
        ("warning", pa.string()),
        # Likewise: the run re-read the table whole on request (NULL in rows written before it).
        ("reread", pa.bool_()),
        # Likewise: when the day's latest run failed (see record_failure); NULL when it succeeded.
        ("failed_at", pa.timestamp("us", tz="UTC")),
    ]
)
# The columns added to the ledger since its first release, with their BigQuery types.
LEDGER_ADDED = (
    ("rows_deleted", "INT64"),
    ("warning", "STRING"),
    ("reread", "BOOL"),
    ("failed_at", "TIMESTAMP"),
)


class SyncIncomplete(SyncError):
    """The ledger does not show every configured table synced for an as_of."""


class TableResult(BaseModel):
    """One table's sync for one as_of: the ledger row."""

    table_name: str
    as_of: date
    mode: Literal["full", "incremental"]
    watermark_from: datetime | None = Field(description="Start of the window; None: -infinity.")
    watermark_to: datetime = Field(description="End of the window (exclusive).")
    rows_extracted: int | None = None
    rows_loaded: int | None = None
    warehouse_rows: int | None = None
    rows_deleted: int | None = Field(
        default=None,
        description="Warehouse rows deleted because their key is gone from the source"
        " (deletes: propagate, or a reread whatever the policy), the day's total over its"
        " runs; None when no run of the day deleted (the table keeps deletes: fail).",
    )
    duration_seconds: float
    status: Literal["succeeded", "failed"]
    error: str | None = Field(
        default=None,
        description="Why the day's latest run failed: on a failed row, why it failed; on a"
        " succeeded one, a later rerun's failure, which rolled back and left the succeeded"
        " run's rows (see failed_at).",
    )
    warning: str | None = Field(
        default=None,
        description="What a succeeded sync wants an operator to know: source rows whose change"
        " time lies ahead of the sync's clock, which no window has read yet.",
    )
    reread: bool = Field(
        default=False,
        description="Whether this run re-read the table whole on request (daily_sync's reread),"
        " failed or not; watermark_from is None then, as on a first load, which is not one.",
    )
    finished_at: datetime
    failed_at: datetime | None = Field(
        default=None,
        description="When the day's latest run failed (None: it succeeded). On a succeeded row"
        " every other figure, finished_at included, is still the succeeded run's.",
    )


class SyncReport(BaseModel):
    """What one daily_sync run did, per table."""

    as_of: date
    tables: list[TableResult]

    @property
    def succeeded(self) -> bool:
        """Whether every table succeeded."""
        return all(t.status == "succeeded" for t in self.tables)


@dataclass
class _Counts:
    """Figures of one table's load, filled in as the load goes."""

    extracted: int = 0
    loaded: int = 0
    warehouse: int = 0
    deleted: int | None = None
    warning: str | None = None


def sql_text(name: str) -> str:
    """A statement from tasks/sql by file name."""
    return (SQL_DIR / name).read_text()


def configured_tables() -> list[TableSpec]:
    """The tables the sync copies, as configured (PAYLATER_SYNC_TABLES or tasks/sync_tables.yaml)."""
    return load_config()


def validate_tables(source: Source, specs: list[TableSpec]) -> list[TableSpec]:
    """Check every configured table and column against the source; resolve column types, and
    note whether the source enforces each primary key (if not, every sync checks its rows): it
    does when its constraints make the key unique and never NULL and the warehouse holds every
    key column in the source's own type."""
    resolved = []
    for spec in specs:
        source_types = source.column_types(spec.name)
        if source_types is None:
            raise ConfigError(
                f"sync config: table {spec.name} does not exist in the source database"
            )
        spec = resolve_columns(spec, source_types)
        check_text_cursor(source, spec, source_types)
        # The source's index compares the key as the source holds it; a key column the warehouse
        # holds in another type (text codes listed as int64: '1' and '01' are both 1) can repeat
        # after the conversion, so only a key kept in its own type is the source's to enforce.
        own_types = all(
            source_types[k] is not None and source_types[k] == spec.columns[k]
            for k in spec.primary_key
        )
        enforced = own_types and source.key_enforced(spec.name, spec.primary_key)
        resolved.append(replace(spec, key_enforced=enforced))
    return resolved


def check_text_cursor(source: Source, spec: TableSpec, source_types: dict[str, str | None]) -> None:
    """ConfigError when an incremental table's cursor is a text column of a source that does not
    hold its times as text: listed as timestamp, it passes resolve_columns (a SQLite cursor is
    text), and would fail only in the sync, the source refusing to compare text with an instant."""
    if spec.mode != "incremental" or not spec.cursor or source.times_as_text:
        return
    if source_types.get(spec.cursor) == "string":
        raise ConfigError(
            f"sync config: cursor {spec.name}.{spec.cursor} is text at the source, not a"
            " timestamp: the window compares it with instants, which the source cannot do for"
            " text; make the source column a timestamp (or sync a view casting it to one)"
        )


def ensure_ledger(warehouse: Warehouse) -> None:
    """Create the sync_ledger table unless it exists; add the columns a ledger created by an
    earlier release lacks (the ledger is the sync's own table, unlike the tables it copies)."""
    warehouse.create_table_if_missing(LEDGER, LEDGER_SCHEMA)
    held = warehouse.column_types(LEDGER) or {}
    for name, kind in LEDGER_ADDED:
        if name not in held:
            warehouse.execute(f"ALTER TABLE {LEDGER} ADD COLUMN IF NOT EXISTS {name} {kind}")


def previous_sync(warehouse: Warehouse, table: str, as_of: date) -> tuple[datetime | None, int]:
    """The latest earlier succeeded watermark of `table` (None: never synced) and the rows the
    warehouse table held after that sync."""
    rows = warehouse.query_arrow(
        sql_text("sync_previous_watermark.sql"), {"table_name": table, "as_of": as_of}
    ).to_pylist()
    if not rows:
        return None, 0
    return rows[0]["watermark_from"].astimezone(UTC), int(rows[0]["warehouse_rows"] or 0)


def window_start(warehouse: Warehouse, spec: TableSpec, as_of: date) -> datetime | None:
    """Where as_of's read starts: the previous watermark, `lookback_minutes` earlier (None:
    -infinity, a first sync, and always for a full table).

    A current table that is missing or empty although the previous sync left rows in it (it was
    dropped or emptied by hand) holds none of the rows earlier windows brought: it is read from
    the start again. (A table that was empty then, its source too, starts at the watermark, so
    that a rerun reads what the first run read.)
    """
    if spec.mode == "full":
        return None
    start, held_then = previous_sync(warehouse, spec.name, as_of)
    if start is None:
        return None
    if held_then and (not warehouse.table_exists(spec.name) or _count(warehouse, spec.name) == 0):
        return None
    return start - timedelta(minutes=spec.lookback_minutes)


def _bq(name: str) -> str:
    """A validated identifier, backquoted for BigQuery SQL."""
    return f"`{name}`"


def merge_sql(spec: TableSpec, template: str = "sync_merge.sql", changes: str | None = None) -> str:
    """The MERGE applying one increment to the current table.

    `changes`: the table holding the increment; None: the as_of partition of the changes table.
    """
    columns = list(spec.columns)
    cursor = spec.cursor or "updated_at"
    non_key = [c for c in columns if c not in spec.primary_key]
    return Template(sql_text(template)).substitute(
        table=_bq(spec.name),
        changes=_bq(changes or spec.changes_table),
        partition="TRUE" if changes else "as_of = @as_of",
        key_columns=", ".join(_bq(k) for k in spec.primary_key),
        target_key_columns=", ".join(f"target.{_bq(k)}" for k in spec.primary_key),
        columns=", ".join(_bq(c) for c in columns),
        source_columns=", ".join(f"source.{_bq(c)}" for c in columns),
        key_match=" AND ".join(f"target.{_bq(k)} = source.{_bq(k)}" for k in spec.primary_key),
        cursor=_bq(cursor),
        update_set=", ".join(f"{_bq(c)} = source.{_bq(c)}" for c in non_key),
    )


def gone_sql(spec: TableSpec, template: str, keys: str) -> str:
    """A statement over the current rows whose key is not among the source keys in `keys`."""
    return Template(sql_text(template)).substitute(
        table=_bq(spec.name),
        keys=_bq(keys),
        target_key_columns=", ".join(f"target.{_bq(k)}" for k in spec.primary_key),
        key_match=" AND ".join(f"target.{_bq(k)} = source.{_bq(k)}" for k in spec.primary_key),
    )


def load_source_keys(warehouse: Warehouse, spec: TableSpec, keys: Any) -> str:
    """BigQuery: every source key (an ExtractStream) loaded into `<table>__source_keys`.

    A load job, so it must run before the transaction's first statement: BigQuery's transaction
    reads its tables as of then, and would not see a table loaded later. Dropped once the
    transaction has ended (see source_keys_dropped): a transaction takes no DDL to drop it. A
    process killed before that leaves it behind: it is created expiring SOURCE_KEYS_EXPIRE
    later, and the table's next sync drops it (or replaces it: a leftover is never read).
    """
    table = source_keys_table(spec)
    if not isinstance(warehouse, BigQueryWarehouse):
        raise WarehouseError("source keys are loaded into a table on BigQuery only")
    warehouse.load_scratch_table(table, keys.reader, utc_now() + SOURCE_KEYS_EXPIRE)
    return table


def source_keys_table(spec: TableSpec) -> str:
    """The scratch table BigQuery loads a table's source keys into."""
    return f"{spec.name}__source_keys"


def deletes_gone(spec: TableSpec, reread: bool) -> bool:
    """Whether the sync deletes the current rows whose key the source no longer holds: with
    deletes: propagate, and in a reread whatever the policy (its explicit way out of `fail`)."""
    return spec.deletes == "propagate" or reread


def staged_table(spec: TableSpec) -> str:
    """The scratch table BigQuery loads a full table's rows into, to check them before they
    replace the table (see load_full_staged)."""
    return f"{spec.name}__staged"


@contextlib.contextmanager
def source_keys_dropped(warehouse: Warehouse, spec: TableSpec) -> Iterator[None]:
    """Drop the table's scratch table (BigQuery: the source keys of an incremental table, see
    load_source_keys; a full table's staged rows, see load_full_staged) once the block, which
    holds the day's transaction, has ended, committed or not: left in the dataset, it would be
    a copy nobody reads, billed as storage. Whatever the day's policy: one a killed run left
    behind goes with the table's next sync, even one that reads no keys."""
    try:
        yield
    finally:
        if isinstance(warehouse, BigQueryWarehouse):
            scratch = staged_table(spec) if spec.mode == "full" else source_keys_table(spec)
            try:
                warehouse.drop_table(scratch)
            except Exception as exc:
                # The day's outcome stands either way; the next sync replaces the table.
                log.warning("sync of %s: %s not dropped: %s", spec.name, scratch, exc)


@contextlib.contextmanager
def source_keys(warehouse: Warehouse, keys: Callable[[], Any], loaded: str | None) -> Iterator[str]:
    """Every source key as a warehouse table for the statements above: `loaded` (BigQuery, see
    load_source_keys), or on DuckDB staged inside the table's transaction (in memory, or a
    temporary table when large)."""
    if loaded is not None:
        yield loaded
        return
    if not isinstance(warehouse, DuckDBWarehouse):
        raise WarehouseError("source keys must be loaded before the transaction begins")
    with warehouse.staged(
        keys().reader, in_memory_rows=STAGE_IN_MEMORY_ROWS, in_memory_bytes=STAGE_IN_MEMORY_BYTES
    ) as staged:
        yield staged


def delete_gone(warehouse: Warehouse, spec: TableSpec, keys: AbstractContextManager[str]) -> int:
    """deletes: propagate, or a reread. Delete the current rows whose key the source no longer
    holds (call in the table's transaction, after the merge); how many were deleted."""
    before = _count(warehouse, spec.name)
    with keys as table:
        warehouse.execute(gone_sql(spec, "sync_delete_gone.sql", table))
    return before - _count(warehouse, spec.name)


def find_gone(
    warehouse: Warehouse, spec: TableSpec, keys: AbstractContextManager[str]
) -> tuple[int, str]:
    """How many current rows have a key the source no longer holds, and the first such key."""
    with keys as table:
        found = warehouse.query_arrow(gone_sql(spec, "sync_find_gone.sql", table)).to_pylist()
    if not found:
        return 0, ""
    return int(found[0]["_sync_gone"]), _key_text(spec, found[0])


def key_sql(spec: TableSpec, template: str, changes: str | None, having: str = "") -> str:
    """A key check statement over the loaded rows: `changes` is the table holding them (None:
    the as_of partition of the changes table)."""
    return Template(sql_text(template)).substitute(
        changes=_bq(changes or spec.changes_table),
        partition="TRUE" if changes else "as_of = @as_of",
        key_columns=", ".join(_bq(k) for k in spec.primary_key),
        key_has_null=_key_has_null(spec),
        having=having,
    )


def _key_has_null(spec: TableSpec) -> str:
    """A predicate: some key column of the row is NULL."""
    return "(" + " OR ".join(f"{_bq(k)} IS NULL" for k in spec.primary_key) + ")"


def _key_text(spec: TableSpec, row: dict[str, Any]) -> str:
    """One key value for an error message: `a=1, b='x'`."""

    def text(value: Any) -> str:
        if value is None:
            return "NULL"
        if isinstance(value, datetime | date):
            return value.isoformat()
        return repr(value) if isinstance(value, str) else str(value)

    return ", ".join(f"{k}={text(row[k])}" for k in spec.primary_key)


def check_keys(
    warehouse: Warehouse, spec: TableSpec, changes: str | None, params: dict | None = None
) -> None:
    """Fail with KeyViolation if the loaded rows repeat a key or have a NULL in one (call before
    they are merged, inside the table's transaction). Skipped when the source enforces the key.
    """
    if spec.key_enforced:
        return
    found = warehouse.query_arrow(key_sql(spec, "sync_key_check.sql", changes), params)
    figures = found.to_pylist()[0]
    duplicated, null_rows = int(figures["duplicated_keys"] or 0), int(figures["null_key_rows"] or 0)
    if not duplicated and not null_rows:
        return

    def times(n: int, what: str) -> str:
        return f"{n} {what}" if n == 1 else f"{n} {what}s"

    def example(having: str) -> str:
        (row,) = warehouse.query_arrow(
            key_sql(spec, "sync_key_example.sql", changes, having), params
        ).to_pylist()
        return f"e.g. {_key_text(spec, row)} in {times(row['_sync_copies'], 'row')}"

    has_null = _key_has_null(spec)
    problems = []
    if duplicated:
        occur = "occurs" if duplicated == 1 else "occur"
        problems.append(
            f"{times(duplicated, 'key value')} {occur} more than once"
            f" ({example(f'COUNT(*) > 1 AND NOT {has_null}')})"
        )
    if null_rows:
        have = "has" if null_rows == 1 else "have"
        problems.append(f"{times(null_rows, 'row')} {have} a NULL key ({example(has_null)})")
    raise KeyViolation(
        f"sync of {spec.name}: the rows read break primary key ({', '.join(spec.primary_key)}),"
        f" which the source does not enforce: {'; '.join(problems)}"
    )


def _count(warehouse: Warehouse, table: str, where: str = "", params: dict | None = None) -> int:
    """count(*) of a warehouse table (identifier validated by the caller's TableSpec)."""
    sql = f"SELECT COUNT(*) AS n FROM {_bq(table)} {where}"
    return int(warehouse.query_arrow(sql, params).column("n")[0].as_py())


def _with_as_of(reader: pa.RecordBatchReader, as_of: date) -> pa.RecordBatchReader:
    """The extract with its as_of partition column appended, still streaming."""
    schema = reader.schema.append(pa.field("as_of", pa.date32()))
    day = pa.scalar(as_of, pa.date32())

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in reader:
            yield batch.append_column("as_of", pa.repeat(day, batch.num_rows).cast(pa.date32()))

    return pa.RecordBatchReader.from_batches(schema, batches())


def _check(condition: bool, table: str, message: str) -> None:
    """Fail the table's sync with a CountMismatch unless `condition` holds."""
    if not condition:
        raise CountMismatch(f"sync of {table}: {message}")


def band_start(spec: TableSpec, window: Window) -> datetime | None:
    """Start of the count check's band: `check_days` before the end, at the latest the window's
    start; None (the whole history) on a first sync or when check_days is None."""
    if spec.mode == "full" or window.start is None or spec.check_days is None:
        return None
    return min(window.start, window.end - timedelta(days=spec.check_days))


def streams_directly(warehouse: Warehouse, spec: TableSpec) -> bool:
    """Whether the increment goes straight from the stream into the current table (DuckDB,
    change history off) rather than through the `__changes` partition."""
    return not spec.keep_changes and isinstance(warehouse, DuckDBWarehouse)


def load_incremental(
    warehouse: Warehouse,
    spec: TableSpec,
    as_of: date,
    stream: Any,
    source: SourceCounts,
    keys: Callable[[], Any],
    reread: bool = False,
    rebuild: bool = False,
) -> _Counts:
    """Load the window's rows and merge them into the current table (call in a transaction).

    `keys`: reads every source key in the read's snapshot (call after the read has ended): to
    delete the rows gone from the source (see deletes_gone), and to count them for the check's
    message when it finds some. `reread`: the window is the whole history, whose rows replace
    the current table's versions of their keys (see apply_reread). `rebuild` (BigQuery, see
    rebuilds): the window's rows replace the current table whole (see rebuild_from_changes).
    """
    deleting = deletes_gone(spec, reread)
    if rebuild:
        counts = rebuild_from_changes(
            cast(BigQueryWarehouse, warehouse), spec, as_of, stream, source
        )
        # Built from the source's rows of the read's snapshot: no held row can be gone.
        counts.deleted = 0 if deleting else None
        check_band(warehouse, spec, source, counts, held=counts.warehouse)
        return counts
    loaded: str | None = None

    def load_keys() -> None:
        nonlocal loaded
        loaded = load_source_keys(warehouse, spec, keys())

    duckdb = isinstance(warehouse, DuckDBWarehouse)
    if streams_directly(warehouse, spec):
        counts = load_direct(cast(DuckDBWarehouse, warehouse), spec, stream, source, reread)
    else:
        # BigQuery: loaded with the increment, before the transaction's first statement.
        early = load_keys if deleting and not duckdb else None
        counts = load_through_changes(warehouse, spec, as_of, stream, source, early, reread)
    if deleting:
        counts.deleted = delete_gone(warehouse, spec, source_keys(warehouse, keys, loaded))
    # Counting the rows deleted for the fail message needs the keys inside the transaction:
    # DuckDB stages them there; BigQuery's transaction could not see them loaded now.
    gone = (lambda: source_keys(warehouse, keys, None)) if duckdb else None
    check_band(warehouse, spec, source, counts, gone)
    return counts


def _checked(spec: TableSpec, stream: Any, loaded: int, source: SourceCounts) -> _Counts:
    """The figures of a loaded increment, once rows read == rows in the source window and rows
    loaded == rows read (call after the stream has been consumed)."""
    counts = _Counts(extracted=stream.rows, loaded=loaded)
    unstamped = source.null_cursor
    _check(
        not unstamped,
        spec.name,
        f"{unstamped} source {'row has' if unstamped == 1 else 'rows have'} a NULL {spec.cursor}:"
        " no window reads such a row, so it would never reach the warehouse; give it a change"
        f" time (or sync a view whose {spec.cursor} is never NULL)",
    )
    _check(
        counts.extracted == source.in_window,
        spec.name,
        f"extracted {counts.extracted} rows but the source holds {source.in_window} in the window",
    )
    _check(
        counts.loaded == counts.extracted,
        spec.name,
        f"loaded {counts.loaded} rows but extracted {counts.extracted}",
    )
    return counts


def load_through_changes(
    warehouse: Warehouse,
    spec: TableSpec,
    as_of: date,
    stream: Any,
    source: SourceCounts,
    after_load: Callable[[], None] | None = None,
    reread: bool = False,
) -> _Counts:
    """Replace the as_of partition of the changes table, then merge it.

    `after_load`: run once the read has ended, before any statement (BigQuery's transaction
    begins at the first). `reread`: the partition holds the whole history, which replaces the
    current table's versions of its keys (see apply_reread) instead of being merged into them."""
    warehouse.replace_partition(
        spec.changes_table, "as_of", as_of, _with_as_of(stream.reader, as_of)
    )
    if after_load is not None:
        after_load()
    loaded = _count(warehouse, spec.changes_table, "WHERE as_of = @as_of", {"as_of": as_of})
    counts = _checked(spec, stream, loaded, source)
    check_keys(warehouse, spec, None, {"as_of": as_of})
    if reread:
        apply_reread(warehouse, spec, None, {"as_of": as_of})
    else:
        merge_changes(warehouse, spec, as_of)
    return counts


def rebuilds(warehouse: Warehouse, spec: TableSpec) -> bool:
    """Whether the sync builds the current table whole (BigQuery, incremental, and no succeeded
    sync of the table in the ledger), replacing whatever holds its name.

    BigQuery cannot create a table inside a transaction, nor make its load jobs and the ledger
    row commit together: a first sync killed midway leaves what it got to (an empty table of
    its configuration, under a release before this one; a loaded `__changes` partition). No
    ledger row vouches for any of it, so the next sync builds the table as a first sync does,
    never merging into it or refusing its columns.
    """
    if not isinstance(warehouse, BigQueryWarehouse) or spec.mode != "incremental":
        return False
    found = warehouse.query_arrow(sql_text("sync_ledger_succeeded.sql"), {"table_name": spec.name})
    return int(found.column("n")[0].as_py()) == 0


def drop_unvouched_changes(warehouse: BigQueryWarehouse, spec: TableSpec) -> None:
    """Before a rebuild: drop a `__changes` table whose columns are not those the sync reads.

    No succeeded sync wrote it (a killed first sync of another configuration left it): kept,
    every later sync would refuse it (SchemaMismatch) until it was altered by hand.
    """
    held = warehouse.column_types(spec.changes_table)
    if held is None:
        return
    held.pop(CHANGES_PARTITION, None)
    drift = column_drift(spec.columns, held)
    if drift:
        log.warning(
            "sync of %s: %s, left by an unfinished first sync, is dropped: %s",
            spec.name,
            spec.changes_table,
            "; ".join(drift),
        )
        warehouse.drop_table(spec.changes_table)


def rebuild_from_changes(
    warehouse: BigQueryWarehouse, spec: TableSpec, as_of: date, stream: Any, source: SourceCounts
) -> _Counts:
    """Load the window (read from the beginning) into the as_of partition of `__changes`, check
    it, then replace the current table whole by its rows in one atomic query job (see
    rebuilds): the table appears whole or not at all, whenever the process dies.

    Called in the table's transaction; the replacement runs outside it, before the ledger row
    commits. Killed between the two, the table holds the checked rows and no ledger row vouches
    for them: the next sync rebuilds it again.
    """
    warehouse.replace_partition(
        spec.changes_table, "as_of", as_of, _with_as_of(stream.reader, as_of)
    )
    params = {"as_of": as_of}
    loaded = _count(warehouse, spec.changes_table, "WHERE as_of = @as_of", params)
    counts = _checked(spec, stream, loaded, source)
    check_keys(warehouse, spec, None, params)
    warehouse.replace_table_by_query(spec.name, merge_sql(spec, "sync_rebuild.sql"), params)
    counts.warehouse = loaded
    return counts


def apply_reread(
    warehouse: Warehouse, spec: TableSpec, changes: str | None, params: dict[str, Any]
) -> None:
    """Replace the current versions of the re-read history's keys with its rows, whatever their
    change time (a copy gone wrong may hold any), inside the table's transaction: readers see
    the old copy until it commits. A current row whose key the history lacks is left: its
    source row changed after the watermark (a later window reads it; emptied, the table lacked
    it until then) or is gone, which deletes_gone then deletes and counts."""
    for step in ("sync_delete_reread.sql", "sync_insert_first.sql"):
        warehouse.execute(merge_sql(spec, step, changes), params)


def load_direct(
    warehouse: DuckDBWarehouse,
    spec: TableSpec,
    stream: Any,
    source: SourceCounts,
    reread: bool = False,
) -> _Counts:
    """Stream into the empty current table, or stage the increment and MERGE it (`reread`:
    replace the versions of its keys, see apply_reread)."""
    if _count(warehouse, spec.name) == 0:
        # Every row is new: one write, straight from the reader, nothing to probe.
        counts = _checked(spec, stream, warehouse.append(spec.name, stream.reader), source)
        check_keys(warehouse, spec, spec.name)  # the table holds just the rows read
        return counts
    with warehouse.staged(
        stream.reader, in_memory_rows=STAGE_IN_MEMORY_ROWS, in_memory_bytes=STAGE_IN_MEMORY_BYTES
    ) as staged:
        counts = _checked(spec, stream, _count(warehouse, staged), source)
        check_keys(warehouse, spec, staged)
        if reread:
            apply_reread(warehouse, spec, staged, {})
        else:
            merge_staged(warehouse, spec, staged)
    return counts


def check_band(
    warehouse: Warehouse,
    spec: TableSpec,
    source: SourceCounts,
    counts: _Counts,
    keys: Callable[[], AbstractContextManager[str]] | None = None,
    held: int | None = None,
) -> None:
    """After the merge: source rows in the band <= warehouse rows in it <= those + rows after.

    `held`: the rows of the current table, known to the caller (a rebuild, whose table the
    transaction's snapshot does not show); counted otherwise."""
    counts.warehouse = _count(warehouse, spec.name) if held is None else held
    if source.band_start is None:
        held = counts.warehouse
        what, band = "rows", "before the watermark"
    else:
        held = _count(
            warehouse,
            spec.name,
            f"WHERE {_bq(spec.cursor or 'updated_at')} >= @band_start",
            {"band_start": source.band_start},
        )
        what = f"rows changed since {source.band_start:%Y-%m-%d %H:%M} UTC"
        band = "from then to the watermark"
    # Each side has one likely cause, which the message names with what to do about it.
    _check(
        source.in_band <= held,
        spec.name,
        f"warehouse holds {held} {what}, fewer than the {source.in_band} the source holds {band}:"
        " a row committed after an earlier sync with an older change time was never read"
        " (rerun the as_of its change time falls in)",
    )
    if held <= source.in_band + source.after:
        return
    if keys is not None:
        gone, example = find_gone(warehouse, spec, keys())
    else:  # not counted (BigQuery): at least the excess was deleted
        gone, example = held - source.in_band - source.after, ""
    if gone:
        rows = "1 row" if gone == 1 else f"{gone} rows"
        rows = rows if keys else f"at least {rows}"
        exist = "exists" if gone == 1 else "exist"
        named = f" (e.g. {example})" if example else ""
        raise CountMismatch(
            f"sync of {spec.name}: {rows} held in the warehouse{named} no longer"
            f" {exist} at the source: deleted there, and the table's deletes policy is fail. To"
            f" delete them from the warehouse with each day's load, set `deletes: propagate` for"
            f" {spec.name} in the sync configuration (PAYLATER_SYNC_TABLES or"
            " tasks/sync_tables.yaml) and rerun this as_of; to delete them once, the policy"
            f" kept, rerun this as_of re-reading the table whole (daily-sync's reread"
            f' parameter: reread=["{spec.name}"]), or delete them from {spec.name} by hand'
            " and rerun"
        )
    _check(
        False,
        spec.name,
        f"warehouse holds {held} {what}, more than the {source.in_band + source.after} the source"
        f" holds {band} or after it, though every key it holds is still at the source",
    )


def apply_increment(
    warehouse: Warehouse, spec: TableSpec, changes: str | None, params: dict[str, Any]
) -> None:
    """Merge an increment into the non-empty current table, the newer version of a key winning.

    BigQuery: one MERGE. DuckDB: find the held versions of the increment's keys (one scan),
    delete the replaced ones by row id, then append the new versions (an UPDATE in place costs
    a rewrite of every row group it touches at the next checkpoint).
    """
    if isinstance(warehouse, DuckDBWarehouse):
        for step in ("sync_find_held.sql", "sync_delete_replaced.sql", "sync_insert_missing.sql"):
            warehouse.execute(merge_sql(spec, step, changes), params)
        warehouse.execute("DROP TABLE IF EXISTS _held")
    else:
        warehouse.execute(merge_sql(spec, changes=changes), params)


def merge_changes(warehouse: Warehouse, spec: TableSpec, as_of: date) -> None:
    """MERGE the as_of changes partition into the current table (INSERT while it is empty)."""
    if _count(warehouse, spec.name) == 0:
        warehouse.execute(merge_sql(spec, "sync_insert_first.sql"), {"as_of": as_of})
    else:
        apply_increment(warehouse, spec, None, {"as_of": as_of})


def merge_staged(warehouse: Warehouse, spec: TableSpec, staged: str) -> None:
    """Merge a staged increment (a table holding just the window's rows) into the current table."""
    apply_increment(warehouse, spec, staged, {})


def load_full(warehouse: Warehouse, spec: TableSpec, stream: Any, source: SourceCounts) -> _Counts:
    """Replace the whole table (call in a transaction)."""
    if isinstance(warehouse, BigQueryWarehouse):
        return load_full_staged(warehouse, spec, stream, source)
    counts = _Counts()
    warehouse.replace_table(spec.name, stream.reader)
    counts.extracted = stream.rows
    counts.loaded = counts.warehouse = _count(warehouse, spec.name)
    _check(
        counts.extracted == source.total == counts.loaded,
        spec.name,
        f"extracted {counts.extracted}, loaded {counts.loaded}, source holds {source.total}",
    )
    check_keys(warehouse, spec, spec.name)
    return counts


def load_full_staged(
    warehouse: BigQueryWarehouse, spec: TableSpec, stream: Any, source: SourceCounts
) -> _Counts:
    """BigQuery: load the rows into a scratch table, check them there, then replace the table
    whole by one atomic query job (WRITE_TRUNCATE), outside the transaction (call in it).

    A load job cannot join the transaction: loaded straight into the table, rows failing the
    checks would replace the previous copy for good. The scratch table expires by itself
    (SOURCE_KEYS_EXPIRE) if a killed run leaves it, and goes after the transaction otherwise
    (source_keys_dropped).
    """
    staged = staged_table(spec)
    warehouse.load_scratch_table(staged, stream.reader, utc_now() + SOURCE_KEYS_EXPIRE)
    counts = _Counts(extracted=stream.rows)
    counts.loaded = counts.warehouse = _count(warehouse, staged)
    _check(
        counts.extracted == source.total == counts.loaded,
        spec.name,
        f"extracted {counts.extracted}, loaded {counts.loaded}, source holds {source.total}",
    )
    check_keys(warehouse, spec, staged)
    warehouse.replace_table_by_query(spec.name, f"SELECT * FROM {_bq(staged)}")
    return counts


def column_drift(read: dict[str, str], held: dict[str, str]) -> list[str]:
    """How the columns the sync reads differ from those a warehouse table holds, one phrase each."""
    added = [f"{c} ({t}) is not in it" for c, t in read.items() if c not in held]
    removed = [f"{c} ({t}) is no longer read" for c, t in held.items() if c not in read]
    retyped = [
        f"{c} is {t} now, {held[c]} there" for c, t in read.items() if c in held and held[c] != t
    ]
    return [*added, *removed, *retyped]


def synced_tables(warehouse: Warehouse, spec: TableSpec) -> list[str]:
    """The warehouse tables a sync of `spec` writes: the current table, and `__changes` when
    the increment goes through it."""
    if spec.mode == "incremental" and not streams_directly(warehouse, spec):
        return [spec.name, spec.changes_table]
    return [spec.name]


def check_held_columns(warehouse: Warehouse, spec: TableSpec, rebuild: bool = False) -> list[str]:
    """SchemaMismatch unless the incremental table's warehouse tables (current, and `__changes`
    when used) hold exactly the columns and types the sync reads (a full table is replaced
    whole, its columns with it, and so is the current table of a rebuild, see rebuilds); the
    tables missing, which the sync creates."""
    tables = [t for t in synced_tables(warehouse, spec) if not (rebuild and t == spec.name)]
    missing = []
    for table in tables:
        held = warehouse.column_types(table)
        if held is None:
            missing.append(table)
            continue
        if spec.mode == "full":
            continue
        if table == spec.changes_table:
            held.pop("as_of", None)
        drift = column_drift(spec.columns, held)
        if drift:
            raise SchemaMismatch(
                f"sync of {spec.name}: the warehouse table {table} does not hold the columns the"
                f" sync reads: {'; '.join(drift)}. The sync never alters a warehouse table: alter"
                f" {' and '.join(tables)} to match (a column added there is NULL in the rows"
                " already held until they change at the source)"
            )
    return missing


def create_tables(warehouse: Warehouse, spec: TableSpec, tables: list[str]) -> None:
    """Create the missing tables of `spec` (call inside the table's transaction: on DuckDB they
    go with its rollback; BigQuery's are table API calls, dropped by drop_created).

    Not a full table on BigQuery: its WRITE_TRUNCATE load creates it with its rows in one
    atomic step, where a table created first would stand empty under its name until the
    load, and stay so if the process died in between."""
    schema = spec.arrow_schema()
    for table in tables:
        if spec.mode == "full" and isinstance(warehouse, BigQueryWarehouse):
            continue
        if table == spec.changes_table:
            changes = schema.append(pa.field(CHANGES_PARTITION, pa.date32()))
            warehouse.create_table_if_missing(table, changes, CHANGES_PARTITION)
        else:
            warehouse.create_table_if_missing(table, schema)


def drop_created(warehouse: Warehouse, spec: TableSpec, tables: list[str]) -> None:
    """After a failed sync on BigQuery, drop the tables it created (DuckDB's went with the
    rollback): left, they would keep the schema of a configuration that may be what failed
    (every later sync then a SchemaMismatch until altered by hand), and whatever load jobs put
    in them before the failure."""
    if not isinstance(warehouse, BigQueryWarehouse):
        return
    for table in tables:
        try:
            warehouse.drop_table(table)
        except Exception as exc:
            # The sync's own error is the one to raise; this one is only logged.
            log.warning(
                "sync of %s: %s, created by the failed sync, not dropped: %s", spec.name, table, exc
            )


def write_ledger(warehouse: Warehouse, result: TableResult) -> TableResult:
    """Replace the ledger row of (table, as_of) with `result`, its rows_deleted the day's total
    (see day_deleted); the row written."""
    day = {"table_name": result.table_name, "as_of": result.as_of}
    earlier = warehouse.query_arrow(sql_text("sync_ledger_deleted.sql"), day).to_pylist()
    result = result.model_copy(
        update={"rows_deleted": day_deleted([r["rows_deleted"] for r in earlier], result)}
    )
    warehouse.execute(sql_text("sync_ledger_delete.sql"), day)
    warehouse.execute(sql_text("sync_ledger_insert.sql"), result.model_dump())
    return result


def record_failure(warehouse: Warehouse, failed: TableResult) -> None:
    """Record a failed run in the ledger: as the day's row when no run of the day succeeded;
    otherwise as the succeeded row's error and failed_at, its status and figures kept.

    The failed run rolled back (DuckDB; on BigQuery its current tables are untouched too), so
    the warehouse still holds what the succeeded run wrote: marking the day failed would make
    the feature build and a backfill refuse a day whose data is good.
    """
    day = {"table_name": failed.table_name, "as_of": failed.as_of}
    held = warehouse.query_arrow(sql_text("sync_ledger_day_status.sql"), day).to_pylist()
    if any(r["status"] == "succeeded" for r in held):
        attempt = {**day, "error": failed.error, "failed_at": failed.failed_at}
        warehouse.execute(sql_text("sync_ledger_failed_rerun.sql"), attempt)
    else:
        write_ledger(warehouse, failed)


def day_deleted(earlier: list[int | None], result: TableResult) -> int | None:
    """The rows a day's runs deleted: the earlier runs' count plus this run's.

    A rerun deletes only what has gone from the source since; what an earlier run deleted stays
    deleted (a failed run deletes nothing: it rolls back). The ledger keeps one row per table
    and day, so the rerun's own count alone (often 0) would erase the deletion from the record.
    """
    counted = [n for n in [*earlier, result.rows_deleted] if n is not None]
    return sum(counted) if counted else None


def utc_now() -> datetime:
    """The sync's clock (one place, so that a test can move it)."""
    return datetime.now(UTC)


def ahead_warning(spec: TableSpec, snapshot: Any, now: datetime) -> str | None:
    """A warning when source rows changed more than AHEAD_GRACE after `now` (the sync's clock).

    Such a row is after this window's end like any row changed since the day ended, and is read
    by the window of the day its change time falls in, not before: read now, its future version
    would outrank (newer wins) the real updates that come before that time, and it would land in
    the wrong day's history. But a time far ahead is probably wrong ('infinity', a mistyped
    year), and such a row would wait for years unseen, so the sync says so while it waits.
    """
    if spec.mode != "incremental":
        return None
    found = snapshot.ahead(spec, now + AHEAD_GRACE)
    if not found.rows:
        return None
    rows = "1 source row has" if found.rows == 1 else f"{found.rows} source rows have"
    times = (
        found.earliest if found.earliest == found.latest else f"{found.earliest} to {found.latest}"
    )
    return (
        f"{rows} an {spec.cursor} ahead of the sync's clock ({times}; now {now:%Y-%m-%d %H:%M}"
        f" UTC): each is read by the sync of the day its {spec.cursor} falls in, not before. A"
        " source clock ahead of the sync's, or a wrong value: fix it at the source (a current"
        f" {spec.cursor}) and the next sync reads the row"
    )


def refuse_unended(as_of: date) -> datetime:
    """The end of `as_of` in UTC (the window's end); SyncError while that day has not ended.

    A window ending in the future would be read again by nobody: the next as_of starts at its
    end, so rows changed later that day would never reach the warehouse.
    """
    end = day_end_utc(as_of)  # once: each call reads the settings for the time zone
    if end > utc_now():
        raise SyncError(
            f"as_of {as_of} has not ended yet in the business time zone; sync it tomorrow"
        )
    return end


def sync_table(
    source: Source, warehouse: Warehouse, spec: TableSpec, as_of: date, reread: bool = False
) -> TableResult:
    """Sync one table for one as_of; on failure roll back, record the failure (see
    record_failure), and raise.

    `reread`: read an incremental table's whole history up to as_of's watermark, replace the
    current table's versions of its keys with it and delete the rows whose key the source no
    longer holds (counted in rows_deleted, whatever the deletes policy), in the one transaction
    (a full table is always replaced whole): for rows deleted at the source before the check
    band, or a copy that went wrong. A row changed after the watermark, which the history lacks,
    keeps its held version until a later window reads it. Its checks are a first sync's (the
    whole table); with keep_changes the whole history lands in as_of's partition.
    """
    started = time.monotonic()
    watermark_to = refuse_unended(as_of)
    if isinstance(warehouse, BigQueryWarehouse):
        # Before any statement: a left transaction would block (or queue) the ledger's DML.
        warehouse.end_left_sessions()
    ensure_ledger(warehouse)
    rebuild = rebuilds(warehouse, spec)
    start = None if reread else window_start(warehouse, spec, as_of)
    window = Window(start, watermark_to)

    def result(status: Literal["succeeded", "failed"], counts: _Counts | None, error: str | None):
        finished = datetime.now(UTC)
        return TableResult(
            table_name=spec.name,
            as_of=as_of,
            mode=spec.mode,
            watermark_from=window.start,
            watermark_to=window.end,
            rows_extracted=counts.extracted if counts else None,
            rows_loaded=counts.loaded if counts else None,
            warehouse_rows=counts.warehouse if counts else None,
            rows_deleted=counts.deleted if counts else None,
            warning=counts.warning if counts else None,
            duration_seconds=round(time.monotonic() - started, 3),
            status=status,
            error=error,
            reread=reread,
            finished_at=finished,
            failed_at=finished if status == "failed" else None,
        )

    stream = None
    created: list[str] = []
    try:
        if rebuild:
            drop_unvouched_changes(cast(BigQueryWarehouse, warehouse), spec)
        # A table the rebuild writes is the run's own, dropped if it fails after writing it; one
        # already there is never dropped (it may hold rows loaded by other means than the sync).
        written = [spec.name] if rebuild and not warehouse.table_exists(spec.name) else []
        missing = check_held_columns(warehouse, spec, rebuild)
        # Exited in reverse order: the scratch table goes after the transaction has ended.
        with (
            source_keys_dropped(warehouse, spec),
            source.snapshot() as snapshot,
            warehouse.transaction(bulk=True),
        ):
            created = [*written, *missing]
            create_tables(warehouse, spec, missing)
            # The counts may still be running: the read is sized by their estimate, and the
            # checks below wait for the figures before anything commits.
            source_counts = snapshot.counts(spec, window, band_start(spec, window))
            stream = snapshot.read(spec, window, source_counts.estimate)
            if spec.mode == "incremental":
                counts = load_incremental(
                    warehouse,
                    spec,
                    as_of,
                    stream,
                    source_counts,
                    lambda: snapshot.keys(spec),
                    reread,
                    rebuild,
                )
            else:
                counts = load_full(warehouse, spec, stream, source_counts)
            counts.warning = ahead_warning(spec, snapshot, utc_now())
            done = write_ledger(warehouse, result("succeeded", counts, None))
        return done
    except Exception as exc:
        # A failed extract reaches us wrapped by the warehouse that was reading it; its own error
        # (the source connection lost, a statement timeout) is the cause, and what decides
        # whether the task is retried.
        cause = (stream.failure() if stream is not None else None) or exc
        # A server timeout, wherever it struck (a count, the read), is no lost session.
        timed_out = server_timeout(stream.error if stream and stream.error else cause, spec.name)
        cause = timed_out or server_timeout(exc, spec.name) or cause
        cause = revalidated(source, spec, cause)
        message = f"{type(cause).__name__}: {cause}".splitlines()[0]
        drop_created(warehouse, spec, created)
        # If the warehouse itself is gone the ledger cannot be written; the raised error says why.
        with contextlib.suppress(Exception):
            record_failure(warehouse, result("failed", None, message))
        if cause is not exc:
            # Its cause stays the driver's error; the warehouse's wrapper is the context.
            raise cause  # noqa: B904
        raise


def revalidated(source: Source, spec: TableSpec, cause: Exception) -> Exception:
    """The error to report for a failed sync: the ConfigError validation gives now (its cause
    the driver's error), when the source no longer holds the table or a column `spec` reads
    (dropped or renamed since the flow validated it); `cause` otherwise.

    Only a driver's own error is checked again, which names a missing relation in the words of
    whichever statement met it; the sync's errors already say what is wrong.
    """
    if isinstance(cause, SyncError | WarehouseError):
        return cause
    try:
        validate_tables(source, [spec])
    except ConfigError as changed:
        changed.__cause__ = cause
        return changed
    except Exception:  # the catalogue unreadable too (the connection lost): the cause stands
        return cause
    return cause


def sync_one(spec: TableSpec, as_of: date, reread: bool = False) -> TableResult:
    """Open the configured source and warehouse, and sync one (validated) table (`reread`: see
    sync_table)."""
    settings = get_settings()
    source = open_source(settings.source, settings.sync_readers)
    try:
        warehouse = open_warehouse(settings.warehouse)
        try:
            return sync_table(source, warehouse, spec, as_of, reread)
        finally:
            warehouse.close()
    finally:
        source.close()


def validate_configured_tables() -> list[TableSpec]:
    """Parse the configuration, check it against the source and the warehouse URL; write nothing."""
    settings = get_settings()
    specs = configured_tables()
    warehouse_kind = settings.warehouse.partition("://")[0]
    if warehouse_kind not in ("duckdb", "bigquery"):
        raise WarehouseError(
            f"warehouse URL {redact(settings.warehouse)!r} is of unknown kind {warehouse_kind!r}: "
            "use duckdb:///path or bigquery://project/dataset"
        )
    source = open_source(settings.source)
    try:
        return validate_tables(source, specs)
    finally:
        source.close()


def _ledger_rows(warehouse: Warehouse, as_of: date) -> dict[str, dict[str, Any]]:
    """Ledger rows of one as_of by table name (empty when the ledger does not exist yet)."""
    if not warehouse.table_exists(LEDGER):
        return {}
    rows = warehouse.query_arrow(sql_text("sync_ledger_for_day.sql"), {"as_of": as_of})
    return {r["table_name"]: r for r in rows.to_pylist()}


@dataclass(frozen=True)
class LedgerGap:
    """A configured table the ledger does not show succeeded for a day."""

    table: str
    status: str | None = None  # None: no row, the table not synced that day
    error: str | None = None

    def __str__(self) -> str:
        if self.status is None:
            return f"{self.table} (not synced)"
        return f"{self.table} ({self.status}: {self.error})"

    def said_in(self, text: str) -> bool:
        """Whether `text` (a failed sync's error) already says this table's error: the ledger
        records it as `Type: message`, the flow's error quotes the message."""
        if not self.error:
            return False
        return self.error in text or self.error.partition(": ")[2] in text


def ledger_gaps(warehouse: Warehouse, as_of: date) -> list[LedgerGap]:
    """The configured tables the ledger does not show succeeded for `as_of`, in order."""
    return _gaps(_ledger_rows(warehouse, as_of))


def _gaps(rows: dict[str, dict[str, Any]]) -> list[LedgerGap]:
    """The configured tables a day's ledger rows (by table) do not show succeeded, in order."""
    gaps = []
    for spec in configured_tables():
        row = rows.get(spec.name)
        if row is None:
            gaps.append(LedgerGap(spec.name))
        elif row["status"] != "succeeded":
            gaps.append(LedgerGap(spec.name, row["status"], row["error"]))
    return gaps


def incomplete(as_of: date, gaps: list[LedgerGap]) -> SyncIncomplete:
    """The error naming the gaps of `as_of`'s ledger."""
    return SyncIncomplete(f"sync for as_of {as_of} is incomplete: {'; '.join(map(str, gaps))}")


def check_ledger(warehouse: Warehouse, as_of: date) -> None:
    """Raise SyncIncomplete unless every configured table succeeded for `as_of`."""
    gaps = ledger_gaps(warehouse, as_of)
    if gaps:
        raise incomplete(as_of, gaps)


def ledger_watermark(warehouse: Warehouse, as_of: date) -> datetime:
    """The watermark_to of `as_of` (every table shares it); SyncIncomplete if not synced."""
    rows = _ledger_rows(warehouse, as_of)  # read once for the check and the watermark
    gaps = _gaps(rows)
    if gaps:
        raise incomplete(as_of, gaps)
    watermarks = {r["watermark_to"] for r in rows.values() if r["status"] == "succeeded"}
    if not watermarks:
        raise SyncIncomplete(f"sync for as_of {as_of}: no table has a watermark")
    return max(watermarks).astimezone(UTC)


# --- Prefect tasks (the logic above knows nothing of Prefect) ---


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the database was unreachable or dropped the connection, not bad config."""
    if isinstance(exc, SourceUnavailable):
        return True
    if isinstance(exc, SyncError | WarehouseError):
        return False
    named = server_timeout(exc, "a table")  # the driver's own error, before sync_table named it
    if named is not None:
        return isinstance(named, SourceUnavailable)  # a lock may be released; a limit stays
    names = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, ConnectionError | TimeoutError) or "OperationalError" in names


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry_condition_fn: retry only transient errors."""
    try:
        state.result()
    except BaseException as exc:
        return is_transient(exc)
    return False


@task(
    name="validate-sync-config",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=retry_transient,
)
def validate_sync_config() -> list[TableSpec]:
    """Check the table configuration against the source before anything is written."""
    return validate_configured_tables()


@task(
    name="sync-table",
    task_run_name="sync-{spec.name}-{as_of}",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=retry_transient,
)
def sync_table_task(spec: TableSpec, as_of: date, reread: bool = False) -> TableResult:
    """Sync one configured table for one as_of (`reread`: its whole history, see sync_table)."""
    return sync_one(spec, as_of, reread)


def sync_report(as_of: date, states: list[Any], names: list[str] | None = None) -> SyncReport:
    """Collect the table tasks' results; raise a SyncError naming every table that failed.

    A cause several failed tables share (the warehouse locked by another process) is said once,
    followed by the tables it stopped (`names`: the tables of `states`, in order), instead of once
    per table.
    """
    results: list[Any] = []
    failed: dict[str, list[str]] = {}
    for i, state in enumerate(states):
        outcome = state.result(raise_on_failure=False)
        if isinstance(outcome, BaseException):
            message = str(outcome).splitlines()[0] if str(outcome) else repr(outcome)
            failed.setdefault(message, []).append(names[i] if names else f"table {i + 1}")
        else:
            results.append(outcome)
    if failed:
        said = [
            message
            if len(tables) == 1
            else f"{message} ({len(tables)} tables: {', '.join(tables)})"
            for message, tables in failed.items()
        ]
        raise SyncError(f"daily sync for as_of {as_of} failed: {'; '.join(said)}")
    return SyncReport(as_of=as_of, tables=results)
