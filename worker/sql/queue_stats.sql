-- Backlog for the metrics: queued jobs, and the age of the oldest one that is due now.
SELECT count(*) AS depth,
       coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE run_after <= now())), 0)
           AS oldest_age_seconds
FROM scoring_jobs
WHERE status = 'queued'
