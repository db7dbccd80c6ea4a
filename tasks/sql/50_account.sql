-- The account as it stood before the request day D: its age in days and whether identity
-- verification (eKYC) had passed by then (a later verification is not known yet). Local days:
-- epoch arithmetic with the zone's fixed offset (see 10_card.sql).
SELECT
  r.request_id,
  UNIX_DATE(r.request_date) - DIV((UNIX_MICROS(u.signed_up_at) + @utc_offset_us), 86400000000) AS account_age_days,
  CAST(
    IF(u.identity_verified_at IS NOT NULL AND DIV((UNIX_MICROS(u.identity_verified_at) + @utc_offset_us), 86400000000) < UNIX_DATE(r.request_date), 1, 0)
    AS INT64
  ) AS identity_verified
FROM requests AS r
LEFT JOIN users AS u ON u.user_id = r.user_id
