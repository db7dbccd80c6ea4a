-- Record failed attempts (only for jobs this worker still holds). An invalid request fails for
-- good; any other error is retried after an exponential backoff until max_attempts, then the job
-- is dead-lettered with the error.
UPDATE scoring_jobs AS j
SET status = CASE
        WHEN f.permanent THEN 'failed'
        WHEN j.attempts >= %(max_attempts)s THEN 'dead'
        ELSE 'queued'
    END,
    run_after = CASE
        WHEN f.permanent OR j.attempts >= %(max_attempts)s THEN j.run_after
        ELSE now() + make_interval(
            secs => least(%(backoff_max_seconds)s, %(backoff_seconds)s * 2 ^ (j.attempts - 1))
        )
    END,
    lease_until = NULL,
    error = f.error,
    updated_at = now()
FROM unnest(
    %(job_ids)s::bigint[], %(attempts)s::integer[], %(errors)s::text[], %(permanent)s::boolean[]
) AS f (job_id, attempt, error, permanent)
WHERE j.id = f.job_id AND j.status = 'running' AND j.attempts = f.attempt
RETURNING j.id, j.status
