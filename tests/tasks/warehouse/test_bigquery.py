"""The BigQuery adapter at the client boundary (no BigQuery is reachable from here).

A fake client stands where google.cloud.bigquery.Client would: it records every query job (SQL and
QueryJobConfig) and load job (destination and LoadJobConfig), parses every SQL with sqlglot's
BigQuery dialect (a fallback to an unparsed Command fails the test, but for the statements of
UNPARSED_ALLOWED), and, so that the sync's count checks see real numbers, carries the work out on an
in-memory DuckDB with BigQuery's load semantics (WRITE_TRUNCATE of a table, or of one partition
through the `table$YYYYMMDD` decorator). Sessions behave as BigQuery documents them: a process
killed inside a transaction leaves its session open with the transaction uncommitted (BigQuery
ends an idle session after 24 hours), and a transaction mutating (DELETE, UPDATE, MERGE) a table
another open transaction has mutated is cancelled, until that session is aborted.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlglot
from google.api_core.exceptions import BadRequest, NotFound
from google.cloud import bigquery
from sqlglot import exp

from tasks.extract import Source, open_source
from tasks.sync import TableSpec, configured_tables, sync_table, validate_tables
from tasks.warehouse import WarehouseError, open_warehouse
from tasks.warehouse.bigquery import SESSIONS_SCHEMA, BigQueryWarehouse

ROOT = Path(__file__).resolve().parents[3]
_DUCK_TYPES = {
    "INT64": "BIGINT",
    "FLOAT64": "DOUBLE",
    "BOOL": "BOOLEAN",
    "STRING": "VARCHAR",
    "DATE": "DATE",
    "TIMESTAMP": "TIMESTAMPTZ",
}

_LEGACY_TYPES = {
    "BIGINT": "INTEGER",
    "DOUBLE": "FLOAT",
    "BOOLEAN": "BOOLEAN",
    "VARCHAR": "STRING",
    "DATE": "DATE",
    "TIMESTAMP WITH TIME ZONE": "TIMESTAMP",
}


# Statements sqlglot cannot parse (it falls back to a Command), each checked by its own pattern
# instead; any other Command fails the test. `CALL BQ.ABORT_SESSION('<id>')`: a system procedure
# call (https://cloud.google.com/bigquery/docs/reference/system-procedures), which sqlglot 30
# parses as an opaque Command (see test_the_unparsed_allow_list_is_what_sqlglot_cannot_parse).
ABORT_SESSION = re.compile(r"^CALL BQ\.ABORT_SESSION\('([A-Za-z0-9_=+/-]+)'\)$")
UNPARSED_ALLOWED = (ABORT_SESSION,)


class FakeSession:
    """One BigQuery session: its transaction runs on a DuckDB cursor of its own, as BigQuery runs
    it apart from the jobs outside the session; `mutated`: the tables its open transaction has
    changed by DELETE, UPDATE or MERGE (what makes another transaction on them conflict).

    A plain class, not a dataclass: tests/tasks/test_sync_keys.py loads this module by path,
    unregistered, where a dataclass cannot resolve its module."""

    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor
        self.in_transaction = True
        self.mutated: set[str] = set()


class Killed(BaseException):
    """The process died (SIGKILL): no handler, no finally clause reaches the warehouse again."""


class FakeJob:
    """What a finished QueryJob or LoadJob offers the adapter."""

    def __init__(self, rows: pa.Table | None = None, session_id: str | None = None) -> None:
        self.rows = rows
        self.session_info = SimpleNamespace(session_id=session_id)

    def result(self) -> FakeJob:
        return self

    def to_arrow(self) -> pa.Table:
        assert self.rows is not None
        return self.rows


class FakeBigQueryClient:
    """Records the jobs the adapter sends; runs them on DuckDB so their results are real."""

    def __init__(self, project: str = "paylater-prod", dataset: str = "warehouse") -> None:
        self.prefix = f"{project}.{dataset}."
        self.queries: list[tuple[str, bigquery.QueryJobConfig]] = []
        self.loads: list[tuple[str, bigquery.LoadJobConfig, pa.Table]] = []
        self.created: list[bigquery.Table] = []
        self.deleted: list[str] = []
        self.db = duckdb.connect()
        self.db.execute("SET TimeZone = 'UTC'")
        # Every session not yet ended, by id (a killed process's stays: BigQuery keeps it).
        self.sessions: dict[str, FakeSession] = {}
        # The session the running process uses (None: none open).
        self.current: str | None = None
        self.aborted: list[str] = []
        self.queued: list[str] = []
        self.begun = 0
        # kill_when(event) -> True: the process dies there (see kill_when); nothing else
        # reaches the client until revive().
        self.kill_when: Any = None
        self.dead = False

    @property
    def session_open(self) -> bool:
        """Whether the running process has a session open."""
        return self.current is not None

    def _table(self, ref: str) -> str:
        assert ref.startswith(self.prefix), ref
        return ref.removeprefix(self.prefix)

    def _exists(self, table: str) -> bool:
        found = self.db.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]
        ).fetchall()
        return found[0][0] > 0

    def _event(self, event: str) -> None:
        """Die at `event` if told to: the call, and every later one, raises Killed."""
        if not self.dead and self.kill_when is not None and self.kill_when(event):
            self.dead = True
        if self.dead:
            raise Killed(event)

    def revive(self) -> None:
        """The client serves a new process. The killed one's session stays open, its transaction
        uncommitted, as BigQuery keeps it until it has been idle 24 hours."""
        self.current = None
        self.dead = False
        self.kill_when = None

    def _abort(self, session_id: str) -> FakeJob:
        """CALL BQ.ABORT_SESSION: the session ends, its open transaction rolled back."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            raise BadRequest(f"Session {session_id} not found or already terminated")
        if session.in_transaction:
            session.cursor.execute("ROLLBACK")
        self.aborted.append(session_id)
        if self.current == session_id:
            self.current = None
        return FakeJob()

    def _mutates(self, statements: list[Any]) -> set[str]:
        """The tables the statements change in place (an INSERT only appends: no conflict)."""
        kinds = exp.Delete | exp.Update | exp.Merge
        return {s.this.name for s in statements if isinstance(s, kinds)}

    def _check_conflict(self, session_id: str, statements: list[Any]) -> None:
        """Cancel this session's transaction (rolled back, as BigQuery does) when it mutates a
        table another open transaction has mutated."""
        session = self.sessions[session_id]
        mutates = self._mutates(statements)
        for other_id, other in self.sessions.items():
            clash = sorted(mutates & other.mutated) if other_id != session_id else []
            if clash and other.in_transaction:
                session.cursor.execute("ROLLBACK")
                session.in_transaction = False
                session.mutated.clear()
                raise BadRequest(
                    f"Transaction is aborted due to concurrent update against table"
                    f" {self.prefix}{clash[0]}. Transaction ID: tx-{session_id}"
                )
        session.mutated |= mutates

    def _check_queued(self, statements: list[Any]) -> None:
        """DML outside a session on a table an open transaction has mutated: BigQuery queues it
        until that transaction ends (up to the session's 24 idle hours); the fake cannot wait,
        so it fails it, and records it in `queued`."""
        held = set().union(*(s.mutated for s in self.sessions.values() if s.in_transaction))
        clash = sorted(self._mutates(statements) & held)
        if clash:
            self.queued.append(clash[0])
            raise BadRequest(f"DML on {self.prefix}{clash[0]} queued behind an open transaction")

    def get_table(self, ref: str) -> Any:
        self._event(f"get {ref}")
        table = self._table(ref)
        if not self._exists(table):
            raise NotFound(ref)
        columns = self.db.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_name = ? ORDER BY ordinal_position",
            [table],
        ).fetchall()
        # The API reports column types by their legacy names (INTEGER, FLOAT, BOOLEAN).
        schema = [bigquery.SchemaField(c, _LEGACY_TYPES[t]) for c, t in columns]
        return SimpleNamespace(table_id=table, schema=schema)

    def create_table(self, table: bigquery.Table, exists_ok: bool = False) -> bigquery.Table:
        self._event(f"create {table.table_id}")
        self.created.append(table)
        name = self._table(f"{table.project}.{table.dataset_id}.{table.table_id}")
        columns = ", ".join(f'"{f.name}" {_DUCK_TYPES[f.field_type]}' for f in table.schema)
        self.db.execute(f'CREATE TABLE {"IF NOT EXISTS " if exists_ok else ""}"{name}" ({columns})')
        return table

    def query(self, sql: str, job_config: bigquery.QueryJobConfig, location: Any = None) -> FakeJob:
        self._event(f"query {sql.strip()}")
        self.queries.append((sql, job_config))
        assert job_config.default_dataset.dataset_id == self.prefix.split(".")[1]
        allowed = [m for m in (p.match(sql) for p in UNPARSED_ALLOWED) if m]
        if allowed:
            # Ends any session, the caller's own or one left by another process; never in it.
            assert not job_config.connection_properties and allowed[0].re is ABORT_SESSION
            return self._abort(allowed[0].group(1))
        statements = sqlglot.parse(sql, read="bigquery")
        assert not any(isinstance(s, exp.Command) for s in statements), sql
        if isinstance(statements[0], exp.Transaction):
            assert job_config.create_session and not self.session_open
            self.begun += 1
            self.current = f"session-{self.begun}"
            self.sessions[self.current] = FakeSession(self.db.cursor())
            self.sessions[self.current].cursor.execute("BEGIN")
            return FakeJob(session_id=self.current)
        in_session = bool(job_config.connection_properties)
        session_id = job_config.connection_properties[0].value if in_session else None
        assert session_id is None or session_id == self.current, "a session of another process"
        # Only a job writing a table of its own, or the adapter's bookkeeping of its sessions
        # (a table no transaction writes), may run beside the open session.
        beside = job_config.destination is not None or "sync_sessions" in sql
        assert in_session == self.session_open or beside, "a statement outside the open session"
        if session_id is not None and isinstance(statements[0], exp.Commit | exp.Rollback):
            session = self.sessions[session_id]
            if session.in_transaction:
                commit = isinstance(statements[0], exp.Commit)
                session.cursor.execute("COMMIT" if commit else "ROLLBACK")
            session.in_transaction = False
            session.mutated.clear()
            self.current = None  # the adapter begins its next transaction in a new session
            return FakeJob()
        if session_id is not None:
            self._check_conflict(session_id, statements)
        else:
            self._check_queued(statements)
        params = {p.name: p.value for p in job_config.query_parameters}
        duck = ";".join(sqlglot.transpile(sql, read="bigquery", write="duckdb"))
        db = self.sessions[session_id].cursor if session_id else self.db
        if job_config.destination is not None:
            # A query job writing its result to a table: WRITE_TRUNCATE replaces it whole when
            # the job completes (created if missing), outside any session.
            assert not in_session and job_config.write_disposition == "WRITE_TRUNCATE"
            name = self._table(str(job_config.destination))
            db.execute(f'CREATE OR REPLACE TABLE "{name}" AS {duck}', params)
            return FakeJob()
        relation = db.sql(duck, params=params)
        return FakeJob(relation.to_arrow_table() if relation is not None else None)

    def delete_table(self, ref: str, not_found_ok: bool = False) -> None:
        self._event(f"delete {ref}")
        self.deleted.append(ref)
        table = self._table(ref)
        if not self._exists(table):
            if not_found_ok:
                return
            raise NotFound(ref)
        self.db.execute(f'DROP TABLE "{table}"')

    def load_table_from_file(
        self, file: Any, destination: str, job_config: bigquery.LoadJobConfig, location: Any = None
    ) -> FakeJob:
        self._event(f"load {destination}")
        data = pq.read_table(file)
        self.loads.append((destination, job_config, data))
        assert job_config.source_format == "PARQUET"
        assert job_config.write_disposition in ("WRITE_TRUNCATE", "WRITE_EMPTY")
        name, _, partition = self._table(destination).partition("$")
        self.db.register("_load", data)
        if job_config.write_disposition == "WRITE_EMPTY":
            # Into a table created beforehand (keeping its metadata), which must be empty.
            assert self._exists(name), destination
            assert self.db.execute(f'SELECT count(*) FROM "{name}"').fetchall() == [(0,)]
            self.db.execute(f'INSERT INTO "{name}" BY NAME SELECT * FROM _load')
        elif partition:
            column = job_config.time_partitioning.field
            day = datetime.strptime(partition, "%Y%m%d").date()
            # BigQuery rejects a row outside the decorated partition; so does the fake.
            assert set(data.column(column).to_pylist()) <= {day}
            self.db.execute(f'DELETE FROM "{name}" WHERE "{column}" = ?', [day])
            self.db.execute(f'INSERT INTO "{name}" BY NAME SELECT * FROM _load')
        else:
            self.db.execute(f'CREATE OR REPLACE TABLE "{name}" AS SELECT * FROM _load')
        self.db.unregister("_load")
        return FakeJob()


def make_source(path: Path) -> str:
    """A SQLite source with two charges (one repaid on the second day) and one row elsewhere."""
    with sqlite3.connect(path) as db:
        db.executescript((ROOT / "schema/source_sqlite.sql").read_text())
        t1, t2 = "2026-11-20T03:00:00.000000+00:00", "2026-11-21T03:00:00.000000+00:00"
        db.execute("INSERT INTO users VALUES (1, ?, 1990, 'Tokyo', NULL, 'active', ?)", (t1, t1))
        db.execute("INSERT INTO topups VALUES (1, 1, ?, 10000, 'bank', ?)", (t1, t1))
        db.execute(
            "INSERT INTO card_transactions VALUES (1, 1, ?, 500, 7, 'grocery', 'online', 'settled', ?)",
            (t1, t1),
        )
        db.executemany(
            "INSERT INTO deferred_charges VALUES (?, 1, ?, 3000, 300, '2026-12-27', 'outstanding', NULL, NULL, ?)",
            [(1, t1, t1), (2, t2, t2)],
        )
    return f"sqlite:///{path}"


def test_sync_through_bigquery_jobs(tmp_path: Path) -> None:
    client = FakeBigQueryClient()
    warehouse = BigQueryWarehouse("paylater-prod", "warehouse", client=client)
    source = open_source(make_source(tmp_path / "src.db"))
    specs = validate_tables(source, configured_tables())
    charges = next(s for s in specs if s.name == "deferred_charges")
    first = sync_table(source, warehouse, charges, date(2026, 11, 20))
    assert (first.rows_extracted, first.warehouse_rows) == (1, 1)
    with sqlite3.connect(tmp_path / "src.db") as db:
        db.execute(
            "UPDATE deferred_charges SET status = 'repaid', repaid_at = ?, updated_at = ? WHERE charge_id = 1",
            ("2026-11-21T05:00:00.000000+00:00", "2026-11-21T05:00:00.000000+00:00"),
        )
    second = sync_table(source, warehouse, charges, date(2026, 11, 21))
    assert (second.rows_extracted, second.rows_loaded, second.warehouse_rows) == (2, 2, 2)
    assert second.watermark_from == datetime(2026, 11, 20, 15, tzinfo=UTC)
    current = warehouse.query_arrow("SELECT charge_id, status FROM deferred_charges ORDER BY 1")
    assert current.to_pylist() == [
        {"charge_id": 1, "status": "repaid"},
        {"charge_id": 2, "status": "outstanding"},
    ]
    source.close()

    # Load jobs: one WRITE_TRUNCATE per day partition of the change table, through the decorator.
    destinations = [d for d, _, _ in client.loads]
    assert destinations == [
        "paylater-prod.warehouse.deferred_charges__changes$20261120",
        "paylater-prod.warehouse.deferred_charges__changes$20261121",
    ]
    _, config, data = client.loads[1]
    assert config.time_partitioning.field == "as_of"
    assert config.time_partitioning.type_ == "DAY"
    assert data.schema.field("updated_at").type == pa.timestamp("us", tz="UTC")
    assert data.column("as_of").to_pylist() == [date(2026, 11, 21)] * 2

    # The change table is created day-partitioned on as_of. The current table is not created
    # empty first: the first sync writes it whole from the day's partition, by one query job
    # with WRITE_TRUNCATE, outside the session, after the rows passed the checks.
    created = {t.table_id: t for t in client.created}
    assert created["deferred_charges__changes"].time_partitioning.field == "as_of"
    assert "deferred_charges" not in created
    (rebuilt,) = [(s, c) for s, c in client.queries if c.destination is not None]
    assert str(rebuilt[1].destination) == "paylater-prod.warehouse.deferred_charges"
    assert rebuilt[1].write_disposition == "WRITE_TRUNCATE"
    assert rebuilt[1].create_disposition == "CREATE_IF_NEEDED"
    assert not rebuilt[1].connection_properties
    assert isinstance(sqlglot.parse_one(rebuilt[0], read="bigquery"), exp.Select)
    assert [(p.name, p.value) for p in rebuilt[1].query_parameters] == [
        ("as_of", date(2026, 11, 20))
    ]
    assert {f.name: f.field_type for f in created["sync_ledger"].schema}[
        "watermark_to"
    ] == "TIMESTAMP"

    # MERGE and ledger writes run in one session transaction, with typed parameters.
    sqls = [sql for sql, _ in client.queries]
    begin = max(i for i, s in enumerate(sqls) if s == "BEGIN TRANSACTION")
    commit = max(i for i, s in enumerate(sqls) if s == "COMMIT TRANSACTION")
    inside = client.queries[begin + 1 : commit]
    merge_sql, merge_config = next((s, c) for s, c in inside if s.lstrip("-\n ").find("MERGE") >= 0)
    assert isinstance(sqlglot.parse(merge_sql, read="bigquery")[0], exp.Merge)
    commit_config = client.queries[commit][1]
    assert (
        merge_config.connection_properties[0].value == commit_config.connection_properties[0].value
    )
    assert [(p.name, p.type_, p.value) for p in merge_config.query_parameters] == [
        ("as_of", "DATE", date(2026, 11, 21))
    ]
    assert any("INSERT INTO sync_ledger" in s for s, _ in inside)
    ledger = warehouse.query_arrow("SELECT as_of, status FROM sync_ledger ORDER BY as_of")
    assert ledger.column("status").to_pylist() == ["succeeded", "succeeded"]


def test_failure_rolls_back_the_session_transaction(tmp_path: Path, monkeypatch) -> None:
    from tasks import sync

    client = FakeBigQueryClient()
    warehouse, source, charges = charges_sync(client, tmp_path / "src.db")

    def crash(*args: Any) -> None:
        raise OSError("connection reset")

    # After the current table was written (a job outside the transaction), before the commit.
    monkeypatch.setattr(sync, "ahead_warning", crash)
    with pytest.raises(OSError, match="connection reset"):
        sync_table(source, warehouse, charges, date(2026, 11, 20))
    source.close()
    sqls = [sql for sql, _ in client.queries]
    assert "ROLLBACK TRANSACTION" in sqls and "COMMIT TRANSACTION" not in sqls
    # The first sync's tables (a table API call or a job each, outside the transaction) are
    # dropped again: left, they would hold the failed load's rows, in the schema of a
    # configuration that may be what failed.
    assert not warehouse.table_exists("deferred_charges")
    assert not warehouse.table_exists("deferred_charges__changes")
    failed = warehouse.query_arrow("SELECT status, error FROM sync_ledger").to_pylist()
    assert failed == [{"status": "failed", "error": "OSError: connection reset"}]


def test_a_column_the_warehouse_table_lacks_fails_before_any_load_job(tmp_path: Path) -> None:
    # BigQuery would refuse the load into the change partition (its schema differs), after the
    # source was read; the sync says which column differs first, from the table's metadata.
    from tasks.sync import SchemaMismatch

    client = FakeBigQueryClient()
    warehouse, source, charges = charges_sync(client, tmp_path / "src.db")
    assert sync_table(source, warehouse, charges, date(2026, 11, 20)).status == "succeeded"
    assert warehouse.column_types("deferred_charges") == charges.columns
    loads = len(client.loads)
    wider = replace(charges, columns={**charges.columns, "channel": "string"})
    with pytest.raises(
        SchemaMismatch,
        match=r"the warehouse table deferred_charges does not hold .*: channel \(string\) is not",
    ):
        sync_table(source, warehouse, wider, date(2026, 11, 21))
    source.close()
    assert len(client.loads) == loads
    assert warehouse.column_types("missing_table") is None


def test_full_table_load_and_parameters(tmp_path: Path) -> None:
    client = FakeBigQueryClient()
    warehouse = BigQueryWarehouse("paylater-prod", "warehouse", client=client)
    warehouse.replace_table("users", pa.table({"user_id": [1, 2]}))
    destination, config, _ = client.loads[0]
    assert destination == "paylater-prod.warehouse.users"
    assert config.time_partitioning is None
    rows = warehouse.query_arrow(
        "SELECT COUNT(*) AS n FROM users WHERE user_id >= @lo AND @flag AND @name = 'x' AND @none IS NULL",
        {"lo": 1, "flag": True, "name": "x", "none": None},
    )
    assert rows.to_pylist() == [{"n": 2}]
    typed = [(p.name, p.type_) for p in client.queries[-1][1].query_parameters]
    assert typed == [("lo", "INT64"), ("flag", "BOOL"), ("name", "STRING"), ("none", "STRING")]
    assert warehouse.table_exists("users") and not warehouse.table_exists("nothing")


def test_urls() -> None:
    client = FakeBigQueryClient("my-proj", "dw")
    wh = BigQueryWarehouse.from_url("bigquery://my-proj/dw?location=asia-northeast1", client=client)
    assert (wh.project, wh.dataset, wh.location) == ("my-proj", "dw", "asia-northeast1")
    with pytest.raises(WarehouseError, match="bigquery://project/dataset"):
        BigQueryWarehouse.from_url("bigquery://my-proj", client=client)
    with pytest.raises(
        WarehouseError,
        match=r"BigQuery dataset \(in the warehouse URL\) 'dw; drop' is not a plain SQL identifier",
    ):
        BigQueryWarehouse.from_url("bigquery://my-proj/dw; drop", client=client)
    with pytest.raises(WarehouseError, match="unknown kind 'redshift'"):
        open_warehouse("redshift://cluster/db")
    # The warehouse URL is shown to say which one is wrong, never with its password.
    with pytest.raises(WarehouseError, match=r"'redshift://admin:\*\*\*@cluster:5439/db'"):
        open_warehouse("redshift://admin:Wr0ngSecret@cluster:5439/db")
    with pytest.raises(WarehouseError, match=r"credentials=\*\*\*'") as caught:
        BigQueryWarehouse.from_url("bigquery://p?credentials=Wr0ngSecret", client=client)
    assert "Wr0ngSecret" not in str(caught.value)


def recording_client(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeBigQueryClient, list[str]]:
    """A fake client and the list it records what it is sent in, in order: a load as "load
    <table>", a transaction script as its last line ("COMMIT TRANSACTION", ...), any other query
    as "query"."""
    client = FakeBigQueryClient()
    events: list[str] = []
    query, load = client.query, client.load_table_from_file

    def recorded_query(sql: str, *args: Any, **kwargs: Any) -> FakeJob:
        events.append(sql.strip().splitlines()[-1] if "BEGIN TRANSACTION" in sql else "query")
        return query(sql, *args, **kwargs)

    def recorded_load(file: Any, destination: str, *args: Any, **kwargs: Any) -> FakeJob:
        events.append(f"load {destination.rpartition('.')[2]}")
        return load(file, destination, *args, **kwargs)

    monkeypatch.setattr(client, "query", recorded_query)
    monkeypatch.setattr(client, "load_table_from_file", recorded_load)
    return client, events


def charges_sync(
    client: FakeBigQueryClient, path: Path
) -> tuple[BigQueryWarehouse, Source, TableSpec]:
    """A BigQuery warehouse on `client`, a new SQLite source at `path` and the validated
    deferred_charges table spec the sync tests run."""
    warehouse = BigQueryWarehouse("paylater-prod", "warehouse", client=client)
    source = open_source(make_source(path))
    charges = next(
        s for s in validate_tables(source, configured_tables()) if s.name == "deferred_charges"
    )
    return warehouse, source, charges


def test_deletes_propagate_loads_the_source_keys_before_the_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # BigQuery's transaction reads its tables as of its first statement: the source keys must
    # be loaded before it, or the DELETE would compare with yesterday's keys (or no table).
    from dataclasses import replace

    from tasks.sync import CountMismatch

    client, events = recording_client(monkeypatch)
    warehouse, source, charges = charges_sync(client, tmp_path / "src.db")
    sync_table(source, warehouse, charges, date(2026, 11, 21))
    with sqlite3.connect(tmp_path / "src.db") as db:
        db.execute("DELETE FROM deferred_charges WHERE charge_id = 1")
    with pytest.raises(
        CountMismatch, match=r"at least 1 row held in the warehouse no longer exists"
    ):
        sync_table(source, warehouse, charges, date(2026, 11, 22))  # deletes: fail
    events.clear()
    result = sync_table(
        source, warehouse, replace(charges, deletes="propagate"), date(2026, 11, 22)
    )
    source.close()
    assert (result.rows_deleted, result.warehouse_rows) == (1, 1)
    assert events.index("load deferred_charges__source_keys") < events.index("BEGIN TRANSACTION")
    held = warehouse.query_arrow("SELECT charge_id FROM deferred_charges").to_pylist()
    assert held == [{"charge_id": 2}]


@pytest.mark.parametrize("fails", [False, True])
def test_the_source_keys_table_is_dropped_once_the_transaction_ends(
    tmp_path: Path, monkeypatch, fails: bool
) -> None:
    # `<table>__source_keys` (every source key, loaded for deletes: propagate) stayed in the
    # dataset after each sync: a copy of the keys nobody reads, billed as storage. A transaction
    # takes no DDL on it, so it goes once the transaction has committed or rolled back.
    from tasks import sync

    client = FakeBigQueryClient()
    events: list[str] = []
    query, delete = client.query, client.delete_table

    def recorded_query(sql: str, *args: Any, **kwargs: Any) -> FakeJob:
        events.append(sql.strip())
        return query(sql, *args, **kwargs)

    def recorded_delete(ref: str, *args: Any, **kwargs: Any) -> None:
        events.append(f"delete {ref.rpartition('.')[2]}")
        delete(ref, *args, **kwargs)

    monkeypatch.setattr(client, "query", recorded_query)
    monkeypatch.setattr(client, "delete_table", recorded_delete)
    warehouse, source, charges = charges_sync(client, tmp_path / "src.db")
    propagate = replace(charges, deletes="propagate")
    sync_table(source, warehouse, propagate, date(2026, 11, 21))
    if fails:

        def crash(*args: Any) -> None:
            raise OSError("connection reset")

        monkeypatch.setattr(sync, "ahead_warning", crash)
        with pytest.raises(OSError, match="connection reset"):
            sync_table(source, warehouse, propagate, date(2026, 11, 22))
    source.close()
    end = "ROLLBACK TRANSACTION" if fails else "COMMIT TRANSACTION"
    last_end = len(events) - 1 - events[::-1].index(end)
    assert "delete deferred_charges__source_keys" in events[last_end:]
    assert not warehouse.table_exists("deferred_charges__source_keys")


def test_a_reread_deletes_and_counts_the_gone_rows_and_keeps_the_later_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reread (deletes: fail kept) replaced the table with the history up to the watermark: the
    # row deleted at the source went uncounted, and a row changed after the watermark went too,
    # until the next day's sync. Its source keys now load before the transaction, as for
    # deletes: propagate, and are dropped once it has ended.
    client, events = recording_client(monkeypatch)
    warehouse, source, charges = charges_sync(client, tmp_path / "src.db")
    day = date(2026, 11, 21)  # ends 2026-11-21 15:00 UTC
    sync_table(source, warehouse, charges, day)
    with sqlite3.connect(tmp_path / "src.db") as db:
        db.execute("DELETE FROM deferred_charges WHERE charge_id = 1")
        db.execute(
            "UPDATE deferred_charges SET status = 'repaid',"
            " updated_at = '2026-11-22T01:00:00.000000+00:00' WHERE charge_id = 2"
        )
    events.clear()
    try:
        result = sync_table(source, warehouse, charges, day, reread=True)
    finally:
        source.close()
    assert (result.status, result.rows_deleted, result.warehouse_rows) == ("succeeded", 1, 1)
    assert events.index("load deferred_charges__source_keys") < events.index("BEGIN TRANSACTION")
    held = warehouse.query_arrow("SELECT charge_id, status FROM deferred_charges").to_pylist()
    assert held == [{"charge_id": 2, "status": "outstanding"}]  # its version of that day
    assert not warehouse.table_exists("deferred_charges__source_keys")


def test_the_ledger_marks_a_reread_and_an_earlier_ledger_gains_the_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A ledger created by an earlier release lacks `reread`: it gains the column by a DDL
    # statement BigQuery accepts (parsed by the fake), NULL in the rows it held; the reread's
    # row says so, typed BOOL in the insert's parameters.
    from tasks import sync

    client = FakeBigQueryClient()
    warehouse, source, charges = charges_sync(client, tmp_path / "src.db")
    old = pa.schema([f for f in sync.LEDGER_SCHEMA if f.name != "reread"])
    warehouse.create_table_if_missing(sync.LEDGER, old)
    try:
        first = sync_table(source, warehouse, charges, date(2026, 11, 20))
        again = sync_table(source, warehouse, charges, date(2026, 11, 21), reread=True)
    finally:
        source.close()
    assert (first.reread, again.reread) == (False, True)
    alters = [s for s, _ in client.queries if s.startswith("ALTER TABLE")]
    assert alters == ["ALTER TABLE sync_ledger ADD COLUMN IF NOT EXISTS reread BOOL"]
    inserts = [c for s, c in client.queries if "INSERT INTO sync_ledger" in s]
    typed = {p.name: (p.type_, p.value) for p in inserts[-1].query_parameters}
    assert typed["reread"] == ("BOOL", True)
    ledger = warehouse.query_arrow("SELECT as_of, reread FROM sync_ledger ORDER BY as_of")
    assert ledger.to_pylist() == [
        {"as_of": date(2026, 11, 20), "reread": False},
        {"as_of": date(2026, 11, 21), "reread": True},
    ]


def source_keys_created(client: FakeBigQueryClient) -> list[bigquery.Table]:
    """The `deferred_charges__source_keys` tables the adapter created, in order."""
    return [t for t in client.created if t.table_id == "deferred_charges__source_keys"]


def test_a_source_keys_table_left_by_a_killed_run_expires_and_the_next_run_drops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process killed between loading `<table>__source_keys` and dropping it left every source
    # key in the dataset for good (no expiration; only the table's next propagating sync
    # replaced it). It is now created with an expiration before anything is loaded into it,
    # so a leftover goes by itself, and the table's next sync drops it whatever its policy.
    from tasks import sync

    client = FakeBigQueryClient()
    warehouse, source, charges = charges_sync(client, tmp_path / "src.db")
    propagate = replace(charges, deletes="propagate")
    try:
        sync_table(source, warehouse, charges, date(2026, 11, 20))
        with sqlite3.connect(tmp_path / "src.db") as db:
            db.execute("DELETE FROM deferred_charges WHERE charge_id = 1")
        # Killed after the load: the drop never runs.
        monkeypatch.setattr(BigQueryWarehouse, "drop_table", lambda self, table: None)
        before = datetime.now(UTC)
        assert sync_table(source, warehouse, propagate, date(2026, 11, 21)).rows_deleted == 1
        after = datetime.now(UTC)
        monkeypatch.undo()
        (created,) = source_keys_created(client)
        assert created.expires is not None
        assert before + sync.SOURCE_KEYS_EXPIRE <= created.expires
        assert created.expires <= after + sync.SOURCE_KEYS_EXPIRE
        load = next(c for d, c, _ in client.loads if d.endswith("__source_keys"))
        # Loaded into the table as created: WRITE_TRUNCATE may replace its metadata.
        assert load.write_disposition == "WRITE_EMPTY"
        assert warehouse.table_exists("deferred_charges__source_keys")  # the leftover

        # The next day, the policy back to fail (no keys read): the leftover is dropped.
        result = sync_table(source, warehouse, charges, date(2026, 11, 22))
    finally:
        source.close()
    assert result.status == "succeeded"
    assert not warehouse.table_exists("deferred_charges__source_keys")


def test_a_stale_source_keys_table_without_expiration_is_replaced_not_read(
    tmp_path: Path,
) -> None:
    # A leftover of an earlier release (no expiration, yesterday's keys, any schema) is dropped
    # before the day's keys are loaded into a new table with an expiration: the stale keys
    # never decide what is deleted.
    client = FakeBigQueryClient()
    warehouse, source, charges = charges_sync(client, tmp_path / "src.db")
    propagate = replace(charges, deletes="propagate")
    try:
        sync_table(source, warehouse, propagate, date(2026, 11, 20))
        warehouse.replace_table(
            "deferred_charges__source_keys", pa.table({"charge_id": [1, 99], "note": ["x", "y"]})
        )
        with sqlite3.connect(tmp_path / "src.db") as db:
            db.execute("DELETE FROM deferred_charges WHERE charge_id = 1")
        result = sync_table(source, warehouse, propagate, date(2026, 11, 21))
    finally:
        source.close()
    assert (result.status, result.rows_deleted, result.warehouse_rows) == ("succeeded", 1, 1)
    created = source_keys_created(client)
    assert created and all(t.expires is not None for t in created)
    assert not warehouse.table_exists("deferred_charges__source_keys")


def test_a_failed_later_sync_keeps_the_tables_an_earlier_one_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the tables a failed run created itself are dropped: a later day's failure leaves the
    # synced table and its history as the rollback left them.
    from tasks import sync

    client = FakeBigQueryClient()
    warehouse, source, charges = charges_sync(client, tmp_path / "src.db")
    try:
        sync_table(source, warehouse, charges, date(2026, 11, 20))

        def crash(*args: Any) -> None:
            raise OSError("connection reset")

        monkeypatch.setattr(sync, "merge_changes", crash)
        with pytest.raises(OSError, match="connection reset"):
            sync_table(source, warehouse, charges, date(2026, 11, 21))
    finally:
        source.close()
    held = warehouse.query_arrow("SELECT charge_id FROM deferred_charges").to_pylist()
    assert held == [{"charge_id": 1}]
    assert warehouse.table_exists("deferred_charges__changes")
    assert client.deleted == ["paylater-prod.warehouse.deferred_charges__source_keys"] * 2


def test_a_value_the_listed_type_cannot_hold_fails_before_any_load_job(tmp_path: Path) -> None:
    # The cast to the listed type runs while the Parquet file for the load is written: the table
    # fails naming its column (not the value), and no load job is sent for the day.
    from tasks.sync import SchemaMismatch

    client = FakeBigQueryClient()
    warehouse, source, charges = charges_sync(client, tmp_path / "src.db")
    try:
        sync_table(source, warehouse, charges, date(2026, 11, 20))
        loads = len(client.loads)
        with sqlite3.connect(tmp_path / "src.db") as db:
            db.execute(
                "UPDATE deferred_charges SET fee_jpy = '12.5',"
                " updated_at = '2026-11-21T01:00:00.000000+00:00' WHERE charge_id = 2"
            )
        with pytest.raises(
            SchemaMismatch, match=r"^sync of deferred_charges: column fee_jpy holds a value"
        ) as err:
            sync_table(source, warehouse, charges, date(2026, 11, 21))
    finally:
        source.close()
    assert "12.5" not in str(err.value)
    assert len(client.loads) == loads
    failed = warehouse.query_arrow("SELECT error FROM sync_ledger WHERE status = 'failed'")
    assert failed.to_pylist() == [{"error": f"SchemaMismatch: {err.value}"}]


# Where a first sync can die: before the change partition's load (the tables created), before
# the transaction's first statement (the partition loaded), at the ledger row, at the commit.
FIRST_SYNC_KILLS = [
    "load paylater-prod.warehouse.deferred_charges__changes$",
    "query BEGIN TRANSACTION",
    "query -- The outcome of one table's sync",
    "query COMMIT TRANSACTION",
]


def held_charges(warehouse: BigQueryWarehouse) -> list[dict[str, Any]]:
    """The current deferred_charges rows, by key: id, status and change time."""
    sql = "SELECT charge_id, status, updated_at FROM deferred_charges ORDER BY charge_id"
    return warehouse.query_arrow(sql).to_pylist()


def source_charges(path: Path) -> list[dict[str, Any]]:
    """The source's deferred_charges rows, as held_charges shows the warehouse's."""
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT charge_id, status, updated_at FROM deferred_charges ORDER BY charge_id"
        ).fetchall()
    return [
        {"charge_id": i, "status": s, "updated_at": datetime.fromisoformat(u)} for i, s, u in rows
    ]


@pytest.mark.parametrize("kill", FIRST_SYNC_KILLS)
def test_a_first_sync_killed_midway_shows_no_partial_table_and_the_next_sync_rebuilds_it(
    tmp_path: Path, kill: str
) -> None:
    # A first sync killed after its tables were created (a table API call each, outside the
    # transaction) left the current table empty under its real name for readers to take as
    # the source's, and, of a configuration changed since, in a schema every later sync
    # refused (SchemaMismatch) until altered by hand. Now the current table appears whole, by
    # one atomic job, or not at all, and a table no succeeded ledger row vouches for is
    # rebuilt whole by the next sync.
    client = FakeBigQueryClient()
    warehouse, source, charges = charges_sync(client, tmp_path / "src.db")
    client.kill_when = lambda event: event.startswith(kill)
    try:
        with pytest.raises(Killed):
            sync_table(source, warehouse, charges, date(2026, 11, 20))
        client.revive()
        later = BigQueryWarehouse("paylater-prod", "warehouse", client=client)  # a new process
        first_day = [r for r in source_charges(tmp_path / "src.db") if r["charge_id"] == 1]
        if later.table_exists("deferred_charges"):
            assert held_charges(later) == first_day  # whole, never empty or partial
        with sqlite3.connect(tmp_path / "src.db") as db:
            db.execute(
                "UPDATE deferred_charges SET status = 'repaid',"
                " updated_at = '2026-11-21T05:00:00.000000+00:00' WHERE charge_id = 1"
            )
        # The next run comes with a narrower configuration (the killed one may have been wrong).
        narrower = replace(
            charges, columns={k: v for k, v in charges.columns.items() if k != "fee_jpy"}
        )
        result = sync_table(source, later, narrower, date(2026, 11, 21))
    finally:
        source.close()
    assert (result.status, result.rows_extracted, result.warehouse_rows) == ("succeeded", 2, 2)
    assert held_charges(later) == source_charges(tmp_path / "src.db")
    assert later.column_types("deferred_charges") == narrower.columns
    ledger = later.query_arrow("SELECT as_of, status FROM sync_ledger").to_pylist()
    assert ledger == [{"as_of": date(2026, 11, 21), "status": "succeeded"}]


def test_a_full_table_killed_before_its_first_load_leaves_no_empty_table(tmp_path: Path) -> None:
    # A full table's first sync created it empty by a table API call, then replaced it by its
    # WRITE_TRUNCATE load: killed in between, the empty table stood under its name. It is now
    # created with its rows by one atomic job, once they have loaded (into a scratch table).
    client = FakeBigQueryClient()
    warehouse, source, charges = charges_sync(client, tmp_path / "src.db")
    full = replace(charges, mode="full")
    client.kill_when = lambda event: event.startswith("load paylater-prod.warehouse.deferred_")
    try:
        with pytest.raises(Killed):
            sync_table(source, warehouse, full, date(2026, 11, 21))
        client.revive()
        assert not warehouse.table_exists("deferred_charges")
        result = sync_table(source, warehouse, full, date(2026, 11, 21))
    finally:
        source.close()
    assert (result.status, result.warehouse_rows) == ("succeeded", 2)
    assert held_charges(warehouse) == source_charges(tmp_path / "src.db")
    assert "deferred_charges" not in {t.table_id for t in client.created}


def test_a_full_table_that_fails_its_checks_keeps_its_previous_copy(tmp_path: Path) -> None:
    # A full table was replaced by its WRITE_TRUNCATE load before any check could read it: a
    # load that failed its checks (here a repeated key) stayed under the table's name, the
    # previous copy lost, while the ledger said the day failed. The rows now load into a
    # scratch table, are checked there, and replace the table by one atomic job only then.
    from tasks.sync import KeyViolation

    client = FakeBigQueryClient()
    warehouse, source, charges = charges_sync(client, tmp_path / "src.db")
    full = replace(charges, mode="full")
    try:
        assert sync_table(source, warehouse, full, date(2026, 11, 21)).status == "succeeded"
        before = held_charges(warehouse)
        with sqlite3.connect(tmp_path / "src.db") as db:
            db.execute("UPDATE deferred_charges SET status = 'repaid' WHERE charge_id = 1")
        by_user = replace(full, primary_key=("user_id",), key_enforced=False)
        with pytest.raises(KeyViolation, match="user_id=1 in 2 rows"):
            sync_table(source, warehouse, by_user, date(2026, 11, 22))
        assert held_charges(warehouse) == before
        assert not warehouse.table_exists("deferred_charges__staged")
        result = sync_table(source, warehouse, full, date(2026, 11, 22))
    finally:
        source.close()
    assert (result.status, result.warehouse_rows) == ("succeeded", 2)
    assert held_charges(warehouse) == source_charges(tmp_path / "src.db")
    staged = [t for t in client.created if t.table_id == "deferred_charges__staged"]
    assert staged and all(t.expires is not None for t in staged)  # a killed run's goes by itself
    assert not warehouse.table_exists("deferred_charges__staged")


def test_a_failed_rebuild_keeps_a_table_it_did_not_create(tmp_path: Path) -> None:
    # A table no ledger row vouches for may still be one loaded by other means (a migration
    # before the sync ran): a rebuild that fails its checks leaves it as it was, not dropped.
    from tasks.sync import KeyViolation

    client = FakeBigQueryClient()
    warehouse, source, charges = charges_sync(client, tmp_path / "src.db")
    warehouse.create_table_if_missing("deferred_charges", charges.arrow_schema())
    client.db.execute("INSERT INTO deferred_charges (charge_id, status) VALUES (99, 'migrated')")
    by_user = replace(charges, primary_key=("user_id",), key_enforced=False)
    try:
        with pytest.raises(KeyViolation):
            sync_table(source, warehouse, by_user, date(2026, 11, 21))
    finally:
        source.close()
    held = warehouse.query_arrow("SELECT charge_id, status FROM deferred_charges").to_pylist()
    assert held == [{"charge_id": 99, "status": "migrated"}]
    assert not warehouse.table_exists("deferred_charges__changes")  # the run's own: dropped


def killed_mid_transaction(tmp_path: Path) -> tuple[FakeBigQueryClient, Source, TableSpec, str]:
    """A first day synced, then the second day's sync killed inside its transaction, at its ledger
    row: its DELETE FROM sync_ledger and MERGE have run, uncommitted; the session it leaves open
    (its id returned), the client revived for a new process."""
    client = FakeBigQueryClient()
    warehouse, source, charges = charges_sync(client, tmp_path / "src.db")
    assert sync_table(source, warehouse, charges, date(2026, 11, 20)).status == "succeeded"
    with sqlite3.connect(tmp_path / "src.db") as db:
        db.execute(
            "UPDATE deferred_charges SET status = 'repaid',"
            " updated_at = '2026-11-21T05:00:00.000000+00:00' WHERE charge_id = 1"
        )
    client.kill_when = lambda event: event.startswith("query -- The outcome of one table's sync")
    with pytest.raises(Killed):
        sync_table(source, warehouse, charges, date(2026, 11, 21))
    client.revive()
    (left,) = [i for i, s in client.sessions.items() if s.in_transaction]
    assert {"sync_ledger", "deferred_charges"} <= client.sessions[left].mutated
    return client, source, charges, left


def test_a_session_left_open_by_a_killed_sync_is_aborted_by_the_next_one(tmp_path: Path) -> None:
    # A sync killed inside its transaction left its session open, the transaction uncommitted
    # after its DELETE FROM sync_ledger and MERGE: BigQuery keeps such a session until it has been
    # idle 24 hours and cancels every other transaction mutating those tables meanwhile, so the
    # rerun (and every table's next sync, all writing the ledger) failed with a concurrent-update
    # error for up to a day. The session is now recorded in sync_sessions when it begins, and the
    # next transaction ends every recorded one (CALL BQ.ABORT_SESSION) before it begins its own.
    client, source, charges, left = killed_mid_transaction(tmp_path)
    later = BigQueryWarehouse("paylater-prod", "warehouse", client=client)  # a new process
    try:
        result = sync_table(source, later, charges, date(2026, 11, 21))
    finally:
        source.close()
    assert (result.status, result.warehouse_rows) == ("succeeded", 2)
    assert held_charges(later) == source_charges(tmp_path / "src.db")
    ledger = later.query_arrow("SELECT as_of, status FROM sync_ledger ORDER BY as_of").to_pylist()
    assert ledger == [
        {"as_of": date(2026, 11, 20), "status": "succeeded"},
        {"as_of": date(2026, 11, 21), "status": "succeeded"},
    ]
    sqls = [s for s, _ in client.queries]
    # Ended before the new transaction began.
    assert sqls.index(f"CALL BQ.ABORT_SESSION('{left}')") < len(sqls) - sqls[::-1].index(
        "BEGIN TRANSACTION"
    )
    assert left in client.aborted
    # Each run also ends its own session once its transaction has ended: none is left open,
    # and the record of sessions is empty again.
    assert client.sessions == {}
    assert later.query_arrow("SELECT session_id FROM sync_sessions").num_rows == 0


def test_a_reader_never_ends_a_recorded_session_only_a_sync_does(tmp_path: Path) -> None:
    # Every warehouse connection ended every recorded session at its first statement, and a
    # recorded session may be a sync still running in another process: the monitoring report or
    # a feature build reading the warehouse meanwhile rolled that sync back. Readers now leave
    # recorded sessions alone; the next sync ends them before its first statement.
    client, source, charges, left = killed_mid_transaction(tmp_path)
    reader = BigQueryWarehouse("paylater-prod", "warehouse", client=client)  # a report
    assert reader.query_arrow("SELECT COUNT(*) AS n FROM sync_ledger").num_rows == 1
    assert left not in client.aborted and left in client.sessions
    later = BigQueryWarehouse("paylater-prod", "warehouse", client=client)
    try:
        assert sync_table(source, later, charges, date(2026, 11, 21)).status == "succeeded"
    finally:
        source.close()
    assert left in client.aborted


def test_a_conflict_with_a_session_the_sync_cannot_end_names_the_cause_and_the_fix(
    tmp_path: Path,
) -> None:
    # A session the record does not hold (left by a release before it, or its row deleted by
    # hand) still holds its transaction: the sync fails with an error that says what holds the
    # tables and how to end it, not BigQuery's bare "concurrent update".
    client, source, charges, left = killed_mid_transaction(tmp_path)
    client.db.execute("DELETE FROM sync_sessions")
    later = BigQueryWarehouse("paylater-prod", "warehouse", client=client)
    try:
        with pytest.raises(WarehouseError) as caught:
            sync_table(source, later, charges, date(2026, 11, 21))
    finally:
        source.close()
    message = str(caught.value)
    assert "concurrent update against table paylater-prod.warehouse.deferred_charges" in message
    assert "killed inside its transaction" in message and "24 hours" in message
    assert "INFORMATION_SCHEMA.SESSIONS_BY_USER" in message
    assert "CALL BQ.ABORT_SESSION('<session id>')" in message
    assert isinstance(caught.value.__cause__, BadRequest)
    # Ended by hand as the message says, the next sync succeeds.
    client.query(
        f"CALL BQ.ABORT_SESSION('{left}')",
        bigquery.QueryJobConfig(default_dataset="paylater-prod.warehouse"),
    )
    source = open_source(f"sqlite:///{tmp_path / 'src.db'}")
    try:
        assert sync_table(source, later, charges, date(2026, 11, 21)).status == "succeeded"
    finally:
        source.close()


def test_the_unparsed_allow_list_is_what_sqlglot_cannot_parse() -> None:
    # The fake lets through the statements of UNPARSED_ALLOWED unparsed: each must still be one
    # sqlglot cannot parse (once it can, the fake parses it like any other), and any other
    # statement sqlglot cannot parse still fails.
    abort = "CALL BQ.ABORT_SESSION('CgwKCmZvby1wcm9qZWN0EAE')"
    assert ABORT_SESSION.match(abort)
    assert isinstance(sqlglot.parse_one(abort, read="bigquery"), exp.Command)
    client = FakeBigQueryClient()
    config = bigquery.QueryJobConfig(default_dataset="paylater-prod.warehouse")
    with pytest.raises(AssertionError):
        client.query("CALL BQ.JOBS.CANCEL('job-1')", config)
    with pytest.raises(AssertionError):
        client.query("CALL BQ.ABORT_SESSION('x'); DROP TABLE sync_ledger", config)


@pytest.mark.parametrize("age_days", [1, 8])
def test_a_recorded_session_bigquery_no_longer_knows_is_forgotten_once_surely_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, age_days: int
) -> None:
    # A recorded session the abort fails for (ended by hand, or idle 24 hours) does not fail
    # the sync: it is named in a warning and its record kept for the next run, until BigQuery's
    # longest session lifetime (7 days) has passed since it began, when it is surely gone.
    client = FakeBigQueryClient()
    warehouse, source, charges = charges_sync(client, tmp_path / "src.db")
    warehouse.create_table_if_missing("sync_sessions", SESSIONS_SCHEMA)
    began = datetime.now(UTC) - timedelta(days=age_days)
    client.db.execute("INSERT INTO sync_sessions VALUES ('gone-session', ?, 'host pid 1')", [began])
    try:
        assert sync_table(source, warehouse, charges, date(2026, 11, 20)).status == "succeeded"
    finally:
        source.close()
    left = warehouse.query_arrow("SELECT session_id FROM sync_sessions").to_pylist()
    assert left == ([{"session_id": "gone-session"}] if age_days < 7 else [])
    warned = [r.getMessage() for r in caplog.records if "gone-session" in r.getMessage()]
    assert bool(warned) == (age_days < 7)
    assert client.sessions == {}


def test_a_sync_failing_before_its_transaction_ends_the_left_session_first(tmp_path: Path) -> None:
    # The sessions a killed run left were ended at the next transaction's first statement: a
    # sync failing before it (here its columns differ from the warehouse's) wrote its failed
    # ledger row by a DELETE outside any transaction, which BigQuery queues behind the left
    # transaction (holding the ledger) for up to a day. They are now ended at the warehouse's
    # first statement, whatever it is.
    from tasks.sync import SchemaMismatch

    client, source, charges, left = killed_mid_transaction(tmp_path)
    later = BigQueryWarehouse("paylater-prod", "warehouse", client=client)
    wider = replace(charges, columns={**charges.columns, "channel": "string"})
    try:
        with pytest.raises(SchemaMismatch):
            sync_table(source, later, wider, date(2026, 11, 21))
    finally:
        source.close()
    assert left in client.aborted and client.queued == []
    ledger = later.query_arrow("SELECT as_of, status FROM sync_ledger ORDER BY as_of").to_pylist()
    assert ledger[-1] == {"as_of": date(2026, 11, 21), "status": "failed"}


def test_a_failed_rerun_of_a_synced_day_keeps_its_row_succeeded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The failed rerun rolled back (its MERGE never committed): the day's row stays the succeeded
    # run's, the attempt recorded on it by an UPDATE whose parameters BigQuery can type.
    from tasks import sync

    client = FakeBigQueryClient()
    warehouse, source, charges = charges_sync(client, tmp_path / "src.db")
    day = date(2026, 11, 21)
    try:
        good = sync_table(source, warehouse, charges, day)

        def killed(*args: Any) -> None:
            raise OSError("connection reset")

        monkeypatch.setattr(sync, "apply_increment", killed)
        monkeypatch.setattr(sync, "merge_changes", killed)
        with pytest.raises(OSError, match="connection reset"):
            sync_table(source, warehouse, charges, day)
    finally:
        source.close()
    (row,) = warehouse.query_arrow(
        "SELECT status, error, finished_at, failed_at, warehouse_rows FROM sync_ledger"
    ).to_pylist()
    assert (row["status"], row["error"]) == ("succeeded", "OSError: connection reset")
    assert row["finished_at"] == good.finished_at and row["failed_at"] > good.finished_at
    assert row["warehouse_rows"] == good.warehouse_rows
    (update,) = [c for s, c in client.queries if "UPDATE sync_ledger" in s]
    typed = {p.name: p.type_ for p in update.query_parameters}
    assert (typed["failed_at"], typed["error"]) == ("TIMESTAMP", "STRING")
