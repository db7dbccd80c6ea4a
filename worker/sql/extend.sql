-- Extend the lease of jobs this worker still holds (the attempt it claimed them with is the
-- fencing token, as in finish and fail): a long search for a job that hangs the backend keeps
-- its batch instead of letting another worker claim it meanwhile.
UPDATE scoring_jobs AS j
SET lease_until = now() + make_interval(secs => %(lease_seconds)s)
FROM unnest(%(job_ids)s::bigint[], %(attempts)s::integer[]) AS h (job_id, attempt)
WHERE j.id = h.job_id AND j.status = 'running' AND j.attempts = h.attempt
