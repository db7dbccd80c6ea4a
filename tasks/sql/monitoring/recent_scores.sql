-- Production scores of the last day(s), the current side of the daily score PSI.
SELECT probability FROM scoring_results WHERE scored_at >= :since
