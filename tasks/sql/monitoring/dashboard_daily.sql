-- Production scoring by business day (in :tz): volume, score quantiles, approval rate and
-- enqueue-to-result latency, over the days since :since.
SELECT
    (r.scored_at AT TIME ZONE :tz)::date AS day,
    count(*) AS scored,
    percentile_cont(0.1) WITHIN GROUP (ORDER BY r.probability) AS score_p10,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY r.probability) AS score_p50,
    percentile_cont(0.9) WITHIN GROUP (ORDER BY r.probability) AS score_p90,
    avg(CASE WHEN r.decision = 'approve' THEN 1.0 ELSE 0.0 END) AS approval_rate,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM r.scored_at - j.created_at))
        AS latency_p50_s,
    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM r.scored_at - j.created_at))
        AS latency_p99_s
FROM scoring_results r
JOIN scoring_jobs j ON j.id = r.job_id
WHERE r.scored_at >= :since
GROUP BY 1
ORDER BY 1
