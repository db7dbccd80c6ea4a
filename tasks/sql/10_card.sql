-- Card spending before the request day D (local dates D-90 .. D-1, and the three calendar months
-- before D's month). "Spent" means not declined: refunded transactions count at their
-- authorization, because the source has no refund timestamp and using today's refunded status
-- would leak a later event into an earlier request. Declined ones are counted on their own
-- (a decline is known the moment it happens).
WITH card AS (
  SELECT
    user_id,
    DATE(authorized_at, @tz) AS local_date,
    EXTRACT(HOUR FROM authorized_at AT TIME ZONE @tz) AS local_hour,
    amount_jpy,
    merchant_id,
    merchant_category,
    status != 'declined' AS spent,
    status = 'declined' AS declined
  FROM card_transactions
),
joined AS (
  SELECT
    r.request_id,
    c.amount_jpy,
    c.merchant_id,
    c.merchant_category,
    c.spent,
    c.declined,
    DATE_DIFF(r.request_date, c.local_date, DAY) AS age_days,
    DATE_DIFF(DATE_TRUNC(r.request_date, MONTH), DATE_TRUNC(c.local_date, MONTH), MONTH) AS month_lag,
    (c.local_hour >= 22 OR c.local_hour < 5) AS at_night,
    -- 1970-01-04 was a Sunday: 0 = Sunday, 6 = Saturday, whatever the engine's DAYOFWEEK base.
    MOD(DATE_DIFF(c.local_date, DATE '1970-01-04', DAY), 7) IN (0, 6) AS on_weekend
  FROM requests AS r
  JOIN card AS c
    ON c.user_id = r.user_id
    AND c.local_date < r.request_date
    AND c.local_date >= LEAST(
      DATE_SUB(r.request_date, INTERVAL 90 DAY),
      DATE_SUB(DATE_TRUNC(r.request_date, MONTH), INTERVAL 3 MONTH))
),
per_request AS (
  SELECT
    request_id,
    COUNTIF(spent AND age_days <= 7) AS card_count_7d,
    CAST(SUM(IF(spent AND age_days <= 7, amount_jpy, NULL)) AS INT64) AS card_sum_7d,
    AVG(IF(spent AND age_days <= 7, amount_jpy, NULL)) AS card_mean_7d,
    MAX(IF(spent AND age_days <= 7, amount_jpy, NULL)) AS card_max_7d,
    STDDEV_SAMP(IF(spent AND age_days <= 7, amount_jpy, NULL)) AS card_std_7d,
    COUNTIF(spent AND age_days <= 30) AS card_count_30d,
    CAST(SUM(IF(spent AND age_days <= 30, amount_jpy, NULL)) AS INT64) AS card_sum_30d,
    AVG(IF(spent AND age_days <= 30, amount_jpy, NULL)) AS card_mean_30d,
    MAX(IF(spent AND age_days <= 30, amount_jpy, NULL)) AS card_max_30d,
    STDDEV_SAMP(IF(spent AND age_days <= 30, amount_jpy, NULL)) AS card_std_30d,
    COUNTIF(spent AND age_days <= 90) AS card_count_90d,
    CAST(SUM(IF(spent AND age_days <= 90, amount_jpy, NULL)) AS INT64) AS card_sum_90d,
    AVG(IF(spent AND age_days <= 90, amount_jpy, NULL)) AS card_mean_90d,
    MAX(IF(spent AND age_days <= 90, amount_jpy, NULL)) AS card_max_90d,
    STDDEV_SAMP(IF(spent AND age_days <= 90, amount_jpy, NULL)) AS card_std_90d,
    COUNTIF(declined AND age_days <= 30) AS card_declined_count_30d,
    COUNT(DISTINCT IF(spent AND age_days <= 90, merchant_id, NULL)) AS card_distinct_merchants_90d,
    CAST(SUM(IF(spent AND age_days <= 90 AND merchant_category = 'grocery', amount_jpy, NULL)) AS INT64) AS grocery_90d,
    CAST(SUM(IF(spent AND age_days <= 90 AND merchant_category = 'convenience', amount_jpy, NULL)) AS INT64) AS convenience_90d,
    CAST(SUM(IF(spent AND age_days <= 90 AND merchant_category = 'dining', amount_jpy, NULL)) AS INT64) AS dining_90d,
    CAST(SUM(IF(spent AND age_days <= 90 AND merchant_category = 'transport', amount_jpy, NULL)) AS INT64) AS transport_90d,
    COUNTIF(spent AND age_days <= 90 AND at_night) AS night_count_90d,
    COUNTIF(spent AND age_days <= 90 AND on_weekend) AS weekend_count_90d,
    CAST(SUM(IF(spent AND month_lag = 1, amount_jpy, NULL)) AS INT64) AS lag1,
    CAST(SUM(IF(spent AND month_lag = 2, amount_jpy, NULL)) AS INT64) AS lag2,
    CAST(SUM(IF(spent AND month_lag = 3, amount_jpy, NULL)) AS INT64) AS lag3
  FROM joined
  GROUP BY request_id
)
SELECT
  r.request_id,
  COALESCE(p.card_count_7d, 0) AS card_count_7d,
  COALESCE(p.card_sum_7d, 0) AS card_sum_7d,
  p.card_mean_7d,
  p.card_max_7d,
  p.card_std_7d,
  COALESCE(p.card_count_30d, 0) AS card_count_30d,
  COALESCE(p.card_sum_30d, 0) AS card_sum_30d,
  p.card_mean_30d,
  p.card_max_30d,
  p.card_std_30d,
  COALESCE(p.card_count_90d, 0) AS card_count_90d,
  COALESCE(p.card_sum_90d, 0) AS card_sum_90d,
  p.card_mean_90d,
  p.card_max_90d,
  p.card_std_90d,
  COALESCE(p.card_declined_count_30d, 0) AS card_declined_count_30d,
  COALESCE(p.card_distinct_merchants_90d, 0) AS card_distinct_merchants_90d,
  SAFE_DIVIDE(COALESCE(p.grocery_90d, 0), p.card_sum_90d) AS card_share_grocery_90d,
  SAFE_DIVIDE(COALESCE(p.convenience_90d, 0), p.card_sum_90d) AS card_share_convenience_90d,
  SAFE_DIVIDE(COALESCE(p.dining_90d, 0), p.card_sum_90d) AS card_share_dining_90d,
  SAFE_DIVIDE(COALESCE(p.transport_90d, 0), p.card_sum_90d) AS card_share_transport_90d,
  SAFE_DIVIDE(p.night_count_90d, p.card_count_90d) AS card_night_ratio_90d,
  SAFE_DIVIDE(p.weekend_count_90d, p.card_count_90d) AS card_weekend_ratio_90d,
  COALESCE(p.lag1, 0) AS card_spend_month_lag1,
  COALESCE(p.lag2, 0) AS card_spend_month_lag2,
  COALESCE(p.lag3, 0) AS card_spend_month_lag3,
  COALESCE(p.lag1, 0) - COALESCE(p.lag2, 0) AS card_spend_trend_1_2,
  COALESCE(p.lag1, 0) - COALESCE(p.lag3, 0) AS card_spend_trend_1_3
FROM requests AS r
LEFT JOIN per_request AS p ON p.request_id = r.request_id
