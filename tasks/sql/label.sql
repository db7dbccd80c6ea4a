-- The label as known at the end of @as_of: a charge is good (0) only when it was repaid by then
-- AND within @grace_days of its due date; anything else (never repaid, repaid too late, or
-- repaid after @as_of, which the build cannot know yet) is a default (1).
SELECT
  charge_id,
  CAST(
    CASE
      WHEN repaid_at IS NOT NULL
        AND DATE(repaid_at, @tz) <= @as_of
        AND COALESCE(days_late, DATE_DIFF(DATE(repaid_at, @tz), due_date, DAY)) <= @grace_days
        THEN 0
      ELSE 1
    END AS INT64
  ) AS label_default
FROM deferred_charges
