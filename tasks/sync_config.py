"""What the daily sync copies: the table configuration, its validation and the sync errors."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import yaml

from paylater.identifiers import RULE, is_identifier
from paylater.identifiers import check_identifier as plain_identifier
from paylater.redaction import redact
from paylater.settings import get_settings

DEFAULT_CONFIG = Path(__file__).with_name("sync_tables.yaml")

ARROW_TYPES: dict[str, pa.DataType] = {
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "string": pa.string(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}

# The column `<table>__changes` is partitioned by: the as_of that read each row.
CHANGES_PARTITION = "as_of"


class SyncError(RuntimeError):
    """A sync that cannot proceed; the message is the one line a person needs."""


class ConfigError(SyncError):
    """The sync configuration names something that does not exist or makes no sense."""


class SourceUnavailable(SyncError):
    """The operational database cannot be reached (transient: the task retries it)."""

    @classmethod
    def connecting(cls, url: str, exc: BaseException, purpose: str = "") -> SourceUnavailable:
        """The error of a failed connect to `url` (for `purpose`, e.g. " for the sync lock"):
        the driver's first line, redacted. Raise it `from safe_cause(exc)`: libpq quotes a URL it
        cannot parse whole, password included."""
        text = str(exc).strip()
        reason = redact(text.splitlines()[0]) if text else type(exc).__name__
        return cls(f"source database {redact(url)} unreachable{purpose}: {reason}")


class SourceLocked(SourceUnavailable):
    """A source query waited past PostgreSQL's lock_timeout for a lock another session holds on
    the table (a migration, a VACUUM FULL): transient, the holder may let go before the retry."""


class SourceTimeout(SyncError):
    """A source query ran past PostgreSQL's statement_timeout and was cancelled, or a source
    session idle in its transaction past idle_in_transaction_session_timeout was ended. Not
    transient: a retry meets the same limit, so it would only burn the sync's window timing out
    again; the setting must be raised (or the read made cheaper)."""


class CountMismatch(SyncError):
    """Rows extracted, loaded or held by the warehouse disagree with the source."""


class SchemaMismatch(SyncError):
    """The warehouse table holds other columns (or types) than the sync reads: the source or the
    configuration changed since the table was created, and the sync never alters a table."""


class KeyViolation(SyncError):
    """The rows read repeat a primary-key value or have a NULL in one, which the source's own
    constraints do not rule out (a view, a table without a key): merged, they would corrupt the
    warehouse table. Not transient: the data or the configured key must change."""


@dataclass(frozen=True)
class TableSpec:
    """One configured table: how it is identified, read and typed."""

    name: str
    primary_key: tuple[str, ...]
    mode: Literal["full", "incremental"]
    cursor: str | None = "updated_at"
    columns: dict[str, str] = field(default_factory=dict)
    # Whether each as_of's increment is kept in `<table>__changes`. It costs a second write of
    # every row (the whole history on the first sync); without it DuckDB loads and merges
    # straight from the stream. BigQuery always stages the increment there (MERGE needs a table).
    keep_changes: bool = True
    # The incremental count check covers rows changed in the last `check_days` days before the
    # window's end (at least the window); None: the whole table (one source scan every day).
    check_days: int | None = 7
    # An incremental window starts this many minutes before the previous watermark, re-reading
    # the end of the previous window: a row committed after that sync with an older change time
    # (a batch backdating updated_at, a transaction open across the sync) is read then. The
    # counts cannot see such an update of a row they already count; re-reading is idempotent.
    lookback_minutes: int = 0
    # What a row deleted at the source does to an incremental table. "fail": the count check
    # fails the table, naming how many held keys the source no longer has and the way out.
    # "propagate": each sync reads the source's keys (one key scan, in the read's snapshot) and
    # deletes the warehouse rows whose keys are gone, in the same transaction as the day's load.
    deletes: Literal["fail", "propagate"] = "fail"
    # Set by validation, never configured: whether the source's own constraints (a primary key or
    # unique index over key columns, every key column NOT NULL) make `primary_key` unique and
    # never NULL. Unless they do, the sync checks the rows it read for repeated and NULL keys.
    key_enforced: bool = False

    @property
    def changes_table(self) -> str:
        """The warehouse table holding each as_of's increment (partitioned by as_of)."""
        return f"{self.name}__changes"

    def arrow_schema(self) -> pa.Schema:
        """The warehouse Arrow schema of this table (columns must be resolved)."""
        return pa.schema([pa.field(c, ARROW_TYPES[t]) for c, t in self.columns.items()])

    def key_schema(self) -> pa.Schema:
        """The Arrow schema of the primary-key columns alone (columns must be resolved)."""
        return pa.schema([pa.field(k, ARROW_TYPES[self.columns[k]]) for k in self.primary_key])


def check_identifier(name: Any, what: str) -> str:
    """A plain SQL identifier, or a ConfigError naming it."""
    return plain_identifier(name, f"sync config: {what}", ConfigError)


def config_path() -> Path:
    """The table configuration file: PAYLATER_SYNC_TABLES or the packaged default."""
    return get_settings().sync_tables or DEFAULT_CONFIG


def _parse_table(raw: Any, where: str) -> TableSpec:
    """One `tables:` entry -> TableSpec, or a ConfigError saying what is wrong."""
    if not isinstance(raw, dict):
        raise ConfigError(f"sync config {where}: each table must be a mapping")
    known = {
        "name", "primary_key", "mode", "cursor", "columns", "keep_changes", "check_days",
        "lookback_minutes", "deletes",
    }  # fmt: skip
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"sync config {where}: unknown key(s) {', '.join(unknown)}")
    name = check_identifier(raw.get("name"), "table")
    key = raw.get("primary_key")
    keys = [key] if isinstance(key, str) else key
    if not keys or not isinstance(keys, list):
        raise ConfigError(f"sync config: table {name} needs a primary_key")
    mode = raw.get("mode", "incremental")
    if mode not in ("full", "incremental"):
        raise ConfigError(f"sync config: table {name} has mode {mode!r}; use full or incremental")
    cursor = raw.get("cursor", "updated_at" if mode == "incremental" else None)
    if cursor is not None:
        check_identifier(cursor, f"cursor of table {name}:")
    elif mode == "incremental":
        raise ConfigError(
            f"sync config: table {name} is incremental but has no cursor; name its change-time"
            " column (or use mode: full)"
        )
    columns = raw.get("columns") or {}
    if not isinstance(columns, dict):
        raise ConfigError(f"sync config: columns of table {name} must map column -> type")
    for column, type_name in columns.items():
        check_identifier(column, f"column of table {name}:")
        if type_name not in ARROW_TYPES:
            raise ConfigError(
                f"sync config: column {name}.{column} has type {type_name!r}; "
                f"use one of {', '.join(ARROW_TYPES)}"
            )
    keep_changes = raw.get("keep_changes", True)
    if not isinstance(keep_changes, bool):
        raise ConfigError(f"sync config: keep_changes of table {name} must be true or false")
    check_days = raw.get("check_days", 7)
    if check_days is not None and (
        isinstance(check_days, bool) or not isinstance(check_days, int) or check_days < 1
    ):
        raise ConfigError(
            f"sync config: check_days of table {name} must be a whole number of days >= 1 or null"
        )
    lookback = raw.get("lookback_minutes", 0)
    if isinstance(lookback, bool) or not isinstance(lookback, int) or lookback < 0:
        raise ConfigError(
            f"sync config: lookback_minutes of table {name} must be a whole number of minutes >= 0"
        )
    deletes = raw.get("deletes", "fail")
    if deletes not in ("fail", "propagate"):
        raise ConfigError(
            f"sync config: deletes of table {name} is {deletes!r}; use fail or propagate"
        )
    if deletes == "propagate" and mode == "full":
        raise ConfigError(
            f"sync config: table {name} is full (replaced whole, deletes included): deletes"
            " applies to incremental tables only"
        )
    return TableSpec(
        name=name,
        primary_key=tuple(check_identifier(k, f"primary key of {name}:") for k in keys),
        mode=mode,
        cursor=cursor,
        columns=dict(columns),
        keep_changes=keep_changes,
        check_days=check_days,
        lookback_minutes=lookback,
        deletes=deletes,
    )


def load_config(path: Path | None = None) -> list[TableSpec]:
    """Parse the table configuration file (syntax only; `validate_against_source` checks names)."""
    path = path or config_path()
    try:
        # libyaml's loader when present: ~10x faster than the pure-Python one.
        document = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError as exc:
        raise ConfigError(f"sync config {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"sync config {path} is not valid YAML: {exc}") from exc
    tables = (document or {}).get("tables") if isinstance(document, dict) else None
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"sync config {path} has no `tables:` list")
    specs = [_parse_table(raw, f"{path} entry {i}") for i, raw in enumerate(tables)]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"sync config {path} lists table(s) twice: {', '.join(duplicates)}")
    return specs


def resolve_columns(spec: TableSpec, source_types: dict[str, str | None]) -> TableSpec:
    """Check every configured column exists in the source; fill in types when none are listed.

    `source_types` maps each source column to its Arrow type name, or None when the source's
    declared type does not say (SQLite text holding times).
    """
    wanted = [*spec.columns, *spec.primary_key, *([spec.cursor] if spec.cursor else [])]
    for column in wanted:
        if column not in source_types:
            raise ConfigError(
                f"sync config: column {spec.name}.{column} does not exist in the source table"
            )
    if spec.columns:
        missing_keys = [k for k in spec.primary_key if k not in spec.columns]
        if missing_keys or (spec.cursor and spec.cursor not in spec.columns):
            absent = [*missing_keys, *([spec.cursor] if spec.cursor not in spec.columns else [])]
            raise ConfigError(
                f"sync config: table {spec.name} lists columns but not {', '.join(map(str, absent))}"
            )
        resolved = spec
    else:
        columns: dict[str, str] = {}
        for column, type_name in source_types.items():
            if not is_identifier(column):
                raise ConfigError(
                    f"sync config: source column {spec.name}.{column} is not a plain SQL"
                    f" identifier ({RULE}), which the sync cannot name; list the table's columns"
                    " (without it)"
                )
            if type_name is None:
                raise ConfigError(
                    f"sync config: source column {spec.name}.{column} has no type the sync can "
                    "infer; list the table's columns with their types"
                )
            columns[column] = type_name
        resolved = replace(spec, columns=columns)
    if spec.mode == "incremental" and CHANGES_PARTITION in resolved.columns:
        # The change table appends its partition column to the columns read.
        raise ConfigError(
            f"sync config: column {spec.name}.{CHANGES_PARTITION} has the name of the change"
            f" table's partition column; list the table's columns without it (or sync a view"
            " that renames it)"
        )
    if spec.mode == "incremental" and spec.cursor:
        # The window and the count checks compare the cursor with instants. A source type other
        # than a timestamp or text (SQLite's times) would only fail in the sync, after it wrote.
        configured, source_type = resolved.columns[spec.cursor], source_types[spec.cursor]
        if configured != "timestamp" or source_type not in ("timestamp", "string", None):
            wrong = configured if configured != "timestamp" else source_type
            raise ConfigError(
                f"sync config: cursor {spec.name}.{spec.cursor} is {wrong}, not a timestamp;"
                " name a change-time column (or list it as timestamp)"
            )
    return resolved
