"""One sync at a time per warehouse: a lock every daily_sync run holds from start to end.

Two syncs of one warehouse (the scheduled daily-sync and a manual daily-pipeline, a backfill, a
retry) would otherwise overlap: on BigQuery the later one ends the earlier one's session (see
BigQueryWarehouse.end_left_sessions) and the earlier fails with BigQuery's own "session ended";
on DuckDB the later fails at once on the file's lock. With the lock the later one waits for the
earlier to finish (PAYLATER_SYNC_LOCK_WAIT_SECONDS at most), saying for whom, then runs.

On a PostgreSQL source it is a session-level advisory lock, taken on a connection of its own
held for the whole run and keyed by a hash of the warehouse's identity (the DuckDB file's
resolved path, BigQuery's project.dataset): syncs into different warehouses never wait for each
other, and PostgreSQL releases the lock when the holder's connection drops, so a killed sync
never leaves it held. Advisory locks work on a hot-standby replica as on a primary, but "relate
only to the server on which they are acquired" (PostgreSQL docs, Hot Standby): syncs of one
warehouse must reach the same server (not one the primary and one a replica, nor a reader
endpoint spreading connections over several replicas) to see each other's lock. On a SQLite
source (the embedded default, one machine) it is an flock on a file beside the DuckDB warehouse
(or under PAYLATER_HOME), released by the kernel when the holder's process ends.

Only syncs take it: readers (the feature build, the monitor) never wait on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from paylater.redaction import redact, safe_cause
from paylater.settings import get_settings
from tasks.sync_config import SourceUnavailable, SyncError

SETTING = "PAYLATER_SYNC_LOCK_WAIT_SECONDS"
# How often a sync waiting on a file lock tries it again (flock has no timed wait).
FILE_LOCK_POLL_SECONDS = 0.2
# PostgreSQL keeps the first 63 bytes of an application_name (NAMEDATALEN - 1).
APPLICATION_NAME_BYTES = 63
# The holder of an advisory lock on a single bigint key, as pg_locks shows it: the key's high
# half in classid, its low half in objid, objsubid 1.
_HOLDER_SQL = (
    "SELECT l.pid, a.application_name, host(a.client_addr) AS client_addr, a.backend_start"
    " FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
    " AND l.classid = %s::oid AND l.objid = %s::oid"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


class SyncLockTimeout(SyncError):
    """Another sync of the same warehouse held the sync lock for longer than the sync waits."""


class SyncLockLost(SyncError):
    """The connection holding the sync lock ended during the sync (the lock went with it)."""


class HeldLock:
    """A sync lock being held; `confirm` before each step that writes the warehouse."""

    def __init__(self, identity: str | None = None, conn: Any = None) -> None:
        self.identity, self.conn = identity, conn

    def confirm(self) -> None:
        """SyncLockLost when the lock's PostgreSQL session has ended (terminated by an
        operator, a failover, a network cut): another sync may have taken the lock since, and
        this one must not write alongside it. A file lock cannot be lost while its process
        lives."""
        if self.conn is None:
            return
        try:
            self.conn.execute("SELECT 1")
        except Exception as exc:
            text = str(exc).strip()
            ended = f"{type(exc).__name__}: {redact(text.splitlines()[0])}" if text else repr(exc)
            raise SyncLockLost(
                f"the sync lock of warehouse {redact(self.identity or '')} was lost: its source"
                f" session ended ({ended}), so another sync may be running; this one stops"
                " before its next table. Rerun it: the tables it synced are complete, each with"
                " its ledger row"
            ) from None


@dataclass(frozen=True)
class Holder:
    """Who holds a warehouse's sync lock, as far as the lock can tell."""

    name: str | None = None
    client: str | None = None
    since: datetime | None = None
    pid: int | None = None

    def __str__(self) -> str:
        name = repr(self.name) if self.name else "a session"
        parts = [f"from {self.client}" if self.client else ""]
        parts.append(
            f"since {self.since.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC" if self.since else ""
        )
        parts.append(f"backend pid {self.pid}" if self.pid else "")
        details = ", ".join(p for p in parts if p)
        return f"{name} ({details})" if details else name


def warehouse_identity(url: str) -> str | None:
    """What names one warehouse whatever the URL's spelling: a DuckDB file's resolved path,
    BigQuery's project.dataset; None for an in-memory DuckDB, private to its process."""
    scheme, _, rest = url.partition("://")
    if scheme == "duckdb":
        path = rest.split("?", 1)[0]
        if path in (":memory:", "/:memory:", ""):
            return None
        return f"duckdb:{Path(path).expanduser().resolve()}"
    if scheme == "bigquery":
        parts = urlsplit(url)
        return f"bigquery:{parts.netloc}.{parts.path.strip('/')}"
    return f"{scheme}:{rest.split('?', 1)[0]}"


def lock_key(identity: str) -> int:
    """A stable signed 64-bit advisory lock key of a warehouse identity (the same in every
    process and release: Python's hash() is salted per process)."""
    digest = hashlib.sha256(b"paylater-sync\0" + identity.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def application_name(label: str) -> str:
    """The lock connection's application_name: the run's label, then its process and host,
    cut to what PostgreSQL keeps."""
    host = socket.gethostname()
    name = f"paylater-sync {label} pid {os.getpid()}" + (f"@{host}" if host else "")
    return name.encode()[:APPLICATION_NAME_BYTES].decode(errors="ignore").rstrip("@ ")


def held_for_sync(label: str, on_wait: Callable[[str], None]) -> AbstractContextManager[HeldLock]:
    """The configured warehouse's sync lock, held for the block (see sync_lock)."""
    settings = get_settings()
    return sync_lock(
        settings.source, settings.warehouse, settings.sync_lock_wait_seconds, label, on_wait
    )


def sync_lock(
    source_url: str,
    warehouse_url: str,
    wait_seconds: float,
    label: str,
    on_wait: Callable[[str], None],
) -> AbstractContextManager[HeldLock]:
    """Hold the sync lock of the warehouse at `warehouse_url` for the block, waiting at most
    `wait_seconds` for another sync holding it (SyncLockTimeout naming it then); `on_wait` is
    told whom it waits for, and when it got the lock after waiting. `label` names this sync to
    the others (a flow run's name)."""
    identity = warehouse_identity(warehouse_url)
    if identity is None:
        return contextlib.nullcontext(HeldLock())
    if source_url.partition("://")[0].split("+")[0] in ("postgresql", "postgres"):
        return _advisory_lock(source_url, identity, wait_seconds, label, on_wait)
    return _file_lock(lock_file(warehouse_url, identity), identity, wait_seconds, label, on_wait)


def lock_file(warehouse_url: str, identity: str) -> Path:
    """Where a SQLite-sourced sync's file lock lives: beside a DuckDB warehouse file, else in
    PAYLATER_HOME (one machine either way: the embedded default)."""
    if identity.startswith("duckdb:"):
        return Path(identity.removeprefix("duckdb:") + ".sync-lock")
    return get_settings().home_dir / f"sync-{lock_key(identity) & (2**64 - 1):016x}.lock"


def timed_out(identity: str, wait_seconds: float, holder: Holder | None) -> SyncLockTimeout:
    """The error of a sync that gave up waiting for `holder`."""
    waited = "is held" if wait_seconds <= 0 else f"was still held after {wait_seconds:g} s"
    by = f"by {holder}" if holder else "by another sync (now released: run this one again)"
    hint = (
        f"; if that process is gone but its session lingers, end it with"
        f" SELECT pg_terminate_backend({holder.pid})"
        if holder and holder.pid
        else ""
    )
    return SyncLockTimeout(
        f"the sync lock of warehouse {redact(identity)} {waited} {by}: let that sync finish and"
        f" run this one again, or wait longer ({SETTING}={wait_seconds:g}){hint}"
    )


def _waiting(identity: str, wait_seconds: float, holder: Holder | None) -> str:
    """What a sync says when it starts waiting."""
    by = f": {holder}" if holder else ""
    return (
        f"another sync of warehouse {redact(identity)} holds its sync lock{by}; waiting for it"
        f" to finish (at most {wait_seconds:g} s, {SETTING})"
    )


@contextlib.contextmanager
def _advisory_lock(
    source_url: str,
    identity: str,
    wait_seconds: float,
    label: str,
    on_wait: Callable[[str], None],
) -> Iterator[HeldLock]:
    """The PostgreSQL advisory lock of `identity` on a connection of its own, for the block;
    closing the connection releases it."""
    from psycopg import errors

    key = lock_key(identity)
    conn = _lock_connection(source_url, label)
    try:
        if not conn.execute("SELECT pg_try_advisory_lock(%s)", [key]).fetchone()[0]:
            holder = _pg_holder(conn, key)
            if wait_seconds <= 0:
                raise timed_out(identity, wait_seconds, holder)
            on_wait(_waiting(identity, wait_seconds, holder))
            started = time.monotonic()
            # lock_timeout bounds the advisory lock's wait like any other lock's.
            conn.execute("SELECT set_config('lock_timeout', %s, false)", [_ms(wait_seconds)])
            try:
                conn.execute("SELECT pg_advisory_lock(%s)", [key])
            except errors.LockNotAvailable:
                raise timed_out(identity, wait_seconds, _pg_holder(conn, key) or holder) from None
            on_wait(
                f"sync lock of warehouse {redact(identity)} acquired after {time.monotonic() - started:.1f} s"
            )
        yield HeldLock(identity, conn)
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _ms(seconds: float) -> str:
    """A duration as a PostgreSQL setting in milliseconds (at least 1: 0 would mean never)."""
    return f"{max(1, round(seconds * 1000))}ms"


def _lock_connection(source_url: str, label: str) -> Any:
    """An autocommit connection to the source for the lock, with no server-side timeout that
    would end its session while the sync runs (which would release the lock unseen)."""
    from psycopg import OperationalError

    from paylater.postgres import connect_bounded, libpq_url

    try:
        conn = connect_bounded(
            libpq_url(source_url), autocommit=True, application_name=application_name(label)
        )
    except OperationalError as exc:
        raise SourceUnavailable.connecting(source_url, exc, " for the sync lock") from safe_cause(
            exc
        )
    conn.execute("SET statement_timeout = 0")
    if conn.info.server_version >= 140000:  # the setting exists from PostgreSQL 14
        conn.execute("SET idle_session_timeout = 0")
    return conn


def _pg_holder(conn: Any, key: int) -> Holder | None:
    """The session holding the advisory lock `key`, None when nobody does any more."""
    high, low = (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
    row = conn.execute(_HOLDER_SQL, [high, low]).fetchone()
    if row is None:
        return None
    pid, name, client, since = row
    return Holder(name=name, client=client, since=since, pid=pid)


@contextlib.contextmanager
def _file_lock(
    path: Path, identity: str, wait_seconds: float, label: str, on_wait: Callable[[str], None]
) -> Iterator[HeldLock]:
    """An exclusive flock on `path` for the block; the file says who holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_flock(fd):
            holder = _file_holder(path)
            if wait_seconds <= 0:
                raise timed_out(identity, wait_seconds, holder)
            on_wait(_waiting(identity, wait_seconds, holder))
            started = time.monotonic()
            while not _try_flock(fd):
                if time.monotonic() - started >= wait_seconds:
                    raise timed_out(identity, wait_seconds, _file_holder(path) or holder)
                time.sleep(FILE_LOCK_POLL_SECONDS)
            on_wait(
                f"sync lock of warehouse {redact(identity)} acquired after {time.monotonic() - started:.1f} s"
            )
        os.ftruncate(fd, 0)
        since = datetime.now(UTC).isoformat()
        os.pwrite(fd, f"{application_name(label)}\n{since}\n".encode(), 0)
        yield HeldLock(identity)
    finally:
        os.close(fd)  # releases the flock


def _try_flock(fd: int) -> bool:
    """Take the exclusive flock on `fd` if nobody holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _file_holder(path: Path) -> Holder | None:
    """Who holds a file lock, as its holder wrote it (None: unreadable or not yet written)."""
    try:
        name, since = path.read_text().splitlines()[:2]
        return Holder(name=name, since=datetime.fromisoformat(since))
    except (OSError, ValueError):
        return None
