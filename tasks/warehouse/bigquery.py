"""BigQuery warehouse (production) through google-cloud-bigquery.

Queries and DML run as query jobs in the dataset named by the URL (the default dataset, so SQL
names tables without qualification), parameters as typed ScalarQueryParameters. Data arrives by
Parquet load jobs: a whole table with WRITE_TRUNCATE, or one day partition through the partition
decorator (`table$YYYYMMDD`) with WRITE_TRUNCATE, which BigQuery applies atomically. Statements
inside `transaction()` run in a session as one multi-statement transaction; the session begins
lazily at the first statement, so a load job issued first (a change partition) is complete and
visible before the transaction reads it. Load jobs cannot join a transaction; each is atomic and
idempotent on its own, so a crash between the load and the commit is repaired by the rerun.
A whole table built from a query (a first sync's) is written by one query job with
WRITE_TRUNCATE, atomic as well, outside the session.

Sessions: BigQuery ends a session only when told (CALL BQ.ABORT_SESSION) or once it has been
idle 24 hours (7 days at most); a transaction in it stays open until COMMIT, ROLLBACK or that
end. An open transaction that has mutated a table (DELETE, UPDATE, MERGE) makes every other
transaction mutating that table be cancelled ("concurrent update"), and DML outside a
transaction wait. So a process killed inside a transaction would block every later one on those
tables (the sync's ledger among them) for up to a day. Each session is therefore recorded in
SESSIONS_TABLE as soon as it is created, before its first statement; a sync, before its first
statement, ends every recorded session (end_left_sessions; other connections never do, or a
report reading the warehouse would end a sync running meanwhile); and each session is ended as
soon as its transaction has committed or rolled back, its record deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from paylater.redaction import redact
from tasks.warehouse.base import WarehouseError
from tasks.warehouse.duckdb import check_identifier

log = logging.getLogger(__name__)
_PROJECT = re.compile(r"^[a-z][a-z0-9.:-]*[a-z0-9]$")
# A session id as BigQuery returns it (URL-safe base64): checked before it is quoted into the
# CALL, which takes it as a string literal.
_SESSION_ID = re.compile(r"^[A-Za-z0-9_=+/-]{1,1024}$")
# The sessions this adapter has begun and not yet ended (see the module docstring).
SESSIONS_TABLE = "sync_sessions"
SESSIONS_SCHEMA = pa.schema(
    [
        ("session_id", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("started_by", pa.string()),
    ]
)
# BigQuery ends every session this long after its creation at the latest: a record older than
# that is of a session gone, whatever ending it said.
SESSION_MAX_AGE = timedelta(days=7)
# BigQuery's words for a transaction cancelled by another one mutating the same table.
_CONFLICT = re.compile(r"concurrent update", re.IGNORECASE)
_BQ_TYPES = {
    "int64": "INT64",
    "double": "FLOAT64",
    "bool": "BOOL",
    "string": "STRING",
    "large_string": "STRING",
    "date32[day]": "DATE",
}


# The sync's type names of BigQuery's column types (legacy names included, as the API reports
# them for tables created through it).
_TYPE_NAMES = {
    "INT64": "int64",
    "INTEGER": "int64",
    "FLOAT64": "float64",
    "FLOAT": "float64",
    "BOOL": "bool",
    "BOOLEAN": "bool",
    "STRING": "string",
    "DATE": "date",
    "TIMESTAMP": "timestamp",
}


def bigquery_type(arrow_type: pa.DataType) -> str:
    """The BigQuery column type of an Arrow type."""
    if pa.types.is_timestamp(arrow_type):
        return "TIMESTAMP"
    if pa.types.is_integer(arrow_type):
        return "INT64"
    try:
        return _BQ_TYPES[str(arrow_type)]
    except KeyError:
        raise WarehouseError(f"no BigQuery type for Arrow type {arrow_type}") from None


def query_parameter(name: str, value: Any) -> Any:
    """A typed ScalarQueryParameter; None is a STRING NULL (SQL casts it where it matters)."""
    from google.cloud import bigquery

    if value is None:
        return bigquery.ScalarQueryParameter(name, "STRING", None)
    if isinstance(value, bool):
        return bigquery.ScalarQueryParameter(name, "BOOL", value)
    if isinstance(value, int):
        return bigquery.ScalarQueryParameter(name, "INT64", value)
    if isinstance(value, float):
        return bigquery.ScalarQueryParameter(name, "FLOAT64", value)
    if isinstance(value, str):
        return bigquery.ScalarQueryParameter(name, "STRING", value)
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return bigquery.ScalarQueryParameter(name, "TIMESTAMP", aware)
    if isinstance(value, date):
        return bigquery.ScalarQueryParameter(name, "DATE", value)
    raise WarehouseError(f"query parameter @{name} has unsupported type {type(value).__name__}")


class BigQueryWarehouse:
    """One BigQuery dataset as the warehouse."""

    dialect = "bigquery"

    def __init__(
        self, project: str, dataset: str, client: Any = None, location: str | None = None
    ) -> None:
        if client is None:
            from google.cloud import bigquery

            client = bigquery.Client(project=project, location=location)
        self.client = client
        if not _PROJECT.match(project):
            raise WarehouseError(f"{project!r} is not a BigQuery project id")
        self.project = project
        self.dataset = check_identifier(dataset, "BigQuery dataset (in the warehouse URL)")
        self.location = location
        self._transaction_wanted = False
        self._session_id: str | None = None
        # Whether the sessions killed processes left have been ended (by a sync, at its start).
        self._left_ended = False
        self._sessions_table_ready = False

    @classmethod
    def from_url(cls, url: str, client: Any = None) -> BigQueryWarehouse:
        """bigquery://project/dataset (optionally ?location=asia-northeast1)."""
        parts = urlsplit(url)
        dataset = parts.path.strip("/")
        if not parts.netloc or not dataset or "/" in dataset:
            raise WarehouseError(f"warehouse URL {redact(url)!r}: use bigquery://project/dataset")
        location = parse_qs(parts.query).get("location", [None])[0]
        return cls(parts.netloc, dataset, client=client, location=location)

    def _ref(self, table: str) -> str:
        """Fully qualified table id."""
        return f"{self.project}.{self.dataset}.{check_identifier(table)}"

    def _job_config(
        self, params: Mapping[str, Any] | None = None, in_session: bool = True, **extra: Any
    ) -> Any:
        """A query job config: default dataset, typed parameters, and the session if one is open
        (unless `in_session` is False)."""
        from google.cloud import bigquery

        config = bigquery.QueryJobConfig(
            default_dataset=f"{self.project}.{self.dataset}",
            query_parameters=[query_parameter(k, v) for k, v in (params or {}).items()],
            **extra,
        )
        if in_session and self._session_id:
            config.connection_properties = [
                bigquery.ConnectionProperty("session_id", self._session_id)
            ]
        return config

    def _query(
        self, sql: str, params: Mapping[str, Any] | None = None, in_session: bool = True
    ) -> Any:
        """Run one query job to completion (in the open session unless `in_session` is False)
        and return it; a transaction cancelled by another is a WarehouseError naming both."""
        config = self._job_config(params, in_session=in_session)
        try:
            # The job's failure comes with result(); a client may raise it when sending the job.
            job = self.client.query(sql, job_config=config, location=self.location)
            job.result()
        except Exception as exc:
            if in_session and self._session_id and _CONFLICT.search(str(exc)):
                raise WarehouseError(conflict_message(exc)) from exc
            raise
        return job

    def _begin_if_wanted(self) -> None:
        """Open the session and its transaction at the first statement inside transaction(),
        and record it."""
        if self._transaction_wanted and self._session_id is None:
            job = self.client.query(
                "BEGIN TRANSACTION",
                job_config=self._job_config(create_session=True),
                location=self.location,
            )
            job.result()
            self._session_id = job.session_info.session_id
            self._ensure_sessions_table()
            # Before the transaction's first statement: a session killed before it is recorded
            # holds a transaction that has changed nothing, which conflicts with none.
            self._query(
                f"INSERT INTO {SESSIONS_TABLE} (session_id, started_at, started_by)"
                " VALUES (@session_id, @started_at, @started_by)",
                {
                    "session_id": self._session_id,
                    "started_at": datetime.now(UTC),
                    "started_by": f"{socket.gethostname()} pid {os.getpid()}",
                },
                in_session=False,
            )

    def _ensure_sessions_table(self) -> None:
        """Create SESSIONS_TABLE unless this connection has already made sure it exists."""
        if not self._sessions_table_ready:
            self.create_table_if_missing(SESSIONS_TABLE, SESSIONS_SCHEMA)
            self._sessions_table_ready = True

    def end_left_sessions(self) -> None:
        """End every recorded session (left by a killed process: a live one ends its own), so
        that its open transaction no longer blocks the tables it changed, and forget it once
        ended. Called by a sync before its first statement (tasks.sync.sync_table), not by every
        connection: a reader (the monitoring report, a feature build) would end a sync running
        meanwhile. Before the first statement, not the first of a transaction: DML outside a
        transaction on such a table (a failed sync's ledger row) would wait behind the left
        transaction, not fail.

        A session BigQuery no longer knows (ended by hand, idle 24 hours) cannot be aborted:
        its record stays, with a warning, until SESSION_MAX_AGE has passed, as BigQuery does
        not say whether the failure was that or something passing.
        """
        if self._left_ended:
            return
        self._ensure_sessions_table()
        left = self._query(
            f"SELECT session_id, started_at, started_by FROM {SESSIONS_TABLE}", in_session=False
        ).to_arrow()
        for row in left.to_pylist():
            try:
                self.abort_session(row["session_id"])
            except Exception as exc:
                if datetime.now(UTC) - row["started_at"] < SESSION_MAX_AGE:
                    log.warning(
                        "BigQuery session %s (begun %s by %s, not ended by it) could not be"
                        " aborted: %s",
                        row["session_id"],
                        row["started_at"],
                        row["started_by"],
                        str(exc).splitlines()[0],
                    )
                    continue
            else:
                log.warning(
                    "aborted BigQuery session %s, begun %s by %s and not ended by it (killed"
                    " inside its transaction, or a sync still running): its transaction is"
                    " rolled back",
                    row["session_id"],
                    row["started_at"],
                    row["started_by"],
                )
            self._forget_session(row["session_id"])
        self._left_ended = True

    def abort_session(self, session_id: str) -> None:
        """End a session (CALL BQ.ABORT_SESSION), rolling back its open transaction if any."""
        if not _SESSION_ID.match(session_id):
            raise WarehouseError(f"{session_id!r} is not a BigQuery session id")
        self._query(f"CALL BQ.ABORT_SESSION('{session_id}')", in_session=False)

    def _forget_session(self, session_id: str) -> None:
        """Delete the record of an ended session."""
        self._query(
            f"DELETE FROM {SESSIONS_TABLE} WHERE session_id = @session_id",
            {"session_id": session_id},
            in_session=False,
        )

    def _run(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """Run one query job to completion and return it."""
        self._begin_if_wanted()
        return self._query(sql, params)

    def query_arrow(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        """Run a query and return its rows as Arrow."""
        return self._run(sql, params).to_arrow()

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        """Run a statement (DML, DDL or a script) for its effect."""
        self._run(sql, params)

    def table_exists(self, table: str) -> bool:
        """Whether `table` exists in the dataset."""
        from google.api_core.exceptions import NotFound

        try:
            self.client.get_table(self._ref(table))
            return True
        except NotFound:
            return False

    def column_types(self, table: str) -> dict[str, str] | None:
        """Columns of `table` with the sync's type names, from its metadata (no query job)."""
        from google.api_core.exceptions import NotFound

        try:
            fields = self.client.get_table(self._ref(table)).schema
        except NotFound:
            return None
        return {f.name: _TYPE_NAMES.get(f.field_type, f.field_type) for f in fields}

    def create_table_if_missing(
        self, table: str, schema: pa.Schema, partition_column: str | None = None
    ) -> None:
        """Create the table (day-partitioned on `partition_column` if given) unless it exists."""
        from google.cloud import bigquery

        bq_table = bigquery.Table(
            self._ref(table),
            schema=[bigquery.SchemaField(f.name, bigquery_type(f.type)) for f in schema],
        )
        if partition_column:
            bq_table.time_partitioning = bigquery.TimePartitioning(
                type_=bigquery.TimePartitioningType.DAY, field=check_identifier(partition_column)
            )
        self.client.create_table(bq_table, exists_ok=True)

    def _load(
        self,
        destination: str,
        data: pa.Table | pa.RecordBatchReader,
        partition_column: str | None,
        write_disposition: str = "WRITE_TRUNCATE",
    ) -> None:
        """Stream `data` into a Parquet file, then load it (WRITE_TRUNCATE unless told)."""
        from google.cloud import bigquery

        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET, write_disposition=write_disposition
        )
        if partition_column:
            config.time_partitioning = bigquery.TimePartitioning(
                type_=bigquery.TimePartitioningType.DAY, field=partition_column
            )
        with tempfile.TemporaryFile() as buffer:
            with pq.ParquetWriter(buffer, data.schema, compression="snappy") as writer:
                batches = data.to_batches() if isinstance(data, pa.Table) else data
                for batch in batches:
                    writer.write_batch(batch)
            buffer.seek(0)
            job = self.client.load_table_from_file(
                buffer, destination, job_config=config, location=self.location
            )
            job.result()

    def load_scratch_table(
        self, table: str, data: pa.Table | pa.RecordBatchReader, expires: datetime
    ) -> None:
        """Replace `table` by a new one that BigQuery deletes by itself at `expires`, then load
        `data` into it: a table a killed process leaves behind goes on its own.

        The expiration is set when the table is created, before any data is in it (set after
        the load, a kill in between would leave the data for good), and the load appends to it
        (WRITE_EMPTY) since a WRITE_TRUNCATE load may replace the table's metadata. A table of
        that name already there (a leftover, maybe of a release that set no expiration, maybe
        of another schema) is dropped first.
        """
        from google.cloud import bigquery

        self.drop_table(table)
        scratch = bigquery.Table(
            self._ref(table),
            schema=[bigquery.SchemaField(f.name, bigquery_type(f.type)) for f in data.schema],
        )
        scratch.expires = expires
        self.client.create_table(scratch)
        self._load(self._ref(table), data, None, bigquery.WriteDisposition.WRITE_EMPTY)

    def replace_table(self, table: str, data: pa.Table | pa.RecordBatchReader) -> None:
        """Replace the whole table by one WRITE_TRUNCATE load job (atomic in BigQuery)."""
        self._load(self._ref(table), data, None)

    def replace_table_by_query(
        self, table: str, sql: str, params: Mapping[str, Any] | None = None
    ) -> None:
        """Replace `table` whole (created if missing) by the rows of `sql`: one query job writing
        them into it with WRITE_TRUNCATE, which BigQuery applies atomically when the job
        succeeds, so readers see the old table (or none) until then and never a part.

        The job runs outside any open session: it writes a permanent table, which a
        multi-statement transaction cannot, and it reads the tables as committed (the
        transaction's snapshot would not see a partition loaded after it began). A job, not
        CREATE OR REPLACE TABLE: a table that exists keeps its metadata (description, labels,
        access policies), only its rows and columns are replaced.
        """
        from google.cloud import bigquery

        config = self._job_config(
            params,
            in_session=False,
            destination=self._ref(table),
            write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
            create_disposition=bigquery.CreateDisposition.CREATE_IF_NEEDED,
        )
        self.client.query(sql, job_config=config, location=self.location).result()

    def replace_partition(
        self,
        table: str,
        partition_column: str,
        partition_value: date,
        data: pa.Table | pa.RecordBatchReader,
    ) -> None:
        """Replace one day partition: WRITE_TRUNCATE load into `table$YYYYMMDD`."""
        check_identifier(partition_column)
        decorator = f"{self._ref(table)}${partition_value:%Y%m%d}"
        self._load(decorator, data, partition_column)

    def drop_table(self, table: str) -> None:
        """Drop `table` if it exists (a table API call: no query job, outside any transaction)."""
        self.client.delete_table(self._ref(table), not_found_ok=True)

    @contextmanager
    def transaction(self, bulk: bool = False) -> Iterator[None]:
        """A multi-statement transaction in a session, begun at the first statement inside.

        `bulk` changes nothing here: load jobs write their data once already.
        """
        if self._transaction_wanted:
            yield
            return
        self._transaction_wanted = True
        try:
            yield
        except BaseException:
            # A failed statement may already have ended the transaction; the original error
            # is the one to report.
            with contextlib.suppress(Exception):
                self._finish("ROLLBACK TRANSACTION")
            raise
        else:
            self._finish("COMMIT TRANSACTION")
        finally:
            self._transaction_wanted = False

    def _finish(self, statement: str) -> None:
        """Commit or roll back the session's transaction, then end the session and delete its
        record (left idle, BigQuery would keep it a day; ended, nothing of it stays).

        Ending it is housekeeping: once the transaction has ended, a failure there is logged,
        the record kept for the next transaction to end it.
        """
        session = self._session_id
        if session is None:
            return
        try:
            self._query(statement)
        finally:
            self._session_id = None
            try:
                self.abort_session(session)
                self._forget_session(session)
            except Exception as exc:
                log.warning(
                    "BigQuery session %s not ended after its transaction (the next transaction"
                    " ends it): %s",
                    session,
                    str(exc).splitlines()[0],
                )

    def close(self) -> None:
        """Close the client's HTTP session."""
        close = getattr(self.client, "close", None)
        if close:
            close()


def conflict_message(exc: Exception) -> str:
    """What a transaction cancelled by another one mutating the same table is to say: BigQuery's
    words, what holds such a transaction, and how to end it."""
    said = str(exc).splitlines()[0]
    return (
        f"BigQuery cancelled this transaction: {said}. Another open transaction has changed that"
        " table: another sync running now (let it finish, then rerun this one), or a sync killed"
        " inside its transaction whose session was not recorded in"
        f" {SESSIONS_TABLE} or could not be ended (see the warnings logged), which BigQuery keeps"
        " open until it has been idle 24 hours. To end it now, find it (SELECT session_id,"
        " creation_time FROM `region-<location>`.INFORMATION_SCHEMA.SESSIONS_BY_USER WHERE"
        " is_active), run CALL BQ.ABORT_SESSION('<session id>') (its transaction is rolled"
        " back), then rerun the sync"
    )
