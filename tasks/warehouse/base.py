"""The warehouse interface: SQL is written once in BigQuery Standard SQL and bound with @params."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from datetime import date
from typing import Any, Protocol

import pyarrow as pa

from paylater.redaction import redact


class WarehouseError(RuntimeError):
    """A warehouse URL, table or statement the adapter cannot serve."""


class Warehouse(Protocol):
    """What the pipeline needs from a warehouse; every SQL string is BigQuery Standard SQL."""

    dialect: str

    def query_arrow(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        """Run a query (BigQuery SQL, @name parameters) and return its rows as Arrow."""
        ...

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        """Run a statement (BigQuery SQL, @name parameters) for its effect."""
        ...

    def table_exists(self, table: str) -> bool:
        """Whether `table` exists."""
        ...

    def column_types(self, table: str) -> dict[str, str] | None:
        """Columns of `table` -> type name (int64, float64, bool, string, date, timestamp, or the
        warehouse's own name for any other type); None when the table does not exist."""
        ...

    def replace_table(self, table: str, data: pa.Table | pa.RecordBatchReader) -> None:
        """Atomically replace `table` with `data` (created if missing)."""
        ...

    def replace_partition(
        self,
        table: str,
        partition_column: str,
        partition_value: date,
        data: pa.Table | pa.RecordBatchReader,
    ) -> None:
        """Atomically replace one date partition of `table` with `data` (table created if missing)."""
        ...

    def create_table_if_missing(
        self, table: str, schema: pa.Schema, partition_column: str | None = None
    ) -> None:
        """Create an empty `table` of this Arrow schema unless it exists (never alters one)."""
        ...

    def transaction(self, bulk: bool = False) -> AbstractContextManager[None]:
        """Statements inside commit together or not at all.

        DuckDB: loads and statements alike. BigQuery: the DML statements (a multi-statement
        transaction in a session); load jobs run on their own, each atomic per partition.
        `bulk`: the transaction carries a large load, to be written the cheapest way for one
        (DuckDB: straight into its file at commit rather than through its log first).
        """
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def open_warehouse(url: str) -> Warehouse:
    """Open the warehouse named by `url`: duckdb:///path or bigquery://project/dataset."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise WarehouseError(
            f"warehouse URL {redact(url)!r} has no scheme: use duckdb:///path or bigquery://project/dataset"
        )
    if scheme == "duckdb":
        from tasks.warehouse.duckdb import DuckDBWarehouse

        return DuckDBWarehouse.from_url(url)
    if scheme == "bigquery":
        from tasks.warehouse.bigquery import BigQueryWarehouse

        return BigQueryWarehouse.from_url(url)
    raise WarehouseError(
        f"warehouse URL {redact(url)!r} is of unknown kind {scheme!r}: use duckdb:///path or bigquery://project/dataset"
    )
