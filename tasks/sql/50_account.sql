-- The account as it stood before the request day D: its age in days and whether identity
-- verification (eKYC) had passed by then (a later verification is not known yet).
SELECT
  r.request_id,
  DATE_DIFF(r.request_date, DATE(u.signed_up_at, @tz), DAY) AS account_age_days,
  CAST(
    IF(u.identity_verified_at IS NOT NULL AND DATE(u.identity_verified_at, @tz) < r.request_date, 1, 0)
    AS INT64
  ) AS identity_verified
FROM requests AS r
LEFT JOIN users AS u ON u.user_id = r.user_id
