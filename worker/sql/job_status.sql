-- A job and its result, if any.
SELECT j.id, j.status, j.attempts, j.error, r.probability, r.decision, r.model_version,
       r.reason_codes, r.scored_at
FROM scoring_jobs AS j
LEFT JOIN scoring_results AS r ON r.job_id = j.id
WHERE j.id = %(job_id)s
