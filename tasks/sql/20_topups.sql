-- Top-ups before the request day D: how the user funds the card (by method) over the last 30 and
-- 90 days, and how long since the last one (all history before D). Local days as in 10_card.sql.
WITH request_days AS (
  SELECT request_id, user_id, UNIX_DATE(request_date) AS request_day FROM requests
),
topup AS (
  SELECT
    user_id,
    DIV((UNIX_MICROS(topped_up_at) + @utc_offset_us), 86400000000) AS local_day,
    CAST(amount_jpy AS FLOAT64) AS amount_jpy,
    CASE method
      WHEN 'convenience_store' THEN 1 WHEN 'bank' THEN 2 WHEN 'credit_card' THEN 3 WHEN 'deferred' THEN 4
      ELSE 0
    END AS method_code
  FROM topups
  -- Nothing on or after the last request day is ever looked at (see 10_card.sql).
  WHERE topped_up_at < (SELECT TIMESTAMP_MICROS(MAX(request_day) * 86400000000 - @utc_offset_us) FROM request_days)
),
joined AS (
  SELECT
    r.request_id,
    t.amount_jpy,
    t.method_code,
    r.request_day - t.local_day AS age_days
  FROM request_days AS r
  JOIN topup AS t
    ON t.user_id = r.user_id
    AND t.local_day < r.request_day
),
per_request AS (
  SELECT
    request_id,
    COUNT(IF(age_days <= 30, 1, NULL)) AS topup_count_30d,
    CAST(SUM(IF(age_days <= 30, amount_jpy, NULL)) AS INT64) AS topup_sum_30d,
    COUNT(IF(age_days <= 90, 1, NULL)) AS topup_count_90d,
    CAST(SUM(IF(age_days <= 90, amount_jpy, NULL)) AS INT64) AS topup_sum_90d,
    CAST(SUM(IF(age_days <= 30 AND method_code = 1, amount_jpy, NULL)) AS INT64) AS cs_30d,
    CAST(SUM(IF(age_days <= 30 AND method_code = 2, amount_jpy, NULL)) AS INT64) AS bank_30d,
    CAST(SUM(IF(age_days <= 30 AND method_code = 3, amount_jpy, NULL)) AS INT64) AS cc_30d,
    CAST(SUM(IF(age_days <= 30 AND method_code = 4, amount_jpy, NULL)) AS INT64) AS deferred_30d,
    CAST(SUM(IF(age_days <= 90 AND method_code = 1, amount_jpy, NULL)) AS INT64) AS cs_90d,
    CAST(SUM(IF(age_days <= 90 AND method_code = 2, amount_jpy, NULL)) AS INT64) AS bank_90d,
    CAST(SUM(IF(age_days <= 90 AND method_code = 3, amount_jpy, NULL)) AS INT64) AS cc_90d,
    CAST(SUM(IF(age_days <= 90 AND method_code = 4, amount_jpy, NULL)) AS INT64) AS deferred_90d,
    MIN(age_days) AS topup_days_since_last
  FROM joined
  GROUP BY request_id
)
SELECT
  r.request_id,
  COALESCE(p.topup_count_30d, 0) AS topup_count_30d,
  COALESCE(p.topup_sum_30d, 0) AS topup_sum_30d,
  COALESCE(p.topup_count_90d, 0) AS topup_count_90d,
  COALESCE(p.topup_sum_90d, 0) AS topup_sum_90d,
  COALESCE(p.cs_30d, 0) AS topup_convenience_store_sum_30d,
  COALESCE(p.bank_30d, 0) AS topup_bank_sum_30d,
  COALESCE(p.cc_30d, 0) AS topup_credit_card_sum_30d,
  COALESCE(p.deferred_30d, 0) AS topup_deferred_sum_30d,
  COALESCE(p.cs_90d, 0) AS topup_convenience_store_sum_90d,
  COALESCE(p.bank_90d, 0) AS topup_bank_sum_90d,
  COALESCE(p.cc_90d, 0) AS topup_credit_card_sum_90d,
  COALESCE(p.deferred_90d, 0) AS topup_deferred_sum_90d,
  p.topup_days_since_last
FROM requests AS r
LEFT JOIN per_request AS p ON p.request_id = r.request_id
