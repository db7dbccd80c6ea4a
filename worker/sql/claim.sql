-- Claim up to %(limit)s due jobs for this worker: queued ones whose run_after has passed and
-- running ones whose lease ran out (their worker died). SKIP LOCKED lets workers claim side by
-- side without waiting on each other; attempts + 1 is the fencing token the finish statements check.
-- A job taken back from a dead worker is claimed alone: when it is what killed the worker, only
-- it dies again (and is dead-lettered at max_attempts), not the batch-mates its lease ran out
-- with. When the first due job is such a job, the claim is that job; otherwise the due queued
-- jobs (any taken-back one among them waits for a claim it heads, soon: its lease is long over).
-- `id = ANY(ARRAY(...))` keeps the update on primary-key lookups (a join here hashes the table).
-- The payload comes back as text and is decoded per job: jsonb that Python's json refuses (a
-- 5,000-digit number, deep nesting) must fail its own job, not the fetch of the whole batch.
UPDATE scoring_jobs AS j
SET status = 'running',
    attempts = j.attempts + 1,
    lease_until = now() + make_interval(secs => %(lease_seconds)s),
    error = CASE
        WHEN j.status = 'running'
            THEN 'lease expired: the worker running attempt ' || j.attempts || ' was lost'
        ELSE j.error
    END,
    updated_at = now()
WHERE j.id = ANY (ARRAY(
    WITH due AS MATERIALIZED (
        SELECT id, status, (CASE WHEN status = 'queued' THEN run_after ELSE lease_until END) AS due_at
        FROM scoring_jobs
        WHERE status IN ('queued', 'running')
          AND (CASE WHEN status = 'queued' THEN run_after ELSE lease_until END) <= now()
        ORDER BY (CASE WHEN status = 'queued' THEN run_after ELSE lease_until END)
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ),
    head AS (
        SELECT id, status FROM due ORDER BY due_at, id LIMIT 1
    )
    SELECT due.id
    FROM due, head
    WHERE CASE WHEN head.status = 'running' THEN due.id = head.id ELSE due.status = 'queued' END
))
RETURNING j.id, j.user_id, j.payload::text, j.attempts, j.created_at, j.error
