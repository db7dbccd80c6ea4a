-- Claim up to %(limit)s due jobs for this worker: queued ones whose run_after has passed and
-- running ones whose lease ran out (their worker died). SKIP LOCKED lets workers claim side by
-- side without waiting on each other; attempts + 1 is the fencing token the finish statements check.
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
    SELECT id
    FROM scoring_jobs
    WHERE status IN ('queued', 'running')
      AND (CASE WHEN status = 'queued' THEN run_after ELSE lease_until END) <= now()
    ORDER BY (CASE WHEN status = 'queued' THEN run_after ELSE lease_until END)
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
))
RETURNING j.id, j.user_id, j.payload::text, j.attempts, j.created_at, j.error
