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
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from paylater.redaction import redact
from tasks.warehouse.base import WarehouseError
from tasks.warehouse.duckdb import check_identifier

_PROJECT = re.compile(r"^[a-z][a-z0-9.:-]*[a-z0-9]$")
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

    def _begin_if_wanted(self) -> None:
        """Open the session and its transaction at the first statement inside transaction()."""
        if self._transaction_wanted and self._session_id is None:
            job = self.client.query(
                "BEGIN TRANSACTION", job_config=self._job_config(create_session=True)
            )
            job.result()
            self._session_id = job.session_info.session_id

    def _run(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """Run one query job to completion and return it."""
        self._begin_if_wanted()
        job = self.client.query(sql, job_config=self._job_config(params), location=self.location)
        job.result()
        return job

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
        """Commit or roll back the session's transaction.

        The session is left to expire on its own (BigQuery ends idle sessions) rather than
        ended with CALL BQ.ABORT_SESSION(), a procedure call no SQL parser here can check.
        """
        if self._session_id is None:
            return
        try:
            self.client.query(statement, job_config=self._job_config()).result()
        finally:
            self._session_id = None

    def close(self) -> None:
        """Close the client's HTTP session."""
        close = getattr(self.client, "close", None)
        if close:
            close()
