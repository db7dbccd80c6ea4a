"""The job table contract on real PostgreSQL: enqueue, idempotency, leases, fencing, retries."""

from __future__ import annotations

import time
from typing import Any

import pytest

from worker import queue


def test_schema_reapplies_and_one_insert_enqueues(queue_db: str, kit: Any) -> None:
    """The documented one-statement INSERT works and a repeated key makes no second job."""
    with queue.connect(queue_db) as conn:
        queue.ensure_schema(conn)  # twice: idempotent
        insert = (
            "INSERT INTO scoring_jobs (idempotency_key, user_id, payload) "
            "VALUES ('order-1', 3, '{\"amount_jpy\": 30000}') "
            "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
        )
        first = conn.execute(insert).fetchall()
        again = conn.execute(insert).fetchall()
        assert len(first) == 1 and again == []
        job_id, created = queue.enqueue(conn, 3, 30_000, "order-1")
        assert (job_id, created) == (first[0][0], False)
        other, created = queue.enqueue(conn, 3, 30_000, "order-2")
        assert created and other != job_id
    rows = kit.query(queue_db, "SELECT status, attempts, payload FROM scoring_jobs ORDER BY id")
    assert rows == [("queued", 0, {"amount_jpy": 30000})] * 2


def test_queue_refuses_anything_but_postgres() -> None:
    """A SQLite URL gets one clear error naming the setting to change."""
    with pytest.raises(queue.NotPostgres, match="PAYLATER_WORKER_DATABASE_URL"):
        queue.require_postgres("sqlite:///var/source.db")
    assert queue.require_postgres("postgresql+psycopg://h/db") == "postgresql://h/db"


def test_expired_lease_is_reclaimed_and_stale_worker_cannot_write(queue_db: str, kit: Any) -> None:
    """Worker A's lease runs out, B re-claims; A's late finish is fenced off, B's counts once."""
    with queue.connect(queue_db) as a, queue.connect(queue_db) as b:
        job_id, _ = queue.enqueue(a, 1, 5_000)
        [first] = queue.claim(a, 10, lease_seconds=0.5)
        assert queue.claim(b, 10, lease_seconds=30) == []  # leased: SKIP LOCKED or not due
        time.sleep(0.6)
        [second] = queue.claim(b, 10, lease_seconds=30)
        assert (second.id, second.attempt) == (job_id, first.attempt + 1)
        assert second.previous_error is not None and "lease expired" in second.previous_error
        stale = queue.Scored(job_id, first.attempt, 0.9, "decline", "7", ["X"])
        assert queue.finish(a, [stale]) == []
        fresh = queue.Scored(job_id, second.attempt, 0.1, "approve", "7", [])
        assert queue.finish(b, [fresh]) == [job_id]
        assert queue.finish(b, [fresh]) == []  # a replay writes nothing either
    assert kit.query(queue_db, "SELECT job_id, decision FROM scoring_results") == [
        (job_id, "approve")
    ]
    assert kit.query(queue_db, "SELECT status FROM scoring_jobs") == [("done",)]


def test_failed_attempts_back_off_then_dead_letter(queue_db: str, kit: Any) -> None:
    """Retryable errors requeue with a doubling delay, then dead-letter; invalid requests fail at once."""
    policy = {"max_attempts": 3, "backoff_seconds": 0.0, "backoff_max_seconds": 0.0}
    with queue.connect(queue_db) as conn:
        job_id, _ = queue.enqueue(conn, 1, 5_000)
        for attempt in (1, 2, 3):
            [job] = queue.claim(conn, 10, lease_seconds=30)
            assert job.attempt == attempt
            failed = queue.Failed(job.id, job.attempt, f"boom {attempt}", permanent=False)
            assert queue.fail(conn, [failed], **policy) == {
                job_id: "queued" if attempt < 3 else "dead"
            }
        assert queue.claim(conn, 10, lease_seconds=30) == []

        slow_id, _ = queue.enqueue(conn, 2, 5_000)
        [job] = queue.claim(conn, 10, lease_seconds=30)
        queue.fail(
            conn,
            [queue.Failed(job.id, job.attempt, "timeout", permanent=False)],
            max_attempts=3,
            backoff_seconds=10.0,
            backoff_max_seconds=60.0,
        )
        assert queue.claim(conn, 10, lease_seconds=30) == []  # backing off
        [(delay,)] = conn.execute(
            "SELECT extract(epoch FROM run_after - now()) FROM scoring_jobs WHERE id = %s",
            (slow_id,),
        ).fetchall()
        assert 8 < float(delay) <= 10

        bad_id, _ = queue.enqueue(conn, 3, 5_000)
        [job] = queue.claim(conn, 10, lease_seconds=30)
        invalid = queue.Failed(job.id, job.attempt, "invalid request: x", permanent=True)
        assert queue.fail(conn, [invalid], **policy) == {bad_id: "failed"}
    rows = kit.query(queue_db, "SELECT id, status, attempts, error FROM scoring_jobs ORDER BY id")
    assert rows == [
        (job_id, "dead", 3, "boom 3"),
        (slow_id, "queued", 1, "timeout"),
        (bad_id, "failed", 1, "invalid request: x"),
    ]
