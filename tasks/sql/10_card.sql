-- Card spending before the request day D (local days D-90 .. D-1, and the three calendar months
-- before D's month). "Spent" means not declined: refunded transactions count at their
-- authorization, because the source has no refund timestamp and using today's refunded status
-- would leak a later event into an earlier request. Declined ones are counted on their own
-- (a decline is known the moment it happens).
-- Local days and hours are integer arithmetic on epoch microseconds shifted by the business
-- zone's fixed UTC offset (@utc_offset_us): per-row time-zone conversion costs more than the
-- whole aggregation, and tasks/features.py refuses a zone whose offset is not fixed.
WITH request_days AS (
  SELECT
    request_id,
    user_id,
    UNIX_DATE(request_date) AS request_day,
    -- The first local day of D's month and of the three months before it (lags 1..3).
    UNIX_DATE(DATE_TRUNC(request_date, MONTH)) AS month0_day,
    UNIX_DATE(DATE_SUB(DATE_TRUNC(request_date, MONTH), INTERVAL 1 MONTH)) AS month1_day,
    UNIX_DATE(DATE_SUB(DATE_TRUNC(request_date, MONTH), INTERVAL 2 MONTH)) AS month2_day,
    UNIX_DATE(DATE_SUB(DATE_TRUNC(request_date, MONTH), INTERVAL 3 MONTH)) AS month3_day,
    -- The first day the look-back needs: 90 days back, or the start of lag 3's month if earlier.
    LEAST(
      UNIX_DATE(request_date) - 90,
      UNIX_DATE(DATE_SUB(DATE_TRUNC(request_date, MONTH), INTERVAL 3 MONTH))) AS lo_day
  FROM requests
),
-- Each request once per 32-day bucket its look-back touches (4 or 5), so the join matches a
-- request with its user's transactions of those buckets only instead of the user's whole history:
-- about a third of the candidate pairs. (DIV's argument is parenthesised on purpose: sqlglot
-- drops the parentheses of `DIV(a - 1, 32)` when it writes DuckDB's `//`.)
request_buckets AS (
  SELECT r.*, bucket
  FROM request_days AS r,
    UNNEST(GENERATE_ARRAY(DIV(r.lo_day, 32), DIV((r.request_day - 1), 32))) AS bucket
),
card AS (
  SELECT
    user_id,
    DIV((UNIX_MICROS(authorized_at) + @utc_offset_us), 86400000000) AS local_day,
    DIV(DIV((UNIX_MICROS(authorized_at) + @utc_offset_us), 86400000000), 32) AS bucket,
    MOD(DIV((UNIX_MICROS(authorized_at) + @utc_offset_us), 3600000000), 24) AS local_hour,
    -- FLOAT64 sums are exact for yen (< 2^53) and much cheaper than wide-integer sums on DuckDB.
    CAST(amount_jpy AS FLOAT64) AS amount_jpy,
    merchant_id,
    -- A small code instead of the category text: the join carries it for every transaction.
    CASE merchant_category
      WHEN 'grocery' THEN 1 WHEN 'convenience' THEN 2 WHEN 'dining' THEN 3 WHEN 'transport' THEN 4
      WHEN 'online_shopping' THEN 5 WHEN 'entertainment' THEN 6 WHEN 'fashion' THEN 7
      ELSE 0
    END AS category_code,
    status != 'declined' AS spent
  FROM card_transactions
  -- Only the span some request looks back on: a scoring set's look-back is the last months, not
  -- the whole history, and a training set's requests (matured charges) are weeks older than the
  -- newest transactions. A range on the stored column, not on the computed local day.
  WHERE authorized_at >= (SELECT TIMESTAMP_MICROS(MIN(lo_day) * 86400000000 - @utc_offset_us) FROM request_days)
    AND authorized_at < (SELECT TIMESTAMP_MICROS(MAX(request_day) * 86400000000 - @utc_offset_us) FROM request_days)
),
joined AS (
  -- Each transaction in a request's look-back, projected once into per-window values (NULL
  -- outside the window), so the aggregates below are plain column aggregates.
  SELECT
    r.request_id,
    IF(c.spent AND c.local_day >= r.request_day - 7, c.amount_jpy, NULL) AS spent_7d,
    IF(c.spent AND c.local_day >= r.request_day - 30, c.amount_jpy, NULL) AS spent_30d,
    IF(c.spent AND c.local_day >= r.request_day - 90, c.amount_jpy, NULL) AS spent_90d,
    IF(NOT c.spent AND c.local_day >= r.request_day - 30, 1, NULL) AS declined_30d,
    IF(c.spent AND c.local_day >= r.request_day - 90, c.merchant_id, NULL) AS merchant_90d,
    IF(c.spent AND c.local_day >= r.request_day - 90, c.category_code, NULL) AS category_90d,
    IF(c.spent AND c.local_day >= r.request_day - 90 AND (c.local_hour >= 22 OR c.local_hour < 5), 1, NULL)
      AS night_90d,
    -- Day 0 (1970-01-01) was a Thursday: MOD(day + 4, 7) is 0 on Sundays and 6 on Saturdays.
    IF(c.spent AND c.local_day >= r.request_day - 90 AND MOD(c.local_day + 4, 7) IN (0, 6), 1, NULL)
      AS weekend_90d,
    IF(c.spent AND c.local_day >= r.month1_day AND c.local_day < r.month0_day, c.amount_jpy, NULL) AS lag1,
    IF(c.spent AND c.local_day >= r.month2_day AND c.local_day < r.month1_day, c.amount_jpy, NULL) AS lag2,
    IF(c.spent AND c.local_day >= r.month3_day AND c.local_day < r.month2_day, c.amount_jpy, NULL) AS lag3
  FROM request_buckets AS r
  JOIN card AS c
    ON c.user_id = r.user_id
    AND c.bucket = r.bucket
    AND c.local_day < r.request_day
    AND c.local_day >= r.lo_day
),
-- Means and standard deviations come from exact sums (integer-valued FLOAT64 sums, then INT64
-- arithmetic), not AVG/STDDEV_SAMP: parallel floating-point accumulation differs in the last bit
-- from run to run, and the dataset digest must not.
per_request AS (
  SELECT
    request_id,
    COUNT(spent_7d) AS card_count_7d,
    CAST(SUM(spent_7d) AS INT64) AS card_sum_7d,
    CAST(MAX(spent_7d) AS INT64) AS card_max_7d,
    SUM(spent_7d * spent_7d) AS sumsq_7d,
    COUNT(spent_30d) AS card_count_30d,
    CAST(SUM(spent_30d) AS INT64) AS card_sum_30d,
    CAST(MAX(spent_30d) AS INT64) AS card_max_30d,
    SUM(spent_30d * spent_30d) AS sumsq_30d,
    COUNT(spent_90d) AS card_count_90d,
    CAST(SUM(spent_90d) AS INT64) AS card_sum_90d,
    CAST(MAX(spent_90d) AS INT64) AS card_max_90d,
    SUM(spent_90d * spent_90d) AS sumsq_90d,
    COUNT(declined_30d) AS card_declined_count_30d,
    COUNT(DISTINCT merchant_90d) AS card_distinct_merchants_90d,
    SUM(IF(category_90d = 1, spent_90d, NULL)) AS grocery_90d,
    SUM(IF(category_90d = 2, spent_90d, NULL)) AS convenience_90d,
    SUM(IF(category_90d = 3, spent_90d, NULL)) AS dining_90d,
    SUM(IF(category_90d = 4, spent_90d, NULL)) AS transport_90d,
    SUM(IF(category_90d = 5, spent_90d, NULL)) AS online_shopping_90d,
    SUM(IF(category_90d = 6, spent_90d, NULL)) AS entertainment_90d,
    SUM(IF(category_90d = 7, spent_90d, NULL)) AS fashion_90d,
    COUNT(night_90d) AS night_count_90d,
    COUNT(weekend_90d) AS weekend_count_90d,
    CAST(SUM(lag1) AS INT64) AS lag1,
    CAST(SUM(lag2) AS INT64) AS lag2,
    CAST(SUM(lag3) AS INT64) AS lag3
  FROM joined
  GROUP BY request_id
)
SELECT
  r.request_id,
  COALESCE(p.card_count_7d, 0) AS card_count_7d,
  COALESCE(p.card_sum_7d, 0) AS card_sum_7d,
  SAFE_DIVIDE(p.card_sum_7d, p.card_count_7d) AS card_mean_7d,
  p.card_max_7d,
  IF(
    p.card_count_7d >= 2,
    SQRT((p.card_count_7d * CAST(p.sumsq_7d AS INT64) - p.card_sum_7d * p.card_sum_7d)
      / (p.card_count_7d * (p.card_count_7d - 1))),
    NULL) AS card_std_7d,
  COALESCE(p.card_count_30d, 0) AS card_count_30d,
  COALESCE(p.card_sum_30d, 0) AS card_sum_30d,
  SAFE_DIVIDE(p.card_sum_30d, p.card_count_30d) AS card_mean_30d,
  p.card_max_30d,
  IF(
    p.card_count_30d >= 2,
    SQRT((p.card_count_30d * CAST(p.sumsq_30d AS INT64) - p.card_sum_30d * p.card_sum_30d)
      / (p.card_count_30d * (p.card_count_30d - 1))),
    NULL) AS card_std_30d,
  COALESCE(p.card_count_90d, 0) AS card_count_90d,
  COALESCE(p.card_sum_90d, 0) AS card_sum_90d,
  SAFE_DIVIDE(p.card_sum_90d, p.card_count_90d) AS card_mean_90d,
  p.card_max_90d,
  IF(
    p.card_count_90d >= 2,
    SQRT((p.card_count_90d * CAST(p.sumsq_90d AS INT64) - p.card_sum_90d * p.card_sum_90d)
      / (p.card_count_90d * (p.card_count_90d - 1))),
    NULL) AS card_std_90d,
  COALESCE(p.card_declined_count_30d, 0) AS card_declined_count_30d,
  COALESCE(p.card_distinct_merchants_90d, 0) AS card_distinct_merchants_90d,
  SAFE_DIVIDE(COALESCE(p.grocery_90d, 0), p.card_sum_90d) AS card_share_grocery_90d,
  SAFE_DIVIDE(COALESCE(p.convenience_90d, 0), p.card_sum_90d) AS card_share_convenience_90d,
  SAFE_DIVIDE(COALESCE(p.dining_90d, 0), p.card_sum_90d) AS card_share_dining_90d,
  SAFE_DIVIDE(COALESCE(p.transport_90d, 0), p.card_sum_90d) AS card_share_transport_90d,
  SAFE_DIVIDE(COALESCE(p.online_shopping_90d, 0), p.card_sum_90d) AS card_share_online_shopping_90d,
  SAFE_DIVIDE(COALESCE(p.entertainment_90d, 0), p.card_sum_90d) AS card_share_entertainment_90d,
  SAFE_DIVIDE(COALESCE(p.fashion_90d, 0), p.card_sum_90d) AS card_share_fashion_90d,
  SAFE_DIVIDE(p.night_count_90d, p.card_count_90d) AS card_night_ratio_90d,
  SAFE_DIVIDE(p.weekend_count_90d, p.card_count_90d) AS card_weekend_ratio_90d,
  COALESCE(p.lag1, 0) AS card_spend_month_lag1,
  COALESCE(p.lag2, 0) AS card_spend_month_lag2,
  COALESCE(p.lag3, 0) AS card_spend_month_lag3,
  COALESCE(p.lag1, 0) - COALESCE(p.lag2, 0) AS card_spend_trend_1_2,
  COALESCE(p.lag1, 0) - COALESCE(p.lag3, 0) AS card_spend_trend_1_3
FROM requests AS r
LEFT JOIN per_request AS p ON p.request_id = r.request_id
