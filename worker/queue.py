"""The scoring job table: schema, enqueue, claim under a lease, finish, fail (SQL in worker/sql)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from paylater.postgres import connect_bounded

if TYPE_CHECKING:
    import threading

    import psycopg

NOTIFY_CHANNEL = "scoring_jobs"
"""The channel the INSERT trigger of scoring_jobs notifies (worker/schema.sql)."""

IDLE_IN_TRANSACTION_FACTOR = 2
"""A worker transaction (finish, then fail) is never idle longer than a round trip; twice the
answer timeout leaves a slow-but-healthy one alone."""

_SCHEMA_LOCK_KEY = 7_262_011
"""Advisory lock serialising schema application when several workers start at once."""


class NotPostgres(ValueError):
    """The queue database URL does not name a PostgreSQL database."""


class IdempotencyConflict(ValueError):
    """An idempotency key already names a job for another request (user or amount)."""

    def __init__(self, key: str | None, job_id: int, user_id: int, payload: str) -> None:
        super().__init__(
            f"idempotency key {key!r} already names job {job_id} for user_id {user_id} and"
            f" payload {payload}: a different request needs a key of its own"
        )
        self.job_id = job_id


class EmptyIdempotencyKey(ValueError):
    """An idempotency key that is empty or blank: every request sending it would share one job."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"idempotency key {key!r} is empty: omit it, or give each request a key of its own"
        )


MAX_USER_ID = 2**63 - 1
"""The largest user id scoring_jobs.user_id (bigint) holds."""

MAX_IDEMPOTENCY_KEY_LENGTH = 255
"""Characters an idempotency key may have. The key's unique btree index refuses entries over
about 2.7 kB (ProgramLimitExceeded); 255 characters stay under it even at 4 UTF-8 bytes each."""


class InvalidJobRequest(ValueError):
    """A request enqueue refuses before it reaches the table; `field` names the bad argument."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def check_request(user_id: int, amount_jpy: Any, idempotency_key: str | None) -> None:
    """InvalidJobRequest for a request the worker would fail or the table cannot hold; the
    limits are the ones worker.scoring.validate applies to jobs inserted with SQL."""
    from paylater.product import MAX_AMOUNT_JPY, MIN_AMOUNT_JPY

    if not 1 <= user_id <= MAX_USER_ID:
        raise InvalidJobRequest("user_id", f"must be within 1..{MAX_USER_ID}, got {user_id}")
    if isinstance(amount_jpy, bool) or not isinstance(amount_jpy, int):
        raise InvalidJobRequest(
            "amount_jpy", f"must be an integer number of yen, got {amount_jpy!r}"
        )
    if not MIN_AMOUNT_JPY <= amount_jpy <= MAX_AMOUNT_JPY:
        raise InvalidJobRequest(
            "amount_jpy",
            f"must be within the product's limits {MIN_AMOUNT_JPY}..{MAX_AMOUNT_JPY}, got {amount_jpy}",
        )
    if idempotency_key is None:
        return
    if len(idempotency_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        # The key itself is not echoed: it may be kilobytes long.
        raise InvalidJobRequest(
            "idempotency_key",
            f"is {len(idempotency_key)} characters long; at most {MAX_IDEMPOTENCY_KEY_LENGTH}"
            " characters are accepted",
        )
    if "\x00" in idempotency_key:  # PostgreSQL text cannot hold NUL
        raise InvalidJobRequest("idempotency_key", "must not contain NUL characters")


LEASE_EXPIRED = "lease expired: "
"""How worker/sql/claim.sql starts the error of a job it takes back from a worker that died."""


@dataclass(frozen=True)
class Job:
    """A claimed job: what the worker needs to score it and to prove it still holds it."""

    id: int
    user_id: int
    payload: Any
    attempt: int
    created_at: datetime
    previous_error: str | None = None

    @property
    def taken_back(self) -> bool:
        """Claimed from a worker that died holding it (claim.sql claims such a job alone)."""
        return bool(self.previous_error and self.previous_error.startswith(LEASE_EXPIRED))


@dataclass(frozen=True)
class UndecodablePayload:
    """A stored payload Python's json cannot decode (too deep, a number too long): invalid."""

    reason: str


@dataclass(frozen=True)
class Scored:
    """A job's score as written to scoring_results."""

    job_id: int
    attempt: int
    probability: float
    decision: str
    model_version: str
    reason_codes: list[str]


@dataclass(frozen=True)
class ShadowScored:
    """The shadow model's score of a job, written to shadow_results."""

    job_id: int
    model_version: str
    probability: float
    decision: str


@dataclass(frozen=True)
class Failed:
    """A failed attempt: permanent (the request is invalid) or retryable; an attempt the backend
    was unavailable for is not counted toward max_attempts."""

    job_id: int
    attempt: int
    error: str
    permanent: bool
    unavailable: bool = False


@cache
def sql(name: str) -> str:
    """The text of worker/sql/<name>.sql."""
    return resources.files("worker").joinpath(f"sql/{name}.sql").read_text()


def schema_sql() -> str:
    """The DDL of the contract (worker/schema.sql)."""
    return resources.files("worker").joinpath("schema.sql").read_text()


def require_postgres(
    url: str, given_by: str = "PAYLATER_WORKER_DATABASE_URL (or PAYLATER_SOURCE_URL)"
) -> str:
    """`url` itself when it names PostgreSQL; NotPostgres with the reason otherwise, telling the
    user to set `given_by` (where the URL came from) to a postgresql:// URL."""
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
        # psycopg takes libpq URLs; a SQLAlchemy driver suffix is dropped.
        return "postgresql" + url[len(scheme) :]
    raise NotPostgres(
        "the scoring queue needs PostgreSQL (FOR UPDATE SKIP LOCKED, LISTEN/NOTIFY); "
        f"got {url.split('://', 1)[0]}://…. Set {given_by} to a postgresql:// URL."
    )


def queue_url() -> str:
    """The queue database from settings: worker_database_url, else the source database."""
    from paylater.settings import get_settings

    settings = get_settings()
    return require_postgres(settings.worker_database_url or settings.source)


def connect(
    url: str,
    *,
    autocommit: bool = True,
    answer_timeout: float | None = None,
    connect_timeout: int | None = None,
    stopping: threading.Event | None = None,
) -> psycopg.Connection[Any]:
    """A connection to the queue database: connect timeout, TCP keepalives and tcp_user_timeout
    (paylater.postgres.tcp_bounds); each call waits at most `answer_timeout` seconds for the
    server, then raises paylater.postgres.NoAnswer and closes the connection (None: unbounded).
    Bounded, the session's transactions are too: one whose client went silent before its COMMIT
    is ended by the server after IDLE_IN_TRANSACTION_FACTOR answer timeouts, instead of holding
    its jobs' row locks (which every claim skips) until the server's keepalives notice, hours.
    `connect_timeout`: seconds, at most (a URL's shorter one is kept). `stopping`: once set, a
    call waits at most paylater.postgres.STOPPING_ANSWER_SECONDS more (a stopping worker)."""
    url = require_postgres(url)
    extra = {}
    if connect_timeout is not None:
        extra["connect_timeout"] = min(connect_timeout, _url_connect_timeout(url, connect_timeout))
    conn = connect_bounded(url, answer_timeout, stopping, autocommit=autocommit, **extra)
    if answer_timeout is not None:
        idle_ms = int(IDLE_IN_TRANSACTION_FACTOR * answer_timeout * 1000)
        conn.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', %s, false)", (str(idle_ms),)
        )
    return conn


def _url_connect_timeout(url: str, default: int) -> int:
    """The connect_timeout `url` sets (`default` when none, or none libpq would read as one)."""
    from psycopg.conninfo import conninfo_to_dict

    given = str(conninfo_to_dict(url).get("connect_timeout", ""))
    return int(given) if given.isdigit() and int(given) > 0 else default


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the tables, index and trigger if missing (safe to call from many workers at once)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
        conn.execute(schema_sql())


def enqueue(
    conn: psycopg.Connection[Any],
    user_id: int,
    amount_jpy: Any,
    idempotency_key: str | None = None,
) -> tuple[int, bool]:
    """Enqueue one job; returns (job id, created). A known idempotency key returns its job when
    it is the same request (user and amount); IdempotencyConflict when it names another one.
    An empty or blank key is refused (EmptyIdempotencyKey), not taken as one shared key; a
    request out of range (check_request) is InvalidJobRequest, nothing inserted."""
    from psycopg.types.json import Jsonb

    if idempotency_key is not None and not idempotency_key.strip():
        raise EmptyIdempotencyKey(idempotency_key)
    check_request(user_id, amount_jpy, idempotency_key)

    params = {
        "idempotency_key": idempotency_key,
        "user_id": user_id,
        "payload": Jsonb({"amount_jpy": amount_jpy}),
    }
    with conn.transaction():
        row = conn.execute(sql("enqueue"), params).fetchone()
        if row is not None:
            return int(row[0]), True
        found = conn.execute(sql("job_by_key"), params).fetchone()
    if found is None:  # the key's job was deleted between the two statements
        raise RuntimeError(f"idempotency key {idempotency_key!r} conflicted but its job is gone")
    job_id, same_request, found_user, found_payload = found
    if not same_request:
        raise IdempotencyConflict(idempotency_key, int(job_id), int(found_user), found_payload)
    return int(job_id), False


def claim(conn: psycopg.Connection[Any], limit: int, lease_seconds: float) -> list[Job]:
    """Claim up to `limit` due jobs (queued and due, or running with an expired lease)."""
    params = {"limit": limit, "lease_seconds": lease_seconds}
    rows = conn.execute(sql("claim"), params, binary=True).fetchall()
    return [Job(r[0], r[1], _decode(r[2]), r[3], r[4], r[5]) for r in rows]


def extend_lease(conn: psycopg.Connection[Any], jobs: Sequence[Job], lease_seconds: float) -> int:
    """Renew the lease of the jobs this worker still holds; how many it still held."""
    params = {
        "job_ids": [job.id for job in jobs],
        "attempts": [job.attempt for job in jobs],
        "lease_seconds": lease_seconds,
    }
    return conn.execute(sql("extend"), params).rowcount


def _decode(payload: str) -> Any:
    """A claimed job's payload; UndecodablePayload when Python cannot represent it."""
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as exc:
        return UndecodablePayload(f"{type(exc).__name__}: {str(exc)[:200]}")


def finish(
    conn: psycopg.Connection[Any],
    scored: Sequence[Scored],
    shadows: Sequence[ShadowScored] = (),
) -> list[int]:
    """Write results (and shadow results) and mark the jobs done; returns the job ids written."""
    if not scored:
        return []
    params = {
        "scored": json.dumps([vars(s) for s in scored]),
        "shadows": json.dumps([vars(s) for s in shadows]),
    }
    return [r[0] for r in conn.execute(sql("finish"), params).fetchall()]


def purge(
    conn: psycopg.Connection[Any], before: datetime, batch: int = 5_000, limit: int = 50_000
) -> int:
    """Delete jobs finished before `before` (and their results) in batches of `batch`, each its
    own transaction so no lock is held long; at most about `limit` per call (a backlog drains over
    several calls). Returns the number of jobs deleted."""
    deleted = 0
    while deleted < limit:
        with conn.transaction():
            n = conn.execute(sql("purge"), {"before": before, "batch": batch}).rowcount
        deleted += max(n, 0)
        if n < batch:
            break
    return deleted


def fail(
    conn: psycopg.Connection[Any],
    failures: Sequence[Failed],
    *,
    max_attempts: int,
    backoff_seconds: float,
    backoff_max_seconds: float,
) -> dict[int, str]:
    """Record failed attempts; returns the new status of each job still held ('queued'|'failed'|'dead')."""
    if not failures:
        return {}
    params = {
        "job_ids": [f.job_id for f in failures],
        "attempts": [f.attempt for f in failures],
        "errors": [f.error for f in failures],
        "permanent": [f.permanent for f in failures],
        "unavailable": [f.unavailable for f in failures],
        "max_attempts": max_attempts,
        "backoff_seconds": backoff_seconds,
        "backoff_max_seconds": backoff_max_seconds,
    }
    return {int(r[0]): str(r[1]) for r in conn.execute(sql("fail"), params).fetchall()}


def job_status(conn: psycopg.Connection[Any], job_id: int) -> dict[str, Any] | None:
    """The job's status, attempts, error and result (None when no such job)."""
    cur = conn.execute(sql("job_status"), {"job_id": job_id})
    row = cur.fetchone()
    if row is None:
        return None
    names = [d.name for d in cur.description or []]
    return dict(zip(names, row, strict=True))


def queue_stats(conn: psycopg.Connection[Any]) -> tuple[int, float]:
    """(queued jobs, age in seconds of the oldest due job: queued, or running past its lease)."""
    row = conn.execute(sql("queue_stats")).fetchone()
    assert row is not None  # an aggregate always returns a row
    return int(row[0]), float(row[1])
