-- Record a batch of scores in one statement (one round trip, one transaction): mark the jobs done
-- (only while this worker still holds them: status running and the attempt it claimed), write the
-- shadow scores, then the results. A job re-claimed by another worker after a lost lease fails the
-- fencing check here, and ON CONFLICT keeps scoring_results at one row per job in every case.
WITH scored AS (
    SELECT *
    FROM unnest(
        %(job_ids)s::bigint[], %(attempts)s::integer[], %(probabilities)s::float8[],
        %(decisions)s::text[], %(model_versions)s::text[], %(reason_codes)s::text[]
    ) AS s (job_id, attempt, probability, decision, model_version, reason_codes)
),
done AS (
    UPDATE scoring_jobs AS j
    SET status = 'done', lease_until = NULL, updated_at = now()
    FROM scored AS s
    WHERE j.id = s.job_id AND j.status = 'running' AND j.attempts = s.attempt
    RETURNING j.id
),
shadow AS (
    INSERT INTO shadow_results (job_id, model_version, probability, decision)
    SELECT sh.job_id, sh.model_version, sh.probability, sh.decision
    FROM unnest(
        %(shadow_job_ids)s::bigint[], %(shadow_model_versions)s::text[],
        %(shadow_probabilities)s::float8[], %(shadow_decisions)s::text[]
    ) AS sh (job_id, model_version, probability, decision)
    JOIN done ON done.id = sh.job_id
    ON CONFLICT (job_id, model_version) DO NOTHING
)
INSERT INTO scoring_results (job_id, probability, decision, model_version, reason_codes)
SELECT s.job_id, s.probability, s.decision, s.model_version, s.reason_codes::jsonb
FROM scored AS s
JOIN done ON done.id = s.job_id
ON CONFLICT (job_id) DO NOTHING
RETURNING job_id
