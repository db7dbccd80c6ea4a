-- Delete a batch of jobs that finished (done, failed, dead) before %(before)s, oldest first, with
-- their results and shadow results (ON DELETE CASCADE); queued and running jobs are never touched.
-- Walks scoring_jobs_finished; SKIP LOCKED leaves a row some other session holds to a later run.
WITH old AS (
    SELECT id
    FROM scoring_jobs
    WHERE status IN ('done', 'failed', 'dead') AND updated_at < %(before)s
    ORDER BY updated_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM scoring_jobs AS j
USING old
WHERE j.id = old.id
