-- Training requests: one per deferred charge whose outcome is known at the end of @as_of
-- (matured: @as_of >= due_date + @grace_days). Unmatured charges never appear.
-- Features of each row are taken as of its request day (data up to the end of the day before).
SELECT
  charge_id AS request_id,
  charge_id,
  user_id,
  requested_at,
  DATE(requested_at, @tz) AS request_date,
  amount_jpy AS request_amount_jpy,
  fee_jpy AS request_fee_jpy
FROM deferred_charges
WHERE DATE_DIFF(@as_of, due_date, DAY) >= @grace_days
  AND DATE(requested_at, @tz) <= @as_of
