-- App engagement before the request day D: sessions (session_start events), events and active
-- days over 7 and 30 days, and days since the last session within 90 days (NULL: none in 90
-- days). Events are first rolled up per user and day (event_date is the business date), so the
-- point-in-time join touches one row per active day instead of one per event.
WITH request_days AS (
  SELECT request_id, user_id, UNIX_DATE(request_date) AS request_day FROM requests
),
daily AS (
  SELECT
    user_id,
    UNIX_DATE(event_date) AS event_day,
    CAST(COUNT(*) AS FLOAT64) AS events,
    CAST(COUNT(IF(event_name = 'session_start', 1, NULL)) AS FLOAT64) AS sessions
  FROM app_events
  -- Only the days some request looks back on (see 10_card.sql); a partition filter on BigQuery.
  WHERE event_date < (SELECT MAX(request_date) FROM requests)
    AND event_date >= (SELECT DATE_SUB(MIN(request_date), INTERVAL 90 DAY) FROM requests)
  GROUP BY user_id, event_date
),
joined AS (
  SELECT
    r.request_id,
    d.events,
    d.sessions,
    r.request_day - d.event_day AS age_days
  FROM request_days AS r
  JOIN daily AS d
    ON d.user_id = r.user_id
    AND d.event_day < r.request_day
    AND d.event_day >= r.request_day - 90
),
per_request AS (
  SELECT
    request_id,
    CAST(SUM(IF(age_days <= 7, sessions, 0)) AS INT64) AS app_sessions_7d,
    CAST(SUM(IF(age_days <= 30, sessions, 0)) AS INT64) AS app_sessions_30d,
    CAST(SUM(IF(age_days <= 7, events, 0)) AS INT64) AS app_events_7d,
    CAST(SUM(IF(age_days <= 30, events, 0)) AS INT64) AS app_events_30d,
    COUNT(IF(age_days <= 7, 1, NULL)) AS app_active_days_7d,
    COUNT(IF(age_days <= 30, 1, NULL)) AS app_active_days_30d,
    MIN(IF(sessions > 0, age_days, NULL)) AS app_days_since_last_session
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
