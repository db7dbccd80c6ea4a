-- The label as known at the end of @as_of: a charge is good (0) only when it was repaid by then
-- AND within @grace_days of its due date; anything else (never repaid, repaid too late, or
-- repaid after @as_of, which the build cannot know yet) is a default (1). Local days: epoch
-- arithmetic with the zone's fixed offset (see 10_card.sql).
SELECT
  charge_id,
  CAST(
    CASE
      WHEN repaid_at IS NOT NULL
        AND DIV((UNIX_MICROS(repaid_at) + @utc_offset_us), 86400000000) <= UNIX_DATE(@as_of)
        AND COALESCE(days_late, DIV((UNIX_MICROS(repaid_at) + @utc_offset_us), 86400000000) - UNIX_DATE(due_date)) <= @grace_days
        THEN 0
      ELSE 1
    END AS INT64
  ) AS label_default
FROM deferred_charges
