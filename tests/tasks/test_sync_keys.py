"""Primary keys the source does not enforce (a view, a table without a key constraint): the sync
checks the rows it read for repeated and NULL keys and fails the table, leaving the warehouse as
it was; a table whose source enforces its key is not checked at all. Real PostgreSQL and SQLite
sources, DuckDB warehouses (and BigQuery's SQL through the fake client of its adapter's tests)."""

from __future__ import annotations

import importlib.util
import sqlite3
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlglot
from sqlglot import exp

from tasks import sync
from tasks.extract import enforces_key, open_source
from tasks.sync import (
    KeyViolation,
    TableSpec,
    configured_tables,
    sync_table,
    validate_tables,
)
from tasks.sync_config import load_config
from tasks.warehouse import Warehouse, open_warehouse

D1, D2 = date(2026, 11, 20), date(2026, 11, 21)

_sync_tests = importlib.util.spec_from_file_location(
    "_sync_tests", Path(__file__).with_name("test_sync.py")
)
assert _sync_tests and _sync_tests.loader
helpers = importlib.util.module_from_spec(_sync_tests)
_sync_tests.loader.exec_module(helpers)
SourceDB, charge, digest, failed_ledger_error = (
    helpers.SourceDB,
    helpers.charge,
    helpers.digest,
    helpers.failed_ledger_error,
)

# A copy of deferred_charges with no constraint at all (CREATE TABLE AS copies none, not even
# NOT NULL), and a view over it.
KEYLESS = {
    "postgres": "CREATE TABLE charges_nokey AS SELECT * FROM deferred_charges WITH NO DATA;"
    " CREATE VIEW charges_view AS SELECT * FROM charges_nokey;",
    "sqlite": "CREATE TABLE charges_nokey AS SELECT * FROM deferred_charges WHERE 0;"
    " CREATE VIEW charges_view AS SELECT * FROM charges_nokey;",
}


def execute(db: Any, ddl: str) -> None:
    """Run DDL (several statements) on the source."""
    if db.kind == "postgres":
        with psycopg.connect(db.url, autocommit=True) as conn:
            conn.execute(ddl)
    else:
        with sqlite3.connect(str(db.path)) as conn:
            conn.executescript(ddl)


@pytest.fixture(params=["postgres", "sqlite"])
def source_db(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """The project's source schema plus charges_nokey and charges_view, on either kind."""
    if request.param == "postgres":
        db = SourceDB("postgres", request.getfixturevalue("pg_url"))
    else:
        db = SourceDB("sqlite", f"sqlite:///{tmp_path / 'source.db'}", tmp_path / "source.db")
    execute(db, KEYLESS[db.kind])
    return db


@pytest.fixture
def warehouse(tmp_path: Path) -> Any:
    """A DuckDB warehouse file."""
    wh = open_warehouse(f"duckdb:///{tmp_path / 'wh.duckdb'}")
    yield wh
    wh.close()


def charges_spec(name: str, **changes: Any) -> TableSpec:
    """The configured deferred_charges (its columns typed) under another source table name."""
    configured = next(s for s in configured_tables() if s.name == "deferred_charges")
    return replace(configured, name=name, **changes)


def validated(db: Any, spec: TableSpec) -> TableSpec:
    """`spec` checked against the source, as the flow's validation task does."""
    source = open_source(db.url)
    try:
        (resolved,) = validate_tables(source, [spec])
    finally:
        source.close()
    return resolved


def run(db: Any, wh: Warehouse, spec: TableSpec, as_of: date) -> sync.TableResult:
    """Sync one validated table for one as_of."""
    source = open_source(db.url)
    try:
        return sync_table(source, wh, spec, as_of)
    finally:
        source.close()


def held(wh: Warehouse, table: str) -> list[dict[str, Any]]:
    """A warehouse table's rows, in a stable order."""
    data = wh.query_arrow(f"SELECT * FROM {table}")
    return data.sort_by([(c, "ascending") for c in data.column_names]).to_pylist()


def check_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the table of every key check statement the sync builds."""
    calls: list[str] = []
    real = sync.key_sql

    def recorded(spec: TableSpec, *args: Any, **kwargs: Any) -> str:
        calls.append(spec.name)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(sync, "key_sql", recorded)
    return calls


def test_which_keys_the_source_enforces(source_db) -> None:
    extra = {
        "postgres": "CREATE TABLE nullable_unique (k bigint UNIQUE, updated_at timestamptz);"
        " CREATE TABLE partial_unique (k bigint NOT NULL, updated_at timestamptz);"
        " CREATE UNIQUE INDEX partial_unique_k ON partial_unique (k) WHERE k > 0;"
        " CREATE TABLE composite (a bigint NOT NULL, b text NOT NULL, c bigint,"
        "  PRIMARY KEY (a, b) INCLUDE (c));"
        " CREATE TABLE parent (k bigint PRIMARY KEY); CREATE TABLE child () INHERITS (parent);",
        # SQLite: a text primary key of a rowid table may hold NULLs; INTEGER PRIMARY KEY is the
        # rowid and may not.
        "sqlite": "CREATE TABLE nullable_unique (k TEXT PRIMARY KEY, updated_at TEXT);"
        " CREATE TABLE partial_unique (k INTEGER NOT NULL, updated_at TEXT);"
        " CREATE UNIQUE INDEX partial_unique_k ON partial_unique (k) WHERE k > 0;"
        " CREATE TABLE composite (a INTEGER NOT NULL, b TEXT NOT NULL, c INTEGER,"
        "  PRIMARY KEY (a, b));"
        " CREATE TABLE parent (k INTEGER PRIMARY KEY DESC); CREATE TABLE child (k TEXT NOT NULL UNIQUE);",
    }
    execute(source_db, extra[source_db.kind])
    expected = {
        ("deferred_charges", ("charge_id",)): True,
        ("deferred_charges", ("charge_id", "user_id")): True,  # a unique subset of the key
        ("deferred_charges", ("user_id",)): False,
        ("charges_nokey", ("charge_id",)): False,
        ("charges_view", ("charge_id",)): False,
        ("nullable_unique", ("k",)): False,
        ("partial_unique", ("k",)): False,
        ("composite", ("a", "b")): True,
        ("composite", ("a",)): False,
        ("composite", ("a", "c")): False,
        # PostgreSQL: its child's rows are read with it; SQLite: not the rowid, so nullable.
        ("parent", ("k",)): False,
        ("child", ("k",)): source_db.kind == "sqlite",  # PostgreSQL: no key of its own
        ("no_such_table", ("k",)): False,
    }
    source = open_source(source_db.url)
    try:
        found = {(t, k): source.key_enforced(t, k) for t, k in expected}
        assert found == expected
        specs = validate_tables(
            source, [charges_spec("deferred_charges"), charges_spec("charges_view")]
        )
    finally:
        source.close()
    assert [s.key_enforced for s in specs] == [True, False]


def test_enforces_key_needs_not_null_and_a_unique_index_inside_the_key() -> None:
    assert enforces_key(("a", "b"), {"a", "b"}, [["a"]])
    assert not enforces_key(("a", "b"), {"a"}, [["a"]])  # b may be NULL
    assert not enforces_key(("a",), {"a", "b"}, [["a", "b"]])
    assert not enforces_key(("a",), {"a"}, [[None], []])  # an expression index


def test_the_key_is_not_configurable(tmp_path: Path) -> None:
    # Only validation sets it: a configuration cannot switch the check off.
    assert not TableSpec("t", ("k",), "full").key_enforced
    config = tmp_path / "tables.yaml"
    config.write_text("tables:\n  - {name: t, primary_key: k, key_enforced: true}\n")
    with pytest.raises(sync.ConfigError, match="unknown key"):
        load_config(config)


def test_a_full_sync_of_repeated_keys_fails_and_leaves_the_table(source_db, warehouse) -> None:
    source_db.insert(
        "charges_nokey", [charge(10, "2026-11-19 03:00"), charge(11, "2026-11-19 04:00")]
    )
    spec = validated(source_db, charges_spec("charges_view", mode="full", cursor=None))
    assert not spec.key_enforced
    assert run(source_db, warehouse, spec, D1).status == "succeeded"
    before = held(warehouse, "charges_view")

    source_db.insert("charges_nokey", [charge(11, "2026-11-20 05:00", status="repaid")])
    with pytest.raises(
        KeyViolation,
        match=r"^sync of charges_view: the rows read break primary key \(charge_id\), which the "
        r"source does not enforce: 1 key value occurs more than once \(e\.g\. charge_id=11 in 2 "
        r"rows\)$",
    ) as failed:
        run(source_db, warehouse, spec, D2)
    assert not sync.is_transient(failed.value)
    assert held(warehouse, "charges_view") == before
    assert failed_ledger_error(warehouse, "charges_view", D2) == f"KeyViolation: {failed.value}"


LOADS = ["changes partition", "staged in memory", "staged temporary table"]


@pytest.mark.parametrize("load", LOADS)
def test_an_increment_with_a_repeated_key_fails_and_leaves_the_warehouse(
    source_db, warehouse, monkeypatch: pytest.MonkeyPatch, load: str
) -> None:
    if load == "staged temporary table":
        monkeypatch.setattr(sync, "STAGE_IN_MEMORY_ROWS", 0)
    spec = validated(
        source_db, charges_spec("charges_nokey", keep_changes=load == "changes partition")
    )
    source_db.insert(
        "charges_nokey", [charge(10, "2026-11-19 03:00"), charge(11, "2026-11-20 14:00")]
    )
    assert run(source_db, warehouse, spec, D1).status == "succeeded"
    before = [
        held(warehouse, t)
        for t in ("charges_nokey", "charges_nokey__changes")
        if warehouse.table_exists(t)
    ]

    # Day 2: charge 12 arrives twice (a view joining one row too many, a table without its key).
    source_db.insert(
        "charges_nokey",
        [
            charge(12, "2026-11-21 01:00"),
            charge(12, "2026-11-21 02:00"),
            charge(13, "2026-11-21 03:00"),
        ],
    )
    with pytest.raises(
        KeyViolation,
        match=r"charges_nokey: .*1 key value occurs more than once \(e\.g\. charge_id=12 in 2 rows\)$",
    ):
        run(source_db, warehouse, spec, D2)
    after = [
        held(warehouse, t)
        for t in ("charges_nokey", "charges_nokey__changes")
        if warehouse.table_exists(t)
    ]
    assert after == before
    assert "KeyViolation" in failed_ledger_error(warehouse, "charges_nokey", D2)

    # Once the source holds charge 12 once, the rerun of the day goes through.
    source_db.run(
        "DELETE FROM charges_nokey WHERE updated_at = ?",
        [(source_db._value(helpers.utc("2026-11-21 02:00")),)],
    )
    result = run(source_db, warehouse, spec, D2)
    assert (result.status, result.rows_extracted, result.warehouse_rows) == ("succeeded", 2, 4)


@pytest.mark.parametrize("load", ["changes partition", "streamed into the empty table", "full"])
def test_a_null_key_fails_the_sync(source_db, warehouse, load: str) -> None:
    changes: dict[str, Any] = {"keep_changes": load == "changes partition"}
    if load == "full":
        changes.update(mode="full", cursor=None)
    spec = validated(source_db, charges_spec("charges_view", **changes))
    source_db.insert(
        "charges_nokey",
        [charge(10, "2026-11-19 03:00"), {**charge(0, "2026-11-19 04:00"), "charge_id": None}],
    )
    with pytest.raises(
        KeyViolation,
        match=r"charges_view: .*: 1 row has a NULL key \(e\.g\. charge_id=NULL in 1 row\)$",
    ):
        run(source_db, warehouse, spec, D1)
    assert not warehouse.table_exists("charges_view")  # nothing kept, not even the table
    assert "NULL key" in failed_ledger_error(warehouse, "charges_view", D1)


@pytest.mark.parametrize("load", ["changes partition", "staged", "full"])
def test_a_key_the_source_enforces_is_not_checked(
    source_db, warehouse, monkeypatch: pytest.MonkeyPatch, load: str
) -> None:
    changes: dict[str, Any] = {"keep_changes": load == "changes partition"}
    if load == "full":
        changes.update(mode="full", cursor=None)
    spec = validated(source_db, charges_spec("deferred_charges", **changes))
    assert spec.key_enforced  # the primary key at the source: decided once, at validation
    calls = check_calls(monkeypatch)
    source_db.insert("deferred_charges", [charge(10, "2026-11-19 03:00")])
    run(source_db, warehouse, spec, D1)
    source_db.insert("deferred_charges", [charge(11, "2026-11-21 03:00")])
    assert run(source_db, warehouse, spec, D2).warehouse_rows == 2
    assert calls == []

    # The same rows through the view: checked at every sync.
    view = validated(source_db, charges_spec("charges_view", **changes))
    source_db.insert("charges_nokey", [charge(10, "2026-11-19 03:00")])
    run(source_db, warehouse, view, D1)
    assert calls == ["charges_view"]


def test_the_key_check_is_bigquery_sql_and_runs_in_its_transaction(tmp_path: Path) -> None:
    bq_tests = importlib.util.spec_from_file_location(
        "_bq_tests", Path(__file__).parent / "warehouse" / "test_bigquery.py"
    )
    assert bq_tests and bq_tests.loader
    fake = importlib.util.module_from_spec(bq_tests)
    bq_tests.loader.exec_module(fake)
    from tasks.warehouse.bigquery import BigQueryWarehouse

    spec = charges_spec("charges_view")
    for template in ("sync_key_check.sql", "sync_key_example.sql"):
        for changes in (None, "staged"):
            sql = sync.key_sql(
                replace(spec, primary_key=("charge_id", "user_id")), template, changes, "TRUE"
            )
            statements = sqlglot.parse(sql, read="bigquery")
            assert len(statements) == 1 and isinstance(statements[0], exp.Select)

    db = SourceDB("sqlite", f"sqlite:///{tmp_path / 'source.db'}", tmp_path / "source.db")
    execute(db, KEYLESS["sqlite"])
    spec = validated(db, spec)
    client = fake.FakeBigQueryClient()  # parses every statement as BigQuery SQL, runs it on DuckDB
    warehouse = BigQueryWarehouse("paylater-prod", "warehouse", client=client)
    db.insert("charges_nokey", [charge(10, "2026-11-19 03:00")])
    assert run(db, warehouse, spec, D1).status == "succeeded"
    db.insert("charges_nokey", [charge(11, "2026-11-21 03:00"), charge(11, "2026-11-21 04:00")])
    with pytest.raises(KeyViolation, match=r"charge_id=11 in 2 rows"):
        run(db, warehouse, spec, D2)
    sqls = [sql for sql, _ in client.queries]
    rollback = sqls.index("ROLLBACK TRANSACTION")
    assert any("_sync_null_key" in s for s in sqls[:rollback])  # checked inside the transaction
    merges = [s for s in sqls if isinstance(sqlglot.parse_one(s, read="bigquery"), exp.Merge)]
    assert not merges  # the second day's MERGE never ran (the first day's was an INSERT)
    assert warehouse.query_arrow("SELECT charge_id FROM charges_view").to_pylist() == [
        {"charge_id": 10}
    ]


def test_a_key_the_warehouse_holds_in_another_type_is_checked(source_db, warehouse) -> None:
    """The source's unique index compares the key as the source holds it: text codes '1' and
    '01' are distinct there, but listed as int64 they are both 1 in the warehouse. Such a key is
    not enforced for the rows the sync loads, so they are checked, not merged into one."""
    execute(source_db, "CREATE TABLE coded (code TEXT PRIMARY KEY NOT NULL, amount BIGINT);")
    source_db.run("INSERT INTO coded (code, amount) VALUES (?, ?)", [("1", 10), ("01", 20)])
    spec = TableSpec(
        "coded", ("code",), "full", cursor=None, columns={"code": "int64", "amount": "int64"}
    )
    resolved = validated(source_db, spec)
    assert not resolved.key_enforced
    with pytest.raises(KeyViolation, match=r"code=1 in 2 rows"):
        run(source_db, warehouse, resolved, D1)

    # Held in its own type, the same key is the source's to enforce.
    as_text = validated(source_db, replace(spec, columns={"code": "string", "amount": "int64"}))
    assert as_text.key_enforced
