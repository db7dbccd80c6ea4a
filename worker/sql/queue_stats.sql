-- Backlog for the metrics: queued jobs, and the age of the oldest job that is due now: queued past
-- its run_after, or running past an expired lease (its worker died holding it), as the monitor's
-- oldest_queued_age counts it (tasks/sql/monitoring/queue_stats.sql). Walks scoring_jobs_due.
SELECT count(*) FILTER (WHERE status = 'queued') AS depth,
       coalesce(
           extract(epoch FROM now() - min(created_at) FILTER (
               WHERE (CASE WHEN status = 'queued' THEN run_after ELSE lease_until END) <= now()
           )),
           0
       ) AS oldest_age_seconds
FROM scoring_jobs
WHERE status IN ('queued', 'running')
