"""DuckDB warehouse (embedded default): BigQuery SQL is transpiled with sqlglot before it runs."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import sqlglot

# sqlglot loads a dialect at its first use (about half a second); load both with the adapter so
# the first statement of a sync does not pay for it.
import sqlglot.dialects.bigquery
import sqlglot.dialects.duckdb

from paylater.identifiers import check_identifier as plain_identifier
from paylater.redaction import redact
from tasks.warehouse.base import WarehouseError

# DuckDB's column types of the sync's type names (tasks.sync_config.ARROW_TYPES).
_TYPE_NAMES = {
    "BIGINT": "int64",
    "DOUBLE": "float64",
    "BOOLEAN": "bool",
    "VARCHAR": "string",
    "DATE": "date",
    "TIMESTAMP WITH TIME ZONE": "timestamp",
}
# DuckDB logs a commit to its write-ahead log unless the log would pass checkpoint_threshold
# (16 MB by default); past it, it checkpoints into the database file at once instead. A bulk
# transaction commits under this lower threshold, so that a sync's load is written once rather
# than to the log and again by the checkpoint on close: a 10M-row table's day (110k rows) spends
# ~105 ms on commit and close instead of ~160 ms. Only bulk ones: for many medium commits in a
# row (a day's app events each) a checkpoint per commit costs more than logging them.
BULK_CHECKPOINT_THRESHOLD = "1MiB"


def check_identifier(name: str, what: str = "warehouse table or column name") -> str:
    """Reject anything but a plain identifier before it is spliced into SQL."""
    return plain_identifier(name, what, WarehouseError)


@lru_cache(maxsize=256)
def transpile(sql: str) -> str:
    """BigQuery Standard SQL -> DuckDB SQL (all statements)."""
    try:
        statements = sqlglot.transpile(sql, read="bigquery", write="duckdb")
    except sqlglot.errors.ParseError as exc:
        raise WarehouseError(f"SQL does not parse as BigQuery Standard SQL: {exc}") from exc
    return ";\n".join(statements)


class DuckDBWarehouse:
    """A DuckDB file (or :memory:) as the warehouse."""

    dialect = "duckdb"

    def __init__(self, path: str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.conn = duckdb.connect(path)
        self.conn.execute("SET TimeZone = 'UTC'")
        self._in_transaction = False

    @classmethod
    def from_url(cls, url: str) -> DuckDBWarehouse:
        """duckdb:///abs/path.duckdb, duckdb://rel/path.duckdb or duckdb:///:memory:."""
        path = url.removeprefix("duckdb://")
        if path.startswith("/:memory:") or path == ":memory:":
            path = ":memory:"
        if not path:
            raise WarehouseError(f"warehouse URL {redact(url)!r} names no file")
        return cls(path)

    def query_arrow(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        """Run BigQuery SQL on DuckDB and return Arrow (the relation API: no extra copy)."""
        relation = self.conn.sql(transpile(sql), params=dict(params or {}))
        if relation is None:
            raise WarehouseError("query_arrow was given a statement that returns no rows")
        return relation.to_arrow_table()

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        """Run BigQuery SQL statements on DuckDB."""
        self.conn.execute(transpile(sql), dict(params or {}))

    def table_exists(self, table: str) -> bool:
        """Whether `table` exists in the main schema."""
        rows = self.conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]
        ).fetchall()  # fetchall: DuckDB 2 keeps a half-read result open and refuses other work
        return bool(rows and rows[0][0])

    def column_types(self, table: str) -> dict[str, str] | None:
        """Columns of `table` in the main schema with the sync's type names (None: no table)."""
        rows = self.conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_catalog = current_database() AND table_schema = 'main'"
            " AND table_name = ? ORDER BY ordinal_position",
            [table],
        ).fetchall()
        return {name: _TYPE_NAMES.get(kind, kind) for name, kind in rows} or None

    @contextmanager
    def transaction(self, bulk: bool = False) -> Iterator[None]:
        """One DuckDB transaction; loads and statements inside commit together.

        `bulk`: past BULK_CHECKPOINT_THRESHOLD of changes the commit checkpoints them into the
        file instead of logging them (see there). Inside a transaction already, the outer one
        decides.
        """
        if self._in_transaction:
            yield
            return
        self.conn.execute("BEGIN")
        self._in_transaction = True
        try:
            yield
        except BaseException:
            self._in_transaction = False
            self.conn.execute("ROLLBACK")
            raise
        self._in_transaction = False
        if not bulk:
            self.conn.execute("COMMIT")
            return
        self.conn.execute(f"SET checkpoint_threshold = '{BULK_CHECKPOINT_THRESHOLD}'")
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):  # the commit's error is the one to raise
                self.conn.execute("RESET checkpoint_threshold")
            raise
        self.conn.execute("RESET checkpoint_threshold")

    @contextmanager
    def _incoming(self, data: pa.Table | pa.RecordBatchReader) -> Iterator[str]:
        """Expose Arrow data (a reader streams: DuckDB writes while it is still produced)."""
        self.conn.register("_incoming", data)
        try:
            yield "_incoming"
        except BaseException:
            # A failed load (the stream raised, say) aborts the transaction, which then refuses
            # even this until its rollback: the load's own error is the one to raise.
            with contextlib.suppress(duckdb.Error):
                self.conn.unregister("_incoming")
            raise
        self.conn.unregister("_incoming")

    def create_table_if_missing(
        self, table: str, schema: pa.Schema, partition_column: str | None = None
    ) -> None:
        """Create an empty table of this Arrow schema unless it exists."""
        check_identifier(table)
        with self._incoming(schema.empty_table()) as incoming:
            self.conn.execute(f'CREATE TABLE IF NOT EXISTS "{table}" AS SELECT * FROM {incoming}')

    def replace_table(self, table: str, data: pa.Table | pa.RecordBatchReader) -> None:
        """Replace `table` with `data` in one transaction."""
        check_identifier(table)
        with self.transaction(), self._incoming(data) as incoming:
            self.conn.execute(f'CREATE OR REPLACE TABLE "{table}" AS SELECT * FROM {incoming}')

    def replace_partition(
        self,
        table: str,
        partition_column: str,
        partition_value: date,
        data: pa.Table | pa.RecordBatchReader,
    ) -> None:
        """Delete then insert one partition in one transaction (created from `data` if missing)."""
        check_identifier(table)
        check_identifier(partition_column)
        with self.transaction():
            self.create_table_if_missing(table, data.schema, partition_column)
            self.conn.execute(
                f'DELETE FROM "{table}" WHERE "{partition_column}" = ?', [partition_value]
            )
            with self._incoming(data) as incoming:
                self.conn.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM {incoming}')

    def append(self, table: str, data: pa.Table | pa.RecordBatchReader) -> int:
        """Insert `data` into an existing table (streamed while it is produced); rows inserted."""
        check_identifier(table)
        with self.transaction(), self._incoming(data) as incoming:
            inserted = self.conn.execute(
                f'INSERT INTO "{table}" BY NAME SELECT * FROM {incoming}'
            ).fetchall()
        return int(inserted[0][0])

    @contextmanager
    def staged(
        self,
        data: pa.Table | pa.RecordBatchReader,
        in_memory_rows: int = 0,
        in_memory_bytes: int | None = None,
    ) -> Iterator[str]:
        """`data` materialised for a MERGE to read: scanned several times, unlike a reader.

        Up to `in_memory_rows` rows (a day's increment, typically) and `in_memory_bytes` bytes
        of Arrow buffers (None: no byte limit) stay an Arrow table DuckDB scans in place: no
        copy into DuckDB's format. More go into a temporary table, which spills to disk when
        large, outside the database file; dropped afterwards. The size is found by reading, not
        asked for beforehand: the batches are held until a limit, and past it they and the rest
        of the stream go to the temporary table.
        """
        if isinstance(data, pa.Table):
            data = data.to_reader()
        held: list[pa.RecordBatch] = []
        rows = size = 0
        for batch in data:
            held.append(batch)
            rows += batch.num_rows
            size += batch.nbytes
            if rows > in_memory_rows or (in_memory_bytes is not None and size > in_memory_bytes):
                break
        else:
            self.conn.register("_staged", pa.Table.from_batches(held, schema=data.schema))
            try:
                yield "_staged"
            except BaseException:
                # A failed statement aborts the transaction, which then refuses even this until
                # its rollback: the statement's own error is the one to raise.
                with contextlib.suppress(duckdb.Error):
                    self.conn.unregister("_staged")
                raise
            self.conn.unregister("_staged")
            return
        rest = pa.RecordBatchReader.from_batches(data.schema, itertools.chain(held, data))
        with self._incoming(rest) as incoming:
            self.conn.execute(f'CREATE OR REPLACE TEMP TABLE "_staged" AS SELECT * FROM {incoming}')
        try:
            yield "_staged"
        finally:
            # After a failed statement the transaction refuses everything until its rollback,
            # which drops the table anyway; the original error is the one to raise.
            with contextlib.suppress(duckdb.Error):
                self.conn.execute('DROP TABLE IF EXISTS temp."_staged"')

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()
