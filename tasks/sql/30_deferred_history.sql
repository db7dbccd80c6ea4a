-- The user's earlier deferred charges as they stood at the end of D-1. A repayment is only known
-- if it happened before D: a charge repaid later was still unpaid then (evaluating today's
-- status or repaid_at instead is the classic leakage trap). An unpaid charge whose due date has
-- passed (due_date < D) is late, by the days elapsed so far. A repaid charge without days_late
-- is late by its repayment's local day, as label.sql counts it. Local days as in 10_card.sql.
WITH prior AS (
  SELECT
    r.request_id,
    CAST(d.amount_jpy + d.fee_jpy AS FLOAT64) AS owed_jpy,
    UNIX_DATE(r.request_date) - DIV((UNIX_MICROS(d.requested_at) + @utc_offset_us), 86400000000) AS age_days,
    d.repaid_at IS NOT NULL
      AND DIV((UNIX_MICROS(d.repaid_at) + @utc_offset_us), 86400000000) < UNIX_DATE(r.request_date)
      AS repaid_known,
    d.due_date < r.request_date AS past_due,
    COALESCE(d.days_late, GREATEST(DIV((UNIX_MICROS(d.repaid_at) + @utc_offset_us), 86400000000) - UNIX_DATE(d.due_date), 0))
      AS days_late,
    DATE_DIFF(r.request_date, d.due_date, DAY) AS days_past_due
  FROM requests AS r
  JOIN deferred_charges AS d
    ON d.user_id = r.user_id
    AND DIV((UNIX_MICROS(d.requested_at) + @utc_offset_us), 86400000000) < UNIX_DATE(r.request_date)
),
state AS (
  SELECT
    request_id,
    owed_jpy,
    age_days,
    repaid_known,
    repaid_known OR past_due AS settled_or_due,
    CASE
      WHEN repaid_known THEN days_late
      WHEN past_due THEN days_past_due
      ELSE 0
    END AS days_late_known
  FROM prior
),
per_request AS (
  SELECT
    request_id,
    COUNT(*) AS dc_count,
    COUNT(IF(days_late_known > 0, 1, NULL)) AS dc_late_count,
    CAST(MAX(days_late_known) AS INT64) AS dc_max_days_late,
    SAFE_DIVIDE(COUNT(IF(settled_or_due AND days_late_known = 0, 1, NULL)), COUNT(IF(settled_or_due, 1, NULL))) AS dc_on_time_ratio,
    CAST(SUM(IF(repaid_known, 0, owed_jpy)) AS INT64) AS dc_outstanding_jpy,
    MIN(age_days) AS dc_days_since_last
  FROM state
  GROUP BY request_id
)
SELECT
  r.request_id,
  COALESCE(p.dc_count, 0) AS dc_count,
  COALESCE(p.dc_late_count, 0) AS dc_late_count,
  COALESCE(p.dc_max_days_late, 0) AS dc_max_days_late,
  p.dc_on_time_ratio,
  COALESCE(p.dc_outstanding_jpy, 0) AS dc_outstanding_jpy,
  p.dc_days_since_last
FROM requests AS r
LEFT JOIN per_request AS p ON p.request_id = r.request_id
