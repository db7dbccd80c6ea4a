-- Top-ups before the request day D: how the user funds the card (by method) over the last 30 and
-- 90 days, and how long since the last one (all history before D).
WITH topup AS (
  SELECT user_id, DATE(topped_up_at, @tz) AS local_date, amount_jpy, method
  FROM topups
),
joined AS (
  SELECT
    r.request_id,
    t.amount_jpy,
    t.method,
    DATE_DIFF(r.request_date, t.local_date, DAY) AS age_days
  FROM requests AS r
  JOIN topup AS t
    ON t.user_id = r.user_id
    AND t.local_date < r.request_date
),
per_request AS (
  SELECT
    request_id,
    COUNTIF(age_days <= 30) AS topup_count_30d,
    CAST(SUM(IF(age_days <= 30, amount_jpy, NULL)) AS INT64) AS topup_sum_30d,
    COUNTIF(age_days <= 90) AS topup_count_90d,
    CAST(SUM(IF(age_days <= 90, amount_jpy, NULL)) AS INT64) AS topup_sum_90d,
    CAST(SUM(IF(age_days <= 30 AND method = 'convenience_store', amount_jpy, NULL)) AS INT64) AS cs_30d,
    CAST(SUM(IF(age_days <= 30 AND method = 'bank', amount_jpy, NULL)) AS INT64) AS bank_30d,
    CAST(SUM(IF(age_days <= 30 AND method = 'credit_card', amount_jpy, NULL)) AS INT64) AS cc_30d,
    CAST(SUM(IF(age_days <= 30 AND method = 'deferred', amount_jpy, NULL)) AS INT64) AS deferred_30d,
    CAST(SUM(IF(age_days <= 90 AND method = 'convenience_store', amount_jpy, NULL)) AS INT64) AS cs_90d,
    CAST(SUM(IF(age_days <= 90 AND method = 'bank', amount_jpy, NULL)) AS INT64) AS bank_90d,
    CAST(SUM(IF(age_days <= 90 AND method = 'credit_card', amount_jpy, NULL)) AS INT64) AS cc_90d,
    CAST(SUM(IF(age_days <= 90 AND method = 'deferred', amount_jpy, NULL)) AS INT64) AS deferred_90d,
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
