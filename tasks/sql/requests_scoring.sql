-- Scoring requests: one per active user signed up by the end of @as_of, scored as a request
-- made on the next day, so features use data up to the end of @as_of (same SQL as training).
SELECT
  user_id AS request_id,
  user_id,
  CAST(DATE_ADD(@as_of, INTERVAL 1 DAY) AS DATE) AS request_date,
  @as_of AS as_of
FROM users
WHERE status = 'active'
  -- Local day by epoch arithmetic with the zone's fixed offset (see 10_card.sql).
  AND DIV((UNIX_MICROS(signed_up_at) + @utc_offset_us), 86400000000) <= UNIX_DATE(@as_of)
