"""DuckDB adapter: BigQuery SQL in, Arrow out without an extra copy, streamed loads, transactions."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from tasks.warehouse import WarehouseError, open_warehouse
from tasks.warehouse.duckdb import DuckDBWarehouse


def open_duckdb(path: Path) -> DuckDBWarehouse:
    """The adapter open_warehouse gives for a DuckDB file (its own methods are tested too)."""
    wh = open_warehouse(f"duckdb:///{path}")
    assert isinstance(wh, DuckDBWarehouse), wh
    return wh


def test_query_arrow_uses_the_relation_path(tmp_path: Path) -> None:
    wh = open_warehouse(f"duckdb:///{tmp_path / 'w.duckdb'}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the DB-API path warns about an extra copy
        rows = wh.query_arrow("SELECT SAFE_DIVIDE(@a, 2) AS half", {"a": 3})
    assert rows.to_pylist() == [{"half": 1.5}]
    wh.close()


def test_streamed_partition_load_and_rollback(tmp_path: Path) -> None:
    wh = open_warehouse(f"duckdb:///{tmp_path / 'w.duckdb'}")
    schema = pa.schema([("id", pa.int64()), ("as_of", pa.date32())])
    day1, day2 = date(2026, 11, 20), date(2026, 11, 21)

    def reader(ids: list[int], day: date) -> pa.RecordBatchReader:
        batches = (pa.record_batch([[i], [day]], schema=schema) for i in ids)
        return pa.RecordBatchReader.from_batches(schema, batches)

    wh.replace_partition("events", "as_of", day1, reader([1, 2], day1))
    wh.replace_partition("events", "as_of", day2, reader([3], day2))
    wh.replace_partition("events", "as_of", day1, reader([4], day1))  # replaces day1 only
    assert wh.query_arrow("SELECT id FROM events ORDER BY id").column("id").to_pylist() == [3, 4]

    with pytest.raises(RuntimeError, match="boom"), wh.transaction():
        wh.replace_partition("events", "as_of", day2, reader([5, 6], day2))
        wh.execute("DELETE FROM events WHERE id = @id", {"id": 4})
        raise RuntimeError("boom")
    assert wh.query_arrow("SELECT id FROM events ORDER BY id").column("id").to_pylist() == [3, 4]

    wh.create_table_if_missing("events", pa.schema([("other", pa.string())]))  # never alters
    assert wh.query_arrow("SELECT * FROM events").column_names == ["id", "as_of"]
    wh.close()


def test_a_stream_that_fails_mid_load_reports_its_own_error(tmp_path: Path) -> None:
    wh = open_duckdb(tmp_path / "w.duckdb")
    schema = pa.schema([("id", pa.int64())])
    wh.create_table_if_missing("events", schema)

    def batches() -> Iterator[pa.RecordBatch]:
        yield pa.record_batch([[1, 2]], schema=schema)
        raise OSError("source connection lost")

    # Not "transaction is aborted" from tidying up after the failed statement.
    with pytest.raises(duckdb.Error, match="source connection lost"), wh.transaction():
        wh.append("events", pa.RecordBatchReader.from_batches(schema, batches()))
    assert wh.query_arrow("SELECT count(*) AS n FROM events").column("n").to_pylist() == [0]
    wh.append("events", pa.table({"id": [3]}))  # the connection is usable again
    assert wh.query_arrow("SELECT id FROM events").column("id").to_pylist() == [3]
    wh.close()


@pytest.mark.parametrize(("rows", "in_memory"), [(3, True), (4, False)])
def test_staged_keeps_up_to_the_limit_in_memory_and_spills_the_rest(
    tmp_path: Path, rows: int, in_memory: bool
) -> None:
    # The size is found while reading: 3 rows stay an Arrow table; a 4th sends the 3 held
    # batches and the rest of the stream into a temporary table, in order, none lost.
    wh = open_duckdb(tmp_path / "w.duckdb")
    schema = pa.schema([("id", pa.int64())])
    batches = (pa.record_batch([[i]], schema=schema) for i in range(rows))
    reader = pa.RecordBatchReader.from_batches(schema, batches)
    with wh.staged(reader, in_memory_rows=3) as staged:
        temporary = wh.query_arrow(
            f"SELECT COUNT(*) AS n FROM duckdb_tables() WHERE temporary AND table_name = '{staged}'"
        )
        ids = wh.query_arrow(f"SELECT id FROM {staged}").column("id").to_pylist()
    assert temporary.column("n").to_pylist() == [0 if in_memory else 1]
    assert ids == list(range(rows))
    assert wh.query_arrow("SELECT COUNT(*) AS n FROM duckdb_tables() WHERE temporary").column(
        "n"
    ).to_pylist() == [0]
    wh.close()


def test_staged_spills_wide_rows_past_the_byte_limit_under_the_row_limit(tmp_path: Path) -> None:
    # A row limit alone let a wide table's increment (long texts, many columns) sit in memory
    # whole: 1M rows of 2 KB is 2 GB. Past the byte limit the rest goes to a temporary table.
    wh = open_duckdb(tmp_path / "w.duckdb")
    schema = pa.schema([("id", pa.int64()), ("body", pa.string())])
    batches = [pa.record_batch([[i], ["x" * 10_000]], schema=schema) for i in range(5)]

    def staged_in_memory(limit: int | None) -> bool:
        reader = pa.RecordBatchReader.from_batches(schema, iter(batches))
        with wh.staged(reader, in_memory_rows=1000, in_memory_bytes=limit) as staged:
            found = (
                wh.query_arrow(
                    "SELECT COUNT(*) AS n FROM duckdb_tables()"
                    f" WHERE temporary AND table_name = '{staged}'"
                )
                .column("n")[0]
                .as_py()
            )
            ids = wh.query_arrow(f"SELECT id FROM {staged} ORDER BY id").column("id").to_pylist()
        assert ids == list(range(5))
        return found == 0

    assert staged_in_memory(None)
    assert staged_in_memory(100_000)
    assert not staged_in_memory(30_000)
    wh.close()


def test_a_large_bulk_commit_goes_into_the_file_not_the_log(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    wal = Path(f"{path}.wal")
    wh = open_duckdb(path)
    schema = pa.schema([("id", pa.int64()), ("note", pa.string())])
    wh.create_table_if_missing("t", schema)

    def rows(first: int, n: int) -> pa.Table:  # about 2 MB per 100k rows
        ids = list(range(first, first + n))
        return pa.table({"id": ids, "note": [f"note {i:016d}" for i in ids]}, schema=schema)

    def logged() -> int:
        return wal.stat().st_size if wal.exists() else 0

    with wh.transaction(bulk=True):
        wh.append("t", rows(0, 1))
    assert logged() > 0  # a small bulk commit is logged, and checkpointed on close
    with wh.transaction():
        wh.append("t", rows(1, 100_000))
    assert logged() > 2_000_000  # a plain one under 16 MB as well
    with wh.transaction(bulk=True):
        wh.append("t", rows(100_001, 100_000))
    assert logged() == 0  # over the bulk threshold: checkpointed at commit, with what was logged
    setting = "SELECT current_setting('checkpoint_threshold')"
    # The default again for what follows.
    assert wh.conn.execute(setting).fetchone() == duckdb.connect().execute(setting).fetchone()
    wh.close()
    reopened = open_warehouse(f"duckdb:///{path}")
    assert reopened.query_arrow("SELECT count(*) AS n FROM t").to_pylist() == [{"n": 200_001}]
    reopened.close()


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_statement_failing_on_a_staged_increment_reports_its_own_error(
    tmp_path: Path, in_memory: bool
) -> None:
    # A merge that fails on the staged rows (out of memory, a disk full, a value the target
    # cannot hold) aborts the transaction. Letting go of the staged rows must not then raise
    # "transaction is aborted" in its place: the ledger and the alert would say only that.
    wh = open_duckdb(tmp_path / "w.duckdb")
    wh.create_table_if_missing("t", pa.schema([("id", pa.int64())]))
    staged_rows = pa.table({"id": ["1", "x"]})
    limit = 10 if in_memory else 0
    with (
        pytest.raises(duckdb.ConversionException, match="'x'"),
        wh.transaction(),
        wh.staged(staged_rows, in_memory_rows=limit) as s,
    ):
        wh.execute(f"INSERT INTO t SELECT CAST(id AS INT64) FROM {s}")
    assert wh.query_arrow("SELECT COUNT(*) AS n FROM t").column("n").to_pylist() == [0]
    # The next sync on this connection stages and merges as usual.
    with wh.transaction(), wh.staged(pa.table({"id": [7]}), in_memory_rows=10) as s:
        wh.execute(f"INSERT INTO t SELECT id FROM {s}")
    assert wh.query_arrow("SELECT id FROM t").column("id").to_pylist() == [7]
    wh.close()


def test_a_table_name_ending_in_a_newline_is_refused(tmp_path: Path) -> None:
    # `^...$` let "ledger\n" through: `$` also matches before a trailing newline.
    wh = open_warehouse(f"duckdb:///{tmp_path / 'w.duckdb'}")
    try:
        with pytest.raises(
            WarehouseError,
            match=re.escape("warehouse table or column name 'ledger\\n' is not a plain SQL"),
        ):
            wh.create_table_if_missing("ledger\n", pa.schema([("id", pa.int64())]))
    finally:
        wh.close()
