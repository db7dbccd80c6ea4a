-- Record failed attempts (only for jobs this worker still holds). An invalid request fails for
-- good; a backend that could not be reached at all (nobody's fault) requeues the job and gives
-- the attempt back, so an outage longer than the retry budget dead-letters nothing; any other
-- error is retried after an exponential backoff until max_attempts, then the job is
-- dead-lettered with the error.
UPDATE scoring_jobs AS j
SET status = CASE
        WHEN f.permanent THEN 'failed'
        WHEN f.unavailable THEN 'queued'
        WHEN j.attempts >= %(max_attempts)s THEN 'dead'
        ELSE 'queued'
    END,
    -- The next claim reuses the given-back number as its fencing token: safe, since this worker,
    -- the number's only holder (the WHERE below checks it), has let go of the job.
    attempts = CASE WHEN f.unavailable THEN j.attempts - 1 ELSE j.attempts END,
    run_after = CASE
        WHEN f.permanent OR (j.attempts >= %(max_attempts)s AND NOT f.unavailable) THEN j.run_after
        ELSE now() + make_interval(
            secs => least(%(backoff_max_seconds)s, %(backoff_seconds)s * 2 ^ (j.attempts - 1))
        )
    END,
    lease_until = NULL,
    error = f.error,
    updated_at = now()
FROM unnest(
    %(job_ids)s::bigint[], %(attempts)s::integer[], %(errors)s::text[], %(permanent)s::boolean[],
    %(unavailable)s::boolean[]
) AS f (job_id, attempt, error, permanent, unavailable)
WHERE j.id = f.job_id AND j.status = 'running' AND j.attempts = f.attempt
RETURNING j.id, j.status
