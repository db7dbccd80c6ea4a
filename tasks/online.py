"""Publish the scoring features to the online table (`user_features_latest`) in the source database.

The service and the worker look users up there by id. A publish loads a new table and swaps it
in within one transaction, so readers see either the old features or the new ones, never a mix.
Features of a day older than the ones published are not published: a backfill of past days must
not leave the service scoring with last month's features. Publishes to one table take turns, so
that check sees the day of any publish that committed before it. A publish that fails rolls back
whole, and its error (PublishError when refused, PublishInterrupted when cut off and worth a
retry) says what the table holds.
"""

from __future__ import annotations

import io
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from paylater.identifiers import check_identifier
from paylater.postgres import connect_timeout, libpq_url
from paylater.redaction import redact, redacted_errors, safe_cause
from paylater.settings import Settings, get_settings

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)
# What names the online table, for the error when it is no plain identifier.
ONLINE_TABLE_SETTING = "online table name (PAYLATER_ONLINE_FEATURES_TABLE)"


class PublishError(RuntimeError):
    """The online table cannot be published to this database."""


class PublishInterrupted(RuntimeError):
    """A publish cut off by the database (connection lost, a restart, the table held by another
    session); the online table kept its previous features and a retry may succeed."""


SWAP_LOCK_TIMEOUT_SECONDS = 5.0
"""How long the swap waits for sessions still reading the online table: while it waits, every
lookup of the service queues behind its exclusive lock, so it gives up (and is retried) instead."""

_TRANSIENT_SQLSTATES = ("08", "57P", "40001", "40P01", "55P03", "53300")
"""SQLSTATEs (or their prefixes) of a publish cut off rather than refused: connection
exceptions, the server shutting down or restarting, serialization failures and deadlocks, a
lock not available in time, too many connections. A lost connection has no SQLSTATE at all."""


@dataclass
class _Progress:
    """How far a PostgreSQL publish got, for the error that stops it."""

    role: str | None = None
    committing: bool = False


def _ident(name: str, what: str) -> str:
    """A validated plain identifier; PublishError saying `what` it names otherwise."""
    return check_identifier(name, what, PublishError)


def sql_type(arrow_type: pa.DataType, dialect: str) -> str:
    """The column type for an Arrow type in PostgreSQL or SQLite."""
    if pa.types.is_integer(arrow_type):
        return "bigint" if dialect == "postgresql" else "INTEGER"
    if pa.types.is_floating(arrow_type):
        return "double precision" if dialect == "postgresql" else "REAL"
    if pa.types.is_date(arrow_type):
        return "date" if dialect == "postgresql" else "TEXT"
    raise PublishError(f"no online column type for Arrow type {arrow_type}")


def _columns(scoring: pa.Table, dialect: str) -> list[tuple[str, str]]:
    """(name, SQL type) of every column, user_id and as_of first."""
    if scoring.column_names[:2] != ["user_id", "as_of"]:
        raise PublishError(
            f"scoring table must start with user_id, as_of; got {scoring.column_names[:2]}"
        )
    columns = [
        (_ident(f.name, "scoring table column"), sql_type(f.type, dialect)) for f in scoring.schema
    ]
    too_long = [n for n, _ in columns if len(n.encode()) > POSTGRES_NAME_BYTES]
    if dialect == "postgresql" and too_long:
        # Cut short, the column would not be the feature the model asks for.
        raise PublishError(
            f"feature names {too_long} are {[len(n.encode()) for n in too_long]} bytes; "
            f"PostgreSQL keeps at most {POSTGRES_NAME_BYTES} (it cuts longer names without an "
            "error): shorten them in the feature SQL"
        )
    return columns


def publish_user_features(
    scoring: pa.Table,
    source_url: str | None = None,
    settings: Settings | None = None,
    as_of: date | None = None,
) -> int:
    """Replace the online feature table with `scoring`; returns the rows published, 0 when the
    table already holds a later `as_of` (it is then left as it is). A scoring table without rows
    is refused, unless its day is older: it would leave the service with no features for anyone.

    `as_of`: the scoring rows' day (default: read from the rows, which an empty table lacks).
    """
    settings = settings or get_settings()
    url = source_url or settings.source
    table = _ident(settings.online_features_table, ONLINE_TABLE_SETTING)
    day = as_of or _as_of(scoring)
    scheme = urlparse(url).scheme.split("+")[0]
    if scheme in ("postgresql", "postgres"):
        return _publish_postgres(scoring, url, table, day)
    if scheme == "sqlite":
        return _publish_sqlite(scoring, url, table, day)
    raise PublishError(
        f"cannot publish online features to {redact(url)!r}: use postgresql:// or sqlite:///"
    )


@dataclass(frozen=True)
class Published:
    """What the online table holds: its features' day and when they were published."""

    as_of: date | None
    published_at: datetime


def last_published(
    source_url: str | None = None, settings: Settings | None = None, timeout_seconds: float = 10.0
) -> Published | None:
    """The online table's day and publish time (None while nothing was ever published).

    On PostgreSQL a query waits at most `timeout_seconds`: a publish holds the table's lock only
    for its swap, but a hung one must not hang the monitor with it."""
    settings = settings or get_settings()
    url = source_url or settings.source
    table = _ident(settings.online_features_table, ONLINE_TABLE_SETTING)
    scheme = urlparse(url).scheme.split("+")[0]
    if scheme in ("postgresql", "postgres"):
        day, at = _last_published_postgres(url, table, timeout_seconds)
    elif scheme == "sqlite":
        day, at = _last_published_sqlite(url.removeprefix("sqlite:///"), table)
    else:
        raise PublishError(
            f"cannot read online features from {redact(url)!r}: use postgresql:// or sqlite:///"
        )
    if at is None:
        return None
    return Published(day, at if at.tzinfo else at.replace(tzinfo=UTC))


def _connect(conninfo: str) -> psycopg.Connection[Any]:
    """A connection to the source; libpq's error quoting a URL it cannot parse, redacted."""
    import psycopg

    with redacted_errors():
        return psycopg.connect(conninfo, **connect_timeout(conninfo))


def _last_published_postgres(
    url: str, table: str, timeout_seconds: float
) -> tuple[date | None, datetime | None]:
    """(max as_of, max updated_at) of the table, (None, None) without it."""
    from psycopg import sql

    conninfo = libpq_url(url)
    with _connect(conninfo) as conn:
        conn.execute(f"SET statement_timeout = {int(timeout_seconds * 1000)}")
        if conn.execute("SELECT to_regclass(quote_ident(%s))", [table]).fetchone() == (None,):
            return None, None
        row = conn.execute(
            sql.SQL("SELECT max(as_of), max(updated_at) FROM {}").format(sql.Identifier(table))
        ).fetchone()
    return (row[0], row[1]) if row else (None, None)


def _last_published_sqlite(path: str, table: str) -> tuple[date | None, datetime | None]:
    """(max as_of, max updated_at) of the table, (None, None) without it."""
    if not Path(path).is_file():  # and reading creates none
        raise PublishError(f"the online feature database {path} does not exist")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [table]
        ).fetchone()
        if not exists:
            return None, None
        day, at = conn.execute(f'SELECT max(as_of), max(updated_at) FROM "{table}"').fetchone()
    finally:
        conn.close()
    return (
        date.fromisoformat(day) if day else None,
        datetime.fromisoformat(at) if at else None,
    )


# The privileges others hold on the current table (its owner's own are implicit): the new table
# gets the same ones, since the service and the worker may read it with roles of their own.
# The privilege names come from the server (SELECT, UPDATE, ...); grantee NULL means PUBLIC.
_GRANTS_SQL = """
SELECT CASE WHEN a.grantee <> 0 THEN pg_get_userbyid(a.grantee) END, a.privilege_type, a.is_grantable
FROM pg_class AS c, aclexplode(c.relacl) AS a
WHERE c.oid = to_regclass(quote_ident(%s)) AND a.grantee <> c.relowner
ORDER BY 1, 2
"""


def _as_of(scoring: pa.Table) -> date | None:
    """The day of the scoring rows (None for an empty table)."""
    value = pc.max(scoring.column("as_of")).as_py()
    return value if isinstance(value, date) else None


def _refuse_empty(scoring: pa.Table, table: str) -> None:
    """PublishError for a scoring table without rows (checked once the day is known not older)."""
    if scoring.num_rows == 0:
        raise PublishError(
            f"the scoring table has no rows (an empty warehouse or a sync that loaded no users?): "
            f"{table} left as it is"
        )


def _is_older(new: date | None, published: date | None, table: str) -> bool:
    """Whether `new` is older than the day already published (and say so)."""
    if new is None or published is None or new >= published:
        return False
    log.warning("%s holds features as of %s; those of %s are not published", table, published, new)
    return True


POSTGRES_NAME_BYTES = 63
"""PostgreSQL truncates longer identifiers (NAMEDATALEN - 1) without an error."""
_STAGING_SUFFIX = "__new_pkey"
"""The longest name publishing derives from the table's: its staging table's primary key."""


def _publish_postgres(scoring: pa.Table, url: str, table: str, day: date | None) -> int:
    """COPY into a new table, give it the old one's grants, then drop the old one and rename, all
    in one transaction."""
    from psycopg import sql

    longest, size = POSTGRES_NAME_BYTES - len(_STAGING_SUFFIX), len(table.encode())
    if size > longest:
        # Truncated, `<table>__new` could name the table itself: every publish would fail.
        raise PublishError(
            f"online table name {table!r} is {size} bytes; on PostgreSQL it may have"
            f" at most {longest} (the publish's staging names add {_STAGING_SUFFIX!r}, and"
            f" PostgreSQL cuts names at {POSTGRES_NAME_BYTES} bytes): set a shorter"
            " PAYLATER_ONLINE_FEATURES_TABLE"
        )

    conninfo = libpq_url(url)
    columns = _columns(scoring, "postgresql")
    column_defs: list[sql.Composable] = [
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind)) for name, kind in columns
    ]
    column_defs.append(sql.SQL("updated_at timestamptz NOT NULL DEFAULT now()"))
    csv = io.BytesIO()
    pacsv.write_csv(scoring, csv, pacsv.WriteOptions(include_header=False))
    with _publish_errors(url, table, day) as progress:
        return _swap_postgres(conninfo, table, day, scoring, columns, column_defs, csv, progress)


@contextmanager
def _publish_errors(url: str, table: str, day: date | None) -> Iterator[_Progress]:
    """Turn the database's errors into one saying what the online table holds now: PublishError
    when the database refuses the publish (privileges, a full disk, bad data), PublishInterrupted
    when it was cut off and may be retried."""
    import psycopg

    progress = _Progress()
    try:
        yield progress
    except psycopg.Error as exc:
        state = exc.sqlstate
        lost = state is None and isinstance(exc, psycopg.OperationalError)
        transient = lost or (state is not None and state.startswith(_TRANSIENT_SQLSTATES))
        reason = " ".join(redact(f"{type(exc).__name__}: {exc}").split())
        if isinstance(exc, psycopg.errors.InsufficientPrivilege) and progress.role:
            reason += f" (as role {progress.role})"
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            reason = (
                f"another session holds {table} (a long query, or a transaction left open) past"
                f" {SWAP_LOCK_TIMEOUT_SECONDS:g} s: the swap gave up rather than make the"
                " service's lookups queue behind it"
            )
        if progress.committing and lost:
            kept = (
                f"the connection broke during the commit: {table} holds either its previous"
                " features or these, whole"
            )
        elif progress.role is None:
            kept = f"nothing was changed: {table} still holds its previous features"
        else:
            kept = f"the transaction rolled back: {table} still holds its previous features"
        error = PublishInterrupted if transient else PublishError
        raise error(
            f"publishing {table} for as_of {day} to {redact(url)} failed: {reason}; {kept}"
        ) from safe_cause(exc)


def _swap_postgres(
    conninfo: str,
    table: str,
    day: date | None,
    scoring: pa.Table,
    columns: list[tuple[str, str]],
    column_defs: list[Any],
    csv: io.BytesIO,
    progress: _Progress,
) -> int:
    """The publish's transaction: COPY into the staging table, grants, then the swap; the rows
    published (0 when the table holds a later day)."""
    from psycopg import sql

    staging = f"{table}__new"
    with _connect(conninfo) as conn, conn.transaction():
        progress.role = conn.info.user
        # One publish at a time per table (released at commit), so the day compared below is the
        # one of the last publish that committed, even if it was still running when this began.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"paylater.online.{table}"])
        if conn.execute("SELECT to_regclass(quote_ident(%s))", [table]).fetchone() != (None,):
            published = conn.execute(
                sql.SQL("SELECT max(as_of) FROM {}").format(sql.Identifier(table))
            ).fetchone()
            if _is_older(day, published[0] if published else None, table):
                return 0
        _refuse_empty(scoring, table)
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(staging)))
        conn.execute(
            sql.SQL("CREATE TABLE {} ({})").format(
                sql.Identifier(staging), sql.SQL(", ").join(column_defs)
            )
        )
        copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
            sql.Identifier(staging), sql.SQL(", ").join(sql.Identifier(n) for n, _ in columns)
        )
        with conn.cursor().copy(copy_sql) as copy:
            copy.write(csv.getvalue())
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY (user_id)").format(
                sql.Identifier(staging), sql.Identifier(f"{staging}_pkey")
            )
        )
        for grantee, privilege, grantable in conn.execute(_GRANTS_SQL, [table]).fetchall():
            conn.execute(
                sql.SQL("GRANT {} ON {} TO {}{}").format(
                    sql.SQL(privilege),
                    sql.Identifier(staging),
                    sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee),
                    sql.SQL(" WITH GRANT OPTION" if grantable else ""),
                )
            )
        if conn.execute("SELECT to_regclass(quote_ident(%s))", [table]).fetchone() != (None,):
            # Bounded: while the swap waits for a session still reading the table, every lookup
            # of the service queues behind its request for the exclusive lock.
            conn.execute(
                sql.SQL("SET LOCAL lock_timeout = {}").format(
                    sql.Literal(f"{max(1, round(SWAP_LOCK_TIMEOUT_SECONDS * 1000))}ms")
                )
            )
            conn.execute(
                sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(table))
            )
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
        conn.execute(
            sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                sql.Identifier(staging), sql.Identifier(table)
            )
        )
        conn.execute(
            sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                sql.Identifier(f"{staging}_pkey"), sql.Identifier(f"{table}_pkey")
            )
        )
        progress.committing = True  # leaving the block commits
    return scoring.num_rows


def _publish_sqlite(scoring: pa.Table, url: str, table: str, day: date | None) -> int:
    """Insert into a new table, then drop the old one and rename, all in one transaction."""
    path = url.removeprefix("sqlite:///")
    columns = _columns(scoring, "sqlite")
    staging = f"{table}__new"
    definitions = ", ".join(
        f'"{name}" {kind}{" PRIMARY KEY" if name == "user_id" else ""}' for name, kind in columns
    )
    placeholders = ", ".join("?" for _ in range(len(columns) + 1))
    names = ", ".join(f'"{name}"' for name, _ in columns)
    updated_at = datetime.now(UTC).isoformat()
    rows = (
        (*(v.isoformat() if hasattr(v, "isoformat") else v for v in row.values()), updated_at)
        for row in scoring.to_pylist()
    )
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")  # the write lock: one publish at a time
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [table]
        ).fetchone()
        if exists:
            (published,) = conn.execute(f'SELECT max(as_of) FROM "{table}"').fetchone()
            if _is_older(day, date.fromisoformat(published) if published else None, table):
                conn.execute("ROLLBACK")
                return 0
        _refuse_empty(scoring, table)
        conn.execute(f'DROP TABLE IF EXISTS "{staging}"')
        conn.execute(f'CREATE TABLE "{staging}" ({definitions}, "updated_at" TEXT NOT NULL)')
        conn.executemany(
            f'INSERT INTO "{staging}" ({names}, "updated_at") VALUES ({placeholders})', rows
        )
        conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        conn.execute(f'ALTER TABLE "{staging}" RENAME TO "{table}"')
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            # "locked" or "busy": another writer held the file past the busy timeout.
            busy = any(word in str(exc) for word in ("locked", "busy"))
            error = PublishInterrupted if busy else PublishError
            raise error(
                f"publishing {table} for as_of {day} to {redact(url)} failed:"
                f" {type(exc).__name__}: {exc}; the transaction rolled back: {table} still"
                " holds its previous features"
            ) from exc
        raise
    finally:
        conn.close()
    return scoring.num_rows
