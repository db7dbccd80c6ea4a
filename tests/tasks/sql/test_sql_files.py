"""Every feature SQL file parses as BigQuery Standard SQL and runs on DuckDB through the adapter."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import pyarrow as pa
import pytest
import sqlglot

from paylater.settings import Settings
from tasks import features
from tasks.warehouse.duckdb import DuckDBWarehouse

# tasks/sql also holds the sync's statements (sync_*.sql), which its own tests cover.
FEATURE_FILE = re.compile(r"^(\d+_\w+|requests_\w+|label)\.sql$")
SQL_FILES = sorted(
    p for p in features.default_sql_dir().glob("*.sql") if FEATURE_FILE.match(p.name)
)
SOURCE_DDL = Path(__file__).resolve().parents[3] / "schema" / "source_postgres.sql"
EVENTS_DDL = Path(__file__).resolve().parents[3] / "schema" / "warehouse_app_events.sql"


@pytest.fixture(scope="module")
def warehouse() -> DuckDBWarehouse:
    """Empty source tables from the project's own DDL, plus a one-row `requests` relation."""
    w = DuckDBWarehouse(":memory:")
    w.conn.execute(SOURCE_DDL.read_text())
    w.execute(EVENTS_DDL.read_text())
    w.replace_table(
        "requests",
        pa.table(
            {
                "request_id": pa.array([1], pa.int64()),
                "user_id": pa.array([1], pa.int64()),
                "request_date": pa.array([date(2026, 7, 1)], pa.date32()),
            }
        ),
    )
    return w


def test_there_are_feature_files() -> None:
    names = {p.name for p in SQL_FILES}
    assert {"requests_training.sql", "requests_scoring.sql", "label.sql"} <= names
    assert len(names) >= 8


@pytest.mark.parametrize("path", SQL_FILES, ids=lambda p: p.name)
def test_file_parses_as_bigquery_and_runs_on_duckdb(path: Path, warehouse: DuckDBWarehouse) -> None:
    sql = path.read_text()
    (tree,) = sqlglot.parse(sql, read="bigquery")
    assert isinstance(tree, sqlglot.exp.Query) and tree.named_selects
    params = features.query_params(sql, date(2026, 7, 1), Settings())
    result = warehouse.query_arrow(sql, params)
    assert result.column_names == tree.named_selects


@pytest.mark.parametrize("kind", ["training", "scoring"])
def test_assembled_query_parses_and_runs(kind: str, warehouse: DuckDBWarehouse) -> None:
    loaded = features.load_feature_sql(Settings())
    build = features.training_sql if kind == "training" else features.scoring_sql
    sql = build(loaded, {})
    sqlglot.parse_one(sql, read="bigquery")
    result = warehouse.query_arrow(sql, features.query_params(sql, date(2026, 7, 1), Settings()))
    assert result.num_rows == 0 and len(result.column_names) > 50
