-- Record a batch of scores in one statement (one round trip, one transaction): mark the jobs done
-- (only while this worker still holds them: status running and the attempt it claimed), write the
-- shadow scores, then the results. A job re-claimed by another worker after a lost lease fails the
-- fencing check here, and ON CONFLICT keeps scoring_results at one row per job in every case.
-- The batch travels as one JSON document: far cheaper to build client-side than ten arrays.
WITH scored AS (
    SELECT *
    FROM jsonb_to_recordset(%(scored)s::jsonb) AS s (
        job_id bigint, attempt integer, probability float8, decision text,
        model_version text, reason_codes jsonb
    )
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
    FROM jsonb_to_recordset(%(shadows)s::jsonb) AS sh (
        job_id bigint, model_version text, probability float8, decision text
    )
    JOIN done ON done.id = sh.job_id
    ON CONFLICT (job_id, model_version) DO NOTHING
)
INSERT INTO scoring_results (job_id, probability, decision, model_version, reason_codes)
SELECT s.job_id, s.probability, s.decision, s.model_version, s.reason_codes
FROM scored AS s
JOIN done ON done.id = s.job_id
ON CONFLICT (job_id) DO NOTHING
RETURNING job_id
