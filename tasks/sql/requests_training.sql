-- Training requests: one per deferred charge whose outcome is known at the end of @as_of
-- (matured: @as_of >= due_date + @grace_days). Unmatured charges never appear.
-- Features of each row are taken as of its request day (data up to the end of the day before).
-- Local days are epoch arithmetic with the zone's fixed offset, as in 10_card.sql: DATE(ts, zone)
-- converts through the time-zone database row by row, which costs more than the query around it.
SELECT
  charge_id AS request_id,
  charge_id,
  user_id,
  requested_at,
  CAST(DATE_FROM_UNIX_DATE(DIV((UNIX_MICROS(requested_at) + @utc_offset_us), 86400000000)) AS DATE) AS request_date,
  amount_jpy AS request_amount_jpy,
  fee_jpy AS request_fee_jpy
FROM deferred_charges
WHERE DATE_DIFF(@as_of, due_date, DAY) >= @grace_days
  AND DIV((UNIX_MICROS(requested_at) + @utc_offset_us), 86400000000) <= UNIX_DATE(@as_of)
