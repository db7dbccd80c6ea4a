-- Production scores of the last day(s), the current side of the daily score PSI: those of the
-- production version only (the day after a promotion or rollback also holds the other version's,
-- which its reference, the version's scores of its training requests, does not describe).
SELECT probability FROM scoring_results WHERE scored_at >= :since AND model_version = :version
