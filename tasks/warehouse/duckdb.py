"""DuckDB warehouse (embedded default): BigQuery SQL is transpiled with sqlglot before it runs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import sqlglot

from tasks.warehouse.base import WarehouseError

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_identifier(name: str) -> str:
    """Reject anything but a plain identifier before it is spliced into SQL."""
    if not _IDENT.match(name):
        raise WarehouseError(f"{name!r} is not a valid table or column name")
    return name


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

    @classmethod
    def from_url(cls, url: str) -> DuckDBWarehouse:
        """duckdb:///abs/path.duckdb, duckdb://rel/path.duckdb or duckdb:///:memory:."""
        path = url.removeprefix("duckdb://")
        if path.startswith("/:memory:") or path == ":memory:":
            path = ":memory:"
        if not path:
            raise WarehouseError(f"warehouse URL {url!r} names no file")
        return cls(path)

    def query_arrow(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        """Run BigQuery SQL on DuckDB and return Arrow."""
        return self.conn.execute(transpile(sql), dict(params or {})).to_arrow_table()

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        """Run BigQuery SQL statements on DuckDB."""
        self.conn.execute(transpile(sql), dict(params or {}))

    def table_exists(self, table: str) -> bool:
        """Whether `table` exists in the main schema."""
        row = self.conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]
        ).fetchone()
        return bool(row and row[0])

    def replace_table(self, table: str, data: pa.Table) -> None:
        """Replace `table` with `data` in one transaction."""
        check_identifier(table)
        self.conn.register("_incoming", data)
        try:
            self.conn.execute("BEGIN")
            self.conn.execute(f'CREATE OR REPLACE TABLE "{table}" AS SELECT * FROM _incoming')
            self.conn.execute("COMMIT")
        except Exception:
            self.conn.execute("ROLLBACK")
            raise
        finally:
            self.conn.unregister("_incoming")

    def replace_partition(
        self, table: str, partition_column: str, partition_value: date, data: pa.Table
    ) -> None:
        """Delete then insert one partition in one transaction (created from `data` if missing)."""
        check_identifier(table)
        check_identifier(partition_column)
        self.conn.register("_incoming", data)
        try:
            self.conn.execute("BEGIN")
            if not self.table_exists(table):
                self.conn.execute(f'CREATE TABLE "{table}" AS SELECT * FROM _incoming LIMIT 0')
            self.conn.execute(
                f'DELETE FROM "{table}" WHERE "{partition_column}" = ?', [partition_value]
            )
            self.conn.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM _incoming')
            self.conn.execute("COMMIT")
        except Exception:
            self.conn.execute("ROLLBACK")
            raise
        finally:
            self.conn.unregister("_incoming")

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()
