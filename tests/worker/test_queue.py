"""The job table contract on real PostgreSQL: enqueue, idempotency, leases, fencing, retries."""

from __future__ import annotations

import random
import time
from typing import Any, TypedDict

import pytest

from worker import queue


class RetryPolicy(TypedDict):
    """queue.fail's retry keywords, so one policy can be passed as **policy."""

    max_attempts: int
    backoff_seconds: float
    backoff_max_seconds: float


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


def test_a_url_libpq_cannot_parse_is_refused_without_its_password() -> None:
    """libpq quotes a URL it cannot parse whole: the error the worker logs on every reconnect
    (queue or feature database) names the problem, never the password."""
    import traceback

    import psycopg

    url = "postgresql://app:Wr0ngSecret@[::1]x/queue"  # a name: tracebacks quote source lines
    with pytest.raises(psycopg.ProgrammingError, match="unexpected character") as caught:
        queue.connect(url)
    printed = "".join(traceback.format_exception(caught.value))
    assert "Wr0ngSecret" not in printed and "app:***@[::1]x/queue" in printed, printed


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
    policy: RetryPolicy = {"max_attempts": 3, "backoff_seconds": 0.0, "backoff_max_seconds": 0.0}
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


def test_purge_deletes_finished_jobs_past_retention_with_their_results(
    queue_db: str, kit: Any
) -> None:
    """Done, failed and dead jobs finished before the cutoff go, results and shadows with them;
    queued and running jobs stay whatever their age, and so do recently finished ones."""
    with queue.connect(queue_db) as conn:
        ids = {}
        for name in ("old_done", "old_failed", "old_dead", "new_done", "old_queued", "old_running"):
            ids[name], _ = queue.enqueue(conn, 1, 5_000, f"key-{name}")
        claimed = queue.claim(conn, 10, lease_seconds=30)
        attempt = {job.id: job.attempt for job in claimed}
        done = [ids["old_done"], ids["new_done"]]
        scored = [queue.Scored(i, attempt[i], 0.1, "approve", "7", []) for i in done]
        shadow = [queue.ShadowScored(i, "8", 0.2, "approve") for i in done]
        assert sorted(queue.finish(conn, scored, shadow)) == sorted(done)
        queue.fail(
            conn,
            [
                queue.Failed(ids["old_failed"], attempt[ids["old_failed"]], "bad", permanent=True),
                queue.Failed(ids["old_dead"], attempt[ids["old_dead"]], "boom", permanent=False),
                queue.Failed(ids["old_queued"], attempt[ids["old_queued"]], "x", permanent=False),
            ],
            max_attempts=1,
            backoff_seconds=0.0,
            backoff_max_seconds=0.0,
        )
        conn.execute("UPDATE scoring_jobs SET status = 'queued' WHERE id = %s", [ids["old_queued"]])
        old = [ids[n] for n in ids if n.startswith("old_")]
        conn.execute(
            "UPDATE scoring_jobs SET updated_at = now() - interval '100 days',"
            " created_at = now() - interval '100 days' WHERE id = ANY(%s)",
            [old],
        )
        cutoff = kit.query(queue_db, "SELECT now() - interval '90 days'")[0][0]
        assert queue.purge(conn, cutoff, batch=1) == 3  # batches of one: the loop goes on
        assert queue.purge(conn, cutoff) == 0
    left = dict(kit.query(queue_db, "SELECT idempotency_key, status FROM scoring_jobs"))
    assert left == {
        "key-new_done": "done",
        "key-old_queued": "queued",
        "key-old_running": "running",
    }
    assert kit.query(queue_db, "SELECT job_id FROM scoring_results") == [(ids["new_done"],)]
    assert kit.query(queue_db, "SELECT job_id FROM shadow_results") == [(ids["new_done"],)]
    with queue.connect(queue_db) as conn:  # the key of a purged job is free again
        assert queue.enqueue(conn, 1, 5_000, "key-old_done")[1] is True


def test_purge_stops_at_its_limit_and_the_monitor_window_uses_an_index(
    queue_db: str, kit: Any
) -> None:
    """A backlog drains over several calls; the purge and the monitor's failure-rate window read
    the finished-jobs index, not the whole table (the queue keeps every job for months)."""
    with queue.connect(queue_db) as conn:
        conn.execute(
            "INSERT INTO scoring_jobs (user_id, payload, status, updated_at)"
            " SELECT g, '{}', 'done', now() - interval '200 days' FROM generate_series(1, 25) g"
        )
        cutoff = kit.query(queue_db, "SELECT now() - interval '90 days'")[0][0]
        assert queue.purge(conn, cutoff, batch=10, limit=20) == 20
        assert queue.purge(conn, cutoff, batch=10, limit=20) == 5
        conn.execute("SET enable_seqscan = off")
        for statement, params in (
            (queue.sql("purge"), {"before": cutoff, "batch": 10}),
            (
                "SELECT count(*) FROM scoring_jobs WHERE updated_at >= %(since)s"
                " AND status IN ('done', 'failed', 'dead')",
                {"since": cutoff},
            ),
        ):
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + statement, params))
            assert "scoring_jobs_finished" in plan, plan
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN SELECT probability FROM scoring_results WHERE scored_at >= %s", [cutoff]
            )
        )
        assert "scoring_results_scored_at" in plan, plan


def test_a_queue_host_that_never_answers_fails_the_connect_in_seconds(
    silent_postgres: str,
) -> None:
    """A server that takes the TCP connection and then says nothing fails after connect_timeout,
    not minutes later (or never)."""
    import psycopg

    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="timeout"):
        queue.connect(silent_postgres)
    assert time.monotonic() - started < 15
    with pytest.raises(psycopg.OperationalError, match="timeout"):
        queue.connect(silent_postgres + "?connect_timeout=3")  # the URL's own wins


def test_a_key_reused_for_a_different_request_is_refused(queue_db: str, kit: Any) -> None:
    """A retried request gets its job back; the same key for another user or amount (a client
    bug) is refused naming both requests, never answered with the other request's job."""
    with queue.connect(queue_db) as conn:
        job_id, _ = queue.enqueue(conn, 3, 30_000, "order-9")
        assert queue.enqueue(conn, 3, 30_000, "order-9") == (job_id, False)
        for user_id, amount in [(4, 30_000), (3, 31_000)]:
            with pytest.raises(queue.IdempotencyConflict, match="order-9") as caught:
                queue.enqueue(conn, user_id, amount, "order-9")
            assert caught.value.job_id == job_id
    assert kit.query(queue_db, "SELECT count(*) FROM scoring_jobs") == [(1,)]


def test_an_empty_idempotency_key_is_refused_not_shared(queue_db: str, kit: Any) -> None:
    """A client that sends "" (an unset field serialised as empty) would give every request the
    same key: the second user would be refused, or answered with the first user's job."""
    with queue.connect(queue_db) as conn:
        for key in ("", "   "):
            with pytest.raises(queue.EmptyIdempotencyKey, match="is empty"):
                queue.enqueue(conn, 3, 30_000, key)
        queue.enqueue(conn, 3, 30_000)  # no key at all: fine
    assert kit.query(queue_db, "SELECT count(*), count(idempotency_key) FROM scoring_jobs") == [
        (1, 0)
    ]


def test_queue_age_gauge_counts_jobs_whose_worker_died_holding_them(
    queue_db: str, kit: Any
) -> None:
    """A job left running past its lease (its worker killed) is due and late, as the monitor's
    oldest_queued_age counts it; the worker's gauge, its Prometheus twin, read only queued jobs,
    so a crash-looping worker holding the whole backlog showed an age of 0 and no alert."""
    with queue.connect(queue_db) as conn:
        job_id, _ = queue.enqueue(conn, 1, 5_000)
        conn.execute(
            "UPDATE scoring_jobs SET created_at = now() - interval '1 hour' WHERE id = %s",
            (job_id,),
        )
        [job] = queue.claim(conn, 10, lease_seconds=0)  # the lease is over at once: worker "died"
        assert job.id == job_id
        depth, oldest = queue.queue_stats(conn)
        assert depth == 0 and oldest >= 3_600
        queue.claim(conn, 10, lease_seconds=600)  # re-claimed by a live worker: not late any more
        assert queue.queue_stats(conn) == (0, 0.0)


@pytest.mark.parametrize(
    ("user_id", "amount", "key", "message"),
    [
        (
            2**63,
            5_000,
            None,
            "user_id must be within 1..9223372036854775807, got 9223372036854775808",
        ),
        (0, 5_000, None, "user_id must be within 1..9223372036854775807, got 0"),
        (3, 999, None, "amount_jpy must be within the product's limits 1000..100000, got 999"),
        (3, 5_000.0, None, "amount_jpy must be an integer number of yen"),
        (3, 5_000, "k" * 256, "idempotency_key is 256 characters long; at most 255"),
        (3, 5_000, "a\x00b", "idempotency_key must not contain NUL"),
    ],
)
def test_enqueue_refuses_a_request_the_table_cannot_hold_or_the_worker_would_fail(
    queue_db: str, kit: Any, user_id: int, amount: Any, key: str | None, message: str
) -> None:
    """Library callers get the CLI's checks: a clear InvalidJobRequest, not a database error
    (bigint out of range, index row too large) or a job the worker can only fail."""
    with queue.connect(queue_db) as conn:
        with pytest.raises(queue.InvalidJobRequest) as refused:
            queue.enqueue(conn, user_id, amount, key)
        assert str(refused.value).startswith(message)
        # The longest key, in 4-byte characters the index cannot compress: still stored.
        rng = random.Random(0)
        longest = "".join(
            chr(rng.randrange(0x10000, 0x10FFFF)) for _ in range(queue.MAX_IDEMPOTENCY_KEY_LENGTH)
        )
        queue.enqueue(conn, queue.MAX_USER_ID, 100_000, longest)  # the limits themselves: fine
    assert kit.query(queue_db, "SELECT count(*) FROM scoring_jobs") == [(1,)]
