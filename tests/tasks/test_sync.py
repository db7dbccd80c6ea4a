"""Daily sync on a real PostgreSQL and a SQLite source into DuckDB: windows, merges, idempotency,
crash recovery, count checks and configuration errors."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import adbc_driver_manager
import psycopg
import pyarrow as pa
import pytest

from tasks import extract, sync
from tasks.extract import Figures, open_source
from tasks.sync import (
    ConfigError,
    CountMismatch,
    SourceUnavailable,
    SyncIncomplete,
    check_ledger,
    configured_tables,
    ledger_watermark,
    sync_table,
    validate_configured_tables,
    validate_tables,
)
from tasks.warehouse import Warehouse, WarehouseError, open_warehouse
from tasks.warehouse.duckdb import DuckDBWarehouse

ROOT = Path(__file__).resolve().parents[2]
D1, D2, D3 = date(2026, 11, 20), date(2026, 11, 21), date(2026, 11, 22)


def utc(text: str) -> datetime:
    """A UTC instant from 'YYYY-MM-DD HH:MM'."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def user(uid: int, at: str) -> dict[str, Any]:
    """A users row updated at `at`."""
    return {
        "user_id": uid,
        "signed_up_at": utc(at),
        "birth_year": 1990,
        "prefecture": "Tokyo",
        "identity_verified_at": None,
        "status": "active",
        "updated_at": utc(at),
    }


def charge(cid: int, at: str, status: str = "outstanding", repaid: str | None = None):
    """A deferred_charges row requested (and last updated) at `at`."""
    return {
        "charge_id": cid,
        "user_id": 1,
        "requested_at": utc(at),
        "amount_jpy": 3000,
        "fee_jpy": 300,
        "due_date": date(2026, 12, 27),
        "status": status,
        "repaid_at": utc(repaid) if repaid else None,
        "days_late": 0 if repaid else None,
        "updated_at": utc(repaid or at),
    }


def txn(tid: int, at: str) -> dict[str, Any]:
    """A card_transactions row."""
    return {
        "transaction_id": tid,
        "user_id": 1,
        "authorized_at": utc(at),
        "amount_jpy": 500,
        "merchant_id": 7,
        "merchant_category": "grocery",
        "channel": "in_store",
        "status": "settled",
        "updated_at": utc(at),
    }


def topup(tid: int, at: str) -> dict[str, Any]:
    """A topups row."""
    return {
        "topup_id": tid,
        "user_id": 1,
        "topped_up_at": utc(at),
        "amount_jpy": 10000,
        "method": "bank",
        "updated_at": utc(at),
    }


class SourceDB:
    """A real source database of either kind, written with plain SQL for the tests."""

    def __init__(self, kind: str, url: str, path: Path | None = None) -> None:
        self.kind, self.url, self.path = kind, url, path
        ddl = (ROOT / f"schema/source_{kind}.sql").read_text()
        if kind == "postgres":
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(ddl)
        else:
            with sqlite3.connect(str(path)) as conn:
                conn.executescript(ddl)

    def _value(self, value: Any) -> Any:
        """SQLite stores times as ISO-8601 UTC text and dates as text."""
        if self.kind == "sqlite" and isinstance(value, datetime):
            return value.astimezone(UTC).isoformat(timespec="microseconds")
        if self.kind == "sqlite" and isinstance(value, date):
            return value.isoformat()
        return value

    def run(self, sql: str, rows: list[tuple]) -> None:
        """Execute a statement for each parameter row."""
        if self.kind == "postgres":
            with psycopg.connect(self.url, autocommit=True) as conn, conn.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), rows)
        else:
            with sqlite3.connect(str(self.path)) as db:
                db.executemany(sql, rows)

    def insert(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Insert rows (dicts with every column)."""
        columns = list(rows[0])
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        self.run(sql, [tuple(self._value(r[c]) for c in columns) for r in rows])

    def repay(self, charge_id: int, at: str) -> None:
        """The application repaying a charge: status, repaid_at and updated_at change."""
        self.run(
            "UPDATE deferred_charges SET status = 'repaid', repaid_at = ?, days_late = 3, updated_at = ? WHERE charge_id = ?",
            [(self._value(utc(at)), self._value(utc(at)), charge_id)],
        )


def seed(db: SourceDB) -> None:
    """Two days of activity (business days D1 and D2 in Tokyo: 15:00 UTC boundaries)."""
    db.insert("users", [user(1, "2026-11-19 02:00"), user(2, "2026-11-20 16:00")])
    db.insert(
        "deferred_charges",
        [
            charge(10, "2026-11-19 03:00"),
            charge(11, "2026-11-20 14:59"),
            charge(12, "2026-11-21 01:00"),
        ],
    )
    db.insert("card_transactions", [txn(100, "2026-11-19 05:00"), txn(101, "2026-11-21 05:00")])
    db.insert("topups", [topup(200, "2026-11-20 15:00")])


@pytest.fixture(params=["postgres", "sqlite"])
def source_db(request: pytest.FixtureRequest, tmp_path: Path) -> SourceDB:
    """An empty source database with the project schema: real PostgreSQL, or a SQLite file."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        return SourceDB("postgres", url)
    path = tmp_path / "source.db"
    return SourceDB("sqlite", f"sqlite:///{path}", path)


@pytest.fixture
def warehouse(tmp_path: Path) -> Iterator[Warehouse]:
    """A DuckDB warehouse file."""
    wh = open_warehouse(f"duckdb:///{tmp_path / 'wh.duckdb'}")
    yield wh
    wh.close()


def sync_all(db: SourceDB, wh: Warehouse, as_of: date) -> list[sync.TableResult]:
    """Validate the default configuration against the source and sync every table."""
    source = open_source(db.url)
    try:
        specs = validate_tables(source, configured_tables())
        return [sync_table(source, wh, spec, as_of) for spec in specs]
    finally:
        source.close()


KEY_OF = {"card_transactions": "transaction_id", "deferred_charges": "charge_id"}
"""The key of each of the two tables the delete and reread tests run on (streamed straight in,
and through a __changes partition)."""


def seeded_and_synced(pg_url: str, warehouse: Warehouse, *days: date) -> SourceDB:
    """The seeded source, synced into `warehouse` for each of `days` in turn."""
    db = SourceDB("postgres", pg_url)
    seed(db)
    for day in days:
        sync_all(db, warehouse, day)
    return db


def rows(wh: Warehouse, table: str, key: str) -> list[dict[str, Any]]:
    """A warehouse table's rows ordered by key."""
    return wh.query_arrow(f"SELECT * FROM {table} ORDER BY {key}").to_pylist()


def digest(wh: Warehouse) -> str:
    """A hash of every warehouse table's full contents (ledger without its timings)."""
    assert isinstance(wh, DuckDBWarehouse)  # its tables are listed from DuckDB's catalog
    h = hashlib.sha256()
    listed = wh.conn.execute(
        "SELECT table_name FROM information_schema.tables ORDER BY table_name"
    ).fetchall()
    for (name,) in listed:
        data = wh.query_arrow(f"SELECT * FROM {name}")
        if name == "sync_ledger":
            data = data.drop_columns(["duration_seconds", "finished_at"])
        data = data.sort_by([(c, "ascending") for c in data.column_names])
        h.update(name.encode())
        h.update(repr(data.to_pylist()).encode())
    return h.hexdigest()


def test_full_history_then_increments_bring_updates_of_old_rows(source_db, warehouse) -> None:
    seed(source_db)
    first = {r.table_name: r for r in sync_all(source_db, warehouse, D1)}
    assert first["deferred_charges"].watermark_from is None
    assert first["deferred_charges"].watermark_to == utc("2026-11-20 15:00")
    # Up to 15:00 UTC on D1: charges 10 and 11 (14:59 is inside), not 12.
    assert [r["charge_id"] for r in rows(warehouse, "deferred_charges", "charge_id")] == [10, 11]
    assert first["topups"].rows_extracted == 0  # 15:00 exactly belongs to D2

    source_db.insert("deferred_charges", [charge(13, "2026-11-21 10:00")])
    source_db.repay(10, "2026-11-21 12:00")  # an old charge repaid during D2
    second = {r.table_name: r for r in sync_all(source_db, warehouse, D2)}
    assert second["deferred_charges"].watermark_from == utc("2026-11-20 15:00")
    assert second["deferred_charges"].rows_extracted == 3  # 12, 13 new; 10 updated
    assert second["deferred_charges"].warehouse_rows == 4
    charges = {r["charge_id"]: r for r in rows(warehouse, "deferred_charges", "charge_id")}
    assert charges[10]["status"] == "repaid"
    assert charges[10]["repaid_at"] == utc("2026-11-21 12:00")
    assert charges[11]["repaid_at"] is None
    assert charges[10]["due_date"] == date(2026, 12, 27)
    assert {r["user_id"] for r in rows(warehouse, "users", "user_id")} == {1, 2}
    schema = warehouse.query_arrow("SELECT * FROM deferred_charges").schema
    assert schema.field("updated_at").type == pa.timestamp("us", tz="UTC")
    assert schema.field("due_date").type == pa.date32()
    assert schema.field("days_late").type == pa.int64()
    assert all(r.status == "succeeded" for r in second.values())
    check_ledger(warehouse, D2)
    assert ledger_watermark(warehouse, D2) == utc("2026-11-21 15:00")
    changes = warehouse.query_arrow(
        "SELECT as_of, COUNT(*) AS n FROM deferred_charges__changes GROUP BY as_of ORDER BY as_of"
    ).to_pylist()
    assert changes == [{"as_of": D1, "n": 2}, {"as_of": D2, "n": 3}]


@pytest.mark.parametrize("lost", ["dropped", "emptied"])
def test_a_warehouse_table_dropped_or_emptied_is_read_again_from_the_start(
    pg_url: str, warehouse, lost: str
) -> None:
    # The ledger still said the earlier days succeeded, so the next window started at their
    # watermark: the recreated table got one day of rows, and the count check blamed a late
    # commit (or, with no change in the band's days, passed with the history gone).
    db = seeded_and_synced(pg_url, warehouse, D1, D2)
    before = rows(warehouse, "deferred_charges", "charge_id")
    if lost == "dropped":
        warehouse.execute("DROP TABLE deferred_charges")
    else:
        warehouse.execute("DELETE FROM deferred_charges WHERE TRUE")
    third = {r.table_name: r for r in sync_all(db, warehouse, D3)}
    assert third["deferred_charges"].watermark_from is None
    assert third["deferred_charges"].rows_extracted == 3
    assert rows(warehouse, "deferred_charges", "charge_id") == before
    # A table that holds rows starts at the previous watermark, as before.
    assert third["users"].watermark_from == utc("2026-11-21 15:00")


def test_rerun_is_idempotent_and_older_as_of_never_regresses(pg_url, warehouse) -> None:
    source_db = SourceDB("postgres", pg_url)
    seed(source_db)
    sync_all(source_db, warehouse, D1)
    sync_all(source_db, warehouse, D2)
    before = digest(warehouse)
    sync_all(source_db, warehouse, D2)
    assert digest(warehouse) == before

    source_db.repay(11, "2026-11-22 01:00")
    sync_all(source_db, warehouse, D3)
    repaid = rows(warehouse, "deferred_charges", "charge_id")
    sync_all(source_db, warehouse, D2)  # a backfill of an older day after a newer one
    assert rows(warehouse, "deferred_charges", "charge_id") == repaid
    assert next(r for r in repaid if r["charge_id"] == 11)["status"] == "repaid"


def test_crash_half_way_through_a_table_then_rerun(
    source_db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(source_db)
    clean = open_warehouse(f"duckdb:///{tmp_path / 'clean.duckdb'}")
    crashed = open_warehouse(f"duckdb:///{tmp_path / 'crashed.duckdb'}")
    for wh in (clean, crashed):
        sync_all(source_db, wh, D1)
    source_db.repay(10, "2026-11-21 12:00")
    sync_all(source_db, clean, D2)

    before = digest(crashed)
    real_merge = sync.merge_changes

    def crash_after_partition(wh: Warehouse, spec, as_of: date) -> None:
        if spec.name == "deferred_charges":
            n = wh.query_arrow(
                "SELECT COUNT(*) AS n FROM deferred_charges__changes WHERE as_of = @d", {"d": as_of}
            )
            assert n.column("n")[0].as_py() == 2  # the partition was written ...
            raise OSError("killed half way")  # ... and then the process died
        real_merge(wh, spec, as_of)

    monkeypatch.setattr(sync, "merge_changes", crash_after_partition)
    with pytest.raises(OSError, match="killed half way"):
        sync_all(source_db, crashed, D2)
    ledger = crashed.query_arrow(
        "SELECT table_name, status, error FROM sync_ledger WHERE as_of = @d", {"d": D2}
    ).to_pylist()
    # Tables before it finished; it failed and its partition rolled back with it.
    failed = next(r for r in ledger if r["table_name"] == "deferred_charges")
    assert failed["status"] == "failed" and "killed half way" in failed["error"]
    assert (
        crashed.query_arrow(
            "SELECT COUNT(*) AS n FROM deferred_charges__changes WHERE as_of = @d", {"d": D2}
        )
        .column("n")[0]
        .as_py()
        == 0
    )
    with pytest.raises(SyncIncomplete, match="deferred_charges"):
        check_ledger(crashed, D2)
    assert digest(crashed) != before  # the failure is recorded ...

    monkeypatch.setattr(sync, "merge_changes", real_merge)
    sync_all(source_db, crashed, D2)
    assert digest(crashed) == digest(clean)  # ... and the rerun converges to the clean run
    clean.close()
    crashed.close()


def test_count_mismatch_fails_and_rolls_back(tmp_path, warehouse, monkeypatch) -> None:
    source_db = SourceDB("sqlite", f"sqlite:///{tmp_path / 'src.db'}", tmp_path / "src.db")
    seed(source_db)
    sync_all(source_db, warehouse, D1)
    before = rows(warehouse, "deferred_charges", "charge_id")
    source_db.insert("deferred_charges", [charge(14, "2026-11-21 03:00")])
    real = sync._with_as_of

    def lose_a_row(reader: pa.RecordBatchReader, as_of: date) -> pa.RecordBatchReader:
        """A loader that silently drops the first row of every batch."""
        return real(
            pa.RecordBatchReader.from_batches(reader.schema, (b.slice(1) for b in reader)), as_of
        )

    monkeypatch.setattr(sync, "_with_as_of", lose_a_row)
    source = open_source(source_db.url)
    charges = next(
        s for s in validate_tables(source, configured_tables()) if s.name == "deferred_charges"
    )
    with pytest.raises(CountMismatch, match="deferred_charges: loaded 1 rows but extracted 2"):
        sync_table(source, warehouse, charges, D2)
    source.close()
    assert rows(warehouse, "deferred_charges", "charge_id") == before
    status = warehouse.query_arrow(
        "SELECT status FROM sync_ledger WHERE table_name = 'deferred_charges' AND as_of = @d",
        {"d": D2},
    )
    assert status.to_pylist() == [{"status": "failed"}]


def test_full_mode_replaces_the_table(pg_url, warehouse, tmp_path, monkeypatch) -> None:
    source_db = SourceDB("postgres", pg_url)
    seed(source_db)
    config = tmp_path / "tables.yaml"
    config.write_text(
        "tables:\n  - {name: users, primary_key: user_id, mode: full, columns: "
        "{user_id: int64, status: string, signed_up_at: timestamp, updated_at: timestamp}}\n"
    )
    monkeypatch.setenv("PAYLATER_SYNC_TABLES", str(config))
    (result,) = sync_all(source_db, warehouse, D1)
    assert result.mode == "full" and result.rows_extracted == 2 and result.warehouse_rows == 2
    source_db.insert("users", [user(3, "2026-11-23 00:00")])
    (result,) = sync_all(source_db, warehouse, D1)
    assert [r["user_id"] for r in rows(warehouse, "users", "user_id")] == [1, 2, 3]
    assert warehouse.query_arrow("SELECT * FROM users").column_names == [
        "user_id",
        "status",
        "signed_up_at",
        "updated_at",
    ]
    assert not warehouse.table_exists("users__changes")


def transactions(wh: Warehouse) -> list[dict[str, Any]]:
    """card_transactions in the warehouse, by key."""
    return rows(wh, "card_transactions", "transaction_id")


@pytest.mark.parametrize("staging", ["in memory", "temporary table", "temporary table (wide)"])
def test_without_change_history_updates_crash_and_rerun(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staging: str
) -> None:
    # card_transactions is configured with keep_changes: false (streamed and merged directly).
    # A day's increment is merged from Arrow in memory; a large one (in rows, or in bytes) from
    # a temporary table.
    if staging == "temporary table":
        monkeypatch.setattr(sync, "STAGE_IN_MEMORY_ROWS", 0)
    if staging == "temporary table (wide)":
        monkeypatch.setattr(sync, "STAGE_IN_MEMORY_BYTES", 0)
    assert not next(s for s in configured_tables() if s.name == "card_transactions").keep_changes
    db = SourceDB("postgres", pg_url)
    seed(db)
    clean = open_warehouse(f"duckdb:///{tmp_path / 'clean.duckdb'}")
    crashed = open_warehouse(f"duckdb:///{tmp_path / 'crashed.duckdb'}")
    for wh in (clean, crashed):
        sync_all(db, wh, D1)
    assert [r["transaction_id"] for r in transactions(clean)] == [100]
    assert not clean.table_exists("card_transactions__changes")

    db.insert("card_transactions", [txn(102, "2026-11-21 06:00")])
    db.run(  # a refund of a transaction synced the day before
        "UPDATE card_transactions SET status = 'refunded', updated_at = ? WHERE transaction_id = 100",
        [(utc("2026-11-21 07:00"),)],
    )
    second = {r.table_name: r for r in sync_all(db, clean, D2)}["card_transactions"]
    assert (second.rows_extracted, second.rows_loaded, second.warehouse_rows) == (3, 3, 3)
    assert [(r["transaction_id"], r["status"]) for r in transactions(clean)] == [
        (100, "refunded"),
        (101, "settled"),
        (102, "settled"),
    ]
    done = digest(clean)
    sync_all(db, clean, D2)
    assert digest(clean) == done  # rerun: the same warehouse

    before = transactions(crashed)
    real_merge = sync.merge_staged

    def crash(wh: Warehouse, spec, staged: str) -> None:
        raise OSError("killed during the merge")

    monkeypatch.setattr(sync, "merge_staged", crash)
    with pytest.raises(OSError, match="killed during the merge"):
        sync_all(db, crashed, D2)
    assert transactions(crashed) == before  # rolled back with the table's transaction
    with pytest.raises(SyncIncomplete, match="card_transactions"):
        check_ledger(crashed, D2)
    monkeypatch.setattr(sync, "merge_staged", real_merge)
    sync_all(db, crashed, D2)
    assert digest(crashed) == done
    clean.close()
    crashed.close()


def test_a_row_committed_late_behind_the_watermark_fails_the_count_check(
    pg_url: str, warehouse
) -> None:
    db = SourceDB("postgres", pg_url)
    seed(db)
    sync_all(db, warehouse, D1)
    # A transaction that committed after D1's sync with a change time before its watermark: no
    # window will ever read it. The next day's band check counts it at the source.
    db.insert("card_transactions", [txn(99, "2026-11-18 09:00")])
    db.insert("card_transactions", [txn(103, "2026-11-21 08:00")])
    source = open_source(db.url)
    spec = next(
        s for s in validate_tables(source, configured_tables()) if s.name == "card_transactions"
    )
    with pytest.raises(
        CountMismatch,
        match=r"card_transactions: warehouse holds 3 rows changed since 2026-11-14 15:00 UTC,"
        r" fewer than the 4 the source holds from then to the watermark: a row committed after an earlier sync with an older change time"
        r" was never read \(rerun the as_of its change time falls in\)",
    ):
        sync_table(source, warehouse, spec, D2)
    source.close()
    assert [r["transaction_id"] for r in transactions(warehouse)] == [100]


def test_a_row_deleted_at_the_source_fails_the_count_check_saying_so(
    pg_url: str, warehouse
) -> None:
    # The sync reads changed rows, never the absence of one: a row deleted at the source stays
    # in the warehouse, and the band check finds one row too many. The error said only that the
    # count was outside a range, not how many keys were gone nor how to resolve it.
    db = SourceDB("postgres", pg_url)
    seed(db)
    sync_all(db, warehouse, D1)
    db.run("DELETE FROM card_transactions WHERE transaction_id = ?", [(100,)])
    source = open_source(db.url)
    try:
        with pytest.raises(
            CountMismatch,
            match=r"card_transactions: 1 row held in the warehouse \(e.g. transaction_id=100\) no"
            r" longer exists at the source: deleted there, and the table's deletes policy is fail\."
            r" To delete them from the warehouse with each day's load, set `deletes: propagate`"
            r" for card_transactions in the sync configuration",
        ):
            sync_table(source, warehouse, pg_spec(source, "card_transactions"), D2)
    finally:
        source.close()
    assert [r["transaction_id"] for r in transactions(warehouse)] == [100]


@pytest.mark.parametrize("keep_changes", [True, False])
def test_a_late_update_is_read_again_within_the_lookback(
    pg_url: str, warehouse, keep_changes: bool
) -> None:
    # An update committed after D1's sync with a change time before its watermark (a batch that
    # backdates updated_at, a transaction open across the sync) is in no later window. When the
    # row's previous version is in the check band too, the counts agree and the warehouse kept
    # the old version for good, every check passing. A lookback re-reads the end of the
    # previous window.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE plans (plan_id bigint PRIMARY KEY, note text,"
            " updated_at timestamptz NOT NULL)"
        )
        conn.execute(
            "INSERT INTO plans VALUES (1, 'old', '2026-11-20 10:00+00'),"
            " (2, 'kept', '2026-11-20 12:00+00')"
        )
    plain = sync.TableSpec("plans", ("plan_id",), "incremental", keep_changes=keep_changes)
    source = open_source(pg_url)
    try:
        (spec,) = validate_tables(source, [replace(plain, lookback_minutes=180)])
        sync_table(source, warehouse, spec, D1)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("UPDATE plans SET note = 'new', updated_at = '2026-11-20 14:30+00'"
                         " WHERE plan_id = 1")  # fmt: skip
        second = sync_table(source, warehouse, spec, D2)
        again = sync_table(source, warehouse, spec, D2)
    finally:
        source.close()
    assert rows(warehouse, "plans", "plan_id")[0]["note"] == "new"
    # The window started 3 hours before D1's watermark: the late row, and row 2 at its version.
    assert second.watermark_from == utc("2026-11-20 12:00")
    assert (second.rows_extracted, second.warehouse_rows) == (2, 2)
    assert again.model_dump(exclude={"duration_seconds", "finished_at"}) == second.model_dump(
        exclude={"duration_seconds", "finished_at"}
    )
    assert [r["note"] for r in rows(warehouse, "plans", "plan_id")] == ["new", "kept"]


def pg_spec(source, table: str):
    """One configured table, validated against `source`."""
    return next(s for s in validate_tables(source, configured_tables()) if s.name == table)


def source_backends(url: str) -> list[str]:
    """Queries of the other sessions connected to the source database."""
    with psycopg.connect(url, autocommit=True) as conn:
        found = conn.execute(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        ).fetchall()
    return [query for (query,) in found]


def failed_ledger_error(wh: Warehouse, table: str, as_of: date) -> str:
    """The error of a table's failed ledger row (fails unless exactly that row is there)."""
    (row,) = wh.query_arrow(
        "SELECT status, error FROM sync_ledger WHERE table_name = @t AND as_of = @d",
        {"t": table, "d": as_of},
    ).to_pylist()
    assert row["status"] == "failed"
    return str(row["error"])


def overcount(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the source counts report one row more in the window than there is; the list fills
    with the name of the thread each count ran in."""
    real = extract.pg_figures
    counted_in: list[str] = []

    def one_more(row, spec, window, band_start) -> Figures:
        counted_in.append(threading.current_thread().name)
        figures = real(row, spec, window, band_start)
        return figures._replace(in_window=figures.in_window + 1, in_band=figures.in_band + 1)

    monkeypatch.setattr(extract, "pg_figures", one_more)
    return counted_in


@pytest.mark.parametrize(
    ("table", "in_window"), [("card_transactions", 1), ("deferred_charges", 2)]
)
def test_first_sync_checks_the_count_taken_while_it_reads(
    pg_url: str, warehouse, monkeypatch: pytest.MonkeyPatch, table: str, in_window: int
) -> None:
    # A first sync counts the whole table on a connection of its own while the read goes on
    # (card_transactions streams straight into the table, deferred_charges through __changes):
    # the checks still wait for that count and roll the table back when it disagrees.
    db = SourceDB("postgres", pg_url)
    seed(db)
    real = extract.pg_figures
    counted_in = overcount(monkeypatch)
    source = open_source(db.url)
    with pytest.raises(
        CountMismatch,
        match=f"{table}: extracted {in_window} rows but the source holds {in_window + 1} in the",
    ):
        sync_table(source, warehouse, pg_spec(source, table), D1)
    source.close()
    assert counted_in == ["paylater-source-count"]
    # A first sync's tables go with its rollback.
    assert not warehouse.table_exists(table)
    assert not warehouse.table_exists(f"{table}__changes")
    assert "CountMismatch" in failed_ledger_error(warehouse, table, D1)

    monkeypatch.setattr(extract, "pg_figures", real)
    source = open_source(db.url)
    result = sync_table(source, warehouse, pg_spec(source, table), D1)
    source.close()
    assert (result.status, result.rows_extracted) == ("succeeded", in_window)
    assert result.warehouse_rows == in_window


@pytest.mark.parametrize(
    ("threshold", "thread"), [(0, "paylater-source-count"), (10**9, "MainThread")]
)
def test_an_incremental_day_counts_beside_the_read_when_its_band_is_large(
    pg_url: str, warehouse, monkeypatch: pytest.MonkeyPatch, threshold: int, thread: str
) -> None:
    # A day's counts are index ranges: taken at once when the planner puts the band under
    # BACKGROUND_COUNT_MIN_ROWS, beside the read otherwise. Either way a disagreement rolls the
    # day's merge back and leaves the first day's table as it was.
    db = SourceDB("postgres", pg_url)
    seed(db)
    source = open_source(db.url)
    sync_table(source, warehouse, pg_spec(source, "card_transactions"), D1)
    source.close()
    before = transactions(warehouse)
    db.insert("card_transactions", [txn(102, "2026-11-21 06:00")])
    monkeypatch.setattr(extract, "BACKGROUND_COUNT_MIN_ROWS", threshold)
    real = extract.pg_figures
    counted_in = overcount(monkeypatch)
    source = open_source(db.url)
    with pytest.raises(CountMismatch, match="extracted 2 rows but the source holds 3 in the"):
        sync_table(source, warehouse, pg_spec(source, "card_transactions"), D2)
    source.close()
    assert counted_in == [thread]
    assert transactions(warehouse) == before
    assert "CountMismatch" in failed_ledger_error(warehouse, "card_transactions", D2)

    monkeypatch.setattr(extract, "pg_figures", real)
    source = open_source(db.url)
    result = sync_table(source, warehouse, pg_spec(source, "card_transactions"), D2)
    source.close()
    assert (result.status, result.rows_extracted, result.warehouse_rows) == ("succeeded", 2, 3)


def test_a_failing_background_count_fails_the_table_and_closes_its_connection(
    pg_url: str, warehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = SourceDB("postgres", pg_url)
    seed(db)

    def broken(row, spec, window, band_start) -> Figures:
        row("SELECT 1 / 0 AS n", [])  # fails on the server, as a real count could
        raise AssertionError("unreachable")

    monkeypatch.setattr(extract, "pg_figures", broken)
    source = open_source(db.url)
    # The driver's own error, as the same count on the snapshot's connection would raise.
    with pytest.raises(adbc_driver_manager.Error, match="division by zero"):
        sync_table(source, warehouse, pg_spec(source, "card_transactions"), D1)
    assert len(source_backends(db.url)) == 1  # the source's own connection; the count's is closed
    source.close()
    assert "division by zero" in failed_ledger_error(warehouse, "card_transactions", D1)
    assert not warehouse.table_exists("card_transactions")  # a first sync's: rolled back
    assert not [t for t in threading.enumerate() if t.name == "paylater-source-count"]


def test_a_failed_read_does_not_wait_for_the_background_count(
    pg_url: str, warehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = SourceDB("postgres", pg_url)
    seed(db)

    counting = threading.Event()

    def slow(row, spec, window, band_start) -> Figures:
        counting.set()
        row("SELECT pg_sleep(60)::text AS n", [])
        raise AssertionError("the count should have been cancelled")

    def lost(*args, **kwargs) -> Iterator[pa.RecordBatch]:
        assert counting.wait(10)
        time.sleep(0.5)  # the count is on the server by now
        raise OSError("source connection lost")
        yield  # a generator, like the reader it replaces

    monkeypatch.setattr(extract, "pg_figures", slow)
    monkeypatch.setattr(extract, "_adbc_batches", lost)
    source = open_source(db.url)
    started = time.monotonic()
    # The stream's own error (not DuckDB's wrapper of it, nor "transaction is aborted").
    with pytest.raises(OSError, match="source connection lost"):
        sync_table(source, warehouse, pg_spec(source, "card_transactions"), D1)
    # The sleeping count was cancelled, not waited for (closing waits 30 s at most).
    assert time.monotonic() - started < 20
    assert len(source_backends(db.url)) == 1
    source.close()
    assert "source connection lost" in failed_ledger_error(warehouse, "card_transactions", D1)
    assert not [t for t in threading.enumerate() if t.name == "paylater-source-count"]


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (
            "tables:\n  - {name: loans, primary_key: id}\n",
            "table loans does not exist in the source",
        ),
        (
            "tables:\n  - {name: users, primary_key: user_id, columns: {user_id: int64, nickname: string, updated_at: timestamp}}\n",
            "column users.nickname does not exist",
        ),
        ("tables:\n  - {name: users, primary_key: uid}\n", "column users.uid does not exist"),
        ("tables:\n  - {name: users, primary_key: user_id, mode: weekly}\n", "mode 'weekly'"),
        (
            "tables:\n  - {name: 'users; drop', primary_key: user_id}\n",
            "not a plain SQL identifier",
        ),
        (
            "tables:\n  - {name: users, primary_key: user_id, keep_changes: 'no'}\n",
            "keep_changes of table users must be true or false",
        ),
        (
            "tables:\n  - {name: users, primary_key: user_id, check_days: 0}\n",
            "check_days of table users must be a whole number",
        ),
        (
            "tables:\n  - {name: users, primary_key: user_id, cursor: birth_year, columns:"
            " {user_id: int64, birth_year: int64, updated_at: timestamp}}\n",
            "cursor users.birth_year is int64, not a timestamp",
        ),
        (
            # SQLite stores times as text: unless listed as a timestamp, the cursor is a string.
            "tables:\n  - {name: users, primary_key: user_id}\n",
            "cursor users.updated_at is string, not a timestamp",
        ),
        (
            "tables:\n  - {name: users, primary_key: user_id, lookback_minutes: -30}\n",
            "lookback_minutes of table users must be a whole number of minutes >= 0",
        ),
        (
            # Without a cursor an incremental table read everything once, then failed each day
            # in the merge, which compares versions by updated_at.
            "tables:\n  - {name: users, primary_key: user_id, cursor: null}\n",
            "table users is incremental but has no cursor",
        ),
    ],
)
def test_bad_configuration_is_one_clear_error_and_writes_nothing(
    paylater_home: Path, tmp_path: Path, monkeypatch, yaml_text: str, message: str
) -> None:
    db = SourceDB("sqlite", f"sqlite:///{tmp_path / 'src.db'}", tmp_path / "src.db")
    seed(db)
    config = tmp_path / "tables.yaml"
    config.write_text(yaml_text)
    monkeypatch.setenv("PAYLATER_SYNC_TABLES", str(config))
    monkeypatch.setenv("PAYLATER_SOURCE_URL", db.url)
    with pytest.raises(ConfigError, match=message) as err:
        validate_configured_tables()
    assert "\n" not in str(err.value)
    assert not list(paylater_home.iterdir())  # no warehouse file was created


def test_a_cursor_that_is_not_a_timestamp_is_refused_before_anything_is_written(
    pg_url: str, paylater_home: Path, tmp_path: Path, monkeypatch
) -> None:
    # The window compares the cursor with timestamps: a bigint cursor would pass validation
    # and fail only in the sync, after creating the tables and a failed ledger row.
    db = SourceDB("postgres", pg_url)
    seed(db)
    config = tmp_path / "tables.yaml"
    config.write_text(
        "tables:\n  - {name: card_transactions, primary_key: transaction_id, cursor: merchant_id}\n"
    )
    monkeypatch.setenv("PAYLATER_SYNC_TABLES", str(config))
    monkeypatch.setenv("PAYLATER_SOURCE_URL", db.url)
    with pytest.raises(
        ConfigError, match=r"cursor card_transactions\.merchant_id is int64, not a timestamp"
    ) as err:
        validate_configured_tables()
    assert "\n" not in str(err.value)
    assert not list(paylater_home.iterdir())  # no warehouse file was created


def test_a_source_column_named_as_of_is_refused_before_anything_is_written(
    pg_url: str, paylater_home: Path, tmp_path: Path, monkeypatch
) -> None:
    # The change table adds its partition column as_of to the columns read: a source column of
    # that name (a snapshot date, say) was written twice and the sync failed with "loaded 0 rows
    # but extracted 1", after creating its tables.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE balances (balance_id bigint PRIMARY KEY, as_of date,"
            " updated_at timestamptz NOT NULL)"
        )
    config = tmp_path / "tables.yaml"
    config.write_text("tables:\n  - {name: balances, primary_key: balance_id}\n")
    monkeypatch.setenv("PAYLATER_SYNC_TABLES", str(config))
    monkeypatch.setenv("PAYLATER_SOURCE_URL", pg_url)
    with pytest.raises(ConfigError, match=r"column balances\.as_of has the name of the") as err:
        validate_configured_tables()
    assert "\n" not in str(err.value)
    assert not list(paylater_home.iterdir())  # no warehouse file was created
    config.write_text("tables:\n  - {name: balances, primary_key: balance_id, mode: full}\n")
    (spec,) = validate_configured_tables()  # a full table has no change table
    assert "as_of" in spec.columns


def test_a_source_column_the_sync_cannot_name_is_refused_at_validation(
    pg_url: str, paylater_home: Path, tmp_path: Path, monkeypatch
) -> None:
    # Columns taken from the catalogue were not checked as identifiers until the read quoted
    # them: the sync failed each day after creating its tables, naming only "identifier".
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            'CREATE TABLE fees (fee_id bigint PRIMARY KEY, "金額" bigint,'
            " updated_at timestamptz NOT NULL)"
        )
    config = tmp_path / "tables.yaml"
    config.write_text("tables:\n  - {name: fees, primary_key: fee_id}\n")
    monkeypatch.setenv("PAYLATER_SYNC_TABLES", str(config))
    monkeypatch.setenv("PAYLATER_SOURCE_URL", pg_url)
    with pytest.raises(
        ConfigError,
        match=r"source column fees\.金額 is not a plain SQL identifier.*list the table's",
    ):
        validate_configured_tables()
    assert not list(paylater_home.iterdir())  # no warehouse file was created
    config.write_text(
        "tables:\n  - {name: fees, primary_key: fee_id,"
        " columns: {fee_id: int64, updated_at: timestamp}}\n"
    )
    (spec,) = validate_configured_tables()  # listed without it, the table syncs
    assert list(spec.columns) == ["fee_id", "updated_at"]


def test_unreachable_database_and_unknown_warehouse(paylater_home: Path, monkeypatch) -> None:
    monkeypatch.setenv("PAYLATER_SOURCE_URL", "postgresql://sync:s3cret@127.0.0.1:1/nowhere")
    with pytest.raises(SourceUnavailable, match=r"127\.0\.0\.1:1/nowhere unreachable") as err:
        validate_configured_tables()
    assert "s3cret" not in str(err.value) and "\n" not in str(err.value)

    monkeypatch.setenv("PAYLATER_SOURCE_URL", f"sqlite:///{paylater_home / 'missing.db'}")
    with pytest.raises(SourceUnavailable, match="does not exist"):
        validate_configured_tables()
    assert not (paylater_home / "missing.db").exists()

    monkeypatch.setenv("PAYLATER_WAREHOUSE_URL", "snowflake://acct/db")
    with pytest.raises(WarehouseError, match="unknown kind 'snowflake'"):
        validate_configured_tables()


def test_default_config_agrees_with_the_postgres_catalogue(pg_url: str) -> None:
    db = SourceDB("postgres", pg_url)
    source = open_source(db.url)
    try:
        for spec in configured_tables():
            catalogue = source.column_types(spec.name)
            assert catalogue == spec.columns, spec.name
    finally:
        source.close()


def test_a_day_that_has_not_ended_is_refused(tmp_path: Path, warehouse) -> None:
    db = SourceDB("sqlite", f"sqlite:///{tmp_path / 'src.db'}", tmp_path / "src.db")
    from paylater.timeutil import today

    with pytest.raises(sync.SyncError, match="has not ended yet"):
        sync_all(db, warehouse, today())
    assert not warehouse.table_exists("sync_ledger")


def test_check_ledger_names_missing_tables(warehouse) -> None:
    with pytest.raises(
        SyncIncomplete, match=r"users \(not synced\).*deferred_charges \(not synced\)"
    ):
        check_ledger(warehouse, D1)
    with pytest.raises(SyncIncomplete):
        ledger_watermark(warehouse, D1)


SOURCE_DRIFT = {
    "added": ("ALTER TABLE plans ADD COLUMN tier text", r"tier \(string\) is not in it"),
    "removed": ("ALTER TABLE plans DROP COLUMN note", r"note \(string\) is no longer read"),
    "retyped": (
        "ALTER TABLE plans ALTER COLUMN note TYPE bigint USING 0",
        r"note is int64 now, string there",
    ),
}


@pytest.mark.parametrize("drift", sorted(SOURCE_DRIFT))
@pytest.mark.parametrize("keep_changes", [True, False])
def test_a_source_column_added_removed_or_retyped_fails_the_table_saying_which(
    pg_url: str, warehouse, drift: str, keep_changes: bool
) -> None:
    # Columns taken from the catalogue follow the source; the warehouse table keeps the ones it
    # was created with (the sync never alters it). An added column failed deep in the load with
    # DuckDB's binder error, a retyped one with a conversion error, and a removed one synced on,
    # its values NULL from then on with nothing said.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE plans (plan_id bigint PRIMARY KEY, note text,"
            " updated_at timestamptz NOT NULL)"
        )
        conn.execute("INSERT INTO plans VALUES (1, 'a', '2026-11-20 01:00+00')")
    spec = sync.TableSpec("plans", ("plan_id",), "incremental", keep_changes=keep_changes)
    source = open_source(pg_url)
    try:
        assert sync_table(source, warehouse, validate_tables(source, [spec])[0], D1).status == (
            "succeeded"
        )
        before = digest(warehouse)
        ddl, message = SOURCE_DRIFT[drift]
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(ddl)
            conn.execute("UPDATE plans SET updated_at = '2026-11-21 01:00+00'")
        (drifted,) = validate_tables(source, [spec])
        with pytest.raises(sync.SchemaMismatch, match=message) as err:
            sync_table(source, warehouse, drifted, D2)
    finally:
        source.close()
    assert "\n" not in str(err.value)
    assert "the warehouse table plans" in str(err.value)
    assert failed_ledger_error(warehouse, "plans", D2).startswith("SchemaMismatch: sync of plans")
    warehouse.execute("DELETE FROM sync_ledger WHERE as_of = @d", {"d": D2})
    assert digest(warehouse) == before  # nothing written but the failed ledger row


NULLABLE_CURSOR = {
    "postgres": "CREATE TABLE charges_loose AS SELECT * FROM deferred_charges WITH NO DATA;"
    " ALTER TABLE charges_loose ADD PRIMARY KEY (charge_id);",
    "sqlite": "CREATE TABLE charges_loose AS SELECT * FROM deferred_charges WHERE 0;",
}


@pytest.mark.parametrize("keep_changes", [True, False])
def test_rows_with_a_null_cursor_fail_the_sync_instead_of_never_arriving(
    source_db, warehouse, keep_changes: bool
) -> None:
    # A row whose change time is NULL lies in no window (NULL < end is not true): every sync
    # succeeded without it, and no check noticed, since the counts skip it as the read does.
    if source_db.kind == "postgres":
        with psycopg.connect(source_db.url, autocommit=True) as conn:
            conn.execute(NULLABLE_CURSOR["postgres"])
    else:
        with sqlite3.connect(str(source_db.path)) as conn:
            conn.executescript(NULLABLE_CURSOR["sqlite"])
    source_db.insert("charges_loose", [charge(10, "2026-11-19 03:00")])
    configured = next(s for s in configured_tables() if s.name == "deferred_charges")
    spec = sync.TableSpec(
        "charges_loose",
        ("charge_id",),
        "incremental",
        "updated_at",
        configured.columns,
        keep_changes=keep_changes,
    )
    source = open_source(source_db.url)
    try:
        (spec,) = validate_tables(source, [spec])
        assert sync_table(source, warehouse, spec, D1).status == "succeeded"
        # New rows the application wrote without a change time (a band check cannot see them:
        # the warehouse never held them).
        unstamped = [{**charge(c, "2026-11-20 16:00"), "updated_at": None} for c in (11, 12)]
        source_db.insert("charges_loose", [*unstamped, charge(13, "2026-11-20 16:00")])
        with pytest.raises(
            CountMismatch, match=r"charges_loose: 2 source rows have a NULL updated_at"
        ):
            sync_table(source, warehouse, spec, D2)
    finally:
        source.close()
    assert [r["charge_id"] for r in rows(warehouse, "charges_loose", "charge_id")] == [10]
    assert "NULL updated_at" in failed_ledger_error(warehouse, "charges_loose", D2)


def test_uuid_and_enum_columns_arrive_as_their_text(pg_url: str, warehouse) -> None:
    # The driver hands a uuid over as its 16 bytes: listed as a string, it failed the table with
    # "ArrowInvalid: Invalid UTF8 payload", and a uuid key could not be synced at all.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TYPE device_kind AS ENUM ('phone', 'tablet')")
        conn.execute(
            "CREATE TABLE devices (device_id uuid PRIMARY KEY, kind device_kind NOT NULL,"
            " label varchar(20), code char(3), updated_at timestamptz NOT NULL)"
        )
        conn.execute(
            "INSERT INTO devices VALUES"
            " ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'phone', 'ママの電話', 'ab',"
            "  '2026-11-20 01:00+00'),"
            " ('00000000-0000-0000-0000-000000000001', 'tablet', NULL, NULL, '2026-11-20 02:00+00')"
        )
    columns = {
        "device_id": "string",
        "kind": "string",
        "label": "string",
        "code": "string",
        "updated_at": "timestamp",
    }
    source = open_source(pg_url)
    try:
        # The enum's type is the source's own; the uuid is a string without being listed.
        assert source.column_types("devices") == {**columns, "kind": None}
        (spec,) = validate_tables(
            source, [sync.TableSpec("devices", ("device_id",), "incremental", columns=columns)]
        )
        assert spec.key_enforced  # the uuid primary key holds as its text
        assert sync_table(source, warehouse, spec, D1).status == "succeeded"
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE devices SET kind = 'phone', updated_at = '2026-11-21 01:00+00'"
                " WHERE device_id = '00000000-0000-0000-0000-000000000001'"
            )
        assert sync_table(source, warehouse, spec, D2).warehouse_rows == 2
    finally:
        source.close()
    # A char(n) keeps its padding, as the driver reads it (a cast to text would drop it).
    assert rows(warehouse, "devices", "device_id") == [
        {"device_id": "00000000-0000-0000-0000-000000000001", "kind": "phone", "label": None,
         "code": None, "updated_at": utc("2026-11-21 01:00")},
        {"device_id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "kind": "phone",
         "label": "ママの電話", "code": "ab ", "updated_at": utc("2026-11-20 01:00")},
    ]  # fmt: skip


@pytest.mark.parametrize("parallel", [False, True])
def test_a_time_without_zone_is_utc_whatever_the_server_zone(
    pg_url: str, warehouse, monkeypatch: pytest.MonkeyPatch, parallel: bool
) -> None:
    # A `timestamp` (without time zone) cursor holds UTC like everything else, and the read
    # types it so. The window's bounds are instants, compared with it in the session's zone: on
    # a server (or database) whose TimeZone is Asia/Tokyo the read took rows 9 hours past the
    # watermark while the counts did not, and every sync failed its count check.
    name = pg_url.rpartition("/")[2]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE \"{name}\" SET TimeZone = 'Asia/Tokyo'")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE plans (plan_id bigint PRIMARY KEY, seen_at timestamp,"
            " updated_at timestamp NOT NULL)"
        )
        conn.execute(
            "INSERT INTO plans SELECT g, '2026-11-20 14:59:59', '2026-11-20 14:59:59'"
            " FROM generate_series(1, 100) g"
        )
        conn.execute(
            "INSERT INTO plans SELECT g, '2026-11-20 15:00', '2026-11-20 15:00'"
            " FROM generate_series(101, 150) g"
        )
    if parallel:
        monkeypatch.setattr(extract, "PARALLEL_MIN_ROWS", 0)
        monkeypatch.setattr(extract, "WINDOW_PARALLEL_MIN_ROWS", 0)
    source = open_source(pg_url, readers=2)
    try:
        (spec,) = validate_tables(source, [sync.TableSpec("plans", ("plan_id",), "incremental")])
        first = sync_table(source, warehouse, spec, D1)
        second = sync_table(source, warehouse, spec, D2)
    finally:
        source.close()
    assert (first.rows_extracted, second.rows_extracted) == (100, 50)
    held = warehouse.query_arrow(
        "SELECT MIN(seen_at) AS lo, MAX(seen_at) AS hi FROM plans WHERE plan_id > 100"
    ).to_pylist()
    assert held == [{"lo": utc("2026-11-20 15:00"), "hi": utc("2026-11-20 15:00")}]


@pytest.mark.parametrize("parallel", [False, True])
def test_infinite_times_and_dates_keep_their_order(
    pg_url: str, warehouse, monkeypatch: pytest.MonkeyPatch, parallel: bool
) -> None:
    # PostgreSQL's 'infinity' and '-infinity' (an open-ended validity, say) came out of the
    # driver wrapped round to dates thousands of years BC: 'infinity' sorted before every real
    # time. They land as the extremes both warehouses can hold.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE limits (limit_id bigint PRIMARY KEY, valid_from timestamptz,"
            " valid_until timestamp, review_on date, updated_at timestamptz NOT NULL)"
        )
        conn.execute(
            "INSERT INTO limits VALUES"
            " (1, '-infinity', 'infinity', 'infinity', '2026-11-19 00:00+00'),"
            " (2, '2026-01-01 00:00+00', '2026-12-01 00:00', '-infinity', '2026-11-19 00:00+00'),"
            " (3, NULL, NULL, NULL, '2026-11-19 00:00+00')"
        )
    if parallel:
        monkeypatch.setattr(extract, "PARALLEL_MIN_ROWS", 0)
    source = open_source(pg_url, readers=2)
    spec = validate_tables(source, [sync.TableSpec("limits", ("limit_id",), "incremental")])[0]
    assert sync_table(source, warehouse, spec, D1).status == "succeeded"
    source.close()
    held = warehouse.conn.execute(
        "SELECT limit_id, valid_from::VARCHAR, valid_until::VARCHAR, review_on::VARCHAR"
        " FROM limits ORDER BY limit_id"
    ).fetchall()
    assert held == [
        (1, "0001-01-01 00:00:00+00", "9999-12-31 23:59:59.999999+00", "9999-12-31"),
        (2, "2026-01-01 00:00:00+00", "2026-12-01 00:00:00+00", "0001-01-01"),
        (3, None, None, None),
    ]


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_a_source_connection_lost_mid_read_is_a_transient_failure_with_its_cause(
    pg_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: Literal["full", "incremental"],
) -> None:
    # The server restarts (or an operator terminates the session) while the sync streams the
    # table: the driver raises OSError or ArrowInvalid inside the warehouse's read, which wraps
    # it. The task must see SourceUnavailable (retried), the ledger the real cause, and the
    # warehouse nothing of the half-read table.
    rows = 300_000  # two readers on a first read
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute((ROOT / "schema/source_postgres.sql").read_text())
        conn.execute(
            "INSERT INTO deferred_charges SELECT g, g %% 7, '2026-11-20T00:00Z', 1000 + g, 100,"
            " '2026-12-27', 'outstanding', NULL, NULL,"
            " '2026-11-20T01:00Z'::timestamptz + g * interval '1 millisecond'"
            " FROM generate_series(1, %s) g",
            [rows],
        )
    real = extract._adbc_batches
    terminated: list[int] = []

    def terminated_after_the_first_batch(cur: Any, sql: str, *args: Any) -> Iterator[Any]:
        for i, batch in enumerate(real(cur, sql, *args)):
            yield batch
            if i == 0 and "deferred_charges" in sql and not terminated:
                with psycopg.connect(pg_url, autocommit=True) as admin:
                    killed = admin.execute(
                        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        " AND query ILIKE 'COPY%%'"
                    ).fetchall()
                terminated.extend(pid for pid, _ in killed)

    monkeypatch.setattr(extract, "_adbc_batches", terminated_after_the_first_batch)
    source = open_source(pg_url)
    warehouse = open_warehouse(f"duckdb:///{tmp_path / 'w.duckdb'}")
    spec = next(
        s for s in validate_tables(source, configured_tables()) if s.name == "deferred_charges"
    )
    from dataclasses import replace

    threads = ours()
    with pytest.raises(SourceUnavailable, match="source connection lost during the read") as failed:
        sync_table(source, warehouse, replace(spec, mode=mode), D1)
    assert sync.is_transient(failed.value) and terminated
    # The driver's words for the lost session, or (a reader still connecting when the session
    # went) the server's for the snapshot it could no longer join.
    assert any(
        words in str(failed.value)
        for words in ("terminat", "closed the connection", "ended before a reader joined it")
    )
    ledger = warehouse.query_arrow("SELECT status, error FROM sync_ledger").to_pylist()
    assert ledger == [{"status": "failed", "error": f"SourceUnavailable: {failed.value}"}]
    assert not warehouse.table_exists("deferred_charges")  # a first sync's: rolled back
    warehouse.close()
    source.close()
    deadline = time.monotonic() + 10
    while ours() != threads and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ours() == threads  # every reader thread has ended


def ours() -> set[str]:
    """Threads this process started (not DuckDB's own, which Python lists once they call it)."""
    return {t.name for t in threading.enumerate() if type(t).__name__ != "_DummyThread"}


def test_sync_report_says_a_shared_cause_once() -> None:
    """Every table stopped by one cause (a warehouse locked by another process) is one line with
    the count, not the same sentence four times; causes of their own stay one per table."""
    from prefect.states import Failed, State

    from tasks.sync import SyncError, sync_report

    locked = SyncError("warehouse file is locked by another process")
    own = SyncError("sync of topups: extracted 3, source holds 4")
    states: list[State[Any]] = [
        Failed(data=locked),
        Failed(data=locked),
        Failed(data=own),
        Failed(data=locked),
    ]
    names = ["users", "card_transactions", "topups", "deferred_charges"]
    with pytest.raises(SyncError) as caught:
        sync_report(date(2026, 11, 20), states, names)
    assert str(caught.value) == (
        "daily sync for as_of 2026-11-20 failed: warehouse file is locked by another process"
        " (3 tables: users, card_transactions, deferred_charges);"
        " sync of topups: extracted 3, source holds 4"
    )


@pytest.mark.postgres
@pytest.mark.parametrize("first", [True, False])
def test_a_statement_timeout_fails_the_table_naming_the_setting_and_is_not_retried(
    pg_url: str, warehouse, first: bool
) -> None:
    # A source query cancelled by PostgreSQL's statement_timeout was taken for a lost session
    # (SourceUnavailable, or the driver's OperationalError from a count): the task retried it,
    # timing out again twice and burning the sync's window. Each query here sleeps 0.5 s per row
    # against a 100 ms timeout: the first sync's count and read, or a later day's read.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE plans (plan_id bigint PRIMARY KEY, note text,"
            " updated_at timestamptz NOT NULL)"
        )
        conn.execute(
            "INSERT INTO plans VALUES (1, 'a', '2026-11-20 10:00+00'), (2, 'b', '2026-11-21 10:00+00')"
        )
        conn.execute(
            "CREATE VIEW slow_plans AS SELECT p.* FROM plans p CROSS JOIN LATERAL"
            " (SELECT pg_sleep(CASE WHEN current_setting('statement_timeout') = '0' THEN 0"
            " ELSE 0.5 END)) AS s"
        )
    source = open_source(pg_url)
    try:
        (spec,) = validate_tables(
            source, [sync.TableSpec("slow_plans", ("plan_id",), "incremental")]
        )
        if not first:
            sync_table(source, warehouse, spec, D1)  # no timeout yet
    finally:
        source.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {pg_url.rpartition('/')[2]} SET statement_timeout = '100ms'")
    source = open_source(pg_url)
    try:
        with pytest.raises(sync.SourceTimeout, match=r"statement_timeout") as failed:
            sync_table(source, warehouse, spec, D2 if not first else D1)
    finally:
        source.close()
    assert not sync.is_transient(failed.value)
    assert "canceling statement due to statement timeout" in str(failed.value)
    error = failed_ledger_error(warehouse, "slow_plans", D2 if not first else D1)
    assert error.startswith("SourceTimeout:") and "statement_timeout" in error


@pytest.mark.postgres
def test_a_lock_timeout_fails_the_table_naming_the_setting_and_is_retried(
    pg_url: str, warehouse
) -> None:
    # A source query cancelled by PostgreSQL's lock_timeout (another session holding a lock on
    # the table: a migration, a VACUUM FULL) was reported as the driver's raw error and not
    # retried from a count, or as a lost connection from the read. The holder may let go, so it
    # is retried, under a message that names the setting and the way to find the holder.
    db = SourceDB("postgres", pg_url)
    seed(db)
    source = open_source(pg_url)
    try:
        spec = pg_spec(source, "topups")
    finally:
        source.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {pg_url.rpartition('/')[2]} SET lock_timeout = '100ms'")
    source = open_source(pg_url)
    try:
        with psycopg.connect(pg_url) as holder:
            holder.execute("LOCK TABLE topups IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(sync.SourceLocked, match=r"lock_timeout") as failed:
                sync_table(source, warehouse, spec, D1)
            holder.rollback()
        assert sync.is_transient(failed.value)
        assert "canceling statement due to lock timeout" in str(failed.value)
        error = failed_ledger_error(warehouse, "topups", D1)
        assert error.startswith("SourceLocked:") and "lock_timeout" in error
        assert sync_table(source, warehouse, spec, D1).status == "succeeded"  # the retry
    finally:
        source.close()


@pytest.mark.postgres
def test_the_sync_sessions_outlive_an_idle_in_transaction_timeout(
    pg_url: str, warehouse, monkeypatch
) -> None:
    # The driver keeps each source session in an open transaction between statements (the
    # snapshot's, or the one it opens after a commit), idle while the readers and the warehouse
    # work. A database-wide idle_in_transaction_session_timeout shorter than such a pause killed
    # the session, and the pinned driver then aborted the whole process at its next statement.
    db = SourceDB("postgres", pg_url)
    seed(db)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            f"ALTER DATABASE {pg_url.rpartition('/')[2]}"
            " SET idle_in_transaction_session_timeout = '100ms'"
        )
    held, band = sync.check_held_columns, sync.check_band

    def pause_then(step):
        def paused(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.5)  # a slow warehouse call, longer than the timeout
            return step(*args, **kwargs)

        return paused

    monkeypatch.setattr(sync, "check_held_columns", pause_then(held))  # before the snapshot
    monkeypatch.setattr(sync, "check_band", pause_then(band))  # inside it
    source = open_source(pg_url)
    try:
        spec = pg_spec(source, "deferred_charges")
        first = sync_table(source, warehouse, spec, D1)
        second = sync_table(source, warehouse, spec, D2)
    finally:
        source.close()
    assert (first.status, second.status) == ("succeeded", "succeeded")


def test_an_idle_in_transaction_kill_is_named_and_not_retried(pg_url: str) -> None:
    # Should a session be killed anyway (the setting reapplied by a pooler), the server's
    # FATAL is no lost connection to retry: the same pause would meet the same limit.
    with psycopg.connect(pg_url) as conn:
        conn.execute("SET idle_in_transaction_session_timeout = '100ms'")
        time.sleep(0.5)
        with pytest.raises(psycopg.Error) as killed:
            conn.execute("SELECT 1")
    assert "idle-in-transaction timeout" in str(killed.value)
    assert not sync.is_transient(killed.value)
    named = sync.server_timeout(killed.value, "topups")
    assert isinstance(named, sync.SourceTimeout)
    assert "idle_in_transaction_session_timeout" in str(named)


def propagating(source, table: str):
    """One configured table, validated, with deletes: propagate."""
    return replace(pg_spec(source, table), deletes="propagate")


@pytest.mark.parametrize("table", ["card_transactions", "deferred_charges"])
def test_deletes_propagate_removes_the_gone_rows_with_the_day_load(
    pg_url: str, warehouse, table: str
) -> None:
    # card_transactions streams straight in (no change history), deferred_charges goes through
    # its __changes partition: both delete, in the day's transaction, the rows whose key is gone.
    db = seeded_and_synced(pg_url, warehouse, D1)
    key = KEY_OF[table]
    gone = {"card_transactions": 100, "deferred_charges": 10}[table]
    db.run(f"DELETE FROM {table} WHERE {key} = ?", [(gone,)])
    source = open_source(db.url)
    try:
        spec = propagating(source, table)
        second = sync_table(source, warehouse, spec, D2)
        held = [r[key] for r in rows(warehouse, table, key)]
        again = sync_table(source, warehouse, spec, D2)  # a rerun: nothing left to delete
    finally:
        source.close()
    assert gone not in held and held == [r[key] for r in rows(warehouse, table, key)]
    assert (second.status, second.rows_deleted) == ("succeeded", 1)
    assert second.warehouse_rows == len(held)
    # The rerun deleted nothing, but the day did delete a row: its ledger row still says so (it
    # said 0, overwriting the first run's count, as if nothing had ever been deleted).
    assert again.rows_deleted == 1 and ledger_deleted(warehouse, table, D2) == 1
    if table == "deferred_charges":  # the history of what was read keeps the deleted row
        assert gone in [r[key] for r in rows(warehouse, f"{table}__changes", key)]


def ledger_deleted(wh: Warehouse, table: str, as_of: date) -> int | None:
    """The rows_deleted of a table's one ledger row for `as_of`."""
    (row,) = wh.query_arrow(
        "SELECT rows_deleted FROM sync_ledger WHERE table_name = @t AND as_of = @d",
        {"t": table, "d": as_of},
    ).to_pylist()
    return row["rows_deleted"]


def broken(*args: Any) -> None:
    """A step that fails (a warehouse or source gone mid-transaction)."""
    raise OSError("gone")


def test_reruns_of_a_day_add_up_the_rows_it_deleted(pg_url: str, warehouse, monkeypatch) -> None:
    # Each run of a day deletes what is gone by then, and what an earlier run deleted stays
    # deleted: the day's ledger row counts them all, through a failed rerun too (it deleted
    # nothing, rolled back, and the earlier deletion still stands).
    db = SourceDB("postgres", pg_url)
    seed(db)
    sync_all(db, warehouse, D1)
    source = open_source(db.url)
    try:
        spec = propagating(source, "card_transactions")
        db.run("DELETE FROM card_transactions WHERE transaction_id = ?", [(100,)])
        assert sync_table(source, warehouse, spec, D2).rows_deleted == 1
        db.run("DELETE FROM card_transactions WHERE transaction_id = ?", [(101,)])
        assert sync_table(source, warehouse, spec, D2).rows_deleted == 2
        db.run("DELETE FROM card_transactions WHERE transaction_id = ?", [(102,)])  # none such
        monkeypatch.setattr(sync, "ahead_warning", broken)  # after the deletion, in the transaction
        with pytest.raises(OSError, match="gone"):
            sync_table(source, warehouse, spec, D2)
    finally:
        source.close()
    assert ledger_deleted(warehouse, "card_transactions", D2) == 2
    # The day stays succeeded (the failed rerun rolled back), the attempt recorded on its row.
    day = ledger_row(warehouse, "card_transactions", D2)
    assert (day["status"], day["error"]) == ("succeeded", "OSError: gone")
    assert ledger_deleted(warehouse, "card_transactions", D1) is None  # deletes: fail then


def test_deletes_propagate_rolls_back_with_a_failed_check(pg_url: str, warehouse) -> None:
    # The deletion is part of the day's transaction: a check failing after it (a row committed
    # late behind the watermark) leaves the deleted row held, as if the day had not run.
    db = SourceDB("postgres", pg_url)
    seed(db)
    sync_all(db, warehouse, D1)
    db.run("DELETE FROM card_transactions WHERE transaction_id = ?", [(100,)])
    db.insert("card_transactions", [txn(99, "2026-11-18 09:00"), txn(98, "2026-11-18 10:00")])
    source = open_source(db.url)
    try:
        with pytest.raises(CountMismatch, match="was never read"):
            sync_table(source, warehouse, propagating(source, "card_transactions"), D2)
    finally:
        source.close()
    assert [r["transaction_id"] for r in transactions(warehouse)] == [100]
    assert failed_ledger_error(warehouse, "card_transactions", D2).startswith("CountMismatch")


def test_a_ledger_of_an_earlier_release_gains_rows_deleted(pg_url: str, warehouse) -> None:
    old = sync.LEDGER_SCHEMA.remove(sync.LEDGER_SCHEMA.get_field_index("rows_deleted"))
    warehouse.create_table_if_missing(sync.LEDGER, old)
    db = SourceDB("postgres", pg_url)
    seed(db)
    assert all(r.status == "succeeded" for r in sync_all(db, warehouse, D1))
    assert "rows_deleted" in (warehouse.column_types(sync.LEDGER) or {})


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("deletes: sometimes", "deletes of table t is 'sometimes'; use fail or propagate"),
        ("mode: full\n    deletes: propagate", "deletes applies to incremental tables only"),
    ],
)
def test_a_bad_deletes_policy_is_refused(tmp_path: Path, entry: str, message: str) -> None:
    path = tmp_path / "tables.yaml"
    path.write_text(f"tables:\n  - name: t\n    primary_key: [id]\n    {entry}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        sync.load_config(path)


def test_a_change_time_in_the_future_is_read_when_its_day_comes_and_warned_of_until_then(
    pg_url: str, warehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A row whose updated_at lies ahead of the sync's clock (a source clock ahead, a wrong value)
    # is after every window synced so far: it reaches the warehouse only with the day its time
    # falls in, and a wrong value far ahead ('infinity', a year typed wrong) never does. The
    # sync said nothing. It now succeeds and warns, naming the rows and when they will be read;
    # the watermark stays the day's end, so no row between it and them is skipped.
    from paylater.timeutil import day_end_utc, resolve_as_of

    now = datetime.now(UTC)
    yesterday = resolve_as_of(None)
    ahead = now + timedelta(days=2)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE plans (plan_id bigint PRIMARY KEY, note text,"
            " updated_at timestamptz NOT NULL)"
        )
        conn.execute(
            "INSERT INTO plans VALUES (1, 'now', %s), (2, 'ahead', %s), (3, 'wrong', 'infinity')",
            [day_end_utc(yesterday) - timedelta(hours=1), ahead],
        )
    source = open_source(pg_url)
    try:
        (spec,) = validate_tables(source, [sync.TableSpec("plans", ("plan_id",), "incremental")])
        first = sync_table(source, warehouse, spec, yesterday)
        assert first.status == "succeeded" and first.watermark_to == day_end_utc(yesterday)
        assert [r["plan_id"] for r in rows(warehouse, "plans", "plan_id")] == [1]
        assert first.warning is not None
        assert first.warning.startswith(
            "2 source rows have an updated_at ahead of the sync's clock"
        ), first.warning
        assert "infinity" in first.warning and "read by the sync of the day" in first.warning
        (ledger,) = warehouse.query_arrow("SELECT warning FROM sync_ledger").to_pylist()
        assert ledger == {"warning": first.warning}

        # Three days on (the sync's clock moved), the day holding row 2's time is synced.
        later = now + timedelta(days=3)
        monkeypatch.setattr(sync, "utc_now", lambda: later)
        day = resolve_as_of(ahead)
        second = sync_table(source, warehouse, spec, day)
    finally:
        source.close()
    assert second.status == "succeeded" and second.watermark_from == day_end_utc(yesterday)
    assert [r["plan_id"] for r in rows(warehouse, "plans", "plan_id")] == [1, 2]
    assert second.warning is not None and second.warning.startswith("1 source row has")


@pytest.mark.parametrize("table", ["card_transactions", "deferred_charges"])
def test_a_reread_replaces_the_table_whole_and_atomically(
    pg_url: str, warehouse, monkeypatch: pytest.MonkeyPatch, table: str
) -> None:
    # The way to bring a table back in line (rows deleted at the source before the check band,
    # a copy gone wrong) was to drop or empty it by hand and let the next sync read it whole:
    # the table was empty, or half there, until then. A reread replaces it in one transaction.
    db = seeded_and_synced(pg_url, warehouse, D1, D2)
    key = KEY_OF[table]
    gone = {"card_transactions": 100, "deferred_charges": 10}[table]
    db.run(f"DELETE FROM {table} WHERE {key} = ?", [(gone,)])
    before = rows(warehouse, table, key)
    source = open_source(db.url)
    try:
        spec = pg_spec(source, table)
        real = extract.pg_figures

        def one_more_held(row, spec, window, band_start) -> Figures:
            figures = real(row, spec, window, band_start)
            return figures._replace(in_band=figures.in_band + 1)

        # The re-read fails its last check, after the table was emptied and loaded: it rolls
        # back to the old copy.
        monkeypatch.setattr(extract, "pg_figures", one_more_held)
        with pytest.raises(CountMismatch, match="fewer than the"):
            sync_table(source, warehouse, spec, D3, reread=True)
        assert rows(warehouse, table, key) == before
        monkeypatch.undo()
        result = sync_table(source, warehouse, spec, D3, reread=True)
    finally:
        source.close()
    after = rows(warehouse, table, key)
    assert [r[key] for r in after] == [r[key] for r in before if r[key] != gone]
    assert result.status == "succeeded" and result.watermark_from is None
    assert result.rows_extracted == result.warehouse_rows == len(after)


@pytest.mark.parametrize("table", ["card_transactions", "deferred_charges"])
def test_a_reread_counts_the_rows_it_deletes_in_the_ledger(
    pg_url: str, warehouse: Warehouse, table: str
) -> None:
    # A reread of a table whose deletes policy is fail (the way out its error and the runbook
    # name for rows deleted at the source) dropped those rows silently: its ledger row said
    # rows_deleted NULL, as if nothing had gone. A rerun of the reread deletes nothing more,
    # and the day's row keeps the count.
    db = seeded_and_synced(pg_url, warehouse, D1, D2)
    key = KEY_OF[table]
    gone = {"card_transactions": [100, 101], "deferred_charges": [10, 12]}[table]
    db.run(f"DELETE FROM {table} WHERE {key} = ?", [(k,) for k in gone])
    source = open_source(db.url)
    try:
        spec = pg_spec(source, table)
        assert spec.deletes == "fail"
        # The day fails, its message naming the reread as the way out that keeps the policy.
        with pytest.raises(CountMismatch, match=re.escape(f'reread=["{table}"]')):
            sync_table(source, warehouse, spec, D3)
        first = sync_table(source, warehouse, spec, D3, reread=True)
        again = sync_table(source, warehouse, spec, D3, reread=True)
    finally:
        source.close()
    assert (first.status, first.rows_deleted) == ("succeeded", 2)
    assert (again.status, again.rows_deleted) == ("succeeded", 2)
    assert ledger_deleted(warehouse, table, D3) == 2
    assert not {r[key] for r in rows(warehouse, table, key)} & set(gone)


@pytest.mark.parametrize("table", ["card_transactions", "deferred_charges"])
def test_a_reread_keeps_the_rows_changed_after_its_watermark(
    pg_url: str, warehouse: Warehouse, table: str
) -> None:
    # A reread reads the history up to as_of's watermark: a row changed since (today, for a
    # reread of yesterday) is not in it. The reread emptied the table and so lost such a row
    # until the next day's sync, though the source still holds it and the warehouse held its
    # version of that day: the day's features were built without it.
    db = seeded_and_synced(pg_url, warehouse, D1, D2)
    key = KEY_OF[table]
    later = {"card_transactions": 101, "deferred_charges": 11}[table]
    after_d3 = utc("2026-11-23 01:00")  # after D3 ended (15:00 UTC on the 22nd)
    db.run(f"UPDATE {table} SET updated_at = ? WHERE {key} = ?", [(after_d3, later)])
    held_before = {r[key]: r for r in rows(warehouse, table, key)}
    source = open_source(db.url)
    try:
        spec = pg_spec(source, table)
        reread = sync_table(source, warehouse, spec, D3, reread=True)
        kept = {r[key]: r for r in rows(warehouse, table, key)}
        next_day = sync_table(source, warehouse, spec, date(2026, 11, 23))
    finally:
        source.close()
    assert reread.status == "succeeded" and reread.rows_deleted == 0
    assert kept == held_before  # the row changed later is held at its version of D3
    assert next_day.status == "succeeded"
    (row,) = [r for r in rows(warehouse, table, key) if r[key] == later]
    assert row["updated_at"] == after_d3


def test_a_name_ending_in_a_newline_is_refused_by_the_sync_config(tmp_path: Path) -> None:
    # `^...$` let "users\n" through (`$` also matches before a trailing newline): the name, a
    # YAML string with its newline, went into the sync's SQL.
    path = tmp_path / "tables.yaml"
    path.write_text('tables:\n  - name: "users\\n"\n    primary_key: [user_id]\n')
    with pytest.raises(
        ConfigError,
        match=re.escape("sync config: table 'users\\n' is not a plain SQL identifier"),
    ):
        sync.load_config(path)


def test_a_reread_of_an_earlier_day_keeps_what_later_days_brought(
    pg_url: str, warehouse: Warehouse
) -> None:
    # Re-reading D1 after D2 was synced: the history up to D1's watermark lacks D2's changes. The
    # reread emptied the table, so they were lost, and the next sync, starting at D2's watermark,
    # never read them again. Now they keep the versions D2 brought.
    db = SourceDB("postgres", pg_url)
    seed(db)
    sync_all(db, warehouse, D1)
    db.repay(10, "2026-11-21 02:00")  # in D2's window
    sync_all(db, warehouse, D2)
    before = rows(warehouse, "deferred_charges", "charge_id")
    source = open_source(db.url)
    try:
        spec = pg_spec(source, "deferred_charges")
        result = sync_table(source, warehouse, spec, D1, reread=True)
    finally:
        source.close()
    assert (result.status, result.rows_deleted) == ("succeeded", 0)
    assert rows(warehouse, "deferred_charges", "charge_id") == before
    assert [r["status"] for r in before if r["charge_id"] == 10] == ["repaid"]


def ledger_reread(wh: Warehouse, table: str) -> dict[date, tuple[str, bool | None]]:
    """A table's ledger rows: as_of -> (status, reread)."""
    found = wh.query_arrow(
        "SELECT as_of, status, reread FROM sync_ledger WHERE table_name = @t", {"t": table}
    ).to_pylist()
    return {r["as_of"]: (r["status"], r["reread"]) for r in found}


@pytest.mark.parametrize("table", ["card_transactions", "deferred_charges"])
def test_the_ledger_marks_a_reread_apart_from_a_first_load(
    pg_url: str, warehouse: Warehouse, monkeypatch: pytest.MonkeyPatch, table: str
) -> None:
    # A reread's ledger row looked like a first load's (watermark_from NULL, nothing else): an
    # operator auditing the ledger could not tell that a table was re-read whole on request.
    # Each row now says whether its run was a reread, a failed attempt included.
    db = seeded_and_synced(pg_url, warehouse, D1)
    source = open_source(db.url)
    try:
        spec = pg_spec(source, table)
        monkeypatch.setattr(sync, "ahead_warning", broken)  # inside the transaction
        with pytest.raises(OSError, match="gone"):
            sync_table(source, warehouse, spec, D2, reread=True)
        assert ledger_reread(warehouse, table)[D2] == ("failed", True)
        monkeypatch.undo()
        reread = sync_table(source, warehouse, spec, D2, reread=True)
        plain = sync_table(source, warehouse, spec, D3)
    finally:
        source.close()
    assert (reread.reread, reread.watermark_from, plain.reread) == (True, None, False)
    assert ledger_reread(warehouse, table) == {
        D1: ("succeeded", False),  # a first load: watermark_from NULL too, but not a reread
        D2: ("succeeded", True),
        D3: ("succeeded", False),
    }


def test_a_ledger_of_an_earlier_release_gains_reread(pg_url: str, warehouse) -> None:
    # A ledger written before the marker existed keeps its rows, NULL for it (not recorded then:
    # neither a reread nor not one); the rows written since say which they are.
    old = pa.schema([f for f in sync.LEDGER_SCHEMA if f.name != "reread"])
    warehouse.create_table_if_missing(sync.LEDGER, old)
    warehouse.execute(
        "INSERT INTO sync_ledger (table_name, as_of, mode, watermark_to, duration_seconds,"
        " status, finished_at) VALUES ('loans', @d, 'incremental', @w, 1.0, 'succeeded', @w)",
        {"d": date(2026, 11, 19), "w": utc("2026-11-19 15:00")},
    )
    db = SourceDB("postgres", pg_url)
    seed(db)
    assert all(r.status == "succeeded" for r in sync_all(db, warehouse, D1))
    assert (warehouse.column_types(sync.LEDGER) or {})["reread"] == "bool"
    assert ledger_reread(warehouse, "loans") == {date(2026, 11, 19): ("succeeded", None)}
    assert ledger_reread(warehouse, "users") == {D1: ("succeeded", False)}


@pytest.mark.parametrize("table", ["card_transactions", "topups"])
def test_a_source_value_the_listed_type_cannot_hold_fails_naming_table_and_column(
    pg_url: str, warehouse: Warehouse, table: str
) -> None:
    # The default configuration lists each table's columns with their types, so a column
    # retyped at the source (amount_jpy to numeric, holding a fraction) is still read as the
    # listed int64. The table failed with pyarrow's "ArrowInvalid: Failed to parse string:
    # '10000.75' as a scalar of type int64": no table, no column, and a source value in the
    # ledger and the alert. Now it is a SchemaMismatch naming both, not retried.
    db = seeded_and_synced(pg_url, warehouse, D1)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {table} ALTER COLUMN amount_jpy TYPE numeric(12, 2)")
        conn.execute(
            f"UPDATE {table} SET amount_jpy = 10000.75, updated_at = '2026-11-21 01:00+00'"
        )
    before = digest(warehouse)
    source = open_source(db.url)
    try:
        spec = pg_spec(source, table)
        assert spec.columns["amount_jpy"] == "int64"  # as listed, whatever the source holds
        with pytest.raises(sync.SchemaMismatch) as err:
            sync_table(source, warehouse, spec, D2)
    finally:
        source.close()
    message = str(err.value)
    assert message.startswith(
        f"sync of {table}: column amount_jpy holds a value that is no int64, the type the sync"
        " configuration lists for it"
    ), message
    assert "10000.75" not in message and "\n" not in message
    assert not sync.is_transient(err.value)
    assert failed_ledger_error(warehouse, table, D2) == f"SchemaMismatch: {message}"
    warehouse.execute("DELETE FROM sync_ledger WHERE as_of = @d", {"d": D2})
    assert digest(warehouse) == before  # nothing written but the failed ledger row


@pytest.mark.parametrize("keep_changes", [True, False])
def test_a_failed_first_sync_leaves_no_table_behind(
    pg_url: str, warehouse: Warehouse, keep_changes: bool
) -> None:
    # A table's first sync created its warehouse tables before its transaction: when it failed
    # (here a type listed wrong for a new table), they stayed, empty, in the wrong schema, and
    # once the configuration was corrected every sync failed with SchemaMismatch ("alter fees
    # to match") until someone altered or dropped them by hand. Now they are created inside the
    # transaction, and go with its rollback.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE fees (fee_id bigint PRIMARY KEY, rate numeric(6, 3),"
            " updated_at timestamptz NOT NULL)"
        )
        conn.execute("INSERT INTO fees VALUES (1, 0.125, '2026-11-20 01:00+00')")
    listed = {"fee_id": "int64", "rate": "int64", "updated_at": "timestamp"}
    wrong = sync.TableSpec(
        "fees", ("fee_id",), "incremental", columns=listed, keep_changes=keep_changes
    )
    source = open_source(pg_url)
    try:
        with pytest.raises(sync.SchemaMismatch, match="column rate holds a value that is no int64"):
            sync_table(source, warehouse, validate_tables(source, [wrong])[0], D1)
        assert not warehouse.table_exists("fees")
        assert not warehouse.table_exists("fees__changes")
        assert failed_ledger_error(warehouse, "fees", D1).startswith("SchemaMismatch")
        fixed = replace(wrong, columns={**listed, "rate": "float64"})
        result = sync_table(source, warehouse, validate_tables(source, [fixed])[0], D1)
    finally:
        source.close()
    assert (result.status, result.warehouse_rows) == ("succeeded", 1)
    assert rows(warehouse, "fees", "fee_id")[0]["rate"] == 0.125


def test_a_cursor_retyped_to_text_at_a_postgres_source_is_refused_at_validation(
    pg_url: str, warehouse: Warehouse
) -> None:
    # With the columns listed (the cursor as timestamp), a cursor retyped to text at the source
    # passed validation (text is how SQLite holds its times) and the sync failed at the source
    # with the driver's "operator does not exist: text >= timestamp with time zone", after
    # creating its tables. PostgreSQL compares no text with an instant: refused, nothing written.
    db = seeded_and_synced(pg_url, warehouse, D1)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE topups ALTER COLUMN updated_at TYPE text")
    before = digest(warehouse)
    source = open_source(db.url)
    try:
        with pytest.raises(
            ConfigError,
            match=r"^sync config: cursor topups\.updated_at is text at the source, not a"
            r" timestamp",
        ):
            validate_tables(source, configured_tables())
    finally:
        source.close()
    assert digest(warehouse) == before


@pytest.mark.parametrize(
    ("ddl", "message"),
    [
        ("DROP TABLE topups", "table topups does not exist in the source database"),
        (
            "ALTER TABLE topups RENAME COLUMN method TO channel",
            r"column topups\.method does not exist in the source table",
        ),
    ],
)
def test_a_table_or_column_gone_from_the_source_after_validation_is_named(
    pg_url: str, warehouse: Warehouse, ddl: str, message: str
) -> None:
    # The flow validates the configuration once, then runs a task per table (retried with the
    # same validated spec). A table dropped or a column renamed in between failed the table with
    # the driver's "ProgrammingError: NOT_FOUND: [libpq] Failed to execute query 'EXPLAIN (FORMAT
    # JSON) SELECT 1 FROM ...': relation does not exist". The failure is now checked against the
    # source's catalogue and named as validation names it; nothing is written.
    db = seeded_and_synced(pg_url, warehouse, D1)
    source = open_source(db.url)
    try:
        spec = pg_spec(source, "topups")
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(ddl)
        before = digest(warehouse)
        with pytest.raises(ConfigError, match=f"^sync config: {message}") as err:
            sync_table(source, warehouse, spec, D2)
    finally:
        source.close()
    assert not sync.is_transient(err.value)
    assert isinstance(err.value.__cause__, adbc_driver_manager.Error)  # the driver's, kept
    assert failed_ledger_error(warehouse, "topups", D2) == f"ConfigError: {err.value}"
    warehouse.execute("DELETE FROM sync_ledger WHERE as_of = @d", {"d": D2})
    assert digest(warehouse) == before


def ledger_row(wh: Warehouse, table: str, as_of: date) -> dict[str, Any]:
    """The one ledger row of a table and day."""
    (row,) = wh.query_arrow(
        "SELECT * FROM sync_ledger WHERE table_name = @t AND as_of = @d", {"t": table, "d": as_of}
    ).to_pylist()
    return row


def test_a_failed_rerun_of_a_synced_day_keeps_it_succeeded_and_records_the_attempt(
    tmp_path: Path, warehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The failed rerun's ledger row replaced the good one: the day read failed (the feature build
    # and a backfill refused it) although the rerun rolled back and the warehouse still held the
    # first run's rows.
    db = SourceDB("sqlite", f"sqlite:///{tmp_path / 'src.db'}", tmp_path / "src.db")
    seed(db)
    sync_all(db, warehouse, D1)
    good = ledger_row(warehouse, "deferred_charges", D1)
    held = rows(warehouse, "deferred_charges", "charge_id")

    real_merge = sync.merge_changes

    def killed(wh: Warehouse, spec, as_of: date) -> None:
        if spec.name == "deferred_charges":
            raise OSError("disk full half way")
        real_merge(wh, spec, as_of)

    monkeypatch.setattr(sync, "merge_changes", killed)
    with pytest.raises(OSError, match="disk full half way"):
        sync_all(db, warehouse, D1)
    after = ledger_row(warehouse, "deferred_charges", D1)
    assert after["status"] == "succeeded"
    assert after["error"] == "OSError: disk full half way"
    assert after["failed_at"] is not None and after["failed_at"] > good["finished_at"]
    # Every figure is still the successful run's, which is what the warehouse holds.
    unchanged = {k: v for k, v in after.items() if k not in ("error", "failed_at")}
    assert unchanged == {k: v for k, v in good.items() if k not in ("error", "failed_at")}
    assert rows(warehouse, "deferred_charges", "charge_id") == held
    check_ledger(warehouse, D1)  # the feature build's and the backfill's gate
    assert ledger_watermark(warehouse, D1) == good["watermark_to"]

    # A later day that never succeeded fails as before: nothing good to keep.
    with pytest.raises(OSError, match="disk full half way"):
        sync_all(db, warehouse, D2)
    first_failure = ledger_row(warehouse, "deferred_charges", D2)
    assert first_failure["status"] == "failed"
    assert first_failure["failed_at"] == first_failure["finished_at"]
    with pytest.raises(SyncIncomplete, match="deferred_charges"):
        check_ledger(warehouse, D2)

    # A successful rerun replaces the row whole: the failed attempt is history.
    monkeypatch.undo()
    sync_all(db, warehouse, D1)
    again = ledger_row(warehouse, "deferred_charges", D1)
    assert (again["status"], again["error"], again["failed_at"]) == ("succeeded", None, None)
