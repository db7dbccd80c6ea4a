-- App engagement before the request day D: sessions, events and active days over 7 and 30
-- days, and days since the last session within 90 days (NULL: none in 90 days). The filter
-- on event_date (the partition column) keeps BigQuery from scanning the whole history.
WITH joined AS (
  SELECT
    r.request_id,
    e.session_id,
    e.event_name,
    e.event_date,
    DATE_DIFF(r.request_date, e.event_date, DAY) AS age_days
  FROM requests AS r
  JOIN app_events AS e
    ON e.user_id = r.user_id
    AND e.event_date < r.request_date
    AND e.event_date >= DATE_SUB(r.request_date, INTERVAL 90 DAY)
),
per_request AS (
  SELECT
    request_id,
    COUNT(DISTINCT IF(age_days <= 7, session_id, NULL)) AS app_sessions_7d,
    COUNT(DISTINCT IF(age_days <= 30, session_id, NULL)) AS app_sessions_30d,
    COUNTIF(age_days <= 7) AS app_events_7d,
    COUNTIF(age_days <= 30) AS app_events_30d,
    COUNT(DISTINCT IF(age_days <= 7, event_date, NULL)) AS app_active_days_7d,
    COUNT(DISTINCT IF(age_days <= 30, event_date, NULL)) AS app_active_days_30d,
    MIN(IF(event_name = 'session_start', age_days, NULL)) AS app_days_since_last_session
  FROM joined
  GROUP BY request_id
)
SELECT
  r.request_id,
  COALESCE(p.app_sessions_7d, 0) AS app_sessions_7d,
  COALESCE(p.app_sessions_30d, 0) AS app_sessions_30d,
  COALESCE(p.app_events_7d, 0) AS app_events_7d,
  COALESCE(p.app_events_30d, 0) AS app_events_30d,
  COALESCE(p.app_active_days_7d, 0) AS app_active_days_7d,
  COALESCE(p.app_active_days_30d, 0) AS app_active_days_30d,
  p.app_days_since_last_session
FROM requests AS r
LEFT JOIN per_request AS p ON p.request_id = r.request_id
