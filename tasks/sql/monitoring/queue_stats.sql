-- Backlog and outcomes of the scoring queue (worker/schema.sql), `now` bound by the caller.
-- Oldest age counts due jobs only (queued past run_after, or running past an expired lease):
-- a job waiting out its retry backoff is not late. The backlog parts match the worker's partial
-- index scoring_jobs_due, the window part its index scoring_jobs_finished.
-- Finished = done, failed (invalid request) or dead (attempts ran out); failures = failed + dead.
WITH window_jobs AS (
    SELECT
        count(*) AS finished,
        count(*) FILTER (WHERE status IN ('failed', 'dead')) AS failed,
        count(*) FILTER (WHERE status = 'dead') AS dead
    FROM scoring_jobs
    WHERE updated_at >= :since AND status IN ('done', 'failed', 'dead')
)
SELECT
    (SELECT count(*) FROM scoring_jobs WHERE status = 'queued') AS queue_depth,
    (SELECT min(created_at) FROM scoring_jobs
      WHERE status IN ('queued', 'running')
        AND (CASE WHEN status = 'queued' THEN run_after ELSE lease_until END) <= :now)
        AS oldest_queued_at,
    window_jobs.finished AS finished_in_window,
    window_jobs.failed AS failed_in_window,
    window_jobs.dead AS dead_in_window
FROM window_jobs
